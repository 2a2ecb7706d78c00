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
//!   (nginx's `client_body_timeout`); past it, `408`;
//! * a WebSocket (or other upgraded) tunnel is closed both ways after
//!   `websocket_idle_timeout` without a byte either way.
//!
//! Nothing is buffered whole: a request body is handed to the upstream chunk by
//! chunk as it arrives, and a response body the same way back. A body past
//! `max_body` is refused with `413`: up front for a `Content-Length`, at the
//! cap for a chunked body ([`MaxBody`] does the former before the rate
//! limiter). The HTTP/1.1 client itself is [`client`], one pool of keep-alive
//! connections per worker (why not awc is explained there). Upstream failures
//! are counted in the metrics and logged as an outage ([`OutageLog`]: its
//! start, periodic counts, its end), not once per request.

mod body;
pub mod client;
mod coarse;
mod max_body;
mod websocket;

pub use max_body::{MaxBody, MaxBodyService};

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BodyStream, BoxBody, SizedStream};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::BytesMut;
use ipnet::IpNet;

use crate::error::ProxyError;
use crate::headers::tokens;
use crate::key::{ClientIp, canonical};
use crate::observe::metrics::UpstreamError;
use crate::observe::{Metrics, UpstreamTiming};
use crate::outage::OutageLog;

use body::{BodyError, Progress, RequestBody};
use client::{Answer, ExchangeError, UpstreamClient};

/// Default for `FLOODGATE_UPSTREAM_TIMEOUT`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for `FLOODGATE_CLIENT_TIMEOUT`, nginx's `client_body_timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default for `FLOODGATE_WEBSOCKET_IDLE_TIMEOUT`.
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

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
    authority: Authority,
    timeout: Duration,
    client_timeout: Duration,
    websocket_idle_timeout: Duration,
    host_header: HostHeader,
    reuse_after_body: bool,
    trusted: ClientIp,
    metrics: Arc<Metrics>,
    max_body: Option<u64>,
    /// Shared by every clone: one outage is logged once, not per worker.
    outage: Arc<OutageLog>,
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    /// The text does not parse as an absolute URL.
    #[error("not a URL")]
    Syntax,
    /// The scheme is not `http`.
    #[error("the scheme must be http (https upstreams are not supported yet)")]
    Scheme,
    /// The URL names no host.
    #[error("a host is required")]
    Host,
    /// The URL has more than scheme, host and port: a path other than `/`, a
    /// query, or `user@`.
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
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            websocket_idle_timeout: DEFAULT_WEBSOCKET_IDLE_TIMEOUT,
            host_header: HostHeader::Client,
            reuse_after_body: false,
            trusted: ClientIp::new(),
            metrics: Arc::default(),
            max_body: None,
            outage: Arc::new(OutageLog::new(format!("upstream http://{authority}"))),
            authority,
        })
    }

    /// How long the upstream may take to answer once it has the request, and
    /// the longest pause between two reads of its answer body or two writes
    /// of the request body (`FLOODGATE_UPSTREAM_TIMEOUT`, default 30 s). Past
    /// it: `504`, or mid-body a connection closed before the body is complete.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest pause between two chunks of the client's request body
    /// (`FLOODGATE_CLIENT_TIMEOUT`, default 60 s); past it, `408`. The time
    /// allowed for request headers is the server's
    /// (`HttpServer::client_request_timeout`), not set here.
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    /// How long an upgraded (WebSocket) tunnel may carry no byte in either
    /// direction before both sides are closed.
    pub fn websocket_idle_timeout(mut self, timeout: Duration) -> Self {
        self.websocket_idle_timeout = timeout;
        self
    }

    /// Which `Host` the upstream sees (`FLOODGATE_HOST_HEADER`, default
    /// [`HostHeader::Client`]).
    pub fn host_header(mut self, host: HostHeader) -> Self {
        self.host_header = host;
        self
    }

    /// Whether an upstream connection that carried a request body may be
    /// reused (`FLOODGATE_UPSTREAM_REUSE_AFTER_BODY`; default no: such a
    /// request goes with `Connection: close`). See [`client`] for why.
    pub fn reuse_after_body(mut self, reuse: bool) -> Self {
        self.reuse_after_body = reuse;
        self
    }

    /// Proxies whose `X-Forwarded-*` headers are kept and appended to; from
    /// anyone else they are replaced.
    pub fn trust(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted = ClientIp::new().trust(proxies);
        self
    }

    /// Refuses request bodies longer than `max` bytes with `413`
    /// (`FLOODGATE_MAX_BODY`; `None`: unlimited). A `Content-Length` past it
    /// is refused before anything is forwarded; a chunked body is counted as
    /// it streams. Wrap [`MaxBody`] outside the rate limiter to refuse the
    /// former before it is charged.
    pub fn max_body(mut self, max: Option<u64>) -> Self {
        self.max_body = max;
        self
    }

    /// Counts upstream failures into `metrics` (shared with `/metrics`).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The upstream URL as given to [`new`](Self::new).
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The path and query to request from the upstream. Only these are
    /// taken from the client's request target: scheme and authority are always
    /// the upstream's, whatever form the target had (absolute-form,
    /// `//host/path`, `@host`).
    fn path_and_query(&self, target: &Uri) -> Result<PathAndQuery, ProxyError> {
        match target.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') || pq.as_str() == "*" => Ok(pq.clone()),
            Some(_) => Err(ProxyError::Internal(format!(
                "request target {target} has no origin-form path"
            ))),
            None => Ok(PathAndQuery::from_static("/")),
        }
    }

    /// Counts an upstream failure on its way to the client, and logs it as
    /// part of an outage.
    fn count(&self, err: ProxyError) -> ProxyError {
        // The status the client gets says which kind of failure it was
        // (one map, in `ProxyError::status_code`).
        if let Some(kind) = upstream_error(&err) {
            self.metrics.upstream_error(kind);
        }
        match err.status_code() {
            StatusCode::GATEWAY_TIMEOUT => self.outage.record("answered 504", &err),
            StatusCode::BAD_GATEWAY => self.outage.record("answered 502", &err),
            _ => {}
        }
        err
    }

    fn is_trusted(&self, addr: IpAddr) -> bool {
        self.trusted.is_trusted(addr)
    }
}

