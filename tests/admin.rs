//! The admin API end to end: `GET /limits/{rule}/{key}` looks without
//! charging, `DELETE` gives the key a full burst again (in memory, and on
//! Redis for every replica sharing it, the local fallback included), answers
//! are JSON that never carries a header value in clear, and
//! `FLOODGATE_ADMIN_TOKEN` (or, without it, the loopback rule) guards
//! `/limits` and `/rules` while `/healthz`, `/readyz` and `/metrics` stay
//! open. Which peers the loopback rule admits is decided by
//! `admin::auth::Access::check`, tested as a unit there: a test cannot
//! connect from anything but loopback on 127.0.0.1.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;

use floodgate::key::Fingerprinter;
use serde_json::Value;
use support::{RedisCluster, RedisServer, Response, eventually, proxy, request, upstream};

const RULES: &str = r#"
[[rules]]
name = "login"
match = { path = "/login" }
limits = [{ rate = "3/h", burst = 3 }]

[[rules]]
name = "api"
match = { path = "/api" }
key = "header:x-api-key"
limits = [{ rate = "2/h", burst = 2 }]

[[rules]]
name = "tenant"
match = { path = "/tenant" }
key = "header:x-api-key+ip"
limits = [
  { name = "tenant", rate = "2/h", burst = 2 },
  { name = "tenant-all", rate = "100/h", burst = 100, key = "global" },
]
"#;

const SECRET: &str = "sk_live_do-not-show-me";

fn rules_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(RULES.as_bytes()).unwrap();
    file.flush().unwrap();
    file
}

fn with_rules(up: SocketAddr, file: &tempfile::NamedTempFile) -> support::proxy::ProxyBuilder {
    proxy(up)
        .rate("1000/h")
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
}

/// A client request from `client` (through the trusted proxy 127.0.0.1),
/// with an API key if given.
fn call(addr: SocketAddr, path: &str, client: &str, api_key: Option<&str>) -> u16 {
    let mut headers = vec![("X-Forwarded-For", client)];
    headers.extend(api_key.map(|k| ("X-Api-Key", k)));
    request(addr, "GET", path, &headers, b"").status
}

fn admin(addr: SocketAddr, method: &str, path: &str) -> Response {
    request(addr, method, path, &[], b"")
}

/// An admin answer's JSON, checking the status and that no answer ever
/// carries the API key in clear.
fn json(res: &Response, status: u16) -> Value {
    let text = res.text();
    assert_eq!(res.status, status, "{text}");
    assert_eq!(
        res.header("content-type"),
        Some("application/json"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "the raw key leaked: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn fingerprint(value: &str) -> String {
    // floodgate scopes fingerprints by the Redis prefix (default floodgate:).
    Fingerprinter::new(b"floodgate:")
        .fingerprint(value.as_bytes())
        .to_string()
}

#[test]
fn inspecting_charges_nothing_and_a_reset_gives_a_full_burst_again() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file).run();
    let client = "198.51.100.7";
    for _ in 0..5 {
        let doc = json(&admin(fg.admin, "GET", "/limits/login/198.51.100.7"), 200);
        assert_eq!(doc["rule"], "login");
        assert_eq!(doc["key"]["kind"], "ip");
        assert_eq!(doc["key"]["value"], client);
        assert_eq!(doc["key"]["id"], "ip:198.51.100.7");
        assert_eq!(doc["allowed_now"], true);
        let limit = &doc["limits"][0];
        assert_eq!(limit["name"], "login");
        assert_eq!(limit["algorithm"], "gcra");
        assert_eq!(limit["limit"], 3);
        assert_eq!(limit["remaining"], 3, "{doc}");
        assert_eq!(limit["retry_after"], Value::Null);
    }
    // The burst is still whole.
    for _ in 0..3 {
        assert_eq!(call(fg.addr, "/login", client, None), 200);
    }
    assert_eq!(call(fg.addr, "/login", client, None), 429);

    let doc = json(&admin(fg.admin, "GET", "/limits/login/198.51.100.7"), 200);
    let limit = &doc["limits"][0];
    assert_eq!(doc["allowed_now"], false);
    assert_eq!(limit["remaining"], 0);
    assert_eq!(limit["allowed_now"], false);
    let retry = limit["retry_after"].as_f64().unwrap();
    assert!(
        retry > 1000.0 && retry <= 1200.0,
        "one cell of 3/h: {retry}"
    );
    assert!(limit["reset_after"].as_f64().unwrap() >= retry);

    let doc = json(
        &admin(fg.admin, "DELETE", "/limits/login/198.51.100.7"),
        200,
    );
    assert_eq!(doc["limits"][0]["name"], "login");
    assert_eq!(doc["limits"][0]["reset"], true);
    assert_eq!(doc["limits"][0]["had_state"], true);
    let again = json(
        &admin(fg.admin, "DELETE", "/limits/login/198.51.100.7"),
        200,
    );
    assert_eq!(
        again["limits"][0]["had_state"], false,
        "nothing left to forget"
    );
    for _ in 0..3 {
        assert_eq!(call(fg.addr, "/login", client, None), 200);
    }
    assert_eq!(call(fg.addr, "/login", client, None), 429);
    // Other clients were never touched.
    assert_eq!(call(fg.addr, "/login", "198.51.100.8", None), 200);
}

