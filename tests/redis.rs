//! The Redis backend end to end, each test with its own redis-server: one
//! limit shared exactly by several replicas (single Redis and Cluster), the
//! key layout and TTLs in Redis, and what clients see while Redis is killed,
//! frozen or not there yet under each failure policy (`local`, `open`,
//! `closed`), including how fast decisions go back to Redis.
//!
//! Deadlines asserted here are the ones the backend promises: a decision
//! gives up on Redis after `FLOODGATE_REDIS_TIMEOUT`, so every response
//! during an outage arrives within that plus [`SLACK`] (the upstream answers
//! at once); and the background probe (every 250 ms) finds Redis again within
//! [`RECOVERY`]. States are polled, never slept for: sleeps only pace
//! traffic or span a CPU-time measurement.

mod support;

use std::collections::BTreeSet;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use floodgate::key::Fingerprinter;
use support::client::{build, read_response};
use support::proxy::{ProxyBuilder, free_port};
use support::{Binary, Proxy, RedisCluster, RedisServer, Response, eventually, patience, upstream};

/// `FLOODGATE_REDIS_TIMEOUT` in the outage tests.
const TIMEOUT: Duration = Duration::from_millis(50);

/// What a response may take beyond [`TIMEOUT`] during an outage: connecting,
/// forwarding to an upstream that answers at once, and scheduling.
const SLACK: Duration = Duration::from_millis(200);

/// How soon after Redis answers again decisions must be made by it.
const RECOVERY: Duration = Duration::from_secs(2);

/// Limit on every socket wait: far beyond any deadline asserted here, so a
/// hang fails the test instead of stalling it.
const SOCKET_LIMIT: Duration = Duration::from_secs(5);

/// The API key header every test counts by (`FLOODGATE_KEY`).
const KEY_HEADER: &str = "x-api-key";

// === helpers ===

/// The response budget during an outage.
fn budget() -> Duration {
    TIMEOUT + SLACK
}

/// floodgate in-process on the Redis at `url`, counting by [`KEY_HEADER`].
fn redis_proxy(upstream: SocketAddr, url: &str) -> ProxyBuilder {
    support::proxy(upstream)
        .env("FLOODGATE_BACKEND", "redis")
        .env("FLOODGATE_REDIS_URL", url)
        .env("FLOODGATE_KEY", &format!("header:{KEY_HEADER}"))
}

/// One `GET /` on its own connection, as `api_key` (or by address when
/// `None`), with every socket wait bounded. Returns the response and how
/// long the whole exchange took, connecting included.
fn try_call(addr: SocketAddr, api_key: Option<&str>) -> (io::Result<Response>, Duration) {
    let headers: Vec<(&str, &str)> = api_key.map(|k| (KEY_HEADER, k)).into_iter().collect();
    exchange(addr, &build("GET", "/", &headers, b""))
}

fn exchange(addr: SocketAddr, raw: &[u8]) -> (io::Result<Response>, Duration) {
    let start = Instant::now();
    let result = TcpStream::connect_timeout(&addr, SOCKET_LIMIT).and_then(|stream| {
        stream.set_read_timeout(Some(SOCKET_LIMIT))?;
        stream.set_write_timeout(Some(SOCKET_LIMIT))?;
        stream.set_nodelay(true)?;
        (&stream).write_all(raw)?;
        read_response(&mut BufReader::new(&stream), false)
    });
    (result, start.elapsed())
}

/// As [`try_call`], panicking on a transport error.
fn call(addr: SocketAddr, api_key: Option<&str>) -> (Response, Duration) {
    let (res, took) = try_call(addr, api_key);
    let res = res.unwrap_or_else(|e| panic!("GET / as {api_key:?} failed after {took:?}: {e}"));
    (res, took)
}

/// As [`call`], asserting the status and that it came within [`budget`].
/// Returns how long it took.
fn call_within_budget(addr: SocketAddr, api_key: &str, status: u16, when: &str) -> Duration {
    let (res, took) = call(addr, Some(api_key));
    assert_eq!(res.status, status, "{when}: GET / as {api_key:?}: {res:?}");
    assert!(
        took <= budget(),
        "{when}: GET / as {api_key:?} took {took:?}, more than the redis timeout \
         {TIMEOUT:?} + {SLACK:?}"
    );
    took
}

/// `/readyz`: status and body.
fn readyz(admin: SocketAddr) -> (u16, String) {
    match exchange(admin, &build("GET", "/readyz", &[], b"")).0 {
        Ok(res) => (res.status, res.text()),
        Err(e) => (0, format!("(no answer: {e})")),
    }
}

const READY: &str = "ready: redis backend\n";

fn is_ready(admin: SocketAddr) -> Result<(), String> {
    match readyz(admin) {
        (200, body) if body == READY => Ok(()),
        other => Err(format!("/readyz answered {other:?}")),
    }
}