/// The kind of upstream failure `err` is, if it is one (the client's own
/// failures are not).
fn upstream_error(err: &ProxyError) -> Option<UpstreamError> {
    use std::io::ErrorKind;
    Some(match err {
        ProxyError::UpstreamTimeout(_) => UpstreamError::Timeout,
        ProxyError::Upstream(ExchangeError::Closed) => UpstreamError::Closed,
        ProxyError::Upstream(ExchangeError::Invalid(_)) => UpstreamError::Protocol,
        ProxyError::Upstream(ExchangeError::Timeout) => UpstreamError::Timeout,
        ProxyError::Upstream(e @ ExchangeError::Connect(_)) => match e.io_kind() {
            Some(ErrorKind::ConnectionRefused) => UpstreamError::Refused,
            Some(ErrorKind::TimedOut) => UpstreamError::Timeout,
            _ => UpstreamError::Connect,
        },
        ProxyError::Upstream(e) => match e.io_kind() {
            Some(ErrorKind::TimedOut) => UpstreamError::Timeout,
            Some(
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe,
            ) => UpstreamError::Reset,
            _ => UpstreamError::Other,
        },
        _ => return None,
    })
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
            client: Rc::new(
                UpstreamClient::new(host, port).reuse_after_body(upstream.reuse_after_body),
            ),
            metrics: Rc::new(upstream.metrics.clone()),
            upstream: upstream.clone(),
        };
        cfg.app_data(web::Data::new(forwarder))
            .default_service(web::to(forward));
    }
}

/// One worker's handle on the metrics: answer bodies hold it by this `Rc`,
/// so forwarding one writes no reference count other workers share.
#[allow(clippy::redundant_allocation)]
type WorkerMetrics = Rc<Arc<Metrics>>;

/// One worker's connection pool and the upstream it talks to.
pub struct Forwarder {
    client: Rc<UpstreamClient>,
    metrics: WorkerMetrics,
    upstream: Upstream,
}

