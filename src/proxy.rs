//! Forwarding to the one configured upstream, streaming both ways.
//!
//! Learned from actix's `http-proxy` example, then finished: every hop-by-hop header is stripped in both directions (plus
//! any the `Connection` header names), `X-Forwarded-*` are set, the request URI
//! is rebuilt from the upstream's scheme and authority so no request target can
//! point floodgate elsewhere, and every wait has a deadline:
//!
//! * the upstream gets `timeout` to answer once it has the request, and the same
//!   between two reads of its response body, or between two writes of the
//!   request body it should be reading (nginx's `proxy_read_timeout` /
//!   `proxy_send_timeout`); past it the client gets `504` (or, mid-body, a
//!   connection closed before the body is complete);
//! * the client gets `client_timeout` between two chunks of its request body
//!   (nginx's `client_body_timeout`); past it, `408`.
//!
//! Nothing is buffered whole: a request body is handed to the upstream chunk by
//! chunk as it arrives, and a response body the same way back. The HTTP/1.1
//! client itself is [`client`] (why not awc is explained there).

mod body;
pub mod client;
mod websocket;

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{RequestHead, ResponseHead};
use actix_web::body::{BodyStream, BoxBody, SizedStream};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use ipnet::IpNet;

use crate::error::ProxyError;
use crate::key::canonical;
use crate::metrics::Metrics;

use body::{BodyError, Progress, RequestBody};
use client::{ExchangeError, ResponseBody, UpstreamClient};

/// Default for `FLOODGATE_UPSTREAM_TIMEOUT`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for `FLOODGATE_CLIENT_TIMEOUT`, nginx's `client_body_timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Which `Host` the upstream sees (`FLOODGATE_HOST_HEADER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostHeader {
    /// The client's own `Host` header, as nginx `proxy_set_header Host $host`
    /// and Traefik's `passHostHeader` do: virtual hosts keep working.
    #[default]
    Client,
    /// The upstream URL's host and port.
    Upstream,
}

/// Where and how to forward.
#[derive(Debug, Clone)]
pub struct Upstream {
    url: Uri,
    scheme: Scheme,
    authority: Authority,
    timeout: Duration,
    client_timeout: Duration,
    host_header: HostHeader,
    trusted: Arc<[IpNet]>,
    metrics: Arc<Metrics>,
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("not a URL")]
    Syntax,
    #[error("the scheme must be http (https upstreams are not supported yet)")]
    Scheme,
    #[error("a host is required")]
    Host,
    #[error("must not have a path, query or credentials (only scheme://host[:port])")]
    Path,
}

impl Upstream {
    /// An upstream at `url`: `http://host[:port]`, optionally with a trailing `/`.
    pub fn new(url: &str) -> Result<Self, UpstreamUrlError> {
        let uri: Uri = url.trim().parse().map_err(|_| UpstreamUrlError::Syntax)?;
        let scheme = uri.scheme().cloned().ok_or(UpstreamUrlError::Syntax)?;
        if scheme != Scheme::HTTP {
            return Err(UpstreamUrlError::Scheme);
        }
        let authority = uri.authority().cloned().ok_or(UpstreamUrlError::Host)?;
        if authority.as_str().contains('@') {
            return Err(UpstreamUrlError::Path);
        }
        if authority.host().is_empty() {
            return Err(UpstreamUrlError::Host);
        }
        match uri.path_and_query().map(PathAndQuery::as_str) {
            None | Some("") | Some("/") => {}
            Some(_) => return Err(UpstreamUrlError::Path),
        }
        Ok(Upstream {
            url: uri,
            scheme,
            authority,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            host_header: HostHeader::Client,
            trusted: Arc::from(Vec::new()),
            metrics: Arc::default(),
        })
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    pub fn host_header(mut self, host: HostHeader) -> Self {
        self.host_header = host;
        self
    }

    /// Proxies whose `X-Forwarded-*` headers are kept and appended to; from
    /// anyone else they are replaced.
    pub fn trust(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted = proxies.into_iter().map(|n| n.trunc()).collect();
        self
    }

    /// Counts upstream failures into `metrics` (shared with `/metrics`).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The upstream URI for a request target. Only the path and query are
    /// taken from the client; scheme and authority are always the upstream's,
    /// whatever form the request target had (absolute-form, `//host/path`,
    /// `@host`).
    fn uri_for(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = match target.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            Some(pq) if pq.as_str() == "*" => pq.clone(),
            Some(_) => {
                return Err(ProxyError::Internal(format!(
                    "request target {target} has no origin-form path"
                )));
            }
            None => PathAndQuery::from_static("/"),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::Internal(format!("building upstream URI: {e}")))
    }

