//! floodgate's HTTP/1.1 client for its one upstream: a per-worker pool of
//! keep-alive connections, each with its own read and write buffers.
//!
//! Why not awc: awc 3.11 reports a chunked response body cut short by the
//! upstream as complete (its payload stream turns connection EOF into a clean
//! end, so the client would get a well-formed but truncated response), reads
//! no body at all from an HTTP/1.1 response delimited by connection close,
//! adds a `Date` header to every request, and builds a new codec (with a
//! date-service task) per request. This client writes the request head
//! straight from the client's headers into the connection's buffer (no
//! intermediate header map), parses the answer with httparse (as actix-http
//! does), frames bodies itself (length, chunked, or until close), and treats a
//! body that ends early as an error, which the client sees as a connection
//! closed mid-body.
//!
//! The pool is per worker (no locks): most recently used connection first,
//! idle connections closed after [`POOL_IDLE`]. A bodiless idempotent request
//! that fails on a reused connection before any byte of an answer arrived is
//! sent again once on a fresh connection: that is the upstream having closed
//! the connection while it was idle, not an upstream fault (nginx's
//! `proxy_next_upstream error` does the same).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode, Version};
use actix_web::rt::net::TcpStream;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use smallvec::SmallVec;
use tokio::io::AsyncWriteExt;

use super::body::{BodyError, IdleTimer};

/// How long an idle pooled connection is kept. Below the 5 s idle timeout of
/// Node.js, uvicorn and others, so a reused connection is rarely one the
/// upstream is closing; under load connections are never idle this long.
pub const POOL_IDLE: Duration = Duration::from_secs(4);

/// Idle connections kept per worker at most (the benchmark's nginx keeps 256).
const POOL_MAX: usize = 256;

/// Headers parsed per answer at most, as actix-http's own limit.
const MAX_HEADERS: usize = 96;

/// Largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Idle time after which a pooled connection is checked before reuse.
const VERIFY_AFTER_IDLE: Duration = Duration::from_millis(250);

/// Largest first body chunk copied into the head's write rather than
/// written on its own.
const COALESCE_MAX: usize = 16 * 1024;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connecting to the upstream: {0}")]
    Connect(io::Error),
    #[error("sending the request: {0}")]
    Send(io::Error),
    #[error("reading the answer: {0}")]
    Receive(io::Error),
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error("the upstream sent an invalid answer: {0}")]
    Invalid(&'static str),
    /// The client's body failed (idle or broken); not the upstream's fault.
    #[error("{0}")]
    Body(BodyError),
    /// The upstream deadline passed.
    #[error("the upstream did not answer in time")]
    Timeout,
}

impl ExchangeError {
    /// The connection failed before any answer: on a reused connection, the
    /// upstream had closed it while it was idle.
    fn dead_connection(&self) -> bool {
        matches!(
            self,
            ExchangeError::Send(_) | ExchangeError::Receive(_) | ExchangeError::Closed
        )
    }
}

/// A request body on its way: nothing, `Content-Length` bytes, or chunked.
pub enum RequestBody<S> {
    None,
    Sized(u64, S),
    Chunked(S),
}

/// The head of the upstream's answer; its end-to-end headers went into the
/// map passed to [`UpstreamClient::exchange`].
pub struct Answer {
    pub status: StatusCode,
    /// Whether the answer has a body at all (not for `HEAD`, 1xx, 204, 304).
    pub has_body: bool,
    /// The `Content-Length` the answer declared (also for `HEAD`).
    pub content_length: Option<u64>,
    pub body: ResponseBody,
}

/// One connection to the upstream with its buffers.
struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: BytesMut,
}

/// One worker's connections to the upstream.
pub struct UpstreamClient {
    host: String,
    port: u16,
    idle: RefCell<VecDeque<(Conn, Instant)>>,
}

impl UpstreamClient {
    /// A client for `host:port`, used on one worker's runtime only.
    pub fn new(host: &str, port: u16) -> Self {
        UpstreamClient {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            idle: RefCell::new(VecDeque::new()),
        }
    }

