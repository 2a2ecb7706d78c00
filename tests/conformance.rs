//! One set of cases, run against every backend: memory, one Redis and a
//! Redis Cluster must agree on bursts, refill, remaining, retry-after,
//! isolation, each algorithm's window boundaries, all-or-nothing over
//! several limits, and exactness under concurrency (governor runs its tests
//! against each state store the same way).
//!
//! Boundaries: the memory backend runs on governor's fake clock anchored at
//! an instant after the epoch, so boundaries are exact; Redis runs on its
//! own `TIME`, so its cases wait for real time with 2-second windows, placed
//! just before a boundary (each such case takes at most about 2.5 s).

mod support;

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use floodgate::limiter::{Algorithm, Check, Decisions, Fallback, RedisTarget};
use floodgate::{Backend, Decision, Limit, MemoryBackend, RateKey, RedisBackend};
use governor::clock::FakeRelativeClock;

fn limit(rate: &str, burst: u32) -> Limit {
    Limit::new(
        "default",
        rate.parse().unwrap(),
        NonZeroU32::new(burst).unwrap(),
    )
}

fn key(name: &str) -> RateKey {
    RateKey::bytes(name.to_owned())
}

fn close(actual: Duration, expected: Duration, what: &str) {
    let diff = actual.abs_diff(expected);
    assert!(
        diff <= Duration::from_millis(250),
        "{what}: {actual:?} is not about {expected:?}"
    );
}

async fn check(b: &dyn Backend, l: &Limit, k: &RateKey) -> Decision {
    b.check(l, k).await.expect("backend answers")
}

// === the cases ===

async fn burst_is_taken_then_limited(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    let l = limit("5/h", 5);
    let b = make(&[&l]).await;
    let k = key("burst");
    for remaining in (0..5).rev() {
        match check(&*b, &l, &k).await {
            Decision::Allowed {
                remaining: r,
                reset_after,
            } => {
                assert_eq!(r, remaining);
                assert_eq!(reset_after, l.emission_interval() * (5 - remaining));
            }
            limited => panic!("expected allowed, got {limited:?}"),
        }
    }
    match check(&*b, &l, &k).await {
        Decision::Limited {
            retry_after,
            reset_after,
        } => {
            close(retry_after, Duration::from_secs(720), "retry_after");
            close(reset_after, Duration::from_secs(3600), "reset_after");
        }
        allowed => panic!("expected limited, got {allowed:?}"),
    }
}

async fn a_refusal_takes_nothing(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    let l = limit("1/h", 1);
    let b = make(&[&l]).await;
    let k = key("refusal");
    assert!(check(&*b, &l, &k).await.is_allowed());
    let mut first = None;
    for _ in 0..20 {
        let Decision::Limited { retry_after, .. } = check(&*b, &l, &k).await else {
            panic!("a refused key stays refused")
        };
        let first = *first.get_or_insert(retry_after);
        close(
            retry_after,
            first,
            "retry_after does not grow with refusals",
        );
    }
}