#[test]
fn unknown_rules_and_malformed_keys_are_json_errors() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file).run();
    for method in ["GET", "DELETE"] {
        let doc = json(&admin(fg.admin, method, "/limits/nope/192.0.2.1"), 404);
        assert_eq!(doc["error"], "unknown_rule");
        let message = doc["message"].as_str().unwrap();
        assert!(message.contains("login, api, tenant, default"), "{message}");
        for bad in [
            "/limits/login/not-an-address",
            "/limits/login/192.0.2.1+192.0.2.2",
        ] {
            let doc = json(&admin(fg.admin, method, bad), 400);
            assert_eq!(doc["error"], "bad_key", "{bad}");
        }
        let doc = json(
            &admin(fg.admin, method, "/limits/tenant/only-one-part"),
            400,
        );
        assert_eq!(doc["error"], "bad_key");
    }
    // The default rule is a rule like the others.
    let doc = json(
        &admin(fg.admin, "GET", "/limits/default/2001:db8::1:2"),
        200,
    );
    assert_eq!(
        doc["key"]["value"], "2001:db8::",
        "grouped by /64 as requests are"
    );
    assert_eq!(doc["limits"][0]["limit"], 1000);
}

#[test]
fn header_keys_are_found_by_value_or_fingerprint_and_never_shown() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file).run();
    let client = "198.51.100.20";
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    let doc = json(
        &admin(fg.admin, "GET", &format!("/limits/api/{SECRET}")),
        200,
    );
    assert_eq!(doc["key"]["kind"], "header");
    assert_eq!(doc["key"]["name"], "x-api-key");
    assert_eq!(doc["key"]["fingerprint"], fingerprint(SECRET));
    assert_eq!(doc["key"]["id"], format!("h:{}", fingerprint(SECRET)));
    assert_eq!(doc["limits"][0]["remaining"], 1);
    // By its fingerprint (as the access log and the status page show it):
    // the same state, and a reset by fingerprint gives the burst back.
    let by_fp = format!("/limits/api/h:{}", fingerprint(SECRET));
    let doc = json(&admin(fg.admin, "GET", &by_fp), 200);
    assert_eq!(doc["key"]["id"], format!("h:{}", fingerprint(SECRET)));
    assert_eq!(doc["limits"][0]["remaining"], 1);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 429);
    let doc = json(&admin(fg.admin, "DELETE", &by_fp), 200);
    assert_eq!(doc["limits"][0]["had_state"], true);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    assert!(!doc.to_string().contains(SECRET));
    // A request without the header is counted by its address: ip:<address>.
    assert_eq!(call(fg.addr, "/api", client, None), 200);
    let doc = json(
        &admin(fg.admin, "GET", &format!("/limits/api/ip:{client}")),
        200,
    );
    assert_eq!(doc["key"]["kind"], "ip");
    assert_eq!(doc["key"]["in_place_of"], "header:x-api-key");
    assert_eq!(doc["limits"][0]["remaining"], 1);

    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 429);
    let doc = json(
        &admin(fg.admin, "DELETE", &format!("/limits/api/{SECRET}")),
        200,
    );
    assert_eq!(doc["limits"][0]["had_state"], true);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(fg.addr, "/api", client, Some(SECRET)), 429);
}

