//! The rate-limit middleware: key → backend → `429` or the wrapped service.
//!
//! A request whose key cannot be derived is answered `400`; one the backend
//! cannot decide goes on or is answered `503`, as its [`FailurePolicy`] says.
//! One [`Transform`] serves every case. Every request gets a
//! [`Verdict`] in its extensions; the only code that writes rate-limit
//! headers is [`LimitHeaders::apply`], reading that verdict, for allowed and
//! limited responses alike, and every answer the gate makes itself comes
//! from [`respond`].

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use actix_web::Error;
use actix_web::HttpMessage;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use futures_util::future::{LocalBoxFuture, Ready, ready};

use crate::headers::{HeaderStyle, LimitHeaders, Recent};
use crate::key::{ClientIp, KeyExtractor};
use crate::limiter::{Backend, Check, Health, Limit, RateKey};
use crate::metrics::Metrics;
use crate::outage::OutageLog;
use crate::respond;
use crate::verdict::{DecidedBy, Outcome, Verdict};

/// What to do when the backend cannot decide (Redis down or slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Let the request through without a decision.
    #[default]
    Open,
    /// Answer `503 Service Unavailable` with `Retry-After`.
    Closed,
}

pub use crate::respond::CLOSED_RETRY_AFTER;

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
    rule_name: Arc<str>,
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
            headers: LimitHeaders::new(HeaderStyle::Ietf, std::slice::from_ref(&limit)),
            rule_name: Arc::from("default"),
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
        self.headers = LimitHeaders::new(style, std::slice::from_ref(&self.limit));
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
            let mut verdict = Verdict::new(config.rule_name.clone(), false);
            let key = match config.extractor.extract(&req) {
                Ok(key) => key,
                Err(err) => {
                    config.metrics.rejected.inc();
                    verdict.outcome = Outcome::BadKey;
                    req.extensions_mut().insert(verdict);
                    return Ok(respond::refuse(req, respond::bad_key(err)));
                }
            };
            let checks = [Check {
                limit: &config.limit,
                key: &key,
            }];
            let checked = match config.backend.try_check_all(&checks) {
                Some(checked) => checked,
                None => config.backend.check_all(&checks).await,
            };
            let decisions = match checked {
                Ok(decisions) => decisions,
                Err(err) => {
                    verdict.key = Some(key);
                    return on_backend_error(config, req, verdict, err, &service).await;
                }
            };
            // A decision from a backend that reports itself healthy (not one
            // a cache or the local fallback made while it is down) ends an
            // outage.
            let by = if config.backend.health() == Health::Up {
                if config.outage.is_active() {
                    config.outage.recovered();
                }
                DecidedBy::Backend
            } else {
                DecidedBy::Local
            };
            verdict.decided([&config.limit], &decisions, by);
            verdict.key = Some(key);
            if verdict.outcome == Outcome::Limited {
                config.metrics.limited.inc();
                log::debug!(
                    "limited rule={} key={} retry_after={:?}",
                    verdict.rule,
                    verdict.key.as_ref().expect("set above"),
                    verdict.retry_after()
                );
                let res = respond::too_many_requests(
                    &req,
                    &verdict,
                    &config.headers,
                    &mut worker.recent.borrow_mut(),
                );
                req.extensions_mut().insert(verdict);
                return Ok(respond::refuse(req, res));
            }
            config.metrics.allowed.inc();
            req.extensions_mut().insert(verdict);
            let mut res = service.call(req).await?;
            let (req, res_headers) = (res.request().clone(), res.headers_mut());
            if let Some(verdict) = req.extensions().get::<Verdict>() {
                config
                    .headers
                    .apply(verdict, res_headers, &mut worker.recent.borrow_mut());
            }
            Ok(res.map_into_left_body())
        })
    }
}

async fn on_backend_error<S, B>(
    config: &RateLimit,
    req: ServiceRequest,
    mut verdict: Verdict,
    err: crate::limiter::BackendError,
    service: &S,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody,
{
    config.metrics.backend_errors.inc();
    verdict.outcome = Outcome::Undecided;
    let key = verdict.key.clone().unwrap_or_else(RateKey::global);
    match config.on_backend_error {
        FailurePolicy::Open => {
            config.outage.record("let through unlimited", &err);
            log::debug!(
                "{} backend failed, letting key={key} through: {err}",
                config.backend.kind()
            );
            verdict.decided_by = DecidedBy::FailOpen;
            req.extensions_mut().insert(verdict);
            Ok(service.call(req).await?.map_into_left_body())
        }
        FailurePolicy::Closed => {
            config.outage.record("answered 503", &err);
            log::debug!(
                "{} backend failed, refusing key={key}: {err}",
                config.backend.kind()
            );
            verdict.decided_by = DecidedBy::FailClosed;
            req.extensions_mut().insert(verdict);
            Ok(respond::refuse(req, respond::limiter_unavailable()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::MemoryBackend;
    use actix_web::http::ConnectionType;
    use actix_web::{App, HttpResponse, test as at, web};
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
}