async fn cells_come_back_one_per_emission_interval(
    make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>,
) {
    let l = limit("20/s", 2); // T = 50 ms
    let b = make(&[&l]).await;
    let k = key("refill");
    assert!(check(&*b, &l, &k).await.is_allowed());
    assert!(check(&*b, &l, &k).await.is_allowed());
    let started = Instant::now();
    let Decision::Limited { retry_after, .. } = check(&*b, &l, &k).await else {
        panic!("burst of 2 is used up")
    };
    assert!(retry_after <= Duration::from_millis(50), "{retry_after:?}");
    let mut allowed = false;
    while started.elapsed() < support::patience() {
        if check(&*b, &l, &k).await.is_allowed() {
            allowed = true;
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(allowed, "a cell came back");
    assert!(started.elapsed() >= retry_after.saturating_sub(Duration::from_millis(5)));
    assert!(
        !check(&*b, &l, &k).await.is_allowed(),
        "only one cell came back"
    );
}

async fn keys_are_isolated(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    let l = limit("2/h", 2);
    let b = make(&[&l]).await;
    for _ in 0..2 {
        assert!(check(&*b, &l, &key("a")).await.is_allowed());
    }
    assert!(!check(&*b, &l, &key("a")).await.is_allowed());
    assert_eq!(check(&*b, &l, &key("b")).await.remaining(), 1);
    let ip = RateKey::ip("192.0.2.1".parse().unwrap());
    let same_text = RateKey::header(actix_web::http::header::HeaderValue::from_static(
        "192.0.2.1",
    ));
    assert!(check(&*b, &l, &ip).await.is_allowed());
    assert!(check(&*b, &l, &ip).await.is_allowed());
    assert!(!check(&*b, &l, &ip).await.is_allowed());
    assert!(
        check(&*b, &l, &same_text).await.is_allowed(),
        "kinds never collide"
    );
}

/// A value that spells another value's stored id gets its own budget. Ids
/// used to keep short values in clear and store a long one as `#` and its
/// SHA-1, so the header `#<sha1 of V>` spent V's budget.
async fn values_never_spell_another_values_id(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    use actix_web::http::header::HeaderValue;
    let l = limit("1/h", 1);
    let b = make(&[&l]).await;
    let long = "x".repeat(65);
    let victim = RateKey::header(HeaderValue::from_str(&long).unwrap());
    assert!(check(&*b, &l, &victim).await.is_allowed());
    assert!(!check(&*b, &l, &victim).await.is_allowed());
    let fingerprint =
        floodgate::key::Fingerprinter::new(b"conformance:").fingerprint(long.as_bytes());
    for spelled in [
        // SHA-1 of 65 times "x".
        "#78c741ddc482e4cdf8c474a0876347a0905b6233".to_owned(),
        fingerprint.to_string(),
        format!("h:{fingerprint}"),
    ] {
        let attacker = RateKey::header(HeaderValue::from_str(&spelled).unwrap());
        assert!(
            check(&*b, &l, &attacker).await.is_allowed(),
            "{spelled:?} got the victim's spent budget"
        );
        let attacker = RateKey::bytes(spelled.clone());
        assert!(
            check(&*b, &l, &attacker).await.is_allowed(),
            "bytes {spelled:?} got the victim's spent budget"
        );
    }
}

async fn limits_are_isolated(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    let per_hour = limit("1/h", 1);
    let mut per_day = limit("1/d", 1);
    per_day = Limit::new("daily", per_day.rate(), per_day.burst());
    let b = make(&[&per_hour, &per_day]).await;
    let k = key("multi");
    assert!(check(&*b, &per_hour, &k).await.is_allowed());
    assert!(!check(&*b, &per_hour, &k).await.is_allowed());
    assert!(check(&*b, &per_day, &k).await.is_allowed());
    // Identity is the limit's name (and algorithm): built again, it finds
    // its state, as after a rules reload.
    let rebuilt = limit("1/h", 1);
    assert!(!check(&*b, &rebuilt, &k).await.is_allowed());
}

async fn concurrent_checks_never_share_the_last_cell(
    make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>,
) {
    let l = limit("20/h", 20);
    let b = make(&[&l]).await;
    let k = key("race");
    // Interleaved with a second key: each key's decisions see the ones
    // before them, whichever way the backend groups them.
    let other = key("race-other");
    let checks = (0..60).map(|i| b.check(&l, if i % 4 == 3 { &other } else { &k }));
    let decisions = futures_util::future::join_all(checks).await;
    let mut remaining = Vec::new();
    let mut remaining_other = Vec::new();
    for (i, d) in decisions.iter().enumerate() {
        if let Decision::Allowed { remaining: r, .. } = d.as_ref().unwrap() {
            if i % 4 == 3 {
                &mut remaining_other
            } else {
                &mut remaining
            }
            .push(*r);
        }
    }
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..20).collect::<Vec<u32>>(),
        "one key, 45 at once"
    );
    remaining_other.sort_unstable();
    assert_eq!(
        remaining_other,
        (5..20).collect::<Vec<u32>>(),
        "the other, 15"
    );
    // Refusals took nothing: the next one is refused too, not the last cell.
    assert!(!check(&*b, &l, &k).await.is_allowed());
    assert_eq!(check(&*b, &l, &other).await.remaining(), 4);

    // And from several threads at once.
    let l2 = limit("30/h", 30);
    let b2 = make(&[&l2]).await;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let b2 = b2.clone();
            let l2 = l2.clone();
            std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let k = key("threads");
                    let mut allowed = 0;
                    for _ in 0..25 {
                        allowed += usize::from(b2.check(&l2, &k).await.unwrap().is_allowed());
                    }
                    allowed
                })
            })
        })
        .collect();
    // Join without blocking this runtime: it may be driving the connection.
    let mut allowed = 0;
    for t in threads {
        allowed += actix_web::rt::task::spawn_blocking(move || t.join().unwrap())
            .await
            .unwrap();
    }
    assert_eq!(allowed, 30);
}

