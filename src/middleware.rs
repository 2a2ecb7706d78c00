//! The rate-limit middleware: key → backend → `429` or the wrapped service.
//!
//! A request whose key cannot be derived is answered `400`; one the backend
//! cannot decide goes on or is answered `503`, as its [`FailurePolicy`] says.
//! One [`Transform`] serves every case; the only code that writes rate-limit
//! headers is [`LimitHeaders::apply`], for allowed and limited responses alike.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::{Error, HttpResponse, ResponseError};
use futures_util::future::{LocalBoxFuture, Ready, ready};

use crate::error::ProxyError;
use crate::headers::{HeaderStyle, LimitHeaders, Recent, retry_after_secs};
use crate::key::{ClientIp, KeyExtractor};
use crate::limiter::{Backend, Check, Decision, Health, Limit, RateKey};
use crate::metrics::Metrics;
use crate::outage::OutageLog;

/// What to do when the backend cannot decide (Redis down or slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Let the request through without a decision.
    #[default]
    Open,
    /// Answer `503 Service Unavailable` with `Retry-After`.
    Closed,
}

/// The plain-text body of every `429`.
const TOO_MANY_REQUESTS_TEXT: &str = "Too Many Requests\n";

/// `Retry-After` sent with a `503` under [`FailurePolicy::Closed`].
pub const CLOSED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Rate-limits every request that passes through the wrapped service.
///
/// Build it once, outside `HttpServer::new`, and clone it into each worker's
/// `App`: clones share the backend, so all workers count together.
///
/// ```
/// use std::{num::NonZeroU32, sync::Arc};
/// use actix_web::{App, HttpResponse, web};
/// use floodgate::{Limit, MemoryBackend, Rate, RateLimit};
///
/// let limit = Limit::new("default", Rate::per_minute(NonZeroU32::new(10).unwrap()), NonZeroU32::new(10).unwrap());
/// let backend = Arc::new(MemoryBackend::new(100_000));
/// let rate_limit = RateLimit::new(backend, limit);
///
/// let app = App::new()
///     .wrap(rate_limit.clone())
///     .route("/", web::get().to(HttpResponse::Ok));
/// ```
#[derive(Clone)]
pub struct RateLimit {
    backend: Arc<dyn Backend>,
    limit: Limit,
    headers: LimitHeaders,
    extractor: Arc<dyn KeyExtractor>,
    on_backend_error: FailurePolicy,
    metrics: Arc<Metrics>,
    /// Backend failures as outages: shared by every clone (worker).
    outage: Arc<OutageLog>,
}

impl RateLimit {
    /// Limits by client address (the TCP peer), with IETF headers, failing
    /// open if the backend errs.
    pub fn new(backend: Arc<dyn Backend>, limit: Limit) -> Self {
        RateLimit {
            headers: LimitHeaders::new(HeaderStyle::Ietf, &limit),
            outage: Arc::new(OutageLog::new(format!(
                "rate limiter ({} backend)",
                backend.kind()
            ))),
            backend,
            limit,
            extractor: Arc::new(ClientIp::new()),
            on_backend_error: FailurePolicy::Open,
            metrics: Arc::default(),
        }
    }

    /// Counts requests by `extractor` instead of the client address.
    pub fn key(mut self, extractor: impl KeyExtractor) -> Self {
        self.extractor = Arc::new(extractor);
        self
    }

    /// Which rate-limit headers responses carry.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.headers = LimitHeaders::new(style, &self.limit);
        self
    }

    /// What a request gets when the backend returns an error instead of a
    /// decision (default [`FailurePolicy::Open`]). A Redis backend with the
    /// `local` fallback decides from memory instead of erring, so this only
    /// applies when it cannot.
    pub fn on_backend_error(mut self, policy: FailurePolicy) -> Self {
        self.on_backend_error = policy;
        self
    }

    /// Counts decisions into `metrics` (shared with `/metrics`).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The limit this middleware enforces.
    pub fn limit(&self) -> &Limit {
        &self.limit
    }

    /// The `429` answer for `decision`.
    /// The body says what happened; `Retry-After` says when to come back,
    /// so the plain-text body is the same every time (no allocation on the
    /// path a flood of refused requests takes).
    fn too_many_requests(
        &self,
        req: &ServiceRequest,
        decision: &Decision,
        recent: &mut Recent,
    ) -> HttpResponse {
        let mut res = HttpResponse::new(StatusCode::TOO_MANY_REQUESTS);
        let body = if wants_problem_json(req) {
            let retry = match decision {
                Decision::Limited { retry_after, .. } => retry_after_secs(*retry_after),
                Decision::Allowed { .. } => 1,
            };
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            BoxBody::new(format!(
                "{{\"type\":\"about:blank\",\"title\":\"Too Many Requests\",\"status\":429,\
                 \"detail\":\"Rate limit exceeded; retry in {retry} s.\"}}\n"
            ))
        } else {
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            BoxBody::new(TOO_MANY_REQUESTS_TEXT)
        };
        self.headers.apply(decision, res.headers_mut(), recent);
        res.set_body(body)
    }
}

