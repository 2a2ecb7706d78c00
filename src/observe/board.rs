//! The status page's live numbers: what each rule decided, second by second
//! over the last few minutes, and which clients were refused most.
//!
//! [`Observe`](super::Observe) hands every answered request to
//! [`Board::record`]; the admin listener reads a [`Snapshot`] for
//! `GET /status.json`. Two structures, each bounded whatever the traffic:
//!
//! - **Per-rule counts.** Each rule seen gets a slot (at most
//!   [`MAX_RULES`]; later names share one overflow slot) holding its totals
//!   since start and a ring of one-second buckets for allowed and limited
//!   requests. Recording is lock-free and allocation-free: a linear scan of
//!   the few slots (the rule's name is usually the same `Arc` as last time),
//!   one atomic add into the totals and one compare-and-swap into the
//!   current bucket. A slot is created once per new rule name, under a
//!   mutex that requests for known rules never touch.
//! - **Most limited clients.** A space-saving top-k (Metwally, Agrawal and
//!   El Abbadi, 2005) per minute, for the last [`TOP_MINUTES`] minutes: at
//!   most [`TOP_CAPACITY`] clients per minute, so memory is bounded however
//!   many clients are refused. It sits behind a short mutex taken only for
//!   refusals (`429`), which are not the hot path: an allowed request never
//!   touches it.
//!
//! Decisions are counted as `/metrics` counts them (see [`Tally::of`]), so
//! the page's totals equal the `floodgate_requests_total` sums for the same
//! traffic. Clients are named by their key's stable id
//! ([`RateKey::stable_id`]): an address in clear (`ip:192.0.2.1`), an API
//! key or a composite only as its fingerprint (`h:…`, `c:…`); a rule keyed
//! `global` names the client address the gate resolved instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::key::Fingerprinter;
use crate::limiter::RateKey;
use crate::verdict::{Outcome, Verdict};

use super::Exchange;

/// Complete seconds a snapshot shows per rule: three minutes.
pub const SECONDS_SHOWN: usize = 180;

/// Buckets in each ring: the seconds shown plus the one being filled.
const RING: usize = SECONDS_SHOWN + 1;

/// Rules with a slot of their own; a rule set rarely has more than a dozen,
/// and a slot is about 3 KB.
pub const MAX_RULES: usize = 32;

/// The name of the slot rules beyond [`MAX_RULES`] share.
pub const OVERFLOW_RULE: &str = "(other rules)";

/// Clients tracked per minute by the space-saving top-k. The counts of the
/// [`TOP_SHOWN`] most refused are exact unless more than this many clients
/// are refused in a minute, and even then within the reported error.
pub const TOP_CAPACITY: usize = 64;

/// Minutes the most limited clients are counted over.
pub const TOP_MINUTES: usize = 5;

/// Clients a snapshot lists.
pub const TOP_SHOWN: usize = 10;

/// What `/metrics` counts a request as (`floodgate_requests_total`'s
/// `decision` label), one variant per value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tally {
    /// Let through by the limiter, or by a rule with no limits.
    Allowed,
    /// Answered `429`.
    Limited,
    /// Forwarded, but a shadow rule would have refused it.
    ShadowLimited,
    /// Its network or key is on an allow list: forwarded, never refused.
    AllowListed,
    /// Answered `403`: the client network is denied.
    Denied,
    /// Answered `400`: no key could be derived.
    BadKey,
    /// The limiter could not decide: forwarded (`open`) or answered `503`
    /// (`closed`).
    Undecided,
}

impl Tally {
    /// How `/metrics` counted `verdict`.
    pub fn of(verdict: &Verdict) -> Tally {
        match verdict.outcome {
            Outcome::Allowed => Tally::Allowed,
            Outcome::Limited => Tally::Limited,
            Outcome::ShadowLimited => Tally::ShadowLimited,
            Outcome::Exempt => Tally::AllowListed,
            Outcome::Denied => Tally::Denied,
            Outcome::BadKey => Tally::BadKey,
            Outcome::Undecided => Tally::Undecided,
        }
    }
}

