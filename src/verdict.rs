//! What the gate decided about one request, as one value.
//!
//! The middleware builds a [`Verdict`] for every request it sees and puts it
//! in the request's extensions before answering or forwarding. It is the one
//! thing the rate-limit headers, the `429` body, the metrics and the
//! access log read, so they can never disagree about a request.
//!
//! ```
//! # use actix_web::{HttpMessage, HttpRequest};
//! # fn handler(req: HttpRequest) {
//! use floodgate::verdict::Verdict;
//! if let Some(verdict) = req.extensions().get::<Verdict>() {
//!     log::info!("rule {} decided {:?}", verdict.rule, verdict.outcome);
//! }
//! # }
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::key::Fingerprinter;
use crate::limiter::{Decision, Limit, RateKey};

/// One limit of the matched rule, and what it said.
#[derive(Clone, Debug)]
pub struct LimitDecision {
    /// The limit (its name is the one `RateLimit-Policy` and the `429` show).
    pub limit: Limit,
    /// Its decision for this request's key.
    pub decision: Decision,
}

/// How the decisions were made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The backend decided, as configured.
    Backend,
    /// The backend answered while reporting itself not up: the Redis
    /// backend's `local` fallback decided from this replica's memory.
    Local,
    /// The backend could not decide; the failure policy `open` let the
    /// request through without a decision.
    FailOpen,
    /// The backend could not decide; the failure policy `closed` answered
    /// `503`.
    FailClosed,
    /// No limiter was asked: the request was refused or exempted before
    /// (bad key, denied, allowed network or key).
    NotAsked,
}

/// What became of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every limit allowed it: forwarded and charged.
    Allowed,
    /// A limit refused it: answered `429`, charged to none.
    Limited,
    /// A limit of a shadow rule would have refused it: forwarded (nothing
    /// was charged, as for any refusal).
    ShadowLimited,
    /// Its client network or key is on the rule's allow list: forwarded,
    /// never refused.
    Exempt,
    /// Its client network is on a deny list: answered `403`, no limiter
    /// state touched.
    Denied,
    /// Its key could not be derived: answered `400`.
    BadKey,
    /// The limiter could not decide: forwarded ([`DecidedBy::FailOpen`]) or
    /// answered `503` ([`DecidedBy::FailClosed`]).
    Undecided,
}

/// The gate's decision about one request (see the module docs).
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The matched rule's name (`default` when no rule matched).
    pub rule: Arc<str>,
    /// Whether the rule is in shadow (by itself or `FLOODGATE_SHADOW`):
    /// clients see no rate-limit headers from it.
    pub shadow: bool,
    /// One entry per limit of the rule, in the rule's order; empty when no
    /// limiter was asked.
    pub limits: SmallVec<[LimitDecision; 4]>,
    /// Index into `limits` of the limit that refused the request (the one
    /// with the longest `retry_after` when several did).
    pub refused_by: Option<usize>,
    /// The rule's key for this request, if it could be derived. Shown only
    /// as its [`fingerprint`](Self::key_fingerprint) or redacted
    /// [`Display`](std::fmt::Display), never in clear.
    pub key: Option<RateKey>,
    /// The client's address as the gate resolved it (trusted proxies
    /// applied, before IPv6 grouping), when the request had a peer: resolved
    /// once, for the deny list and the keys, and read again by the access
    /// log and the status page.
    pub client: Option<IpAddr>,
    /// How the decisions were made.
    pub decided_by: DecidedBy,
    /// What became of the request.
    pub outcome: Outcome,
}

impl Verdict {
    /// A verdict for `rule` with no decision yet.
    pub fn new(rule: Arc<str>, shadow: bool) -> Self {
        Verdict {
            rule,
            shadow,
            limits: SmallVec::new(),
            refused_by: None,
            key: None,
            client: None,
            decided_by: DecidedBy::NotAsked,
            outcome: Outcome::Allowed,
        }
    }

