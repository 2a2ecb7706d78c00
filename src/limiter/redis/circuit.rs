//! The circuit breaker: when this replica stops asking Redis, and when it
//! asks again.
//!
//! One late answer is not an outage. A decision whose batch fails (no answer
//! within `redis_timeout`, or the connection refused or lost) gets the
//! failure policy alone, and marks Redis *failing*. The first failure starts
//! the probe, which keeps one script call on a probe key in flight. Any
//! answer, the probe's or a decision's (even one that came too late for its
//! requests), ends the failing run. The circuit opens only when the run lasts
//! [`open_after`] (twice `redis_timeout`, at least 100 ms) with no answer at
//! all in between. Open, the policy decides at once, and the probe keeps
//! asking: a call in flight as long as Redis may still answer it, a new
//! connection attempt every [`PROBE_INTERVAL`](super::PROBE_INTERVAL) while
//! connecting fails. Its first answer closes the circuit, so decisions go to
//! Redis again one round trip after Redis answers, with no cool-down. Each
//! opening and each closing is logged once, with its reason.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The shortest failing run that opens the circuit.
pub const MIN_OPEN_AFTER: Duration = Duration::from_millis(100);

/// How long Redis must fail every call before the circuit opens: twice the
/// decision timeout, so a run is at least two missed deadlines, and at
/// least [`MIN_OPEN_AFTER`].
pub fn open_after(timeout: Duration) -> Duration {
    timeout.saturating_mul(2).max(MIN_OPEN_AFTER)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Connecting = 0,
    Up = 1,
    Down = 2,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Connecting => "not connected yet",
            State::Up => "up",
            State::Down => "unavailable",
        })
    }
}

impl From<u8> for State {
    fn from(value: u8) -> Self {
        match value {
            0 => State::Connecting,
            1 => State::Up,
            _ => State::Down,
        }
    }
}

#[derive(Default)]
pub struct Circuit {
    state: AtomicU8,
    /// The probe runs.
    pub probing: AtomicBool,
    /// When the circuit last opened (or startup found no Redis).
    pub down_since: Mutex<Option<Instant>>,
    /// A failing run is going on: read on every answer, so an answer costs
    /// one atomic load while nothing fails.
    failing: AtomicBool,
    /// When the current failing run began.
    failing_since: Mutex<Option<Instant>>,
    /// Why Redis refuses floodgate's credentials, until a probe passes.
    refused: Mutex<Option<&'static str>>,
}

impl Circuit {
    pub fn state(&self) -> State {
        State::from(self.state.load(Ordering::Acquire))
    }

    /// Sets the state, returning the previous one.
    pub fn set(&self, state: State) -> State {
        State::from(self.state.swap(state as u8, Ordering::AcqRel))
    }

    /// Records that Redis refuses floodgate for `cause`; true if that is news.
    pub fn refuse(&self, cause: &'static str) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.replace(cause) != Some(cause)
    }

    /// A probe passed: whatever Redis refused, it accepts now.
    pub fn accept(&self) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Why Redis refuses floodgate, while it does.
    pub fn refused(&self) -> Option<&'static str> {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call got no answer: starts a failing run unless one is going on.
    pub fn failed(&self) {
        let mut since = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            self.failing.store(true, Ordering::Release);
        }
    }

    /// Redis answered a call: the failing run, if any, is over.
    pub fn answered(&self) {
        if self.failing.load(Ordering::Acquire) {
            let mut since = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
            *since = None;
            self.failing.store(false, Ordering::Release);
        }
    }

    /// When the current failing run began, if one is going on.
    pub fn failing_since(&self) -> Option<Instant> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        *self.failing_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_ends_with_any_answer() {
        let circuit = Circuit::default();
        assert_eq!(circuit.failing_since(), None);
        circuit.failed();
        let first = circuit.failing_since().expect("failing");
        circuit.failed();
        assert_eq!(
            circuit.failing_since(),
            Some(first),
            "one run, from its first failure"
        );
        circuit.answered();
        assert_eq!(circuit.failing_since(), None);
    }

    #[test]
    fn the_circuit_opens_after_two_missed_deadlines_and_never_sooner_than_100ms() {
        assert_eq!(
            open_after(Duration::from_millis(50)),
            Duration::from_millis(100)
        );
        assert_eq!(open_after(Duration::from_millis(10)), MIN_OPEN_AFTER);
        assert_eq!(open_after(Duration::from_secs(1)), Duration::from_secs(2));
    }
}
