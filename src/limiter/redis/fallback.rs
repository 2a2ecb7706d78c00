//! The `local` failure policy: this replica's memory decides while Redis
//! cannot, starting from what Redis last said, and what it admits is charged
//! to Redis once Redis answers.
//!
//! - Last known state. Every answer Redis gives this replica carries the
//!   states it decided on; the state after the decision is written into the
//!   local table ([`MemoryBackend::update`]), per algorithm: a GCRA key's TAT
//!   as "this far ahead of now" (read after the answer arrived, so rounded
//!   towards spent), a window's count as it is (windows are aligned to the
//!   epoch on both clocks), the larger of the two when the local table
//!   already counts more in that window. So a key that has just spent its
//!   budget through Redis is spent locally too when Redis goes away.
//! - Charge-back. Each request the local table admits is counted per Redis
//!   key (every limit of the request); when Redis answers again, the counts
//!   are added to the keys in one script call per batch of keys
//!   ([`CHARGE_SCRIPT`](super::scripts::CHARGE_SCRIPT), `Counter::charge`
//!   per algorithm). A window key's count restarts when its admissions move
//!   into a later window (the earlier window's admissions no longer count;
//!   for a sliding window they would still weigh in a little, which this
//!   under-charges). A decision whose batch gave up waiting but that Redis
//!   ran after all (its answer came late) was charged by Redis itself: a late
//!   charge takes one off the count.
//!
//! Memory stays bounded: the local table is the memory backend's bounded
//! table, and at most [`OWED_CAP`] keys carry a count (beyond it, local
//! admissions of further keys are not charged back).

use std::time::Instant;

use dashmap::DashMap;

use super::super::algorithm::State;
use super::super::{Backend, Check, Decision, Decisions, Limit, MemoryBackend, RateKey};
use super::scripts::Params;

/// Keys whose local admissions are remembered for charging back, at most.
pub const OWED_CAP: usize = 100_000;

/// Requests one key admitted locally, not yet in Redis.
struct Owed {
    n: u64,
    params: Params,
    first: Instant,
    /// `first` in µs since the epoch (the local table's clock), to tell
    /// which window it falls in.
    first_us: u64,
}

/// One key's charge.
pub struct Charge {
    pub key: Vec<u8>,
    pub n: u64,
    pub params: Params,
    pub first: Instant,
}

pub struct Local {
    memory: MemoryBackend,
    owed: DashMap<Vec<u8>, Owed>,
}

impl Local {
    /// Keys held in the local table.
    pub fn keys(&self) -> usize {
        self.memory.total_len()
    }

    pub fn new(memory: MemoryBackend) -> Self {
        Local {
            memory,
            owed: DashMap::new(),
        }
    }

    /// Redis decided on `key` under `limit` at `t0` (its clock, µs) and left
    /// it in `state` (`None`: no state).
    pub fn seen(&self, limit: &Limit, key: &RateKey, state: Option<State>, t0: u64) {
        let Some(state) = state.filter(|s| s.expires > t0) else {
            return;
        };
        if limit.algorithm().is_window() {
            self.memory.update(limit, key, |held, _| match held {
                Some(h) if h.expires == state.expires => State {
                    expires: h.expires,
                    count: ((h.count >> 32).max(state.count >> 32) << 32)
                        | (h.count & 0xffff_ffff).max(state.count & 0xffff_ffff),
                },
                _ => state,
            });
        } else {
            let ahead = std::time::Duration::from_micros(state.expires - t0);
            self.memory.raise(limit, key, ahead);
        }
    }

    /// What this replica last heard for `key` under `limit`, without
    /// charging it.
    pub fn peek(&self, limit: &Limit, key: &RateKey) -> Decision {
        self.memory.peek(limit, key)
    }

