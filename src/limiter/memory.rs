//! In-memory limiter state: the [`algorithm`](super::algorithm) types over
//! a bounded key table.
//!
//! Each limit has its own table, found by the limit's [`LimitId`], so a
//! limit that survives a rules reload keeps its counters and a new one
//! starts empty. A table is split into stripes, each a `Mutex` over a hash
//! map; a request checked against several limits locks the stripes its keys
//! live in, in one global order (limit id, then stripe), decides every limit,
//! and writes the new states only if all of them allow it. So a refused
//! request is charged to none of its limits, and two requests racing for the
//! last cell never both get it.
//!
//! `max_keys` caps the keys of all tables together. When the process is
//! full, the states that expire first (the keys closest to a fresh one, whose
//! forgetting changes the fewest decisions) are forgotten, an eighth of all
//! keys at a time, as nginx's `limit_req` zone drops its least recently used
//! states. A forgotten key starts again fresh.
//!
//! Keys are stored as 64-bit SipHash-1-3 digests under a per-process random
//! seed, so a table never holds a client's bytes. An address (or the global
//! key) is hashed as it is; any other key is hashed through its
//! [`RateKey::stable_id`], the fingerprint logs and admin answers show, so
//! the admin API finds a header key's state by its fingerprint alone (one
//! keyed BLAKE3 hash per decision for such keys, about 0.1 µs). A GCRA entry is 16 bytes
//! (digest and TAT), a window entry 24 (digest, window end, counts). Two
//! different keys share state only if their digests collide, which an
//! outsider cannot arrange without the seed and which by chance happens with
//! probability about n²/2⁶⁵ (3·10⁻⁸ for a million keys).
//!
//! The clock is governor's `Clock` (quanta's by default; tests use
//! `FakeRelativeClock`), anchored to the Unix epoch at construction so that
//! window boundaries fall where every replica puts them.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock, Reference};
use smallvec::SmallVec;

use super::algorithm::{Counter, State};
use super::{
    Algorithm, Backend, BackendError, Check, Decision, Decisions, Forgotten, KeyStateError, Limit,
    LimitId, RateKey,
};
use crate::key::{DEFAULT_FINGERPRINT_SCOPE, Fingerprinter};

/// Default cap on tracked keys, all limits together (`FLOODGATE_MAX_KEYS`).
///
/// A million GCRA entries take about 40 MiB including the hash tables'
/// slack (measured in `tests/memory.rs`).
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// When full, forget `1 / EVICT_DIVISOR` of the keys at once, so that the
/// O(n) sweep is paid once per n/8 new keys rather than once per key.
const EVICT_DIVISOR: usize = 8;

/// States sampled to find the eviction threshold.
const EVICT_SAMPLE: usize = 4096;

/// Stripes per table: as many as DashMap would shard into (four per CPU,
/// a power of two), at least 8. More stripes would only cost memory: each is
/// a hash table of its own, growing by doubling.
fn stripe_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus * 4).next_power_of_two().clamp(8, 256)
}

/// Limiter state in this process. Build it once and share it (`Arc`) between
/// all workers: each clone of a per-worker backend would count separately.
pub struct MemoryBackend<C: Clock = DefaultClock> {
    /// Read on every decision without a lock or a shared write (arc-swap);
    /// copied on the rare insert of a new limit's table.
    tables: ArcSwap<Registry>,
    seed: RandomState,
    /// How keys other than addresses are named before they are hashed.
    fingerprints: Fingerprinter,
    len: AtomicUsize,
    max_keys: usize,
    evicting: AtomicBool,
    clock: C,
    start: C::Instant,
    /// µs since the epoch at `start`.
    epoch: u64,
}

impl MemoryBackend<DefaultClock> {
    /// State for any limit, at most `max_keys` keys in all.
    pub fn new(max_keys: usize) -> Self {
        Self::with_clock(max_keys, DefaultClock::default())
    }
}

