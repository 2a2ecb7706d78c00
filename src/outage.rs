//! Outage logging: one line when a dependency starts failing, a summary at
//! most every [`SUMMARY_INTERVAL`] while it keeps failing, one line when it
//! answers again.
//!
//! An upstream that is down, or Redis under the `closed` policy, fails every
//! request; a warning per request would flood the log at exactly the moment
//! an operator reads it. Per-request detail stays at `debug` (and in the
//! metrics); an [`OutageLog`] turns the failures into transitions and counts.
//!
//! An outage ends at the first success after [`QUIET`] without a failure,
//! so a dependency failing every few requests is one long outage with its
//! summaries, not a start and an end line per failure.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The longest time between two lines about one outage while requests keep
/// failing.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// How long without a failure before a success ends an outage.
pub const QUIET: Duration = Duration::from_secs(1);

/// Failures of one dependency, logged as transitions and periodic counts.
///
/// Shared by every worker (clones of the part that owns it hold one `Arc`),
/// so one outage is one set of lines whatever the number of workers.
#[derive(Debug)]
pub struct OutageLog {
    /// What fails, as the log names it: `upstream http://web:80`.
    subject: String,
    /// Mirrors `tracker.current.is_some()`: a success outside an outage
    /// costs one load.
    active: AtomicBool,
    tracker: Mutex<Tracker>,
}

impl OutageLog {
    /// No outage yet; `subject` names what fails in every line
    /// (`upstream http://web:80`, `rate limiter (redis backend)`).
    pub fn new(subject: impl Into<String>) -> Self {
        OutageLog {
            subject: subject.into(),
            active: AtomicBool::new(false),
            tracker: Mutex::new(Tracker::default()),
        }
    }

    /// One request failed because of the dependency, and was `outcome`
    /// (`"answered 502"`); `cause` is this failure's error.
    pub fn record(&self, outcome: &'static str, cause: &dyn fmt::Display) {
        let mut tracker = self.lock();
        let line = tracker.record(Instant::now(), outcome, cause);
        self.active.store(true, Ordering::Release);
        drop(tracker);
        if let Some(line) = line {
            log::warn!("{}", line.text(&self.subject));
        }
    }

    /// One request got its answer from the dependency: ends the outage if
    /// the last failure is [`QUIET`] old. The end line gives the outage's
    /// length up to the first success after the last failure.
    pub fn recovered(&self) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut tracker = self.lock();
        let line = tracker.recovered(Instant::now());
        self.active
            .store(tracker.current.is_some(), Ordering::Release);
        drop(tracker);
        if let Some(line) = line {
            log::warn!("{}", line.text(&self.subject));
        }
    }

    /// Whether an outage is going on.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The clock-free state behind [`OutageLog`]: every method takes `now`.
#[derive(Debug, Default)]
struct Tracker {
    current: Option<Outage>,
}

#[derive(Debug)]
struct Outage {
    started: Instant,
    last_line: Instant,
    last_failure: Instant,
    /// The first success since the last failure: when it answered again.
    first_success: Option<Instant>,
    /// Requests per outcome since the last line, and since the start.
    recent: Counts,
    total: Counts,
}

/// Requests per outcome, in the order the outcomes first appeared.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts(Vec<(&'static str, u64)>);

impl Counts {
    fn add(&mut self, outcome: &'static str) {
        match self.0.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => *n += 1,
            None => self.0.push((outcome, 1)),
        }
    }

    #[cfg(test)]
    fn sum(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (outcome, n)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let noun = if *n == 1 { "request" } else { "requests" };
            write!(f, "{sep}{n} {noun} {outcome}")?;
        }
        Ok(())
    }
}

/// A line to log; its text needs the subject.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Started {
        outcome: &'static str,
        cause: String,
    },
    Summary {
        recent: Counts,
        over: Duration,
        cause: String,
    },
    Ended {
        after: Duration,
        total: Counts,
    },
}

impl Line {
    fn text(&self, subject: &str) -> String {
        match self {
            Line::Started { outcome, cause } => format!(
                "{subject} failing ({cause}); requests {outcome} until it recovers \
                 (a count every {}s meanwhile, details at debug)",
                SUMMARY_INTERVAL.as_secs()
            ),
            Line::Summary {
                recent,
                over,
                cause,
            } => format!(
                "{subject} still failing: {recent} in the last {:.0?} (last error: {cause})",
                over
            ),
            Line::Ended { after, total } => format!(
                "{subject} answering again after {:.1?}; during the outage {total}",
                after
            ),
        }
    }
}

