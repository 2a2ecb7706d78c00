//! Limiter memory is bounded: what a million keys cost, and that `max_keys`
//! caps it. One test measures both, one after the other, because `cargo
//! test` runs the tests of a file as threads of one process and a sibling
//! test would disturb this process's resident memory.
//!
//! `cargo test --test memory -- --nocapture` prints the measurements.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use floodgate::{Limit, MemoryBackend, RateKey};

// The binary's allocator, so the numbers are what the binary would show.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: f64 = 1024.0 * 1024.0;
const KEYS: u32 = 1_000_000;

/// This process's resident memory now, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Key `n`: a distinct IPv4 address, built without allocating.
fn key(n: u32) -> RateKey {
    RateKey::ip(IpAddr::V4(Ipv4Addr::from(n)))
}

/// Inserts `KEYS` distinct keys into a fresh backend capped at `max_keys`;
/// returns the keys it then tracks and the growth of this process's RSS.
fn fill(max_keys: usize) -> (usize, u64) {
    // A rate nothing refills during the test: every key keeps its state.
    let limit = Limit::new("default", "1/h".parse().unwrap(), NonZeroU32::MIN);
    let before = rss_bytes();
    let backend = MemoryBackend::new(max_keys);
    let mut allowed = 0;
    for n in 0..KEYS {
        if backend.decide(&limit, &key(n)).unwrap().is_allowed() {
            allowed += 1;
        }
    }
    let growth = rss_bytes().saturating_sub(before);
    let tracked = backend.len(&limit);
    println!(
        "max_keys {max_keys}: {KEYS} distinct keys inserted, {tracked} tracked, RSS +{:.1} MiB",
        growth as f64 / MIB
    );
    assert_eq!(allowed, KEYS, "every new key starts with a full burst");
    // Keep the backend alive until after the reading.
    drop(backend);
    (tracked, growth)
}

#[test]
fn a_million_keys_fit_in_bounded_memory_and_max_keys_caps_it() {
    // The cap first: the uncapped table is the larger, and memory it freed
    // could otherwise be reused here and hide growth.
    let (capped_len, capped_growth) = fill(100_000);
    let (full_len, full_growth) = fill(1_000_000);

    assert_eq!(full_len, KEYS as usize, "no key forgotten below the cap");
    assert!(
        full_growth < 128 * 1024 * 1024,
        "1M keys grew RSS by {:.1} MiB (bound 128 MiB)",
        full_growth as f64 / MIB
    );

    // A few over the cap at most, one per concurrent inserter.
    assert!(
        capped_len <= 100_000 + 4,
        "max_keys 100000 tracks {capped_len}"
    );
    assert!(
        capped_len >= 75_000,
        "eviction forgets an eighth at a time, not most of the table: {capped_len}"
    );
    assert!(
        capped_growth < 16 * 1024 * 1024,
        "a tenth of the keys grew RSS by {:.1} MiB (bound 16 MiB)",
        capped_growth as f64 / MIB
    );
    assert!(
        capped_growth * 2 < full_growth,
        "capped growth {:.1} MiB is not small next to uncapped {:.1} MiB",
        capped_growth as f64 / MIB,
        full_growth as f64 / MIB
    );
}