/// Forwards one request and streams the answer back.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    forwarder: web::Data<Forwarder>,
) -> Result<HttpResponse, ProxyError> {
    let upstream = &forwarder.upstream;
    let method = req.method();
    if method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    let target = upstream.path_and_query(req.uri())?;
    let headers = req.headers();
    let body_len = content_length(headers)?;
    max_body::check(body_len, upstream.max_body)?;
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let websocket = websocket_handshake(headers, body_len, chunked)?;
    let named = connection_named(headers);
    let peer = peer(&req, upstream);
    let write_head = |out: &mut BytesMut| {
        write_request_head(
            out,
            &req,
            upstream,
            &target,
            &named,
            peer.as_ref(),
            websocket,
        )
    };

    let timeout = upstream.timeout;
    let (body, progress, tunnel) = if websocket {
        (client::RequestBody::Upgrade, None, Some(payload))
    } else if body_len.is_none() && !chunked {
        (client::RequestBody::None, None, Some(payload))
    } else {
        let progress = Progress::new();
        let body = RequestBody::new(payload, progress.clone(), upstream.client_timeout)
            .max(upstream.max_body);
        let body = match body_len {
            Some(len) => client::RequestBody::Sized(len, body),
            None => client::RequestBody::Chunked(body),
        };
        (body, Some(progress), None)
    };
    // The answer's headers go straight into the (pooled) response head.
    let mut res = HttpResponse::new(StatusCode::OK);
    let sent = Instant::now();
    let exchange = forwarder
        .client
        .exchange(method, write_head, body, timeout, res.headers_mut());
    let answer = deadline(exchange, timeout, progress)
        .await
        .map_err(|e| upstream.count(exchange_error(e, timeout)))?;
    upstream.outage.recovered();
    res.extensions_mut().insert(UpstreamTiming {
        first_byte: sent.elapsed(),
    });
    match tunnel {
        Some(payload) if websocket && answer.status == StatusCode::SWITCHING_PROTOCOLS => {
            websocket::join(
                &req,
                payload.into_inner(),
                res,
                answer,
                upstream.websocket_idle_timeout,
            )
        }
        _ => Ok(respond(res, answer, &forwarder.metrics)),
    }
}

/// Races the upstream exchange against the upstream deadline (see the module
/// docs). Without a body the deadline is simply `timeout` from now, kept by
/// the cheap [`coarse`] timer (at most 50 ms late).
fn deadline<F, T>(exchange: F, timeout: Duration, progress: Option<Progress>) -> WithDeadline<F>
where
    F: Future<Output = Result<T, ExchangeError>>,
{
    WithDeadline {
        exchange,
        watchdog: match progress {
            None => Watchdog::Fixed(coarse::Deadline::after(timeout)),
            Some(progress) => Watchdog::Stalled(progress.stalled_for(timeout)),
        },
    }
}

pin_project_lite::pin_project! {
    /// See [`deadline`]. A hand-written combinator rather than `select!` in
    /// an `async fn`, which would hold the (large) exchange future twice.
    struct WithDeadline<F> {
        #[pin]
        exchange: F,
        watchdog: Watchdog,
    }
}

enum Watchdog {
    Fixed(coarse::Deadline),
    Stalled(body::Stalled),
}

impl<F, T> Future for WithDeadline<F>
where
    F: Future<Output = Result<T, ExchangeError>>,
{
    type Output = Result<T, ExchangeError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(res) = this.exchange.poll(cx) {
            return std::task::Poll::Ready(res);
        }
        let expired = match this.watchdog {
            Watchdog::Fixed(deadline) => std::pin::Pin::new(deadline).poll(cx),
            Watchdog::Stalled(stalled) => std::pin::Pin::new(stalled).poll(cx),
        };
        expired.map(|()| Err(ExchangeError::Timeout))
    }
}

fn exchange_error(err: ExchangeError, timeout: Duration) -> ProxyError {
    match err {
        ExchangeError::Timeout => ProxyError::UpstreamTimeout(timeout),
        ExchangeError::Body(BodyError::ClientIdle(after)) => ProxyError::ClientTimeout(after),
        ExchangeError::Body(BodyError::TooLarge(max)) => ProxyError::PayloadTooLarge(max),
        ExchangeError::Body(err) => ProxyError::ClientBody(err.to_string()),
        other => ProxyError::Upstream(other),
    }
}

