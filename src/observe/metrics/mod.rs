//! What `/metrics` on the admin listener serves: OpenMetrics text, encoded
//! by prometheus-client.
//!
//! Recording is on the request path, so it must cost next to nothing: the
//! counts live in [`cells`] (per-thread rows, no lock, no lookup), and a
//! rule's series are resolved to their cells once per rule set, when the
//! middleware compiles its rules ([`Metrics::rule`]), never per request.
//! prometheus-client does the encoding at scrape time, through a
//! [`Collector`] that reads the cells, so the exposition format is the
//! crate's, never written by hand.
//!
//! Labels hold rule names, limit names, decisions and other words of
//! floodgate's own, never a client key or address: keys are secrets and
//! addresses are unbounded. Series of a rule that a reload removed keep
//! their last values until the process ends (counters never go back).
//!
//! Refusals are traffic, not events: they are counted here and logged only
//! at `debug`.

pub mod cells;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use smallvec::SmallVec;

use self::cells::{Cells, Counter, Histogram};
use crate::limiter::{Backend, CircuitState, Health};
use crate::verdict::{DecidedBy, Outcome, Verdict};

/// Metric names, one constant each: the family names prometheus-client
/// registers. The exposition adds the suffixes OpenMetrics asks for:
/// `_total` to counters, `_seconds` (the unit) to the histograms, `_info`
/// to build info.
pub mod names {
    /// Client requests by rule, decision and how it was decided.
    pub const REQUESTS: &str = "floodgate_requests";
    /// Refusals by rule and the limit that refused.
    pub const LIMIT_REFUSALS: &str = "floodgate_limit_refusals";
    /// Rate-limit checks the backend could not answer.
    pub const BACKEND_ERRORS: &str = "floodgate_backend_errors";
    /// Upstream answers by status class.
    pub const UPSTREAM_RESPONSES: &str = "floodgate_upstream_responses";
    /// Requests the upstream did not answer (fully), by kind.
    pub const UPSTREAM_ERRORS: &str = "floodgate_upstream_errors";
    /// From a request reaching floodgate to its response head, every answer.
    pub const REQUEST_DURATION: &str = "floodgate_request_duration";
    /// From sending the request to the upstream to its answer's head.
    pub const UPSTREAM_DURATION: &str = "floodgate_upstream_duration";
    /// One request's limits decided by the backend (a Redis round trip
    /// included).
    pub const DECISION_DURATION: &str = "floodgate_backend_decision_duration";
    /// The backend's health as `/readyz` sees it (a state set).
    pub const BACKEND_HEALTH: &str = "floodgate_backend_health";
    /// The Redis circuit breaker's state (a state set).
    pub const REDIS_CIRCUIT: &str = "floodgate_redis_circuit";
    /// Times the Redis connections were replaced.
    pub const REDIS_RECONNECTS: &str = "floodgate_redis_reconnects";
    /// Keys whose limiter state this process holds in memory.
    pub const KEYS: &str = "floodgate_backend_keys";
    /// Rule reloads by result.
    pub const RULES_RELOADS: &str = "floodgate_rules_reloads";
    /// Whether the last reload (or the startup load) took effect.
    pub const RULES_LAST_RELOAD_SUCCESS: &str = "floodgate_rules_last_reload_success";
    /// The running version.
    pub const BUILD: &str = "floodgate_build";
    /// Access-log lines dropped because stdout did not keep up.
    pub const ACCESS_LOG_DROPPED: &str = "floodgate_access_log_dropped";
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// === label values ===

/// `decision` label values, indexed by [`decision`].
const DECISIONS: [&str; 7] = [
    "allowed",
    "limited",
    "shadow_limited",
    "allow_listed",
    "denied",
    "bad_key",
    "undecided",
];

/// `decided_by` label values, indexed by [`decided_by`].
const DECIDED_BY: [&str; 5] = ["backend", "local", "fail_open", "fail_closed", "none"];

/// One rule's request counts: one per (decision, decided_by).
const REQUEST_CELLS: usize = DECISIONS.len() * DECIDED_BY.len();

fn decision(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Allowed => 0,
        Outcome::Limited => 1,
        Outcome::ShadowLimited => 2,
        Outcome::Exempt => 3,
        Outcome::Denied => 4,
        Outcome::BadKey => 5,
        Outcome::Undecided => 6,
    }
}

