//! The rate-limit middleware: rule → deny list → keys → backend → `429`,
//! `403` or the wrapped service.
//!
//! Per request: the rule set is read without a lock (it sits behind
//! [`ArcSwap`], so a reload swaps it whole while requests are in flight);
//! [`Rules::select`] picks the rule by method, normalised path and host; a
//! client network on the rule's or the global deny list is answered `403`
//! before any limiter state is touched; each distinct key spec of the rule
//! is extracted once (a bad key: `400`); the backend decides every limit at
//! once ([`Backend::check_all`], all-or-nothing); and the request is
//! forwarded or refused. One the backend cannot decide goes on or is answered
//! `503`, as its [`FailurePolicy`] says.
//!
//! Allowed networks and keys (`allow`, `allow_keys`) are never refused but
//! still counted: their requests are checked and charged like any other
//! (so a `global` limit sees the traffic the upstream gets from them), a
//! refusal is overridden (and so, all-or-nothing, that request is charged to
//! none of the rule's limits), a backend failure lets them through whatever
//! the failure policy, and they get no rate-limit headers, since no limit
//! applies to them. A shadow rule decides and
//! charges as usual; a would-be refusal is logged at info with the rule and
//! the key's fingerprint, counted (`decision="shadow_limited"`), and
//! forwarded; its clients see no rate-limit headers.
//!
//! One [`Transform`] serves every case. Every request gets a [`Verdict`] in
//! its extensions; the only code that writes rate-limit headers is
//! [`LimitHeaders::apply`], reading that verdict, and every answer the gate
//! makes itself comes from [`respond`].

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::Error;
use actix_web::HttpMessage;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header;
use arc_swap::ArcSwap;
use futures_util::future::{LocalBoxFuture, Ready, ready};
use smallvec::SmallVec;

use crate::headers::{HeaderStyle, LimitHeaders, Recent, retry_after_secs};
use crate::key::{ClientIp, DEFAULT_FINGERPRINT_SCOPE, Fingerprinter, KeyError, KeyExtractor};
use crate::limiter::{Backend, Check, Decisions, Limit, RateKey};
use crate::observe::Metrics;
use crate::observe::metrics::RuleMetrics;
use crate::outage::OutageLog;
use crate::policy::{KeySpec, Rule, Rules, client_addr};
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
/// `App`: clones share the backend and the rule set, so all workers count
/// together and a [`reload`](Self::reload) reaches every one.
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
///
/// Several rules: build a [`Rules`] value and use
/// [`from_rules`](Self::from_rules) (see `examples/rules_in_code.rs`).
#[derive(Clone)]
pub struct RateLimit {
    backend: Arc<dyn Backend>,
    /// The rule set in force: shared by every clone, swapped whole.
    gate: Arc<ArcSwap<Gate>>,
    style: HeaderStyle,
    ip: ClientIp,
    /// Replaces the key of every limit that counts its rule's key.
    extractor: Option<Arc<dyn KeyExtractor>>,
    fingerprints: Arc<Fingerprinter>,
    on_backend_error: FailurePolicy,
    metrics: Arc<Metrics>,
    /// Backend failures as outages: shared by every clone (worker).
    outage: Arc<OutageLog>,
}

/// A rule set ready to serve: the rules, and for each rule the parts that
/// never change per request (its header values, its distinct keys), built
/// once per reload.
pub struct Gate {
    rules: Arc<Rules>,
    /// One per rule in matching order, then the default rule's.
    compiled: Vec<Compiled>,
}

struct Compiled {
    headers: LimitHeaders,
    /// The rule's series, resolved once here rather than per request.
    metrics: RuleMetrics,
    /// Each distinct key the rule's limits count, once.
    sources: SmallVec<[Source; 2]>,
    /// Per limit (in the rule's order): its index in `sources`.
    source_of: SmallVec<[usize; 4]>,
}

#[derive(PartialEq)]
enum Source {
    /// The rule's own key (or the embedder's extractor, when one is set).
    Rule,
    /// A limit's own key.
    Spec(KeySpec),
}

impl Gate {
    /// Prepares `rules` with rate-limit headers of `style`, counting into
    /// `metrics`.
    pub fn new(rules: Rules, style: HeaderStyle, metrics: &Metrics) -> Self {
        let compiled = rules
            .rules()
            .chain([rules.default_rule()])
            .map(|rule| Compiled::new(rule, style, metrics))
            .collect();
        Gate {
            rules: Arc::new(rules),
            compiled,
        }
    }

