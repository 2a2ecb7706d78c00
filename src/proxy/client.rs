//! floodgate's HTTP/1.1 client for its one upstream: a per-worker pool of
//! keep-alive connections, each a `Framed` over actix-http's client codec.
//!
//! Why not awc: awc 3.11 reports a chunked response body cut short by the
//! upstream as complete (its payload stream turns connection EOF into a clean
//! end, so the client would get a well-formed but truncated response), reads
//! no body at all from an HTTP/1.1 response delimited by connection close, and
//! builds a new codec, with a new date-service task, for every request. Here
//! the codec (with its buffers) lives as long as the connection, a body
//! that ends early is an error the client sees as a closed connection, and a
//! close-delimited body is read to its end.
//!
//! The pool is per worker (no locks): most recently used connection first,
//! idle connections closed after [`POOL_IDLE`]. A bodiless request that fails
//! on a reused connection before any byte of an answer arrived is retried
//! once on a fresh one: that is the upstream closing an idle connection just
//! as floodgate reused it, not an upstream fault.

use std::cell::{OnceCell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_http::h1::{ClientCodec, ClientPayloadCodec, Message, MessageType};
use actix_http::{RequestHead, RequestHeadType, ResponseHead, ServiceConfig, Version};
use actix_web::body::BodySize;
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::{Method, StatusCode};
use actix_web::rt::net::TcpStream;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, Stream, StreamExt};

use super::body::{BodyError, IdleTimer};

/// How long an idle pooled connection is kept. Below the 5 s idle timeout of
/// Node.js, uvicorn and others, so a reused connection is rarely one the
/// upstream is closing; under load connections are never idle this long.
pub const POOL_IDLE: Duration = Duration::from_secs(4);

/// Idle connections kept per worker at most (nginx's `keepalive` in the
/// benchmark's configuration is 256 too).
const POOL_MAX: usize = 256;

/// Read size for close-delimited bodies.
const READ_CHUNK: usize = 16 * 1024;

type Conn = Framed<TcpStream, ClientCodec>;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connecting to the upstream: {0}")]
    Connect(io::Error),
    #[error("sending the request: {0}")]
    Send(io::Error),
    #[error("the upstream closed the connection without answering")]
    Closed,
    #[error("the upstream sent an invalid response: {0}")]
    Invalid(String),
    /// The client's body failed (idle or broken); not the upstream's fault.
    #[error("{0}")]
    Body(BodyError),
    /// The upstream deadline passed.
    #[error("the upstream did not answer in time")]
    Timeout,
}

/// One worker's connections to the upstream.
pub struct UpstreamClient {
    host: String,
    port: u16,
    /// Created on first use: it starts a date-service task on the runtime.
    config: OnceCell<ServiceConfig>,
    idle: RefCell<VecDeque<(Conn, Instant)>>,
}