fn decided_by(by: DecidedBy) -> usize {
    match by {
        DecidedBy::Backend => 0,
        DecidedBy::Local => 1,
        DecidedBy::FailOpen => 2,
        DecidedBy::FailClosed => 3,
        DecidedBy::NotAsked => 4,
    }
}

/// The (decision, decided_by) pairs the middleware can produce: exported
/// from the start, zero or not, so a rate over them never starts from a
/// missing series. Any other pair is exported once it is counted.
const EXPECTED: [(Outcome, DecidedBy); 15] = [
    (Outcome::Allowed, DecidedBy::Backend),
    (Outcome::Allowed, DecidedBy::Local),
    (Outcome::Allowed, DecidedBy::NotAsked),
    (Outcome::Limited, DecidedBy::Backend),
    (Outcome::Limited, DecidedBy::Local),
    (Outcome::ShadowLimited, DecidedBy::Backend),
    (Outcome::ShadowLimited, DecidedBy::Local),
    (Outcome::Exempt, DecidedBy::Backend),
    (Outcome::Exempt, DecidedBy::Local),
    (Outcome::Exempt, DecidedBy::FailOpen),
    (Outcome::Exempt, DecidedBy::NotAsked),
    (Outcome::Denied, DecidedBy::NotAsked),
    (Outcome::BadKey, DecidedBy::NotAsked),
    (Outcome::Undecided, DecidedBy::FailOpen),
    (Outcome::Undecided, DecidedBy::FailClosed),
];

/// `decision` values of [`names::LIMIT_REFUSALS`]: a refusal that was
/// answered `429`, or one a shadow rule only logged.
const REFUSALS: [&str; 2] = ["limited", "shadow_limited"];

/// Why the upstream did not answer a request in full
/// ([`names::UPSTREAM_ERRORS`]'s `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// The connection was refused (nothing listening): `502`.
    Refused,
    /// Any other failure to connect (unreachable, …): `502`.
    Connect,
    /// The upstream reset the connection before its answer's head: `502`.
    Reset,
    /// It closed the connection without answering: `502`.
    Closed,
    /// No answer head in time, or no body bytes for the timeout mid-body
    /// (`FLOODGATE_UPSTREAM_TIMEOUT`): `504`, or a cut answer.
    Timeout,
    /// The answer broke HTTP/1.1 framing: `502`.
    Protocol,
    /// The answer's body ended early, after its head went out (closed,
    /// reset or malformed mid-body): the client's connection is closed
    /// before the body is complete.
    Truncated,
    /// Any other I/O failure talking to the upstream.
    Other,
}

impl UpstreamError {
    const ALL: [UpstreamError; 8] = [
        UpstreamError::Refused,
        UpstreamError::Connect,
        UpstreamError::Reset,
        UpstreamError::Closed,
        UpstreamError::Timeout,
        UpstreamError::Protocol,
        UpstreamError::Truncated,
        UpstreamError::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamError::Refused => "refused",
            UpstreamError::Connect => "connect",
            UpstreamError::Reset => "reset",
            UpstreamError::Closed => "closed",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Protocol => "protocol",
            UpstreamError::Truncated => "truncated",
            UpstreamError::Other => "other",
        }
    }
}

/// `class` values of [`names::UPSTREAM_RESPONSES`].
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

// === Metrics ===

/// One limit's refusals: `limited`, `shadow_limited`.
type LimitCells = Arc<Cells<2>>;

/// Refusal counts by (rule, limit).
type LimitTable = BTreeMap<(Arc<str>, Arc<str>), LimitCells>;

