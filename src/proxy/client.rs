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
//! idle connections closed after [`POOL_IDLE`]. A pooled connection carries
//! nothing but the next answer, or one client would read another's:
//!
//! * a connection goes back to the pool only after a complete exchange: the
//!   whole request sent, the whole answer read, nothing left over in its
//!   buffer, and neither side asked to close;
//! * while idle it is watched: the reactor wakes the worker's pool watcher
//!   when an idle connection turns readable (bytes nobody asked for, or the
//!   upstream closing), and the watcher drops it, as nginx's keepalive close
//!   handler does and as hyper's per-connection task does for its pool;
//! * at checkout it is checked once more with a non-blocking peek at the
//!   socket itself, for bytes that arrived since the reactor last looked;
//! * a request with a body gets `Connection: close` and its connection is
//!   not pooled, unless the operator trusts the upstream to read every body
//!   ([`UpstreamClient::reuse_after_body`]): an upstream that answers without
//!   reading the body would otherwise take the body's bytes for the next
//!   requests on that connection (a CL.0 desync), run them uncounted and
//!   send their answers to later clients;
//! * an upstream that answers (or closes) before the request body is all
//!   sent stops the upload there; that connection is never pooled.
//!
//! A bodiless idempotent request that fails on a reused connection before any
//! byte of an answer arrived is sent again once on a fresh connection: that is
//! the upstream having closed the connection while it was idle, not an
//! upstream fault (nginx's `proxy_next_upstream error` does the same).
//!
//! Answers are framed strictly, as requests are (hyper's `role.rs` is the
//! model): `Content-Length` is digits only, `Transfer-Encoding` is exactly
//! `chunked` (floodgate decodes no other coding, so it cannot pass one on
//! re-framed), never both, and a `101` answers only an upgrade. Anything else
//! is an invalid answer: a `502`, and the connection is closed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;
use actix_web::http::{Method, StatusCode};
use actix_web::rt::net::TcpStream;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::body::BodyError;

mod decode;
mod head;
pub use decode::ResponseBody;
use head::{Framing, Parsed, answered, parse_head};

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

/// Largest first body chunk copied into the head's write rather than
/// written on its own.
const COALESCE_MAX: usize = 16 * 1024;

/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange with the upstream failed. The I/O failures keep their
/// [`io::Error`] (see [`ExchangeError::io_kind`]).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// No connection could be opened (refused, unreachable, ...).
    #[error("connecting to the upstream: {0}")]
    Connect(#[source] io::Error),
    /// Writing the request head or body to the upstream failed.
    #[error("sending the request: {0}")]
    Send(#[source] io::Error),
    /// Reading the answer failed (e.g. the upstream reset the connection).
    #[error("reading the answer: {0}")]
    Receive(#[source] io::Error),
    /// The upstream closed the connection before any byte of an answer. On a
    /// reused connection this is usually the upstream closing it while idle,
    /// so a bodiless idempotent request is sent again once.
    #[error("the upstream closed the connection without answering")]
    Closed,
    /// The answer broke HTTP/1.1 framing (see the module docs for what is
    /// refused); the text names the fault. The connection is closed.
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

    /// What kind of I/O failure this was (refused, reset, timed out, ...),
    /// if it was one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ExchangeError::Connect(err)
            | ExchangeError::Send(err)
            | ExchangeError::Receive(err) => Some(err.kind()),
            _ => None,
        }
    }
}

/// What follows a request's head: nothing, `Content-Length` bytes, chunks,
/// or (for a WebSocket handshake, which has no body) a tunnel once the
/// upstream answers `101`.
pub enum RequestBody<S> {
    /// No body: no framing header is sent.
    None,
    /// `Content-Length` of this many bytes, streamed from `S`; a stream that
    /// yields more or fewer fails the exchange ([`ExchangeError::Body`]).
    Sized(u64, S),
    /// A body of unknown length, streamed from `S` with chunked coding.
    Chunked(S),
    /// No body; the request asks to switch protocols, so a `101` may answer it.
    Upgrade,
}

