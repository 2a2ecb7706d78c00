//! `<n>/<period>` rates, as operators write them: `10/min`, `100/s`,
//! `5000/h`, `100/10s`, `5/15min`.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

/// `count` requests per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    count: NonZeroU32,
    period: Duration,
}

/// What is accepted, for error messages.
pub const RATE_SYNTAX: &str = "<n>/<period> with n >= 1 and period s|sec|second, m|min|minute, \
                               h|hour or d|day, optionally with a count (e.g. 10/min, 100/s, 100/10s, 5/15min)";

/// Why a rate (`10/min`) was refused; each message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not `<n>/<period>` at all.
    #[error("expected {RATE_SYNTAX}")]
    Syntax,
    /// The count before `/` is not a number from 1 to `u32::MAX`.
    #[error("the count must be a whole number from 1 to {}", u32::MAX)]
    Count,
    #[error("unknown period unit {0:?}; expected s|sec|second, m|min|minute, h|hour or d|day")]
    /// The period's unit is none of the accepted ones.
    Unit(String),
    /// The period's own count (`10s`) is not a whole number of at least 1.
    #[error("the period count must be a whole number of at least 1")]
    PeriodCount,
    /// Faster than one request per microsecond, the resolution both
    /// backends keep time in.
    #[error("at most 1000000 per second (one per microsecond)")]
    TooFast,
    /// A period longer than [`MAX_PERIOD`], past which the backends'
    /// microsecond arithmetic could overflow.
    #[error("the period may be at most 100 years (36500d)")]
    PeriodTooLong,
}

/// The longest period a rate may have: 100 years.
pub const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 86_400);

impl Rate {
    /// `count` per `period`, at most one per microsecond (see
    /// [`emission_interval`](Self::emission_interval)).
    pub fn new(count: NonZeroU32, period: Duration) -> Result<Self, RateError> {
        if period.as_micros() < u128::from(count.get()) {
            return Err(RateError::TooFast);
        }
        if period > MAX_PERIOD {
            return Err(RateError::PeriodTooLong);
        }
        Ok(Rate { count, period })
    }

    /// `count` per second; more than 1,000,000 is treated as 1,000,000.
    pub fn per_second(count: NonZeroU32) -> Self {
        Rate {
            count,
            period: Duration::from_secs(1),
        }
    }

    /// `count` per minute; more than 60,000,000 is treated as 60,000,000.
    pub fn per_minute(count: NonZeroU32) -> Self {
        Rate {
            count,
            period: Duration::from_secs(60),
        }
    }

    /// Requests allowed per [`period`](Self::period).
    pub fn count(&self) -> NonZeroU32 {
        self.count
    }

    /// The window the [`count`](Self::count) is spread over.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// `T = period / count`: the time one request's worth of quota takes to
    /// refill, in whole microseconds (rounded down, at least one). Redis keeps
    /// time in microseconds, and both backends use this same `T` so that they
    /// agree exactly: `300000/s` is enforced as one per 3 µs.
    pub fn emission_interval(&self) -> Duration {
        let micros = self.period.as_micros() / u128::from(self.count.get());
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX).max(1))
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s.trim().split_once('/').ok_or(RateError::Syntax)?;
        let count: u32 = count.trim().parse().map_err(|_| RateError::Count)?;
        let count = NonZeroU32::new(count).ok_or(RateError::Count)?;
        let period = period.trim();
        if period.is_empty() {
            return Err(RateError::Syntax);
        }
        let digits = period.bytes().take_while(u8::is_ascii_digit).count();
        let (multiple, unit) = period.split_at(digits);
        let multiple: u64 = if multiple.is_empty() {
            1
        } else {
            match multiple.parse() {
                Ok(0) | Err(_) => return Err(RateError::PeriodCount),
                Ok(n) => n,
            }
        };
        let unit_secs: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hour" | "hours" => 3_600,
            "d" | "day" | "days" => 86_400,
            _ => return Err(RateError::Unit(unit.trim().to_owned())),
        };
        let secs = multiple
            .checked_mul(unit_secs)
            .ok_or(RateError::PeriodTooLong)?;
        Rate::new(count, Duration::from_secs(secs))
    }
}