/// Every metric floodgate keeps. Build one, share it (`Arc`) with each part
/// that records (the middleware, the forwarder, the Redis backend, the
/// [`Observe`](super::Observe) middleware) and with the admin listener.
pub struct Metrics {
    rules: Mutex<BTreeMap<Arc<str>, Arc<Cells<REQUEST_CELLS>>>>,
    limits: Mutex<LimitTable>,
    backend_errors: Counter,
    upstream_responses: Cells<5>,
    upstream_errors: Cells<8>,
    request_duration: Histogram,
    upstream_duration: Histogram,
    decision_duration: Histogram,
    /// Reloads: ok, refused.
    reloads: Cells<2>,
    last_reload_ok: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rules: Mutex::default(),
            limits: Mutex::default(),
            backend_errors: Counter::default(),
            upstream_responses: Cells::default(),
            upstream_errors: Cells::default(),
            request_duration: Histogram::default(),
            upstream_duration: Histogram::default(),
            decision_duration: Histogram::default(),
            reloads: Cells::default(),
            // The startup load took effect, or floodgate would not run.
            last_reload_ok: AtomicBool::new(true),
        }
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("backend_errors", &self.backend_errors.total())
            .finish_non_exhaustive()
    }
}

/// One rule's series, resolved once per rule set (see [`Metrics::rule`]):
/// recording a request is an index into cells, no lookup.
#[derive(Clone)]
pub struct RuleMetrics {
    requests: Arc<Cells<REQUEST_CELLS>>,
    /// Per limit, in the rule's order.
    refusals: SmallVec<[LimitCells; 4]>,
}

impl RuleMetrics {
    /// Counts one request the gate decided: its decision, how it was made
    /// and, for a refusal (`429` or shadow), the limit that refused.
    #[inline]
    pub fn record(&self, verdict: &Verdict) {
        self.requests
            .inc(decision(verdict.outcome) * DECIDED_BY.len() + decided_by(verdict.decided_by));
        let shadow = match verdict.outcome {
            Outcome::Limited => 0,
            Outcome::ShadowLimited => 1,
            _ => return,
        };
        if let Some(cells) = verdict.refused_by.and_then(|i| self.refusals.get(i)) {
            cells.inc(shadow);
        }
    }
}

impl Metrics {
    /// The series of the rule called `name` with limits named `limits` (in
    /// its order). The same names give the same series across reloads, so
    /// a reloaded rule keeps counting where it was. Runs when the rules are
    /// compiled, never per request.
    pub fn rule<'a>(
        &self,
        name: &Arc<str>,
        limits: impl IntoIterator<Item = &'a str>,
    ) -> RuleMetrics {
        let requests = lock(&self.rules).entry(name.clone()).or_default().clone();
        let mut table = lock(&self.limits);
        let refusals = limits
            .into_iter()
            .map(|limit| {
                table
                    .entry((name.clone(), Arc::from(limit)))
                    .or_default()
                    .clone()
            })
            .collect();
        RuleMetrics { requests, refusals }
    }

    /// One request's limits were decided by the backend in `elapsed`
    /// (or it failed after that long).
    #[inline]
    pub fn decided_in(&self, elapsed: Duration) {
        self.decision_duration.observe(elapsed);
    }

    /// The backend could not decide one request (whatever the failure
    /// policy then did).
    #[inline]
    pub fn backend_error(&self) {
        self.backend_errors.inc_one();
    }

    /// Upstream failures so far, by kind, as
    /// [`names::UPSTREAM_ERRORS`] reports them (for the status page).
    pub fn upstream_errors(&self) -> impl Iterator<Item = (UpstreamError, u64)> + '_ {
        UpstreamError::ALL
            .into_iter()
            .enumerate()
            .map(|(i, kind)| (kind, self.upstream_errors.get(i)))
    }

    /// The upstream failed one request this way.
    #[inline]
    pub fn upstream_error(&self, kind: UpstreamError) {
        self.upstream_errors.inc(kind as usize);
    }

    /// A reload of the rules took effect (`ok`) or was refused.
    pub fn reloaded(&self, ok: bool) {
        self.reloads.inc(usize::from(!ok));
        self.last_reload_ok.store(ok, Ordering::Relaxed);
    }

    /// Records one answered request (see [`Observe`](super::Observe)): its
    /// end-to-end time, and the upstream's answer if it was forwarded.
    /// Decisions are counted by the middleware, where they are made, so an
    /// embedder using only `RateLimit` still gets them.
    #[inline]
    pub fn answered(&self, exchange: &super::Exchange<'_>) {
        self.request_duration.observe(exchange.elapsed);
        if let Some(upstream) = exchange.upstream {
            self.upstream_duration.observe(upstream.first_byte);
            let class = usize::from(exchange.status.as_u16() / 100).clamp(1, 5) - 1;
            self.upstream_responses.inc(class);
        }
    }

    /// The OpenMetrics text of every metric; `backend` (when given) adds
    /// what is read from it at scrape time: health, circuit, keys.
    pub fn render(self: &Arc<Self>, backend: Option<Arc<dyn Backend>>) -> String {
        self.render_with(backend, None)
    }

    /// As [`render`](Self::render), adding the lines `access_log` dropped
    /// (when there is an access log).
    pub fn render_with(
        self: &Arc<Self>,
        backend: Option<Arc<dyn Backend>>,
        access_log: Option<&super::AccessLog>,
    ) -> String {
        let mut registry = Registry::default();
        registry.register(
            names::BUILD,
            "The running floodgate's version.",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            backend,
            access_log_dropped: access_log.map(super::AccessLog::dropped),
        }));
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// === scrape ===