impl<S> RequestBody<S> {
    /// Whether body bytes follow the head.
    fn has_bytes(&self) -> bool {
        match self {
            RequestBody::None | RequestBody::Upgrade => false,
            RequestBody::Sized(len, _) => *len > 0,
            RequestBody::Chunked(_) => true,
        }
    }
}

/// The head of the upstream's answer; its end-to-end headers went into the
/// map passed to [`UpstreamClient::exchange`].
pub struct Answer {
    /// The final status: interim answers (100 Continue, 103 Early Hints)
    /// are read and dropped, never returned; `101` only answers an upgrade.
    pub status: StatusCode,
    /// Whether the answer has a body at all (not for `HEAD`, 1xx, 204, 304).
    pub has_body: bool,
    /// The `Content-Length` the answer declared (also for `HEAD`).
    pub content_length: Option<u64>,
    /// The upstream answered (or failed) before the whole request body was
    /// sent: the rest of the client's body was never read, so the client's
    /// connection must close after this answer.
    pub interrupted: bool,
    /// The answer's body, read from the upstream as the caller polls it;
    /// reading it to its end returns the connection to the pool.
    pub body: ResponseBody,
}

/// One connection to the upstream with its buffers.
struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: BytesMut,
    /// Rung by the reactor when the connection turns readable while idle.
    alarm: Arc<Alarm>,
}

/// An idle connection and since when.
struct Idle {
    conn: Conn,
    since: Instant,
}

type IdleList = RefCell<VecDeque<Idle>>;

