//! The `local` failure policy: this replica's memory decides while Redis
//! cannot, starting from what Redis last said, and what it admits is charged
//! to Redis once Redis answers.
//!
//! - Last known state. Every answer Redis gives this replica is written into
//!   the local table as the key's TAT (an upper bound of it: Redis's
//!   `remaining` and `retry_after` are whole cells and are read after the
//!   answer arrived), so a key that has just spent its burst through Redis is
//!   spent locally too when Redis goes away.
//! - Charge-back. Each cell the local table gives out is counted per Redis
//!   key; when Redis answers again, the counts are added to the keys in one
//!   script call per batch of keys ([`CHARGE_SCRIPT`]). A decision whose
//!   batch gave up waiting but that Redis ran after all (its answer came
//!   late) was charged by Redis itself: a late "allowed" takes one cell off
//!   the count.
//!
//! Memory stays bounded: the local table is the memory backend's bounded
//! table, and at most [`OWED_CAP`] keys carry a count (beyond it, local
//! admissions of further keys are not charged back).

use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::super::{Backend, BackendError, Decision, Limit, MemoryBackend, RateKey};

/// Keys whose local admissions are remembered for charging back, at most.
pub const OWED_CAP: usize = 100_000;

/// Adds cells taken elsewhere to keys' TATs, in microseconds on Redis's
/// clock: KEYS[i] is a key, ARGV[3i-2] its cell count `n`, ARGV[3i-1] its
/// limit's `t`, ARGV[3i] how long ago (µs) the first of those cells was
/// taken. As if the `n` cells had been taken back to back when the first
/// was: `tat = max(tat, now - age) + n * t`. That is never later than the
/// local table's own TAT after those cells (it started from the key's last
/// known TAT or later, and each cell adds at least `t`), so a charged key is
/// never locked out longer than this replica itself would have locked it;
/// and it keeps what other replicas took meanwhile. Returns the keys charged.
pub const CHARGE_SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local t0 = tonumber(now[1]) * 1000000 + tonumber(now[2])
for i = 1, #KEYS do
  local key = KEYS[i]
  local n = tonumber(ARGV[3 * i - 2])
  local t = tonumber(ARGV[3 * i - 1])
  local first = t0 - tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key)) or first
  if tat < first then tat = first end
  local next = tat + n * t
  if next > t0 then
    redis.call('SET', key, string.format('%d', next), 'PX', math.ceil((next - t0) / 1000))
  end
end
return #KEYS
"#;

/// Cells one key took locally, not yet in Redis.
struct Owed {
    n: u64,
    t_us: u64,
    first: Instant,
}

/// One key's charge.
pub struct Charge {
    pub key: Vec<u8>,
    pub n: u64,
    pub t_us: u64,
    pub first: Instant,
}

pub struct Local {
    memory: MemoryBackend,
    owed: DashMap<Vec<u8>, Owed>,
}

impl Local {
    pub fn new(memory: MemoryBackend) -> Self {
        Local {
            memory,
            owed: DashMap::new(),
        }
    }

    /// Redis answered for `key`: its TAT is at most `ahead` from now.
    pub fn seen(&self, limit: &Limit, key: &RateKey, ahead: Duration) {
        self.memory.raise(limit, key, ahead);
    }

    /// Decides locally; an admission is owed to `redis_key` (whose limit
    /// emits a cell every `t_us`).
    pub fn decide(
        &self,
        limit: &Limit,
        key: &RateKey,
        redis_key: impl FnOnce() -> Vec<u8>,
        t_us: u64,
    ) -> Result<Decision, BackendError> {
        let decision = self.memory.decide(limit, key)?;
        if decision.is_allowed() {
            self.owe(redis_key(), t_us);
        }
        Ok(decision)
    }

    fn owe(&self, key: Vec<u8>, t_us: u64) {
        if let Some(mut owed) = self.owed.get_mut(&key) {
            owed.n += 1;
            return;
        }
        if self.owed.len() < OWED_CAP {
            self.owed
                .entry(key)
                .or_insert_with(|| Owed {
                    n: 0,
                    t_us,
                    first: Instant::now(),
                })
                .n += 1;
        }
    }

    /// Redis ran a decision for `key` after its batch had given up: if it
    /// took a cell, that cell is already in Redis.
    pub fn late(&self, key: &[u8], allowed: bool) {
        if allowed && let Some(mut owed) = self.owed.get_mut(key) {
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
                t_us: owed.t_us,
                first: owed.first,
            })
            .collect()
    }

    /// Puts back charges that could not be sent.
    pub fn restore(&self, charges: Vec<Charge>) {
        for c in charges {
            let mut owed = self.owed.entry(c.key).or_insert_with(|| Owed {
                n: 0,
                t_us: c.t_us,
                first: c.first,
            });
            owed.n += c.n;
            owed.first = owed.first.min(c.first);
        }
    }

    pub fn retain_recent(&self) {
        self.memory.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limit() -> Limit {
        Limit::new(
            "default",
            "3/h".parse().unwrap(),
            NonZeroU32::new(3).unwrap(),
        )
    }

    #[test]
    fn a_key_spent_through_redis_stays_spent_locally() {
        let l = limit();
        let local = Local::new(MemoryBackend::new(100));
        let key = RateKey::bytes("spent");
        // Redis answered "allowed, 0 remaining": TAT = now + tau + t.
        local.seen(&l, &key, l.tolerance() + l.emission_interval());
        let decision = local.decide(&l, &key, || b"k".to_vec(), 1).unwrap();
        assert!(!decision.is_allowed(), "{decision:?}");
        assert!(!local.owes(), "a refusal is owed to nobody");
        // A key Redis never answered for has its full burst.
        let fresh = RateKey::bytes("fresh");
        for _ in 0..3 {
            assert!(
                local
                    .decide(&l, &fresh, || b"f".to_vec(), 7)
                    .unwrap()
                    .is_allowed()
            );
        }
        assert!(
            !local
                .decide(&l, &fresh, || b"f".to_vec(), 7)
                .unwrap()
                .is_allowed()
        );
        local.late(b"f", true);
        local.late(b"f", false);
        let charges = local.drain();
        assert_eq!(charges.len(), 1);
        assert_eq!(
            (charges[0].key.as_slice(), charges[0].n, charges[0].t_us),
            (&b"f"[..], 2, 7)
        );
        assert!(!local.owes(), "drained");
    }
}