    /// The rules.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The rule for a request and its compiled parts.
    fn select(&self, req: &ServiceRequest) -> (&Rule, &Compiled) {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok());
        let rule = self.rules.select(req.method(), req.path(), host);
        let index = self
            .rules
            .rules()
            .position(|r| std::ptr::eq(r, rule))
            .unwrap_or(self.compiled.len() - 1);
        (rule, &self.compiled[index])
    }
}

impl Compiled {
    fn new(rule: &Rule, style: HeaderStyle, metrics: &Metrics) -> Self {
        let limits: Vec<Limit> = rule.limits.iter().map(|l| l.limit.clone()).collect();
        let mut sources: SmallVec<[Source; 2]> = SmallVec::new();
        let mut source_of = SmallVec::new();
        for l in &rule.limits {
            let source = match &l.key {
                Some(spec) if *spec != rule.key => Source::Spec(spec.clone()),
                _ => Source::Rule,
            };
            let at = match sources.iter().position(|s| *s == source) {
                Some(at) => at,
                None => {
                    sources.push(source);
                    sources.len() - 1
                }
            };
            source_of.push(at);
        }
        Compiled {
            headers: LimitHeaders::new(style, &limits),
            metrics: metrics.rule(&rule.name, limits.iter().map(Limit::name)),
            sources,
            source_of,
        }
    }
}

impl RateLimit {
    /// One limit for every request, counted by client address (the TCP
    /// peer), with IETF headers, failing open if the backend errs.
    pub fn new(backend: Arc<dyn Backend>, limit: Limit) -> Self {
        let rules =
            Rules::single(crate::policy::Rule::new(crate::policy::DEFAULT_RULE).limit(limit))
                .expect("the default rule's name is valid");
        RateLimit::from_rules(backend, rules)
    }

    /// Enforces `rules`: each request gets the first rule that matches it,
    /// or the default rule.
    pub fn from_rules(backend: Arc<dyn Backend>, rules: Rules) -> Self {
        let style = HeaderStyle::Ietf;
        let metrics = Arc::<Metrics>::default();
        RateLimit {
            gate: Arc::new(ArcSwap::from_pointee(Gate::new(rules, style, &metrics))),
            style,
            outage: Arc::new(OutageLog::new(format!(
                "rate limiter ({} backend)",
                backend.kind()
            ))),
            backend,
            ip: ClientIp::new(),
            extractor: None,
            fingerprints: Arc::new(Fingerprinter::new(DEFAULT_FINGERPRINT_SCOPE)),
            on_backend_error: FailurePolicy::Open,
            metrics,
        }
    }

    /// Counts requests by `extractor` instead of each rule's own key
    /// (limits that name a key of their own, such as `global`, keep it).
    pub fn key(mut self, extractor: impl KeyExtractor) -> Self {
        self.extractor = Some(Arc::new(extractor));
        self
    }

    /// Resolves client addresses (for `ip` keys, `allow` and `deny`) with
    /// `ip`: its trusted proxies and IPv6 prefix.
    pub fn client_ip(mut self, ip: ClientIp) -> Self {
        self.ip = ip;
        self
    }

    /// Which rate-limit headers responses carry.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.style = style;
        self.recompile();
        self
    }

    /// A fresh rule set of the same rules, for a changed header style or
    /// metrics (clones made before keep the old one).
    fn recompile(&mut self) {
        let rules = Rules::clone(self.gate.load().rules());
        self.gate = Arc::new(ArcSwap::from_pointee(Gate::new(
            rules,
            self.style,
            &self.metrics,
        )));
    }

    /// Shows keys in logs as fingerprints made by `fingerprints` (floodgate
    /// passes the one its Redis key names use).
    pub fn fingerprints(mut self, fingerprints: Fingerprinter) -> Self {
        self.fingerprints = Arc::new(fingerprints);
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

    /// Counts decisions into `metrics` (shared with `/metrics`): each
    /// request once, by rule, decision and how it was decided, the refusing
    /// limit, and the backend's decision time.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self.recompile();
        self
    }

    /// How client addresses are resolved (the admin API reads an `ip` key
    /// part the same way: IPv6 grouped by the prefix).
    pub fn client_ip_resolver(&self) -> &ClientIp {
        &self.ip
    }

    /// Whether an embedder's [`key`](Self::key) extractor replaces the
    /// rules' own keys (the admin API cannot then tell what a key is).
    pub fn has_custom_key(&self) -> bool {
        self.extractor.is_some()
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.gate.load().rules().clone()
    }

    /// Replaces the rules for every clone (worker) at once. Requests in
    /// flight finish under the rules they started with; limits whose name
    /// and algorithm are unchanged keep their counters (backends key state
    /// by [`Limit::id`]).
    pub fn reload(&self, rules: Rules) {
        self.gate
            .store(Arc::new(Gate::new(rules, self.style, &self.metrics)));
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
                gate: RefCell::new(Rc::new(self.gate.load_full())),
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
    /// The rule set this worker last saw: requests hold it by this `Rc`,
    /// so holding it costs no write to the count every worker shares (the
    /// extra allocation is made once per reload, not per request).
    #[allow(clippy::redundant_allocation)]
    gate: RefCell<Rc<Arc<Gate>>>,
    recent: RefCell<Recent>,
}