/// Requests per decision since start, as `/metrics` labels them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// `decision="allowed"`.
    pub allowed: u64,
    /// `decision="limited"`.
    pub limited: u64,
    /// `decision="shadow_limited"`.
    pub shadow_limited: u64,
    /// `decision="allow_listed"`.
    pub allow_listed: u64,
    /// `decision="denied"`.
    pub denied: u64,
    /// `decision="bad_key"`.
    pub bad_key: u64,
    /// `decision="undecided"`.
    pub undecided: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, other: Totals) {
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.shadow_limited += other.shadow_limited;
        self.allow_listed += other.allow_listed;
        self.denied += other.denied;
        self.bad_key += other.bad_key;
        self.undecided += other.undecided;
    }
}

// === per-rule counts ===

/// Which series of a ring a request goes to.
const ALLOWED: usize = 0;
const LIMITED: usize = 1;

/// One-second buckets, each an `AtomicU64` holding the second it counts
/// (high 32 bits, seconds since the board started) and its count (low 32
/// bits), so a bucket is claimed for a new second and counted in one
/// compare-and-swap, never read half reset. A count cannot reach 2³² in a
/// second.
struct Ring {
    cells: [[AtomicU64; 2]; RING],
}

impl Ring {
    fn new() -> Self {
        Ring {
            cells: std::array::from_fn(|_| [AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// Counts one request of `series` in second `sec`.
    fn add(&self, series: usize, sec: u32) {
        let cell = &self.cells[sec as usize % RING][series];
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let next = match ((current >> 32) as u32).cmp(&sec) {
                std::cmp::Ordering::Equal => current + 1,
                std::cmp::Ordering::Less => (u64::from(sec) << 32) | 1,
                // A thread that read the clock a whole ring ago: its second
                // is no longer shown.
                std::cmp::Ordering::Greater => return,
            };
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The count of `series` in second `sec` (zero once the bucket moved on).
    fn get(&self, series: usize, sec: u32) -> u64 {
        let value = self.cells[sec as usize % RING][series].load(Ordering::Relaxed);
        if (value >> 32) as u32 == sec {
            value & u64::from(u32::MAX)
        } else {
            0
        }
    }
}

/// One rule's counts.
struct RuleSlot {
    name: Arc<str>,
    totals: [AtomicU64; 7],
    ring: Ring,
}

impl RuleSlot {
    fn new(name: Arc<str>) -> Box<Self> {
        Box::new(RuleSlot {
            name,
            totals: std::array::from_fn(|_| AtomicU64::new(0)),
            ring: Ring::new(),
        })
    }

    fn is(&self, rule: &Arc<str>) -> bool {
        Arc::ptr_eq(&self.name, rule) || *self.name == **rule
    }

    fn totals(&self) -> Totals {
        let [
            allowed,
            limited,
            shadow_limited,
            allow_listed,
            denied,
            bad_key,
            undecided,
        ] = self.totals.each_ref().map(|c| c.load(Ordering::Relaxed));
        Totals {
            allowed,
            limited,
            shadow_limited,
            allow_listed,
            denied,
            bad_key,
            undecided,
        }
    }
}

// === most limited clients ===

/// One counter of a space-saving table.
#[derive(Debug)]
struct Counted {
    client: Box<str>,
    /// Refusals counted (an over-estimate by at most `error`).
    count: u64,
    /// The count the evicted client had when this one took its place.
    error: u64,
}

/// A space-saving top-k over one minute: at most [`TOP_CAPACITY`] clients;
/// a new client, once it is full, replaces the least counted one and
/// inherits its count as its possible error.
#[derive(Debug, Default)]
struct SpaceSaving {
    minute: u32,
    counted: Vec<Counted>,
}

impl SpaceSaving {
    fn offer(&mut self, client: &[u8]) {
        if let Some(c) = self
            .counted
            .iter_mut()
            .find(|c| c.client.as_bytes() == client)
        {
            c.count += 1;
            return;
        }
        // Stable ids are ASCII; lossy only for a custom key that is not.
        let client = String::from_utf8_lossy(client).into();
        if self.counted.len() < TOP_CAPACITY {
            self.counted.push(Counted {
                client,
                count: 1,
                error: 0,
            });
        } else if let Some(least) = self.counted.iter_mut().min_by_key(|c| c.count) {
            *least = Counted {
                client,
                count: least.count + 1,
                error: least.count,
            };
        }
    }

    /// What a client absent from this table may have had: nothing while it
    /// is not full, else up to the least count (it may have been evicted).
    fn absent_bound(&self) -> u64 {
        if self.counted.len() < TOP_CAPACITY {
            0
        } else {
            self.counted.iter().map(|c| c.count).min().unwrap_or(0)
        }
    }
}

/// A space-saving table per minute, the last [`TOP_MINUTES`] of them.
#[derive(Debug)]
struct TopLimited {
    minutes: [SpaceSaving; TOP_MINUTES],
    /// The client id being built (kept to save an allocation per refusal).
    scratch: Vec<u8>,
}

impl TopLimited {
    fn new() -> Self {
        TopLimited {
            minutes: std::array::from_fn(|_| SpaceSaving::default()),
            scratch: Vec::with_capacity(64),
        }
    }

    /// Counts one refusal of the client `scratch` names, in `minute`.
    fn offer_scratch(&mut self, minute: u32) {
        let table = &mut self.minutes[minute as usize % TOP_MINUTES];
        if table.minute != minute || table.counted.is_empty() {
            table.minute = minute;
            table.counted.clear();
        }
        table.offer(&self.scratch);
    }

    /// The most refused clients over the minutes up to `minute`.
    fn top(&self, minute: u32) -> Vec<TopClient> {
        let live: Vec<&SpaceSaving> = self
            .minutes
            .iter()
            .filter(|t| !t.counted.is_empty() && t.minute <= minute)
            .filter(|t| minute - t.minute < TOP_MINUTES as u32)
            .collect();
        let mut merged: Vec<TopClient> = Vec::new();
        for table in &live {
            for c in &table.counted {
                if merged.iter().any(|m| *m.client == *c.client) {
                    continue;
                }
                let (mut limited, mut error) = (0, 0);
                for other in &live {
                    match other.counted.iter().find(|o| o.client == c.client) {
                        Some(o) => {
                            limited += o.count;
                            error += o.error;
                        }
                        None => error += other.absent_bound(),
                    }
                }
                merged.push(TopClient {
                    client: c.client.to_string(),
                    limited,
                    error,
                });
            }
        }
        merged.sort_by(|a, b| {
            b.limited
                .cmp(&a.limited)
                .then_with(|| a.client.cmp(&b.client))
        });
        merged.truncate(TOP_SHOWN);
        merged
    }
}

/// One of the most limited clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopClient {
    /// Its key's stable id: `ip:<address>`, or `h:`/`c:`/`b:` and a
    /// fingerprint (never an API key in clear).
    pub client: String,
    /// Requests answered `429` over the last [`TOP_MINUTES`] minutes (at
    /// most `error` too many).
    pub limited: u64,
    /// How much `limited` may over-count (zero unless more than
    /// [`TOP_CAPACITY`] clients were refused in one of those minutes).
    pub error: u64,
}

// === the board ===

/// One rule's numbers in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleSeries {
    /// The rule's name.
    pub rule: String,
    /// Its requests per decision since start.
    pub totals: Totals,
    /// Allowed requests in each second, oldest first (see
    /// [`Snapshot::until`]).
    pub allowed: Vec<u64>,
    /// Limited requests in each second, oldest first.
    pub limited: Vec<u64>,
}

/// The board's numbers at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The last complete second the series end with, in Unix seconds.
    pub until: u64,
    /// Seconds each series holds ([`SECONDS_SHOWN`]).
    pub seconds: usize,
    /// Each rule seen since start, in the order first seen.
    pub rules: Vec<RuleSeries>,
    /// The most limited clients of the last [`TOP_MINUTES`] minutes, most
    /// refused first.
    pub top_limited: Vec<TopClient>,
}

/// The status page's counters (see the module docs). Build one, hand it to
/// [`Observe`](super::Observe) and to the admin listener.
pub struct Board {
    origin: Instant,
    origin_unix: u64,
    slots: Box<[OnceLock<Box<RuleSlot>>]>,
    overflow: RuleSlot,
    /// Held only while a new rule gets its slot.
    adding: Mutex<()>,
    /// Held only to count a refusal, or to read the top clients.
    top: Mutex<TopLimited>,
    fingerprints: Fingerprinter,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

impl Board {
    /// A board naming clients by `fingerprints` (as Redis key names do) and,
    /// for globally keyed rules, by the address the gate resolved.
    pub fn new(fingerprints: Fingerprinter) -> Self {
        let origin_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Board {
            origin: Instant::now(),
            origin_unix,
            slots: (0..MAX_RULES).map(|_| OnceLock::new()).collect(),
            overflow: *RuleSlot::new(OVERFLOW_RULE.into()),
            adding: Mutex::new(()),
            top: Mutex::new(TopLimited::new()),
            fingerprints,
        }
    }

    /// Records one answered request, answered at `at` (runs in
    /// [`Observe`](super::Observe) for every request).
    pub fn record(&self, exchange: &Exchange<'_>, at: Instant) {
        let Some(verdict) = exchange.verdict else {
            return;
        };
        let tally = Tally::of(verdict);
        let sec = self.second(at);
        let slot = self.slot(&verdict.rule);
        slot.totals[tally as usize].fetch_add(1, Ordering::Relaxed);
        match tally {
            // Forwarded either way: the chart's allowed series.
            Tally::Allowed | Tally::AllowListed => slot.ring.add(ALLOWED, sec),
            Tally::Limited => {
                slot.ring.add(LIMITED, sec);
                self.count_refusal(verdict, sec);
            }
            _ => {}
        }
    }

    /// The numbers at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let current = self.second(now);
        // The complete seconds: `current - SECONDS_SHOWN ..= current - 1`,
        // those before the board started counting as zero.
        let series = |slot: &RuleSlot, which: usize| -> Vec<u64> {
            (1..=SECONDS_SHOWN as u32)
                .rev()
                .map(|back| {
                    current
                        .checked_sub(back)
                        .map_or(0, |s| slot.ring.get(which, s))
                })
                .collect()
        };
        let rules: Vec<RuleSeries> = self
            .slots
            .iter()
            .map_while(OnceLock::get)
            .map(|slot| &**slot)
            .chain(Some(&self.overflow).filter(|o| o.totals() != Totals::default()))
            .map(|slot| RuleSeries {
                rule: slot.name.to_string(),
                totals: slot.totals(),
                allowed: series(slot, ALLOWED),
                limited: series(slot, LIMITED),
            })
            .collect();
        let top_limited = self
            .top
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .top(current / 60);
        Snapshot {
            until: (self.origin_unix + u64::from(current)).saturating_sub(1),
            seconds: SECONDS_SHOWN,
            rules,
            top_limited,
        }
    }

    /// Seconds from the board's start to `at`.
    fn second(&self, at: Instant) -> u32 {
        let since = at.saturating_duration_since(self.origin);
        u32::try_from(since.as_secs()).unwrap_or(u32::MAX)
    }

    /// The slot counting `rule`, given one if it has none yet.
    fn slot(&self, rule: &Arc<str>) -> &RuleSlot {
        // Slots are filled in order, so the first empty one ends the search.
        for cell in self.slots.iter() {
            match cell.get() {
                Some(slot) if slot.is(rule) => return slot,
                Some(_) => continue,
                None => return self.add_slot(rule),
            }
        }
        &self.overflow
    }

    #[cold]
    fn add_slot(&self, rule: &Arc<str>) -> &RuleSlot {
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        // Another worker may have added it, or others, meanwhile.
        for cell in self.slots.iter() {
            match cell.get() {
                Some(slot) if slot.is(rule) => return slot,
                Some(_) => continue,
                None => return cell.get_or_init(|| RuleSlot::new(rule.clone())),
            }
        }
        &self.overflow
    }

    fn count_refusal(&self, verdict: &Verdict, sec: u32) {
        let mut top = self.top.lock().unwrap_or_else(|e| e.into_inner());
        let top = &mut *top;
        top.scratch.clear();
        if let Some(key) = &verdict.key {
            key.write_stable_id(&self.fingerprints, &mut top.scratch);
        }
        if top.scratch.is_empty() || top.scratch == b"g" {
            // One budget for everyone: the client is who sent it.
            top.scratch.clear();
            match verdict.client {
                Some(addr) => {
                    RateKey::ip(addr).write_stable_id(&self.fingerprints, &mut top.scratch);
                }
                None => top.scratch.extend_from_slice(b"unknown"),
            }
        }
        top.offer_scratch(sec / 60);
    }
}

#[cfg(test)]
mod tests;
