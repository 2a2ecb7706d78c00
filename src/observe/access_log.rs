//! The access log: one line per answered client request on stdout
//! (`FLOODGATE_ACCESS_LOG=text|json`, off by default).
//!
//! [`Observe`](super::Observe) hands each response to a worker's
//! [`WorkerLog`] and wraps its body in [`Logged`], which counts the bytes
//! sent and writes the line when the body ends, or when it is dropped (a
//! client that went away still gets its line, with what was sent). Requests
//! to the admin listener are not logged: `Observe` wraps only the client
//! listener.
//!
//! What a line holds, and what it never holds:
//!
//! * the path, never the query (it may hold secrets such as tokens);
//! * the client address as floodgate resolved it (trusted proxies applied),
//!   and, when the rule's key has a header part, that key only as its
//!   fingerprint (`h:…` or `c:…`, [`Verdict::key_fingerprint`]): the same
//!   short keyed hash Redis key names, `/rules` and floodgate's own log
//!   lines carry, equal on every replica that shares the Redis prefix. An
//!   API key is never written in clear;
//! * in text, every value that is not plain printable ASCII is quoted and
//!   escaped (`\"`, `\\`, `\xNN` for any other byte), so a path cannot break
//!   a line or forge a field; in JSON every string goes through serde_json.
//!
//! # How lines reach stdout without holding up a worker
//!
//! Each worker appends its lines to its own buffer (no lock, no allocation
//! once the buffer has grown). The buffer is handed over as one batch when it
//! passes [`BATCH_BYTES`] or every [`FLUSH_INTERVAL`], through a bounded
//! channel, to one writer thread that owns stdout. So a worker never writes
//! to the pipe itself: a slow reader (a stalled log shipper) stalls only the
//! writer thread. When the channel is full the worker drops that batch and
//! counts its lines ([`AccessLog::dropped`]; the writer thread logs a
//! warning at most every 10 s) rather than wait: losing log lines under
//! back-pressure is better than refusing traffic because of them. Lines
//! never interleave: a batch holds whole lines and only the writer thread
//! writes. The cost per request is formatting the line into the buffer.
//!
//! On shutdown each worker hands over what it holds when its services are
//! dropped, and the writer thread ends once every handle is gone;
//! [`Closed::wait`] lets the binary wait for that before it exits.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::HttpMessage;
use actix_web::HttpRequest;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::StatusCode;
use bytes::Bytes;
use pin_project_lite::pin_project;

use super::UpstreamTiming;
use super::log_format::{LogFormat, write_time};
use crate::key::{ClientIp, Fingerprinter};
use crate::limiter::RateKey;
use crate::verdict::{DecidedBy, Outcome, Verdict};

/// A worker hands its buffer over once it holds this much (a few hundred
/// lines), so one batch is one write of a size pipes take at once.
pub const BATCH_BYTES: usize = 32 * 1024;

/// A worker hands over what it holds at least this often, so a quiet proxy's
/// lines show up promptly.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Batches waiting for the writer thread at most (with [`BATCH_BYTES`],
/// about 2 MiB of lines) before workers drop lines instead of queueing them.
pub const QUEUE_BATCHES: usize = 64;

/// How often the writer thread reports dropped lines at most.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The access log of one floodgate process: its format, what it needs to
/// describe a client, and the queue to its writer thread. Cheap to clone;
/// every clone feeds the same thread.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

struct Shared {
    format: LogFormat,
    fingerprints: Fingerprinter,
    ip: ClientIp,
    queue: SyncSender<Batch>,
    dropped: AtomicU64,
    closed: Arc<Done>,
}