impl Worker {
    /// The rule set in force, held for a whole request: a reload meanwhile
    /// does not change the rule it is decided and answered by.
    #[allow(clippy::redundant_allocation)]
    fn gate(&self) -> Rc<Arc<Gate>> {
        let current = self.config.gate.load();
        let mut cached = self.gate.borrow_mut();
        if !Arc::ptr_eq(&current, &cached) {
            *cached = Rc::new(arc_swap::Guard::into_inner(current));
        }
        Rc::clone(&cached)
    }
}

/// The keys of one request, one per [`Source`] of its rule.
struct Keys {
    keys: SmallVec<[RateKey; 2]>,
    /// The values of header key parts (what `allow_keys` is compared with).
    header_values: SmallVec<[header::HeaderValue; 1]>,
}

impl RateLimit {
    /// The keys of `req`, its client address `addr` already resolved.
    fn extract(
        &self,
        req: &ServiceRequest,
        addr: Option<IpAddr>,
        rule: &Rule,
        c: &Compiled,
    ) -> Result<Keys, KeyError> {
        let mut keys = Keys {
            keys: SmallVec::new(),
            header_values: SmallVec::new(),
        };
        for source in &c.sources {
            let spec = match source {
                Source::Rule => match &self.extractor {
                    Some(extractor) => {
                        keys.keys.push(extractor.extract(req)?);
                        continue;
                    }
                    None => &rule.key,
                },
                Source::Spec(spec) => spec,
            };
            let found = spec.extract_at(req, addr, &self.ip)?;
            keys.keys.push(found.key);
            keys.header_values.extend(found.header_values);
        }
        Ok(keys)
    }
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
            let gate = worker.gate();
            let (rule, compiled) = gate.select(&req);
            let global = gate.rules.global();
            let mut verdict = Verdict::new(rule.name.clone(), rule.is_shadow(global));

            let addr = client_addr(&req, &config.ip);
            verdict.client = addr;
            if addr.is_some_and(|a| rule.is_denied(a, global)) {
                log::debug!("denied rule={} addr={addr:?}", rule.name);
                verdict.outcome = Outcome::Denied;
                compiled.metrics.record(&verdict);
                let res = respond::denied(&req);
                req.extensions_mut().insert(verdict);
                return Ok(respond::refuse(req, res));
            }
            let keys = match config.extract(&req, addr, rule, compiled) {
                Ok(keys) => keys,
                Err(err) => {
                    verdict.outcome = Outcome::BadKey;
                    compiled.metrics.record(&verdict);
                    req.extensions_mut().insert(verdict);
                    return Ok(respond::refuse(req, respond::bad_key(err)));
                }
            };
            let exempt = rule.is_allowed(addr, &keys.header_values, global);
            verdict.key = keys.keys.first().cloned();
            if rule.limits.is_empty() {
                // Never limited: nothing to ask.
                verdict.outcome = if exempt {
                    Outcome::Exempt
                } else {
                    Outcome::Allowed
                };
                compiled.metrics.record(&verdict);
                req.extensions_mut().insert(verdict);
                return Ok(service.call(req).await?.map_into_left_body());
            }

