//! Limits, the decisions made against them, and the seam behind which limiter
//! state lives.
//!
//! A [`Limit`] is a named [`Rate`] counted by one of three [`Algorithm`]s
//! (GCRA with a burst, a sliding or a fixed window). The arithmetic of each
//! is a small pure type in [`algorithm`]; every backend runs that same
//! arithmetic and differs only in where the state is kept (this process's
//! memory, or Redis shared by many replicas), so one conformance suite
//! (`tests/conformance.rs`) holds them to one behaviour.
//!
//! A request is checked against all the limits of its rule at once
//! ([`Backend::check_all`]): it passes only if every limit allows it, and a
//! refused request is charged to none of them (nginx's behaviour with
//! several `limit_req` zones). A [`Decision`] is per (limit, key) and carries
//! no policy of its own: that comes from the [`Limit`].

pub mod algorithm;
pub mod memory;
mod rate;
pub mod redis;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderValue;
use async_trait::async_trait;
use bytes::Bytes;
use smallvec::SmallVec;

use crate::key::{Fingerprint, Fingerprinter};

pub use algorithm::{ALGORITHM_SYNTAX, Algorithm, Counter, UnknownAlgorithm};
pub use memory::MemoryBackend;
pub use rate::{MAX_PERIOD, RATE_SYNTAX, Rate, RateError};
pub use redis::{Fallback, RedisBackend, RedisTarget};

// === Limit ===

/// A named limit: a sustained [`Rate`], counted by an [`Algorithm`].
///
/// GCRA view ([`Limit::new`]): one cell is emitted every
/// [`emission_interval`](Self::emission_interval) (`T`), and a key may run
/// ahead of that schedule by `tau = T * (burst - 1)`, so `burst` cells fit
/// through at once and then one every `T`. Window view ([`Limit::window`]):
/// `n` requests per window of the rate's period, windows aligned to the
/// Unix epoch.
#[derive(Clone, Debug)]
pub struct Limit {
    id: LimitId,
    name: Arc<str>,
    rate: Rate,
    burst: NonZeroU32,
    algorithm: Algorithm,
    /// The arithmetic, computed once.
    counter: Counter,
}

/// A limit's identity: its name and algorithm, the same in every process
/// and version. Backends key their state by it, so state survives a rules
/// reload that keeps the limit (a changed rate or burst reads the counters
/// as they are, as nginx keeps a zone's state across a reload), replicas
/// sharing Redis agree, and a limit that changes algorithm starts fresh
/// (its state means something else). A rule set's limit names are unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitId(u64);

impl fmt::Display for LimitId {
    /// Sixteen lower-case hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why [`Limit::window`] refused its parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `Limit::window` was given [`Algorithm::Gcra`], which needs a burst.
    #[error("gcra needs a burst: use Limit::new")]
    NotAWindow,
    /// A sliding window whose `n * window_ms` reaches 2^53.
    #[error("a sliding window may count at most 2^53 / window_ms requests ({0} for this period)")]
    SlidingTooLarge(u64),
}

impl Limit {
    /// A GCRA limit named `name` (the policy name shown in
    /// `RateLimit-Policy`): `burst` at once, then `rate`.
    pub fn new(name: impl Into<Arc<str>>, rate: Rate, burst: NonZeroU32) -> Self {
        Limit::build(name.into(), rate, burst, Algorithm::Gcra)
    }

    /// A window limit: `rate.count()` requests per `rate.period()`, counted
    /// by `algorithm` ([`Algorithm::FixedWindow`] or
    /// [`Algorithm::SlidingWindow`]).
    pub fn window(
        name: impl Into<Arc<str>>,
        rate: Rate,
        algorithm: Algorithm,
    ) -> Result<Self, LimitError> {
        match algorithm {
            Algorithm::Gcra => return Err(LimitError::NotAWindow),
            Algorithm::SlidingWindow => {
                let window_ms = u64::try_from(rate.period().as_millis()).unwrap_or(u64::MAX);
                let most = algorithm::SLIDING_WINDOW_MAX / window_ms.max(1);
                if u64::from(rate.count().get()) > most {
                    return Err(LimitError::SlidingTooLarge(most));
                }
            }
            Algorithm::FixedWindow => {}
        }
        Ok(Limit::build(name.into(), rate, rate.count(), algorithm))
    }