/// One worker's connections to the upstream.
pub struct UpstreamClient {
    host: String,
    port: u16,
    reuse_after_body: bool,
    idle: Rc<IdleList>,
    /// Wakes the worker's pool watcher ([`watch_idle`]) when an idle
    /// connection's alarm rang.
    bell: Arc<Notify>,
    watching: Cell<bool>,
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
            reuse_after_body: false,
            idle: Rc::default(),
            bell: Arc::default(),
            watching: Cell::new(false),
        }
    }

    /// Whether a connection that carried a request body may be pooled
    /// (default: no). Only for an upstream trusted to read every body it is
    /// sent, or to close the connection when it does not: one that answers
    /// without reading it takes the body's bytes for requests.
    pub fn reuse_after_body(mut self, reuse: bool) -> Self {
        self.reuse_after_body = reuse;
        self
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
            alarm: self.alarm(),
        })
    }

    /// A new connection's alarm, ringing this pool's watcher.
    fn alarm(&self) -> Arc<Alarm> {
        Arc::new(Alarm {
            rang: AtomicBool::new(false),
            bell: self.bell.clone(),
        })
    }

    /// The most recently used idle connection still fit for reuse: one the
    /// upstream has neither closed nor written to since (one peek at the
    /// socket; the watcher drops most such connections before this).
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        while let Some(Idle { conn, since }) = idle.pop_back() {
            if since.elapsed() >= POOL_IDLE {
                // Everything older is older still.
                idle.clear();
                return None;
            }
            if conn.is_quiet() {
                return Some(conn);
            }
            log::debug!("dropping a pooled upstream connection: closed, or bytes nobody asked for");
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        conn.alarm.rang.store(false, Ordering::Relaxed);
        if !conn.watch() {
            log::debug!("not pooling an upstream connection: closed, or bytes nobody asked for");
            return;
        }
        let mut idle = self.idle.borrow_mut();
        while idle
            .front()
            .is_some_and(|entry| entry.since.elapsed() >= POOL_IDLE)
        {
            idle.pop_front();
        }
        if idle.len() < POOL_MAX {
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
        if !self.watching.replace(true) {
            actix_web::rt::spawn(watch_idle(Rc::downgrade(&self.idle), self.bell.clone()));
        }
    }

    /// Sends a request and reads the head of its answer. `write_head` writes
    /// the request line and headers (each line ending in CRLF, without the
    /// blank line); the body's framing header (and `Connection: close` for a
    /// body, see [`reuse_after_body`](Self::reuse_after_body)) and the blank
    /// line are added here, from `body` alone: the client's own
    /// `Content-Length` and `Transfer-Encoding` never reach the upstream. The
    /// answer's end-to-end headers are put into `headers` (the client
    /// response's own map, so none is built twice); its body streams from
    /// [`Answer::body`], and the connection goes back to the pool once that
    /// is read to its end.
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
        let reusable = self.reuse_after_body || !body.has_bytes();
        let upgrade = matches!(body, RequestBody::Upgrade);
        let (framing, sized): (&[u8], Option<u64>) = match &body {
            RequestBody::None | RequestBody::Upgrade => (b"", None),
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
            if !reusable {
                out.extend_from_slice(b"connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
        };

        let mut conn = match self.checkout() {
            // A reused connection may still have been closed by the upstream
            // just now. For a bodiless idempotent request that is harmless to
            // find out: send, and if it fails before any byte of an answer
            // arrived, send again on a fresh connection (as nginx's
            // `proxy_next_upstream error` does).
            Some(mut conn)
                if matches!(body, RequestBody::None | RequestBody::Upgrade)
                    && method.is_idempotent() =>
            {
                head(&mut conn.write);
                let answered = match conn.send_buffered().await {
                    Ok(()) => conn.read_head(method, upgrade, headers).await,
                    Err(err) => Err(err),
                };
                match answered {
                    Ok(parsed) => return Ok(self.answer(conn, parsed, false, idle_timeout)),
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
            RequestBody::None | RequestBody::Upgrade => {
                conn.send_buffered().await.map(|()| Sent::Complete)
            }
            RequestBody::Sized(len, stream) => conn.send_body(Frame::Sized(len), stream).await,
            RequestBody::Chunked(stream) => conn.send_body(Frame::Chunked, stream).await,
        };
        match sent {
            Ok(Sent::Complete) => {
                let mut parsed = conn.read_head(method, upgrade, headers).await?;
                parsed.keep_alive &= reusable;
                Ok(self.answer(conn, parsed, false, idle_timeout))
            }
            // The upstream answered early (413, 401) or closed: relay what it
            // said, and never pool the connection.
            Ok(Sent::Interrupted) => {
                let mut parsed = conn.read_head(method, upgrade, headers).await?;
                parsed.keep_alive = false;
                Ok(self.answer(conn, parsed, true, idle_timeout))
            }
            // Likewise if it closed and the write failed: relay its answer,
            // if it sent one, rather than the failed write.
            Err(ExchangeError::Send(err)) => match conn.read_head(method, upgrade, headers).await {
                Ok(mut parsed) => {
                    parsed.keep_alive = false;
                    Ok(self.answer(conn, parsed, true, idle_timeout))
                }
                Err(_) => Err(ExchangeError::Send(err)),
            },
            Err(err) => Err(err),
        }
    }

    /// The answer, with its body framed as its head says.
    fn answer(
        self: &Rc<Self>,
        conn: Conn,
        parsed: Parsed,
        interrupted: bool,
        idle_timeout: Duration,
    ) -> Answer {
        let body = ResponseBody::new(conn, &parsed, self.clone(), idle_timeout);
        Answer {
            status: parsed.status,
            has_body: parsed.framing != Framing::None,
            content_length: parsed.content_length,
            interrupted,
            body,
        }
    }
}

// === idle watching ===

/// An idle connection's waker: the reactor calls it when the connection
/// turns readable, which for an idle connection means stray bytes or the
/// upstream closing. It only marks the connection and rings the worker's
/// bell; the watcher does the rest on the worker's own thread.
struct Alarm {
    rang: AtomicBool,
    bell: Arc<Notify>,
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rang.store(true, Ordering::Relaxed);
        self.bell.notify_one();
    }
}

/// The worker's pool watcher: each time an alarm rings, drops the idle
/// connections that turned readable. Ends with the pool.
async fn watch_idle(idle: Weak<IdleList>, bell: Arc<Notify>) {
    loop {
        bell.notified().await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        idle.borrow_mut().retain(|entry| {
            let conn = &entry.conn;
            let keep = !conn.alarm.rang.swap(false, Ordering::Relaxed) || conn.watch();
            if !keep {
                log::debug!(
                    "dropping an idle upstream connection: closed, or bytes nobody asked for"
                );
            }
            keep
        });
    }
}

// === sending ===

/// How a request body goes on the wire.
#[derive(Clone, Copy)]
enum Frame {
    /// This many bytes still to come.
    Sized(u64),
    Chunked,
}

/// How sending a request ended.
enum Sent {
    Complete,
    /// The upstream answered or closed first; the rest was not sent.
    Interrupted,
}

impl Conn {
    /// Writes the write buffer out.
    async fn send_buffered(&mut self) -> Result<(), ExchangeError> {
        let Conn { io, write, .. } = self;
        io.write_all(write).await.map_err(ExchangeError::Send)?;
        write.clear();
        Ok(())
    }

    /// Sends the buffered head and then `stream` as `frame` says, while
    /// watching the upstream: once it has sent a complete answer (or
    /// closed), sending stops and the answer is read at once. A small first
    /// chunk that is already there goes out in the same write as the head,
    /// so a small upload costs the upstream one segment, not two; chunked
    /// bodies go out one write per chunk, sized ones as they come.
    async fn send_body<S>(&mut self, frame: Frame, mut stream: S) -> Result<Sent, ExchangeError>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        let mut upload = Upload {
            frame,
            chunk: Bytes::new(),
            first: true,
            yielded: false,
            finished: false,
        };
        std::future::poll_fn(|cx| self.poll_send(cx, &mut upload, &mut stream)).await
    }

    fn poll_send<S>(
        &mut self,
        cx: &mut Context<'_>,
        up: &mut Upload,
        stream: &mut S,
    ) -> Poll<Result<Sent, ExchangeError>>
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Unpin,
    {
        loop {
            if up.finished && self.write.is_empty() && up.chunk.is_empty() {
                return Poll::Ready(Ok(Sent::Complete));
            }
            // The upstream speaking (or closing) first ends the upload.
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Ok(Sent::Interrupted)),
                Poll::Ready(Ok(_)) if answered(&self.read) => {
                    return Poll::Ready(Ok(Sent::Interrupted));
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            // The next piece of body, once the previous one is out (or, the
            // first time, to go out with the head).
            if !up.finished && up.chunk.is_empty() && (self.write.is_empty() || up.first) {
                match Pin::new(&mut *stream).poll_next(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        self.frame_chunk(up, chunk)?;
                        up.first = false;
                        continue;
                    }
                    Poll::Ready(Some(Err(err))) => {
                        return Poll::Ready(Err(ExchangeError::Body(err)));
                    }
                    Poll::Ready(None) => {
                        match up.frame {
                            Frame::Sized(0) => {}
                            Frame::Sized(_) => {
                                return Poll::Ready(Err(ExchangeError::Body(BodyError::Client(
                                    "less body than its Content-Length".into(),
                                ))));
                            }
                            Frame::Chunked => self.write.extend_from_slice(b"0\r\n\r\n"),
                        }
                        up.finished = true;
                        up.first = false;
                        continue;
                    }
                    // The body bytes that arrived with the head reach the
                    // payload only once the HTTP server runs again: yield
                    // once for them, so a small upload still goes out in
                    // one write with its head.
                    Poll::Pending if up.first && !up.yielded && !self.write.is_empty() => {
                        up.yielded = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // Waiting for the client; the head goes out meanwhile.
                    Poll::Pending if up.first && !self.write.is_empty() => up.first = false,
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Conn { io, write, .. } = self;
            let out: &mut dyn Buf = if write.is_empty() {
                &mut up.chunk
            } else {
                write
            };
            let n = ready!(Pin::new(&mut *io).poll_write(cx, out.chunk()))
                .map_err(ExchangeError::Send)?;
            if n == 0 {
                return Poll::Ready(Err(ExchangeError::Send(io::ErrorKind::WriteZero.into())));
            }
            out.advance(n);
        }
    }

    /// Puts one body chunk on its way: into the write buffer (chunked, or a
    /// small first chunk joining the head), or as it is.
    fn frame_chunk(&mut self, up: &mut Upload, chunk: Bytes) -> Result<(), ExchangeError> {
        match &mut up.frame {
            Frame::Sized(left) => {
                *left = left.checked_sub(chunk.len() as u64).ok_or_else(|| {
                    ExchangeError::Body(BodyError::Client(
                        "more body than its Content-Length".into(),
                    ))
                })?;
                if !self.write.is_empty() && chunk.len() <= COALESCE_MAX {
                    self.write.extend_from_slice(&chunk);
                } else {
                    up.chunk = chunk;
                }
            }
            Frame::Chunked if chunk.is_empty() => {}
            Frame::Chunked => {
                write!(&mut self.write, "{:x}\r\n", chunk.len()).expect("a BytesMut grows");
                self.write.extend_from_slice(&chunk);
                self.write.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// Whether the connection has nothing to read: not closed by the
    /// upstream, and no stray bytes. One non-blocking peek at the socket
    /// itself (not the reactor's view, which may lag behind).
    fn is_quiet(&self) -> bool {
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(&self.io).peek(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Sets the connection's alarm to ring when it turns readable; false if
    /// it already is (stray bytes, or closed), so it must not be pooled.
    /// Costs no system call unless the reactor saw it readable.
    fn watch(&self) -> bool {
        let waker = Waker::from(self.alarm.clone());
        let mut cx = Context::from_waker(&waker);
        // Readiness may be left over from the last read; a read that finds
        // nothing clears it, and the second poll then registers the alarm.
        for _ in 0..2 {
            match self.io.poll_read_ready(&mut cx) {
                Poll::Pending => return true,
                Poll::Ready(Err(_)) => return false,
                Poll::Ready(Ok(())) => match self.io.try_read(&mut [0u8; 1]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    _ => return false,
                },
            }
        }
        false
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
    /// `upgrade`: whether the request asked to switch protocols.
    async fn read_head(
        &mut self,
        method: &Method,
        upgrade: bool,
        headers: &mut HeaderMap,
    ) -> Result<Parsed, ExchangeError> {
        let mut interim = false;
        loop {
            if !self.read.is_empty() {
                match parse_head(&mut self.read, method, upgrade, headers)? {
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

/// A request body's progress in [`Conn::send_body`].
struct Upload {
    frame: Frame,
    /// A chunk being written as it is (not copied into the write buffer).
    chunk: Bytes,
    /// Nothing of the body pulled yet: the head still waits in the write
    /// buffer for a small first chunk to join it.
    first: bool,
    /// The body had nothing yet once, and this task yielded so the HTTP
    /// server could hand over the bytes that came with the head.
    yielded: bool,
    /// The whole body is framed; what is buffered is the last of it.
    finished: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header;

    fn parse(raw: &[u8], method: Method) -> (Parsed, HeaderMap) {
        let mut buf = BytesMut::from(raw);
        let mut headers = HeaderMap::new();
        let parsed = parse_head(&mut buf, &method, false, &mut headers)
            .unwrap()
            .unwrap();
        (parsed, headers)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (p, _) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET);
        assert_eq!(p.framing, Framing::Length(5));
        assert!(p.keep_alive);
        let (p, _) = parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(p.framing, Framing::Length(5), "the same length twice");
        let (p, _) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert_eq!(p.content_length, None);
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
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(
                parse_head(&mut buf, &Method::GET, false, &mut HeaderMap::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(
            parse_head(&mut partial, &Method::GET, false, &mut HeaderMap::new())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_101_answers_an_upgrade_only() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
        );
        let mut headers = HeaderMap::new();
        let parsed = parse_head(&mut buf, &Method::GET, true, &mut headers)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(parsed.framing, Framing::Close);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn an_upload_stops_at_a_complete_final_answer() {
        assert!(!answered(b""));
        assert!(!answered(b"HTTP/1.1 403 Forbidden\r\nContent-"));
        assert!(!answered(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!answered(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 4"));
        assert!(answered(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too Large\r\n\r\n"
        ));
        assert!(answered(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(answered(b"garbage, not an answer\r\n\r\n"));
    }

    #[test]
    fn typed_errors_keep_the_io_kind() {
        let err = ExchangeError::Connect(io::ErrorKind::ConnectionRefused.into());
        assert_eq!(err.io_kind(), Some(io::ErrorKind::ConnectionRefused));
        let source = std::error::Error::source(&err).expect("the io::Error is the source");
        assert_eq!(
            source.downcast_ref::<io::Error>().map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
        assert_eq!(ExchangeError::Closed.io_kind(), None);
    }

    // === the pool, against a real socket ===

    /// A client for a local listener.
    fn client() -> (Rc<UpstreamClient>, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        (Rc::new(UpstreamClient::new("127.0.0.1", port)), listener)
    }

    /// A new connection, and the upstream's end of it.
    async fn open(
        client: &UpstreamClient,
        listener: &std::net::TcpListener,
    ) -> (Conn, std::net::TcpStream) {
        let conn = client.fresh().await.unwrap();
        let (upstream, _) = listener.accept().unwrap();
        (conn, upstream)
    }

    #[actix_web::test]
    async fn checkout_peeks_at_the_socket_itself() {
        use std::io::Write;
        let (client, listener) = client();
        let (conn, mut upstream) = open(&client, &listener).await;
        client.checkin(conn);
        // Bytes nobody asked for, just now: no reactor turn has seen them
        // yet, only the socket has.
        upstream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(client.checkout().is_none(), "a connection with stray bytes");

        let (conn, upstream) = open(&client, &listener).await;
        client.checkin(conn);
        drop(upstream);
        assert!(
            client.checkout().is_none(),
            "a connection the upstream closed"
        );

        let (conn, _upstream) = open(&client, &listener).await;
        client.checkin(conn);
        assert!(client.checkout().is_some(), "a quiet connection is reused");
    }

    #[actix_web::test]
    async fn the_watcher_drops_idle_connections_that_turn_readable() {
        use std::io::Write;
        for closes in [false, true] {
            let (client, listener) = client();
            let (quiet, quiet_upstream) = open(&client, &listener).await;
            let (noisy, mut noisy_upstream) = open(&client, &listener).await;
            client.checkin(quiet);
            client.checkin(noisy);
            assert_eq!(client.idle.borrow().len(), 2);
            if closes {
                noisy_upstream.shutdown(std::net::Shutdown::Write).unwrap();
            } else {
                noisy_upstream.write_all(b"stray").unwrap();
            }
            // No checkout happens: only the watcher can notice.
            let deadline = Instant::now() + Duration::from_secs(5);
            while client.idle.borrow().len() > 1 {
                assert!(
                    Instant::now() < deadline,
                    "closes={closes}: the idle connection was never dropped"
                );
                actix_web::rt::time::sleep(Duration::from_millis(5)).await;
            }
            let left = client.checkout().expect("the quiet connection stays");
            assert_eq!(
                left.io.peer_addr().unwrap(),
                quiet_upstream.local_addr().unwrap()
            );
        }
    }
}

#[cfg(test)]
mod proptests;
