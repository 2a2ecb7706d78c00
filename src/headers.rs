//! Rate-limit response headers, computed from a [`Verdict`] in one place.
//!
//! `ietf` follows draft-ietf-httpapi-ratelimit-headers-10:
//!
//! ```text
//! RateLimit-Policy: "default";q=10;w=60
//! RateLimit: "default";r=9;t=6
//! ```
//!
//! `q` is the rate's count and `w` its period in seconds; `r` is what the key
//! has left and `t` the seconds until its quota is fully back (rounded up).
//! A rule with several limits lists them all in `RateLimit-Policy`
//! (`"login";q=5;w=60, "daily";q=100;w=86400`); `RateLimit` reports the one
//! with the fewest requests remaining (ties: the later reset), so a client
//! reads what will stop it first. A shadow rule sends no headers.
//!
//! `legacy` sends the same numbers (of the same limit) as `X-RateLimit-Limit`,
//! `X-RateLimit-Remaining` and `X-RateLimit-Reset` (delta seconds, not an
//! epoch). Headers of the same names from the upstream are replaced, so a
//! client never sees two answers to one question.

use std::str::FromStr;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use bytes::{Bytes, BytesMut};

use crate::limiter::{Decision, Limit, LimitId};
use crate::verdict::Verdict;

/// `RateLimit-Policy`: the limit itself (draft-ietf-httpapi-ratelimit-headers).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what the key has left and when it is back in full.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-RateLimit-Limit` (legacy style): the rate's count.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (legacy style): requests the key has left.
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (legacy style): seconds until the quota is back in full.
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Which rate-limit headers responses carry (`FLOODGATE_HEADERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` (`ietf`, the default).
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (`legacy`).
    Legacy,
    /// No rate-limit headers; a 429 still carries `Retry-After` (`none`).
    None,
}

impl FromStr for HeaderStyle {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ietf" => Ok(HeaderStyle::Ietf),
            "legacy" => Ok(HeaderStyle::Legacy),
            "none" | "off" => Ok(HeaderStyle::None),
            _ => Err(()),
        }
    }
}

/// The headers for one rule's limits, with the parts that never change built
/// once (when the rule set is built or reloaded, never per request).
#[derive(Debug, Clone)]
pub struct LimitHeaders {
    style: HeaderStyle,
    /// `RateLimit-Policy`: every limit of the rule (ietf).
    policy: Option<HeaderValue>,
    /// One per limit, in the rule's order.
    items: Vec<Item>,
}

/// The constant parts for one limit.
#[derive(Debug, Clone)]
struct Item {
    id: LimitId,
    /// `"name";` — the start of every `RateLimit` value.
    prefix: String,
    /// `X-RateLimit-Limit` (legacy): the rate's count.
    count: HeaderValue,
}

impl LimitHeaders {
    /// The headers of `style` for a rule with `limits` (in the rule's
    /// order); builds the constant parts once. `RateLimit-Policy` lists
    /// every limit: `"login";q=5;w=60, "daily";q=100;w=86400`.
    pub fn new(style: HeaderStyle, limits: &[Limit]) -> Self {
        let items: Vec<Item> = limits
            .iter()
            .map(|limit| Item {
                id: limit.id(),
                prefix: format!("{};", sf_string(limit.name())),
                count: HeaderValue::from(limit.rate().count().get()),
            })
            .collect();
        let policy = (style == HeaderStyle::Ietf && !limits.is_empty()).then(|| {
            let list: Vec<String> = limits.iter().map(policy_item).collect();
            HeaderValue::try_from(list.join(", "))
                .expect("quoted sf-strings and digits are a valid header value")
        });
        LimitHeaders {
            style,
            policy,
            items,
        }
    }

    /// Sets the headers for `verdict` on a response: `RateLimit-Policy`
    /// lists every limit, `RateLimit` (or the legacy trio) reports the
    /// [tightest](Verdict::tightest) one, and a refusal gets `Retry-After`.
    /// A shadow rule sets nothing. `recent` remembers the last values built
    /// (one per worker): a flood of refusals repeats the same few values,
    /// which then cost no formatting and no allocation.
    pub fn apply(&self, verdict: &Verdict, headers: &mut HeaderMap, recent: &mut Recent) {
        if verdict.shadow {
            return;
        }
        if let Some(i) = verdict.tightest_index() {
            let decision = &verdict.limits[i];
            self.apply_limit(i, &decision.limit, &decision.decision, headers, recent);
        }
        if let Some(retry_after) = verdict.retry_after() {
            let secs = retry_after_secs(retry_after);
            let value = match &recent.retry_after {
                Some((key, value)) if *key == secs => value.clone(),
                _ => {
                    let value = HeaderValue::from(secs);
                    recent.retry_after = Some((secs, value.clone()));
                    value
                }
            };
            headers.insert(RETRY_AFTER, value);
        }
    }

