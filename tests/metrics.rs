//! `/metrics` end to end: a real floodgate driven through a known sequence
//! of requests, its exposition parsed and checked value by value: decisions
//! by rule (allowed, limited, shadow-limited, allow-listed, denied, bad
//! key), the refusing limit, upstream answers and errors by kind, the
//! latency histograms, Redis down under each failure policy, reloads and
//! build info; and never a client key or address in the text.

mod support;

use std::collections::BTreeMap;
use std::io::{BufReader, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use support::upstream::read_head;
use support::{RedisServer, Reply, Response, eventually, proxy, raw_upstream, request, upstream};

/// An API key the test sends; it must never appear in the exposition.
const SECRET: &str = "sk-live-4f1d9a0c7e2b";
/// The allow-listed key, also a secret.
const VIP: &str = "vip-7731c0ffee";

/// The exposition's samples: series (name and labels as written) to value.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn of(admin: SocketAddr) -> Scrape {
        let res = request(admin, "GET", "/metrics", &[], b"");
        assert_eq!(res.status, 200);
        assert_eq!(
            res.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let text = res.text();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample: {l:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {l:?}"));
                (series.to_owned(), value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// The value of `series`, which must be there.
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", self.text))
    }

    fn requests(&self, rule: &str, decision: &str, by: &str) -> f64 {
        self.get(&format!(
            "floodgate_requests_total{{rule=\"{rule}\",decision=\"{decision}\",decided_by=\"{by}\"}}"
        ))
    }

    /// Every request of `rule`, whatever its decision.
    fn rule_total(&self, rule: &str) -> f64 {
        let prefix = format!("floodgate_requests_total{{rule=\"{rule}\",");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }

    fn refusals(&self, rule: &str, limit: &str, decision: &str) -> f64 {
        self.get(&format!(
            "floodgate_limit_refusals_total{{rule=\"{rule}\",limit=\"{limit}\",decision=\"{decision}\"}}"
        ))
    }

    fn upstream_error(&self, kind: &str) -> f64 {
        self.get(&format!(
            "floodgate_upstream_errors_total{{kind=\"{kind}\"}}"
        ))
    }
}

/// A settings file with `toml` in it, kept until the test ends.
fn rules_file(toml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    file.flush().unwrap();
    file
}

const RULES: &str = r#"
[[rules]]
name = "api"
match = { path = "/api" }
key = "header:x-api-key"
limits = [
  { name = "per-key", rate = "2/h", burst = 2 },
  { name = "api-total", rate = "5/h", burst = 5, key = "global" },
]
allow_keys = ["vip-7731c0ffee"]

[[rules]]
name = "trial"
match = { path = "/trial" }
limits = [{ name = "trial-limit", rate = "1/h", burst = 1 }]
shadow = true

[[rules]]
name = "private"
match = { path = "/private" }
limits = [{ rate = "100/h", burst = 100 }]
deny = ["203.0.113.0/24"]
"#;

/// A request from `client` (through the trusted proxy 127.0.0.1), with an
/// API key if given.
fn from(addr: SocketAddr, path: &str, client: &str, key: Option<&str>) -> Response {
    let mut headers = vec![("X-Forwarded-For", client)];
    headers.extend(key.map(|k| ("X-Api-Key", k)));
    request(addr, "GET", path, &headers, b"")
}

#[test]
fn a_known_sequence_gives_exact_counts_and_never_a_key_or_address() {
    let up = upstream()
        .route_fn("/api/boom", |_| Reply::ok("boom").status(503))
        .run();
    let file = rules_file(RULES);
    let fg = proxy(up.addr())
        .rate("1000/h")
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
        .run();
    let client = "198.51.100.23";
    let api = |path: &str, key: Option<&str>| from(fg.addr, path, client, key).status;

    // api: the key's own limit refuses the third; the global one the eighth.
    assert_eq!(api("/api", Some(SECRET)), 200);
    assert_eq!(api("/api", Some(SECRET)), 200);
    assert_eq!(api("/api", Some(SECRET)), 429, "per-key");
    assert_eq!(api("/api", Some(VIP)), 200, "allow-listed, charged");
    let twice = [
        ("X-Forwarded-For", client),
        ("X-Api-Key", "dup-1"),
        ("X-Api-Key", "dup-2"),
    ];
    assert_eq!(
        request(fg.addr, "GET", "/api", &twice, b"").status,
        400,
        "an ambiguous key"
    );
    assert_eq!(api("/api/boom", Some("k-2")), 503, "the upstream's 503");
    assert_eq!(api("/api", Some("k-3")), 200);
    assert_eq!(api("/api", Some("k-4")), 429, "api-total");
    // trial: in shadow, refusals are forwarded.
    for _ in 0..3 {
        assert_eq!(from(fg.addr, "/trial", "198.51.100.24", None).status, 200);
    }
    // private: a denied network.
    for _ in 0..2 {
        assert_eq!(from(fg.addr, "/private", "203.0.113.9", None).status, 403);
    }
    assert_eq!(up.requests(), 4 + 1 + 3);

    let s = Scrape::of(fg.admin);
    assert_eq!(s.requests("api", "allowed", "backend"), 4.0);
    assert_eq!(s.requests("api", "limited", "backend"), 2.0);
    assert_eq!(s.requests("api", "allow_listed", "backend"), 1.0);
    assert_eq!(s.requests("api", "bad_key", "none"), 1.0);
    assert_eq!(s.rule_total("api"), 8.0, "each request once");
    assert_eq!(s.refusals("api", "per-key", "limited"), 1.0);
    assert_eq!(s.refusals("api", "api-total", "limited"), 1.0);
    assert_eq!(s.refusals("api", "per-key", "shadow_limited"), 0.0);

    assert_eq!(s.requests("trial", "allowed", "backend"), 1.0);
    assert_eq!(s.requests("trial", "shadow_limited", "backend"), 2.0);
    assert_eq!(
        s.requests("trial", "allowed", "backend")
            + s.requests("trial", "shadow_limited", "backend"),
        s.rule_total("trial")
    );
    assert_eq!(s.refusals("trial", "trial-limit", "shadow_limited"), 2.0);
    assert_eq!(s.refusals("trial", "trial-limit", "limited"), 0.0);

    assert_eq!(s.requests("private", "denied", "none"), 2.0);
    assert_eq!(s.rule_total("private"), 2.0);
    assert_eq!(s.rule_total("default"), 0.0);

    assert_eq!(
        s.get("floodgate_upstream_responses_total{class=\"2xx\"}"),
        7.0
    );
    assert_eq!(
        s.get("floodgate_upstream_responses_total{class=\"5xx\"}"),
        1.0
    );
    assert_eq!(
        s.get("floodgate_upstream_responses_total{class=\"4xx\"}"),
        0.0
    );

    // Every answer is timed, 400, 403 and 429 included; the upstream's
    // time for the forwarded ones; a decision for each request that asked
    // the backend (not the bad key's, not the denied ones).
    assert_eq!(s.get("floodgate_request_duration_seconds_count"), 13.0);
    assert_eq!(
        s.get("floodgate_request_duration_seconds_bucket{le=\"+Inf\"}"),
        13.0
    );
    assert!(s.get("floodgate_request_duration_seconds_sum") > 0.0);
    assert_eq!(s.get("floodgate_upstream_duration_seconds_count"), 8.0);
    assert!(s.get("floodgate_upstream_duration_seconds_sum") > 0.0);
    assert_eq!(
        s.get("floodgate_backend_decision_duration_seconds_count"),
        10.0
    );

    assert_eq!(
        s.get("floodgate_backend_health{backend=\"memory\",state=\"up\"}"),
        1.0
    );
    // per-key: SECRET, VIP, k-2, k-3, k-4 (refused, but still looked up);
    // api-total: the one global key; trial: one address.
    assert!(s.get("floodgate_backend_keys") >= 3.0, "{}", s.text);
    let version = format!(
        "floodgate_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(s.get(&version), 1.0);

    for secret in [
        SECRET,
        VIP,
        "dup-1",
        "dup-2",
        "k-2",
        "k-3",
        "k-4",
        client,
        "198.51.100.24",
        "203.0.113.9",
    ] {
        assert!(
            !s.text.contains(secret),
            "{secret} appears in the exposition:\n{}",
            s.text
        );
    }
}

/// Holds a stalled upstream's connection open until released (or 20 s pass).
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let guard = open.lock().unwrap();
        let _ = cv
            .wait_timeout_while(guard, Duration::from_secs(20), |open| !*open)
            .unwrap();
    }
}

/// Opens its gate when the test ends, pass or fail.
struct Release(Gate);

impl Drop for Release {
    fn drop(&mut self) {
        let (open, cv) = &*(self.0).0;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

#[test]
fn upstream_errors_are_counted_by_kind() {
    // /close: closed without answering; /stall: no answer in time; /cut:
    // a head announcing 10 bytes, then 5 and a close.
    let gate = Gate::default();
    let _release = Release(gate.clone());
    let held = gate.clone();
    let up = raw_upstream(move |mut stream| {
        let head = read_head(&mut BufReader::new(&stream));
        if head.starts_with("GET /stall ") {
            held.wait();
        } else if head.starts_with("GET /cut ") {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
        } else if head.starts_with("GET /ok ") {
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    let fg = proxy(up.addr())
        .rate("1000000/s")
        .env("FLOODGATE_UPSTREAM_TIMEOUT", "1s")
        .run();
    let get =
        |path: &str| support::try_send(fg.addr, &support::client::build("GET", path, &[], b""));
    assert_eq!(get("/close").expect("a 502").status, 502);
    assert_eq!(get("/stall").expect("a 504").status, 504);
    assert!(get("/cut").is_err(), "the client sees the answer cut");
    assert_eq!(get("/ok").expect("a 204").status, 204);

    // Nothing listens where this one forwards.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let refused = proxy(nowhere).rate("1000000/s").run();
    let res = support::request(refused.addr, "GET", "/", &[], b"");
    assert_eq!(res.status, 502);

    let s = eventually("the cut body to be counted", || {
        let s = Scrape::of(fg.admin);
        (s.upstream_error("truncated") == 1.0).then_some(s)
    });
    assert_eq!(s.upstream_error("closed"), 1.0);
    assert_eq!(s.upstream_error("timeout"), 1.0);
    assert_eq!(s.upstream_error("refused"), 0.0);
    assert_eq!(s.upstream_error("reset"), 0.0);
    // The cut answer's head and the 204 came from the upstream.
    assert_eq!(
        s.get("floodgate_upstream_responses_total{class=\"2xx\"}"),
        2.0
    );
    assert_eq!(s.get("floodgate_upstream_duration_seconds_count"), 2.0);
    assert_eq!(s.get("floodgate_request_duration_seconds_count"), 4.0);

    let s = Scrape::of(refused.admin);
    assert_eq!(s.upstream_error("refused"), 1.0);
    assert_eq!(s.upstream_error("closed"), 0.0);
    assert_eq!(
        s.get("floodgate_upstream_responses_total{class=\"5xx\"}"),
        0.0,
        "a 502 of floodgate's own"
    );
}

// === Redis down ===

/// floodgate on `redis` under `policy`, with one limit of 2 per hour.
fn on_redis(up: SocketAddr, redis: &RedisServer, policy: &str) -> support::Proxy {
    proxy(up)
        .rate("2/h")
        .burst(2)
        .env("FLOODGATE_BACKEND", "redis")
        .env("FLOODGATE_REDIS_URL", &redis.url())
        .env("FLOODGATE_REDIS_TIMEOUT", "250ms")
        .env("FLOODGATE_REDIS_FAILURE", policy)
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
        .run()
}

/// Waits until floodgate has reached Redis (its circuit closed).
fn connected(admin: SocketAddr) {
    eventually("floodgate to reach redis", || {
        let s = Scrape::of(admin);
        (s.get("floodgate_redis_circuit{state=\"closed\"}") == 1.0).then_some(())
    });
}

/// What changed between two scrapes.
struct Delta<'a>(&'a Scrape, &'a Scrape);

impl Delta<'_> {
    fn get(&self, series: &str) -> f64 {
        self.1.get(series) - self.0.get(series)
    }

    fn requests(&self, decision: &str, by: &str) -> f64 {
        self.1.requests("default", decision, by) - self.0.requests("default", decision, by)
    }

    fn total(&self) -> f64 {
        self.1.rule_total("default") - self.0.rule_total("default")
    }
}

/// Runs one policy's outage: two requests while Redis answers, then Redis
/// stopped and traffic until the circuit opens; then `n` requests of fresh
/// clients, three each. Returns the scrapes before and after those `n`,
/// and the statuses they got.
fn outage(policy: &str, n: usize) -> (Scrape, Scrape, Vec<u16>) {
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let fg = on_redis(up.addr(), &redis, policy);
    connected(fg.admin);
    for _ in 0..2 {
        assert_eq!(from(fg.addr, "/", "198.51.100.1", None).status, 200);
    }
    let s = Scrape::of(fg.admin);
    assert_eq!(s.requests("default", "allowed", "backend"), 2.0, "{policy}");
    assert_eq!(s.rule_total("default"), 2.0, "{policy}");

    redis.kill();
    // A decision has to fail for the outage to be noticed.
    eventually("the circuit to open", || {
        from(fg.addr, "/", "198.51.100.2", None);
        (Scrape::of(fg.admin).get("floodgate_redis_circuit{state=\"open\"}") == 1.0).then_some(())
    });
    let before = Scrape::of(fg.admin);
    let statuses = (0..n)
        .map(|i| from(fg.addr, "/", &format!("198.51.100.{}", 100 + i / 3), None).status)
        .collect();
    let after = Scrape::of(fg.admin);
    let delta = Delta(&before, &after);
    assert_eq!(delta.total(), n as f64, "{policy}: once each");
    assert_eq!(
        delta.get("floodgate_backend_decision_duration_seconds_count"),
        n as f64,
        "{policy}"
    );
    assert_eq!(
        delta.get("floodgate_request_duration_seconds_count"),
        n as f64,
        "{policy}: every answer timed"
    );
    assert_eq!(
        delta.get("floodgate_backend_errors_total"),
        n as f64,
        "{policy}"
    );
    let health = if policy == "closed" {
        "down"
    } else {
        "degraded"
    };
    assert_eq!(
        after.get(&format!(
            "floodgate_backend_health{{backend=\"redis\",state=\"{health}\"}}"
        )),
        1.0,
        "{policy}"
    );
    assert_eq!(after.get("floodgate_redis_circuit{state=\"closed\"}"), 0.0);
    (before, after, statuses)
}

#[test]
fn redis_down_under_open_is_counted_as_failing_open() {
    let (before, after, statuses) = outage("open", 4);
    let delta = Delta(&before, &after);
    assert_eq!(statuses, [200; 4]);
    assert_eq!(delta.requests("undecided", "fail_open"), 4.0);
    assert_eq!(
        delta.get("floodgate_upstream_responses_total{class=\"2xx\"}"),
        4.0
    );
}

#[test]
fn redis_down_under_closed_is_counted_as_failing_closed() {
    let (before, after, statuses) = outage("closed", 4);
    let delta = Delta(&before, &after);
    assert_eq!(statuses, [503; 4]);
    assert_eq!(delta.requests("undecided", "fail_closed"), 4.0);
    assert_eq!(
        delta.get("floodgate_upstream_responses_total{class=\"2xx\"}"),
        0.0
    );
}

#[test]
fn redis_down_under_local_is_counted_as_decided_locally() {
    // Three requests per client: burst 2 from memory, then 429.
    let (before, after, statuses) = outage("local", 6);
    let delta = Delta(&before, &after);
    assert_eq!(statuses, [200, 200, 429, 200, 200, 429]);
    assert_eq!(delta.requests("allowed", "local"), 4.0);
    assert_eq!(delta.requests("limited", "local"), 2.0);
    assert_eq!(
        delta.get(
            "floodgate_limit_refusals_total{rule=\"default\",limit=\"default\",decision=\"limited\"}"
        ),
        2.0
    );
    assert!(after.get("floodgate_backend_keys") >= 2.0, "{}", after.text);
}

// === reloads ===

#[test]
fn reloads_are_counted_and_the_last_result_shown() {
    let up = upstream().run();
    let file = rules_file(RULES);
    let (fg, floodgate) = proxy(up.addr())
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .run_floodgate();
    let s = Scrape::of(fg.admin);
    assert_eq!(s.get("floodgate_rules_reloads_total{result=\"ok\"}"), 0.0);
    assert_eq!(
        s.get("floodgate_rules_last_reload_success"),
        1.0,
        "the startup load"
    );
    assert!(!s.text.contains("rule=\"fresh\""));

    std::fs::write(
        file.path(),
        format!("{RULES}\n[[rules]]\nname = \"fresh\"\nmatch = {{ path = \"/fresh\" }}\n"),
    )
    .unwrap();
    floodgate.reload().expect("a valid file");
    assert_eq!(request(fg.addr, "GET", "/fresh", &[], b"").status, 200);
    let s = Scrape::of(fg.admin);
    assert_eq!(s.get("floodgate_rules_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        s.requests("fresh", "allowed", "none"),
        1.0,
        "a rule without limits"
    );

    std::fs::write(file.path(), "[[rules]]\nname = \"Bad Name\"\n").unwrap();
    floodgate.reload().expect_err("an invalid file");
    let s = Scrape::of(fg.admin);
    assert_eq!(s.get("floodgate_rules_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        s.get("floodgate_rules_reloads_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(s.get("floodgate_rules_last_reload_success"), 0.0);
    assert_eq!(s.requests("fresh", "allowed", "none"), 1.0, "kept");
}

#[test]
fn the_scrape_holds_no_key_even_when_keys_are_refused_and_allow_listed_by_redis() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let file = rules_file(RULES);
    let fg = proxy(up.addr())
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .env("FLOODGATE_BACKEND", "redis")
        .env("FLOODGATE_REDIS_URL", &redis.url())
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
        .run();
    connected(fg.admin);
    let client = "198.51.100.77";
    for key in [SECRET, SECRET, SECRET, VIP] {
        from(fg.addr, "/api", client, Some(key));
    }
    let s = Scrape::of(fg.admin);
    assert_eq!(
        s.requests("api", "allowed", "backend"),
        2.0,
        "{}",
        redis.log()
    );
    assert_eq!(s.requests("api", "limited", "backend"), 1.0);
    assert_eq!(s.requests("api", "allow_listed", "backend"), 1.0);
    for secret in [SECRET, VIP, client] {
        assert!(!s.text.contains(secret), "{secret} in\n{}", s.text);
    }
}