    /// Counts an upstream failure on its way to the client.
    fn count(&self, err: ProxyError) -> ProxyError {
        match err {
            ProxyError::UpstreamConnect(_) => self.metrics.upstream_connect_errors.inc(),
            ProxyError::UpstreamTimeout(_) => self.metrics.upstream_timeouts.inc(),
            _ => {}
        }
        err
    }

    fn is_trusted(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.trusted.iter().any(|net| net.contains(&addr))
    }
}

/// Registers the forwarding service as the default service of an `App`.
///
/// Call it inside the `HttpServer::new` factory: it builds one connection
/// pool per worker (pools are per thread, without locks).
///
/// ```no_run
/// use actix_web::{App, HttpServer};
/// use floodgate::proxy::{self, Upstream};
///
/// # async fn run() -> std::io::Result<()> {
/// let upstream = Upstream::new("http://127.0.0.1:8080").unwrap();
/// HttpServer::new(move || App::new().configure(proxy::configure(upstream.clone())))
///     .bind("127.0.0.1:8000")?
///     .run()
///     .await
/// # }
/// ```
pub fn configure(upstream: Upstream) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        let host = upstream.authority.host();
        let port = upstream.authority.port_u16().unwrap_or(80);
        let forwarder = Forwarder {
            client: Rc::new(UpstreamClient::new(host, port)),
            upstream: upstream.clone(),
        };
        cfg.app_data(web::Data::new(forwarder))
            .default_service(web::to(forward));
    }
}

/// One worker's connection pool and the upstream it talks to.
pub struct Forwarder {
    client: Rc<UpstreamClient>,
    upstream: Upstream,
}

/// Forwards one request and streams the answer back.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    forwarder: web::Data<Forwarder>,
) -> Result<HttpResponse, ProxyError> {
    let upstream = &forwarder.upstream;
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    let mut head = RequestHead::default();
    head.method = req.method().clone();
    head.uri = upstream.uri_for(req.uri())?;
    let websocket = is_websocket_upgrade(req.headers());
    head.headers = req.headers().clone();
    strip_hop_by_hop(&mut head.headers, websocket);
    head.headers.remove(header::EXPECT);
    set_forwarded(&req, upstream, &mut head.headers);
    if upstream.host_header == HostHeader::Upstream {
        head.headers.insert(
            header::HOST,
            HeaderValue::from_str(upstream.authority.as_str())
                .map_err(|e| ProxyError::Internal(e.to_string()))?,
        );
    }
    if websocket {
        head.set_connection_type(actix_http::ConnectionType::Upgrade);
    }

    let client = &forwarder.client;
    let timeout = upstream.timeout;
    let body_len = content_length(req.headers())?;
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let no_body = client::RequestBody::<RequestBody<web::Payload>>::None;
    if websocket {
        let exchange = client.exchange(head, no_body, timeout);
        let (response, body) = deadline(exchange, timeout, None)
            .await
            .map_err(|e| upstream.count(exchange_error(e, timeout)))?;
        if response.status == StatusCode::SWITCHING_PROTOCOLS {
            return websocket::join(&req, payload.into_inner(), response, body);
        }
        return Ok(respond(&req, response, body));
    }
    let sent = if body_len.is_none() && !chunked {
        deadline(client.exchange(head, no_body, timeout), timeout, None).await
    } else {
        let progress = Progress::new();
        let body = RequestBody::new(payload, progress.clone(), upstream.client_timeout);
        let body = match body_len {
            Some(len) => client::RequestBody::Sized(len, body),
            None => client::RequestBody::Chunked(body),
        };
        deadline(
            client.exchange(head, body, timeout),
            timeout,
            Some(progress),
        )
        .await
    };
    let (response, body) = sent.map_err(|e| upstream.count(exchange_error(e, timeout)))?;
    Ok(respond(&req, response, body))
}

/// Races the upstream exchange against the upstream deadline (see the module
/// docs). Without a body the deadline is simply `timeout` from now.
async fn deadline<F, T>(
    exchange: F,
    timeout: Duration,
    progress: Option<Progress>,
) -> Result<T, ExchangeError>
where
    F: Future<Output = Result<T, ExchangeError>>,
{
    let watchdog = async {
        match progress {
            None => actix_web::rt::time::sleep(timeout).await,
            Some(progress) => progress.stalled_for(timeout).await,
        }
    };
    tokio::select! {
        biased;
        res = exchange => res,
        () = watchdog => Err(ExchangeError::Timeout),
    }
}

fn exchange_error(err: ExchangeError, timeout: Duration) -> ProxyError {
    match err {
        ExchangeError::Timeout => ProxyError::UpstreamTimeout(timeout),
        ExchangeError::Body(BodyError::ClientIdle(after)) => ProxyError::ClientTimeout(after),
        ExchangeError::Body(err) => ProxyError::ClientBody(err.to_string()),
        other => ProxyError::UpstreamConnect(other.to_string()),
    }
}

