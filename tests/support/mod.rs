//! Shared test harness: a raw HTTP/1.1 client, recording upstreams, floodgate
//! in-process or as the real binary, and redis-server. Everything binds
//! 127.0.0.1 on ports the OS picks.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod proxy;
pub mod redis;
pub mod upstream;

pub use client::{Response, get, request, send, try_send};
pub use proxy::{Binary, Proxy, proxy};
pub use redis::{RedisCluster, RedisServer};
pub use upstream::{Recorded, Reply, raw_upstream, upstream};

use std::time::{Duration, Instant};

/// The values of header `name` (case-insensitive) in a list of pairs, in order.
pub fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// How long `eventually` waits; `FLOODGATE_TEST_PATIENCE_SECS` raises it on
/// slow machines.
pub fn patience() -> Duration {
    std::env::var("FLOODGATE_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_secs)
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// [`patience`] (linkerd2-proxy's `assert_eventually!`).
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("gave up after {:?} waiting for {what}", patience());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