    /// The headers of the `i`th limit (`limit`) for `decision`.
    fn apply_limit(
        &self,
        i: usize,
        limit: &Limit,
        decision: &Decision,
        headers: &mut HeaderMap,
        recent: &mut Recent,
    ) {
        // A verdict always comes with the headers of its own rule; if it
        // ever did not, the limit itself says what to write.
        let own;
        let item = match self.items.get(i) {
            Some(item) if item.id == limit.id() => item,
            _ => {
                own = LimitHeaders::new(self.style, std::slice::from_ref(limit));
                &own.items[0]
            }
        };
        let remaining = decision.remaining();
        let reset = whole_seconds(decision.reset_after());
        match self.style {
            HeaderStyle::None => {}
            HeaderStyle::Ietf => {
                if let Some(policy) = &self.policy {
                    headers.insert(RATELIMIT_POLICY, policy.clone());
                }
                let memo = (item.id, remaining, reset);
                let value = match &recent.ratelimit {
                    Some((key, value)) if *key == memo => value.clone(),
                    _ => {
                        let mut numbers = itoa::Buffer::new();
                        let mut value = BytesMut::with_capacity(item.prefix.len() + 24);
                        value.extend_from_slice(item.prefix.as_bytes());
                        value.extend_from_slice(b"r=");
                        value.extend_from_slice(numbers.format(remaining).as_bytes());
                        value.extend_from_slice(b";t=");
                        value.extend_from_slice(numbers.format(reset).as_bytes());
                        let value = header_value(value.freeze());
                        recent.ratelimit = Some((memo, value.clone()));
                        value
                    }
                };
                headers.insert(RATELIMIT, value);
            }
            HeaderStyle::Legacy => {
                headers.insert(X_RATELIMIT_LIMIT, item.count.clone());
                headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(remaining));
                headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset));
            }
        }
    }
}

/// One limit as `RateLimit-Policy` lists it: `"name";q=10;w=60`.
fn policy_item(limit: &Limit) -> String {
    format!(
        "{};q={};w={}",
        sf_string(limit.name()),
        limit.rate().count(),
        whole_seconds(limit.rate().period())
    )
}

/// The comma-separated tokens of a header value (`Connection: a, b`),
/// trimmed, without empty ones.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The last header values [`LimitHeaders::apply`] built, kept per worker.
#[derive(Debug, Default)]
pub struct Recent {
    ratelimit: Option<((LimitId, u32, u64), HeaderValue)>,
    retry_after: Option<(u64, HeaderValue)>,
    /// The last `429` text body, by the limit it names ([`crate::respond`]).
    pub(crate) body: Option<(LimitId, Bytes)>,
}

/// `Retry-After` in whole seconds, rounded up and at least 1: a client that
/// waits exactly this long will find a cell.
pub fn retry_after_secs(retry_after: Duration) -> u64 {
    whole_seconds(retry_after).max(1)
}

/// Seconds, rounded up.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// An RFC 8941 sf-string: quoted, with `"` and `\` escaped, and anything
/// outside printable ASCII dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn header_value(bytes: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).expect("built only from an sf-string and digits")
}

