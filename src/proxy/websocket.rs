//! WebSocket pass-through: the handshake goes to the upstream unchanged (its
//! own `Sec-WebSocket-Key`, protocols and extensions), and after `101` the two
//! connections are joined byte for byte.
//!
//! awc's WebSocket client would replace the client's key with its own and
//! turns any non-101 answer into an error without its body, so the handshake
//! is written with actix-http's HTTP/1 client codec on a dedicated TCP
//! connection instead. A refused handshake (403, 426, …) reaches the client
//! with its status, headers and body.

use std::time::Duration;

use actix_codec::Framed;
use actix_http::RequestHead;
use actix_http::h1::{ClientCodec, MessageType};
use actix_http::{ConnectionType, RequestHeadType};
use actix_web::body::{BodySize, BodyStream, BoxBody, SizedStream};
use actix_web::http::Method;
use actix_web::http::header::HeaderMap;
use actix_web::http::uri::Uri;
use actix_web::{HttpRequest, HttpResponse};
use futures_util::{SinkExt, StreamExt, stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::io::ReaderStream;

use super::body::ResponseBody;
use super::{Upstream, strip_hop_by_hop};
use crate::error::ProxyError;

/// Read size for upstream → client frames.
const READ_CHUNK: usize = 16 * 1024;

pub(super) async fn tunnel(
    req: &HttpRequest,
    mut client_payload: actix_web::dev::Payload,
    upstream: &Upstream,
    uri: Uri,
    headers: HeaderMap,
) -> Result<HttpResponse, ProxyError> {
    let timeout = upstream.timeout;
    let host = upstream
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = upstream.authority.port_u16().unwrap_or(80);
    let tcp = within(timeout, TcpStream::connect((host, port)))
        .await?
        .map_err(|e| ProxyError::UpstreamConnect(format!("connecting to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);

    let mut head = RequestHead::default();
    head.method = Method::GET;
    head.uri = uri;
    head.headers = headers;
    head.set_connection_type(ConnectionType::Upgrade);
    let mut framed = Framed::new(tcp, ClientCodec::default());
    within(
        timeout,
        framed.send((RequestHeadType::Owned(head), BodySize::None).into()),
    )
    .await?
    .map_err(|e| ProxyError::UpstreamConnect(format!("sending the handshake: {e}")))?;
    let response = within(timeout, framed.next())
        .await?
        .ok_or_else(|| ProxyError::UpstreamConnect("closed before answering the handshake".into()))?
        .map_err(|e| ProxyError::UpstreamConnect(format!("reading the handshake answer: {e}")))?;

    let status = response.status;
    let mut res_headers = response.headers.clone();
    let switching = status == actix_web::http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut res_headers, switching);
    let mut res = HttpResponse::new(status);
    *res.headers_mut() = res_headers;

    if !switching {
        return Ok(refused_handshake(res, framed, timeout));
    }

    // Joined: bytes the codec read past the handshake go first, then the socket.
    let parts = framed.into_parts();
    let early = parts.read_buf.freeze();
    let (from_upstream, mut to_upstream) = parts.io.into_split();
    log::debug!("websocket tunnel open for {}", req.path());

    actix_web::rt::spawn(async move {
        while let Some(Ok(chunk)) = client_payload.next().await {
            if to_upstream.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_upstream.shutdown().await;
    });

    let downstream = stream::iter((!early.is_empty()).then_some(Ok(early)))
        .chain(ReaderStream::with_capacity(from_upstream, READ_CHUNK));
    Ok(res.set_body(BoxBody::new(BodyStream::new(downstream))))
}

/// Streams the body of an upstream's refusal (or any non-101 answer).
fn refused_handshake(
    res: HttpResponse,
    framed: Framed<TcpStream, ClientCodec>,
    timeout: Duration,
) -> HttpResponse {
    if framed.codec_ref().message_type() == MessageType::None {
        return res;
    }
    let length = super::content_length(res.headers()).ok().flatten();
    let payload = framed
        .into_map_codec(ClientCodec::into_payload_codec)
        .take_while(|item| std::future::ready(!matches!(item, Ok(None))))
        .map(|item| item.map(Option::unwrap_or_default));
    let body = ResponseBody::new(payload, timeout);
    match length {
        Some(len) => res.set_body(BoxBody::new(SizedStream::new(len, body))),
        None => res.set_body(BoxBody::new(BodyStream::new(body))),
    }
}

async fn within<F: Future>(timeout: Duration, fut: F) -> Result<F::Output, ProxyError> {
    actix_web::rt::time::timeout(timeout, fut)
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(timeout))
}
