//! Counters behind `/metrics` on the admin listener (Prometheus text format).
//!
//! Refusals are traffic, not events: they are counted here and logged only at
//! `debug`. Each counter is split into per-thread slots on their own cache
//! lines, so workers never contend on the request path; a scrape sums them.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Metric names, one constant each.
pub mod names {
    /// Client requests by rate-limit decision.
    pub const REQUESTS: &str = "floodgate_requests_total";
    /// Requests the upstream did not answer, by kind.
    pub const UPSTREAM_ERRORS: &str = "floodgate_upstream_errors_total";
    /// Rate-limit checks the backend could not answer.
    pub const BACKEND_ERRORS: &str = "floodgate_backend_errors_total";
}

/// Slots per counter; threads beyond this share slots (still correct, just
/// contended).
const SLOTS: usize = 16;

#[repr(align(64))]
#[derive(Default)]
struct Slot(AtomicU64);

/// A monotonically increasing count.
pub struct Counter {
    slots: [Slot; SLOTS],
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = Cell::new(NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS);
}

impl Counter {
    /// Adds one, on this thread's slot.
    pub fn inc(&self) {
        let slot = SLOT.with(Cell::get);
        self.slots[slot].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The total over every slot (a scrape; not for the request path).
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Every counter floodgate keeps.
#[derive(Default)]
pub struct Metrics {
    /// Requests the limiter let through.
    pub allowed: Counter,
    /// Requests answered 429.
    pub limited: Counter,
    /// Requests refused before any limit was checked (bad key: 400).
    pub rejected: Counter,
    /// Requests answered 403: the client network is denied.
    pub denied: Counter,
    /// Requests a shadow rule would have refused (forwarded).
    pub shadow_limited: Counter,
    /// Requests let through because the backend failed under an `open` or
    /// `local` policy, or refused under `closed`.
    pub backend_errors: Counter,
    /// Requests answered 502: the upstream could not be reached or failed.
    pub upstream_connect_errors: Counter,
    /// Requests answered 504: the upstream did not answer in time.
    pub upstream_timeouts: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("allowed", &self.allowed.get())
            .field("limited", &self.limited.get())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Records one answered request (see [`Observe`](super::Observe)).
    /// Decisions are counted where they are made; this is where what only
    /// the finished exchange knows will be recorded.
    pub fn answered(&self, _exchange: &super::Exchange<'_>) {}

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let mut family = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            names::REQUESTS,
            "Client requests by rate-limit decision.",
            &[
                ("{decision=\"allowed\"}", self.allowed.get()),
                ("{decision=\"limited\"}", self.limited.get()),
                ("{decision=\"rejected\"}", self.rejected.get()),
                ("{decision=\"denied\"}", self.denied.get()),
                ("{decision=\"shadow_limited\"}", self.shadow_limited.get()),
            ],
        );
        family(
            names::UPSTREAM_ERRORS,
            "Requests the upstream did not answer, by kind.",
            &[
                ("{kind=\"connect\"}", self.upstream_connect_errors.get()),
                ("{kind=\"timeout\"}", self.upstream_timeouts.get()),
            ],
        );
        family(
            names::BACKEND_ERRORS,
            "Rate-limit checks the backend could not answer.",
            &[("", self.backend_errors.get())],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_across_threads_and_renders() {
        let metrics = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = metrics.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| m.allowed.inc()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        metrics.limited.inc();
        let text = metrics.render();
        assert!(
            text.contains("floodgate_requests_total{decision=\"allowed\"} 4000\n"),
            "{text}"
        );
        assert!(text.contains("floodgate_requests_total{decision=\"limited\"} 1\n"));
        assert!(text.contains("floodgate_backend_errors_total 0\n"));
    }
}