/// The client's answer: the upstream's status, end-to-end headers and body.
/// If the upstream answered before the client's body was all read, the
/// client's connection closes after it (the rest of that body is not read).
fn respond(mut res: HttpResponse, answer: Answer, metrics: &WorkerMetrics) -> HttpResponse {
    let status = answer.status;
    *res.status_mut() = status;
    if answer.interrupted {
        res.head_mut()
            .set_connection_type(actix_http::ConnectionType::Close);
    }
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        // actix-http writes these without a body (and keeps a 304's length).
        return res;
    }
    let body = body::Counted::new(answer.body, metrics.clone());
    let body = match (answer.has_body, answer.content_length) {
        // For HEAD the length announced is the resource's: keep it.
        (_, Some(len)) => BoxBody::new(SizedStream::new(len, body)),
        (true, None) => BoxBody::new(BodyStream::new(body)),
        (false, None) => BoxBody::new(actix_web::body::None::new()),
    };
    res.set_body(body)
}

/// `Content-Length` as a number; a malformed one is the client's error.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(value) => crate::headers::content_length(value.as_bytes())
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

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The headers a `Connection` header names (other than `Upgrade` and `Host`,
/// which floodgate handles itself). Allocates only if there are any.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .flat_map(|v| tokens(v.as_bytes()))
        .filter(|token| {
            !token.eq_ignore_ascii_case(b"keep-alive")
                && !token.eq_ignore_ascii_case(b"close")
                && !token.eq_ignore_ascii_case(b"upgrade")
                && !token.eq_ignore_ascii_case(b"host")
        })
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect()
}

/// Whether `name` is dropped on the way through: hop-by-hop, named by
/// `Connection`, or spelled with an underscore. The last is nginx's default
/// (`underscores_in_headers off`): CGI-style upstreams read `X_Api_Key` and
/// `X-Api-Key` as one header, so a client could pass one value to the rate
/// limiter and another to the application.
fn dropped(name: &HeaderName, named: &[HeaderName]) -> bool {
    is_hop_by_hop(name) || name.as_str().contains('_') || named.contains(name)
}

/// Whether floodgate may drop or rewrite a header called `name` on its way
/// to the upstream, whoever sends it (see [`write_request_head`]). Such a
/// header cannot be a rate-limit key: the key and what the upstream sees
/// could disagree. `Host` is one: an absolute-form target replaces it, so
/// counting by `Host` would give `GET http://app/` with a new `Host` each
/// time a new budget each time.
pub(crate) fn rewritten_on_the_way(name: &HeaderName) -> bool {
    dropped(name, &[])
        || *name == header::HOST
        || *name == header::EXPECT
        || *name == header::X_FORWARDED_FOR
        || claims_to_forward(name)
}

/// Whether the request is a WebSocket handshake to pass through, or an error
/// if it is a malformed one.
///
/// actix-http reads the body of any request with an `Upgrade: websocket`
/// header (unless chunked) until the connection closes, whatever its
/// `Content-Length` or `Connection` say. Forwarding such a request as an
/// ordinary one would pass every later byte on the connection to the
/// upstream inside one counted request (request smuggling), so it is either
/// a proper handshake (`Connection: upgrade`, no body), tunnelled only once
/// the upstream answers `101`, or refused.
fn websocket_handshake(
    headers: &HeaderMap,
    body_len: Option<u64>,
    chunked: bool,
) -> Result<bool, ProxyError> {
    let upgrade_websocket = headers
        .get_all(header::UPGRADE)
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !upgrade_websocket {
        return Ok(false);
    }
    if chunked || body_len.is_some_and(|len| len > 0) {
        return Err(ProxyError::Malformed(
            "a WebSocket handshake cannot carry a body",
        ));
    }
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .flat_map(|v| tokens(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if !connection_upgrade {
        return Err(ProxyError::Malformed(
            "Upgrade: websocket needs Connection: upgrade",
        ));
    }
    Ok(true)
}

/// A client connection's peer as floodgate forwards it, computed once per
/// connection (see [`on_connect`]) rather than once per request.
#[derive(Clone)]
pub struct Peer {
    /// The address, as an `X-Forwarded-For` entry.
    value: HeaderValue,
    trusted: bool,
}

impl Peer {
    fn new(addr: IpAddr, upstream: &Upstream) -> Self {
        let addr = canonical(addr);
        Peer {
            value: HeaderValue::try_from(addr.to_string())
                .expect("an address is a valid header value"),
            trusted: upstream.is_trusted(addr),
        }
    }
}

/// An `HttpServer::on_connect` callback that computes each connection's
/// [`Peer`] once. Optional: without it, `forward` computes it per request.
pub fn on_connect(
    upstream: &Upstream,
) -> impl Fn(&dyn std::any::Any, &mut actix_web::dev::Extensions) + Send + Sync + 'static {
    let upstream = upstream.clone();
    move |conn, extensions| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>()
            && let Ok(addr) = tcp.peer_addr()
        {
            extensions.insert(Peer::new(addr.ip(), &upstream));
        }
    }
}

