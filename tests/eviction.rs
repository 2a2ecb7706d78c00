//! What it costs to flush a spent key out of a full in-memory key table:
//! the figure the README's "Memory" section states. The table forgets the
//! eighth of its keys with the oldest TAT when full, so a spent key (TAT far
//! ahead) goes only once seven eighths of the table hold keys spent later,
//! each of which took a whole burst of allowed requests.
//!
//! `cargo test --test eviction -- --nocapture` prints the measurements.

use std::num::NonZeroU32;
use std::time::Duration;

use floodgate::{Limit, MemoryBackend, RateKey};
use governor::clock::FakeRelativeClock;

const MAX_KEYS: usize = 2000;
const BURST: u32 = 10;

fn key(name: &str, n: usize) -> RateKey {
    RateKey::bytes(format!("{name}-{n}"))
}

/// Requests the attacker sends, each new key spent to its whole burst, until
/// `victim` (spent first) has a full burst again. The clock moves 1 ms per
/// attacker key (so each is spent later than the one before, as in real
/// traffic) and stays well short of `T` = 6 s, so nothing refills: only
/// eviction can give the victim its budget back.
/// `light` other clients, one request each, share the table beforehand.
fn requests_to_flush(light: usize) -> usize {
    let limit = Limit::new(
        "default",
        "10/min".parse().unwrap(),
        NonZeroU32::new(BURST).unwrap(),
    );
    let clock = FakeRelativeClock::default();
    let backend = MemoryBackend::with_clock(MAX_KEYS, clock.clone());
    let victim = RateKey::bytes("victim");
    for _ in 0..BURST {
        assert!(backend.decide(&limit, &victim).unwrap().is_allowed());
    }
    assert!(!backend.decide(&limit, &victim).unwrap().is_allowed());
    for n in 0..light {
        clock.advance(Duration::from_micros(1));
        assert!(
            backend
                .decide(&limit, &key("light", n))
                .unwrap()
                .is_allowed()
        );
    }
    let mut sent = 0;
    for n in 0.. {
        clock.advance(Duration::from_millis(1));
        assert!(
            n < 5000,
            "the victim was never forgotten before it could refill"
        );
        for _ in 0..BURST {
            backend.decide(&limit, &key("filler", n)).unwrap();
            sent += 1;
        }
        // A refused check takes nothing, so asking does not move the victim.
        if backend.decide(&limit, &victim).unwrap().is_allowed() {
            return sent;
        }
    }
    unreachable!()
}

#[test]
fn flushing_a_spent_key_costs_about_seven_eighths_of_max_keys_times_burst() {
    let per_key = BURST as usize;
    // A table full of light clients: the attacker must outnumber the
    // victim's eighth with keys spent later.
    let full = requests_to_flush(MAX_KEYS - 1);
    // An empty table: the victim goes with the first eighth forgotten, once
    // the table is full of spent keys.
    let empty = requests_to_flush(0);
    println!(
        "max_keys {MAX_KEYS}, burst {BURST}: {full} requests with a full table, {empty} with an \
         empty one (7/8 x max_keys x burst = {})",
        7 * MAX_KEYS * per_key / 8
    );
    let seven_eighths = 7 * MAX_KEYS * per_key / 8;
    assert!(
        full.abs_diff(seven_eighths) <= MAX_KEYS * per_key / 16,
        "{full} requests, expected about {seven_eighths}"
    );
    assert!(
        empty.abs_diff(MAX_KEYS * per_key) <= MAX_KEYS * per_key / 16,
        "{empty} requests, expected about {}",
        MAX_KEYS * per_key
    );
}