/// Whole lines from one worker.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl AccessLog {
    /// An access log in `format` on stdout, showing keys as `fingerprints`
    /// shows them and clients as `ip` resolves them. Starts the writer
    /// thread.
    pub fn stdout(
        format: LogFormat,
        fingerprints: Fingerprinter,
        ip: ClientIp,
    ) -> io::Result<Self> {
        Self::to_writer(format, fingerprints, ip, io::stdout())
    }

    /// As [`stdout`](Self::stdout), writing to `out` (tests, embedders with
    /// their own sink).
    pub fn to_writer(
        format: LogFormat,
        fingerprints: Fingerprinter,
        ip: ClientIp,
        out: impl Write + Send + 'static,
    ) -> io::Result<Self> {
        let (queue, batches) = mpsc::sync_channel(QUEUE_BATCHES);
        let closed = Arc::new(Done::default());
        let shared = Arc::new(Shared {
            format,
            fingerprints,
            ip,
            queue,
            dropped: AtomicU64::new(0),
            closed: closed.clone(),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                write_batches(batches, out, |n| {
                    if let Some(shared) = weak.upgrade() {
                        shared.dropped.fetch_add(n, Ordering::Relaxed);
                    }
                    weak.upgrade()
                        .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
                });
                closed.set();
            })?;
        Ok(AccessLog { shared })
    }

    /// The format lines are written in.
    pub fn format(&self) -> LogFormat {
        self.shared.format
    }

    /// Lines dropped so far because the writer could not keep up (or could
    /// not write at all).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// A handle that tells when the writer thread has written everything
    /// and ended (once every clone of this log and every worker's buffer is
    /// gone).
    pub fn closed(&self) -> Closed {
        Closed(self.shared.closed.clone())
    }

    /// This worker's buffer. Starts its [`FLUSH_INTERVAL`] timer on the
    /// current actix runtime (the worker's: call it from
    /// `Transform::new_transform`).
    pub fn worker(&self) -> Rc<WorkerLog> {
        let log = Rc::new(WorkerLog {
            shared: self.shared.clone(),
            buf: RefCell::new(Vec::with_capacity(BATCH_BYTES + 1024)),
            lines: Cell::new(0),
        });
        let weak: Weak<WorkerLog> = Rc::downgrade(&log);
        actix_web::rt::spawn(async move {
            let mut ticks = actix_web::rt::time::interval(FLUSH_INTERVAL);
            loop {
                ticks.tick().await;
                match weak.upgrade() {
                    Some(log) => log.flush(),
                    None => break,
                }
            }
        });
        log
    }
}

/// The writer thread: writes every batch until every sender is gone.
/// `dropped(n)` counts `n` lost lines and returns the total so far.
fn write_batches(batches: Receiver<Batch>, mut out: impl Write, dropped: impl Fn(u64) -> u64) {
    let mut failed = false;
    let mut reported = 0;
    let mut last_report: Option<Instant> = None;
    for batch in batches {
        if !failed && let Err(err) = out.write_all(&batch.bytes).and_then(|()| out.flush()) {
            log::warn!("access log: cannot write, dropping its lines from now on: {err}");
            failed = true;
        }
        let total = dropped(if failed { batch.lines } else { 0 });
        if total > reported && last_report.is_none_or(|at| at.elapsed() >= DROP_REPORT_EVERY) {
            log::warn!(
                "access log: {} lines dropped ({total} in all): its output did not keep up",
                total - reported
            );
            reported = total;
            last_report = Some(Instant::now());
        }
    }
    let _ = out.flush();
}

/// Whether the writer thread has ended.
#[derive(Default)]
struct Done {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Done {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }
}

/// See [`AccessLog::closed`].
pub struct Closed(Arc<Done>);

impl Closed {
    /// Waits up to `limit` for the writer thread to finish; whether it did.
    pub fn wait(&self, limit: Duration) -> bool {
        let done = self.0.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .0
            .changed
            .wait_timeout_while(done, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
        *done
    }
}

// === one worker's buffer ===

/// One worker's lines not yet handed to the writer thread.
pub struct WorkerLog {
    shared: Arc<Shared>,
    buf: RefCell<Vec<u8>>,
    lines: Cell<u64>,
}

impl WorkerLog {
    /// Starts the line of one answered request: the returned value goes
    /// into the response body ([`Logged`]) and writes the line when the
    /// body ends or is dropped.
    pub fn start(
        self: &Rc<Self>,
        req: HttpRequest,
        status: StatusCode,
        started: Instant,
        upstream: Option<UpstreamTiming>,
    ) -> Pending {
        Pending {
            log: self.clone(),
            req,
            status,
            started,
            upstream,
            bytes: 0,
        }
    }