    fn build(name: Arc<str>, rate: Rate, burst: NonZeroU32, algorithm: Algorithm) -> Self {
        let mut id = blake3::Hasher::new_derive_key("floodgate limit identity v1");
        for part in [name.as_bytes(), algorithm.as_str().as_bytes()] {
            id.update(&(part.len() as u64).to_le_bytes());
            id.update(part);
        }
        let digest = id.finalize();
        let id = LimitId(u64::from_le_bytes(
            digest.as_bytes()[..8].try_into().expect("8 bytes"),
        ));
        let mut limit = Limit {
            id,
            name,
            rate,
            burst,
            algorithm,
            counter: Counter::Gcra(algorithm::Gcra { t: 1, tau: 0 }),
        };
        limit.counter = limit.make_counter();
        limit
    }

    /// This limit's identity (see [`LimitId`]).
    pub fn id(&self) -> LimitId {
        self.id
    }

    /// How this limit counts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The arithmetic of this limit: what every backend runs.
    pub fn counter(&self) -> Counter {
        self.counter
    }

    fn make_counter(&self) -> Counter {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match self.algorithm {
            Algorithm::Gcra => Counter::Gcra(algorithm::Gcra::new(
                self.emission_interval(),
                self.tolerance(),
            )),
            Algorithm::FixedWindow => Counter::FixedWindow(algorithm::FixedWindow {
                n: u64::from(self.rate.count().get()),
                window: micros(self.rate.period()),
            }),
            Algorithm::SlidingWindow => Counter::SlidingWindow(algorithm::SlidingWindow {
                n: u64::from(self.rate.count().get()),
                window: micros(self.rate.period()),
            }),
        }
    }

    /// The policy name, shown in `RateLimit-Policy` and in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sustained rate: `n` cells come back per period (the quota and
    /// window `RateLimit-Policy` shows).
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Cells a fresh key may take at once, before the rate spaces them out
    /// (a window limit: its `n`).
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// `T`: the time one cell takes to come back.
    pub fn emission_interval(&self) -> Duration {
        self.rate.emission_interval()
    }

    /// `tau`: how far ahead of schedule a key may run (`T * (burst - 1)`),
    /// at most [`MAX_TOLERANCE`].
    pub fn tolerance(&self) -> Duration {
        self.emission_interval()
            .checked_mul(self.burst.get() - 1)
            .map_or(MAX_TOLERANCE, |tau| tau.min(MAX_TOLERANCE))
    }

    /// The policy as `RateLimit-Policy` and logs spell it:
    /// `10/min burst 10 gcra`.
    pub fn describe(&self) -> String {
        let period = self.rate.period().as_secs();
        match self.algorithm {
            Algorithm::Gcra => format!("{}/{period}s burst {} gcra", self.rate.count(), self.burst),
            a => format!("{}/{period}s {a}", self.rate.count()),
        }
    }
}

/// The longest tolerance a limit may have: a key may run 100 years ahead of
/// schedule at most. Far beyond any useful burst, and keeps Redis's
/// microsecond arithmetic (doubles, exact up to 2^53 µs ≈ 285 years) exact;
/// settings refuse more, and a [`Limit`] built in code is capped.
pub const MAX_TOLERANCE: Duration = Duration::from_secs(100 * 365 * 86_400);

// === Decision ===

/// The answer to one check: a value, not an error (governor's `NotUntil`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request took a cell.
    Allowed {
        /// Cells left for this key right now.
        remaining: u32,
        /// Time until the key is back to a full burst.
        reset_after: Duration,
    },
    /// No cell was available; nothing was taken.
    Limited {
        /// Time until one cell is available again.
        retry_after: Duration,
        /// Time until the key is back to a full burst.
        reset_after: Duration,
    },
}