    /// A new connection, not from the pool.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Opens a new connection. Callers box this future: connecting (with
    /// name resolution) is rare and its state is large, and keeping it out
    /// of the exchange's own state keeps every request's future small.
    async fn fresh(&self) -> Result<Conn, ExchangeError> {
        let io = self.connect().await.map_err(ExchangeError::Connect)?;
        Ok(Conn {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(4096),
        })
    }

    /// The most recently used idle connection still fit for reuse.
    ///
    /// One idle longer than [`VERIFY_AFTER_IDLE`] is first checked without
    /// blocking: if the upstream closed it (or, wrongly, sent bytes nobody
    /// asked for) it is dropped. nginx keeps watching its idle upstream
    /// connections for the same reason. Connections reused sooner are not
    /// checked: under load that would cost a system call per request, and an
    /// upstream rarely closes a connection that quickly.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some((conn, since)) = idle.pop_back() {
            let idle_for = since.elapsed();
            if idle_for >= POOL_IDLE {
                // Everything older is older still.
                idle.clear();
                return None;
            }
            if idle_for < VERIFY_AFTER_IDLE || conn.is_quiet() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        while idle
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= POOL_IDLE)
        {
            idle.pop_front();
        }
        if idle.len() < POOL_MAX {
            idle.push_back((conn, Instant::now()));
        }
    }

    /// Sends a request and reads the head of its answer. `write_head` writes
    /// the request line and headers (each line ending in CRLF, without the
    /// blank line); the body's framing header and the blank line are added
    /// here, from `body` alone: the client's own `Content-Length` and
    /// `Transfer-Encoding` never reach the upstream. The answer's end-to-end
    /// headers are put into `headers` (the client response's own map, so none
    /// is built twice); its body streams from [`Answer::body`], and the
    /// connection goes back to the pool once that is read to its end.
    pub async fn exchange<S>(
        self: &Rc<Self>,
        method: &Method,
        write_head: impl Fn(&mut BytesMut),
        body: RequestBody<S>,
        idle_timeout: Duration,
        headers: &mut HeaderMap,
    ) -> Result<Answer, ExchangeError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        let (framing, sized): (&[u8], Option<u64>) = match &body {
            RequestBody::None => (b"", None),
            RequestBody::Sized(len, _) => (b"content-length: ", Some(*len)),
            RequestBody::Chunked(_) => (b"transfer-encoding: chunked\r\n", None),
        };
        let head = |out: &mut BytesMut| {
            out.clear();
            write_head(out);
            out.extend_from_slice(framing);
            if let Some(len) = sized {
                out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
        };

        let mut conn = match self.checkout() {
            // A reused connection may still have been closed by the upstream
            // just now. For a bodiless idempotent request that is harmless to
            // find out: send, and if it fails before any byte of an answer
            // arrived, send again on a fresh connection (as nginx's
            // `proxy_next_upstream error` does).
            Some(mut conn) if matches!(body, RequestBody::None) && method.is_idempotent() => {
                head(&mut conn.write);
                let answered = match conn.send_buffered().await {
                    Ok(()) => conn.read_head(method, headers).await,
                    Err(err) => Err(err),
                };
                match answered {
                    Ok(parsed) => return Ok(self.answer(conn, parsed, idle_timeout)),
                    Err(err) if err.dead_connection() => {
                        log::debug!(
                            "reused upstream connection was dead ({err}); retrying on a new one"
                        );
                        Box::pin(self.fresh()).await?
                    }
                    Err(err) => return Err(err),
                }
            }
            Some(conn) => conn,
            None => Box::pin(self.fresh()).await?,
        };

        head(&mut conn.write);
        let sent = match body {
            RequestBody::None => conn.send_buffered().await,
            RequestBody::Sized(len, stream) => conn.send_sized(len, stream).await,
            RequestBody::Chunked(stream) => conn.send_chunked(stream).await,
        };
        match sent {
            Ok(()) => {}
            // The upstream may have answered early (413, 401) and closed:
            // relay that answer rather than the failed write.
            Err(ExchangeError::Send(err)) => match conn.read_head(method, headers).await {
                Ok(mut parsed) => {
                    parsed.keep_alive = false;
                    return Ok(self.answer(conn, parsed, idle_timeout));
                }
                Err(_) => return Err(ExchangeError::Send(err)),
            },
            Err(err) => return Err(err),
        }
        let parsed = conn.read_head(method, headers).await?;
        Ok(self.answer(conn, parsed, idle_timeout))
    }

    /// The answer, with its body framed as its head says.
    fn answer(self: &Rc<Self>, conn: Conn, parsed: Parsed, idle_timeout: Duration) -> Answer {
        let mut body = ResponseBody {
            state: match parsed.framing {
                Framing::None | Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::ChunkSize,
                Framing::Close => State::Close,
            },
            conn: Some(conn),
            keep_alive: parsed.keep_alive,
            client: self.clone(),
            idle_timeout,
            timer: IdleTimer::default(),
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        Answer {
            status: parsed.status,
            has_body: parsed.framing != Framing::None,
            content_length: parsed.content_length,
            body,
        }
    }
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (HTTP/1.0 style, or after a
    /// protocol switch).
    Close,
}

struct Parsed {
    status: StatusCode,
    content_length: Option<u64>,
    framing: Framing,
    keep_alive: bool,
}

impl Conn {
    /// Writes the write buffer out.
    async fn send_buffered(&mut self) -> Result<(), ExchangeError> {
        let Conn { io, write, .. } = self;
        io.write_all(write).await.map_err(ExchangeError::Send)?;
        write.clear();
        Ok(())
    }

    /// Sends the buffered head and exactly `len` body bytes from `stream`; a
    /// small first chunk goes out in the same write as the head (as in
    /// [`send_chunked`](Self::send_chunked)), so a small upload costs the
    /// upstream one segment, not two.
    async fn send_sized<S>(&mut self, len: u64, mut stream: S) -> Result<(), ExchangeError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        let mut left = len;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(ExchangeError::Body)?;
            left = left.checked_sub(chunk.len() as u64).ok_or_else(|| {
                ExchangeError::Body(BodyError::Client(
                    "more body than its Content-Length".into(),
                ))
            })?;
            if !self.write.is_empty() && chunk.len() <= COALESCE_MAX {
                // The head is still buffered: one write for both.
                self.write.extend_from_slice(&chunk);
                self.send_buffered().await?;
            } else {
                self.send_buffered().await?;
                self.io
                    .write_all(&chunk)
                    .await
                    .map_err(ExchangeError::Send)?;
            }
        }
        if left > 0 {
            return Err(ExchangeError::Body(BodyError::Client(
                "less body than its Content-Length".into(),
            )));
        }
        // The head, if the body was empty.
        self.send_buffered().await
    }

    /// Sends the buffered head, then `stream` in chunked framing, one write
    /// per chunk.
    async fn send_chunked<S>(&mut self, mut stream: S) -> Result<(), ExchangeError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(ExchangeError::Body)?;
            if chunk.is_empty() {
                continue;
            }
            write!(&mut self.write, "{:x}\r\n", chunk.len()).expect("a BytesMut grows");
            self.write.extend_from_slice(&chunk);
            self.write.extend_from_slice(b"\r\n");
            self.send_buffered().await?;
        }
        self.write.extend_from_slice(b"0\r\n\r\n");
        self.send_buffered().await
    }

    /// Whether an idle connection has nothing to read: not closed by the
    /// upstream, and no stray bytes. Costs one non-blocking read.
    fn is_quiet(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads more into the read buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads and parses an answer's head, skipping interim answers (100
    /// Continue, 103 Early Hints), which are not relayed. After one, a lost
    /// connection is no longer a dead idle one (see `dead_connection`).
    async fn read_head(
        &mut self,
        method: &Method,
        headers: &mut HeaderMap,
    ) -> Result<Parsed, ExchangeError> {
        let mut interim = false;
        loop {
            if !self.read.is_empty() {
                match parse_head(&mut self.read, method, headers)? {
                    Some(parsed)
                        if parsed.status.is_informational()
                            && parsed.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        interim = true;
                        continue;
                    }
                    Some(parsed) => return Ok(parsed),
                    None if self.read.len() >= MAX_HEAD => {
                        return Err(ExchangeError::Invalid("head too large"));
                    }
                    None => {}
                }
            }
            match self.fill().await {
                Ok(0) if self.read.is_empty() && !interim => return Err(ExchangeError::Closed),
                Ok(0) => return Err(ExchangeError::Invalid("connection closed inside the head")),
                Ok(_) => {}
                Err(_) if interim => {
                    return Err(ExchangeError::Invalid(
                        "connection lost after an interim answer",
                    ));
                }
                Err(err) => return Err(ExchangeError::Receive(err)),
            }
        }
    }
}