    fn write(&self, entry: &Entry<'_>) {
        let mut buf = self.buf.borrow_mut();
        let written = match self.shared.format {
            LogFormat::Text => entry.write_text(&mut buf),
            LogFormat::Json => entry.write_json(&mut buf),
        };
        debug_assert!(written.is_ok(), "writing to a Vec cannot fail");
        self.lines.set(self.lines.get() + 1);
        let full = buf.len() >= BATCH_BYTES;
        drop(buf);
        if full {
            self.flush();
        }
    }

    /// Hands the buffer to the writer thread, or drops it (counted) if the
    /// queue is full.
    fn flush(&self) {
        let lines = self.lines.replace(0);
        if lines == 0 {
            return;
        }
        let bytes = std::mem::replace(
            &mut *self.buf.borrow_mut(),
            Vec::with_capacity(BATCH_BYTES + 1024),
        );
        match self.shared.queue.try_send(Batch { bytes, lines }) {
            Ok(()) => {}
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                self.shared
                    .dropped
                    .fetch_add(batch.lines, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for WorkerLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The line of one request whose body is still being sent; written when
/// dropped.
pub struct Pending {
    log: Rc<WorkerLog>,
    req: HttpRequest,
    status: StatusCode,
    started: Instant,
    upstream: Option<UpstreamTiming>,
    bytes: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let shared = &self.log.shared;
        let extensions = self.req.extensions();
        let verdict = extensions.get::<Verdict>();
        let key = verdict
            .filter(|v| v.key.as_ref().is_some_and(is_secret))
            .and_then(|v| v.key_fingerprint(&shared.fingerprints));
        let entry = Entry {
            method: self.req.method().as_str(),
            path: self.req.uri().path(),
            status: self.status.as_u16(),
            bytes: self.bytes,
            total: self.started.elapsed(),
            upstream: self.upstream.map(|u| u.first_byte),
            rule: verdict.map(|v| &*v.rule),
            decision: verdict.map(|v| outcome_name(v.outcome)),
            decided_by: verdict.map(|v| decided_by_name(v.decided_by)),
            limit: verdict.and_then(Verdict::refusing).map(|l| l.limit.name()),
            // Resolved by the gate; only a request it never saw (a 413) is
            // resolved here.
            client: verdict.and_then(|v| v.client).or_else(|| {
                let peer = self.req.peer_addr()?;
                Some(shared.ip.client_addr(peer.ip(), self.req.headers()))
            }),
            key: key.as_deref(),
        };
        self.log.write(&entry);
    }
}

/// Whether `key` has a part that is neither an address nor the global key:
/// a header value (or custom bytes), logged only as its fingerprint.
fn is_secret(key: &RateKey) -> bool {
    key.parts().iter().any(|part| !part.is_plain())
}

/// The `decision` field.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allowed => "allowed",
        Outcome::Limited => "limited",
        Outcome::ShadowLimited => "shadow_limited",
        Outcome::Exempt => "exempt",
        Outcome::Denied => "denied",
        Outcome::BadKey => "bad_key",
        Outcome::Undecided => "undecided",
    }
}

/// The `decided_by` field.
pub fn decided_by_name(by: DecidedBy) -> &'static str {
    match by {
        DecidedBy::Backend => "backend",
        DecidedBy::Local => "local",
        DecidedBy::FailOpen => "fail_open",
        DecidedBy::FailClosed => "fail_closed",
        DecidedBy::NotAsked => "not_asked",
    }
}

// === the body ===

pin_project! {
    /// A response body that counts what it yields and writes its request's
    /// access-log line when it ends or is dropped.
    pub struct Logged<B> {
        #[pin]
        body: B,
        pending: Option<Pending>,
    }
}

impl<B> Logged<B> {
    /// `body`, logged by `pending`.
    pub fn new(body: B, pending: Pending) -> Self {
        Logged {
            body,
            pending: Some(pending),
        }
    }
}

impl<B: MessageBody> MessageBody for Logged<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(pending) = this.pending.as_mut() {
                    pending.bytes += chunk.len() as u64;
                }
            }
            // The end, or an error that ends it: the line is due now.
            Poll::Ready(None | Some(Err(_))) => drop(this.pending.take()),
            Poll::Pending => {}
        }
        polled
    }
}