/// Waits until the replica decides with Redis (not with its fallback, as it
/// does while still connecting).
fn wait_ready(admin: SocketAddr, redis_log: impl Fn() -> String) {
    let deadline = Instant::now() + patience();
    loop {
        match is_ready(admin) {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!(
                    "replica {admin} never ready: {last}; redis log:\n{}",
                    redis_log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Polls `check` until it succeeds, failing the test if that takes longer
/// than `limit` (a deadline the product promises, so not scaled by
/// [`patience`]). Returns how long it took.
fn within(limit: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) -> Duration {
    let start = Instant::now();
    loop {
        let result = check();
        let took = start.elapsed();
        match result {
            Ok(()) if took <= limit => return took,
            Ok(()) => panic!("{what} took {took:?}, more than {limit:?}"),
            Err(last) if took > limit => panic!("no {what} within {limit:?}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Every key in one Redis node.
fn scan(redis: &RedisServer) -> BTreeSet<String> {
    redis
        .cli(&["--scan"])
        .unwrap_or_else(|| panic!("redis-cli --scan failed; log:\n{}", redis.log()))
        .lines()
        .map(str::to_owned)
        .collect()
}

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let out = redis
        .cli(&["PTTL", key])
        .unwrap_or_else(|| panic!("PTTL {key} failed"));
    out.parse()
        .unwrap_or_else(|_| panic!("PTTL {key} answered {out:?}"))
}

/// The Redis key floodgate uses for `api_key` under the default limit: the
/// key's fingerprint, keyed by the prefix, never the key itself.
fn redis_key(prefix: &str, api_key: &str) -> String {
    let fingerprint = Fingerprinter::new(prefix.as_bytes()).fingerprint(api_key.as_bytes());
    format!("{prefix}{{h:{fingerprint}}}:default")
}

fn exists(redis: &RedisServer, key: &str) -> bool {
    redis.cli(&["EXISTS", key]).as_deref() == Some("1")
}

/// Fires `per_replica` requests at each of `replicas` at once, all as
/// `api_key`: one thread and one connection each, connected first, then
/// released together by a barrier. Returns every status.
fn stampede(replicas: &[SocketAddr], per_replica: usize, api_key: &str) -> Vec<u16> {
    let total = replicas.len() * per_replica;
    let barrier = Arc::new(Barrier::new(total));
    let raw = Arc::new(build("GET", "/", &[(KEY_HEADER, api_key)], b""));
    let threads: Vec<JoinHandle<u16>> = replicas
        .iter()
        .flat_map(|&addr| std::iter::repeat_n(addr, per_replica))
        .map(|addr| {
            let barrier = barrier.clone();
            let raw = raw.clone();
            std::thread::spawn(move || {
                let stream = TcpStream::connect_timeout(&addr, SOCKET_LIMIT);
                barrier.wait();
                let stream = stream.unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
                stream.set_read_timeout(Some(SOCKET_LIMIT)).unwrap();
                stream.set_write_timeout(Some(SOCKET_LIMIT)).unwrap();
                (&stream).write_all(&raw).unwrap();
                read_response(&mut BufReader::new(&stream), false)
                    .unwrap_or_else(|e| panic!("request to {addr}: {e}"))
                    .status
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// Requests from a background thread, each with a fresh API key (so the
/// local refusal cache never answers them), paced every 10 ms, until
/// stopped. Every outcome is kept with when it started and how long it took.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

struct Sample {
    key: String,
    at: Instant,
    took: Duration,
    outcome: Result<u16, String>,
}

impl Traffic {
    fn start(addr: SocketAddr, prefix: &'static str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, sent, log) = (stop.clone(), sent.clone(), log.clone());
            std::thread::spawn(move || {
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("{prefix}-{n}");
                    let at = Instant::now();
                    let (res, took) = try_call(addr, Some(&key));
                    let outcome = res.map(|r| r.status).map_err(|e| e.to_string());
                    log.lock().unwrap().push(Sample {
                        key,
                        at,
                        took,
                        outcome,
                    });
                    sent.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10)); // pacing
                }
            })
        };
        Traffic {
            stop,
            sent,
            log,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have been answered.
    fn wait_for(&self, n: usize) {
        let target = self.sent() + n;
        eventually(&format!("{n} more background requests"), || {
            (self.sent() >= target).then_some(())
        });
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("traffic thread panicked");
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every sample is a fresh key, so every one must pass, whoever decides, and
/// within the outage budget.
fn all_fresh_keys_pass_within_budget(samples: &[Sample], outage: Instant) {
    for s in samples {
        let sent = s.at.checked_duration_since(outage);
        assert_eq!(
            s.outcome,
            Ok(200),
            "fresh key {} (sent {sent:?} after the outage began)",
            s.key
        );
        assert!(
            s.took <= budget(),
            "{} took {:?}, more than the redis timeout {TIMEOUT:?} + {SLACK:?} \
             (sent {sent:?} after the outage began)",
            s.key,
            s.took
        );
    }
}

fn slowest<'a>(samples: impl Iterator<Item = &'a Sample>) -> Duration {
    samples.map(|s| s.took).max().unwrap_or_default()
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the command name (which may contain spaces) start at
    // field 3; utime and stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat has a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("running getconf");
    let per_sec: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    Duration::from_millis(ticks * 1000 / per_sec)
}

// === sharing one limit ===

#[test]
fn three_replicas_share_one_limit_exactly() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| {
            redis_proxy(up.addr(), &redis.url())
                .rate("30/h")
                .burst(30)
                // Exactness is the point here, not outages: a generous
                // timeout so that a loaded test machine does not trip the
                // circuit, and any failure to decide in Redis shows up as a
                // 503 instead of a local fallback quietly admitting more.
                .env("FLOODGATE_REDIS_TIMEOUT", "1s")
                .env("FLOODGATE_REDIS_FAILURE", "closed")
                .run()
        })
        .collect();
    for r in &replicas {
        wait_ready(r.admin, || redis.log());
    }

    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let statuses = stampede(&addrs, 100, "shared");
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (30, 270),
        "(allowed, limited) over 300 requests; all statuses: {statuses:?}"
    );
    assert_eq!(up.requests(), 30, "the upstream saw only the allowed ones");
}

/// Threads that spin until dropped: a busy machine, as a compile beside
/// floodgate makes it.
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The default timeout and failure policy (50 ms, `local`) on a machine two
/// busy loops keep loaded: a burst spread over three replicas admits exactly
/// the burst, every round. A decision that misses the timeout would be
/// decided by a replica's own memory, which knows nothing of the others.
#[test]
fn a_burst_spread_over_three_replicas_is_exact_on_a_busy_machine() {
    const BURST: u32 = 30;
    let redis = RedisServer::start();
    let up = upstream().run();
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| {
            redis_proxy(up.addr(), &redis.url())
                .rate("30/h")
                .burst(BURST)
                .run()
        })
        .collect();
    for r in &replicas {
        wait_ready(r.admin, || redis.log());
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let busy = BusyLoops::start(2);
    let mut admitted = Vec::new();
    for round in 0..20 {
        let statuses = stampede(&addrs, 20, &format!("round-{round}"));
        admitted.push(count(&statuses, 200));
    }
    drop(busy);
    assert_eq!(admitted, vec![BURST as usize; 20], "admitted per round");
}

/// Each algorithm through the binary's settings: N concurrent requests for
/// one key spread over three replicas sharing one Redis admit exactly N.
#[test]
fn each_algorithm_admits_exactly_its_n_over_three_replicas() {
    let redis = RedisServer::start();
    let up = upstream().run();
    for (algorithm, burst) in [
        ("gcra", Some(20)),
        ("fixed_window", None),
        ("sliding_window", None),
    ] {
        let replicas: Vec<Proxy> = (0..3)
            .map(|_| {
                let p = redis_proxy(up.addr(), &redis.url())
                    .rate("20/h")
                    .env("FLOODGATE_ALGORITHM", algorithm);
                match burst {
                    Some(b) => p.burst(b),
                    None => p,
                }
                .run()
            })
            .collect();
        for r in &replicas {
            wait_ready(r.admin, || redis.log());
        }
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        for round in 0..3 {
            let statuses = stampede(&addrs, 20, &format!("{algorithm}-{round}"));
            assert_eq!(
                (count(&statuses, 200), count(&statuses, 429)),
                (20, 40),
                "{algorithm}, round {round}: (allowed, limited) of 60"
            );
        }
        // Counted by that algorithm: one key of its shape per round's client.
        let marker = match algorithm {
            "fixed_window" => "}.fw:default",
            "sliding_window" => "}.sw:default",
            _ => "}:default",
        };
        let keys = scan(&redis);
        assert!(
            keys.iter().filter(|k| k.ends_with(marker)).count() >= 3,
            "{algorithm}: expected three {marker} keys in {keys:?}"
        );
    }
}

#[test]
fn every_key_has_a_ttl() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("10/min") // T = 6 s: a key is back to a full burst 6 s per cell taken
        .burst(10)
        .run();
    wait_ready(fg.admin, || redis.log());

    let mut expected = BTreeSet::new();
    for n in 1..=4u32 {
        let api_key = format!("ttl-{n}");
        for _ in 0..n {
            assert_eq!(call(fg.addr, Some(&api_key)).0.status, 200);
        }
        expected.insert((redis_key("floodgate:", &api_key), n));
    }
    // Without the header the client address counts.
    assert_eq!(call(fg.addr, None).0.status, 200);
    expected.insert(("floodgate:{ip:127.0.0.1}:default".to_owned(), 1));

    let keys = scan(&redis);
    assert_eq!(
        keys,
        expected.iter().map(|(k, _)| k.clone()).collect(),
        "keys are <prefix>{{<client key>}}:<limit>"
    );
    for (key, taken) in &expected {
        let ttl = pttl(&redis, key);
        // TAT - now lies in ((taken - 1) T, taken T]; the key expires then.
        let full = 6000 * i64::from(*taken);
        assert!(
            ttl > full - 6000 && ttl <= full,
            "PTTL {key} = {ttl} ms after {taken} request(s); expected in ({}, {full}]",
            full - 6000
        );
    }

    // Another prefix: separate keys, separate budget.
    let other = redis_proxy(up.addr(), &redis.url())
        .rate("10/min")
        .burst(10)
        .env("FLOODGATE_REDIS_PREFIX", "tenant-b/")
        .run();
    wait_ready(other.admin, || redis.log());
    let (res, _) = call(other.addr, Some("ttl-4"));
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("ratelimit"),
        Some("\"default\";r=9;t=6"),
        "a fresh budget under the other prefix"
    );
    let new: BTreeSet<String> = scan(&redis).difference(&keys).cloned().collect();
    let key = redis_key("tenant-b/", "ttl-4");
    assert_eq!(new, BTreeSet::from([key.clone()]));
    let ttl = pttl(&redis, &key);
    assert!(ttl > 0 && ttl <= 6000, "PTTL {key} = {ttl}");
}

#[test]
fn no_api_key_appears_in_any_redis_key() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("10/min")
        .burst(10)
        .run();
    wait_ready(fg.admin, || redis.log());

    let long = format!("sk_live_{}", "7".repeat(200));
    let api_keys = ["k", "sk_live_short", "a b", long.as_str()];
    for api_key in api_keys {
        assert_eq!(call(fg.addr, Some(api_key)).0.status, 200);
    }
    // The same key spent as `Authorization`: one key for every spelling.
    let auth = redis_proxy(up.addr(), &redis.url())
        .rate("2/min")
        .burst(2)
        .env("FLOODGATE_KEY", "header:authorization")
        .env("FLOODGATE_REDIS_PREFIX", "auth:")
        .run();
    wait_ready(auth.admin, || redis.log());
    for (spelling, status) in [
        ("Bearer tok-9", 200),
        ("bearer  tok-9", 200),
        ("BEARER\ttok-9", 429),
    ] {
        let raw = build("GET", "/", &[("authorization", spelling)], b"");
        let res = exchange(auth.addr, &raw).0.unwrap();
        assert_eq!(res.status, status, "{spelling:?}");
    }

    let keys = scan(&redis);
    let expected: BTreeSet<String> = api_keys
        .iter()
        .map(|k| redis_key("floodgate:", k))
        .chain(["auth:{h:".to_owned()
            + &Fingerprinter::new(b"auth:")
                .fingerprint(b"bearer tok-9")
                .to_string()
            + "}:default"])
        .collect();
    assert_eq!(keys, expected);
    for key in &keys {
        for secret in api_keys.iter().copied().chain(["tok-9", "sk_live"]) {
            assert!(!key.contains(secret), "{key:?} contains {secret:?}");
        }
        assert!(key.len() <= "floodgate:{}:default".len() + 42, "{key:?}");
    }
}

// === outages ===

#[test]
fn redis_killed_mid_traffic_local_policy() {
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("2/h")
        .burst(2)
        .env("FLOODGATE_REDIS_TIMEOUT", "50ms")
        .env("FLOODGATE_REDIS_FAILURE", "local")
        .run();
    wait_ready(fg.admin, || redis.log());

    let traffic = Traffic::start(fg.addr, "bg");
    traffic.wait_for(10);
    assert!(
        exists(&redis, &redis_key("floodgate:", "bg-0")),
        "traffic went to redis before the outage"
    );

    redis.kill();
    let killed = Instant::now();
    eventually("/readyz to report the outage", || {
        let (status, body) = readyz(fg.admin);
        (status == 200 && body.starts_with("ready, degraded: redis backend")).then_some(())
    });
    // This replica's memory limits during the outage: burst 2, then 429.
    call_within_budget(fg.addr, "local-check", 200, "outage");
    call_within_budget(fg.addr, "local-check", 200, "outage");
    call_within_budget(fg.addr, "local-check", 429, "outage");
    // Decisions the local fallback made are counted.
    let metrics = support::get(fg.admin, "/metrics").text();
    let fallbacks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("floodgate_backend_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no backend error counter in\n{metrics}"));
    assert!(fallbacks >= 3, "{fallbacks} fallback decisions counted");
    // Long enough for several probes to find Redis still gone.
    traffic.wait_for(50);

    redis.restart();
    let restarted = Instant::now();
    let outage = restarted - killed;
    let mut n = 0;
    let recovered = within(RECOVERY, "decisions in redis again", || {
        is_ready(fg.admin)?;
        n += 1;
        let api_key = format!("after-{n}");
        call(fg.addr, Some(&api_key));
        exists(&redis, &redis_key("floodgate:", &api_key))
            .then_some(())
            .ok_or_else(|| format!("no key for {api_key} in redis"))
    });
    traffic.wait_for(10);
    let samples = traffic.finish();

    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= killed && s.at < restarted)
        .collect();
    assert!(
        during.len() >= 50,
        "only {} requests during the outage",
        during.len()
    );
    all_fresh_keys_pass_within_budget(&samples, killed);
    eprintln!(
        "local policy: {} requests, {} during a {outage:?} outage; slowest during it {:?}, \
         slowest overall {:?}; decisions in redis {recovered:?} after it answered",
        samples.len(),
        during.len(),
        slowest(during.iter().copied()),
        slowest(samples.iter()),
    );
}

#[test]
fn redis_frozen_open_policy() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("1/h")
        .burst(1)
        .env("FLOODGATE_REDIS_TIMEOUT", "50ms")
        .env("FLOODGATE_REDIS_FAILURE", "open")
        .run();
    wait_ready(fg.admin, || redis.log());
    assert_eq!(call(fg.addr, Some("spent")).0.status, 200);
    assert_eq!(call(fg.addr, Some("spent")).0.status, 429);

    let traffic = Traffic::start(fg.addr, "bg");
    traffic.wait_for(5);

    redis.freeze();
    let frozen = Instant::now();
    // Redis would refuse the second of these; failing open, all pass.
    let mut slowest_here = Duration::ZERO;
    for _ in 0..5 {
        let took = call_within_budget(fg.addr, "open-same", 200, "frozen");
        slowest_here = slowest_here.max(took);
    }
    // Redis refused this key until long after now: still refused, locally.
    let took = call_within_budget(fg.addr, "spent", 429, "frozen");
    slowest_here = slowest_here.max(took);
    // Long enough for several probes to time out against the frozen Redis.
    traffic.wait_for(50);

    redis.thaw();
    let thawed = Instant::now();
    let mut n = 0;
    let recovered = within(RECOVERY, "limits enforced by redis again", || {
        is_ready(fg.admin)?;
        n += 1;
        let api_key = format!("after-{n}");
        let first = call(fg.addr, Some(&api_key)).0.status;
        let second = call(fg.addr, Some(&api_key)).0.status;
        match (first, second) {
            (200, 429) => Ok(()),
            other => Err(format!("{api_key} answered {other:?}")),
        }
    });
    traffic.wait_for(10);
    let samples = traffic.finish();
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= frozen && s.at < thawed)
        .collect();
    assert!(
        during.len() >= 50,
        "only {} requests while frozen",
        during.len()
    );
    all_fresh_keys_pass_within_budget(&samples, frozen);
    eprintln!(
        "open policy: frozen for {:?}, {} requests meanwhile; slowest while frozen {:?}, \
         slowest overall {:?}; limited by redis {recovered:?} after the thaw",
        thawed - frozen,
        during.len(),
        slowest(during.iter().copied()).max(slowest_here),
        slowest(samples.iter()),
    );
}

/// README, "Running several replicas": "`/readyz` says `ready, degraded`
/// during an outage (`503` under `closed`)": a replica that fails open still
/// serves everyone, so it must stay in its load balancer.
#[test]
fn open_policy_stays_ready_during_an_outage() {
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .env("FLOODGATE_REDIS_TIMEOUT", "50ms")
        .env("FLOODGATE_REDIS_FAILURE", "open")
        .run();
    wait_ready(fg.admin, || redis.log());
    redis.kill();
    // Serving (failing open) within the budget; this request notices the outage.
    call_within_budget(fg.addr, "k", 200, "outage");
    let (status, body) = eventually("/readyz to notice the outage", || {
        let answer = readyz(fg.admin);
        (answer.1 != READY).then_some(answer)
    });
    assert!(
        status == 200 && body.starts_with("ready, degraded: redis backend"),
        "/readyz during an outage under the open policy answered {status}: {body:?}"
    );
}

#[test]
fn redis_down_closed_policy() {
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("1000/h")
        .burst(1000)
        .env("FLOODGATE_REDIS_TIMEOUT", "50ms")
        .env("FLOODGATE_REDIS_FAILURE", "closed")
        .run();
    wait_ready(fg.admin, || redis.log());
    assert_eq!(call(fg.addr, Some("closed")).0.status, 200);

    redis.kill();
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut refused = 0;
    // Long enough for several probes to find Redis still gone.
    while killed.elapsed() < 4 * floodgate::limiter::redis::PROBE_INTERVAL {
        refused += 1;
        std::thread::sleep(Duration::from_millis(10)); // pacing
        let (res, took) = call(fg.addr, Some("closed"));
        assert_eq!(res.status, 503, "{res:?}");
        let retry: u64 = res
            .header("retry-after")
            .unwrap_or_else(|| panic!("503 without Retry-After: {res:?}"))
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry >= 1, "Retry-After {retry}");
        assert!(took <= budget(), "503 after {took:?}");
        slowest = slowest.max(took);
    }
    let (status, body) = readyz(fg.admin);
    assert_eq!(status, 503, "/readyz during the outage: {body}");
    assert!(body.starts_with("not ready: redis backend"), "{body}");
    assert_eq!(up.requests(), 1, "nothing refused reached the upstream");

    let outage = killed.elapsed();
    redis.restart();
    let recovered = within(RECOVERY, "200 again", || {
        let (res, _) = call(fg.addr, Some("closed"));
        if res.status != 200 {
            return Err(format!("answered {}", res.status));
        }
        is_ready(fg.admin)
    });
    eprintln!(
        "closed policy: {refused} requests refused over {outage:?}, slowest {slowest:?}; \
         serving again {recovered:?} after redis answered"
    );
}