impl Decision {
    /// Whether the request may go on ([`Decision::Allowed`]).
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }

    /// When a refused request may be retried; `None` when allowed.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Decision::Limited { retry_after, .. } => Some(*retry_after),
            Decision::Allowed { .. } => None,
        }
    }

    /// Cells the key has left right now: 0 when limited.
    pub fn remaining(&self) -> u32 {
        match self {
            Decision::Allowed { remaining, .. } => *remaining,
            Decision::Limited { .. } => 0,
        }
    }

    /// Time until the key is back to a full burst, whichever the answer (the
    /// `reset` of the rate-limit headers).
    pub fn reset_after(&self) -> Duration {
        match self {
            Decision::Allowed { reset_after, .. } | Decision::Limited { reset_after, .. } => {
                *reset_after
            }
        }
    }
}

// === RateKey ===

/// Who a limit is counted against: a client address, an API key, or anything a
/// custom [`KeyExtractor`](crate::key::KeyExtractor) derives.
///
/// The kinds never collide: an API key whose text is `"192.0.2.1"` is a
/// different key from the client address 192.0.2.1, so nobody can spend
/// another client's address budget by naming it in a header.
///
/// Building a key does not allocate for addresses and header values (a
/// `HeaderValue` clone shares its bytes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RateKey(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Global,
    Ip(IpAddr),
    Header(HeaderValue),
    /// A header value known only by its fingerprint (the admin API's
    /// `h:<fingerprint>`): the same [`RateKey::stable_id`] as the value.
    HeaderFingerprint(Fingerprint),
    Bytes(Bytes),
    Composite(Arc<[RateKey]>),
}

impl RateKey {
    /// One key shared by every request.
    pub fn global() -> Self {
        RateKey(Repr::Global)
    }

    /// A client address (already grouped, e.g. an IPv6 /64 network address).
    pub fn ip(addr: IpAddr) -> Self {
        RateKey(Repr::Ip(addr))
    }

    /// A header value such as an API key.
    pub fn header(value: HeaderValue) -> Self {
        RateKey(Repr::Header(value))
    }

    /// A header value known only by its [`Fingerprint`], as logs and admin
    /// answers show it. Its [`stable_id`](Self::stable_id) is the value's
    /// (`h:<fingerprint>`), so a store that names state by stable ids (Redis,
    /// and the memory backend's hashed table for every key that is not
    /// [plain](Self::is_plain)) finds the value's state by it; a store keyed
    /// by the value itself cannot, and says so
    /// ([`KeyStateError::NeedsValue`]). No request ever has such a key.
    pub fn header_fingerprint(fingerprint: Fingerprint) -> Self {
        RateKey(Repr::HeaderFingerprint(fingerprint))
    }

    /// Whether this key, or a part of it, is a header value known only by
    /// its fingerprint ([`header_fingerprint`](Self::header_fingerprint)).
    pub fn is_fingerprint_only(&self) -> bool {
        match &self.0 {
            Repr::HeaderFingerprint(_) => true,
            Repr::Composite(parts) => parts.iter().any(RateKey::is_fingerprint_only),
            _ => false,
        }
    }

    /// Whether this key is an address or the global key: named in clear,
    /// never fingerprinted (every other kind's [`stable_id`](Self::stable_id)
    /// is a fingerprint).
    pub fn is_plain(&self) -> bool {
        matches!(self.0, Repr::Global | Repr::Ip(_))
    }

    /// Arbitrary bytes from a custom extractor.
    pub fn bytes(value: impl Into<Bytes>) -> Self {
        RateKey(Repr::Bytes(value.into()))
    }

    /// Several keys counted together (`header:x-api-key+ip`: one budget per
    /// API key per address). Order matters; one part is that part itself.
    pub fn composite(parts: impl IntoIterator<Item = RateKey>) -> Self {
        let mut parts: Vec<RateKey> = parts.into_iter().collect();
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        RateKey(Repr::Composite(parts.into()))
    }

    /// The parts of a composite key; a single key is its own one part.
    pub fn parts(&self) -> &[RateKey] {
        match &self.0 {
            Repr::Composite(parts) => parts,
            _ => std::slice::from_ref(self),
        }
    }

    /// The header value, for a header key.
    pub fn header_value(&self) -> Option<&HeaderValue> {
        match &self.0 {
            Repr::Header(value) => Some(value),
            _ => None,
        }
    }