/// The client's answer: the upstream's status, end-to-end headers and body.
fn respond(req: &HttpRequest, mut response: ResponseHead, body: ResponseBody) -> HttpResponse {
    let status = response.status;
    let length = content_length(&response.headers).ok().flatten();
    let mut headers = std::mem::take(&mut response.headers);
    strip_hop_by_hop(&mut headers, false);
    let mut res = HttpResponse::new(status);
    *res.headers_mut() = headers;
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if no_body {
        return res;
    }
    let body = match length {
        Some(len) => BoxBody::new(SizedStream::new(len, body)),
        // A HEAD answer has no body; its length header (if any) was kept above.
        None if req.method() == Method::HEAD => BoxBody::new(actix_web::body::None::new()),
        None => BoxBody::new(BodyStream::new(body)),
    };
    res.set_body(body)
}

/// `Content-Length` as a number; a malformed one is the client's error.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| ProxyError::ClientBody("malformed Content-Length".into())),
    }
}

// === hop-by-hop headers ===

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers and every header `Connection` names. For a
/// WebSocket upgrade being proxied, `Connection: upgrade` and `Upgrade` stay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| *name != header::UPGRADE && *name != header::HOST)
        .collect();
    for name in &HOP_BY_HOP {
        if websocket && (*name == header::UPGRADE || *name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    for name in named {
        if name != header::CONNECTION {
            headers.remove(name);
        }
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A WebSocket handshake: `Connection: upgrade` and `Upgrade: websocket`.
fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    upgrade
        && headers
            .get_all(header::CONNECTION)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// `X-Forwarded-For` gets the peer appended (or, from an untrusted peer,
/// replaces whatever the client claimed); `X-Forwarded-Proto` and
/// `X-Forwarded-Host` are set unless a trusted proxy already set them.
fn set_forwarded(req: &HttpRequest, upstream: &Upstream, headers: &mut HeaderMap) {
    let Some(peer) = req.peer_addr().map(|a| canonical(a.ip())) else {
        return;
    };
    let trusted = upstream.is_trusted(peer);
    let peer = peer.to_string();
    let xff = if trusted {
        let mut chain = headers
            .get_all(header::X_FORWARDED_FOR)
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if !chain.is_empty() {
            chain.push_str(", ");
        }
        chain.push_str(&peer);
        chain
    } else {
        peer
    };
    if let Ok(xff) = HeaderValue::try_from(xff) {
        headers.insert(header::X_FORWARDED_FOR, xff);
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if !(trusted && headers.contains_key(&proto)) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    let fwd_host = HeaderName::from_static("x-forwarded-host");
    if !(trusted && headers.contains_key(&fwd_host)) {
        match req.headers().get(header::HOST) {
            Some(host) => {
                headers.insert(fwd_host, host.clone());
            }
            None => {
                headers.remove(fwd_host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        assert!(Upstream::new("http://127.0.0.1:8080").is_ok());
        assert!(Upstream::new("http://web:80/").is_ok());
        assert_eq!(
            Upstream::new("https://web").unwrap_err(),
            UpstreamUrlError::Scheme
        );
        assert_eq!(
            Upstream::new("ftp://web").unwrap_err(),
            UpstreamUrlError::Scheme
        );
        assert_eq!(
            Upstream::new("http://web/api").unwrap_err(),
            UpstreamUrlError::Path
        );
        assert_eq!(
            Upstream::new("http://u:p@web").unwrap_err(),
            UpstreamUrlError::Path
        );
        assert_eq!(
            Upstream::new("web:8080").unwrap_err(),
            UpstreamUrlError::Syntax
        );
        assert_eq!(
            Upstream::new("not a url").unwrap_err(),
            UpstreamUrlError::Syntax
        );
    }

    #[test]
    fn request_targets_never_change_the_authority() {
        let up = Upstream::new("http://127.0.0.1:8080").unwrap();
        for (target, expected) in [
            ("/a?b=c", "http://127.0.0.1:8080/a?b=c"),
            ("http://elsewhere.example/x?y", "http://127.0.0.1:8080/x?y"),
            (
                "//evil.example/path",
                "http://127.0.0.1:8080//evil.example/path",
            ),
            ("*", "http://127.0.0.1:8080*"),
        ] {
            let target: Uri = target.parse().unwrap();
            let uri = up.uri_for(&target).unwrap();
            assert_eq!(
                uri.authority().unwrap().as_str(),
                "127.0.0.1:8080",
                "{target}"
            );
            if target != "*" {
                assert_eq!(uri.to_string(), expected);
            }
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9v"),
            ("x-secret", "1"),
            ("x-end-to-end", "kept"),
        ] {
            headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(left, vec!["x-end-to-end"]);
    }

    #[test]
    fn websocket_upgrade_keeps_its_handshake_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        assert!(is_websocket_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!headers.contains_key(header::TE));
    }
}
