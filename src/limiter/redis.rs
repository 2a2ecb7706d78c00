//! Limiter state in Redis, shared by every floodgate replica that uses it.
//!
//! A request is decided by one atomic Lua script ([`DECIDE_SCRIPT`]) over
//! all of its limits at once: it is charged to every one of them if each
//! allows it, else to none (as the memory backend decides). The script is
//! the [`algorithm`](super::algorithm) module line for line, for GCRA and
//! both windows, with Redis's own `TIME` as the clock, so replicas with
//! skewed clocks still agree. It runs through `EVALSHA`, reloaded
//! automatically after `NOSCRIPT` (`redis::Script`), over one multiplexed
//! connection (a `ConnectionManager`, or a cluster connection) per worker,
//! which that worker's event loop drives, so concurrent decisions are
//! pipelined and no answer waits for another thread. The script answers the
//! states it decided on, and this module runs the same `Counter` arithmetic
//! on them to report remaining cells and retry times, so Redis and memory
//! report alike.
//!
//! Keys are `<prefix>{<client key>}:<limit>` for GCRA (as before there were
//! several algorithms) and `<prefix>{<client key>}.fw:<limit>` /
//! `.sw:<limit>` for a fixed / sliding window, the client key being
//! [`RateKey::stable_id`] (an address in clear, an API key only as its
//! fingerprint keyed by the prefix). The character after the braces tells
//! the algorithm whatever the limit's name, so a limit that changes
//! algorithm never reads the other's state. The braces are a Redis Cluster
//! hash tag, so every limit of one client lands in one slot. Each key lives
//! only until its state is indistinguishable from none (`PX` = its
//! `expires` − now), so Redis memory stays bounded by active clients.
//!
//! # Redis Cluster: limits whose keys are in different slots
//!
//! A script can only touch keys of one slot, and a request's limits need not
//! share one: a limit with its own `key = "global"` is `{g}`, the rule's
//! other limit `{ip:…}`. Such a request is decided slot group by slot group,
//! in ascending slot order, each group atomically; if a group refuses, the
//! groups already charged are refunded by [`REFUND_SCRIPT`] (one cell back
//! per entry, never more than was taken) and the groups after it are only
//! looked at, not charged. So a refused request is charged to none of its
//! limits once its answer is out, a limit never admits more than it allows,
//! and the fixed order means two such requests racing for the last cells
//! cannot both refuse each other for good. What is not atomic: between a
//! group's charge and its refund (one round trip), a concurrent request may
//! see the charge and be refused, and a refund Redis never receives (a
//! timeout) leaves the charge in place as if the request had been admitted
//! for that limit. Refusals are cached at most [`CLUSTER_BLOCKED_MAX`] on a
//! Cluster, for that reason. Requests whose keys share a slot (one key for
//! all limits, as without `key` overrides) are one atomic script, exactly as
//! on one Redis.
//!
//! When Redis is slow or down, each decision gives up after `timeout` and
//! the failure policy decides that decision: this replica's own in-memory
//! limiter (`local`, see the `fallback` module), or an error that the
//! middleware turns into "allow" (`open`) or 503 (`closed`). Only when Redis
//! answers nothing for a while does a circuit breaker stop asking it (the
//! `circuit` module defines when it opens and closes). One warning marks the
//! start of an outage and one its end. Each worker decides on a connection of
//! its own, read by its own event loop; the probe and the charge-back run on
//! a thread of their own (the `io` module).
//!
//! A Redis that refuses floodgate's credentials (`WRONGPASS`, `NOAUTH`, or
//! `NOPERM` for an ACL user that may not run the script) is not an outage but
//! a configuration error: it is logged once at `error` naming the cause, and
//! `/readyz` answers 503 with it whatever the failure policy, so a rollout
//! with the wrong password stops at its first replica. floodgate does not
//! exit: the failure policy decides meanwhile, and the probe keeps asking,
//! so fixing the password or the ACL on the Redis side heals it.
//!
//! Refusals are cached locally until their retry time: a (limit, key) Redis
//! has just refused cannot be charged before then on any replica (no replica
//! can take a cell, so its state cannot move), so a request any of whose
//! limits is cached as refused is refused here, exactly (nothing could be
//! charged anyway), at no round trip. Its other limits report what this
//! replica last heard from Redis for them under `local`, a fresh key's
//! budget otherwise (they are not charged either way).
//!
//! A reset (the admin API's `DELETE /limits/…`, [`Backend::reset`]) deletes
//! the key's Redis keys and forgets what this replica holds of it (cached
//! refusal, last known state, admissions owed), then announces itself on the
//! `<prefix>reset` channel: every replica subscribed there (one Redis; a
//! Cluster caches refusals at most [`CLUSTER_BLOCKED_MAX`]) drops its cached
//! refusals, so none keeps refusing a key that was just given a fresh
//! budget. Other replicas' `local` fallback tables keep what they last knew
//! of the key until it expires: they decide only while Redis is down.

mod circuit;
mod fallback;
mod io;
mod scripts;

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    ServerErrorKind, Value,
};

use smallvec::SmallVec;

use self::circuit::{Circuit, State};
use self::fallback::{Charge, Local};
use self::scripts::{CHARGE_SCRIPT, Params};
pub use self::scripts::{DECIDE_SCRIPT, REFUND_SCRIPT};
use super::algorithm::State as KeyState;
use super::{
    Algorithm, Backend, BackendError, BackendStats, Check, CircuitState, Decision, Decisions,
    Forgotten, Health, KeyStateError, Limit, MAX_STABLE_ID, MemoryBackend, RateKey,
};
use crate::key::Fingerprinter;
use crate::observe::Metrics;
use crate::settings::redact_url;

/// How often the probe tries again when Redis refuses or drops the
/// connection (a probe Redis does not answer waits for its answer instead).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Probes Redis left unanswered after which the connection is replaced
/// (about a second).
const RECONNECT_AFTER: u32 = 4;

/// Keys charged back in one script call at most.
const CHARGE_BATCH: usize = 128;

/// Refusals remembered locally at most (per process); beyond it, refusals
/// are simply not cached.
const BLOCKED_CAP: usize = 100_000;

/// The longest a refusal is cached on a Redis Cluster, where it may come
/// from another request's short-lived charge across slots (see the module
/// docs).
pub const CLUSTER_BLOCKED_MAX: Duration = Duration::from_secs(1);

/// Where the shared state is.
#[derive(Clone)]
pub enum RedisTarget {
    /// One Redis: `redis://[user:password@]host:port/db` or `rediss://…`.
    Single(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
}

/// What decides while Redis cannot (`FLOODGATE_REDIS_FAILURE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This replica's own in-memory limiter, with the same limits.
    Local,
    /// Return the error; the middleware lets the request through
    /// ([`FailurePolicy::Open`](crate::FailurePolicy::Open)). Still ready.
    Open,
    /// Return the error; the middleware answers 503
    /// ([`FailurePolicy::Closed`](crate::FailurePolicy::Closed)). Not ready.
    Closed,
}