// === one line ===

/// What one line says. Absent values are `null` in JSON and left out in
/// text.
struct Entry<'a> {
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    total: Duration,
    upstream: Option<Duration>,
    rule: Option<&'a str>,
    decision: Option<&'static str>,
    decided_by: Option<&'static str>,
    limit: Option<&'a str>,
    client: Option<IpAddr>,
    key: Option<&'a str>,
}

/// Milliseconds with three decimals (microseconds).
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

impl Entry<'_> {
    /// `time=… method=GET path=/a status=200 …` (logfmt).
    fn write_text(&self, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(b"time=");
        write_time(out)?;
        out.extend_from_slice(b" method=");
        text_value(out, self.method.as_bytes());
        out.extend_from_slice(b" path=");
        text_value(out, self.path.as_bytes());
        write!(
            out,
            " status={} bytes={} total_ms={}",
            self.status,
            self.bytes,
            Millis(self.total)
        )?;
        if let Some(upstream) = self.upstream {
            write!(out, " upstream_ms={}", Millis(upstream))?;
        }
        for (name, value) in [
            ("rule", self.rule),
            ("decision", self.decision),
            ("decided_by", self.decided_by),
            ("limit", self.limit),
        ] {
            if let Some(value) = value {
                out.push(b' ');
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                text_value(out, value.as_bytes());
            }
        }
        if let Some(client) = self.client {
            write!(out, " client={client}")?;
        }
        if let Some(key) = self.key {
            out.extend_from_slice(b" key=");
            text_value(out, key.as_bytes());
        }
        out.push(b'\n');
        Ok(())
    }

    /// One JSON object, every field present.
    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(b"{\"time\":\"");
        write_time(out)?;
        out.extend_from_slice(b"\",\"method\":");
        serde_json::to_writer(&mut *out, self.method)?;
        out.extend_from_slice(b",\"path\":");
        serde_json::to_writer(&mut *out, self.path)?;
        write!(
            out,
            ",\"status\":{},\"bytes\":{},\"total_ms\":{},\"upstream_ms\":",
            self.status,
            self.bytes,
            Millis(self.total)
        )?;
        match self.upstream {
            Some(upstream) => write!(out, "{}", Millis(upstream))?,
            None => out.extend_from_slice(b"null"),
        }
        for (name, value) in [
            ("rule", self.rule),
            ("decision", self.decision),
            ("decided_by", self.decided_by),
            ("limit", self.limit),
        ] {
            write!(out, ",\"{name}\":")?;
            serde_json::to_writer(&mut *out, &value)?;
        }
        out.extend_from_slice(b",\"client\":");
        match self.client {
            Some(client) => write!(out, "\"{client}\"")?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"key\":");
        serde_json::to_writer(&mut *out, &self.key)?;
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

/// A logfmt value: as it is when it is printable ASCII without `"`, `=` or
/// `\`; otherwise quoted, with `"` and `\` escaped by a backslash and any
/// byte outside printable ASCII as `\xNN`.
fn text_value(out: &mut Vec<u8>, value: &[u8]) {
    let plain = !value.is_empty()
        && value
            .iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'=' | b'\\'));
    if plain {
        out.extend_from_slice(value);
        return;
    }
    out.push(b'"');
    for &b in value {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b' ' => out.push(b),
            _ if b.is_ascii_graphic() => out.push(b),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'x',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests;
