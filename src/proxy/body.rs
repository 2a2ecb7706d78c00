//! The request body's deadlines, and the count of answer bodies cut short.
//!
//! [`RequestBody`] hands the client's body to the upstream chunk by chunk,
//! fails it with [`BodyError::ClientIdle`] when the client stops sending, and
//! records each hand-over in a [`Progress`], which the upstream deadline
//! watches. (The response side is `client::ResponseBody`; [`Counted`] wraps
//! it to count an answer that fails after its head went out, which no
//! status can report.)
//!
//! Timers are armed only when a stream actually has to wait, and re-armed
//! only after data moved, so a stream that is not polled (because the other
//! side is applying back-pressure) is never timed out for that.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_web::rt::time::{Instant, Sleep, sleep_until};
use bytes::Bytes;
use futures_util::Stream;

use crate::observe::metrics::UpstreamError;

/// Why a body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client sent no body bytes for {0:?}")]
    ClientIdle(Duration),
    #[error("{0}")]
    Client(String),
    #[error("the request body is longer than {0} bytes")]
    TooLarge(u64),
    #[error("upstream sent no body bytes for {0:?}")]
    UpstreamIdle(Duration),
    /// The upstream's body was malformed or cut short.
    #[error("{0}")]
    Upstream(String),
    /// Reading the upstream's body failed (reset, timed out, ...).
    #[error("reading the upstream's body: {0}")]
    UpstreamIo(#[source] std::io::Error),
}

// === Progress ===

/// When the request body last moved, shared by [`RequestBody`] and the
/// upstream deadline ([`Progress::stalled_for`]) within one request's task.
#[derive(Clone)]
pub struct Progress(Rc<ProgressState>);

struct ProgressState {
    last_moved: Cell<Instant>,
    waiting_on_client: Cell<bool>,
}

impl Progress {
    pub fn new() -> Self {
        Progress(Rc::new(ProgressState {
            last_moved: Cell::new(Instant::now()),
            waiting_on_client: Cell::new(false),
        }))
    }

    fn moved(&self) {
        self.0.last_moved.set(Instant::now());
        self.0.waiting_on_client.set(false);
    }

    fn waiting_on_client(&self) {
        self.0.waiting_on_client.set(true);
    }

    /// Completes once the upstream side has made no progress for `timeout`:
    /// not taken the next body chunk, or, after the whole body, not answered.
    /// Time spent waiting for the client does not count (the client has its
    /// own deadline in [`RequestBody`]).
    ///
    /// It must be polled in the same task as the request it watches (it is,
    /// through `WithDeadline`), so every wake-up caused by body progress also
    /// re-checks the deadline here.
    pub fn stalled_for(self, timeout: Duration) -> Stalled {
        let deadline = self.0.last_moved.get() + timeout;
        Stalled {
            progress: self,
            timeout,
            sleep: Box::pin(sleep_until(deadline)),
            deadline,
        }
    }
}

/// See [`Progress::stalled_for`].
pub struct Stalled {
    progress: Progress,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    deadline: Instant,
}

impl Future for Stalled {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.progress.0.waiting_on_client.get() {
            return Poll::Pending;
        }
        let deadline = self.progress.0.last_moved.get() + self.timeout;
        if deadline != self.deadline {
            self.deadline = deadline;
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

// === RequestBody ===

/// A client's request body on its way to the upstream.
pub struct RequestBody<S> {
    inner: S,
    progress: Progress,
    idle: Duration,
    timer: IdleTimer,
    /// Bytes the body may carry at most (`FLOODGATE_MAX_BODY`), if capped.
    max: Option<u64>,
    /// Bytes passed on so far.
    passed: u64,
}

impl<S> RequestBody<S> {
    pub fn new(inner: S, progress: Progress, idle: Duration) -> Self {
        RequestBody {
            inner,
            progress,
            idle,
            timer: IdleTimer::default(),
            max: None,
            passed: 0,
        }
    }

    /// Fails the body with [`BodyError::TooLarge`] instead of passing on the
    /// chunk that would take it past `max` bytes: counted as it streams, so
    /// a chunked body needs no buffering to be capped.
    pub fn max(mut self, max: Option<u64>) -> Self {
        self.max = max;
        self
    }
}

impl<S, E> Stream for RequestBody<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.progress.moved();
                this.timer.disarm();
                this.passed = this.passed.saturating_add(chunk.len() as u64);
                if let Some(max) = this.max.filter(|max| this.passed > *max) {
                    return Poll::Ready(Some(Err(BodyError::TooLarge(max))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                Poll::Ready(Some(Err(BodyError::Client(err.to_string()))))
            }
            Poll::Ready(None) => {
                this.progress.moved();
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.progress.waiting_on_client();
                ready!(this.timer.poll_expired(this.idle, cx));
                Poll::Ready(Some(Err(BodyError::ClientIdle(this.idle))))
            }
        }
    }
}

// === IdleTimer ===

/// A lazily allocated timer, armed when a stream starts waiting and disarmed
/// when data moves.
#[derive(Default)]
pub struct IdleTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Ready once `idle` has passed since the stream started waiting.
    pub fn poll_expired(&mut self, idle: Duration, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            let deadline = Instant::now() + idle;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(sleep_until(deadline))),
            }
            self.armed = true;
        }
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn body(
        chunks: &[&'static [u8]],
        max: Option<u64>,
    ) -> RequestBody<impl Stream<Item = Result<Bytes, String>> + Unpin> {
        let chunks: Vec<Result<Bytes, String>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        RequestBody::new(
            futures_util::stream::iter(chunks),
            Progress::new(),
            Duration::from_secs(60),
        )
        .max(max)
    }

    #[actix_web::test]
    async fn a_capped_body_passes_up_to_its_cap_and_never_the_chunk_past_it() {
        let mut exact = body(&[b"abc", b"de"], Some(5));
        assert_eq!(exact.next().await.unwrap().unwrap(), "abc");
        assert_eq!(exact.next().await.unwrap().unwrap(), "de");
        assert!(exact.next().await.is_none());

        let mut over = body(&[b"abc", b"def"], Some(5));
        assert_eq!(over.next().await.unwrap().unwrap(), "abc");
        assert!(matches!(
            over.next().await,
            Some(Err(BodyError::TooLarge(5)))
        ));

        let mut uncapped = body(&[b"abc", b"def"], None);
        assert_eq!(uncapped.next().await.unwrap().unwrap(), "abc");
        assert_eq!(uncapped.next().await.unwrap().unwrap(), "def");
    }
}

// === Counted ===

pin_project_lite::pin_project! {
    /// An upstream answer's body that counts its failure, once, as an
    /// upstream error: `timeout` when the upstream fell silent mid-body,
    /// `truncated` otherwise (closed, reset or malformed before the end).
    pub struct Counted<S> {
        #[pin]
        body: S,
        metrics: Option<super::WorkerMetrics>,
    }
}

impl<S> Counted<S> {
    /// Counts `body`'s failure into `metrics` (this worker's handle).
    pub fn new(body: S, metrics: super::WorkerMetrics) -> Self {
        Counted {
            body,
            metrics: Some(metrics),
        }
    }
}

impl<S> Stream for Counted<S>
where
    S: Stream<Item = Result<Bytes, BodyError>>,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let item = ready!(this.body.poll_next(cx));
        if let Some(Err(err)) = &item
            && let Some(metrics) = this.metrics.take()
        {
            metrics.upstream_error(match err {
                BodyError::UpstreamIdle(_) => UpstreamError::Timeout,
                _ => UpstreamError::Truncated,
            });
        }
        Poll::Ready(item)
    }
}
