//! One limiter decision, in memory: one hot key, and 100k distinct keys (the
//! bench harness's `keys` scenario), against a naive mutex-and-hashmap GCRA
//! baseline keyed by `String`, as a first prototype would write it; and a
//! request checked against three limits at once (one per algorithm) beside
//! one checked against one (issue 11's target: three under twice one).

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use floodgate::limiter::{Algorithm, Check};
use floodgate::{Limit, MemoryBackend, RateKey};

const KEYS: usize = 100_000;

fn limit() -> Limit {
    // Never limits during the bench: every decision takes the allowed path.
    Limit::new(
        "default",
        "1000000/s".parse().unwrap(),
        NonZeroU32::new(1_000_000).unwrap(),
    )
}

/// GCRA over `Mutex<HashMap<String, Instant>>`.
struct Naive {
    tats: Mutex<HashMap<String, Instant>>,
    t: Duration,
    tau: Duration,
}

impl Naive {
    fn check(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut tats = self.tats.lock().unwrap();
        let tat = tats.get(key).copied().unwrap_or(now).max(now);
        if tat.saturating_duration_since(now) > self.tau {
            return false;
        }
        tats.insert(key.to_owned(), tat + self.t);
        true
    }
}

fn api_keys() -> Vec<HeaderValue> {
    (0..KEYS)
        .map(|i| HeaderValue::from_str(&format!("key-{i:08}")).unwrap())
        .collect()
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    let l = limit();
    let keys = api_keys();

    let memory = MemoryBackend::new(1_000_000);
    let one = RateKey::ip("192.0.2.1".parse().unwrap());
    group.bench_function(BenchmarkId::new("MemoryBackend", "one key"), |b| {
        b.iter(|| black_box(memory.decide(&l, black_box(&one)).unwrap()))
    });
    let mut i = 0;
    group.bench_function(BenchmarkId::new("MemoryBackend", "100k keys"), |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let key = RateKey::header(keys[i].clone());
            black_box(memory.decide(&l, &key).unwrap())
        })
    });

    let naive = Naive {
        tats: Mutex::default(),
        t: l.emission_interval(),
        tau: l.tolerance(),
    };
    group.bench_function(BenchmarkId::new("NaiveMutexString", "one key"), |b| {
        b.iter(|| black_box(naive.check(black_box("ip:192.0.2.1"))))
    });
    let mut i = 0;
    group.bench_function(BenchmarkId::new("NaiveMutexString", "100k keys"), |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(naive.check(keys[i].to_str().unwrap()))
        })
    });
    group.finish();
}

/// `check_all` of one limit against three (GCRA, fixed and sliding window,
/// all on the request's key), over 100k keys.
fn several_limits(c: &mut Criterion) {
    let mut group = c.benchmark_group("check_all");
    let keys = api_keys();
    let memory = MemoryBackend::new(1_000_000);
    let gcra = limit();
    let rate = "1000000/s".parse().unwrap();
    let fixed = Limit::window("fixed", rate, Algorithm::FixedWindow).unwrap();
    let sliding = Limit::window(
        "sliding",
        "1000000/min".parse().unwrap(),
        Algorithm::SlidingWindow,
    )
    .unwrap();
    let mut i = 0;
    group.bench_function(
        BenchmarkId::new("MemoryBackend", "1 limit, 100k keys"),
        |b| {
            b.iter(|| {
                i = (i + 7919) % KEYS;
                let key = RateKey::header(keys[i].clone());
                let checks = [Check {
                    limit: &gcra,
                    key: &key,
                }];
                black_box(memory.decide_all(&checks))
            })
        },
    );
    let mut i = 0;
    group.bench_function(
        BenchmarkId::new("MemoryBackend", "3 limits, 100k keys"),
        |b| {
            b.iter(|| {
                i = (i + 7919) % KEYS;
                let key = RateKey::header(keys[i].clone());
                let checks = [
                    Check {
                        limit: &gcra,
                        key: &key,
                    },
                    Check {
                        limit: &fixed,
                        key: &key,
                    },
                    Check {
                        limit: &sliding,
                        key: &key,
                    },
                ];
                black_box(memory.decide_all(&checks))
            })
        },
    );
    // One hot key: the cost of the arithmetic and locking, not of memory.
    let one = RateKey::ip("192.0.2.1".parse().unwrap());
    group.bench_function(BenchmarkId::new("MemoryBackend", "1 limit, one key"), |b| {
        b.iter(|| {
            let checks = [Check {
                limit: &gcra,
                key: &one,
            }];
            black_box(memory.decide_all(&checks))
        })
    });
    group.bench_function(
        BenchmarkId::new("MemoryBackend", "3 limits, one key"),
        |b| {
            b.iter(|| {
                let checks = [&gcra, &fixed, &sliding].map(|limit| Check { limit, key: &one });
                black_box(memory.decide_all(&checks))
            })
        },
    );
    group.finish();
}

criterion_group!(benches, decisions, several_limits);
criterion_main!(benches);
