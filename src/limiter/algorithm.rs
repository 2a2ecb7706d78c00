//! The three counting algorithms, as small pure types over one key's state.
//!
//! Each takes the state a store holds for one (limit, key), the time now,
//! and answers a [`Decision`] plus the state to write back if the request
//! is charged. Nothing here reads a clock or touches a store: the memory
//! backend runs these functions under its own locks, and the Redis backend's
//! Lua script is the same arithmetic line for line (governor's `gcra.rs`
//! is the model: one algorithm, many stores). Time is whole microseconds
//! since the Unix epoch, so windows line up on every replica.
//!
//! | algorithm | state | admits |
//! | --- | --- | --- |
//! | [`Gcra`] | the theoretical arrival time (TAT) | `burst` at once, then one every `period / n` |
//! | [`FixedWindow`] | the window's end and its count | `n` per window; up to `2n` across a boundary |
//! | [`SlidingWindow`] | the window's end, its count and the previous one's | `n` in any window-long span, estimated |
//!
//! The sliding window estimates the requests of the last window as the
//! current window's count plus the previous window's count weighted by how
//! much of it still overlaps (Cloudflare's and HAProxy's estimate). The
//! weight is taken in whole milliseconds, and the product `n * window_ms`
//! must stay below 2^53 ([`SLIDING_WINDOW_MAX`]) so that Redis's Lua numbers
//! (doubles) compute exactly what this module computes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::Decision;

/// How a limit counts (`algorithm = ...` in a rule, `FLOODGATE_ALGORITHM`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `gcra` (the default): a burst, then an even rate.
    #[default]
    Gcra,
    /// `sliding_window`: `n` per window, the previous window weighted in.
    SlidingWindow,
    /// `fixed_window`: `n` per window; windows start on multiples of the
    /// period since the Unix epoch.
    FixedWindow,
}

/// What [`Algorithm::from_str`] accepts, for error messages.
pub const ALGORITHM_SYNTAX: &str = "gcra, sliding_window or fixed_window";

impl Algorithm {
    /// The name used in settings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
        }
    }

    /// Whether this is one of the window algorithms (no `burst`).
    pub fn is_window(self) -> bool {
        self != Algorithm::Gcra
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An algorithm name that is none of [`ALGORITHM_SYNTAX`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {0:?}; expected {ALGORITHM_SYNTAX}")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gcra" => Ok(Algorithm::Gcra),
            "sliding_window" => Ok(Algorithm::SlidingWindow),
            "fixed_window" => Ok(Algorithm::FixedWindow),
            _ => Err(UnknownAlgorithm(s.trim().to_owned())),
        }
    }
}

/// The largest `n * window_ms` a sliding window may have (2^53): its
/// weighted estimate is then exact in a double, as Redis computes it.
pub const SLIDING_WINDOW_MAX: u64 = 1 << 53;

/// One key's state under one limit, as stores keep it: two numbers whose
/// meaning depends on the algorithm (see each type). `expires` is always the
/// instant (µs since the epoch) from which the state is indistinguishable
/// from no state at all, so a store may forget it then, and may forget
/// states with the earliest `expires` first when it is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// When the state stops mattering (µs since the epoch).
    pub expires: u64,
    /// Algorithm-specific: 0 for GCRA, the count(s) for the windows.
    pub count: u64,
}

/// The answer to one request: the decision, and the state to store if the
/// request is charged (`None` when refused: nothing changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// What the request gets.
    pub decision: Decision,
    /// The state after charging the request; `None` when it was refused.
    pub next: Option<State>,
}

fn us(d: u64) -> Duration {
    Duration::from_micros(d)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// GCRA with emission interval `t` and tolerance `tau` (governor's
/// `Gcra::test_and_update`). State: `expires` is the TAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// `T`, µs: one cell comes back every `t`.
    pub t: u64,
    /// `tau`, µs: how far ahead of schedule a key may run.
    pub tau: u64,
}

