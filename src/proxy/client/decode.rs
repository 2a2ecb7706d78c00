//! The body of an upstream's answer, framed as its head says (length,
//! chunked, or until close; pingora's `v1/body.rs` states), streamed as it
//! arrives. A body that ends early is an error, never a clean end.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_web::rt::net::TcpStream;
use bytes::{Buf, Bytes};
use futures_util::Stream;

use super::super::body::{BodyError, IdleTimer};
use super::head::{Framing, Parsed};
use super::{Conn, MAX_HEAD, UpstreamClient};

enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Close,
    Done,
}

/// The upstream's answer body. Ends with an error, never cleanly, if the
/// upstream stops early or falls silent for the idle timeout.
pub struct ResponseBody {
    state: State,
    conn: Option<Conn>,
    keep_alive: bool,
    client: Rc<UpstreamClient>,
    idle_timeout: Duration,
    timer: IdleTimer,
}

impl ResponseBody {
    /// The body of an answer whose head was `parsed`, read from `conn`; the
    /// connection goes back to `client`'s pool once the body is read to its
    /// end (at once, for an answer without one).
    pub(super) fn new(
        conn: Conn,
        parsed: &Parsed,
        client: Rc<UpstreamClient>,
        idle_timeout: Duration,
    ) -> Self {
        let mut body = ResponseBody {
            state: match parsed.framing {
                Framing::None | Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::ChunkSize,
                Framing::Close => State::Close,
            },
            conn: Some(conn),
            keep_alive: parsed.keep_alive,
            client,
            idle_timeout,
            timer: IdleTimer::default(),
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The raw connection after a protocol switch (`101`), with any bytes
    /// already read past the head.
    pub fn into_raw(mut self) -> Option<(Option<Bytes>, TcpStream)> {
        if !matches!(self.state, State::Close) {
            return None;
        }
        let conn = self.conn.take()?;
        let early = Some(conn.read.freeze()).filter(|b| !b.is_empty());
        Some((early, conn.io))
    }

    /// The body was read to its end: the connection goes back to the pool.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.read.is_empty()
        {
            self.client.checkin(conn);
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.read;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(remaining) if !buf.is_empty() => {
                    let n = remaining.min(buf.len() as u64);
                    let chunk = buf.split_to(n as usize).freeze();
                    if n == remaining {
                        self.finish();
                    } else {
                        self.state = State::Length(remaining - n);
                    }
                    return Poll::Ready(Some(Ok(chunk)));
                }
                State::Close if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                State::ChunkData(remaining) if !buf.is_empty() => {
                    let n = remaining.min(buf.len() as u64);
                    let chunk = buf.split_to(n as usize).freeze();
                    self.state = if n == remaining {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(remaining - n)
                    };
                    return Poll::Ready(Some(Ok(chunk)));
                }
                State::ChunkSize if !buf.is_empty() => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, 0))) => {
                        buf.advance(used);
                        self.state = State::Trailers;
                        continue;
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = State::ChunkData(size);
                        continue;
                    }
                    Ok(httparse::Status::Partial) if buf.len() < 1024 => {}
                    _ => {
                        return Poll::Ready(Some(Err(BodyError::Upstream(
                            "malformed chunk size".into(),
                        ))));
                    }
                },
                State::ChunkDataEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err(BodyError::Upstream(
                            "malformed chunk".into(),
                        ))));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers if !buf.is_empty() => {
                    // Trailer fields are not forwarded; skip lines up to the blank one.
                    match buf.iter().position(|&b| b == b'\n') {
                        Some(end) => {
                            let blank = end == 0 || (end == 1 && buf[0] == b'\r');
                            buf.advance(end + 1);
                            if blank {
                                self.finish();
                                return Poll::Ready(None);
                            }
                            continue;
                        }
                        None if buf.len() < MAX_HEAD => {}
                        None => {
                            return Poll::Ready(Some(Err(BodyError::Upstream(
                                "trailers too large".into(),
                            ))));
                        }
                    }
                }
                _ => {}
            }
            // Need more bytes.
            let conn = self.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.state, State::Close) => {
                    self.state = State::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(BodyError::Upstream(
                        "the upstream closed the connection before the body was complete".into(),
                    ))));
                }
                Ok(_) => {}
                Err(err) => return Poll::Ready(Some(Err(BodyError::UpstreamIo(err)))),
            }
        }
    }
}

impl Stream for ResponseBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.poll_inner(cx) {
            Poll::Ready(Some(Err(err))) => {
                log::warn!("upstream response body failed, closing the client connection: {err}");
                this.state = State::Done;
                this.conn = None;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(item) => {
                this.timer.disarm();
                Poll::Ready(item)
            }
            Poll::Pending => {
                let idle = this.idle_timeout;
                ready!(this.timer.poll_expired(idle, cx));
                log::warn!(
                    "upstream sent no body bytes for {idle:?}, closing the client connection"
                );
                this.state = State::Done;
                this.conn = None;
                Poll::Ready(Some(Err(BodyError::UpstreamIdle(idle))))
            }
        }
    }
}
