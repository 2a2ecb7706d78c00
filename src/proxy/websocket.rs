//! WebSocket pass-through: the handshake goes to the upstream unchanged (its
//! own `Sec-WebSocket-Key`, protocols and extensions) like any request; after
//! the upstream's `101` the two connections are joined byte for byte. A
//! refused handshake (403, 426, …) is an ordinary response and comes back as
//! sent.

use actix_http::ConnectionType;
use actix_web::body::{BodyStream, BoxBody};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::{StreamExt, stream};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use super::client::Answer;
use crate::error::ProxyError;

/// Read size for upstream → client bytes.
const READ_CHUNK: usize = 16 * 1024;

/// Joins the client's connection to the upstream's after a `101`.
pub(super) fn join(
    req: &HttpRequest,
    mut client_payload: actix_web::dev::Payload,
    mut res: HttpResponse,
    answer: Answer,
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
    actix_web::rt::spawn(async move {
        while let Some(Ok(chunk)) = client_payload.next().await {
            if to_upstream.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown().await;
    });

    let downstream = stream::iter(early.map(Ok::<_, std::io::Error>))
        .chain(ReaderStream::with_capacity(from_upstream, READ_CHUNK));
    Ok(res.set_body(BoxBody::new(BodyStream::new(downstream))))
}