/// The connection's [`Peer`]: from `on_connect` if registered, else now.
fn peer(req: &HttpRequest, upstream: &Upstream) -> Option<Peer> {
    match req.conn_data::<Peer>() {
        Some(peer) => Some(peer.clone()),
        None => req.peer_addr().map(|addr| Peer::new(addr.ip(), upstream)),
    }
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Writes the upstream request's line and headers, straight from the client's
/// headers: end-to-end ones only (no hop-by-hop header, none `Connection`
/// names, none spelled with `_`, no `Expect`: floodgate answers
/// `100-continue` itself), the body's framing left to the client (see
/// `client::exchange`), and `X-Forwarded-*`:
///
/// * `X-Forwarded-For` gets the peer appended; from an untrusted peer it
///   replaces whatever the client claimed;
/// * `X-Forwarded-Proto` and `X-Forwarded-Host` are set unless a trusted proxy
///   already set them; `Forwarded` and `X-Real-IP` pass only from a trusted
///   proxy.
///
/// For an absolute-form target (`GET http://a/x`) the target's authority is
/// the host, and the client's `Host` is ignored (RFC 9112 §3.2.2), unless
/// the upstream's own host is configured.
fn write_request_head(
    out: &mut BytesMut,
    req: &HttpRequest,
    upstream: &Upstream,
    target: &PathAndQuery,
    named: &[HeaderName],
    peer: Option<&Peer>,
    websocket: bool,
) {
    let trusted = peer.is_some_and(|p| p.trusted);
    let line = |out: &mut BytesMut, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");

    // Only absolute-form targets have an authority: no allocation otherwise.
    let target_host = req.uri().authority().map(|a| match a.port() {
        Some(port) => format!("{}:{}", a.host(), port.as_str()),
        None => a.host().to_owned(),
    });
    let headers = req.headers();
    let mut has_host = false;
    for (name, value) in headers.iter() {
        if dropped(name, named)
            || *name == header::EXPECT
            || *name == header::CONTENT_LENGTH
            || *name == header::X_FORWARDED_FOR
            || (!trusted && claims_to_forward(name))
        {
            continue;
        }
        if *name == header::HOST {
            if upstream.host_header == HostHeader::Upstream || target_host.is_some() {
                continue;
            }
            has_host = true;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_host {
        let host = match (&target_host, upstream.host_header) {
            (Some(host), HostHeader::Client) => host.as_str(),
            _ => upstream.authority.as_str(),
        };
        line(out, b"host", host.as_bytes());
    }
    // A trusted proxy's forwarding headers are kept, unless its
    // `Connection` header names them: then they were for this hop only.
    let kept = |name: &HeaderName| trusted && !named.contains(name) && headers.contains_key(name);
    if let Some(peer) = peer {
        out.extend_from_slice(b"x-forwarded-for: ");
        if kept(&header::X_FORWARDED_FOR) {
            for value in headers.get_all(header::X_FORWARDED_FOR) {
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(peer.value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !kept(&X_FORWARDED_PROTO) {
        line(out, b"x-forwarded-proto", b"http");
    }
    if !kept(&X_FORWARDED_HOST)
        && let Some(host) = target_host
            .as_deref()
            .map(str::as_bytes)
            .or_else(|| headers.get(header::HOST).map(HeaderValue::as_bytes))
    {
        line(out, b"x-forwarded-host", host);
    }
    if websocket {
        line(out, b"upgrade", b"websocket");
        line(out, b"connection", b"upgrade");
    }
}

/// Headers only a proxy should set; from an untrusted peer they are the
/// client's claims and are not passed on.
fn claims_to_forward(name: &HeaderName) -> bool {
    *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
        || *name == header::FORWARDED
        || name.as_str() == "x-real-ip"
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

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
    fn request_targets_keep_only_path_and_query() {
        let up = Upstream::new("http://127.0.0.1:8080").unwrap();
        for (target, expected) in [
            ("/a?b=c", "/a?b=c"),
            ("http://elsewhere.example/x?y", "/x?y"),
            ("//evil.example/path", "//evil.example/path"),
        ] {
            let target: Uri = target.parse().unwrap();
            assert_eq!(up.path_and_query(&target).unwrap().as_str(), expected);
        }
    }

    fn head_for(req: TestRequest, websocket: bool) -> String {
        head_via(
            req,
            &Upstream::new("http://127.0.0.1:8080").unwrap(),
            websocket,
        )
    }

    /// The head `up` writes for `req` from peer 192.0.2.9.
    fn head_via(req: TestRequest, up: &Upstream, websocket: bool) -> String {
        let up = up.clone();
        let req = req
            .peer_addr("192.0.2.9:1234".parse().unwrap())
            .to_http_request();
        let named = connection_named(req.headers());
        let peer = peer(&req, &up);
        let target = up.path_and_query(req.uri()).unwrap();
        let mut out = BytesMut::new();
        write_request_head(
            &mut out,
            &req,
            &up,
            &target,
            &named,
            peer.as_ref(),
            websocket,
        );
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn forwarding_headers_a_trusted_proxy_names_in_connection_are_its_own() {
        let up = Upstream::new("http://127.0.0.1:8080")
            .unwrap()
            .trust(["192.0.2.0/24".parse().unwrap()]);
        let named = TestRequest::get()
            .insert_header(("connection", "X-Forwarded-For, X-Forwarded-Proto"))
            .insert_header(("x-forwarded-for", "1.2.3.4"))
            .insert_header(("x-forwarded-proto", "https"))
            .insert_header(("host", "app.example"));
        let head = head_via(named, &up, false);
        assert!(head.contains("x-forwarded-for: 192.0.2.9\r\n"), "{head}");
        assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
        assert!(
            !head.contains("1.2.3.4") && !head.contains("https"),
            "{head}"
        );

        let kept = TestRequest::get()
            .insert_header(("x-forwarded-for", "1.2.3.4"))
            .insert_header(("x-forwarded-proto", "https"))
            .insert_header(("host", "app.example"));
        let head = head_via(kept, &up, false);
        assert!(
            head.contains("x-forwarded-for: 1.2.3.4, 192.0.2.9\r\n"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-proto: https\r\n"), "{head}");
        assert_eq!(head.matches("x-forwarded-proto").count(), 1, "{head}");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_not_forwarded() {
        let mut req = TestRequest::get().uri("/p?q=1");
        for (k, v) in [
            ("connection", "keep-alive, x-secret, Upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9v"),
            ("expect", "100-continue"),
            ("x-secret", "1"),
            ("x-end-to-end", "kept"),
            ("host", "app.example"),
        ] {
            req = req.append_header((k, v));
        }
        let head = head_for(req, false);
        assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\n"), "{head}");
        let mut names: Vec<&str> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, _)| k)
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "host",
                "x-end-to-end",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto"
            ],
            "{head}"
        );
        assert!(head.contains("x-forwarded-for: 192.0.2.9\r\n"));
    }

    #[test]
    fn an_absolute_form_targets_authority_replaces_host() {
        for (target, host) in [
            ("http://a.example/x", "a.example"),
            ("http://a.example:8081/x", "a.example:8081"),
            ("http://user@a.example/x", "a.example"),
            ("http://[2001:db8::1]:8081/x", "[2001:db8::1]:8081"),
        ] {
            let req = TestRequest::get()
                .uri(target)
                .insert_header(("host", "b.example"));
            let head = head_for(req, false);
            assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
            assert!(head.contains(&format!("\r\nhost: {host}\r\n")), "{head}");
            assert!(
                head.contains(&format!("\r\nx-forwarded-host: {host}\r\n")),
                "{head}"
            );
            assert!(!head.contains("b.example"), "{head}");
        }
    }

    #[test]
    fn websocket_upgrade_keeps_its_handshake_headers() {
        let req = TestRequest::get()
            .insert_header(("connection", "Upgrade"))
            .insert_header(("upgrade", "websocket"))
            .insert_header(("te", "trailers"))
            .insert_header(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        let head = head_for(req, true);
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        assert!(
            head.contains("sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            "{head}"
        );
        assert!(!head.contains("te:"), "{head}");
    }
}

#[cfg(test)]
mod proptests;