#[test]
fn a_composite_key_is_its_parts_joined_by_plus_and_a_reset_leaves_the_global_budget() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file).run();
    let client = "198.51.100.30";
    // A value with a + in it: %2B inside its piece.
    let value = "k+1";
    let path = format!("/limits/tenant/k%2B1+{client}");
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 200);
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 200);
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 429);
    assert_eq!(
        call(fg.addr, "/tenant", "198.51.100.31", Some(value)),
        200,
        "per address"
    );

    let doc = json(&admin(fg.admin, "GET", &path), 200);
    assert_eq!(doc["key"]["kind"], "composite");
    assert_eq!(doc["key"]["parts"][0]["fingerprint"], fingerprint(value));
    assert_eq!(doc["key"]["parts"][1]["value"], client);
    assert!(doc["key"]["id"].as_str().unwrap().starts_with("c:"));
    assert!(!doc.to_string().contains(value));
    let tenant = &doc["limits"][0];
    assert_eq!(
        (tenant["name"].as_str(), tenant["remaining"].as_u64()),
        (Some("tenant"), Some(0))
    );
    let all = &doc["limits"][1];
    assert_eq!(all["name"], "tenant-all");
    assert_eq!(all["key"], "global");
    assert_eq!(all["remaining"], 97, "three admitted in all");

    let doc = json(&admin(fg.admin, "DELETE", &path), 200);
    assert_eq!(doc["limits"][0]["reset"], true);
    assert_eq!(doc["limits"][1]["reset"], false);
    assert_eq!(doc["limits"][1]["had_state"], Value::Null);
    assert!(
        doc["limits"][1]["note"]
            .as_str()
            .unwrap()
            .starts_with("global")
    );
    let doc = json(&admin(fg.admin, "GET", &path), 200);
    assert_eq!(doc["limits"][0]["remaining"], 2);
    assert_eq!(
        doc["limits"][1]["remaining"], 97,
        "the shared budget is not reset"
    );
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 200);
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 200);
    assert_eq!(call(fg.addr, "/tenant", client, Some(value)), 429);
}

// === Redis ===

fn redis_replica(
    up: SocketAddr,
    file: &tempfile::NamedTempFile,
    redis: &RedisServer,
) -> support::Proxy {
    let fg = with_rules(up, file)
        .env("FLOODGATE_BACKEND", "redis")
        .env("FLOODGATE_REDIS_URL", &redis.url())
        .env("FLOODGATE_REDIS_TIMEOUT", "200ms")
        .env("FLOODGATE_REDIS_FAILURE", "local")
        .run();
    eventually("the replica to reach redis", || {
        (admin(fg.admin, "GET", "/readyz").text() == "ready: redis backend\n").then_some(())
    });
    fg
}