// === time, for the window cases ===

/// Time as a backend sees it: the memory backend's fake clock (with the
/// instant after the epoch it stands at), or real time (Redis's `TIME`).
enum Clock {
    Fake {
        clock: FakeRelativeClock,
        at: Mutex<Duration>,
    },
    Real,
}

impl Clock {
    fn now(&self) -> Duration {
        match self {
            Clock::Fake { at, .. } => *at.lock().unwrap(),
            Clock::Real => SystemTime::now().duration_since(UNIX_EPOCH).unwrap(),
        }
    }

    async fn sleep_until(&self, t: Duration) {
        let wait = t.saturating_sub(self.now());
        match self {
            Clock::Fake { clock, at } => {
                clock.advance(wait);
                *at.lock().unwrap() += wait;
            }
            Clock::Real => actix_web::rt::time::sleep(wait).await,
        }
    }

    /// Waits until `lead` before a multiple of `window` since the epoch;
    /// returns that boundary.
    async fn before_boundary(&self, window: Duration, lead: Duration) -> Duration {
        let w = window.as_micros();
        let after = (self.now() + lead).as_micros();
        let boundary = Duration::from_micros(((after / w + 1) * w) as u64);
        self.sleep_until(boundary - lead).await;
        boundary
    }
}

/// A backend and the clock it decides by.
type Clocked = (Arc<dyn Backend>, Clock);

/// How far before a boundary the window cases start.
const LEAD: Duration = Duration::from_millis(200);
/// How far after it they go on.
const AFTER: Duration = Duration::from_millis(20);

fn window(name: &str, rate: &str, algorithm: Algorithm) -> Limit {
    Limit::window(name, rate.parse().unwrap(), algorithm).unwrap()
}

/// Sends `n` checks one after the other; returns how many were allowed.
async fn admitted(b: &dyn Backend, l: &Limit, k: &RateKey, n: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..n {
        allowed += usize::from(check(b, l, k).await.is_allowed());
    }
    allowed
}

async fn fixed_window_admits_2n_across_a_boundary(make: impl AsyncFn() -> Clocked) {
    let (b, clock) = make().await;
    let l = window("fixed", "5/2s", Algorithm::FixedWindow);
    let k = key("fixed-boundary");
    let boundary = clock.before_boundary(Duration::from_secs(2), LEAD).await;
    assert_eq!(admitted(&*b, &l, &k, 5).await, 5, "the window's n");
    let Decision::Limited { retry_after, .. } = check(&*b, &l, &k).await else {
        panic!("the sixth in one window is refused")
    };
    assert!(
        retry_after <= LEAD,
        "retry at the boundary: {retry_after:?}"
    );
    clock.sleep_until(boundary + AFTER).await;
    assert_eq!(
        admitted(&*b, &l, &k, 6).await,
        5,
        "a new window: n more, 2n within {:?}",
        LEAD + AFTER
    );
}

