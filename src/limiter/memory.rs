//! In-memory limiter state: governor's keyed GCRA over a bounded key table.
//!
//! governor does the arithmetic (`Gcra::test_and_update`, its clock, its
//! `StateSnapshot`); this module only decides where the per-key state lives.
//! governor's own `DashMapStateStore` grows without bound, so [`KeyTable`]
//! implements governor's [`StateStore`] over a `DashMap` that it caps at
//! `max_keys` entries. When the table is full, the entries whose theoretical
//! arrival time (TAT) lies furthest in the past are forgotten first, an
//! eighth of the table at a time: those are the keys closest to a full
//! bucket, so forgetting them changes the fewest decisions (nginx's
//! `limit_req` zone drops its least recently used states the same way). A
//! forgotten key starts again with a full burst.
//!
//! Keys are stored as 64-bit SipHash-1-3 digests under a per-process random
//! seed, so the table never holds a client's bytes and every entry is 16
//! bytes. Two different keys share state only if their digests collide, which
//! an outsider cannot arrange without the seed and which by chance happens
//! with probability about n²/2⁶⁵ (3·10⁻⁸ for a million keys).

use async_trait::async_trait;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::{Backend, BackendError, Decision, Limit, LimitId, RateKey};

/// Default cap on tracked keys per limit (`FLOODGATE_MAX_KEYS`).
///
/// A million 16-byte entries take about 40 MiB including the hash table's
/// slack (measured in `tests/memory.rs`).
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// When the table is full, forget `1 / EVICT_DIVISOR` of it at once, so that
/// the O(n) sweep is paid once per n/8 new keys rather than once per key.
const EVICT_DIVISOR: usize = 8;

/// TATs sampled to find the eviction threshold.
const EVICT_SAMPLE: usize = 4096;

type KeyedLimiter<C> = governor::RateLimiter<u64, SharedTable, C, StateInformationMiddleware>;

/// Limiter state in this process. Build it once and share it (`Arc`) between
/// all workers: each clone of a per-worker limiter would count separately.
pub struct MemoryBackend<C: Clock = DefaultClock> {
    limiters: Vec<PerLimit<C>>,
    seed: RandomState,
}

/// One limit's limiter, with its table and (no later than) its start, so
/// that [`raise`](MemoryBackend::raise) can write a TAT in governor's terms.
struct PerLimit<C: Clock> {
    id: LimitId,
    limiter: KeyedLimiter<C>,
    table: SharedTable,
    start: C::Instant,
}

impl MemoryBackend<DefaultClock> {
    /// State for `limits`, each holding at most `max_keys` keys.
    pub fn new<'a>(limits: impl IntoIterator<Item = &'a Limit>, max_keys: usize) -> Self {
        Self::with_clock(limits, max_keys, DefaultClock::default())
    }
}

impl<C: Clock> MemoryBackend<C> {
    /// As [`new`](MemoryBackend::new) with a given clock (tests use governor's
    /// `FakeRelativeClock`).
    pub fn with_clock<'a>(
        limits: impl IntoIterator<Item = &'a Limit>,
        max_keys: usize,
        clock: C,
    ) -> Self
    where
        C: Clone,
    {
        let limiters = limits
            .into_iter()
            .map(|limit| {
                let table = SharedTable(Arc::new(KeyTable::new(max_keys)));
                // Read before governor reads its own start: TATs written by
                // `raise` are then never earlier than meant.
                let start = clock.now();
                let limiter: KeyedLimiter<C> =
                    governor::RateLimiter::new(limit.quota(), table.clone(), clock.clone());
                PerLimit {
                    id: limit.id(),
                    limiter,
                    table,
                    start,
                }
            })
            .collect();
        MemoryBackend {
            limiters,
            seed: RandomState::new(),
        }
    }

    /// Keys currently tracked for `limit`.
    pub fn len(&self, limit: &Limit) -> usize {
        self.limiter(limit).map_or(0, |l| l.len())
    }

    /// Whether no key is tracked for `limit`.
    pub fn is_empty(&self, limit: &Limit) -> bool {
        self.len(limit) == 0
    }

    fn limiter(&self, limit: &Limit) -> Option<&KeyedLimiter<C>> {
        self.per_limit(limit).map(|l| &l.limiter)
    }

    fn per_limit(&self, limit: &Limit) -> Option<&PerLimit<C>> {
        self.limiters.iter().find(|l| l.id == limit.id())
    }

    /// Makes `key`'s theoretical arrival time under `limit` at least `ahead`
    /// from now, as if cells had been taken elsewhere (another store's
    /// state carried over). A later TAT already held is kept.
    pub fn raise(&self, limit: &Limit, key: &RateKey, ahead: Duration) {
        let Some(PerLimit {
            limiter,
            table,
            start,
            ..
        }) = self.per_limit(limit)
        else {
            return;
        };
        let now = limiter.clock().now();
        let tat = u64::from(now.duration_since(*start))
            .saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX / 2));
        let digest = self.seed.hash_one(key);
        let _ = table.measure_and_replace(&digest, |held| {
            let held = held.map_or(0, u64::from);
            Ok::<_, ()>(((), Nanos::from(held.max(tat))))
        });
    }

    /// The synchronous decision; [`Backend::check`] wraps it.
    pub fn decide(&self, limit: &Limit, key: &RateKey) -> Result<Decision, BackendError> {
        let limiter = self
            .limiter(limit)
            .ok_or_else(|| BackendError::UnknownLimit(limit.name.clone()))?;
        let digest = self.seed.hash_one(key);
        Ok(match limiter.check_key(&digest) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::Allowed {
                    remaining,
                    reset_after: limit.reset_after(remaining),
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(limiter.clock().now());
                Decision::Limited {
                    retry_after,
                    reset_after: retry_after + limit.tolerance(),
                }
            }
        })
    }
}