/// Parses a complete head off the front of `buf`, or `None` if incomplete.
fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    headers: &mut HeaderMap,
) -> Result<Option<Parsed>, ExchangeError> {
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many headers"));
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed head")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Invalid("bad status"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };

    // Positions of names and values, to slice the frozen head without copying.
    let base = buf.as_ptr() as usize;
    let mut connection_close = version == Version::HTTP_10;
    let mut named: Vec<HeaderName> = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_coded = false;
    let mut spans: SmallVec<[(usize, usize, usize, usize); 16]> = SmallVec::new();
    for h in response.headers.iter() {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        spans.push((n, n + h.name.len(), v, v + h.value.len()));
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            for token in crate::headers::tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if version == Version::HTTP_10 {
                        connection_close = false;
                    }
                } else if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ExchangeError::Invalid("bad content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ExchangeError::Invalid("conflicting content-length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_coded = true;
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let head = buf.split_to(len).freeze();
    headers.clear();
    for (ns, ne, vs, ve) in spans {
        let Ok(name) = HeaderName::from_bytes(&head[ns..ne]) else {
            return Err(ExchangeError::Invalid("bad header name"));
        };
        let keep_upgrade = switching && name == header::UPGRADE;
        if !keep_upgrade && (super::is_hop_by_hop(&name) || named.contains(&name)) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| ExchangeError::Invalid("bad header value"))?;
        headers.append(name, value);
    }

    let no_body = *method == Method::HEAD
        || status.is_informational() && !switching
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if switching {
        Framing::Close
    } else if no_body {
        Framing::None
    } else if transfer_coded {
        // RFC 9112 §6.3: chunked last means chunked; any other coding runs
        // until close, and Content-Length is ignored either way.
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if transfer_coded {
        content_length = None;
        headers.remove(header::CONTENT_LENGTH);
    }
    let keep_alive = !connection_close && !matches!(framing, Framing::Close);
    Ok(Some(Parsed {
        status,
        content_length,
        framing,
        keep_alive,
    }))
}

// === ResponseBody ===

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
                Err(err) => return Poll::Ready(Some(Err(BodyError::Upstream(err.to_string())))),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], method: Method) -> (Parsed, HeaderMap) {
        let mut buf = BytesMut::from(raw);
        let mut headers = HeaderMap::new();
        let parsed = parse_head(&mut buf, &method, &mut headers)
            .unwrap()
            .unwrap();
        (parsed, headers)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (p, _) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET);
        assert_eq!(p.framing, Framing::Length(5));
        assert!(p.keep_alive);
        let (p, h) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert_eq!(p.content_length, None);
        assert!(
            !h.contains_key(header::CONTENT_LENGTH),
            "never both framings"
        );
        let (p, _) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Method::GET,
        );
        assert_eq!(p.framing, Framing::Close);
        let (p, _) = parse(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!(p.framing, Framing::Close);
        assert!(!p.keep_alive);
        let (p, _) = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::HEAD,
        );
        assert_eq!(p.framing, Framing::None);
        assert_eq!(p.content_length, Some(5));
        let (p, _) = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(p.framing, Framing::None);
        let (p, _) = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET);
        assert!(!p.keep_alive, "HTTP/1.0 closes unless it says keep-alive");
        let (p, _) = parse(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert!(p.keep_alive);
        let (p, _) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert!(!p.keep_alive);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let (_, h) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("connection"));
        assert_eq!(h.get_all("set-cookie").count(), 2);
    }

    #[test]
    fn bad_answers_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(
                parse_head(&mut buf, &Method::GET, &mut HeaderMap::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(
            parse_head(&mut partial, &Method::GET, &mut HeaderMap::new())
                .unwrap()
                .is_none()
        );
    }
}

#[cfg(test)]
mod proptests;