    /// Decides locally, all or nothing; an admission is owed to each
    /// check's Redis key.
    pub fn decide(
        &self,
        checks: &[Check<'_>],
        redis_key: impl Fn(&Check<'_>) -> Vec<u8>,
    ) -> Decisions {
        let decisions = self.memory.decide_all(checks);
        if decisions.iter().all(Decision::is_allowed) {
            let now_us = self.memory.now_micros();
            for check in checks {
                self.owe(redis_key(check), Params::of(&check.limit.counter()), now_us);
            }
        }
        decisions
    }

    fn owe(&self, key: Vec<u8>, params: Params, now_us: u64) {
        let fresh = || Owed {
            n: 0,
            params,
            first: Instant::now(),
            first_us: now_us,
        };
        if let Some(mut owed) = self.owed.get_mut(&key) {
            // A window key's admissions in an earlier window no longer count.
            if params.code != 0 && owed.first_us / params.q.max(1) != now_us / params.q.max(1) {
                *owed = fresh();
            }
            owed.n += 1;
            return;
        }
        if self.owed.len() < OWED_CAP {
            self.owed.entry(key).or_insert_with(fresh).n += 1;
        }
    }

    /// Redis charged a request for `key` after its batch had given up: that
    /// admission is already in Redis.
    pub fn late(&self, key: &[u8]) {
        if let Some(mut owed) = self.owed.get_mut(key) {
            owed.n = owed.n.saturating_sub(1);
        }
    }

    /// Whether any admission waits to be charged.
    pub fn owes(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Takes every count out, for charging.
    pub fn drain(&self) -> Vec<Charge> {
        let keys: Vec<Vec<u8>> = self.owed.iter().map(|e| e.key().clone()).collect();
        keys.into_iter()
            .filter_map(|key| self.owed.remove(&key))
            .filter(|(_, owed)| owed.n > 0)
            .map(|(key, owed)| Charge {
                key,
                n: owed.n,
                params: owed.params,
                first: owed.first,
            })
            .collect()
    }

    /// Puts back charges that could not be sent.
    pub fn restore(&self, charges: Vec<Charge>) {
        let now_us = self.memory.now_micros();
        for c in charges {
            let age = u64::try_from(c.first.elapsed().as_micros()).unwrap_or(u64::MAX);
            let mut owed = self.owed.entry(c.key).or_insert_with(|| Owed {
                n: 0,
                params: c.params,
                first: c.first,
                first_us: now_us.saturating_sub(age),
            });
            owed.n += c.n;
            owed.first = owed.first.min(c.first);
        }
    }

    /// Forgets what this replica holds for `key` under `limit` (a reset):
    /// its last known state. Returns whether there was any.
    pub fn forget(&self, limit: &Limit, key: &RateKey) -> bool {
        self.memory.forget(limit, key)
    }

    /// Drops the admissions owed to the Redis key `key` (a reset: charging
    /// them back would undo it).
    pub fn forgive(&self, key: &[u8]) {
        self.owed.remove(key);
    }

    pub fn retain_recent(&self) {
        self.memory.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Algorithm;
    use std::num::NonZeroU32;

    fn limit() -> Limit {
        Limit::new(
            "default",
            "3/h".parse().unwrap(),
            NonZeroU32::new(3).unwrap(),
        )
    }

    fn one<'a>(limit: &'a Limit, key: &'a RateKey) -> [Check<'a>; 1] {
        [Check { limit, key }]
    }

    #[test]
    fn a_key_spent_through_redis_stays_spent_locally() {
        let l = limit();
        let local = Local::new(MemoryBackend::new(100));
        let key = RateKey::bytes("spent");
        // Redis left the key at TAT = t0 + tau + t: its burst is spent.
        let t0 = 1_000_000;
        let tat = t0 + (l.tolerance() + l.emission_interval()).as_micros() as u64;
        local.seen(
            &l,
            &key,
            Some(State {
                expires: tat,
                count: 0,
            }),
            t0,
        );
        let decision = local.decide(&one(&l, &key), |_| b"k".to_vec());
        assert!(!decision[0].is_allowed(), "{decision:?}");
        assert!(!local.owes(), "a refusal is owed to nobody");
        // A key Redis never answered for has its full burst.
        let fresh = RateKey::bytes("fresh");
        for _ in 0..3 {
            assert!(local.decide(&one(&l, &fresh), |_| b"f".to_vec())[0].is_allowed());
        }
        assert!(!local.decide(&one(&l, &fresh), |_| b"f".to_vec())[0].is_allowed());
        local.late(b"f");
        let charges = local.drain();
        assert_eq!(charges.len(), 1);
        assert_eq!((charges[0].key.as_slice(), charges[0].n), (&b"f"[..], 2));
        assert_eq!(charges[0].params, Params::of(&l.counter()));
        assert!(!local.owes(), "drained");
    }

    #[test]
    fn a_window_spent_through_redis_stays_spent_and_a_refusal_owes_nothing() {
        let quota = Limit::window("daily", "2/d".parse().unwrap(), Algorithm::FixedWindow).unwrap();
        let burst = limit();
        let memory = MemoryBackend::new(100);
        let now = memory.now_micros();
        let local = Local::new(memory);
        let key = RateKey::bytes("k");
        let day = 86_400_000_000;
        let end = (now / day + 1) * day;
        local.seen(
            &quota,
            &key,
            Some(State {
                expires: end,
                count: 2,
            }),
            now,
        );
        // A smaller count Redis reports later for the same window keeps the larger.
        local.seen(
            &quota,
            &key,
            Some(State {
                expires: end,
                count: 1,
            }),
            now,
        );
        let checks = [
            Check {
                limit: &burst,
                key: &key,
            },
            Check {
                limit: &quota,
                key: &key,
            },
        ];
        let decisions = local.decide(&checks, |c| c.limit.name().as_bytes().to_vec());
        assert!(
            decisions[0].is_allowed() && !decisions[1].is_allowed(),
            "{decisions:?}"
        );
        assert!(!local.owes(), "refused: charged to none, owed to none");
        assert_eq!(local.peek(&burst, &key).remaining(), 3);
    }
}