/// A request body on its way: nothing, `Content-Length` bytes, or chunked.
pub enum RequestBody<S> {
    None,
    Sized(u64, S),
    Chunked(S),
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
            config: OnceCell::new(),
            idle: RefCell::new(VecDeque::new()),
        }
    }

    /// A new connection, not from the pool.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some((conn, since)) = idle.pop_back() {
            if since.elapsed() < POOL_IDLE {
                return Some(conn);
            }
            // Everything older is older still.
            idle.clear();
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

    /// Sends `head` and `body` and reads the answer's head. The body of the
    /// answer streams from the returned [`ResponseBody`]; the connection goes
    /// back to the pool once it is read to the end.
    pub async fn exchange<S>(
        self: &Rc<Self>,
        mut head: RequestHead,
        body: RequestBody<S>,
        idle_timeout: Duration,
    ) -> Result<(ResponseHead, ResponseBody), ExchangeError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        head.version = Version::HTTP_11;
        if !head.headers.contains_key(header::HOST) {
            let host = match self.port {
                80 => self.host.clone(),
                port if self.host.contains(':') => format!("[{}]:{port}", self.host),
                port => format!("{}:{port}", self.host),
            };
            if let Ok(value) = header::HeaderValue::try_from(host) {
                head.headers.insert(header::HOST, value);
            }
        }
        let method = head.method.clone();
        let size = match &body {
            RequestBody::None => BodySize::None,
            RequestBody::Sized(len, _) => BodySize::Sized(*len),
            RequestBody::Chunked(_) => BodySize::Stream,
        };
        let head = Rc::new(head);

        let mut conn = match self.checkout() {
            // A reused connection may have been closed by the upstream while
            // idle. For a bodiless idempotent request that is harmless to
            // find out: send, wait for the first byte of an answer, and on
            // EOF or error send again on a fresh connection (as nginx's
            // `proxy_next_upstream error` does).
            Some(conn) if matches!(body, RequestBody::None) && method.is_idempotent() => {
                match send_and_peek(conn, &head, size).await {
                    Ok(conn) => return self.read_head(conn, &method, idle_timeout).await,
                    Err(err) => {
                        log::debug!(
                            "reused upstream connection was dead ({err}); retrying on a new one"
                        );
                        self.fresh().await?
                    }
                }
            }
            Some(conn) => conn,
            None => self.fresh().await?,
        };

        conn.send(Message::Item((RequestHeadType::Rc(head, None), size)))
            .await
            .map_err(ExchangeError::Send)?;
        match body {
            RequestBody::None => {}
            RequestBody::Sized(_, mut stream) | RequestBody::Chunked(mut stream) => {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(ExchangeError::Body)?;
                    conn.send(Message::Chunk(Some(chunk)))
                        .await
                        .map_err(ExchangeError::Send)?;
                }
                conn.send(Message::Chunk(None))
                    .await
                    .map_err(ExchangeError::Send)?;
            }
        }
        self.read_head(conn, &method, idle_timeout).await
    }

    async fn fresh(&self) -> Result<Conn, ExchangeError> {
        let tcp = self.connect().await.map_err(ExchangeError::Connect)?;
        let config = self.config.get_or_init(ServiceConfig::default).clone();
        Ok(Framed::new(tcp, ClientCodec::new(config)))
    }

    async fn read_head(
        self: &Rc<Self>,
        mut conn: Conn,
        method: &Method,
        idle_timeout: Duration,
    ) -> Result<(ResponseHead, ResponseBody), ExchangeError> {
        let head = loop {
            match conn.next().await {
                None => return Err(ExchangeError::Closed),
                Some(Err(err)) => return Err(ExchangeError::Invalid(err.to_string())),
                // Interim answers (100 Continue, 103 Early Hints) are not relayed.
                Some(Ok(head))
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS => {}
                Some(Ok(head)) => break head,
            }
        };
        let kind = match conn.codec_ref().message_type() {
            MessageType::Payload => {
                let delimited_by_close =
                    head.version == Version::HTTP_10 && !has_framing(&head.headers);
                BodyKind::Framed {
                    framed: conn.into_map_codec(ClientCodec::into_payload_codec),
                    delimited_by_close,
                }
            }
            MessageType::Stream => raw(conn),
            MessageType::None if close_delimited(&head, method) => raw(conn),
            MessageType::None => {
                if conn.codec_ref().keep_alive() {
                    self.checkin(conn);
                }
                BodyKind::Done
            }
        };
        let body = ResponseBody {
            kind,
            client: self.clone(),
            idle_timeout,
            timer: IdleTimer::default(),
        };
        Ok((head, body))
    }
}

/// Sends a bodiless request and waits until the answer starts to arrive,
/// without consuming it; any failure before that means the connection was dead.
async fn send_and_peek(mut conn: Conn, head: &Rc<RequestHead>, size: BodySize) -> io::Result<Conn> {
    conn.send(Message::Item((
        RequestHeadType::Rc(head.clone(), None),
        size,
    )))
    .await?;
    if conn.is_read_buf_empty() {
        std::future::poll_fn(|cx| poll_peek_alive(conn.io_ref(), cx)).await?;
    }
    Ok(conn)
}

/// Ready once the connection has something to read: `Ok` for data, an error
/// for EOF (the upstream closed it) or a socket error.
fn poll_peek_alive(io: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    match io.poll_peek(cx, &mut buf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
        Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        Poll::Pending => Poll::Pending,
    }
}