/// A `Content-Length` value: 1*DIGIT (RFC 9110 §8.6) between optional
/// whitespace, no sign, no spaces inside, no list; `None` if it is not one or overflows.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Algorithm;
    use crate::verdict::DecidedBy;
    use std::num::NonZeroU32;

    fn limit(rate: &str, burst: u32) -> Limit {
        Limit::new(
            "default",
            rate.parse().unwrap(),
            NonZeroU32::new(burst).unwrap(),
        )
    }

    fn render(style: HeaderStyle, limit: &Limit, decision: Decision) -> Vec<(String, String)> {
        render_all(style, std::slice::from_ref(limit), &[decision], false)
    }

    fn render_all(
        style: HeaderStyle,
        limits: &[Limit],
        decisions: &[Decision],
        shadow: bool,
    ) -> Vec<(String, String)> {
        let mut verdict = Verdict::new("r".into(), shadow);
        verdict.decided(limits, decisions, DecidedBy::Backend);
        let mut headers = HeaderMap::new();
        LimitHeaders::new(style, limits).apply(&verdict, &mut headers, &mut Recent::default());
        let mut out: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        out.sort();
        out
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ietf_allowed() {
        let allowed = Decision::Allowed {
            remaining: 9,
            reset_after: Duration::from_secs(6),
        };
        assert_eq!(
            render(HeaderStyle::Ietf, &limit("10/min", 10), allowed),
            pairs(&[
                ("ratelimit", "\"default\";r=9;t=6"),
                ("ratelimit-policy", "\"default\";q=10;w=60"),
            ])
        );
    }

    #[test]
    fn ietf_limited_adds_retry_after_rounded_up() {
        let limited = Decision::Limited {
            retry_after: Duration::from_millis(5_001),
            reset_after: Duration::from_millis(59_001),
        };
        assert_eq!(
            render(HeaderStyle::Ietf, &limit("100/10s", 200), limited),
            pairs(&[
                ("ratelimit", "\"default\";r=0;t=60"),
                ("ratelimit-policy", "\"default\";q=100;w=10"),
                ("retry-after", "6"),
            ])
        );
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
    }

    #[test]
    fn legacy_headers() {
        let allowed = Decision::Allowed {
            remaining: 3,
            reset_after: Duration::from_millis(1500),
        };
        assert_eq!(
            render(HeaderStyle::Legacy, &limit("5/s", 5), allowed),
            pairs(&[
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset", "2"),
            ])
        );
    }

    #[test]
    fn none_sends_only_retry_after_when_limited() {
        let allowed = Decision::Allowed {
            remaining: 3,
            reset_after: Duration::from_secs(1),
        };
        assert!(render(HeaderStyle::None, &limit("5/s", 5), allowed).is_empty());
        let limited = Decision::Limited {
            retry_after: Duration::from_millis(200),
            reset_after: Duration::from_secs(1),
        };
        assert_eq!(
            render(HeaderStyle::None, &limit("5/s", 5), limited),
            pairs(&[("retry-after", "1")])
        );
    }

    fn named(name: &str, rate: &str, burst: u32) -> Limit {
        Limit::new(name, rate.parse().unwrap(), NonZeroU32::new(burst).unwrap())
    }

    #[test]
    fn several_limits_list_every_policy_and_report_the_fewest_remaining() {
        let limits = [
            named("login", "5/min", 5),
            Limit::window("daily", "100/day".parse().unwrap(), Algorithm::FixedWindow).unwrap(),
        ];
        let allowed = |remaining, secs| Decision::Allowed {
            remaining,
            reset_after: Duration::from_secs(secs),
        };
        assert_eq!(
            render_all(
                HeaderStyle::Ietf,
                &limits,
                &[allowed(4, 12), allowed(99, 3600)],
                false
            ),
            pairs(&[
                ("ratelimit", "\"login\";r=4;t=12"),
                (
                    "ratelimit-policy",
                    "\"login\";q=5;w=60, \"daily\";q=100;w=86400"
                ),
            ])
        );
        // A tie on remaining: the later reset is reported.
        assert_eq!(
            render_all(
                HeaderStyle::Legacy,
                &limits,
                &[allowed(2, 12), allowed(2, 3600)],
                false
            ),
            pairs(&[
                ("x-ratelimit-limit", "100"),
                ("x-ratelimit-remaining", "2"),
                ("x-ratelimit-reset", "3600"),
            ])
        );
        // Refused by the daily quota: it is what the client reads.
        let limited = Decision::Limited {
            retry_after: Duration::from_secs(600),
            reset_after: Duration::from_secs(600),
        };
        assert_eq!(
            render_all(
                HeaderStyle::Ietf,
                &limits,
                &[allowed(4, 12), limited],
                false
            ),
            pairs(&[
                ("ratelimit", "\"daily\";r=0;t=600"),
                (
                    "ratelimit-policy",
                    "\"login\";q=5;w=60, \"daily\";q=100;w=86400"
                ),
                ("retry-after", "600"),
            ])
        );
    }

    #[test]
    fn a_shadow_rule_sends_no_headers() {
        let limited = Decision::Limited {
            retry_after: Duration::from_secs(6),
            reset_after: Duration::from_secs(6),
        };
        assert!(render_all(HeaderStyle::Ietf, &[limit("1/min", 1)], &[limited], true).is_empty());
    }

    #[test]
    fn the_memo_tells_limits_apart() {
        let a = [named("a", "10/min", 10)];
        let b = [named("b", "10/min", 10)];
        let mut recent = Recent::default();
        let decision = Decision::Allowed {
            remaining: 3,
            reset_after: Duration::from_secs(6),
        };
        for (limits, want) in [(&a, "\"a\";r=3;t=6"), (&b, "\"b\";r=3;t=6")] {
            let mut verdict = Verdict::new("r".into(), false);
            verdict.decided(limits, &[decision], DecidedBy::Backend);
            let mut headers = HeaderMap::new();
            LimitHeaders::new(HeaderStyle::Ietf, limits).apply(&verdict, &mut headers, &mut recent);
            assert_eq!(headers.get(RATELIMIT).unwrap(), want);
        }
    }

    #[test]
    fn policy_names_are_sf_strings() {
        assert_eq!(sf_string("default"), "\"default\"");
        assert_eq!(sf_string("a\"b\\c\n"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn style_parses() {
        assert_eq!("IETF".parse(), Ok(HeaderStyle::Ietf));
        assert_eq!("legacy".parse(), Ok(HeaderStyle::Legacy));
        assert_eq!("none".parse(), Ok(HeaderStyle::None));
        assert_eq!("draft".parse::<HeaderStyle>(), Err(()));
    }
}

#[cfg(test)]
mod proptests;