impl Gcra {
    /// From durations (rounded down to µs; `t` at least 1).
    pub fn new(t: Duration, tau: Duration) -> Self {
        Gcra {
            t: micros(t).max(1),
            tau: micros(tau),
        }
    }

    /// Charges one cell at `now` if the key may take it.
    pub fn step(&self, state: Option<State>, now: u64) -> Step {
        let tat = state.map_or(now, |s| s.expires);
        let earliest = tat.saturating_sub(self.tau);
        if now < earliest {
            let retry = earliest - now;
            return Step {
                decision: Decision::Limited {
                    retry_after: us(retry),
                    reset_after: us(retry + self.tau),
                },
                next: None,
            };
        }
        let next = tat.max(now) + self.t;
        // next >= now + t, so this is at most tau / t.
        let remaining = (now + self.tau + self.t - next) / self.t;
        let remaining = u32::try_from(remaining).unwrap_or(u32::MAX);
        Step {
            decision: Decision::Allowed {
                remaining,
                reset_after: self.reset_after(remaining),
            },
            next: Some(State {
                expires: next,
                count: 0,
            }),
        }
    }

    /// What the key has left at `now`, without charging it.
    pub fn peek(&self, state: Option<State>, now: u64) -> Decision {
        let tat = state.map_or(now, |s| s.expires).max(now);
        let earliest = tat.saturating_sub(self.tau);
        if now < earliest {
            let retry = earliest - now;
            return Decision::Limited {
                retry_after: us(retry),
                reset_after: us(retry + self.tau),
            };
        }
        let remaining = u32::try_from((now + self.tau + self.t - tat) / self.t).unwrap_or(u32::MAX);
        Decision::Allowed {
            remaining,
            reset_after: self.reset_after(remaining),
        }
    }

    /// Reported time until a key with `remaining` cells is back in full:
    /// `T * (burst - remaining)`, the upper end of where its TAT can be, so
    /// every store answers alike.
    pub fn reset_after(&self, remaining: u32) -> Duration {
        let burst = self.tau / self.t + 1;
        us(self
            .t
            .saturating_mul(burst.saturating_sub(u64::from(remaining))))
    }

    /// The state after `n` more cells taken elsewhere from `first` on (a
    /// charge-back): `max(tat, first) + n * t`.
    pub fn charge(&self, state: Option<State>, first: u64, n: u64) -> State {
        let tat = state.map_or(first, |s| s.expires.max(first));
        State {
            expires: tat.saturating_add(n.saturating_mul(self.t)),
            count: 0,
        }
    }
}

/// `n` requests per window of `window` µs, windows starting on multiples of
/// `window` since the epoch. State: `expires` is the end of the window the
/// count belongs to, `count` the requests admitted in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    /// Requests admitted per window.
    pub n: u64,
    /// The window's length, µs.
    pub window: u64,
}

impl FixedWindow {
    /// The count in force at `now`: the stored one if its window is the
    /// current one, else 0.
    fn current(&self, state: Option<State>, now: u64) -> (u64, u64) {
        let end = (now / self.window + 1) * self.window;
        match state {
            Some(s) if s.expires == end => (end, s.count),
            _ => (end, 0),
        }
    }

    /// Charges one request at `now` if the window has room.
    pub fn step(&self, state: Option<State>, now: u64) -> Step {
        let (end, count) = self.current(state, now);
        let reset = us(end - now);
        if count >= self.n {
            return Step {
                decision: Decision::Limited {
                    retry_after: reset,
                    reset_after: reset,
                },
                next: None,
            };
        }
        Step {
            decision: Decision::Allowed {
                remaining: u32::try_from(self.n - count - 1).unwrap_or(u32::MAX),
                reset_after: reset,
            },
            next: Some(State {
                expires: end,
                count: count + 1,
            }),
        }
    }