    /// The address, for an address key.
    pub fn ip_addr(&self) -> Option<IpAddr> {
        match &self.0 {
            Repr::Ip(ip) => Some(*ip),
            _ => None,
        }
    }

    /// A stable, printable identity for stores shared between processes: the
    /// same key gives the same bytes on every replica and every version, as
    /// long as `fingerprints` has the same scope. Each kind has its own
    /// namespace, and each kind is either always in clear or always hashed,
    /// so no key of one kind can spell another's id:
    ///
    /// | kind | id |
    /// | --- | --- |
    /// | global | `g` |
    /// | client address | `ip:` and the address (`ip:192.0.2.1`, `ip:2001:db8::`) |
    /// | header value | `h:` and its [`Fingerprint`], always |
    /// | custom bytes | `b:` and their fingerprint, always |
    /// | composite | `c:` and the fingerprint of its parts' ids, always |
    ///
    /// A header value (an API key) is never written in clear, whatever its
    /// length, and no id is longer than [`MAX_STABLE_ID`].
    pub fn stable_id(&self, fingerprints: &Fingerprinter) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_STABLE_ID);
        self.write_stable_id(fingerprints, &mut out);
        out
    }

    /// Appends [`RateKey::stable_id`] to `out` (one allocation fewer, and no
    /// formatting machinery for IPv4, for callers building a longer key).
    pub fn write_stable_id(&self, fingerprints: &Fingerprinter, out: &mut Vec<u8>) {
        let (kind, value): (&[u8], &[u8]) = match &self.0 {
            Repr::Global => return out.extend_from_slice(b"g"),
            Repr::Ip(IpAddr::V4(ip)) => {
                // As `Ipv4Addr`'s Display writes it: dotted decimal.
                out.extend_from_slice(b"ip:");
                let mut digits = itoa::Buffer::new();
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    out.extend_from_slice(digits.format(octet).as_bytes());
                }
                return;
            }
            Repr::Ip(ip @ IpAddr::V6(_)) => {
                out.extend_from_slice(b"ip:");
                return out.extend_from_slice(ip.to_string().as_bytes());
            }
            Repr::Header(value) => (b"h:", value.as_bytes()),
            Repr::HeaderFingerprint(fingerprint) => {
                out.extend_from_slice(b"h:");
                return fingerprint.write_hex(out);
            }
            Repr::Bytes(bytes) => (b"b:", bytes.as_ref()),
            Repr::Composite(parts) => {
                // Each part's id, length-prefixed, so no split of the parts
                // spells another's.
                let mut joined = Vec::with_capacity(parts.len() * (MAX_STABLE_ID + 2));
                for part in parts.iter() {
                    let start = joined.len();
                    joined.extend_from_slice(&[0, 0]);
                    part.write_stable_id(fingerprints, &mut joined);
                    let len = u16::try_from(joined.len() - start - 2).unwrap_or(u16::MAX);
                    joined[start..start + 2].copy_from_slice(&len.to_be_bytes());
                }
                out.extend_from_slice(b"c:");
                return fingerprints.fingerprint(&joined).write_hex(out);
            }
        };
        out.extend_from_slice(kind);
        fingerprints.fingerprint(value).write_hex(out);
    }
}

/// Longest [`RateKey::stable_id`]: `ip:` and the longest IPv6 text (39
/// characters); a fingerprinted id is `h:` or `b:` and 32 hex digits.
pub const MAX_STABLE_ID: usize = 3 + 39;

impl fmt::Debug for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// For people: addresses as they are, other keys only as their length, so
/// not a byte of an API key is shown (a four-byte key used to be shown
/// whole). Log lines use [`RateKey::stable_id`], the fingerprint that is the
/// same in every place.
impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Global => f.write_str("global"),
            Repr::Ip(ip) => write!(f, "ip:{ip}"),
            Repr::Header(value) => write!(f, "header:{}", Redacted(value.as_bytes())),
            Repr::HeaderFingerprint(fingerprint) => write!(f, "header:h:{fingerprint}"),
            Repr::Bytes(bytes) => write!(f, "key:{}", Redacted(bytes)),
            Repr::Composite(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("+")?;
                    }
                    fmt::Display::fmt(part, f)?;
                }
                Ok(())
            }
        }
    }
}

