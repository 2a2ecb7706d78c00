//! The storage behind the metrics: counts split into per-thread rows on
//! their own cache lines, so workers recording at once never write the same
//! line; a scrape sums the rows.
//!
//! prometheus-client's own `Counter` is one shared atomic (every worker
//! bouncing one cache line on every request) and its `Histogram` takes a
//! mutex per observation; a `Family` lookup hashes and takes a read lock.
//! None of that belongs on the request path, so the counts live here and
//! the crate only encodes them at scrape time (see the parent module).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Rows per [`Cells`]; threads beyond this share rows (still exact, just
/// contended). Above the worker count of any machine floodgate is sized for.
const ROWS: usize = 16;

/// Hands each thread its row once (a thread index, not a registry of
/// metrics: every [`Cells`] uses the same row for the same thread).
static NEXT_ROW: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ROW: Cell<usize> = Cell::new(NEXT_ROW.fetch_add(1, Ordering::Relaxed) % ROWS);
}

/// This thread's row.
fn row() -> usize {
    ROW.with(Cell::get)
}

/// One thread's `N` counts, alone on its cache line(s).
#[repr(align(64))]
struct Row<const N: usize>([AtomicU64; N]);

/// `N` monotonically increasing counts (the series of one metric family
/// that one label set resolves to, e.g. one rule's requests by decision).
pub struct Cells<const N: usize> {
    rows: Box<[Row<N>; ROWS]>,
}

impl<const N: usize> Default for Cells<N> {
    fn default() -> Self {
        Cells {
            rows: Box::new(std::array::from_fn(|_| {
                Row(std::array::from_fn(|_| AtomicU64::new(0)))
            })),
        }
    }
}

impl<const N: usize> Cells<N> {
    /// Adds one to count `i`, on this thread's row. `i` is always one of
    /// the caller's own constants; an index past `N` is ignored rather than
    /// panicking on the request path.
    #[inline]
    pub fn inc(&self, i: usize) {
        self.add(i, 1);
    }

    /// Adds `n` to count `i`, on this thread's row.
    #[inline]
    pub fn add(&self, i: usize, n: u64) {
        if let Some(cell) = self.rows[row()].0.get(i) {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Count `i` over every row (a scrape; not for the request path).
    pub fn get(&self, i: usize) -> u64 {
        self.rows
            .iter()
            .filter_map(|r| r.0.get(i))
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// One monotonically increasing count.
pub type Counter = Cells<1>;

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc_one(&self) {
        self.inc(0);
    }

    /// The total.
    pub fn total(&self) -> u64 {
        self.get(0)
    }
}

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s, roughly
/// ×2.5 apart. Decisions from memory land in the first buckets, Redis round
/// trips around 0.25–2.5 ms, upstream answers anywhere up to the timeout.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// [`LATENCY_BUCKETS`] in nanoseconds, for comparing on the request path
/// without floating point.
const BUCKET_NANOS: [u64; 14] = {
    let mut out = [0u64; 14];
    let mut i = 0;
    while i < out.len() {
        // Exact: every bound is a whole number of 100 ns.
        out[i] = (LATENCY_BUCKETS[i] * 10_000_000.0 + 0.5) as u64 * 100;
        i += 1;
    }
    out
};

/// Per row: one count per bucket, one past the last bound (`+Inf`), then the
/// sum of every observation in nanoseconds.
const HISTOGRAM_CELLS: usize = LATENCY_BUCKETS.len() + 2;
const SUM: usize = LATENCY_BUCKETS.len() + 1;

/// A latency histogram over [`LATENCY_BUCKETS`]: an observation is two
/// uncontended atomic adds (its bucket and the sum). The count is the sum
/// of the buckets, so it always agrees with them.
#[derive(Default)]
pub struct Histogram {
    cells: Cells<HISTOGRAM_CELLS>,
}

/// What a scrape reads from a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of every observation, in seconds.
    pub sum: f64,
    /// Observations.
    pub count: u64,
    /// (upper bound in seconds, observations in that bucket alone), the
    /// last bound `+Inf`, as prometheus-client's encoder takes them.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.cells.inc(bucket);
        self.cells.add(SUM, nanos);
    }

    /// The buckets, count and sum now (a scrape).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, bound)| (bound, self.cells.get(i)))
            .collect();
        HistogramSnapshot {
            sum: self.cells.get(SUM) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_many_threads_add_up() {
        let cells = Arc::new(Cells::<3>::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let cells = cells.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        cells.inc(1);
                    }
                    cells.add(2, 5);
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(cells.get(0), 0);
        assert_eq!(cells.get(1), 20_000);
        assert_eq!(cells.get(2), 100);
        cells.inc(3);
        assert_eq!(cells.get(3), 0, "past the end: ignored");
    }

    #[test]
    fn bucket_bounds_are_exact_in_nanoseconds() {
        assert_eq!(BUCKET_NANOS[0], 100_000);
        assert_eq!(BUCKET_NANOS[1], 250_000);
        assert_eq!(BUCKET_NANOS[3], 1_000_000);
        assert_eq!(BUCKET_NANOS[13], 10_000_000_000);
    }

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // le 0.0001, inclusive
        h.observe(Duration::from_micros(101)); // le 0.00025
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(11)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert!(
            (s.sum - (0.0001 + 0.000101 + 0.003 + 11.0)).abs() < 1e-9,
            "{s:?}"
        );
        let at = |bound: f64| s.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(at(0.0001), 1);
        assert_eq!(at(0.00025), 1);
        assert_eq!(at(0.005), 1);
        assert_eq!(at(f64::INFINITY), 1);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.buckets.iter().map(|(_, n)| n).sum::<u64>(), 4);
    }
}