    /// What the key has left at `now`, without charging it.
    pub fn peek(&self, state: Option<State>, now: u64) -> Decision {
        let (end, count) = self.current(state, now);
        let reset = us(end - now);
        if count >= self.n {
            Decision::Limited {
                retry_after: reset,
                reset_after: reset,
            }
        } else {
            Decision::Allowed {
                remaining: u32::try_from(self.n - count).unwrap_or(u32::MAX),
                reset_after: if count == 0 { Duration::ZERO } else { reset },
            }
        }
    }

    /// The state after `n` more requests admitted elsewhere in the window
    /// holding `first`.
    pub fn charge(&self, state: Option<State>, first: u64, n: u64) -> State {
        let (end, count) = self.current(state, first);
        State {
            expires: end,
            count: count.saturating_add(n),
        }
    }
}

/// `n` requests per window of `window` µs, estimated over the last
/// window-long span: `current + previous * (window - elapsed) / window`,
/// the overlap taken in whole milliseconds. State: `expires` is the end of
/// the window *after* the one counted (from then on both counts are
/// history), `count` holds the counted window's count in its low 32 bits
/// and the window before it in the high 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    /// Requests admitted per window-long span.
    pub n: u64,
    /// The window's length, µs (a whole number of milliseconds).
    pub window: u64,
}

impl SlidingWindow {
    /// `(index of now's window, current count, previous count)`.
    fn counts(&self, state: Option<State>, now: u64) -> (u64, u64, u64) {
        let w = now / self.window;
        let Some(s) = state else { return (w, 0, 0) };
        // s.expires = (counted + 2) * window
        let counted = (s.expires / self.window).saturating_sub(2);
        let cur = s.count & 0xffff_ffff;
        let prev = s.count >> 32;
        if counted == w {
            (w, cur, prev)
        } else if counted + 1 == w {
            (w, 0, cur)
        } else {
            (w, 0, 0)
        }
    }

    fn window_ms(&self) -> u64 {
        (self.window / 1000).max(1)
    }

    /// `floor(prev * (window_ms - elapsed_ms) / window_ms)`.
    fn weighted(&self, prev: u64, now: u64, w: u64) -> u64 {
        let wms = self.window_ms();
        let elapsed = ((now - w * self.window) / 1000).min(wms);
        match prev.checked_mul(wms - elapsed) {
            // The common case, without a 128-bit division.
            Some(product) => product / wms,
            None => {
                let product = u128::from(prev) * u128::from(wms - elapsed);
                u64::try_from(product / u128::from(wms)).unwrap_or(u64::MAX)
            }
        }
    }

    /// Time from `now` until the estimate leaves room for one more request.
    fn retry_after(&self, w: u64, cur: u64, prev: u64, now: u64) -> u64 {
        let wms = self.window_ms();
        // Smallest elapsed e (ms) in a window with counts (cur, prev) such
        // that cur + 1 + floor(prev * (wms - e) / wms) <= n, if any.
        let first_fit = |cur: u64, prev: u64| -> Option<u64> {
            if cur + 1 > self.n {
                return None;
            }
            let room = self.n - 1 - cur;
            if prev <= room {
                return Some(0);
            }
            // prev * (wms - e) < (room + 1) * wms
            // <=> wms - e <= ceil((room + 1) * wms / prev) - 1
            let most = (u128::from(room + 1) * u128::from(wms)).div_ceil(u128::from(prev)) - 1;
            Some(wms - u64::try_from(most).unwrap_or(wms).min(wms))
        };
        let start = w * self.window;
        if let Some(e) = first_fit(cur, prev) {
            let at = start + e * 1000;
            if e < wms && at > now {
                return at - now;
            }
            if at <= now {
                // Not reachable from a refusal; keep it safe.
                return 1;
            }
        }
        let next_start = start + self.window;
        let e = first_fit(0, cur).unwrap_or(0);
        next_start + e * 1000 - now
    }