/// A secret shown only as its length.
struct Redacted<'a>(&'a [u8]);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "…({} bytes)", self.0.len())
    }
}

// === Backend ===

/// One limit to check for one key: a request has one per limit of its rule.
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    /// The limit.
    pub limit: &'a Limit,
    /// Whom it counts.
    pub key: &'a RateKey,
}

/// One [`Decision`] per [`Check`], in order (inline up to four).
pub type Decisions = SmallVec<[Decision; 4]>;

/// Per [`Check`] of a [`Backend::reset`], in order: whether the key had
/// state under that limit to forget.
pub type Forgotten = SmallVec<[bool; 4]>;

/// Where rate-limit state lives.
///
/// Implementations must make [`check_all`](Self::check_all) atomic: two
/// concurrent calls must never both take the last cell of a key, and a
/// request refused by one of its limits must be charged to none.
#[async_trait(?Send)]
pub trait Backend: Send + Sync {
    /// Runs once per request, before the request is forwarded: one
    /// decision per check, in order. If every one allows the request, each
    /// limit is charged one cell; if any refuses it, none is charged, and
    /// the allowing entries report the cells their key has left without
    /// this request. An `Err` means the store could not decide; the caller
    /// applies its failure policy.
    ///
    /// Any limit may be checked: backends take no list of limits up front,
    /// and keep state by [`Limit::id`], so a reloaded rule set whose limit
    /// is unchanged finds its counters where it left them.
    async fn check_all(&self, checks: &[Check<'_>]) -> Result<Decisions, BackendError>;

    /// The same decisions without waiting, when the backend can make them
    /// locally (memory always; Redis for a refusal it still remembers).
    /// `None` means: call [`check_all`](Self::check_all). The middleware
    /// tries this first, which spares the boxed future on the hot path.
    fn try_check_all(&self, _checks: &[Check<'_>]) -> Option<Result<Decisions, BackendError>> {
        None
    }

    /// One limit for one key: [`check_all`](Self::check_all) of one check.
    async fn check(&self, limit: &Limit, key: &RateKey) -> Result<Decision, BackendError> {
        let checks = [Check { limit, key }];
        let decisions = match self.try_check_all(&checks) {
            Some(answer) => answer?,
            None => self.check_all(&checks).await?,
        };
        Ok(decisions[0])
    }

    /// Runs when the admin API is asked for a key's state (`GET
    /// /limits/{rule}/{key}`), never on the request path: what each check's
    /// key has left now, one [`Decision`] per check made without charging
    /// anything (a [`Decision::Limited`] says a request would be refused
    /// now, and when it may retry). State is read where decisions read it
    /// (Redis on Redis's clock), so every replica answers alike.
    ///
    /// The default answers [`KeyStateError::Unsupported`]: a backend
    /// written before this method existed keeps compiling, and the admin
    /// API answers 501 for it.
    async fn inspect(&self, checks: &[Check<'_>]) -> Result<Decisions, KeyStateError> {
        let _ = checks;
        Err(KeyStateError::Unsupported(self.kind()))
    }

    /// Runs when the admin API resets a key (`DELETE
    /// /limits/{rule}/{key}`): forgets each check's state wherever this
    /// backend keeps it (shared state, and any copy this process holds: a
    /// cache of refusals, a fallback's table), so the key's next request is
    /// a fresh key's and gets a full burst. Answers, per check, whether
    /// there was state to forget.
    ///
    /// The default answers [`KeyStateError::Unsupported`] (501).
    async fn reset(&self, checks: &[Check<'_>]) -> Result<Forgotten, KeyStateError> {
        let _ = checks;
        Err(KeyStateError::Unsupported(self.kind()))
    }

    /// Runs on each worker's runtime as it starts, before its first request
    /// (the middleware calls it): opens connections and starts background
    /// tasks. Must be idempotent: only the first call should act.
    fn start(&self) {}

    /// Runs periodically (every few seconds) off the request path. Drops keys
    /// that are indistinguishable from fresh ones. Stores that expire keys
    /// themselves (Redis `PEXPIRE`) keep this no-op.
    fn retain_recent(&self) {}

    /// Answers `/readyz`, without a round trip: whether decisions are being
    /// made as configured right now.
    fn health(&self) -> Health {
        Health::Up
    }

    /// Whether decisions are being made as configured right now: the
    /// cheap form of [`health`](Self::health) (no text), read on every
    /// request. `false` while, say, Redis is down and decisions come from
    /// the local fallback.
    fn is_up(&self) -> bool {
        true
    }

    /// What `/metrics` shows of the backend's state, read at scrape time
    /// (off the request path). Backends that keep nothing worth showing
    /// keep the default: nothing.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// A short name for logs: `memory`, `redis`, …
    fn kind(&self) -> &'static str;
}

/// A backend's state as `/metrics` shows it ([`Backend::stats`]); `None`
/// for what a backend does not have.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Keys whose state this process holds in memory (the memory backend's
    /// table; Redis's local fallback table).
    pub keys: Option<u64>,
    /// The state of a circuit breaker in front of a remote store.
    pub circuit: Option<CircuitState>,
    /// Times the connections to a remote store were replaced.
    pub reconnects: Option<u64>,
}

/// A circuit breaker's state, for [`BackendStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Not connected yet: the failure policy decides meanwhile.
    Connecting,
    /// The store answers and is asked.
    Closed,
    /// The store stopped answering: it is not asked, the failure policy
    /// decides, and a probe asks until it answers again.
    Open,
}

/// What `/readyz` reports about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Deciding as configured.
    Up,
    /// Serving, but not as configured (e.g. Redis down and the local fallback
    /// deciding): ready, with this note.
    Degraded(String),
    /// Refusing requests (e.g. Redis down under the `closed` policy): not ready.
    Down(String),
}

/// Why a backend could not decide.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store did not answer within this time (`FLOODGATE_REDIS_TIMEOUT`
    /// for Redis).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The store cannot be reached or refused the command; the text says why.
    #[error("{0}")]
    Unavailable(String),
}

/// Why a key's state could not be read or forgotten ([`Backend::inspect`],
/// [`Backend::reset`]).
#[derive(Debug, thiserror::Error)]
pub enum KeyStateError {
    /// This backend cannot look at or forget single keys (the trait's
    /// default).
    #[error("the {0} backend cannot inspect or reset single keys")]
    Unsupported(&'static str),
    /// A header key given by its fingerprint
    /// ([`RateKey::header_fingerprint`]) to a backend that keeps keys under
    /// a hash of the value itself, which no fingerprint leads to.
    #[error(
        "the {0} backend keeps header keys under a hash of the value, which a fingerprint does not lead to: give the header value itself"
    )]
    NeedsValue(&'static str),
    /// The store could not answer.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: &str, burst: u32) -> Limit {
        Limit::new("t", rate.parse().unwrap(), NonZeroU32::new(burst).unwrap())
    }