impl<C: Clock> MemoryBackend<C> {
    /// As [`new`](MemoryBackend::new) with a given clock (tests use governor's
    /// `FakeRelativeClock`), anchored to the system time now.
    pub fn with_clock(max_keys: usize, clock: C) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::with_clock_at(max_keys, clock, epoch)
    }

    /// As [`with_clock`](Self::with_clock), with the clock's present
    /// instant taken to be `epoch` after the Unix epoch (tests place window
    /// boundaries exactly).
    pub fn with_clock_at(max_keys: usize, clock: C, epoch: Duration) -> Self {
        MemoryBackend {
            tables: ArcSwap::default(),
            seed: RandomState::new(),
            fingerprints: Fingerprinter::new(DEFAULT_FINGERPRINT_SCOPE),
            len: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            evicting: AtomicBool::new(false),
            start: clock.now(),
            clock,
            epoch: u64::try_from(epoch.as_micros()).unwrap_or(u64::MAX / 2),
        }
    }

    /// Names header and other non-address keys by fingerprints made by
    /// `fingerprints` (floodgate passes the one scoped by its Redis prefix,
    /// as logs and admin answers use), so a key given by its fingerprint
    /// finds its state. The default scope is the default prefix's.
    pub fn fingerprints(mut self, fingerprints: Fingerprinter) -> Self {
        self.fingerprints = fingerprints;
        self
    }

    /// The table digest of `key` (see the module docs).
    fn digest(&self, key: &RateKey) -> u64 {
        if key.is_plain() {
            return self.seed.hash_one(key);
        }
        thread_local! {
            // Reused, so naming a key costs no allocation per decision.
            static ID: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(super::MAX_STABLE_ID));
        }
        ID.with_borrow_mut(|id| {
            id.clear();
            key.write_stable_id(&self.fingerprints, id);
            self.seed.hash_one(id.as_slice())
        })
    }

    /// Now, µs since the Unix epoch.
    pub fn now_micros(&self) -> u64 {
        let since = u64::from(self.clock.now().duration_since(self.start)) / 1000;
        self.epoch.saturating_add(since)
    }

    /// Keys currently tracked for `limit`.
    pub fn len(&self, limit: &Limit) -> usize {
        self.existing(limit)
            .map_or(0, |t| t.len.load(Ordering::Relaxed))
    }

    /// Whether no key is tracked for `limit`.
    pub fn is_empty(&self, limit: &Limit) -> bool {
        self.len(limit) == 0
    }

    /// Keys tracked for all limits together (what `max_keys` caps).
    pub fn total_len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn existing(&self, limit: &Limit) -> Option<Arc<Table>> {
        self.tables.load().get(&limit.id()).cloned()
    }

    fn table(&self, limit: &Limit) -> Arc<Table> {
        if let Some(table) = self.existing(limit) {
            return table;
        }
        self.add_table(limit);
        self.existing(limit).expect("just added")
    }

    /// Makes sure `limit` has a table (tables are never removed).
    fn add_table(&self, limit: &Limit) {
        self.tables.rcu(|tables| {
            let mut tables = Registry::clone(tables);
            tables
                .entry(limit.id())
                .or_insert_with(|| Arc::new(Table::new(limit.algorithm())));
            tables
        });
    }

    /// Makes `key`'s state under `limit` what `update` returns from the
    /// state held now (`None`: no state), as if requests had been counted
    /// elsewhere (another store's state carried over, or a charge-back).
    pub fn update(
        &self,
        limit: &Limit,
        key: &RateKey,
        update: impl FnOnce(Option<State>, u64) -> State,
    ) {
        let now = self.now_micros();
        self.make_room_if_full();
        let table = self.table(limit);
        let digest = self.digest(key);
        let mut stripe = table.lock(digest);
        let held = stripe.get(digest, now);
        let next = update(held, now);
        if stripe.put(digest, next) {
            table.len.fetch_add(1, Ordering::Relaxed);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes `key`'s theoretical arrival time under a GCRA `limit` at least
    /// `ahead` from now, as if cells had been taken elsewhere. A later TAT
    /// already held is kept.
    pub fn raise(&self, limit: &Limit, key: &RateKey, ahead: Duration) {
        let ahead = u64::try_from(ahead.as_micros()).unwrap_or(u64::MAX / 2);
        self.update(limit, key, |held, now| State {
            expires: held.map_or(0, |s| s.expires).max(now.saturating_add(ahead)),
            count: 0,
        });
    }

    /// The state held for `key` under `limit`, if any (not expired).
    pub fn state(&self, limit: &Limit, key: &RateKey) -> Option<State> {
        let now = self.now_micros();
        let table = self.existing(limit)?;
        let digest = self.digest(key);
        table.lock(digest).get(digest, now)
    }

    /// What `key` has left under `limit` now, without charging it.
    pub fn peek(&self, limit: &Limit, key: &RateKey) -> Decision {
        limit
            .counter()
            .peek(self.state(limit, key), self.now_micros())
    }

    /// Forgets `key`'s state under `limit`: its next request is a fresh
    /// key's. Returns whether there was any.
    pub fn forget(&self, limit: &Limit, key: &RateKey) -> bool {
        let Some(table) = self.existing(limit) else {
            return false;
        };
        let digest = self.digest(key);
        let removed = table.lock(digest).remove(digest);
        if removed {
            table.len.fetch_sub(1, Ordering::Relaxed);
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// The synchronous decision for one limit.
    pub fn decide(&self, limit: &Limit, key: &RateKey) -> Result<Decision, BackendError> {
        Ok(self.decide_all(&[Check { limit, key }])[0])
    }

    /// The synchronous, all-or-nothing decision for several limits
    /// ([`Backend::check_all`] wraps it).
    pub fn decide_all(&self, checks: &[Check<'_>]) -> Decisions {
        let now = self.now_micros();
        self.make_room_if_full();
        if let [check] = checks {
            return std::iter::once(self.decide_one(check, now)).collect();
        }
        self.decide_many(checks, now)
    }

    fn decide_one(&self, check: &Check<'_>, now: u64) -> Decision {
        let tables = self.tables.load();
        let Some(table) = tables.get(&check.limit.id()) else {
            drop(tables);
            self.add_table(check.limit);
            return self.decide_one(check, now);
        };
        let digest = self.digest(check.key);
        let mut stripe = table.lock(digest);
        let step = check.limit.counter().step(stripe.get(digest, now), now);
        if let Some(next) = step.next
            && stripe.put(digest, next)
        {
            table.len.fetch_add(1, Ordering::Relaxed);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        step.decision
    }

    fn decide_many(&self, checks: &[Check<'_>], now: u64) -> Decisions {
        struct Item<'t> {
            id: LimitId,
            table: &'t Table,
            digest: u64,
            counter: Counter,
        }
        let mut tables = self.tables.load();
        if checks.iter().any(|c| !tables.contains_key(&c.limit.id())) {
            drop(tables);
            for check in checks {
                self.add_table(check.limit);
            }
            tables = self.tables.load();
        }
        let mut items: SmallVec<[Item<'_>; 4]> = SmallVec::with_capacity(checks.len());
        for (i, c) in checks.iter().enumerate() {
            // A key shared by several limits is hashed once.
            let digest = match checks[..i]
                .iter()
                .position(|earlier| std::ptr::eq(earlier.key, c.key) || earlier.key == c.key)
            {
                Some(j) => items[j].digest,
                None => self.digest(c.key),
            };
            items.push(Item {
                id: c.limit.id(),
                table: &tables[&c.limit.id()],
                digest,
                counter: c.limit.counter(),
            });
        }
        // Lock every stripe involved once, in (limit id, stripe) order.
        let mut order: SmallVec<[(LimitId, usize, usize); 4]> = items
            .iter()
            .enumerate()
            .map(|(i, item)| (item.id, item.table.stripe(item.digest), i))
            .collect();
        order.sort_unstable();
        let mut guards: SmallVec<[Stripe<'_>; 4]> = SmallVec::new();
        let mut guard_of: SmallVec<[usize; 4]> = SmallVec::from_elem(0, items.len());
        let mut last: Option<(LimitId, usize)> = None;
        for &(id, stripe, i) in &order {
            if last != Some((id, stripe)) {
                guards.push(items[i].table.lock(items[i].digest));
                last = Some((id, stripe));
            }
            guard_of[i] = guards.len() - 1;
        }
        // Decide in order; a (limit, key) checked twice sees its first charge.
        let mut nexts: SmallVec<[Option<State>; 4]> = SmallVec::new();
        let mut decisions = Decisions::new();
        let mut refused = false;
        for (i, item) in items.iter().enumerate() {
            let earlier = (0..i).rev().find(|&j| {
                items[j].id == item.id && items[j].digest == item.digest && nexts[j].is_some()
            });
            let held = match earlier {
                Some(j) => nexts[j],
                None => guards[guard_of[i]].get(item.digest, now),
            };
            let step = item.counter.step(held, now);
            refused |= step.next.is_none();
            nexts.push(step.next);
            decisions.push(step.decision);
        }
        if refused {
            // Charged to none: report what each key has without this request.
            for (i, item) in items.iter().enumerate() {
                if decisions[i].is_allowed() {
                    let held = guards[guard_of[i]].get(item.digest, now);
                    decisions[i] = item.counter.peek(held, now);
                }
            }
            return decisions;
        }
        for (i, item) in items.iter().enumerate() {
            if let Some(next) = nexts[i]
                && guards[guard_of[i]].put(item.digest, next)
            {
                item.table.len.fetch_add(1, Ordering::Relaxed);
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        decisions
    }

    fn make_room_if_full(&self) {
        if self.len.load(Ordering::Relaxed) >= self.max_keys {
            self.make_room();
        }
    }

    /// Forgets the eighth of all keys whose states expire first. One caller
    /// sweeps at a time; other threads keep inserting meanwhile, so for the
    /// length of one sweep the process may hold somewhat more than its cap.
    fn make_room(&self) {
        if self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let tables: Vec<Arc<Table>> = self.tables.load().values().cloned().collect();
        let len = self.len.load(Ordering::Relaxed).max(1);
        let step = (len / EVICT_SAMPLE).max(1);
        let mut sample = Vec::with_capacity(EVICT_SAMPLE + 64);
        let mut seen = 0usize;
        for table in &tables {
            table.each_expiry(|expires| {
                if seen % step == 0 {
                    sample.push(expires);
                }
                seen += 1;
            });
        }
        if !sample.is_empty() {
            let nth = (sample.len() / EVICT_DIVISOR).min(sample.len() - 1);
            let (_, threshold, _) = sample.select_nth_unstable(nth);
            let threshold = *threshold;
            for table in &tables {
                let removed = table.remove_where(|expires| expires <= threshold);
                self.len.fetch_sub(removed, Ordering::Relaxed);
            }
        }
        self.evicting.store(false, Ordering::Release);
    }
}

#[async_trait(?Send)]
impl<C> Backend for MemoryBackend<C>
where
    C: Clock + Send + Sync,
    C::Instant: Send + Sync,
{
    async fn check_all(&self, checks: &[Check<'_>]) -> Result<Decisions, BackendError> {
        Ok(self.decide_all(checks))
    }

    fn try_check_all(&self, checks: &[Check<'_>]) -> Option<Result<Decisions, BackendError>> {
        Some(Ok(self.decide_all(checks)))
    }

    async fn inspect(&self, checks: &[Check<'_>]) -> Result<Decisions, KeyStateError> {
        Ok(checks.iter().map(|c| self.peek(c.limit, c.key)).collect())
    }

    async fn reset(&self, checks: &[Check<'_>]) -> Result<Forgotten, KeyStateError> {
        Ok(checks.iter().map(|c| self.forget(c.limit, c.key)).collect())
    }

    fn retain_recent(&self) {
        let now = self.now_micros();
        let tables: Vec<Arc<Table>> = self.tables.load().values().cloned().collect();
        for table in tables {
            let removed = table.remove_where(|expires| expires <= now);
            self.len.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> super::BackendStats {
        super::BackendStats {
            keys: Some(self.total_len() as u64),
            ..Default::default()
        }
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

// === Table ===

type Map<V> = HashMap<u64, V, BuildHasherDefault<DigestHasher>>;

/// Tables by limit; a [`LimitId`] is already a hash.
type Registry = HashMap<LimitId, Arc<Table>, BuildHasherDefault<DigestHasher>>;

/// One limit's keys: GCRA keeps only a TAT per key, the windows a
/// [`State`].
struct Table {
    kind: Kind,
    len: AtomicUsize,
}

enum Kind {
    Tat(Box<[Mutex<Map<u64>>]>),
    Window(Box<[Mutex<Map<State>>]>),
}

/// A locked stripe of a [`Table`].
enum Stripe<'a> {
    Tat(MutexGuard<'a, Map<u64>>),
    Window(MutexGuard<'a, Map<State>>),
}

/// The stripe of `digest` among `count` (a power of two).
fn stripe_of(digest: u64, count: usize) -> usize {
    // Middle bits: hashbrown uses the low bits for the bucket and the top
    // seven for its tags.
    (digest >> 32) as usize & (count - 1)
}

fn stripes<V>() -> Box<[Mutex<Map<V>>]> {
    (0..stripe_count()).map(|_| Mutex::default()).collect()
}

impl Table {
    fn new(algorithm: Algorithm) -> Self {
        Table {
            kind: match algorithm {
                Algorithm::Gcra => Kind::Tat(stripes()),
                Algorithm::FixedWindow | Algorithm::SlidingWindow => Kind::Window(stripes()),
            },
            len: AtomicUsize::new(0),
        }
    }

    fn stripe(&self, digest: u64) -> usize {
        let count = match &self.kind {
            Kind::Tat(s) => s.len(),
            Kind::Window(s) => s.len(),
        };
        stripe_of(digest, count)
    }

    fn lock(&self, digest: u64) -> Stripe<'_> {
        let i = self.stripe(digest);
        match &self.kind {
            Kind::Tat(s) => Stripe::Tat(s[i].lock().unwrap_or_else(PoisonError::into_inner)),
            Kind::Window(s) => Stripe::Window(s[i].lock().unwrap_or_else(PoisonError::into_inner)),
        }
    }

    fn each_expiry(&self, mut f: impl FnMut(u64)) {
        match &self.kind {
            Kind::Tat(stripes) => {
                for stripe in stripes.iter() {
                    let map = stripe.lock().unwrap_or_else(PoisonError::into_inner);
                    map.values().for_each(|&tat| f(tat));
                }
            }
            Kind::Window(stripes) => {
                for stripe in stripes.iter() {
                    let map = stripe.lock().unwrap_or_else(PoisonError::into_inner);
                    map.values().for_each(|s| f(s.expires));
                }
            }
        }
    }

    /// Removes the keys whose expiry `drop` selects; returns how many.
    fn remove_where(&self, drop: impl Fn(u64) -> bool) -> usize {
        let mut removed = 0;
        fn sweep<V>(
            stripes: &[Mutex<Map<V>>],
            expires: impl Fn(&V) -> u64,
            drop: &dyn Fn(u64) -> bool,
        ) -> usize {
            let mut removed = 0;
            for stripe in stripes {
                let mut map = stripe.lock().unwrap_or_else(PoisonError::into_inner);
                let before = map.len();
                map.retain(|_, v| !drop(expires(v)));
                removed += before - map.len();
                if map.len() < map.capacity() / 4 {
                    map.shrink_to_fit();
                }
            }
            removed
        }
        removed += match &self.kind {
            Kind::Tat(stripes) => sweep(stripes, |&tat| tat, &drop),
            Kind::Window(stripes) => sweep(stripes, |s| s.expires, &drop),
        };
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

impl Stripe<'_> {
    /// The state held for `digest`, unless it has expired by `now`.
    fn get(&self, digest: u64, now: u64) -> Option<State> {
        let state = match self {
            Stripe::Tat(map) => map.get(&digest).map(|&tat| State {
                expires: tat,
                count: 0,
            }),
            Stripe::Window(map) => map.get(&digest).copied(),
        };
        state.filter(|s| s.expires > now)
    }

    /// Stores `state`; returns whether the key is new to the table.
    fn put(&mut self, digest: u64, state: State) -> bool {
        match self {
            Stripe::Tat(map) => map.insert(digest, state.expires).is_none(),
            Stripe::Window(map) => map.insert(digest, state).is_none(),
        }
    }

    fn remove(&mut self, digest: u64) -> bool {
        match self {
            Stripe::Tat(map) => map.remove(&digest).is_some(),
            Stripe::Window(map) => map.remove(&digest).is_some(),
        }
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

    #[test]
    fn a_header_key_is_found_by_its_fingerprint_alone() {
        use actix_web::http::header::HeaderValue;
        let scope = Fingerprinter::new(b"tenant-a:");
        let memory = MemoryBackend::new(100).fingerprints(scope.clone());
        let limit = limit("1/h", 3);
        let value = RateKey::header(HeaderValue::from_static("sk_live_abc"));
        let by_fp = RateKey::header_fingerprint(scope.fingerprint(b"sk_live_abc"));
        memory.decide(&limit, &value).unwrap();
        assert_eq!(memory.peek(&limit, &by_fp).remaining(), 2);
        // Composites too: their id fingerprints their parts' ids.
        let ip = RateKey::ip("192.0.2.1".parse().unwrap());
        let both = RateKey::composite([value.clone(), ip.clone()]);
        memory.decide(&limit, &both).unwrap();
        assert_eq!(
            memory
                .peek(&limit, &RateKey::composite([by_fp.clone(), ip]))
                .remaining(),
            2
        );
        assert!(memory.forget(&limit, &by_fp));
        assert_eq!(memory.peek(&limit, &value).remaining(), 3);
        // Another scope names the value differently.
        let other =
            RateKey::header_fingerprint(Fingerprinter::new(b"b:").fingerprint(b"sk_live_abc"));
        memory.decide(&limit, &value).unwrap();
        assert_eq!(memory.peek(&limit, &other).remaining(), 3);
    }

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
        let backend = MemoryBackend::with_clock(1000, FakeRelativeClock::default());
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
        let backend = MemoryBackend::with_clock(100, clock.clone());
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
        let backend = MemoryBackend::with_clock(1000, clock.clone());
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
        let backend = MemoryBackend::with_clock(100, clock.clone());
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
    fn a_request_refused_by_one_limit_is_charged_to_none() {
        let clock = FakeRelativeClock::default();
        let burst = limit("1/h", 3);
        let quota = Limit::window("daily", "2/d".parse().unwrap(), Algorithm::FixedWindow).unwrap();
        let backend = MemoryBackend::with_clock(100, clock);
        let k = key(1);
        let checks = [
            Check {
                limit: &burst,
                key: &k,
            },
            Check {
                limit: &quota,
                key: &k,
            },
        ];
        let first = backend.decide_all(&checks);
        assert!(first.iter().all(Decision::is_allowed), "{first:?}");
        assert_eq!((first[0].remaining(), first[1].remaining()), (2, 1));
        assert!(backend.decide_all(&checks).iter().all(Decision::is_allowed));
        // The quota is spent; the burst still has one cell, which the
        // refused request must not take.
        for _ in 0..3 {
            let refused = backend.decide_all(&checks);
            assert!(
                refused[0].is_allowed() && !refused[1].is_allowed(),
                "{refused:?}"
            );
            assert_eq!(refused[0].remaining(), 1, "the burst was not charged");
        }
        assert_eq!(backend.peek(&burst, &k).remaining(), 1);
        // Alone, the burst limit still gives its last cell.
        assert!(backend.decide(&burst, &k).unwrap().is_allowed());
    }

    #[test]
    fn max_keys_caps_all_limits_together() {
        let a = limit("1/h", 1);
        let b = Limit::new("b", "1/h".parse().unwrap(), NonZeroU32::new(1).unwrap());
        let backend = MemoryBackend::with_clock(1000, FakeRelativeClock::default());
        for n in 0..5000 {
            backend.decide(&a, &key(n)).unwrap();
            backend.decide(&b, &key(n)).unwrap();
            assert!(
                backend.total_len() <= 1000,
                "len {} after {n}",
                backend.total_len()
            );
        }
        assert!(backend.len(&a) > 0 && backend.len(&b) > 0);
    }

    #[test]
    fn a_limit_rebuilt_keeps_its_state_and_a_new_name_or_algorithm_starts_fresh() {
        let backend = MemoryBackend::with_clock(100, FakeRelativeClock::default());
        let before = limit("1/h", 1);
        assert!(backend.decide(&before, &key(1)).unwrap().is_allowed());
        let same = limit("1/h", 1);
        assert_eq!(same.id(), before.id());
        assert!(!backend.decide(&same, &key(1)).unwrap().is_allowed());
        for other in [
            Limit::new("login", "1/h".parse().unwrap(), NonZeroU32::new(1).unwrap()),
            Limit::window("default", "1/h".parse().unwrap(), Algorithm::FixedWindow).unwrap(),
        ] {
            assert_ne!(other.id(), before.id());
            assert!(backend.decide(&other, &key(1)).unwrap().is_allowed());
        }
    }

    #[test]
    fn forget_gives_a_key_a_fresh_start() {
        let l = limit("1/h", 1);
        let backend = MemoryBackend::with_clock(100, FakeRelativeClock::default());
        assert!(backend.decide(&l, &key(1)).unwrap().is_allowed());
        assert!(!backend.decide(&l, &key(1)).unwrap().is_allowed());
        assert!(backend.forget(&l, &key(1)));
        assert!(!backend.forget(&l, &key(1)));
        assert!(backend.decide(&l, &key(1)).unwrap().is_allowed());
        assert_eq!(backend.total_len(), 1);
    }

    #[test]
    fn windows_line_up_with_the_unix_epoch() {
        let clock = FakeRelativeClock::default();
        // 10 ms before a minute boundary.
        let backend = MemoryBackend::with_clock_at(
            100,
            clock.clone(),
            Duration::from_secs(1_800_000_060) - Duration::from_millis(10),
        );
        let l = Limit::window("w", "2/min".parse().unwrap(), Algorithm::FixedWindow).unwrap();
        assert!(backend.decide(&l, &key(1)).unwrap().is_allowed());
        assert!(backend.decide(&l, &key(1)).unwrap().is_allowed());
        match backend.decide(&l, &key(1)).unwrap() {
            Decision::Limited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_millis(10))
            }
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::from_millis(10));
        assert!(backend.decide(&l, &key(1)).unwrap().is_allowed());
    }
}