/// The canonical form: `10/min`, `100/s`, `100/10s`.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.period.as_secs();
        let (n, unit) = match secs {
            s if s % 86_400 == 0 => (s / 86_400, "d"),
            s if s % 3_600 == 0 => (s / 3_600, "h"),
            s if s % 60 == 0 => (s / 60, "min"),
            s => (s, "s"),
        };
        if n == 1 {
            write!(f, "{}/{unit}", self.count)
        } else {
            write!(f, "{}/{n}{unit}", self.count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> (u32, u64) {
        let r: Rate = s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (r.count().get(), r.period().as_secs())
    }

    #[test]
    fn parses_every_documented_unit_and_spelling() {
        assert_eq!(rate("10/min"), (10, 60));
        assert_eq!(rate("10/m"), (10, 60));
        assert_eq!(rate("10/minute"), (10, 60));
        assert_eq!(rate("100/s"), (100, 1));
        assert_eq!(rate("100/sec"), (100, 1));
        assert_eq!(rate("100/second"), (100, 1));
        assert_eq!(rate("5000/h"), (5000, 3600));
        assert_eq!(rate("5000/hour"), (5000, 3600));
        assert_eq!(rate("7/d"), (7, 86_400));
        assert_eq!(rate("7/day"), (7, 86_400));
        assert_eq!(rate("100/10s"), (100, 10));
        assert_eq!(rate("5/15min"), (5, 900));
        assert_eq!(rate(" 3 / 2h "), (3, 7200));
        assert_eq!(rate("1000000/s"), (1_000_000, 1));
    }

    #[test]
    fn rejects_what_it_cannot_mean() {
        assert_eq!("10".parse::<Rate>(), Err(RateError::Syntax));
        assert_eq!("10/".parse::<Rate>(), Err(RateError::Syntax));
        assert_eq!("0/min".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("-1/min".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("ten/min".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("99999999999/s".parse::<Rate>(), Err(RateError::Count));
        assert_eq!("1000001/s".parse::<Rate>(), Err(RateError::TooFast));
        assert_eq!("10/0s".parse::<Rate>(), Err(RateError::PeriodCount));
        // 300 million days would overflow the backends' µs arithmetic.
        assert_eq!(
            "1/300000000d".parse::<Rate>(),
            Err(RateError::PeriodTooLong)
        );
        assert!("1/36500d".parse::<Rate>().is_ok());
        assert_eq!("1/36501d".parse::<Rate>(), Err(RateError::PeriodTooLong));
        assert_eq!(
            "10/fortnight".parse::<Rate>(),
            Err(RateError::Unit("fortnight".into()))
        );
        assert_eq!("10/ms".parse::<Rate>(), Err(RateError::Unit("ms".into())));
    }

    #[test]
    fn emission_interval_is_period_over_count() {
        let r: Rate = "10/min".parse().unwrap();
        assert_eq!(r.emission_interval(), Duration::from_secs(6));
        let r: Rate = "1000000/s".parse().unwrap();
        assert_eq!(r.emission_interval(), Duration::from_micros(1));
        let r: Rate = "300000/s".parse().unwrap();
        assert_eq!(
            r.emission_interval(),
            Duration::from_micros(3),
            "whole microseconds"
        );
        let r = Rate::per_second(NonZeroU32::new(u32::MAX).unwrap());
        assert_eq!(
            r.emission_interval(),
            Duration::from_micros(1),
            "never zero"
        );
    }

    #[test]
    fn displays_canonically() {
        for (input, shown) in [
            ("10/minute", "10/min"),
            ("100/s", "100/s"),
            ("100/10s", "100/10s"),
            ("5/15min", "5/15min"),
            ("2/120s", "2/2min"),
            ("1/24h", "1/d"),
        ] {
            assert_eq!(input.parse::<Rate>().unwrap().to_string(), shown);
        }
    }
}

#[cfg(test)]
mod proptests;