// === stalls and restarts ===

/// How soon after Redis answers again a replica decides with it: one round
/// trip, plus scheduling on a loaded test machine.
const ONE_ROUND_TRIP: Duration = Duration::from_millis(100);

/// The stall tests' limit: 10/s, burst 5 (`T` = 100 ms), so spent keys get
/// cells back during the test and a wrong local budget shows.
const STALL_RATE: &str = "10/s";
const STALL_BURST: usize = 5;
const STALL_T: Duration = Duration::from_millis(100);

/// One request of [`Clients`]: when it was sent, when it was answered, and
/// its status.
type Exchange = (Instant, Instant, u16);

/// One client per key asking every 10 ms until stopped; each outcome kept.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Exchange>>>,
}

impl Clients {
    fn start(addr: SocketAddr, keys: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..keys)
            .map(|k| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let key = format!("client-{k}");
                    let mut log = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let sent = Instant::now();
                        let status = call(addr, Some(&key)).0.status;
                        log.push((sent, Instant::now(), status));
                        std::thread::sleep(Duration::from_millis(10)); // pacing
                    }
                    log
                })
            })
            .collect();
        Clients { stop, threads }
    }

    fn finish(self) -> Vec<Vec<Exchange>> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("client thread panicked"))
            .collect()
    }
}