    #[test]
    fn ten_per_minute_emits_one_every_six_seconds_and_tolerates_nine_ahead() {
        let l = limit("10/min", 10);
        assert_eq!(l.emission_interval(), Duration::from_secs(6));
        assert_eq!(l.tolerance(), Duration::from_secs(54));
        let Counter::Gcra(gcra) = l.counter() else {
            panic!("a gcra limit")
        };
        assert_eq!(gcra.reset_after(9), Duration::from_secs(6));
        assert_eq!(gcra.reset_after(0), Duration::from_secs(60));
    }

    fn fingerprints() -> Fingerprinter {
        Fingerprinter::new(b"floodgate:")
    }

    #[test]
    fn key_kinds_never_collide() {
        let fp = fingerprints();
        let ip = RateKey::ip("192.0.2.1".parse().unwrap());
        let header = RateKey::header(HeaderValue::from_static("192.0.2.1"));
        let bytes = RateKey::bytes("192.0.2.1");
        assert_ne!(ip, header);
        assert_ne!(header, bytes);
        assert_ne!(ip.stable_id(&fp), header.stable_id(&fp));
        assert_ne!(header.stable_id(&fp), bytes.stable_id(&fp));
    }

    #[test]
    fn a_value_spelling_another_values_hashed_id_gets_its_own_id() {
        // Ids used to keep short values in clear and replace long ones by
        // `#` + SHA-1, so the value `#<sha1 of V>` landed on V's id.
        let fp = fingerprints();
        let long = "k".repeat(100);
        let victim = RateKey::header(HeaderValue::from_str(&long).unwrap());
        let hashed = victim.stable_id(&fp);
        let hash_text = String::from_utf8(hashed[2..].to_vec()).unwrap();
        for spelled in [
            hash_text.clone(),
            format!("#{hash_text}"),
            String::from_utf8(hashed.clone()).unwrap(),
        ] {
            let attacker = RateKey::header(HeaderValue::from_str(&spelled).unwrap());
            assert_ne!(attacker.stable_id(&fp), hashed, "{spelled:?}");
            let attacker = RateKey::bytes(spelled.clone());
            assert_ne!(attacker.stable_id(&fp), hashed, "{spelled:?}");
        }
    }