#[test]
fn on_redis_a_reset_on_one_replica_is_seen_by_the_other() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let file = rules_file();
    let a = redis_replica(up.addr(), &file, &redis);
    let b = redis_replica(up.addr(), &file, &redis);
    let client = "198.51.100.40";
    // Spent on A, refused there (A now caches the refusal).
    assert_eq!(call(a.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(a.addr, "/api", client, Some(SECRET)), 200);
    assert_eq!(call(a.addr, "/api", client, Some(SECRET)), 429);
    assert_eq!(call(a.addr, "/api", client, Some(SECRET)), 429);

    // B sees it, by value and by fingerprint (Redis names state by it).
    let by_fp = format!("/limits/api/h:{}", fingerprint(SECRET));
    for path in [format!("/limits/api/{SECRET}"), by_fp.clone()] {
        for _ in 0..3 {
            let doc = json(&admin(b.admin, "GET", &path), 200);
            assert_eq!(doc["key"]["fingerprint"], fingerprint(SECRET));
            assert_eq!(doc["limits"][0]["remaining"], 0, "{doc}");
            assert_eq!(doc["allowed_now"], false);
            assert!(doc["limits"][0]["retry_after"].as_f64().unwrap() > 1000.0);
        }
    }
    let key = format!("floodgate:{{h:{}}}:api", fingerprint(SECRET));
    assert_eq!(redis.cli(&["EXISTS", &key]).as_deref(), Some("1"));

    let doc = json(&admin(b.admin, "DELETE", &by_fp), 200);
    assert_eq!(doc["limits"][0]["had_state"], true);
    assert_eq!(redis.cli(&["EXISTS", &key]).as_deref(), Some("0"));
    // A's cached refusal goes once B's announcement arrives; a refused
    // request is charged nothing, so waiting for it costs no cell.
    eventually("A to forget its cached refusal", || {
        (call(a.addr, "/api", client, Some(SECRET)) == 200).then_some(())
    });
    assert_eq!(
        call(a.addr, "/api", client, Some(SECRET)),
        200,
        "a full burst of 2"
    );
    assert_eq!(call(a.addr, "/api", client, Some(SECRET)), 429);
    let doc = json(&admin(b.admin, "GET", &by_fp), 200);
    assert_eq!(doc["limits"][0]["remaining"], 0);
}

#[test]
fn on_redis_a_reset_forgets_the_local_fallback_state_too() {
    let mut redis = RedisServer::start();
    let up = upstream().run();
    let file = rules_file();
    let a = redis_replica(up.addr(), &file, &redis);
    let client = "198.51.100.50";
    for _ in 0..3 {
        assert_eq!(call(a.addr, "/login", client, None), 200);
    }
    assert_eq!(call(a.addr, "/login", client, None), 429);
    let doc = json(
        &admin(a.admin, "DELETE", &format!("/limits/login/{client}")),
        200,
    );
    assert_eq!(doc["limits"][0]["had_state"], true);

    // Redis goes away: A's own memory decides, from what it last knew of
    // the key, which the reset forgot: a full burst.
    redis.kill();
    for _ in 0..3 {
        assert_eq!(call(a.addr, "/login", client, None), 200);
    }
    assert_eq!(call(a.addr, "/login", client, None), 429);
    // While Redis is down the admin API says so rather than guessing.
    let doc = json(
        &admin(a.admin, "GET", &format!("/limits/login/{client}")),
        503,
    );
    assert_eq!(doc["error"], "backend_unavailable");
}

// === who may ask ===

const TOKEN: &str = "test-admin-token-0123456789";

#[test]
fn with_a_token_the_protected_endpoints_need_it_and_health_and_metrics_stay_open() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file)
        .env("FLOODGATE_ADMIN_TOKEN", TOKEN)
        .run();
    let good = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    for (method, path) in [
        ("GET", "/rules"),
        ("GET", "/limits/login/192.0.2.1"),
        ("DELETE", "/limits/login/192.0.2.1"),
    ] {
        for headers in [
            vec![],
            vec![("Authorization", wrong.as_str())],
            vec![("Authorization", "Basic dXNlcjpwYXNz")],
        ] {
            let res = request(fg.admin, method, path, &headers, b"");
            let doc = json(&res, 401);
            assert_eq!(doc["error"], "unauthorized", "{method} {path}");
            assert_eq!(res.header("www-authenticate"), Some("Bearer"));
            assert!(!res.text().contains(TOKEN));
        }
        let res = request(fg.admin, method, path, &[("Authorization", &good)], b"");
        assert_eq!(res.status, 200, "{method} {path}: {}", res.text());
    }
    // A refused request never reached the endpoint: nothing was reset, and
    // the unknown-rule answer is only given to whoever holds the token.
    let res = request(fg.admin, "GET", "/limits/nope/192.0.2.1", &[], b"");
    assert_eq!(res.status, 401);
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(admin(fg.admin, "GET", path).status, 200, "{path}");
    }
}

