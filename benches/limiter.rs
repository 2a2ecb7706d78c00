//! One limiter decision, in memory: one hot key, and 100k distinct keys (the
//! bench harness's `keys` scenario), against a naive mutex-and-hashmap GCRA
//! baseline keyed by `String`, as a first prototype would write it.

use std::collections::HashMap;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderValue;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, decisions);
criterion_main!(benches);