/// `DEBUG SLEEP` for `secs` from another thread; returns when it was sent
/// and when Redis answered it (it is awake again by then).
fn stall(redis: &RedisServer, secs: &str) -> (Instant, Instant) {
    let started = Instant::now();
    let answer = redis.cli(&["DEBUG", "SLEEP", secs]);
    assert_eq!(
        answer.as_deref(),
        Some("OK"),
        "DEBUG SLEEP; log:\n{}",
        redis.log()
    );
    (started, Instant::now())
}

/// 20 clients spend their burst through Redis and keep asking; Redis
/// stalls for `secs`; they go on for another 0.5 s. Returns every client's
/// log and the stall.
fn stall_spent_keys(policy: &str, secs: &str) -> (Vec<Vec<Exchange>>, (Instant, Instant)) {
    let redis = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate(STALL_RATE)
        .burst(STALL_BURST as u32)
        .env(
            "FLOODGATE_REDIS_TIMEOUT",
            &format!("{}ms", TIMEOUT.as_millis()),
        )
        .env("FLOODGATE_REDIS_FAILURE", policy)
        .run();
    wait_ready(fg.admin, || redis.log());
    let clients = Clients::start(fg.addr, 20);
    std::thread::sleep(Duration::from_millis(300)); // pacing: bursts spent
    let stalled = stall(&redis, secs);
    std::thread::sleep(Duration::from_millis(500)); // pacing: after the stall
    (clients.finish(), stalled)
}