async fn sliding_window_does_not_admit_2n_across_a_boundary(make: impl AsyncFn() -> Clocked) {
    let (b, clock) = make().await;
    let l = window("sliding", "5/2s", Algorithm::SlidingWindow);
    let k = key("sliding-boundary");
    let boundary = clock.before_boundary(Duration::from_secs(2), LEAD).await;
    assert_eq!(admitted(&*b, &l, &k, 6).await, 5, "the window's n");
    clock.sleep_until(boundary + AFTER).await;
    // 20 to 400 ms into the new window the previous one weighs
    // floor(5 * (2000 - e) / 2000) = 4: one more request fits, not five.
    assert_eq!(
        admitted(&*b, &l, &k, 6).await,
        1,
        "n + 1 across the boundary"
    );
    let Decision::Limited { retry_after, .. } = check(&*b, &l, &k).await else {
        panic!("refused")
    };
    assert!(
        retry_after > Duration::from_millis(100),
        "the estimate decays slowly: {retry_after:?}"
    );
}

async fn gcra_knows_no_window_boundary(make: impl AsyncFn() -> Clocked) {
    let (b, clock) = make().await;
    // T = 400 ms: no cell comes back within LEAD + AFTER.
    let l = limit("5/2s", 5);
    let k = key("gcra-boundary");
    let boundary = clock.before_boundary(Duration::from_secs(2), LEAD).await;
    assert_eq!(admitted(&*b, &l, &k, 6).await, 5, "the burst");
    clock.sleep_until(boundary + AFTER).await;
    assert_eq!(
        admitted(&*b, &l, &k, 3).await,
        0,
        "a boundary gives nothing back"
    );
}

// === several limits ===

fn checks<'a>(limits: &[&'a Limit], k: &'a RateKey) -> Vec<Check<'a>> {
    limits
        .iter()
        .map(|&limit| Check { limit, key: k })
        .collect()
}