/// Limiter state in Redis. Build it once and share it; [`Backend::start`]
/// opens the connection.
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    target: RedisTarget,
    /// The Redis thread's connection (the probe's and the charge-back's, and
    /// decisions' until their worker has its own). Replaced by the probe
    /// when Redis stays silent on it (see `ping`).
    conn: RwLock<Option<Conn>>,
    /// Bumped when the probe replaces the connection: workers then replace
    /// theirs too.
    generation: AtomicU64,
    /// Times `generation` was bumped (`/metrics`).
    reconnects: AtomicU64,
    /// Calls whose batch gave up waiting and that have not ended yet: their
    /// late answers are counted before charging back.
    abandoned: AtomicUsize,
    script: redis::Script,
    refund_script: redis::Script,
    charge_script: redis::Script,
    prefix: String,
    /// Keyed by the prefix: replicas sharing one agree (see `redis_key`).
    fingerprints: Fingerprinter,
    timeout: Duration,
    /// What Redis last answered per (limit, key), under every policy (for
    /// the limits of a request refused from the cache); under `local` also
    /// the fallback that decides while Redis cannot, and what it owes.
    local: Local,
    fallback: Fallback,
    circuit: Circuit,
    blocked: Blocked,
    /// [`Backend::start`] ran: the Redis thread runs and the connection is
    /// (being) opened on it.
    started: AtomicBool,
    io: OnceLock<io::Io>,
    metrics: Option<Arc<Metrics>>,
}

/// One check of a request in the script's units: its key in Redis and its
/// limit.
#[derive(Clone)]
struct Entry {
    key: Vec<u8>,
    params: Params,
}

/// A request's checks grouped by Redis Cluster slot, in ascending slot
/// order: indices into the request's checks (one group on one Redis).
type Groups = SmallVec<[SmallVec<[usize; 4]>; 2]>;

/// Whether two checks count the same (limit, key).
fn same(a: &Check<'_>, b: &Check<'_>) -> bool {
    a.limit.id() == b.limit.id() && a.key == b.key
}