/// At most what one exact limiter admits to a key from its first request to
/// its last answer: the burst, then one cell per `T`.
fn exact_bound(log: &[Exchange]) -> usize {
    let first = log.first().expect("requests").0;
    let last = log.last().expect("requests").1;
    STALL_BURST + ((last - first).as_micros() / STALL_T.as_micros()) as usize
}

/// README, "Running several replicas": a stall does not hand spent keys a
/// fresh local budget. Under `local` a key gets at most one cell more than
/// one exact limiter would have given it over the whole run, stall
/// included, and its local admissions are charged to Redis afterwards.
#[test]
fn a_stall_under_local_gives_a_spent_key_at_most_one_extra_cell() {
    let (logs, (from, to)) = stall_spent_keys("local", "0.5");
    for (k, log) in logs.iter().enumerate() {
        let admitted = count(&log.iter().map(|l| l.2).collect::<Vec<_>>(), 200);
        let bound = exact_bound(log);
        assert!(
            admitted <= bound + 1,
            "client-{k}: {admitted} admitted, an exact limit allows {bound} \
             (stall of {:?})",
            to - from
        );
        assert!(
            log.iter().all(|l| l.2 == 200 || l.2 == 429),
            "client-{k}: {log:?}"
        );
    }
}

/// Under `closed`, 503 only while Redis is silent: never before the stall,
/// and not one round trip after Redis answers again; no key gets a cell more
/// than an exact limit gives.
#[test]
fn a_stall_under_closed_refuses_only_while_redis_is_silent() {
    // 0.3 s: shorter than a probe's wait plus its pause before the next one
    // (200 + 250 ms before), so only a probe left waiting for Redis's answer
    // sees it come back at once.
    let (logs, (from, to)) = stall_spent_keys("closed", "0.3");
    let mut refused = 0;
    for (k, log) in logs.iter().enumerate() {
        let admitted = count(&log.iter().map(|l| l.2).collect::<Vec<_>>(), 200);
        let bound = exact_bound(log);
        assert!(
            admitted <= bound,
            "client-{k}: {admitted} admitted, an exact limit allows {bound}"
        );
        for &(sent, answered, status) in log {
            if status == 503 {
                refused += 1;
                assert!(
                    answered >= from && sent <= to + ONE_ROUND_TRIP,
                    "client-{k}: 503 for a request sent {:?} after Redis answered again",
                    sent.checked_duration_since(to)
                );
            }
        }
    }
    assert!(refused > 0, "nothing refused during a 0.3 s stall");
}