#[test]
fn without_a_token_loopback_peers_are_answered() {
    let up = upstream().run();
    let file = rules_file();
    let fg = with_rules(up.addr(), &file).run();
    // The test connects from 127.0.0.1; other peers get 403
    // (admin::auth's unit tests).
    assert_eq!(admin(fg.admin, "GET", "/rules").status, 200);
    assert_eq!(
        admin(fg.admin, "GET", "/limits/login/192.0.2.1").status,
        200
    );
    // A bearer header is neither needed nor looked at.
    let res = request(
        fg.admin,
        "GET",
        "/rules",
        &[("Authorization", "Bearer whatever")],
        b"",
    );
    assert_eq!(res.status, 200);
}

#[test]
fn on_redis_cluster_inspect_and_reset_work_across_slots_and_replicas() {
    let cluster = RedisCluster::start();
    let up = upstream().run();
    let file = rules_file();
    let replica = || {
        let fg = with_rules(up.addr(), &file)
            .env("FLOODGATE_BACKEND", "redis")
            // Nothing listens at the single-node URL: only the cluster decides.
            .env("FLOODGATE_REDIS_URL", "redis://127.0.0.1:1/")
            .env("FLOODGATE_REDIS_CLUSTER", &cluster.urls())
            .env("FLOODGATE_REDIS_TIMEOUT", "1s")
            .env("FLOODGATE_REDIS_FAILURE", "closed")
            .run();
        eventually("the replica to reach the cluster", || {
            (admin(fg.admin, "GET", "/readyz").text() == "ready: redis backend\n").then_some(())
        });
        fg
    };
    let (a, b) = (replica(), replica());
    let client = "198.51.100.60";
    // `tenant` counts the key+address (one slot) and `tenant-all` one global
    // budget (`{g}`, another slot).
    for _ in 0..2 {
        assert_eq!(call(a.addr, "/tenant", client, Some(SECRET)), 200);
    }
    assert_eq!(call(a.addr, "/tenant", client, Some(SECRET)), 429);
    let path = format!("/limits/tenant/{SECRET}+{client}");
    let doc = json(&admin(b.admin, "GET", &path), 200);
    assert_eq!(doc["limits"][0]["name"], "tenant");
    assert_eq!(doc["limits"][0]["remaining"], 0, "{doc}");
    assert_eq!(doc["limits"][1]["name"], "tenant-all");
    assert_eq!(doc["limits"][1]["remaining"], 98, "{doc}");
    assert!(!doc.to_string().contains(SECRET));

    let doc = json(&admin(b.admin, "DELETE", &path), 200);
    assert_eq!(doc["limits"][0]["had_state"], true, "{doc}");
    // A caches a Cluster refusal for at most a second; a refused request is
    // charged nothing, so waiting costs no cell.
    eventually("A to see the reset", || {
        (call(a.addr, "/tenant", client, Some(SECRET)) == 200).then_some(())
    });
    assert_eq!(
        call(a.addr, "/tenant", client, Some(SECRET)),
        200,
        "a full burst of 2"
    );
    assert_eq!(call(a.addr, "/tenant", client, Some(SECRET)), 429);
    let doc = json(&admin(a.admin, "GET", &path), 200);
    assert_eq!(doc["limits"][0]["remaining"], 0);
    assert_eq!(
        doc["limits"][1]["remaining"], 96,
        "the global budget was not reset: {doc}"
    );
}