    /// Records the backend's decisions for `limits` (in order) and derives
    /// `refused_by` and the outcome (shadow rules forward what they would
    /// refuse).
    pub fn decided<'a>(
        &mut self,
        limits: impl IntoIterator<Item = &'a Limit>,
        decisions: &[Decision],
        by: DecidedBy,
    ) {
        self.limits.clear();
        self.limits
            .extend(
                limits
                    .into_iter()
                    .zip(decisions)
                    .map(|(limit, decision)| LimitDecision {
                        limit: limit.clone(),
                        decision: *decision,
                    }),
            );
        self.decided_by = by;
        self.refused_by = self
            .limits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.decision.retry_after().map(|r| (i, r)))
            .max_by_key(|(_, retry)| *retry)
            .map(|(i, _)| i);
        self.outcome = match (self.refused_by, self.shadow) {
            (None, _) => Outcome::Allowed,
            (Some(_), false) => Outcome::Limited,
            (Some(_), true) => Outcome::ShadowLimited,
        };
    }

    /// The limit that refused the request, and its decision.
    pub fn refusing(&self) -> Option<&LimitDecision> {
        self.refused_by.map(|i| &self.limits[i])
    }

    /// When a refused request may be retried: once every refusing limit has
    /// a cell again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.refusing().and_then(|l| l.decision.retry_after())
    }

    /// The entry the `RateLimit` header reports: the limit with the fewest
    /// requests remaining; of those, the one whose reset is latest.
    pub fn tightest(&self) -> Option<&LimitDecision> {
        self.tightest_index().map(|i| &self.limits[i])
    }

    /// The index in `limits` of [`tightest`](Self::tightest).
    pub fn tightest_index(&self) -> Option<usize> {
        let mut best: Option<(usize, &Decision)> = None;
        for (i, l) in self.limits.iter().enumerate() {
            let d = &l.decision;
            let better = best.is_none_or(|(_, b)| {
                d.remaining() < b.remaining()
                    || (d.remaining() == b.remaining() && d.reset_after() > b.reset_after())
            });
            if better {
                best = Some((i, d));
            }
        }
        best.map(|(i, _)| i)
    }

    /// The key's stable identity as a Redis key name would carry it
    /// (`ip:192.0.2.1`, `h:<fingerprint>`): addresses in clear, header values
    /// and composites only as their fingerprint.
    pub fn key_fingerprint(&self, fingerprints: &Fingerprinter) -> Option<String> {
        self.key
            .as_ref()
            .map(|key| String::from_utf8_lossy(&key.stable_id(fingerprints)).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limit(name: &str) -> Limit {
        Limit::new(
            name,
            "10/min".parse().unwrap(),
            NonZeroU32::new(10).unwrap(),
        )
    }

    fn allowed(remaining: u32, reset: u64) -> Decision {
        Decision::Allowed {
            remaining,
            reset_after: Duration::from_secs(reset),
        }
    }

    fn limited(retry: u64, reset: u64) -> Decision {
        Decision::Limited {
            retry_after: Duration::from_secs(retry),
            reset_after: Duration::from_secs(reset),
        }
    }

    #[test]
    fn tightest_is_fewest_remaining_then_latest_reset() {
        let limits = [limit("a"), limit("b"), limit("c")];
        let mut v = Verdict::new("r".into(), false);
        v.decided(
            &limits,
            &[allowed(3, 10), allowed(1, 5), allowed(1, 50)],
            DecidedBy::Backend,
        );
        assert_eq!(v.tightest().unwrap().limit.name(), "c");
        assert_eq!(v.outcome, Outcome::Allowed);
        assert_eq!(v.refused_by, None);
    }

    #[test]
    fn the_refusing_limit_is_the_one_with_the_longest_wait() {
        let limits = [limit("a"), limit("b"), limit("c")];
        let mut v = Verdict::new("r".into(), false);
        v.decided(
            &limits,
            &[limited(2, 10), allowed(4, 5), limited(30, 60)],
            DecidedBy::Backend,
        );
        assert_eq!(v.refusing().unwrap().limit.name(), "c");
        assert_eq!(v.retry_after(), Some(Duration::from_secs(30)));
        assert_eq!(v.outcome, Outcome::Limited);
    }

    #[test]
    fn a_shadow_rule_forwards_what_it_would_refuse() {
        let limits = [limit("a")];
        let mut v = Verdict::new("r".into(), true);
        v.decided(&limits, &[limited(2, 10)], DecidedBy::Backend);
        assert_eq!(v.outcome, Outcome::ShadowLimited);
        assert_eq!(v.refusing().unwrap().limit.name(), "a");
    }
}