            let checks: SmallVec<[Check<'_>; 4]> = rule
                .limits
                .iter()
                .zip(&compiled.source_of)
                .map(|(l, &source)| Check {
                    limit: &l.limit,
                    key: &keys.keys[source],
                })
                .collect();
            let asked = Instant::now();
            let checked = match config.backend.try_check_all(&checks) {
                Some(checked) => checked,
                None => config.backend.check_all(&checks).await,
            };
            config.metrics.decided_in(asked.elapsed());
            let decisions: Decisions = match checked {
                Ok(decisions) => decisions,
                Err(err) if exempt => {
                    // Never refused, whatever the failure policy says.
                    config.metrics.backend_error();
                    config.outage.record("let through (allow list)", &err);
                    verdict.outcome = Outcome::Exempt;
                    verdict.decided_by = DecidedBy::FailOpen;
                    compiled.metrics.record(&verdict);
                    req.extensions_mut().insert(verdict);
                    return Ok(service.call(req).await?.map_into_left_body());
                }
                Err(err) => {
                    return on_backend_error(config, compiled, req, verdict, err, &service).await;
                }
            };
            // A decision from a backend that reports itself healthy (not one
            // a cache or the local fallback made while it is down) ends an
            // outage.
            let by = if config.backend.is_up() {
                if config.outage.is_active() {
                    config.outage.recovered();
                }
                DecidedBy::Backend
            } else {
                DecidedBy::Local
            };
            verdict.decided(rule.limits.iter().map(|l| &l.limit), &decisions, by);
            drop(checks);
            if exempt {
                verdict.outcome = Outcome::Exempt;
            }
            compiled.metrics.record(&verdict);
            match verdict.outcome {
                Outcome::Limited => {
                    log::debug!(
                        "limited rule={} key={} retry_after={:?}",
                        verdict.rule,
                        verdict
                            .key_fingerprint(&config.fingerprints)
                            .unwrap_or_default(),
                        verdict.retry_after()
                    );
                    let res = respond::too_many_requests(
                        &req,
                        &verdict,
                        &compiled.headers,
                        &mut worker.recent.borrow_mut(),
                    );
                    req.extensions_mut().insert(verdict);
                    return Ok(respond::refuse(req, res));
                }
                Outcome::ShadowLimited => {
                    log::info!(
                        "shadow: rule={} limit={} would refuse key={} retry_after={}s",
                        verdict.rule,
                        verdict.refusing().map_or("", |l| l.limit.name()),
                        verdict
                            .key_fingerprint(&config.fingerprints)
                            .unwrap_or_default(),
                        verdict.retry_after().map_or(1, retry_after_secs)
                    );
                }
                _ => {}
            }
            let apply_headers = verdict.outcome == Outcome::Allowed && !verdict.shadow;
            req.extensions_mut().insert(verdict);
            let mut res = service.call(req).await?;
            if apply_headers {
                let (req, res_headers) = (res.request().clone(), res.headers_mut());
                if let Some(verdict) = req.extensions().get::<Verdict>() {
                    compiled
                        .headers
                        .apply(verdict, res_headers, &mut worker.recent.borrow_mut());
                }
            }
            Ok(res.map_into_left_body())
        })
    }
}