/// README, "Running several replicas": what a replica admits while Redis
/// is silent is added to the key in Redis once it answers, so the key does
/// not get those cells again from Redis.
#[test]
fn local_admissions_during_an_outage_are_charged_to_redis() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &redis.url())
        .rate("5/h")
        .burst(5)
        .env("FLOODGATE_REDIS_TIMEOUT", "50ms")
        .env("FLOODGATE_REDIS_FAILURE", "local")
        .run();
    wait_ready(fg.admin, || redis.log());
    redis.freeze();
    for _ in 0..3 {
        call_within_budget(fg.addr, "charged", 200, "frozen");
    }
    eventually("the circuit to open", || {
        is_ready(fg.admin).is_err().then_some(())
    });
    redis.thaw();
    wait_ready(fg.admin, || redis.log());
    // Five cells in all: two are left in Redis.
    let after: Vec<u16> = (0..3)
        .map(|_| call(fg.addr, Some("charged")).0.status)
        .collect();
    assert_eq!(after, [200, 200, 429], "through Redis after the outage");
    assert_eq!(up.requests(), 5);
}

/// Redis restarts (losing its state) under traffic on three replicas: once
/// each replica decides with Redis again, a burst spread over them is exact.
#[test]
fn a_redis_restart_is_exact_again_once_every_replica_reconnects() {
    const BURST: u32 = 30;
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let replicas: Vec<Proxy> = (0..3)
        .map(|_| {
            redis_proxy(up.addr(), &redis.url())
                .rate("30/h")
                .burst(BURST)
                .run()
        })
        .collect();
    for r in &replicas {
        wait_ready(r.admin, || redis.log());
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let statuses = stampede(&addrs, 20, "before");
    assert_eq!(count(&statuses, 200), BURST as usize, "before the restart");
    redis.kill();
    // Decided without Redis: answered, not asserted. The failures open
    // each replica's circuit.
    stampede(&addrs, 5, "during");
    for r in &replicas {
        eventually("the circuit to open", || {
            is_ready(r.admin).is_err().then_some(())
        });
    }
    redis.restart();
    for r in &replicas {
        wait_ready(r.admin, || redis.log());
    }
    for round in 0..5 {
        let statuses = stampede(&addrs, 20, &format!("after-{round}"));
        assert_eq!(
            count(&statuses, 200),
            BURST as usize,
            "round {round} after the restart: {statuses:?}"
        );
    }
}

#[test]
fn starts_without_redis() {
    let port = free_port();
    let mut redis = RedisServer::not_yet_on(port);
    let up = upstream().run();
    let upstream_url = format!("http://{}", up.addr());
    let redis_url = redis.url();
    let key = format!("header:{KEY_HEADER}");
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &upstream_url),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &redis_url),
        ("FLOODGATE_REDIS_TIMEOUT", "50ms"),
        ("FLOODGATE_REDIS_FAILURE", "local"),
        ("FLOODGATE_RATE", "2/h"),
        ("FLOODGATE_BURST", "2"),
        ("FLOODGATE_KEY", &key),
        ("FLOODGATE_WORKERS", "2"),
    ]);

    eventually("/readyz to report redis unavailable", || {
        let (status, body) = readyz(fg.admin);
        (status == 200 && body.contains("degraded") && body.contains("redis unavailable"))
            .then_some(())
    });
    call_within_budget(fg.addr, "early", 200, "no redis yet");
    call_within_budget(fg.addr, "early", 200, "no redis yet");
    call_within_budget(fg.addr, "early", 429, "no redis yet");

    // Probing an absent Redis every 250 ms must cost next to nothing.
    let before = cpu_time(fg.pid());
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(1)); // the measurement window
    let used = cpu_time(fg.pid()) - before;
    let window = window.elapsed();
    assert!(
        used <= Duration::from_millis(100),
        "floodgate used {used:?} of CPU in {window:?} while redis was absent"
    );
    assert!(fg.child.try_wait().unwrap().is_none(), "floodgate exited");

    redis.restart();
    let mut n = 0;
    let recovered = within(RECOVERY, "decisions in redis", || {
        is_ready(fg.admin)?;
        n += 1;
        let api_key = format!("late-{n}");
        call(fg.addr, Some(&api_key));
        exists(&redis, &redis_key("floodgate:", &api_key))
            .then_some(())
            .ok_or_else(|| format!("no key for {api_key} in redis"))
    });

    fg.signal("TERM");
    let status = fg.wait_exit(patience());
    let stderr = fg.stderr();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    let lines = |needle: &str| stderr.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        lines("redis unavailable"),
        1,
        "one warning for the outage:\n{stderr}"
    );
    assert_eq!(
        lines("answering again"),
        1,
        "one line for its end:\n{stderr}"
    );
    eprintln!(
        "starting without redis: CPU {used:?} in {window:?}; decisions in redis {recovered:?} \
         after it started"
    );
}

