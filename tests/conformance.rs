//! One set of cases, run against every backend: memory and Redis must agree
//! on bursts, refill, remaining, retry-after and isolation (governor runs its
//! tests against each state store the same way).

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::limiter::{Check, Decisions, Fallback, RedisTarget};
use floodgate::{Backend, Decision, Limit, MemoryBackend, RateKey, RedisBackend};

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

macro_rules! conformance {
    ($make:expr) => {
        #[actix_web::test]
        async fn burst_is_taken_then_limited() {
            super::burst_is_taken_then_limited($make).await
        }
        #[actix_web::test]
        async fn a_refusal_takes_nothing() {
            super::a_refusal_takes_nothing($make).await
        }
        #[actix_web::test]
        async fn cells_come_back_one_per_emission_interval() {
            super::cells_come_back_one_per_emission_interval($make).await
        }
        #[actix_web::test]
        async fn keys_are_isolated() {
            super::keys_are_isolated($make).await
        }
        #[actix_web::test]
        async fn limits_are_isolated() {
            super::limits_are_isolated($make).await
        }
        #[actix_web::test]
        async fn values_never_spell_another_values_id() {
            super::values_never_spell_another_values_id($make).await
        }
        #[actix_web::test]
        async fn concurrent_checks_never_share_the_last_cell() {
            super::concurrent_checks_never_share_the_last_cell($make).await
        }
    };
}

mod memory {
    use super::*;

    async fn make(_limits: &[&Limit]) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(10_000))
    }

    conformance!(make);
}

mod redis {
    use super::*;
    use support::RedisServer;

    /// A Redis backend that owns the redis-server it talks to: the server
    /// lives exactly as long as the backend (the last `Arc` clone).
    struct WithServer {
        backend: RedisBackend,
        _server: RedisServer,
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

    /// Each backend gets its own redis-server.
    async fn make(_limits: &[&Limit]) -> Arc<dyn Backend> {
        let server = RedisServer::start();
        let backend = RedisBackend::new(
            RedisTarget::Single(server.url()),
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

    conformance!(make);
}