async fn check_all(b: &dyn Backend, checks: &[Check<'_>]) -> Decisions {
    b.check_all(checks).await.expect("backend answers")
}

async fn a_request_refused_by_one_of_two_limits_is_charged_to_neither(
    make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>,
) {
    let burst = Limit::new("burst", "1/h".parse().unwrap(), NonZeroU32::new(3).unwrap());
    let quota = window("quota", "2/d", Algorithm::FixedWindow);
    let b = make(&[&burst, &quota]).await;
    let k = key("two");
    let both = checks(&[&burst, &quota], &k);
    let first = check_all(&*b, &both).await;
    assert_eq!(
        (first[0].remaining(), first[1].remaining()),
        (2, 1),
        "{first:?}"
    );
    assert!(check_all(&*b, &both).await.iter().all(Decision::is_allowed));
    for _ in 0..3 {
        let refused = check_all(&*b, &both).await;
        assert!(
            refused[0].is_allowed() && !refused[1].is_allowed(),
            "{refused:?}"
        );
        assert_eq!(refused[0].remaining(), 1, "the burst was not charged");
    }
    // Alone, the burst limit still has its last cell.
    assert_eq!(check(&*b, &burst, &k).await.remaining(), 0);
    assert!(!check(&*b, &burst, &k).await.is_allowed());
}

async fn a_request_refused_by_one_of_three_limits_is_charged_to_none(
    make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>,
) {
    let sliding = window("s3", "2/d", Algorithm::SlidingWindow);
    let gcra = Limit::new("g3", "1/h".parse().unwrap(), NonZeroU32::new(5).unwrap());
    let fixed = window("f3", "10/d", Algorithm::FixedWindow);
    let b = make(&[&sliding, &gcra, &fixed]).await;
    let k = key("three");
    let all = checks(&[&sliding, &gcra, &fixed], &k);
    for _ in 0..2 {
        assert!(check_all(&*b, &all).await.iter().all(Decision::is_allowed));
    }
    for _ in 0..3 {
        let refused = check_all(&*b, &all).await;
        assert!(!refused[0].is_allowed(), "{refused:?}");
        assert_eq!(
            (refused[1].remaining(), refused[2].remaining()),
            (3, 8),
            "the others report what they have without the request: {refused:?}"
        );
    }
    assert_eq!(check(&*b, &gcra, &k).await.remaining(), 2);
    assert_eq!(check(&*b, &fixed, &k).await.remaining(), 7);
}

/// A limit on one key for everyone and one per client: on a Cluster the two
/// keys are in different slots. Several clients, so that the limit that
/// refuses comes first in slot order for some and last for others (`{g}` is
/// slot 7233; clients 4, 5, 8, 10, 11, 14 and 15 hash below it, 3, 6, 7, 12
/// and 13 above): both the refund of a charged slot and the look at a slot
/// after a refusal are exercised.
async fn limits_on_different_keys_are_all_or_nothing_too(
    make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>,
) {
    let everyone = Limit::new(
        "everyone",
        "1/h".parse().unwrap(),
        NonZeroU32::new(2).unwrap(),
    );
    let per_client = Limit::new(
        "per-client",
        "1/h".parse().unwrap(),
        NonZeroU32::new(1).unwrap(),
    );
    let b = make(&[&everyone, &per_client]).await;
    let global = RateKey::global();
    let client = |n: u8| RateKey::ip(format!("192.0.2.{n}").parse().unwrap());
    let request = |c: &RateKey| -> [RateKey; 2] { [global.clone(), c.clone()] };
    let decide = async |keys: &[RateKey; 2]| {
        let checks = [
            Check {
                limit: &everyone,
                key: &keys[0],
            },
            Check {
                limit: &per_client,
                key: &keys[1],
            },
        ];
        check_all(&*b, &checks).await
    };
    // Two clients take the global budget; one more refuses each of the
    // clients after, whose own cell must stay untaken.
    for n in 1..=2 {
        assert!(
            decide(&request(&client(n)))
                .await
                .iter()
                .all(Decision::is_allowed)
        );
    }
    for n in 3..=8 {
        let d = decide(&request(&client(n))).await;
        assert!(!d[0].is_allowed() && d[1].is_allowed(), "client {n}: {d:?}");
        assert_eq!(d[1].remaining(), 1, "client {n}: own limit not charged");
        assert_eq!(check(&*b, &per_client, &client(n)).await.remaining(), 0);
    }
    // The other way round: a client's own limit refuses, the global one is
    // not charged.
    let everyone = Limit::new(
        "everyone-2",
        "1/h".parse().unwrap(),
        NonZeroU32::new(20).unwrap(),
    );
    let b2 = make(&[&everyone, &per_client]).await;
    let decide = async |keys: &[RateKey; 2]| {
        let checks = [
            Check {
                limit: &everyone,
                key: &keys[0],
            },
            Check {
                limit: &per_client,
                key: &keys[1],
            },
        ];
        check_all(&*b2, &checks).await
    };
    for n in 10..16 {
        let keys = request(&client(n));
        assert!(decide(&keys).await.iter().all(Decision::is_allowed));
        let refused = decide(&keys).await;
        assert!(
            refused[0].is_allowed() && !refused[1].is_allowed(),
            "{refused:?}"
        );
    }
    // Six admitted in all: 14 left.
    assert_eq!(check(&*b2, &everyone, &global).await.remaining(), 13);
}

// === exactness under concurrency ===

/// `n` checks at once; how many were allowed.
async fn stampede(backends: &[Arc<dyn Backend>], checks: &[Check<'_>], n: usize) -> usize {
    let all = (0..n).map(|i| backends[i % backends.len()].check_all(checks));
    futures_util::future::join_all(all)
        .await
        .into_iter()
        .filter(|d| {
            d.as_ref()
                .expect("backend answers")
                .iter()
                .all(Decision::is_allowed)
        })
        .count()
}

/// 20 per day under each algorithm, one limit and two together: 60
/// requests at once admit exactly 20, spread over `backends` (replicas).
async fn concurrent_requests_admit_exactly_the_burst(backends: &[Arc<dyn Backend>]) {
    let gcra = Limit::new(
        "c-gcra",
        "20/d".parse().unwrap(),
        NonZeroU32::new(20).unwrap(),
    );
    let fixed = window("c-fixed", "20/d", Algorithm::FixedWindow);
    let sliding = window("c-sliding", "20/d", Algorithm::SlidingWindow);
    let k = key("stampede");
    for l in [&gcra, &fixed, &sliding] {
        let admitted = stampede(backends, &checks(&[l], &k), 60).await;
        assert_eq!(admitted, 20, "{}", l.algorithm());
    }
    let burst = Limit::new(
        "c-burst",
        "1/h".parse().unwrap(),
        NonZeroU32::new(20).unwrap(),
    );
    let quota = window("c-quota", "30/d", Algorithm::SlidingWindow);
    let both = checks(&[&burst, &quota], &k);
    assert_eq!(stampede(backends, &both, 60).await, 20, "two limits");
    // The 40 refused were charged to neither.
    assert_eq!(check(&*backends[0], &quota, &k).await.remaining(), 9);
}

async fn concurrent_requests_on_one_backend(make: impl AsyncFn(&[&Limit]) -> Arc<dyn Backend>) {
    let b = make(&[]).await;
    concurrent_requests_admit_exactly_the_burst(&[b]).await;
}

macro_rules! conformance {
    ($make:expr, $clocked:expr) => {
        #[actix_web::test]
        async fn fixed_window_admits_2n_across_a_boundary() {
            crate::fixed_window_admits_2n_across_a_boundary($clocked).await
        }
        #[actix_web::test]
        async fn sliding_window_does_not_admit_2n_across_a_boundary() {
            crate::sliding_window_does_not_admit_2n_across_a_boundary($clocked).await
        }
        #[actix_web::test]
        async fn gcra_knows_no_window_boundary() {
            crate::gcra_knows_no_window_boundary($clocked).await
        }
        #[actix_web::test]
        async fn a_request_refused_by_one_of_two_limits_is_charged_to_neither() {
            crate::a_request_refused_by_one_of_two_limits_is_charged_to_neither($make).await
        }
        #[actix_web::test]
        async fn a_request_refused_by_one_of_three_limits_is_charged_to_none() {
            crate::a_request_refused_by_one_of_three_limits_is_charged_to_none($make).await
        }
        #[actix_web::test]
        async fn limits_on_different_keys_are_all_or_nothing_too() {
            crate::limits_on_different_keys_are_all_or_nothing_too($make).await
        }
        #[actix_web::test]
        async fn concurrent_requests_on_one_backend() {
            crate::concurrent_requests_on_one_backend($make).await
        }
        #[actix_web::test]
        async fn burst_is_taken_then_limited() {
            crate::burst_is_taken_then_limited($make).await
        }
        #[actix_web::test]
        async fn a_refusal_takes_nothing() {
            crate::a_refusal_takes_nothing($make).await
        }
        #[actix_web::test]
        async fn cells_come_back_one_per_emission_interval() {
            crate::cells_come_back_one_per_emission_interval($make).await
        }
        #[actix_web::test]
        async fn keys_are_isolated() {
            crate::keys_are_isolated($make).await
        }
        #[actix_web::test]
        async fn limits_are_isolated() {
            crate::limits_are_isolated($make).await
        }
        #[actix_web::test]
        async fn values_never_spell_another_values_id() {
            crate::values_never_spell_another_values_id($make).await
        }
        #[actix_web::test]
        async fn concurrent_checks_never_share_the_last_cell() {
            crate::concurrent_checks_never_share_the_last_cell($make).await
        }
    };
}

mod memory {
    use super::*;

    async fn make(_limits: &[&Limit]) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(10_000))
    }

    /// Half a second past an epoch second: boundaries are the clock's to cross.
    async fn clocked() -> Clocked {
        let clock = FakeRelativeClock::default();
        let at = Duration::from_millis(1_800_000_000_500);
        let backend = MemoryBackend::with_clock_at(10_000, clock.clone(), at);
        (
            Arc::new(backend),
            Clock::Fake {
                clock,
                at: Mutex::new(at),
            },
        )
    }

    conformance!(make, clocked);
}