#[test]
fn password_never_logged() {
    let port = free_port();
    let up = upstream().run();
    let upstream_url = format!("http://{}", up.addr());
    let redis_url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &upstream_url),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &redis_url),
        ("FLOODGATE_REDIS_TIMEOUT", "50ms"),
    ]);
    eventually("/readyz to report redis unavailable", || {
        readyz(fg.admin)
            .1
            .contains("redis unavailable")
            .then_some(())
    });
    assert_eq!(call(fg.addr, Some("k")).0.status, 200);
    fg.signal("TERM");
    let status = fg.wait_exit(patience());
    let stderr = fg.stderr();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("redis unavailable at startup"),
        "the outage was logged:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "the address is logged:\n{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

// === cluster ===

#[test]
fn cluster_enforces_one_limit_across_two_replicas() {
    let cluster = RedisCluster::start();
    let logs = || {
        cluster
            .nodes
            .iter()
            .map(RedisServer::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let up = upstream().run();
    let replicas: Vec<Proxy> = (0..2)
        .map(|_| {
            // Nothing listens at the single-node URL: only the cluster can decide.
            redis_proxy(up.addr(), "redis://127.0.0.1:1/")
                .env("FLOODGATE_REDIS_CLUSTER", &cluster.urls())
                // As in three_replicas_share_one_limit_exactly.
                .env("FLOODGATE_REDIS_TIMEOUT", "1s")
                .env("FLOODGATE_REDIS_FAILURE", "closed")
                .rate("20/h")
                .burst(20)
                .run()
        })
        .collect();
    for r in &replicas {
        wait_ready(r.admin, logs);
    }

    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let statuses = stampede(&addrs, 50, "cluster-key");
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (20, 80),
        "(allowed, limited) over 100 requests; all statuses: {statuses:?}"
    );
    assert_eq!(up.requests(), 20);

    // A few more clients, so keys land in several slots.
    let mut expected = BTreeSet::from([redis_key("floodgate:", "cluster-key")]);
    for n in 0..6 {
        let api_key = format!("spread-{n}");
        assert_eq!(call(addrs[n % 2], Some(&api_key)).0.status, 200);
        expected.insert(redis_key("floodgate:", &api_key));
    }
    let mut found = BTreeSet::new();
    for node in &cluster.nodes {
        for key in scan(node) {
            // The braces are a hash tag: the key's slot is its client's.
            let tag = &key[key.find('{').unwrap() + 1..key.find('}').unwrap()];
            let slot = node.cli(&["CLUSTER", "KEYSLOT", &key]).unwrap();
            assert_eq!(
                Some(&slot),
                node.cli(&["CLUSTER", "KEYSLOT", tag]).as_ref(),
                "{key} hashes by its tag {tag:?}"
            );
            let in_slot: u64 = node
                .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot])
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(in_slot >= 1, "{key} is in slot {slot}, owned by this node");
            let ttl = pttl(node, &key);
            assert!(ttl > 0, "PTTL {key} = {ttl}");
            assert!(found.insert(key), "one key on two nodes");
        }
    }
    assert_eq!(found, expected);
}

/// A TCP relay to Redis whose existing connections can be made to go silent
/// (bytes dropped both ways, sockets left open): what a network partition or
/// a failed-over address looks like to a client. New connections relay again.
struct Blackhole {
    addr: SocketAddr,
    generation: Arc<AtomicUsize>,
}