async fn on_backend_error<S, B>(
    config: &RateLimit,
    compiled: &Compiled,
    req: ServiceRequest,
    mut verdict: Verdict,
    err: crate::limiter::BackendError,
    service: &S,
) -> Result<ServiceResponse<EitherBody<B>>, Error>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error>,
    B: MessageBody,
{
    config.metrics.backend_error();
    verdict.outcome = Outcome::Undecided;
    // As the access log and Redis show it: a header key only as its
    // fingerprint.
    let key = || {
        verdict
            .key_fingerprint(&config.fingerprints)
            .unwrap_or_default()
    };
    match config.on_backend_error {
        FailurePolicy::Open => {
            config.outage.record("let through unlimited", &err);
            log::debug!(
                "{} backend failed, letting key={} through: {err}",
                config.backend.kind(),
                key()
            );
            verdict.decided_by = DecidedBy::FailOpen;
            compiled.metrics.record(&verdict);
            req.extensions_mut().insert(verdict);
            Ok(service.call(req).await?.map_into_left_body())
        }
        FailurePolicy::Closed => {
            config.outage.record("answered 503", &err);
            log::debug!(
                "{} backend failed, refusing key={}: {err}",
                config.backend.kind(),
                key()
            );
            verdict.decided_by = DecidedBy::FailClosed;
            compiled.metrics.record(&verdict);
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

    #[actix_web::test]
    async fn the_verdict_is_in_the_request_extensions() {
        use actix_web::{HttpMessage, HttpRequest};
        let backend = Arc::new(MemoryBackend::new(100));
        let app = at::init_service(
            App::new()
                .wrap(RateLimit::new(backend, limit(5)))
                .default_service(web::to(|req: HttpRequest| async move {
                    let ext = req.extensions();
                    let verdict = ext.get::<Verdict>().expect("a verdict");
                    HttpResponse::Ok().body(format!(
                        "{} {:?} {:?} {}",
                        verdict.rule,
                        verdict.outcome,
                        verdict.decided_by,
                        verdict.tightest().unwrap().decision.remaining()
                    ))
                })),
        )
        .await;
        let req = at::TestRequest::get()
            .uri("/")
            .peer_addr("192.0.2.1:1000".parse().unwrap())
            .to_request();
        let res = at::call_service(&app, req).await;
        assert_eq!(at::read_body(res).await, "default Allowed Backend 4");
    }

    /// A key for tests: the `x-tenant` header, or 400.
    struct Tenant;

    impl KeyExtractor for Tenant {
        fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
            req.headers()
                .get("x-tenant")
                .map(|v| RateKey::bytes(v.as_bytes().to_vec()))
                .ok_or(KeyError::NoPeerAddress)
        }
    }

    #[actix_web::test]
    async fn a_custom_key_replaces_the_rules_key_but_not_a_limits_own() {
        use crate::policy::{KeySpec, Rule, Rules};
        let rule = Rule::new("default").limit(limit(1)).limit_by(
            Limit::new("all", "1/h".parse().unwrap(), NonZeroU32::new(3).unwrap()),
            KeySpec::global(),
        );
        let rules = Rules::single(rule).unwrap();
        let backend = Arc::new(MemoryBackend::new(100));
        let app = at::init_service(
            App::new()
                .wrap(RateLimit::from_rules(backend, rules).key(Tenant))
                .default_service(web::to(HttpResponse::Ok)),
        )
        .await;
        let peer = "192.0.2.1:1000".parse().unwrap();
        let get = |tenant: &'static str| {
            at::TestRequest::get()
                .uri("/")
                .peer_addr(peer)
                .insert_header(("x-tenant", tenant))
                .to_request()
        };
        assert_eq!(at::call_service(&app, get("a")).await.status(), 200);
        assert_eq!(at::call_service(&app, get("a")).await.status(), 429);
        assert_eq!(at::call_service(&app, get("b")).await.status(), 200);
        assert_eq!(at::call_service(&app, get("c")).await.status(), 200);
        let res = at::call_service(&app, get("d")).await;
        assert_eq!(res.status(), 429, "one global budget of 3");
        assert_eq!(
            res.headers().get("ratelimit-policy").unwrap(),
            "\"default\";q=1;w=3600, \"all\";q=1;w=3600"
        );
        let no_tenant = at::TestRequest::get().uri("/").peer_addr(peer).to_request();
        assert_eq!(at::call_service(&app, no_tenant).await.status(), 400);
    }

    #[actix_web::test]
    async fn a_reload_reaches_every_clone_and_keeps_unchanged_counters() {
        use crate::policy::{Rule, Rules};
        let backend = Arc::new(MemoryBackend::new(100));
        let rate_limit = RateLimit::new(backend, limit(2));
        let app = at::init_service(
            App::new()
                .wrap(rate_limit.clone())
                .default_service(web::to(HttpResponse::Ok)),
        )
        .await;
        let peer = "192.0.2.1:1000".parse().unwrap();
        let get = || at::TestRequest::get().uri("/").peer_addr(peer).to_request();
        assert_eq!(at::call_service(&app, get()).await.status(), 200);
        // The same limit, and a rule without limits in front of it for /free.
        let free = Rule::new("free").matching(crate::policy::Match::any().path("/free"));
        rate_limit.reload(Rules::new(vec![free], Rule::new("default").limit(limit(2))).unwrap());
        assert_eq!(rate_limit.rules().rules().count(), 1);
        assert_eq!(at::call_service(&app, get()).await.status(), 200);
        assert_eq!(
            at::call_service(&app, get()).await.status(),
            429,
            "no fresh burst"
        );
        for _ in 0..3 {
            let req = at::TestRequest::get()
                .uri("/free/x")
                .peer_addr(peer)
                .to_request();
            let res = at::call_service(&app, req).await;
            assert_eq!(res.status(), 200, "no limits: never limited");
            assert!(res.headers().get("ratelimit").is_none());
        }
    }
}