mod redis {
    use super::*;
    use support::{RedisCluster, RedisServer};

    /// What a backend's Redis is: its own server, its own cluster, or a
    /// server other backends share.
    enum Guard {
        Server(RedisServer),
        Cluster(RedisCluster),
        Shared(Arc<RedisServer>),
    }

    impl Guard {
        fn log(&self) -> String {
            match self {
                Guard::Server(s) => s.log(),
                Guard::Shared(s) => s.log(),
                Guard::Cluster(c) => c.nodes.iter().map(RedisServer::log).collect(),
            }
        }
    }

    /// A Redis backend that owns the redis-server it talks to: the server
    /// lives exactly as long as the backend (the last `Arc` clone).
    struct WithServer {
        backend: RedisBackend,
        _server: Guard,
    }

    #[async_trait::async_trait(?Send)]
    impl Backend for WithServer {
        async fn check_all(
            &self,
            checks: &[Check<'_>],
        ) -> Result<Decisions, floodgate::BackendError> {
            self.backend.check_all(checks).await
        }

        fn try_check_all(
            &self,
            checks: &[Check<'_>],
        ) -> Option<Result<Decisions, floodgate::BackendError>> {
            self.backend.try_check_all(checks)
        }

        fn kind(&self) -> &'static str {
            self.backend.kind()
        }
    }