#[async_trait(?Send)]
impl<C> Backend for MemoryBackend<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    async fn check(&self, limit: &Limit, key: &RateKey) -> Result<Decision, BackendError> {
        self.decide(limit, key)
    }

    fn try_check(&self, limit: &Limit, key: &RateKey) -> Option<Result<Decision, BackendError>> {
        Some(self.decide(limit, key))
    }

    fn retain_recent(&self) {
        for l in &self.limiters {
            l.limiter.retain_recent();
        }
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

// === impl SharedTable ===

/// A [`KeyTable`] that the backend reaches besides its limiter (governor
/// owns the store it is given).
#[derive(Clone)]
pub struct SharedTable(Arc<KeyTable>);

impl StateStore for SharedTable {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for SharedTable {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

// === impl KeyTable ===

/// A governor state store holding at most `max_keys` keys.
///
/// Each value is the key's TAT in nanoseconds since the limiter started, with
/// 0 meaning "no state", exactly as governor's own `InMemoryState` stores it.
pub struct KeyTable {
    map: DashMap<u64, AtomicU64, BuildHasherDefault<DigestHasher>>,
    len: AtomicUsize,
    max_keys: usize,
    evicting: AtomicBool,
}

impl KeyTable {
    fn new(max_keys: usize) -> Self {
        KeyTable {
            map: DashMap::default(),
            len: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            evicting: AtomicBool::new(false),
        }
    }

    /// Forgets the eighth of the table with the oldest TATs. One caller sweeps
    /// at a time; other threads keep inserting meanwhile, so for the length of
    /// one sweep the table may hold somewhat more than its cap.
    fn make_room(&self) {
        if self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let len = self.len.load(Ordering::Relaxed).max(1);
        let step = (len / EVICT_SAMPLE).max(1);
        let mut sample: Vec<u64> = self
            .map
            .iter()
            .step_by(step)
            .map(|entry| entry.value().load(Ordering::Relaxed))
            .collect();
        if !sample.is_empty() {
            let nth = (sample.len() / EVICT_DIVISOR).min(sample.len() - 1);
            let (_, threshold, _) = sample.select_nth_unstable(nth);
            let threshold = *threshold;
            self.remove_where(|tat| tat <= threshold);
        }
        self.evicting.store(false, Ordering::Release);
    }

    fn remove_where(&self, mut drop: impl FnMut(u64) -> bool) {
        let mut removed = 0;
        self.map.retain(|_, tat| {
            let gone = drop(tat.load(Ordering::Relaxed));
            removed += usize::from(gone);
            !gone
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
    }
}

/// governor's compare-and-swap loop (`InMemoryState::measure_and_replace_one`):
/// retry until the TAT we decided on is the TAT we replace.
fn measure_and_replace_one<T, E>(
    cell: &AtomicU64,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut prev = cell.load(Ordering::Acquire);
    loop {
        let state = (prev != 0).then(|| Nanos::from(prev));
        let (result, next) = f(state)?;
        match cell.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(actual) => prev = actual,
        }
    }
}

impl StateStore for KeyTable {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(cell) = self.map.get(key) {
            return measure_and_replace_one(&cell, f);
        }
        if self.len.load(Ordering::Relaxed) >= self.max_keys {
            self.make_room();
        }
        let cell = self.map.entry(*key).or_insert_with(|| {
            self.len.fetch_add(1, Ordering::Relaxed);
            AtomicU64::new(0)
        });
        measure_and_replace_one(&cell, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyTable {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        let before = self.len.load(Ordering::Relaxed);
        self.remove_where(|tat| tat <= drop_below);
        if self.len.load(Ordering::Relaxed) < before / 2 {
            self.map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The table's keys are already SipHash digests; hashing them again would
/// only cost time.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used for `u64` keys; fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn limit(rate: &str, burst: u32) -> Limit {
        Limit::new(
            "default",
            rate.parse().unwrap(),
            NonZeroU32::new(burst).unwrap(),
        )
    }

    fn key(n: u32) -> RateKey {
        RateKey::bytes(n.to_string())
    }

    #[test]
    fn table_never_grows_past_its_cap() {
        let l = limit("1/h", 1);
        let backend = MemoryBackend::with_clock([&l], 1000, FakeRelativeClock::default());
        for n in 0..10_000 {
            backend.decide(&l, &key(n)).unwrap();
            assert!(backend.len(&l) <= 1000, "len {} after {n}", backend.len(&l));
        }
        assert!(backend.len(&l) > 1000 - 1000 / EVICT_DIVISOR - 1);
    }

    #[test]
    fn a_full_table_forgets_its_oldest_keys_first() {
        let clock = FakeRelativeClock::default();
        let l = limit("1/min", 1);
        let backend = MemoryBackend::with_clock([&l], 100, clock.clone());
        for n in 0..100 {
            backend.decide(&l, &key(n)).unwrap();
            clock.advance(Duration::from_millis(10));
        }
        // Key 99 was limited most recently, key 0 longest ago.
        backend.decide(&l, &key(1000)).unwrap();
        assert!(!backend.decide(&l, &key(99)).unwrap().is_allowed());
        assert!(backend.decide(&l, &key(0)).unwrap().is_allowed());
    }

    #[test]
    fn retain_recent_drops_keys_that_are_back_to_a_full_burst() {
        let clock = FakeRelativeClock::default();
        let l = limit("10/s", 10);
        let backend = MemoryBackend::with_clock([&l], 1000, clock.clone());
        for n in 0..50 {
            backend.decide(&l, &key(n)).unwrap();
        }
        assert_eq!(backend.len(&l), 50);
        backend.retain_recent();
        assert_eq!(backend.len(&l), 50, "fresh state is kept");
        clock.advance(Duration::from_secs(1));
        backend.retain_recent();
        assert_eq!(backend.len(&l), 0);
    }

    #[test]
    fn a_raised_key_waits_as_long_as_its_new_tat_says_and_an_earlier_one_changes_nothing() {
        let clock = FakeRelativeClock::default();
        let l = limit("1/s", 3);
        let backend = MemoryBackend::with_clock([&l], 100, clock.clone());
        let k = key(1);
        // TAT 3 s ahead = burst spent (tau 2 s): the next cell in 1 s.
        backend.raise(&l, &k, Duration::from_secs(3));
        backend.raise(&l, &k, Duration::from_secs(1));
        match backend.decide(&l, &k).unwrap() {
            Decision::Limited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::from_secs(1));
        assert!(backend.decide(&l, &k).unwrap().is_allowed());
        assert!(!backend.decide(&l, &k).unwrap().is_allowed());
        // Other keys keep their burst.
        assert!(backend.decide(&l, &key(2)).unwrap().is_allowed());
    }

    #[test]
    fn an_unregistered_limit_is_an_error_not_a_panic() {
        let registered = limit("1/s", 1);
        let other = limit("1/s", 1);
        let backend = MemoryBackend::new([&registered], 10);
        assert!(matches!(
            backend.decide(&other, &key(1)),
            Err(BackendError::UnknownLimit(_))
        ));
    }
}
