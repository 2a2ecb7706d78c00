//! WebSocket pass-through: the handshake goes to the upstream unchanged (its
//! own `Sec-WebSocket-Key`, protocols and extensions) like any request; after
//! the upstream's `101` the two connections are joined byte for byte. A
//! refused handshake (403, 426, …) is an ordinary response and comes back as
//! sent.
//!
//! A tunnel lasts as long as bytes flow in either direction: one that carries
//! none either way for the idle timeout is closed on both sides. (nginx
//! closes an upgraded connection once the upstream has sent nothing for
//! `proxy_read_timeout`, however much the client sends; this never cuts an
//! active tunnel.) A client that stops reading what the upstream sends is the
//! send timeout's business (see `server::client_on_connect`), as for any
//! response; an upstream that stops reading stops the client's bytes too, so
//! the tunnel falls idle and is closed.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use actix_http::ConnectionType;
use actix_web::body::{BodyStream, BoxBody};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::io::ReaderStream;

use super::client::Answer;
use crate::error::ProxyError;

/// Read size for upstream → client bytes.
const READ_CHUNK: usize = 16 * 1024;

/// Joins the client's connection to the upstream's after a `101`. The tunnel
/// closes when either side closes, or after `idle_timeout` without a byte
/// either way.
pub(super) fn join(
    req: &HttpRequest,
    mut client_payload: actix_web::dev::Payload,
    mut res: HttpResponse,
    answer: Answer,
    idle_timeout: Duration,
) -> Result<HttpResponse, ProxyError> {
    let (early, io) = answer
        .body
        .into_raw()
        .ok_or_else(|| ProxyError::Internal("a 101 answer without a raw connection".into()))?;
    *res.status_mut() = answer.status;
    // Without this actix-http would answer `Connection: close, upgrade`.
    res.head_mut().set_connection_type(ConnectionType::Upgrade);

    let (from_upstream, mut to_upstream) = io.into_split();
    log::debug!("websocket tunnel open for {}", req.path());
    let last_byte = Rc::new(Cell::new(Instant::now()));
    let from_client = last_byte.clone();
    let to_upstream = actix_web::rt::spawn(async move {
        while let Some(Ok(chunk)) = client_payload.next().await {
            from_client.set(Instant::now());
            if to_upstream.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown().await;
    });

    let downstream = stream::iter(early.map(Ok::<_, io::Error>))
        .chain(ReaderStream::with_capacity(from_upstream, READ_CHUNK));
    let tunnel = Tunnel {
        downstream,
        last_byte,
        idle_timeout,
        sleep: Box::pin(tokio::time::sleep(idle_timeout)),
        to_upstream,
        done: false,
    };
    Ok(res.set_body(BoxBody::new(BodyStream::new(tunnel))))
}

/// The upstream → client half of a tunnel, as the client response's body; it
/// owns the client → upstream half (a task), so the tunnel ends as one: when
/// this body ends or is dropped (the client connection is gone), the task is
/// stopped and both halves of the upstream connection are closed.
struct Tunnel<S> {
    downstream: S,
    /// When the last byte arrived from either side.
    last_byte: Rc<Cell<Instant>>,
    idle_timeout: Duration,
    /// Fires at `last_byte + idle_timeout`, as last set.
    sleep: Pin<Box<Sleep>>,
    to_upstream: JoinHandle<()>,
    done: bool,
}

impl<S> Stream for Tunnel<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = this.downstream.poll_next_unpin(cx) {
            match &item {
                Some(Ok(_)) => this.last_byte.set(Instant::now()),
                _ => this.done = true,
            }
            return Poll::Ready(item);
        }
        loop {
            let idle_until = this.last_byte.get() + this.idle_timeout;
            if Instant::now() >= idle_until {
                log::debug!(
                    "websocket tunnel carried nothing for {:?}, closing it",
                    this.idle_timeout
                );
                this.done = true;
                this.to_upstream.abort();
                return Poll::Ready(None);
            }
            let idle_until = tokio::time::Instant::from_std(idle_until);
            if this.sleep.deadline() != idle_until {
                this.sleep.as_mut().reset(idle_until);
            }
            ready!(this.sleep.as_mut().poll(cx));
        }
    }
}

impl<S> Drop for Tunnel<S> {
    fn drop(&mut self) {
        self.to_upstream.abort();
    }
}