    /// Charges one request at `now` if the estimate has room.
    pub fn step(&self, state: Option<State>, now: u64) -> Step {
        let (w, cur, prev) = self.counts(state, now);
        let estimate = cur + self.weighted(prev, now, w);
        if estimate + 1 > self.n {
            let retry = self.retry_after(w, cur, prev, now);
            return Step {
                decision: Decision::Limited {
                    retry_after: us(retry),
                    reset_after: us(self.reset(w, cur, prev, now)),
                },
                next: None,
            };
        }
        let cur = cur + 1;
        Step {
            decision: Decision::Allowed {
                remaining: u32::try_from(self.n - estimate - 1).unwrap_or(u32::MAX),
                reset_after: us(self.reset(w, cur, prev, now)),
            },
            next: Some(State {
                expires: (w + 2) * self.window,
                count: (prev << 32) | cur,
            }),
        }
    }

    /// Time until both counts are history (the estimate is 0).
    fn reset(&self, w: u64, cur: u64, prev: u64, now: u64) -> u64 {
        if cur > 0 {
            (w + 2) * self.window - now
        } else if prev > 0 {
            (w + 1) * self.window - now
        } else {
            0
        }
    }

    /// What the key has left at `now`, without charging it.
    pub fn peek(&self, state: Option<State>, now: u64) -> Decision {
        let (w, cur, prev) = self.counts(state, now);
        let estimate = cur + self.weighted(prev, now, w);
        let reset = us(self.reset(w, cur, prev, now));
        if estimate + 1 > self.n {
            Decision::Limited {
                retry_after: us(self.retry_after(w, cur, prev, now)),
                reset_after: reset,
            }
        } else {
            Decision::Allowed {
                remaining: u32::try_from(self.n - estimate).unwrap_or(u32::MAX),
                reset_after: reset,
            }
        }
    }

    /// The state after `n` more requests admitted elsewhere in the window
    /// holding `first`.
    pub fn charge(&self, state: Option<State>, first: u64, n: u64) -> State {
        let (w, cur, prev) = self.counts(state, first);
        let cur = cur.saturating_add(n).min(0xffff_ffff);
        State {
            expires: (w + 2) * self.window,
            count: (prev << 32) | cur,
        }
    }
}

/// One limit's algorithm with its parameters: what a store runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// See [`Gcra`].
    Gcra(Gcra),
    /// See [`FixedWindow`].
    FixedWindow(FixedWindow),
    /// See [`SlidingWindow`].
    SlidingWindow(SlidingWindow),
}

impl Counter {
    /// Charges one request at `now` if the limit allows it.
    pub fn step(&self, state: Option<State>, now: u64) -> Step {
        match self {
            Counter::Gcra(a) => a.step(state, now),
            Counter::FixedWindow(a) => a.step(state, now),
            Counter::SlidingWindow(a) => a.step(state, now),
        }
    }

    /// What the key has left at `now`, without charging it (for `/limits`
    /// and for the limits of a request another limit refused).
    pub fn peek(&self, state: Option<State>, now: u64) -> Decision {
        match self {
            Counter::Gcra(a) => a.peek(state, now),
            Counter::FixedWindow(a) => a.peek(state, now),
            Counter::SlidingWindow(a) => a.peek(state, now),
        }
    }