    async fn backend(target: RedisTarget, server: Guard) -> Arc<dyn Backend> {
        let backend = RedisBackend::new(
            target,
            "conformance:",
            Duration::from_secs(2),
            Fallback::Closed,
            10_000,
        )
        .unwrap();
        // The connection is opened by a task on this runtime; wait for it.
        backend.start();
        let deadline = Instant::now() + support::patience();
        while !backend.is_up() {
            assert!(
                Instant::now() < deadline,
                "redis backend never came up; log:\n{}",
                server.log()
            );
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
        Arc::new(WithServer {
            backend,
            _server: server,
        })
    }

    /// Each backend gets its own redis-server.
    async fn make(_limits: &[&Limit]) -> Arc<dyn Backend> {
        let server = RedisServer::start();
        backend(RedisTarget::Single(server.url()), Guard::Server(server)).await
    }

    async fn clocked() -> Clocked {
        (make(&[]).await, Clock::Real)
    }

    conformance!(make, clocked);

    /// Three backends, as three replicas, on one redis-server.
    #[actix_web::test]
    async fn three_replicas_admit_exactly_the_burst() {
        let server = Arc::new(RedisServer::start());
        let mut replicas = Vec::new();
        for _ in 0..3 {
            let target = RedisTarget::Single(server.url());
            replicas.push(backend(target, Guard::Shared(server.clone())).await);
        }
        concurrent_requests_admit_exactly_the_burst(&replicas).await;
    }

    /// The same cases on a three-node Redis Cluster, where a request's keys
    /// may be in several slots.
    mod cluster {
        use super::*;

        async fn make(_limits: &[&Limit]) -> Arc<dyn Backend> {
            let cluster = RedisCluster::start();
            let nodes = cluster.nodes.iter().map(RedisServer::url).collect();
            backend(RedisTarget::Cluster(nodes), Guard::Cluster(cluster)).await
        }

        async fn clocked() -> Clocked {
            (make(&[]).await, Clock::Real)
        }

        conformance!(make, clocked);
    }
}