/// Reads the cells (and the backend) once per scrape and hands the values
/// to prometheus-client's encoder.
struct Scrape {
    metrics: Arc<Metrics>,
    backend: Option<Arc<dyn Backend>>,
    access_log_dropped: Option<u64>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

/// Encodes one counter series.
fn counter(
    family: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: u64,
) -> fmt::Result {
    ConstCounter::new(value).encode(family.encode_family(&labels)?)
}

/// Encodes one gauge series.
fn gauge(
    family: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: i64,
) -> fmt::Result {
    ConstGauge::new(value).encode(family.encode_family(&labels)?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &*self.metrics;

        let rules: Vec<_> = lock(&m.rules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut family = encoder.encode_descriptor(
            names::REQUESTS,
            "Client requests by rule, decision and how the decision was made.",
            None,
            MetricType::Counter,
        )?;
        for (rule, cells) in &rules {
            for (d, decision_label) in DECISIONS.iter().enumerate() {
                for (b, by_label) in DECIDED_BY.iter().enumerate() {
                    let value = cells.get(d * DECIDED_BY.len() + b);
                    let expected = EXPECTED
                        .iter()
                        .any(|&(o, by)| decision(o) == d && decided_by(by) == b);
                    if value > 0 || expected {
                        let labels = [
                            ("rule", &**rule),
                            ("decision", *decision_label),
                            ("decided_by", *by_label),
                        ];
                        counter(&mut family, &labels, value)?;
                    }
                }
            }
        }

        let limits: Vec<_> = lock(&m.limits)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut family = encoder.encode_descriptor(
            names::LIMIT_REFUSALS,
            "Requests a limit refused, by rule and limit: answered 429 (limited) or only logged \
             by a shadow rule (shadow_limited).",
            None,
            MetricType::Counter,
        )?;
        for ((rule, limit), cells) in &limits {
            for (i, decision_label) in REFUSALS.iter().enumerate() {
                let labels = [
                    ("rule", &**rule),
                    ("limit", &**limit),
                    ("decision", *decision_label),
                ];
                counter(&mut family, &labels, cells.get(i))?;
            }
        }

        let family = encoder.encode_descriptor(
            names::BACKEND_ERRORS,
            "Rate-limit checks the backend could not answer (the failure policy decided).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(m.backend_errors.total()).encode(family)?;

        let mut family = encoder.encode_descriptor(
            names::UPSTREAM_RESPONSES,
            "Answers the upstream sent, by status class.",
            None,
            MetricType::Counter,
        )?;
        for (i, class) in CLASSES.iter().enumerate() {
            counter(
                &mut family,
                &[("class", class)],
                m.upstream_responses.get(i),
            )?;
        }

        let mut family = encoder.encode_descriptor(
            names::UPSTREAM_ERRORS,
            "Requests the upstream did not answer in full, by kind.",
            None,
            MetricType::Counter,
        )?;
        for kind in UpstreamError::ALL {
            let value = m.upstream_errors.get(kind as usize);
            counter(&mut family, &[("kind", kind.label())], value)?;
        }

        for (name, help, histogram) in [
            (
                names::REQUEST_DURATION,
                "Time from a request reaching floodgate to its response head, for every answer \
                 (403, 429 and 503 included).",
                &m.request_duration,
            ),
            (
                names::UPSTREAM_DURATION,
                "Time from sending a request to the upstream to its answer's head (time to \
                 first byte).",
                &m.upstream_duration,
            ),
            (
                names::DECISION_DURATION,
                "Time the backend took to decide one request's limits (a Redis round trip \
                 included).",
                &m.decision_duration,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            let s = histogram.snapshot();
            family.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)?;
        }

        let mut family = encoder.encode_descriptor(
            names::RULES_RELOADS,
            "Reloads of the rules (SIGHUP), by result: ok (took effect) or refused (the old \
             rules stayed).",
            None,
            MetricType::Counter,
        )?;
        counter(&mut family, &[("result", "ok")], m.reloads.get(0))?;
        counter(&mut family, &[("result", "refused")], m.reloads.get(1))?;

        let family = encoder.encode_descriptor(
            names::RULES_LAST_RELOAD_SUCCESS,
            "1 if the last reload (or the startup load) took effect, 0 if it was refused.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(m.last_reload_ok.load(Ordering::Relaxed))).encode(family)?;

        if let Some(dropped) = self.access_log_dropped {
            let family = encoder.encode_descriptor(
                names::ACCESS_LOG_DROPPED,
                "Access-log lines dropped because stdout did not keep up (or could not be \
                 written).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(dropped).encode(family)?;
        }

        if let Some(backend) = &self.backend {
            encode_backend(&mut encoder, &**backend)?;
        }
        Ok(())
    }
}

/// What is read from the backend at scrape time.
fn encode_backend(encoder: &mut DescriptorEncoder<'_>, backend: &dyn Backend) -> fmt::Result {
    let kind = backend.kind();
    let health = match backend.health() {
        Health::Up => "up",
        Health::Degraded(_) => "degraded",
        Health::Down(_) => "down",
    };
    let mut family = encoder.encode_descriptor(
        names::BACKEND_HEALTH,
        "The backend's health as /readyz reports it: 1 for the state it is in (up: deciding as \
         configured; degraded: the failure policy decides, ready; down: not ready).",
        None,
        MetricType::Gauge,
    )?;
    for state in ["up", "degraded", "down"] {
        let labels = [("backend", kind), ("state", state)];
        gauge(&mut family, &labels, i64::from(state == health))?;
    }

    let stats = backend.stats();
    if let Some(keys) = stats.keys {
        let family = encoder.encode_descriptor(
            names::KEYS,
            "Keys whose limiter state this process holds in memory (for Redis: the local \
             fallback's table).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(keys).unwrap_or(i64::MAX)).encode(family)?;
    }
    if let Some(circuit) = stats.circuit {
        let mut family = encoder.encode_descriptor(
            names::REDIS_CIRCUIT,
            "The Redis circuit breaker: 1 for its state (closed: Redis is asked; open: Redis \
             stopped answering and the failure policy decides; connecting: not connected yet).",
            None,
            MetricType::Gauge,
        )?;
        for (state, label) in [
            (CircuitState::Connecting, "connecting"),
            (CircuitState::Closed, "closed"),
            (CircuitState::Open, "open"),
        ] {
            gauge(
                &mut family,
                &[("state", label)],
                i64::from(state == circuit),
            )?;
        }
    }
    if let Some(reconnects) = stats.reconnects {
        let family = encoder.encode_descriptor(
            names::REDIS_RECONNECTS,
            "Times floodgate replaced its Redis connections: Redis fell silent, or came back \
             after an outage.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(reconnects).encode(family)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