/// The state entry `i` of a request had before the request: the state the
/// first entry for the same (limit, key) was decided on.
fn before(checks: &[Check<'_>], held: &[Option<KeyState>], i: usize) -> Option<KeyState> {
    let first = (0..i).find(|&j| same(&checks[j], &checks[i])).unwrap_or(i);
    held[first]
}

impl RedisBackend {
    /// State in `target`, under keys starting with `prefix`;
    /// each decision waits at most `timeout`. Validates the URLs; does not
    /// connect.
    pub fn new(
        target: RedisTarget,
        prefix: impl Into<String>,
        timeout: Duration,
        fallback: Fallback,
        max_keys: usize,
    ) -> Result<Self, RedisError> {
        match &target {
            RedisTarget::Single(url) => {
                redis::Client::open(url.as_str())?;
            }
            RedisTarget::Cluster(nodes) => {
                redis::cluster::ClusterClient::new(nodes.iter().map(String::as_str))?;
            }
        }
        let prefix = prefix.into();
        let fingerprints = Fingerprinter::new(prefix.as_bytes());
        // Keyed as Redis names keys, so an admin reset by fingerprint finds
        // this replica's local state too.
        let local = Local::new(MemoryBackend::new(max_keys).fingerprints(fingerprints.clone()));
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                target,
                conn: RwLock::new(None),
                generation: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
                abandoned: AtomicUsize::new(0),
                script: redis::Script::new(DECIDE_SCRIPT),
                refund_script: redis::Script::new(REFUND_SCRIPT),
                charge_script: redis::Script::new(CHARGE_SCRIPT),
                fingerprints,
                prefix,
                timeout,
                local,
                fallback,
                circuit: Circuit::default(),
                blocked: Blocked::default(),
                started: AtomicBool::new(false),
                io: OnceLock::new(),
                metrics: None,
            }),
        })
    }

    /// Counts decisions the local fallback made into `metrics`
    /// (`floodgate_backend_errors_total`; the middleware counts them by
    /// rule as `decided_by="local"`).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = Some(metrics);
        }
        self
    }

    /// The Redis key for `key` under `limit`.
    pub fn redis_key(&self, limit: &Limit, key: &RateKey) -> Vec<u8> {
        self.inner.redis_key(limit, key)
    }

    /// The decision for one request (see [`Backend::check_all`]).
    async fn decide(&self, checks: &[Check<'_>]) -> Result<Decisions, BackendError> {
        let inner = &self.inner;
        if checks.is_empty() {
            return Ok(Decisions::new());
        }
        if let Some(decisions) = inner.blocked_answer(checks) {
            return Ok(decisions);
        }
        if inner.circuit.state() != State::Up {
            let down = BackendError::Unavailable("redis is down".into());
            return inner.fallback(checks, down);
        }
        let entries: SmallVec<[Entry; 4]> = checks.iter().map(|c| inner.entry(c)).collect();
        let groups = inner.groups(&entries);
        if groups.len() == 1 {
            return match batch::decide(inner, entries, true).await {
                Ok(answer) => Ok(inner.report(checks, &answer)),
                // The batch told the circuit; this decision alone gets the policy.
                Err(failure) => inner.fallback(checks, failure.error),
            };
        }
        self.decide_across_slots(checks, &entries, &groups).await
    }

    /// A request whose keys are in several Cluster slots: slot group after
    /// slot group, refunding the charged ones if a later one refuses (see
    /// the module docs).
    async fn decide_across_slots(
        &self,
        checks: &[Check<'_>],
        entries: &[Entry],
        groups: &Groups,
    ) -> Result<Decisions, BackendError> {
        let inner = &self.inner;
        let subset = |idx: &[usize]| -> (SmallVec<[Check<'_>; 4]>, SmallVec<[Entry; 4]>) {
            (
                idx.iter().map(|&i| checks[i]).collect(),
                idx.iter().map(|&i| entries[i].clone()).collect(),
            )
        };
        let mut decisions: Decisions = checks
            .iter()
            .map(|c| c.limit.counter().peek(None, 0))
            .collect();
        let mut charged: SmallVec<[(usize, batch::Answer); 2]> = SmallVec::new();
        let mut refused = None;
        for (g, idx) in groups.iter().enumerate() {
            let (group_checks, group_entries) = subset(idx);
            match batch::decide(inner, group_entries, true).await {
                Ok(answer) => {
                    let answered = inner.report(&group_checks, &answer);
                    for (&i, d) in idx.iter().zip(answered) {
                        decisions[i] = d;
                    }
                    if !answer.charged {
                        refused = Some(g);
                        break;
                    }
                    charged.push((g, answer));
                }
                Err(failure) => {
                    batch::refund(inner, checks, entries, groups, &charged).await;
                    return inner.fallback(checks, failure.error);
                }
            }
        }
        let Some(refused) = refused else {
            return Ok(decisions);
        };
        batch::refund(inner, checks, entries, groups, &charged).await;
        // Charged to none: the charged groups report what they had before.
        for (g, answer) in &charged {
            let (group_checks, _) = subset(&groups[*g]);
            for (j, &i) in groups[*g].iter().enumerate() {
                let held = before(&group_checks, &answer.held, j);
                decisions[i] = checks[i].limit.counter().peek(held, answer.t0);
            }
        }
        // The groups after the refusal are only looked at.
        let later = &groups[refused + 1..];
        let looks = later.iter().map(|idx| {
            let (_, group_entries) = subset(idx);
            batch::decide(inner, group_entries, false)
        });
        let answers = futures_util::future::join_all(looks).await;
        for (idx, answer) in later.iter().zip(answers) {
            let (group_checks, _) = subset(idx);
            match answer {
                Ok(answer) => {
                    let answered = inner.report(&group_checks, &answer);
                    for (&i, d) in idx.iter().zip(answered) {
                        decisions[i] = d;
                    }
                }
                Err(_) => {
                    for &i in idx.iter() {
                        decisions[i] = inner.unknown(&checks[i]);
                    }
                }
            }
        }
        Ok(decisions)
    }

    /// What each check's key has left, read from Redis on its clock without
    /// charging (see [`Backend::inspect`]): the decision script in its
    /// "only look" mode, one call per Cluster slot group.
    async fn look(&self, checks: &[Check<'_>]) -> Result<Decisions, KeyStateError> {
        let inner = &self.inner;
        let entries: SmallVec<[Entry; 4]> = checks.iter().map(|c| inner.entry(c)).collect();
        let mut decisions: Decisions = checks
            .iter()
            .map(|c| c.limit.counter().peek(None, 0))
            .collect();
        for idx in inner.groups(&entries) {
            let group = idx.iter().map(|&i| entries[i].clone()).collect();
            let answer = batch::decide(inner, group, false)
                .await
                .map_err(|failure| failure.error)?;
            for (j, &i) in idx.iter().enumerate() {
                decisions[i] = checks[i].limit.counter().peek(answer.held[j], answer.t0);
            }
        }
        Ok(decisions)
    }

    /// Forgets each check's state in Redis and on this replica (see
    /// [`Backend::reset`]): this replica's copies first (its cached
    /// refusals, its `local` fallback's last known state, the admissions it
    /// owes Redis), then one `DEL` per Redis key, so a key of any Cluster
    /// slot is deleted on its own node.
    async fn forget(&self, checks: &[Check<'_>]) -> Result<Forgotten, KeyStateError> {
        let inner = &self.inner;
        let keys: SmallVec<[Vec<u8>; 4]> = checks
            .iter()
            .map(|c| inner.redis_key(c.limit, c.key))
            .collect();
        for (check, key) in checks.iter().zip(&keys) {
            if check.key.is_fingerprint_only() {
                // The cache is keyed by the value, which a fingerprint does
                // not lead to: forget every refusal (each asks Redis again).
                inner.blocked.clear();
            } else {
                inner.blocked.forget(check.limit, check.key);
            }
            // The local table names keys as Redis does: by value or by
            // fingerprint, it finds them.
            inner.local.forget(check.limit, check.key);
            inner.local.forgive(key);
        }
        let Some(conn) = inner.connection() else {
            return Err(BackendError::Unavailable("not connected to redis".into()).into());
        };
        let patience = inner.patience();
        let deletes = keys.iter().map(|key| {
            let mut conn = conn.clone();
            let mut cmd = redis::cmd("DEL");
            cmd.arg(key);
            async move {
                match actix_web::rt::time::timeout(patience, cmd.query_async::<i64>(&mut conn))
                    .await
                {
                    Ok(Ok(n)) => Ok(n > 0),
                    Ok(Err(err)) => Err(BackendError::Unavailable(err.to_string())),
                    Err(_) => Err(BackendError::Timeout(patience)),
                }
            }
        });
        let deleted = futures_util::future::join_all(deletes).await;
        let forgotten = deleted.into_iter().collect::<Result<Forgotten, _>>()?;
        if let RedisTarget::Single(_) = inner.target {
            // Other replicas may hold a refusal of this key in their cache.
            let mut conn = conn.clone();
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(inner.reset_channel()).arg(keys.len());
            match actix_web::rt::time::timeout(patience, cmd.query_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => log::warn!("reset: telling other replicas failed: {err}"),
                Err(_) => log::warn!("reset: telling other replicas got no answer in {patience:?}"),
            }
        }
        Ok(forgotten)
    }

    /// Whether the circuit is closed (Redis answering).
    pub fn is_up(&self) -> bool {
        self.inner.circuit.state() == State::Up
    }
}

#[async_trait(?Send)]
impl Backend for RedisBackend {
    async fn check_all(&self, checks: &[Check<'_>]) -> Result<Decisions, BackendError> {
        self.decide(checks).await
    }

    fn try_check_all(&self, checks: &[Check<'_>]) -> Option<Result<Decisions, BackendError>> {
        self.inner.blocked_answer(checks).map(Ok)
    }

    async fn inspect(&self, checks: &[Check<'_>]) -> Result<Decisions, KeyStateError> {
        self.look(checks).await
    }

    async fn reset(&self, checks: &[Check<'_>]) -> Result<Forgotten, KeyStateError> {
        self.forget(checks).await
    }

    fn start(&self) {
        // Each worker opens its own connection now, not on its first
        // decision (which would wait for it, or take the shared one).
        if actix_web::rt::System::try_current().is_some() {
            batch::warm(&self.inner);
        }
        if !self.inner.started.swap(true, Ordering::AcqRel) {
            match io::Io::start() {
                Ok(io) => {
                    let _ = self.inner.io.set(io);
                    Inner::probe(&self.inner);
                    Inner::listen_for_resets(&self.inner);
                }
                Err(err) => log::error!(
                    "cannot start the redis thread ({err}); {} from now on",
                    self.inner.policy()
                ),
            }
        }
    }

    fn retain_recent(&self) {
        self.inner.blocked.retain_recent();
        self.inner.local.retain_recent();
    }

    fn health(&self) -> Health {
        let state = self.inner.circuit.state();
        if state == State::Up {
            return Health::Up;
        }
        if let Some(cause) = self.inner.circuit.refused() {
            return Health::Down(format!(
                "redis refuses floodgate: {cause}; {} until it accepts",
                self.inner.policy()
            ));
        }
        let note = format!("redis {state}; {} until it answers", self.inner.policy());
        match self.inner.fallback {
            Fallback::Local | Fallback::Open => Health::Degraded(note),
            Fallback::Closed => Health::Down(note),
        }
    }

    fn is_up(&self) -> bool {
        RedisBackend::is_up(self)
    }

    fn stats(&self) -> BackendStats {
        let inner = &self.inner;
        BackendStats {
            keys: Some(inner.local.keys() as u64),
            circuit: Some(match inner.circuit.state() {
                State::Connecting => CircuitState::Connecting,
                State::Up => CircuitState::Closed,
                State::Down => CircuitState::Open,
            }),
            reconnects: Some(inner.reconnects.load(Ordering::Relaxed)),
        }
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

impl Inner {
    /// `<prefix>{<stable id>}:<limit>` (GCRA), `<prefix>{<stable
    /// id>}.fw:<limit>` and `.sw:<limit>` (the windows): an API key only
    /// ever appears as its fingerprint, and the part a client controls is at
    /// most [`MAX_STABLE_ID`] bytes.
    fn redis_key(&self, limit: &Limit, key: &RateKey) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.prefix.len() + limit.name().len() + MAX_STABLE_ID + 6);
        out.extend_from_slice(self.prefix.as_bytes());
        out.push(b'{');
        key.write_stable_id(&self.fingerprints, &mut out);
        out.extend_from_slice(match limit.algorithm() {
            Algorithm::Gcra => b"}:",
            Algorithm::FixedWindow => b"}.fw:",
            Algorithm::SlidingWindow => b"}.sw:",
        });
        out.extend_from_slice(limit.name().as_bytes());
        out
    }

    fn entry(&self, check: &Check<'_>) -> Entry {
        Entry {
            key: self.redis_key(check.limit, check.key),
            params: Params::of(&check.limit.counter()),
        }
    }

    /// The request's entries by Cluster slot, ascending (one group on one
    /// Redis).
    fn groups(&self, entries: &[Entry]) -> Groups {
        let mut groups = Groups::new();
        match self.target {
            RedisTarget::Single(_) => groups.push((0..entries.len()).collect()),
            RedisTarget::Cluster(_) => {
                let mut slots: SmallVec<[(u16, usize); 4]> = entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (batch::cluster_slot(&e.key), i))
                    .collect();
                slots.sort_unstable();
                let mut last = None;
                for (slot, i) in slots {
                    if last != Some(slot) {
                        groups.push(SmallVec::new());
                        last = Some(slot);
                    }
                    groups.last_mut().expect("pushed").push(i);
                }
            }
        }
        groups
    }

    /// The decisions Redis's answer for `checks` (one slot group) means, by
    /// the same arithmetic the memory backend runs; remembers refusals and,
    /// under `local`, the states Redis left.
    fn report(&self, checks: &[Check<'_>], answer: &batch::Answer) -> Decisions {
        let t0 = answer.t0;
        let mut decisions = Decisions::new();
        for (i, check) in checks.iter().enumerate() {
            let counter = check.limit.counter();
            let held = answer.held[i];
            let step = counter.step(held, t0);
            let first = (0..i).all(|j| !same(&checks[j], check));
            let decision = if answer.charged {
                self.local
                    .seen(check.limit, check.key, step.next.or(held), t0);
                match step.decision {
                    allowed @ Decision::Allowed { .. } => allowed,
                    // Redis charged it; its arithmetic and this one agree,
                    // so this is not reached.
                    Decision::Limited { reset_after, .. } => Decision::Allowed {
                        remaining: 0,
                        reset_after,
                    },
                }
            } else {
                let held = before(checks, &answer.held, i);
                if first {
                    self.local.seen(check.limit, check.key, held, t0);
                }
                match step.decision {
                    // Charged to none: what the key has without this request.
                    Decision::Allowed { .. } => counter.peek(held, t0),
                    limited @ Decision::Limited {
                        retry_after,
                        reset_after,
                    } => {
                        // Only a state Redis holds (not one an earlier entry
                        // of this request would have made) says when.
                        if first {
                            self.blocked.insert(
                                check.limit,
                                check.key,
                                Refusal {
                                    cached_until: answer.sent_at + self.blocked_for(retry_after),
                                    retry_at: answer.sent_at + retry_after,
                                    reset_at: answer.sent_at + reset_after,
                                },
                            );
                        }
                        limited
                    }
                }
            };
            decisions.push(decision);
        }
        decisions
    }

    /// How long a refusal with this retry time is cached.
    fn blocked_for(&self, retry_after: Duration) -> Duration {
        match self.target {
            RedisTarget::Single(_) => retry_after,
            RedisTarget::Cluster(_) => retry_after.min(CLUSTER_BLOCKED_MAX),
        }
    }

    /// A request refused locally because one of its checks is a cached
    /// refusal; `None` if none is.
    fn blocked_answer(&self, checks: &[Check<'_>]) -> Option<Decisions> {
        if self.blocked.is_empty() {
            return None;
        }
        let cached: SmallVec<[Option<Decision>; 4]> = checks
            .iter()
            .map(|c| self.blocked.get(c.limit, c.key))
            .collect();
        if cached.iter().all(Option::is_none) {
            return None;
        }
        Some(
            checks
                .iter()
                .zip(cached)
                .map(|(c, d)| d.unwrap_or_else(|| self.unknown(c)))
                .collect(),
        )
    }

    /// What to report for a check Redis was not asked about: the last
    /// known state under `local`, else a fresh key's budget.
    fn unknown(&self, check: &Check<'_>) -> Decision {
        match self.local.peek(check.limit, check.key) {
            // A refusal is Redis's to say.
            Decision::Limited { reset_after, .. } => Decision::Allowed {
                remaining: 0,
                reset_after,
            },
            allowed => allowed,
        }
    }

    fn fallback(&self, checks: &[Check<'_>], err: BackendError) -> Result<Decisions, BackendError> {
        match self.fallback {
            Fallback::Local => {
                // Under `open` and `closed` the middleware counts the error.
                if let Some(metrics) = &self.metrics {
                    metrics.backend_error();
                }
                Ok(self
                    .local
                    .decide(checks, |c| self.redis_key(c.limit, c.key)))
            }
            Fallback::Open | Fallback::Closed => Err(err),
        }
    }

    /// A decision's batch got no answer: a failing run begins (or goes on)
    /// and the probe watches it.
    fn failed(self: &Arc<Self>) {
        self.circuit.failed();
        Inner::probe(self);
    }

    /// The channel resets are announced on: `<prefix>reset`.
    fn reset_channel(&self) -> String {
        format!("{}reset", self.prefix)
    }

    /// Subscribes, on the Redis thread, to the resets any replica announces
    /// ([`RedisBackend::reset`] publishes one after its `DEL`s), and
    /// forgets every cached refusal on each: a refusal this replica cached
    /// for a key another replica has just reset would otherwise refuse that
    /// key until its retry time (hours, for a daily window). The cache is
    /// keyed by a hash of the key's value, which the announcement does not
    /// carry, so it is cleared whole; each refused key then asks Redis once.
    /// It is cleared on every (re)subscription too, for the resets missed
    /// while not listening. One Redis only: on a Cluster refusals are cached
    /// at most [`CLUSTER_BLOCKED_MAX`] anyway. The task holds the backend
    /// weakly, so it ends with it.
    fn listen_for_resets(self: &Arc<Self>) {
        let (RedisTarget::Single(url), Some(io)) = (&self.target, self.io.get()) else {
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(self);
        let url = url.clone();
        let channel = self.reset_channel();
        io.spawn(async move {
            use futures_util::StreamExt as _;
            loop {
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, RedisError>(pubsub)
                };
                match subscribed.await {
                    Ok(pubsub) => {
                        let mut messages = pubsub.into_on_message();
                        let Some(inner) = weak.upgrade() else { return };
                        inner.blocked.clear();
                        drop(inner);
                        while messages.next().await.is_some() {
                            let Some(inner) = weak.upgrade() else { return };
                            inner.blocked.clear();
                        }
                    }
                    Err(err) => log::debug!("subscribing to resets: {err}"),
                }
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(PROBE_INTERVAL * 10).await;
            }
        });
    }

    /// Every connection is replaced: the probe's now, each worker's on its
    /// next decision.
    fn reconnected(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens the circuit, logging once.
    fn open(&self, reason: &str) {
        if self.circuit.set(State::Down) == State::Up {
            log::warn!(
                "redis unavailable ({reason}); {} until it answers again",
                self.policy()
            );
            *self
                .circuit
                .down_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    /// How long one probe waits for its answer while the circuit is open.
    fn patience(&self) -> Duration {
        self.timeout.max(Duration::from_millis(200))
    }

    fn policy(&self) -> &'static str {
        match self.fallback {
            Fallback::Local => "limiting with this replica's own memory",
            Fallback::Open => "letting requests through unlimited",
            Fallback::Closed => "refusing requests with 503",
        }
    }

    /// Starts the probe on the Redis thread unless one runs (see
    /// [`circuit`]): connect if needed, then run the script on a probe key
    /// until Redis answers. While a failing run goes on and the circuit is
    /// still closed, it opens the circuit once the run has lasted
    /// [`circuit::open_after`] without an answer; open, it asks again at
    /// once after a silent probe and every [`PROBE_INTERVAL`] after a refused
    /// connection. After [`RECONNECT_AFTER`] silent probes the connection is
    /// replaced: one Redis stopped answering on (a silent network drop, a
    /// failover) may otherwise never fail outright. Its first answer charges
    /// back what this replica admitted locally, then closes the circuit.
    fn probe(self: &Arc<Self>) {
        if self.circuit.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(io) = self.io.get() else {
            self.circuit.probing.store(false, Ordering::Release);
            return;
        };
        // Weak: a probe never keeps a dropped backend (and its thread) alive.
        let weak = Arc::downgrade(self);
        io.spawn(async move {
            let mut silent = 0;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let state = inner.circuit.state();
                let open_at = match state {
                    State::Up => inner
                        .circuit
                        .failing_since()
                        .map(|since| since + circuit::open_after(inner.timeout)),
                    State::Connecting | State::Down => None,
                };
                let patience = match open_at {
                    Some(at) => at.saturating_duration_since(Instant::now()),
                    None => inner.patience(),
                };
                let started = Instant::now();
                let result = if patience.is_zero() {
                    Err(Probe::Failed(BackendError::Timeout(circuit::open_after(
                        inner.timeout,
                    ))))
                } else {
                    inner.ping(patience).await
                };
                let err = match result {
                    Ok(()) => return inner.recovered().await,
                    Err(err) => err,
                };
                let refused = started.elapsed() < patience;
                // Wrong credentials are a configuration error, said once.
                let misconfigured = matches!(err, Probe::Refused(..));
                if let Probe::Refused(cause, redis_err) = &err
                    && inner.circuit.refuse(cause)
                {
                    log::error!(
                        "redis refuses floodgate: {cause} ({}); {} until it accepts, and \
                         /readyz answers 503",
                        redact_url(&redis_err.to_string()),
                        inner.policy()
                    );
                }
                match state {
                    State::Up => {
                        inner.circuit.failed();
                        if open_at.is_some_and(|at| Instant::now() >= at) {
                            let reason = format!(
                                "no answer for {:?}; last: {err}",
                                circuit::open_after(inner.timeout)
                            );
                            inner.open(&reason);
                        }
                    }
                    State::Connecting => {
                        if inner.circuit.set(State::Down) == State::Connecting {
                            if !misconfigured {
                                log::warn!(
                                    "redis unavailable at startup ({err}); {} until it answers",
                                    inner.policy()
                                );
                            }
                            *inner
                                .circuit
                                .down_since
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                        }
                    }
                    State::Down => {
                        if !refused {
                            silent += 1;
                            if silent % RECONNECT_AFTER == 0 {
                                inner.conn.write().unwrap_or_else(|e| e.into_inner()).take();
                                inner.reconnected();
                            }
                        }
                    }
                }
                if refused {
                    // Not before the run is due to open the circuit.
                    let pause = match open_at {
                        Some(at) => {
                            PROBE_INTERVAL.min(at.saturating_duration_since(Instant::now()))
                        }
                        None => PROBE_INTERVAL,
                    };
                    drop(inner);
                    tokio::time::sleep(pause).await;
                }
            }
        });
    }

    /// Redis answered the probe: charge back, close the circuit, log.
    async fn recovered(self: Arc<Self>) {
        self.charge_back().await;
        // Probing ends before the circuit closes: a failure in between then
        // starts a new probe instead of finding this one still running.
        self.circuit.probing.store(false, Ordering::Release);
        self.circuit.accept();
        let before = self.circuit.set(State::Up);
        self.circuit.answered();
        if before == State::Down {
            // Workers' connections may have failed with the outage (the
            // manager gives up reconnecting): they open new ones, and decide
            // on the probe's connection, which just answered, meanwhile.
            self.reconnected();
        }
        let since = self
            .circuit
            .down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (before, since) {
            (State::Connecting, _) => log::info!("connected to {}", self.target_name()),
            // A failing run that never opened the circuit: nothing changed.
            (State::Up, _) => {}
            (_, Some(since)) => log::warn!(
                "redis answering again after {:.1?}; limits are shared again",
                since.elapsed()
            ),
            _ => log::warn!("redis answering again; limits are shared again"),
        }
    }

    /// Adds what this replica admitted without Redis to the keys in Redis,
    /// one script call per [`CHARGE_BATCH`] keys (per cluster slot); what
    /// cannot be sent is kept for the next answer.
    async fn charge_back(&self) {
        let local = &self.local;
        if !local.owes() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        // Late answers Redis sent before the probe's may still be on their
        // way to their workers: what they took is not to be charged again.
        let waiting = Instant::now();
        while self.abandoned.load(Ordering::Acquire) > 0 && waiting.elapsed() < self.patience() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut charges = local.drain();
        if let RedisTarget::Cluster(_) = self.target {
            charges.sort_by_key(|c| batch::cluster_slot(&c.key));
        }
        let cells: u64 = charges.iter().map(|c| c.n).sum();
        let keys = charges.len();
        let mut rest = charges.into_iter().peekable();
        while rest.peek().is_some() {
            let mut group: Vec<Charge> = Vec::new();
            while let Some(next) = rest.peek() {
                let joins = group.first().is_none_or(|first| match self.target {
                    RedisTarget::Single(_) => true,
                    RedisTarget::Cluster(_) => {
                        batch::cluster_slot(&first.key) == batch::cluster_slot(&next.key)
                    }
                });
                if !joins || group.len() == CHARGE_BATCH {
                    break;
                }
                group.extend(rest.next());
            }
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.charge_script.get_hash()).arg(group.len());
            for c in &group {
                cmd.arg(&c.key);
            }
            for c in &group {
                let age = u64::try_from(c.first.elapsed().as_micros()).unwrap_or(u64::MAX);
                cmd.arg(c.params.code)
                    .arg(c.params.p)
                    .arg(c.params.q)
                    .arg(c.n)
                    .arg(age);
            }
            let sent = tokio::time::timeout(
                self.patience(),
                Self::eval::<i64>(&self.charge_script, &mut conn, &cmd),
            )
            .await;
            if !matches!(sent, Ok(Ok(_))) {
                log::warn!("could not charge back admissions made without redis; kept for later");
                group.extend(rest);
                local.restore(group);
                return;
            }
        }
        log::info!("charged {cells} admissions made without redis to {keys} keys in redis");
    }

    /// The current connection, if any.
    fn connection(&self) -> Option<Conn> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connects if needed, then makes one real decision on a probe key: the
    /// script runs and writes, so a replica demoted to read-only, or a Redis
    /// without the script loaded, is found here and not by traffic.
    async fn ping(&self, patience: Duration) -> Result<(), Probe> {
        let mut conn = match self.connection() {
            Some(conn) => conn,
            None => {
                let conn = actix_web::rt::time::timeout(
                    self.timeout.max(Duration::from_secs(1)),
                    self.connect(),
                )
                .await
                .map_err(|_| Probe::Failed(BackendError::Timeout(self.timeout)))?
                .map_err(Probe::from)?;
                *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                conn
            }
        };
        let key = format!("{}{{floodgate-probe}}:probe", self.prefix);
        let mut cmd = redis::cmd("EVALSHA");
        // One request of one GCRA entry (code 0, t = 1 µs, tau = 0), charged.
        cmd.arg(self.script.get_hash())
            .arg(1)
            .arg(key)
            .arg(&[1, 1, 0, 1, 0]);
        let call = Self::eval::<Vec<i64>>(&self.script, &mut conn, &cmd);
        match actix_web::rt::time::timeout(patience, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(Probe::from(err)),
            Err(_) => Err(Probe::Failed(BackendError::Timeout(patience))),
        }
    }

    /// Runs a prepared `EVALSHA` of `script`, loading it after `NOSCRIPT`.
    async fn eval<T: FromRedisValue>(
        script: &redis::Script,
        conn: &mut Conn,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        match cmd.query_async::<T>(conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(conn).await?;
                cmd.query_async::<T>(conn).await
            }
            other => other,
        }
    }

    /// A new connection, with the decision script already loaded: a fresh
    /// Redis (or one restarted) would otherwise answer the first decision
    /// `NOSCRIPT`, and loading the script then costs that decision two more
    /// round trips, enough to miss `redis_timeout` on a busy machine and be
    /// decided by the failure policy instead.
    async fn connect(&self) -> Result<Conn, RedisError> {
        let mut conn = self.open_connection().await?;
        // Best effort: `eval` still loads it after a `NOSCRIPT`.
        if let Err(err) = self.script.load_async(&mut conn).await {
            log::debug!("loading the decision script on connect: {err}");
        }
        Ok(conn)
    }

    async fn open_connection(&self) -> Result<Conn, RedisError> {
        match &self.target {
            RedisTarget::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()?
                    .set_tcp_settings(tcp_settings());
                let client = redis::Client::open(info)?;
                // Our probe retries; the manager should not back off for long.
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(100))
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    // Every call has its own deadline (`redis_timeout`).
                    .set_response_timeout(None);
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                let client =
                    redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(Duration::from_secs(1))
                        .tcp_settings(tcp_settings())
                        .retries(2)
                        .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    fn target_name(&self) -> String {
        match &self.target {
            RedisTarget::Single(url) => format!("redis {}", redact_url(url)),
            RedisTarget::Cluster(nodes) => format!(
                "redis cluster {}",
                nodes
                    .iter()
                    .map(|n| redact_url(n))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

// === batches ===

/// Decisions made on one worker in one turn of its event loop travel to
/// Redis together, as one script call per (backend, cluster slot): one
/// `EVALSHA`, one `TIME`, one answer, instead of one round of each per
/// decision. Measured on the benchmark machine, a 16-key call costs Redis
/// about 0.6× per decision what single calls cost, and floodgate builds,
/// sends and parses one command instead of sixteen. Order within a batch is
/// arrival order, and the script is atomic, so decisions stay exact. A
/// decision is one request's entries (all of one slot on a Cluster), decided
/// all or nothing.
mod batch {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::sync::Arc;
    use std::task::{Poll, Waker};
    use std::time::Instant;

    use std::pin::Pin;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::time::Duration;

    use redis::{Arg, RedisError};
    use smallvec::SmallVec;
    use tokio::task::{JoinError, JoinHandle};

    use super::scripts;
    use super::{
        BackendError, Check, Conn, Entry, Fallback, Groups, Inner, KeyState, RedisTarget, is_outage,
    };

    /// Who takes a call's answer: the batch, if it comes in time, else the
    /// Redis thread (a late answer).
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    /// Decisions per script call at most.
    const MAX_BATCH: usize = 64;

    /// What Redis answered for one decision.
    pub struct Answer {
        /// Redis's `TIME`, µs since the epoch.
        pub t0: u64,
        /// Whether every entry was charged (else none was).
        pub charged: bool,
        /// Per entry, the state it was decided on.
        pub held: SmallVec<[Option<KeyState>; 4]>,
        /// When the batch was sent.
        pub sent_at: Instant,
    }

    pub struct Failure {
        pub error: BackendError,
    }

    #[derive(Default)]
    struct Slot {
        answer: Cell<Option<Result<Answer, Failure>>>,
        waker: RefCell<Option<Waker>>,
    }

    impl Slot {
        fn fill(&self, answer: Result<Answer, Failure>) {
            self.answer.set(Some(answer));
            if let Some(waker) = self.waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }

    /// One queued decision. It is answered exactly once: by its batch, or,
    /// should its batch be dropped unanswered (the worker stopping), by its
    /// own drop, so no waiter needs a timer of its own.
    struct Pending {
        inner: Arc<Inner>,
        slot_of_key: u16,
        entries: SmallVec<[Entry; 4]>,
        /// `false`: only look (what a request's later slots report when an
        /// earlier one refused it).
        charge: bool,
        answer: Option<Rc<Slot>>,
    }

    impl Pending {
        fn answer(&mut self, result: Result<Answer, Failure>) {
            if let Some(slot) = self.answer.take() {
                slot.fill(result);
            }
        }
    }

    impl Drop for Pending {
        fn drop(&mut self) {
            self.answer(Err(Failure {
                error: BackendError::Unavailable("the decision's batch was dropped".into()),
            }));
        }
    }

    thread_local! {
        static QUEUE: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
        static FLUSH_SCHEDULED: Cell<bool> = const { Cell::new(false) };
    }

    /// Queues one decision (entries of one slot) for this turn's batch and
    /// waits for its answer, which comes within the backend's timeout (its
    /// batch gives up then).
    pub async fn decide(
        inner: &Arc<Inner>,
        entries: SmallVec<[Entry; 4]>,
        charge: bool,
    ) -> Result<Answer, Failure> {
        let answer = Rc::new(Slot::default());
        // One Redis: any keys may share a call. Cluster: one slot per call.
        let slot_of_key = match (&inner.target, entries.first()) {
            (RedisTarget::Cluster(_), Some(first)) => cluster_slot(&first.key),
            _ => 0,
        };
        QUEUE.with_borrow_mut(|queue| {
            queue.push(Pending {
                inner: inner.clone(),
                slot_of_key,
                entries,
                charge,
                answer: Some(answer.clone()),
            })
        });
        if !FLUSH_SCHEDULED.replace(true) {
            // Moved into the task: if the task is dropped unrun (its runtime
            // stops), the flag is cleared all the same.
            let scheduled = Scheduled;
            actix_web::rt::spawn(flush(scheduled));
        }
        std::future::poll_fn(|cx| match answer.answer.take() {
            Some(result) => Poll::Ready(result),
            None => {
                *answer.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Takes back the charges of a request's slot groups `charged` (their
    /// answers), one script call per group, each within the timeout. A
    /// refund that fails leaves its charge, as if the request had been
    /// admitted for those limits.
    pub async fn refund(
        inner: &Arc<Inner>,
        checks: &[Check<'_>],
        entries: &[Entry],
        groups: &Groups,
        charged: &[(usize, Answer)],
    ) {
        for (g, answer) in charged {
            let idx = &groups[*g];
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(inner.refund_script.get_hash()).arg(idx.len());
            for &i in idx.iter() {
                cmd.arg(&entries[i].key);
            }
            for (j, &i) in idx.iter().enumerate() {
                let params = entries[i].params;
                let written = checks[i].limit.counter().step(answer.held[j], answer.t0);
                let expires = written.next.map_or(0, |s| s.expires);
                let per = if params.code == 0 { params.p } else { params.q };
                cmd.arg(params.code).arg(per).arg(expires);
            }
            let Some(mut conn) = worker_connection(inner).or_else(|| inner.connection()) else {
                log::debug!("no connection to refund a request refused across slots");
                return;
            };
            let call = Inner::eval::<i64>(&inner.refund_script, &mut conn, &cmd);
            match actix_web::rt::time::timeout(inner.timeout, call).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => log::debug!("refund across slots failed: {err}"),
                Err(_) => log::debug!("refund across slots: no answer in {:?}", inner.timeout),
            }
        }
    }

    /// Clears `FLUSH_SCHEDULED` when the flush task ends, run or not.
    struct Scheduled;

    impl Drop for Scheduled {
        fn drop(&mut self) {
            FLUSH_SCHEDULED.set(false);
        }
    }

    /// After every task ready in this turn has queued its decisions, sends
    /// them: one call per backend and cluster slot, all concurrently.
    async fn flush(scheduled: Scheduled) {
        tokio::task::yield_now().await;
        drop(scheduled);
        let mut queued = QUEUE.take();
        // Stable: arrival order is kept within each group.
        queued.sort_by_key(|p| (Arc::as_ptr(&p.inner) as usize, p.slot_of_key));
        let mut batch: Vec<Pending> = Vec::new();
        for pending in queued {
            let joins = batch.first().is_some_and(|first| {
                Arc::ptr_eq(&first.inner, &pending.inner)
                    && first.slot_of_key == pending.slot_of_key
            });
            if !batch.is_empty() && (!joins || batch.len() == MAX_BATCH) {
                actix_web::rt::spawn(send(std::mem::take(&mut batch)));
            }
            batch.push(pending);
        }
        if !batch.is_empty() {
            actix_web::rt::spawn(send(batch));
        }
    }

    /// One script call for `batch`, answered within the timeout. The call
    /// runs on the Redis thread; should the answer come after the batch gave
    /// up, it still ends a failing run, and what it allowed is taken off the
    /// local fallback's charge-back.
    async fn send(mut batch: Vec<Pending>) {
        let inner = batch[0].inner.clone();
        let Some(mut conn) = worker_connection(&inner).or_else(|| inner.connection()) else {
            Inner::failed(&inner);
            return fail(batch, || Failure {
                error: BackendError::Unavailable("not connected to redis".into()),
            });
        };
        let keys: usize = batch.iter().map(|p| p.entries.len()).sum();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(inner.script.get_hash()).arg(keys);
        for p in &batch {
            for e in &p.entries {
                cmd.arg(&e.key);
            }
        }
        for p in &batch {
            cmd.arg(p.entries.len()).arg(u8::from(p.charge));
            for e in &p.entries {
                cmd.arg(e.params.code).arg(e.params.p).arg(e.params.q);
            }
        }
        // For a late answer: each decision's entry count.
        let sizes: Vec<usize> = match inner.fallback {
            Fallback::Local => batch.iter().map(|p| p.entries.len()).collect(),
            Fallback::Open | Fallback::Closed => Vec::new(),
        };
        let handoff = Arc::new(AtomicU8::new(WAITING));
        let mut call = actix_web::rt::spawn({
            let (inner, handoff) = (inner.clone(), handoff.clone());
            async move {
                let result = Inner::eval::<Vec<i64>>(&inner.script, &mut conn, &cmd).await;
                if !matches!(&result, Err(err) if is_outage(err)) {
                    inner.circuit.answered();
                }
                let taken =
                    handoff.compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire);
                if taken.is_err() {
                    if let Ok(values) = &result {
                        let local = &inner.local;
                        // EVALSHA, sha, count, then the keys.
                        let mut keys = cmd.args_iter().skip(3).filter_map(|arg| match arg {
                            Arg::Simple(key) => Some(key),
                            _ => None,
                        });
                        // TIME, then per decision its flag and 3 per entry.
                        let mut at = 1;
                        for &m in &sizes {
                            let charged = values.get(at) == Some(&1);
                            for key in keys.by_ref().take(m) {
                                if charged {
                                    local.late(key);
                                }
                            }
                            at += 1 + 3 * m;
                        }
                    }
                    inner.abandoned.fetch_sub(1, Ordering::AcqRel);
                }
                result
            }
        });
        let sent_at = Instant::now();
        let result = match actix_web::rt::time::timeout(inner.timeout, &mut call).await {
            Ok(joined) => Some(joined),
            // This worker may have been busy (or not scheduled) when the
            // deadline passed: the answer may be in its socket already, read
            // once the connection's task runs. One more look after that, so
            // that only Redis being late counts as late.
            Err(_) => match look_again(&mut call).await {
                Some(joined) => Some(joined),
                None => {
                    // Counted before the call can see it abandoned (it
                    // counts down when it ends).
                    inner.abandoned.fetch_add(1, Ordering::AcqRel);
                    let gave_up = handoff
                        .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                    if !gave_up {
                        inner.abandoned.fetch_sub(1, Ordering::AcqRel);
                    }
                    if gave_up {
                        None
                    } else {
                        // Answered just now: the task is returning it.
                        Some(call.await)
                    }
                }
            },
        };
        let result = match result {
            Some(Ok(result)) => Some(result),
            Some(Err(join)) => Some(Err(RedisError::from(std::io::Error::other(
                join.to_string(),
            )))),
            None => None,
        };
        let expected = 1 + batch.iter().map(|p| 1 + 3 * p.entries.len()).sum::<usize>();
        match result {
            Some(Ok(values)) if values.len() == expected => {
                let t0 = u64::try_from(values[0]).unwrap_or(0);
                // Per decision: its flag, then three numbers per entry.
                let mut rest = &values[1..];
                for p in batch.iter_mut() {
                    let (answer, tail) = rest.split_at(1 + 3 * p.entries.len());
                    rest = tail;
                    let charged = answer[0] == 1;
                    let held = p
                        .entries
                        .iter()
                        .zip(answer[1..].chunks_exact(3))
                        .map(|(e, v)| scripts::state(e.params.code, v[0], v[1], v[2]))
                        .collect();
                    p.answer(Ok(Answer {
                        t0,
                        charged,
                        held,
                        sent_at,
                    }));
                }
            }
            Some(Ok(values)) => fail(batch, || Failure {
                error: BackendError::Unavailable(format!(
                    "the script answered {} values",
                    values.len()
                )),
            }),
            Some(Err(err)) => {
                let outage = is_outage(&err);
                if outage {
                    Inner::failed(&inner);
                }
                let message = err.to_string();
                fail(batch, || Failure {
                    error: BackendError::Unavailable(message.clone()),
                })
            }
            None => {
                Inner::failed(&inner);
                fail(batch, || Failure {
                    error: BackendError::Timeout(inner.timeout),
                })
            }
        }
    }

    /// Lets every task that is ready run (the I/O driver polled first), then
    /// polls `call`; [`LOOKS`] times at most: an answer read from the socket
    /// reaches `call` through the connection's task and `call`'s own.
    async fn look_again<T>(call: &mut JoinHandle<T>) -> Option<Result<T, JoinError>> {
        for _ in 0..LOOKS {
            tokio::task::yield_now().await;
            let polled = std::future::poll_fn(|cx| match Pin::new(&mut *call).poll(cx) {
                Poll::Ready(joined) => Poll::Ready(Some(joined)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
            if polled.is_some() {
                return polled;
            }
        }
        None
    }

    /// Turns [`look_again`] waits for an answer already received.
    const LOOKS: usize = 3;

    thread_local! {
        /// This worker's own connection per backend: its answers are read
        /// by this worker's event loop, the one waiting for them, so no
        /// other thread has to be scheduled between Redis and the decision.
        static CONNECTIONS: RefCell<Vec<WorkerConn>> = const { RefCell::new(Vec::new()) };
    }

    struct WorkerConn {
        backend: usize,
        generation: u64,
        conn: Option<Conn>,
        connecting: bool,
    }

    /// This worker's connection for `inner`; while it is being opened (in
    /// the background, on this worker), `None`.
    /// Starts opening this worker's connection, if it has none.
    pub fn warm(inner: &Arc<Inner>) {
        let _ = worker_connection(inner);
    }

    fn worker_connection(inner: &Arc<Inner>) -> Option<Conn> {
        let backend = Arc::as_ptr(inner) as usize;
        let generation = inner.generation.load(Ordering::Acquire);
        let connect = CONNECTIONS.with_borrow_mut(|conns| {
            let i = match conns.iter().position(|c| c.backend == backend) {
                Some(i) => i,
                None => {
                    conns.push(WorkerConn {
                        backend,
                        generation,
                        conn: None,
                        connecting: false,
                    });
                    conns.len() - 1
                }
            };
            let entry = &mut conns[i];
            if entry.generation != generation {
                *entry = WorkerConn {
                    backend,
                    generation,
                    conn: None,
                    connecting: false,
                };
            }
            if let Some(conn) = &entry.conn {
                return Err(conn.clone());
            }
            let start = !entry.connecting;
            entry.connecting = true;
            Ok(start)
        });
        match connect {
            Err(conn) => Some(conn),
            Ok(start) => {
                if start {
                    let inner = inner.clone();
                    actix_web::rt::spawn(async move {
                        let limit = inner.timeout.max(Duration::from_secs(1));
                        let conn = actix_web::rt::time::timeout(limit, inner.connect()).await;
                        CONNECTIONS.with_borrow_mut(|conns| {
                            let entry = conns.iter_mut().find(|c| c.backend == backend);
                            if let Some(entry) = entry.filter(|e| e.generation == generation) {
                                entry.connecting = false;
                                entry.conn = conn.ok().and_then(Result::ok);
                            }
                        });
                    });
                }
                None
            }
        }
    }

    fn fail(batch: Vec<Pending>, failure: impl Fn() -> Failure) {
        for mut p in batch {
            p.answer(Err(failure()));
        }
    }

    /// The Redis Cluster slot of a key (CRC16 of its hash tag, mod 16384).
    pub fn cluster_slot(key: &[u8]) -> u16 {
        let tagged = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.iter()
                    .position(|&b| b == b'}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key);
        crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn slots_follow_the_hash_tag() {
            // Known slots (CLUSTER KEYSLOT): "foo" 12182, "{user1000}.following" = "user1000" 3443.
            assert_eq!(super::cluster_slot(b"foo"), 12182);
            assert_eq!(super::cluster_slot(b"{user1000}.following"), 3443);
            assert_eq!(super::cluster_slot(b"x{user1000}y"), 3443);
            assert_eq!(
                super::cluster_slot(b"floodgate:{ip:127.0.0.1}:default"),
                5384
            );
            // An empty tag does not count: the whole key is hashed.
            assert_ne!(super::cluster_slot(b"{}a"), super::cluster_slot(b"{}b"));
        }
    }
}

/// Pipelined decisions are small writes; Nagle's algorithm would hold each
/// one back until the previous is acknowledged.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// Whether an error means Redis cannot answer (as opposed to refusing one
/// command, which says nothing about the next). A refusal of floodgate's
/// credentials holds for every command: it opens the circuit too, and the
/// probe reports it.
fn is_outage(err: &RedisError) -> bool {
    refusal(err).is_some()
        || !matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::ResponseError
                    | ServerErrorKind::CrossSlot
                    | ServerErrorKind::NoPerm
            ) | ErrorKind::UnexpectedReturnType
                | ErrorKind::Parse
                | ErrorKind::Extension
        )
}

/// The configuration error behind `err`, if Redis refused floodgate's
/// credentials or permissions. Names the cause, never a password.
fn refusal(err: &RedisError) -> Option<&'static str> {
    match (err.kind(), err.code()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("WRONGPASS")) => {
            Some("the user or password in FLOODGATE_REDIS_URL is wrong (authentication failed)")
        }
        (_, Some("NOAUTH")) => {
            Some("Redis requires a password and FLOODGATE_REDIS_URL has none (NOAUTH)")
        }
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) => Some(
            "the Redis user in FLOODGATE_REDIS_URL may not run EVALSHA/SCRIPT LOAD (NOPERM); \
             grant it +evalsha +script|load and access to the prefix's keys",
        ),
        _ => None,
    }
}

/// Why a probe failed.
enum Probe {
    /// Redis refused floodgate's credentials: a configuration error.
    Refused(&'static str, RedisError),
    Failed(BackendError),
}

impl From<RedisError> for Probe {
    fn from(err: RedisError) -> Self {
        match refusal(&err) {
            Some(cause) => Probe::Refused(cause, err),
            None => Probe::Failed(BackendError::Unavailable(err.to_string())),
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Refused(cause, _) => f.write_str(cause),
            Probe::Failed(err) => err.fmt(f),
        }
    }
}

// === Blocked ===

/// (limit, key)s Redis refused: until when the refusal is cached (see the
/// module docs), when a cell is back, and when the key is back in full.
#[derive(Default)]
struct Blocked {
    until: DashMap<u64, Refusal>,
    seed: RandomState,
}

#[derive(Clone, Copy)]
struct Refusal {
    cached_until: Instant,
    retry_at: Instant,
    reset_at: Instant,
}

impl Blocked {
    fn digest(&self, limit: &Limit, key: &RateKey) -> u64 {
        self.seed.hash_one((limit.id(), key))
    }

    fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    fn get(&self, limit: &Limit, key: &RateKey) -> Option<Decision> {
        let refusal = *self.until.get(&self.digest(limit, key))?;
        let now = Instant::now();
        refusal.cached_until.checked_duration_since(now)?;
        let retry_after = refusal.retry_at.saturating_duration_since(now);
        Some(Decision::Limited {
            retry_after,
            reset_after: refusal
                .reset_at
                .saturating_duration_since(now)
                .max(retry_after),
        })
    }

    fn insert(&self, limit: &Limit, key: &RateKey, refusal: Refusal) {
        if self.until.len() < BLOCKED_CAP {
            self.until.insert(self.digest(limit, key), refusal);
        }
    }

    fn retain_recent(&self) {
        let now = Instant::now();
        self.until.retain(|_, r| r.cached_until > now);
    }

    /// Forgets the refusal cached for `key` under `limit`, if any.
    fn forget(&self, limit: &Limit, key: &RateKey) {
        self.until.remove(&self.digest(limit, key));
    }

    /// Forgets every cached refusal: each refused key asks Redis again once.
    fn clear(&self) {
        self.until.clear();
    }
}

// === Conn ===

/// One connection shape for both deployments.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