    /// The state after `n` requests admitted elsewhere, the first at
    /// `first` (charging back what a replica admitted on its own).
    pub fn charge(&self, state: Option<State>, first: u64, n: u64) -> State {
        match self {
            Counter::Gcra(a) => a.charge(state, first, n),
            Counter::FixedWindow(a) => a.charge(state, first, n),
            Counter::SlidingWindow(a) => a.charge(state, first, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn allowed(step: &Step) -> bool {
        step.decision.is_allowed()
    }

    /// Runs `times` requests at `now`, storing each charged state.
    fn run(c: &Counter, state: &mut Option<State>, now: u64, times: u32) -> u32 {
        let mut admitted = 0;
        for _ in 0..times {
            let step = c.step(*state, now);
            if let Some(next) = step.next {
                *state = Some(next);
                admitted += 1;
            }
        }
        admitted
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in [
            Algorithm::Gcra,
            Algorithm::SlidingWindow,
            Algorithm::FixedWindow,
        ] {
            assert_eq!(a.as_str().parse::<Algorithm>().unwrap(), a);
        }
        let err = "leaky".parse::<Algorithm>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown algorithm \"leaky\"; expected gcra, sliding_window or fixed_window"
        );
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_interval() {
        // 10/min, burst 10: T = 6 s, tau = 54 s.
        let c = Counter::Gcra(Gcra {
            t: 6 * S,
            tau: 54 * S,
        });
        let mut state = None;
        let t0 = 1_700_000_000 * S;
        assert_eq!(run(&c, &mut state, t0, 15), 10);
        let refused = c.step(state, t0);
        assert_eq!(
            refused.decision,
            Decision::Limited {
                retry_after: us(6 * S),
                reset_after: us(60 * S)
            }
        );
        assert_eq!(run(&c, &mut state, t0 + 6 * S - 1, 1), 0);
        assert_eq!(run(&c, &mut state, t0 + 6 * S, 2), 1);
        // A key back in full after 60 s has expired.
        assert_eq!(state.unwrap().expires, t0 + 66 * S);
    }

    #[test]
    fn gcra_matches_governor_on_a_random_schedule() {
        use governor::clock::FakeRelativeClock;
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;
        let clock = FakeRelativeClock::default();
        let quota = Quota::with_period(Duration::from_millis(250))
            .unwrap()
            .allow_burst(NonZeroU32::new(4).unwrap());
        let governor = RateLimiter::direct_with_clock(quota, clock.clone());
        let ours = Gcra::new(Duration::from_millis(250), Duration::from_millis(750));
        let mut state = None;
        let mut now = 0u64;
        // A fixed pseudo-random walk: xorshift.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for i in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let dt = x % 200_000;
            now += dt;
            clock.advance(Duration::from_micros(dt));
            let step = ours.step(state, now);
            if let Some(next) = step.next {
                state = Some(next);
            }
            assert_eq!(
                step.decision.is_allowed(),
                governor.check().is_ok(),
                "request {i} at {now} µs"
            );
        }
    }

    #[test]
    fn gcra_peek_charges_nothing_and_agrees_with_step() {
        let c = Gcra { t: S, tau: 2 * S };
        let mut state = None;
        for (i, left) in [3, 2, 1].into_iter().enumerate() {
            assert_eq!(c.peek(state, 0).remaining(), left, "{i}");
            state = c.step(state, 0).next;
        }
        assert!(!c.peek(state, 0).is_allowed());
        assert_eq!(c.peek(state, S).remaining(), 1);
    }

    #[test]
    fn fixed_window_admits_n_per_window_and_2n_across_a_boundary() {
        let c = Counter::FixedWindow(FixedWindow {
            n: 5,
            window: 60 * S,
        });
        let boundary = 28_333_334 * 60 * S; // a window start, epoch-aligned
        let mut state = None;
        assert_eq!(run(&c, &mut state, boundary - 1, 10), 5);
        let refused = c.step(state, boundary - 1);
        assert_eq!(
            refused.decision,
            Decision::Limited {
                retry_after: us(1),
                reset_after: us(1)
            }
        );
        // One microsecond later a new window: five more, ten in 2 µs.
        assert_eq!(run(&c, &mut state, boundary, 10), 5);
        assert_eq!(state.unwrap().expires, boundary + 60 * S);
        let peek = c.peek(state, boundary + 60 * S);
        assert_eq!(peek.remaining(), 5);
    }

    #[test]
    fn sliding_window_does_not_admit_2n_across_a_boundary() {
        let c = Counter::SlidingWindow(SlidingWindow {
            n: 5,
            window: 60 * S,
        });
        let boundary = 28_333_334 * 60 * S;
        let mut state = None;
        assert_eq!(run(&c, &mut state, boundary - 1, 10), 5);
        // Right after the boundary the previous window weighs in whole.
        assert_eq!(run(&c, &mut state, boundary, 10), 0);
        // Halfway: 5 * 0.5 = 2.5 → 2 counted, 3 admitted.
        assert_eq!(run(&c, &mut state, boundary + 30 * S, 10), 3);
        // Across any window-long span at most n + rounding.
        let refused = c.step(state, boundary + 30 * S);
        assert!(!allowed(&refused));
        // Admitted now 3 (current), previous 5: next fits when
        // 3 + 1 + floor(5 * (60000 - e) / 60000) <= 5, i.e. e >= 36001 ms.
        assert_eq!(refused.decision.retry_after(), Some(us(6 * S + 1000)));
        assert_eq!(run(&c, &mut state, boundary + 36 * S, 1), 0);
        assert_eq!(run(&c, &mut state, boundary + 36 * S + 1000, 1), 1);
    }

    #[test]
    fn sliding_window_retry_after_is_exactly_when_the_next_request_fits() {
        for (n, window_s) in [(1, 1), (3, 1), (5, 60), (100, 10), (7, 3600)] {
            let c = SlidingWindow {
                n,
                window: window_s * S,
            };
            let mut state = None;
            let mut now = 17 * c.window + c.window / 3;
            for _ in 0..200 {
                let step = c.step(state, now);
                match step.next {
                    Some(next) => state = Some(next),
                    None => {
                        let retry = micros(step.decision.retry_after().unwrap());
                        assert!(retry > 0);
                        // Just before: still refused; at it: admitted.
                        if retry > 1000 {
                            assert!(!c.step(state, now + retry - 1000).decision.is_allowed());
                        }
                        let at = c.step(state, now + retry);
                        assert!(at.decision.is_allowed(), "n {n} w {window_s}s");
                        now += retry;
                    }
                }
            }
        }
    }

    #[test]
    fn window_states_expire_when_they_stop_mattering() {
        let f = FixedWindow {
            n: 2,
            window: 10 * S,
        };
        let s = f.step(None, 15 * S).next.unwrap();
        assert_eq!(s.expires, 20 * S);
        assert_eq!(f.peek(Some(s), 20 * S).remaining(), 2);
        let sl = SlidingWindow {
            n: 2,
            window: 10 * S,
        };
        let s = sl.step(None, 15 * S).next.unwrap();
        assert_eq!(s.expires, 30 * S);
        // The next window weighs the previous one in whole at its start, a
        // tenth of it a second before its end (floor(0.1) = 0).
        assert_eq!(sl.peek(Some(s), 20 * S).remaining(), 1);
        assert_eq!(sl.peek(Some(s), 29 * S).remaining(), 2);
        assert_eq!(sl.peek(Some(s), 30 * S).remaining(), 2);
    }

    #[test]
    fn charge_adds_what_was_admitted_elsewhere() {
        let g = Gcra { t: S, tau: 4 * S };
        let s = g.charge(None, 100 * S, 3);
        assert_eq!(s.expires, 103 * S);
        assert_eq!(g.peek(Some(s), 100 * S).remaining(), 2);
        let f = FixedWindow {
            n: 5,
            window: 10 * S,
        };
        let s = f.charge(f.step(None, 101 * S).next, 102 * S, 3);
        assert_eq!(s.count, 4);
        let sl = SlidingWindow {
            n: 5,
            window: 10 * S,
        };
        let s = sl.charge(None, 101 * S, 4);
        assert_eq!(sl.peek(Some(s), 101 * S).remaining(), 1);
    }
}
