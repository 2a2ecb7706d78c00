//! What recording one request costs: what the middleware records (the
//! rule's decision and refusing limit, the backend's decision time) plus
//! what `Observe` records (end-to-end and upstream time, upstream class),
//! for an allowed and a refused request; and, as a naive baseline, the same
//! counts through prometheus-client's own `Family<_, Counter>` and
//! `Histogram` (a hashed, read-locked lookup and a mutex per observation).
//! Run on one thread and on two at once (the benchmark machine's workers).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use criterion::{Criterion, criterion_group, criterion_main};
use floodgate::observe::{Exchange, Metrics, UpstreamTiming};
use floodgate::verdict::{DecidedBy, Verdict};
use floodgate::{Decision, Limit};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

fn verdict(refused: bool) -> Verdict {
    let limit = Limit::new("api", "10/s".parse().unwrap(), NonZeroU32::new(10).unwrap());
    let decision = if refused {
        Decision::Limited {
            retry_after: Duration::from_secs(1),
            reset_after: Duration::from_secs(1),
        }
    } else {
        Decision::Allowed {
            remaining: 3,
            reset_after: Duration::from_secs(1),
        }
    };
    let mut v = Verdict::new("api".into(), false);
    v.decided([&limit], &[decision], DecidedBy::Backend);
    v
}

/// One request's recording, as the middleware and `Observe` do it.
fn record(metrics: &Metrics, rule: &floodgate::observe::metrics::RuleMetrics, v: &Verdict) {
    rule.record(v);
    metrics.decided_in(Duration::from_micros(40));
    metrics.answered(&Exchange {
        verdict: Some(v),
        status: StatusCode::OK,
        elapsed: Duration::from_micros(300),
        upstream: Some(UpstreamTiming {
            first_byte: Duration::from_micros(200),
        }),
    });
}

type Labels = Vec<(&'static str, String)>;

/// The same counts through prometheus-client's own types, looked up per
/// request as a straightforward use would.
struct Naive {
    requests: Family<Labels, Counter>,
    durations: [Histogram; 3],
}

impl Naive {
    fn new() -> Self {
        let histogram = || Histogram::new(exponential_buckets(0.0001, 2.5, 14));
        Naive {
            requests: Family::default(),
            durations: [histogram(), histogram(), histogram()],
        }
    }

    fn record(&self, v: &Verdict) {
        let labels = vec![
            ("rule", v.rule.to_string()),
            ("decision", format!("{:?}", v.outcome)),
        ];
        self.requests.get_or_create(&labels).inc();
        for (h, secs) in self.durations.iter().zip([40e-6, 300e-6, 200e-6]) {
            h.observe(secs);
        }
    }
}

fn per_request(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::default());
    let rule = metrics.rule(&"api".into(), ["api"]);
    let allowed = verdict(false);
    let refused = verdict(true);
    let naive = Naive::new();

    let mut group = c.benchmark_group("record_one_request");
    group.bench_function("floodgate/allowed", |b| {
        b.iter(|| record(&metrics, &rule, black_box(&allowed)))
    });
    group.bench_function("floodgate/limited", |b| {
        b.iter(|| record(&metrics, &rule, black_box(&refused)))
    });
    group.bench_function("prometheus_client_family/allowed", |b| {
        b.iter(|| naive.record(black_box(&allowed)))
    });
    group.finish();

    // Two threads recording into the same series at once: what two
    // workers cost each other.
    let mut group = c.benchmark_group("record_one_request_two_threads");
    group.bench_function("floodgate/allowed", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, {
                let metrics = metrics.clone();
                let rule = rule.clone();
                let allowed = allowed.clone();
                move || record(&metrics, &rule, black_box(&allowed))
            })
        })
    });
    let naive = Arc::new(naive);
    group.bench_function("prometheus_client_family/allowed", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, {
                let naive = naive.clone();
                let allowed = allowed.clone();
                move || naive.record(black_box(&allowed))
            })
        })
    });
    group.finish();
}

/// Runs `f` `iters` times on each of two threads at once; the time per
/// iteration of one of them.
fn two_threads(iters: u64, f: impl Fn() + Send + Sync + Clone + 'static) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let f = f.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    f();
                }
                start.elapsed()
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap_or_default()
}

criterion_group!(benches, per_request);
criterion_main!(benches);