/// `Content-Length` or `Transfer-Encoding` present.
fn has_framing(headers: &HeaderMap) -> bool {
    headers.contains_key(header::CONTENT_LENGTH) || headers.contains_key(header::TRANSFER_ENCODING)
}

/// An HTTP/1.1 answer with a body but no framing: the body runs until the
/// upstream closes the connection (RFC 9112 §6.3, rule 8).
fn close_delimited(head: &ResponseHead, method: &Method) -> bool {
    head.version == Version::HTTP_11
        && *method != Method::HEAD
        && !head.status.is_informational()
        && head.status != StatusCode::NO_CONTENT
        && head.status != StatusCode::NOT_MODIFIED
        && !has_framing(&head.headers)
}

fn raw(conn: Conn) -> BodyKind {
    let parts = conn.into_parts();
    BodyKind::Raw {
        early: Some(parts.read_buf.freeze()).filter(|b| !b.is_empty()),
        io: parts.io,
    }
}

// === ResponseBody ===

enum BodyKind {
    /// Framed by length or chunks (or HTTP/1.0 to EOF), decoded by the codec.
    Framed {
        framed: Framed<TcpStream, ClientPayloadCodec>,
        delimited_by_close: bool,
    },
    /// Raw bytes until the upstream closes (close-delimited, or after 101).
    Raw {
        early: Option<Bytes>,
        io: TcpStream,
    },
    Done,
}

/// The upstream's answer body. Ends with an error, never cleanly, if the
/// upstream stops early or falls silent for the idle timeout.
pub struct ResponseBody {
    kind: BodyKind,
    client: Rc<UpstreamClient>,
    idle_timeout: Duration,
    timer: IdleTimer,
}

impl ResponseBody {
    /// Consumes the body's framing and hands back the raw connection, for a
    /// protocol switch (`101`).
    pub fn into_raw(self) -> Option<(Option<Bytes>, TcpStream)> {
        match self.kind {
            BodyKind::Raw { early, io } => Some((early, io)),
            _ => None,
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        match &mut self.kind {
            BodyKind::Done => Poll::Ready(None),
            BodyKind::Framed {
                framed,
                delimited_by_close,
            } => match framed.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(Some(chunk)))) => Poll::Ready(Some(Ok(chunk))),
                Poll::Ready(Some(Ok(None))) => {
                    let kind = std::mem::replace(&mut self.kind, BodyKind::Done);
                    if let BodyKind::Framed { framed, .. } = kind
                        && framed.codec_ref().keep_alive()
                    {
                        self.client
                            .checkin(framed.into_map_codec(ClientPayloadCodec::into_message_codec));
                    }
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(err))) => {
                    Poll::Ready(Some(Err(BodyError::Upstream(err.to_string()))))
                }
                Poll::Ready(None) if *delimited_by_close => {
                    self.kind = BodyKind::Done;
                    Poll::Ready(None)
                }
                Poll::Ready(None) => Poll::Ready(Some(Err(BodyError::Upstream(
                    "the upstream closed the connection before the body was complete".into(),
                )))),
                Poll::Pending => Poll::Pending,
            },
            BodyKind::Raw { early, io } => {
                if let Some(bytes) = early.take() {
                    return Poll::Ready(Some(Ok(bytes)));
                }
                let mut buf = BytesMut::with_capacity(READ_CHUNK);
                match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut buf) {
                    Poll::Ready(Ok(0)) => {
                        self.kind = BodyKind::Done;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Ok(_)) => Poll::Ready(Some(Ok(buf.freeze()))),
                    Poll::Ready(Err(err)) => {
                        Poll::Ready(Some(Err(BodyError::Upstream(err.to_string()))))
                    }
                    Poll::Pending => Poll::Pending,
                }
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
                this.kind = BodyKind::Done;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(item) => {
                this.timer.disarm();
                Poll::Ready(item)
            }
            Poll::Pending => {
                let idle = this.idle_timeout;
                std::task::ready!(this.timer.poll_expired(idle, cx));
                log::warn!(
                    "upstream sent no body bytes for {idle:?}, closing the client connection"
                );
                this.kind = BodyKind::Done;
                Poll::Ready(Some(Err(BodyError::UpstreamIdle(idle))))
            }
        }
    }
}