/// Whether the client prefers RFC 9457 problem details: its `Accept` names
/// `application/problem+json` or `application/json` with a non-zero weight.
fn wants_problem_json(req: &ServiceRequest) -> bool {
    req.headers().get_all(header::ACCEPT).any(|value| {
        value.to_str().is_ok_and(|accept| {
            accept.split(',').any(|range| {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                let json = media.eq_ignore_ascii_case("application/problem+json")
                    || media.eq_ignore_ascii_case("application/json");
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                json && !refused
            })
        })
    })
}

impl<S, B> Transform<S, ServiceRequest> for RateLimit
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = RateLimitService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        // Runs on each worker as it starts: the first call starts the
        // backend's background work (the Redis backend's probe thread);
        // each worker then opens its own connections on first use, so its
        // own event loop reads their answers.
        self.backend.start();
        ready(Ok(RateLimitService {
            service: Rc::new(service),
            worker: Rc::new(Worker {
                config: self.clone(),
                recent: RefCell::default(),
            }),
        }))
    }
}

/// The per-worker service built by [`RateLimit`].
pub struct RateLimitService<S> {
    service: Rc<S>,
    worker: Rc<Worker>,
}

/// One worker's copy of the configuration, and its header memo.
struct Worker {
    config: RateLimit,
    recent: RefCell<Recent>,
}

impl<S, B> Service<ServiceRequest> for RateLimitService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let worker = self.worker.clone();
        let service = self.service.clone();
        Box::pin(async move {
            let config = &worker.config;
            let key = match config.extractor.extract(&req) {
                Ok(key) => key,
                Err(err) => {
                    config.metrics.rejected.inc();
                    let res = ProxyError::from(err).error_response();
                    return Ok(refuse(req, res));
                }
            };
            let checks = [Check {
                limit: &config.limit,
                key: &key,
            }];
            let checked = match config.backend.try_check_all(&checks) {
                Some(checked) => checked,
                None => config.backend.check_all(&checks).await,
            }
            .map(|decisions| decisions[0]);
            let decision = match checked {
                Ok(decision) => {
                    // A decision from a backend that reports itself healthy
                    // (not one a cache made while it is down) ends an outage.
                    if config.outage.is_active() && config.backend.health() == Health::Up {
                        config.outage.recovered();
                    }
                    decision
                }
                Err(err) => return on_backend_error(config, req, &key, err, &service).await,
            };
            if let Decision::Limited { retry_after, .. } = decision {
                config.metrics.limited.inc();
                log::debug!("limited key={key} retry_after={retry_after:?}");
                let res =
                    config.too_many_requests(&req, &decision, &mut worker.recent.borrow_mut());
                return Ok(refuse(req, res));
            }
            config.metrics.allowed.inc();
            let mut res = service.call(req).await?;
            config.headers.apply(
                &decision,
                res.headers_mut(),
                &mut worker.recent.borrow_mut(),
            );
            Ok(res.map_into_left_body())
        })
    }
}