impl Blackhole {
    fn start(to: SocketAddr) -> Blackhole {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(AtomicUsize::new(0));
        let current = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                for (mut from, mut into) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let current = current.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let Ok(n) = io::Read::read(&mut from, &mut buf) else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            // Silenced: swallow, keep the socket open.
                            if current.load(Ordering::SeqCst) == born
                                && into.write_all(&buf[..n]).is_err()
                            {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Blackhole { addr, generation }
    }

    /// Every connection open now goes silent for good.
    fn silence_existing(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_connection_redis_went_silent_on_is_replaced() {
    let redis = RedisServer::start();
    let relay = Blackhole::start(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    let up = upstream().run();
    let fg = redis_proxy(up.addr(), &format!("redis://{}/", relay.addr))
        .env("FLOODGATE_REDIS_FAILURE", "local")
        .run();
    wait_ready(fg.admin, || redis.log());
    call_within_budget(fg.addr, "before", 200, "before the partition");

    relay.silence_existing();
    // Decisions time out on the silent connection; the fallback answers.
    call_within_budget(fg.addr, "during", 200, "while the connection is silent");
    // Nothing answers the probe either: the circuit opens.
    eventually("the circuit to open", || {
        is_ready(fg.admin).is_err().then_some(())
    });
    // No error ever arrives on that connection: only replacing it helps.
    let took = within(
        Duration::from_secs(3),
        "a new connection and ready again",
        || is_ready(fg.admin),
    );
    eprintln!("ready again {took:?} after the connection went silent");
    let keys_before = scan(&redis).len();
    call_within_budget(fg.addr, "after", 200, "after reconnecting");
    assert!(
        scan(&redis).len() > keys_before,
        "decisions are made in Redis again"
    );
}

#[test]
fn a_read_only_replica_keeps_the_circuit_open_without_flapping() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let up = upstream().run();
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &replica.url()),
        ("FLOODGATE_REDIS_FAILURE", "local"),
        ("FLOODGATE_KEY", &format!("header:{KEY_HEADER}")),
    ]);
    // Traffic meets READONLY; the probe writes too, so it keeps meeting it.
    for i in 0..20 {
        call_within_budget(
            fg.addr,
            &format!("k{i}"),
            200,
            "against a read-only replica",
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = readyz(fg.admin);
    assert_eq!(status, 200);
    assert!(body.starts_with("ready, degraded"), "{body}");
    fg.signal("TERM");
    let log = fg.stderr();
    assert!(
        !log.contains("answering again"),
        "the circuit flapped:\n{log}"
    );
    assert!(log.contains("read only replica"), "{log}");
}

// === window algorithms ===

/// One limit name under all three algorithms: three keys, none reading
/// another's state, each holding its algorithm's state and expiring when
/// that state stops mattering (a fixed window at its end, a sliding one a
/// window later).
#[actix_web::test]
async fn window_keys_are_their_own_and_expire_with_their_state() {
    use floodgate::limiter::{Algorithm, Check, Fallback, RedisTarget};
    use floodgate::{Backend, Limit, RateKey, RedisBackend};
    use std::num::NonZeroU32;
    use std::time::{SystemTime, UNIX_EPOCH};

    let redis = RedisServer::start();
    let backend = RedisBackend::new(
        RedisTarget::Single(redis.url()),
        "floodgate:",
        Duration::from_secs(2),
        Fallback::Closed,
        1000,
    )
    .unwrap();
    backend.start();
    let deadline = Instant::now() + patience();
    while !backend.is_up() {
        assert!(Instant::now() < deadline, "never up; log:\n{}", redis.log());
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    let gcra = Limit::new(
        "api",
        "10/min".parse().unwrap(),
        NonZeroU32::new(10).unwrap(),
    );
    let fixed = Limit::window("api", "5/10s".parse().unwrap(), Algorithm::FixedWindow).unwrap();
    let sliding = Limit::window("api", "5/10s".parse().unwrap(), Algorithm::SlidingWindow).unwrap();
    let ip = RateKey::ip("192.0.2.7".parse().unwrap());
    let checks: Vec<Check<'_>> = [&gcra, &fixed, &sliding]
        .into_iter()
        .map(|limit| Check { limit, key: &ip })
        .collect();
    // Not within half a second of a window boundary: the window the
    // request counts in is the one computed below.
    let since_epoch = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    if since_epoch().as_millis() % 10_000 > 9_500 {
        actix_web::rt::time::sleep(Duration::from_millis(600)).await; // past the boundary
    }
    let decisions = backend.check_all(&checks).await.unwrap();
    let now = since_epoch();
    assert_eq!(
        decisions.iter().map(|d| d.remaining()).collect::<Vec<_>>(),
        [9, 4, 4],
        "{decisions:?}"
    );
    let keys = scan(&redis);
    let names = [
        "floodgate:{ip:192.0.2.7}:api",
        "floodgate:{ip:192.0.2.7}.fw:api",
        "floodgate:{ip:192.0.2.7}.sw:api",
    ];
    assert_eq!(keys, names.iter().map(|k| k.to_string()).collect());
    for (limit, name) in [&gcra, &fixed, &sliding].into_iter().zip(names) {
        assert_eq!(backend.redis_key(limit, &ip), name.as_bytes());
    }
    let window = 10_000_000u128;
    let end = (now.as_micros() / window + 1) * window;
    let value = |key: &str| redis.cli(&["GET", key]).unwrap();
    assert_eq!(value(names[1]), format!("{end}:1"));
    assert_eq!(value(names[2]), format!("{}:1:0", end + window));
    // PTTL = the state's expiry - now (ms), within the test's own delays.
    let left_ms = |until: u128| ((until - now.as_micros()) / 1000) as i64;
    for (name, until) in [(names[1], end), (names[2], end + window)] {
        let ttl = pttl(&redis, name);
        assert!(
            ttl <= left_ms(until) + 1 && ttl > left_ms(until) - 1000,
            "PTTL {name} = {ttl}, expected about {}",
            left_ms(until)
        );
    }
    let ttl = pttl(&redis, names[0]);
    assert!(ttl > 5000 && ttl <= 6000, "PTTL {} = {ttl}", names[0]);
}

/// Under `local`, a request with three limits (one per algorithm) decided
/// while Redis is frozen starts from what Redis last said for each, and what
/// it admits is in Redis once Redis answers: five per key in all, however
/// the admissions were split between Redis, this replica, and decisions
/// Redis ran late.
#[actix_web::test]
async fn every_algorithm_is_charged_back_after_an_outage() {
    use floodgate::limiter::{Algorithm, Check, Fallback, RedisTarget};
    use floodgate::{Backend, Limit, RateKey, RedisBackend};
    use std::num::NonZeroU32;

    let redis = RedisServer::start();
    let backend = RedisBackend::new(
        RedisTarget::Single(redis.url()),
        "floodgate:",
        TIMEOUT,
        Fallback::Local,
        1000,
    )
    .unwrap();
    backend.start();
    let up = async |want: bool| {
        let deadline = Instant::now() + patience();
        while backend.is_up() != want {
            assert!(
                Instant::now() < deadline,
                "never up={want}; log:\n{}",
                redis.log()
            );
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
    };
    up(true).await;
    let gcra = Limit::new("g", "5/h".parse().unwrap(), NonZeroU32::new(5).unwrap());
    let fixed = Limit::window("f", "5/d".parse().unwrap(), Algorithm::FixedWindow).unwrap();
    let sliding = Limit::window("s", "5/d".parse().unwrap(), Algorithm::SlidingWindow).unwrap();
    let k = RateKey::bytes("outage");
    let checks: Vec<Check<'_>> = [&gcra, &fixed, &sliding]
        .into_iter()
        .map(|limit| Check { limit, key: &k })
        .collect();
    let remaining = async || -> Vec<u32> {
        let d = backend.check_all(&checks).await.expect("local decides");
        d.iter()
            .map(|d| if d.is_allowed() { d.remaining() } else { 99 })
            .collect()
    };
    assert_eq!(remaining().await, [4, 4, 4], "through Redis");
    assert_eq!(remaining().await, [3, 3, 3], "through Redis");
    redis.freeze();
    // Decided locally, from the state Redis last answered.
    assert_eq!(remaining().await, [2, 2, 2], "frozen: the first times out");
    up(false).await;
    assert_eq!(remaining().await, [1, 1, 1], "circuit open");
    redis.thaw();
    up(true).await;
    assert_eq!(
        remaining().await,
        [0, 0, 0],
        "through Redis after the outage"
    );
    assert_eq!(
        remaining().await,
        [99, 99, 99],
        "all five are spent in Redis"
    );
}