    #[test]
    fn stable_ids_are_short_and_printable() {
        let fp = fingerprints();
        assert_eq!(
            RateKey::ip("192.0.2.1".parse().unwrap()).stable_id(&fp),
            b"ip:192.0.2.1"
        );
        assert_eq!(
            RateKey::ip("2001:db8::".parse().unwrap()).stable_id(&fp),
            b"ip:2001:db8::"
        );
        assert_eq!(RateKey::global().stable_id(&fp), b"g");
        for ip in ["0.0.0.0", "10.0.0.255", "255.255.255.255", "1.22.133.4"] {
            let id = RateKey::ip(ip.parse().unwrap()).stable_id(&fp);
            assert_eq!(id, format!("ip:{ip}").as_bytes(), "as Display writes it");
        }
        let widest = RateKey::ip("1111:2222:3333:4444:5555:6666:7777:8888".parse().unwrap());
        assert_eq!(widest.stable_id(&fp).len(), MAX_STABLE_ID);
        for value in [
            "k-1".to_owned(),
            "x".repeat(65),
            "a b".into(),
            "x".repeat(8192),
        ] {
            let header = RateKey::header(HeaderValue::from_str(&value).unwrap());
            let id = header.stable_id(&fp);
            assert_eq!(id.len(), 2 + 32, "{value:?}");
            assert!(id.starts_with(b"h:"));
            assert!(
                id[2..]
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(id, header.stable_id(&fp), "deterministic");
            assert!(id.len() <= MAX_STABLE_ID);
            let bytes = RateKey::bytes(value.clone()).stable_id(&fp);
            assert!(bytes.starts_with(b"b:") && bytes.len() == 2 + 32);
        }
    }

    #[test]
    fn header_ids_are_fixed_across_versions_and_scoped_by_prefix() {
        // Replicas of different versions sharing one Redis must agree: this
        // value may only change together with the fingerprint's context.
        let key = RateKey::header(HeaderValue::from_static("k-1"));
        let id = key.stable_id(&fingerprints());
        assert_eq!(
            String::from_utf8(id.clone()).unwrap(),
            format!("h:{}", fingerprints().fingerprint(b"k-1"))
        );
        assert_eq!(
            String::from_utf8(id.clone()).unwrap(),
            "h:552241154a20a56a09a9aa0ec53f4879"
        );
        let other_scope = key.stable_id(&Fingerprinter::new(b"tenant-b/"));
        assert_ne!(id, other_scope);
    }

    #[test]
    fn display_never_shows_a_byte_of_an_api_key() {
        let key = RateKey::header(HeaderValue::from_static("sk_live_0123456789"));
        assert_eq!(key.to_string(), "header:…(18 bytes)");
        let short = RateKey::header(HeaderValue::from_static("k3y"));
        assert_eq!(short.to_string(), "header:…(3 bytes)");
        let both = RateKey::composite([short, RateKey::ip("192.0.2.1".parse().unwrap())]);
        assert_eq!(both.to_string(), "header:…(3 bytes)+ip:192.0.2.1");
    }
}