async fn on_backend_error<S, B>(
    config: &RateLimit,
    req: ServiceRequest,
    key: &RateKey,
    err: crate::limiter::BackendError,
    service: &S,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody,
{
    config.metrics.backend_errors.inc();
    match config.on_backend_error {
        FailurePolicy::Open => {
            config.outage.record("let through unlimited", &err);
            log::debug!(
                "{} backend failed, letting key={key} through: {err}",
                config.backend.kind()
            );
            Ok(service.call(req).await?.map_into_left_body())
        }
        FailurePolicy::Closed => {
            config.outage.record("answered 503", &err);
            log::debug!(
                "{} backend failed, refusing key={key}: {err}",
                config.backend.kind()
            );
            let res = ProxyError::LimiterUnavailable {
                retry_after: CLOSED_RETRY_AFTER,
            }
            .error_response();
            Ok(refuse(req, res))
        }
    }
}

/// The answer to a refused request. Nobody reads a refused request's body, so
/// when one was announced the connection closes once the answer is written:
/// a body that trickles or never ends cannot hold the connection, and no
/// unread body is left where the next request should start.
fn refuse<B>(req: ServiceRequest, mut res: HttpResponse) -> ServiceResponse<EitherBody<B>> {
    if announces_body(req.headers()) {
        res.head_mut().set_connection_type(ConnectionType::Close);
    }
    req.into_response(res).map_into_right_body()
}

/// Whether a request comes with a body: chunked (or any transfer coding), or
/// a `Content-Length` other than 0.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::MemoryBackend;
    use actix_web::{App, test as at, web};
    use std::num::NonZeroU32;

    fn limit(burst: u32) -> Limit {
        Limit::new(
            "default",
            "1/h".parse().unwrap(),
            NonZeroU32::new(burst).unwrap(),
        )
    }

    #[actix_web::test]
    async fn allows_the_burst_then_answers_429_with_headers() {
        let limit = limit(2);
        let backend = Arc::new(MemoryBackend::new(100));
        let app = at::init_service(
            App::new()
                .wrap(RateLimit::new(backend, limit))
                .route("/", web::get().to(HttpResponse::Ok)),
        )
        .await;
        let peer = "192.0.2.1:1000".parse().unwrap();
        for remaining in ["1", "0"] {
            let req = at::TestRequest::get().uri("/").peer_addr(peer).to_request();
            let res = at::call_service(&app, req).await;
            assert_eq!(res.status(), 200);
            let rl = res.headers().get("ratelimit").unwrap().to_str().unwrap();
            assert_eq!(
                rl,
                format!(
                    "\"default\";r={remaining};t={}",
                    if remaining == "1" { 3600 } else { 7200 }
                )
            );
        }
        let req = at::TestRequest::get().uri("/").peer_addr(peer).to_request();
        let res = at::call_service(&app, req).await;
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers().get("retry-after").unwrap(), "3600");
        assert_eq!(
            res.headers().get("ratelimit-policy").unwrap(),
            "\"default\";q=1;w=3600"
        );
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "text/plain; charset=utf-8"
        );
    }

    #[actix_web::test]
    async fn problem_json_when_accepted() {
        let limit = limit(1);
        let backend = Arc::new(MemoryBackend::new(100));
        let app = at::init_service(
            App::new()
                .wrap(RateLimit::new(backend, limit))
                .route("/", web::get().to(HttpResponse::Ok)),
        )
        .await;
        let peer = "192.0.2.1:1000".parse().unwrap();
        let req = || {
            at::TestRequest::get()
                .uri("/")
                .peer_addr(peer)
                .insert_header(("accept", "text/html;q=0.9, application/problem+json"))
                .to_request()
        };
        assert_eq!(at::call_service(&app, req()).await.status(), 200);
        let res = at::call_service(&app, req()).await;
        assert_eq!(res.status(), 429);
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        let body = at::read_body(res).await;
        let body = std::str::from_utf8(&body).unwrap();
        assert!(body.contains("\"status\":429"), "{body}");
        assert!(body.contains("\"title\":\"Too Many Requests\""), "{body}");
    }

    #[actix_web::test]
    async fn refusals_of_requests_with_a_body_close_the_connection() {
        let limit = limit(1);
        let backend = Arc::new(MemoryBackend::new(100));
        let app = at::init_service(
            App::new()
                .wrap(RateLimit::new(backend, limit))
                .default_service(web::to(HttpResponse::Ok)),
        )
        .await;
        let peer = "192.0.2.1:1000".parse().unwrap();
        let req = at::TestRequest::get().uri("/").peer_addr(peer).to_request();
        assert_eq!(at::call_service(&app, req).await.status(), 200);
        for (headers, closes) in [
            (&[][..], false),
            (&[("content-length", "0")][..], false),
            (&[("content-length", "5")][..], true),
            (&[("transfer-encoding", "chunked")][..], true),
        ] {
            let mut req = at::TestRequest::post().uri("/").peer_addr(peer);
            for &header in headers {
                req = req.insert_header(header);
            }
            let res = at::call_service(&app, req.to_request()).await;
            assert_eq!(res.status(), 429, "{headers:?}");
            let connection = res.response().head().connection_type();
            assert_eq!(
                connection == ConnectionType::Close,
                closes,
                "{headers:?}: {connection:?}"
            );
        }
    }

    #[test]
    fn accept_negotiation() {
        let with = |accept: &str| {
            let req = at::TestRequest::default()
                .insert_header(("accept", accept))
                .to_srv_request();
            wants_problem_json(&req)
        };
        assert!(with("application/json"));
        assert!(with("text/plain, Application/Problem+JSON;q=0.5"));
        assert!(!with("application/json;q=0"));
        assert!(!with("text/html, */*"));
        assert!(!with("application/jsonx"));
    }
}