impl Tracker {
    fn record(
        &mut self,
        now: Instant,
        outcome: &'static str,
        cause: &dyn fmt::Display,
    ) -> Option<Line> {
        let Some(outage) = &mut self.current else {
            let mut counts = Counts::default();
            counts.add(outcome);
            self.current = Some(Outage {
                started: now,
                last_line: now,
                last_failure: now,
                first_success: None,
                recent: Counts::default(),
                total: counts,
            });
            return Some(Line::Started {
                outcome,
                cause: cause.to_string(),
            });
        };
        outage.last_failure = now;
        outage.first_success = None;
        outage.recent.add(outcome);
        outage.total.add(outcome);
        let over = now.saturating_duration_since(outage.last_line);
        if over < SUMMARY_INTERVAL {
            return None;
        }
        outage.last_line = now;
        Some(Line::Summary {
            recent: std::mem::take(&mut outage.recent),
            over,
            cause: cause.to_string(),
        })
    }

    fn recovered(&mut self, now: Instant) -> Option<Line> {
        let outage = self.current.as_mut()?;
        let answered = *outage.first_success.get_or_insert(now);
        if now.saturating_duration_since(outage.last_failure) < QUIET {
            return None;
        }
        let outage = self.current.take()?;
        Some(Line::Ended {
            after: answered.saturating_duration_since(outage.started),
            total: outage.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_sustained_outage_is_one_line_per_interval_and_one_at_each_end() {
        let mut tracker = Tracker::default();
        let start = Instant::now();
        let mut lines = Vec::new();
        // 100 failures a second for 35 s.
        for i in 0..3500u32 {
            let now = start + 10 * MS * i;
            let outcome = if i % 10 == 0 {
                "answered 504"
            } else {
                "answered 502"
            };
            lines.extend(tracker.record(now, outcome, &"connection refused"));
        }
        assert_eq!(lines.len(), 4, "a start and three summaries: {lines:?}");
        assert_eq!(
            lines[0],
            Line::Started {
                outcome: "answered 504",
                cause: "connection refused".into()
            }
        );
        let Line::Summary { recent, over, .. } = &lines[1] else {
            panic!("{:?}", lines[1]);
        };
        assert_eq!(*over, Duration::from_secs(10));
        assert_eq!(
            recent.to_string(),
            "900 requests answered 502, 100 requests answered 504"
        );
        let last_failure = start + 10 * MS * 3499;
        assert_eq!(
            tracker.recovered(last_failure + 999 * MS),
            None,
            "not quiet yet"
        );
        let end = tracker
            .recovered(last_failure + QUIET)
            .expect("an end line");
        let Line::Ended { total, after } = &end else {
            panic!("{end:?}");
        };
        assert_eq!(total.sum(), 3500);
        assert_eq!(
            *after,
            Duration::from_millis(35_989),
            "from the start to the first success"
        );
        assert_eq!(tracker.recovered(last_failure + 2 * QUIET), None, "once");
        assert!(tracker.current.is_none());
    }

    #[test]
    fn failures_between_successes_are_one_outage() {
        let mut tracker = Tracker::default();
        let start = Instant::now();
        let mut lines = 0;
        // One request in ten fails, 100 requests a second, for 20 s.
        for i in 0..2000u32 {
            let now = start + 10 * MS * i;
            if i % 10 == 0 {
                lines += usize::from(tracker.record(now, "answered 502", &"reset").is_some());
            } else {
                lines += usize::from(tracker.recovered(now).is_some());
            }
        }
        assert_eq!(lines, 2, "a start and one summary");
    }

    #[test]
    fn texts_name_the_subject_counts_and_cause() {
        let mut counts = Counts::default();
        counts.add("answered 503");
        let started = Line::Started {
            outcome: "answered 503",
            cause: "redis is down".into(),
        };
        assert_eq!(
            started.text("rate limiter (redis)"),
            "rate limiter (redis) failing (redis is down); requests answered 503 until it recovers \
             (a count every 10s meanwhile, details at debug)"
        );
        let summary = Line::Summary {
            recent: counts.clone(),
            over: Duration::from_secs(10),
            cause: "redis is down".into(),
        };
        assert_eq!(
            summary.text("rate limiter (redis)"),
            "rate limiter (redis) still failing: 1 request answered 503 in the last 10s \
             (last error: redis is down)"
        );
        let ended = Line::Ended {
            after: Duration::from_millis(4200),
            total: counts,
        };
        assert_eq!(
            ended.text("rate limiter (redis)"),
            "rate limiter (redis) answering again after 4.2s; during the outage 1 request answered 503"
        );
    }

    #[test]
    fn the_shared_log_is_quiet_outside_an_outage() {
        let log = OutageLog::new("upstream http://127.0.0.1:1");
        log.recovered();
        assert!(!log.is_active());
        log.record("answered 502", &"connection refused");
        assert!(log.is_active());
        log.recovered();
        assert!(
            log.is_active(),
            "a success right after a failure is not quiet"
        );
    }
}
