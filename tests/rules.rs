//! Rules end to end, through a settings file: matching on the normalised
//! path, several limits (all-or-nothing), a `global` limit, allow,
//! allow_keys, deny, shadow, reload while traffic flows, and `GET /rules`.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;

use support::{Response, proxy, request, upstream};

/// A settings file with `toml` in it, kept until the test ends.
fn rules_file(toml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    file.flush().unwrap();
    file
}

/// Rewrites `file` in place with `toml`.
fn rewrite(file: &tempfile::NamedTempFile, toml: &str) {
    std::fs::write(file.path(), toml).unwrap();
}

/// A request from `client` (through the trusted proxy 127.0.0.1).
fn from(addr: SocketAddr, method: &str, path: &str, client: &str) -> Response {
    request(addr, method, path, &[("X-Forwarded-For", client)], b"")
}

fn with_file(up: SocketAddr, file: &tempfile::NamedTempFile) -> support::proxy::ProxyBuilder {
    proxy(up)
        .rate("1000/h")
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
}

const LOGIN: &str = r#"
[[rules]]
name = "login"
match = { path = "/login", methods = ["POST"] }
limits = [{ rate = "2/h", burst = 2 }]
"#;

#[test]
fn the_first_matching_rule_decides_whatever_the_path_spelling() {
    let up = upstream().run();
    let file = rules_file(LOGIN);
    let fg = with_file(up.addr(), &file).run();
    let client = "198.51.100.1";
    assert_eq!(from(fg.addr, "POST", "/login", client).status, 200);
    let res = from(fg.addr, "POST", "/login/", client);
    assert_eq!(res.status, 200);
    assert_eq!(res.header("ratelimit-policy"), Some("\"login\";q=2;w=3600"));
    assert_eq!(res.header("ratelimit"), Some("\"login\";r=0;t=3600"));
    for spelling in [
        "/%6Cogin",
        "//login",
        "/static/../login",
        "/login/",
        "/LOGIN/../login",
    ] {
        let res = from(fg.addr, "POST", spelling, client);
        assert_eq!(res.status, 429, "{spelling} is the login rule");
        assert_eq!(res.text(), "Too Many Requests: limit \"login\"\n");
    }
    // Other methods, and paths the prefix does not cover, fall to default.
    for (method, path) in [("GET", "/login"), ("POST", "/loginx"), ("POST", "/")] {
        let res = from(fg.addr, method, path, client);
        assert_eq!(res.status, 200, "{method} {path}");
        assert_eq!(
            res.header("ratelimit-policy"),
            Some("\"default\";q=1000;w=3600"),
            "{method} {path}"
        );
    }
    // The login rule counts addresses apart.
    assert_eq!(from(fg.addr, "POST", "/login", "198.51.100.2").status, 200);
    assert_eq!(up.requests(), 2 + 3 + 1);
}

#[test]
fn several_limits_refuse_all_or_nothing_and_a_global_limit_counts_everyone() {
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "api"
match = { path = "/api" }
limits = [
  { rate = "1/h", burst = 1 },
  { name = "api-total", rate = "3/h", burst = 3, key = "global" },
]
"#,
    );
    let fg = with_file(up.addr(), &file).run();
    let first = from(fg.addr, "GET", "/api/x", "198.51.100.1");
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"api.1\";q=1;w=3600, \"api-total\";q=3;w=3600")
    );
    assert_eq!(first.header("ratelimit"), Some("\"api.1\";r=0;t=3600"));
    // Refused by its own limit: charged to neither, so the global budget
    // still has two for others.
    for _ in 0..3 {
        let refused = from(fg.addr, "GET", "/api/x", "198.51.100.1");
        assert_eq!(refused.status, 429);
        assert_eq!(refused.text(), "Too Many Requests: limit \"api.1\"\n");
    }
    let second = from(fg.addr, "GET", "/api/x", "198.51.100.2");
    assert_eq!(second.status, 200);
    assert_eq!(
        second.header("ratelimit"),
        Some("\"api.1\";r=0;t=3600"),
        "fewest remaining; a tie with the later reset"
    );
    assert_eq!(from(fg.addr, "GET", "/api/x", "198.51.100.3").status, 200);
    let everyone = from(fg.addr, "GET", "/api/x", "198.51.100.4");
    assert_eq!(everyone.status, 429, "the global budget is spent");
    assert_eq!(everyone.text(), "Too Many Requests: limit \"api-total\"\n");
    let json = request(
        fg.addr,
        "GET",
        "/api/x",
        &[
            ("X-Forwarded-For", "198.51.100.5"),
            ("Accept", "application/problem+json"),
        ],
        b"",
    );
    assert_eq!(json.status, 429);
    let body: serde_json::Value = serde_json::from_str(&json.text()).unwrap();
    assert_eq!(body["limit"], "api-total");
    assert_eq!(up.requests(), 3);
}

#[test]
fn allowed_networks_and_keys_are_never_refused_but_still_counted() {
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "api"
match = { path = "/api" }
key = "header:x-api-key"
limits = [
  { rate = "1/h", burst = 1 },
  { name = "api-total", rate = "4/h", burst = 4, key = "global" },
]
allow = ["10.0.0.0/8"]
allow_keys = ["office-key"]
"#,
    );
    let fg = with_file(up.addr(), &file).run();
    let office = |client: &str, key: Option<&str>| {
        let mut headers = vec![("X-Forwarded-For", client)];
        headers.extend(key.map(|k| ("X-Api-Key", k)));
        request(fg.addr, "GET", "/api", &headers, b"")
    };
    // Each charged when every limit has room: the global budget goes
    // 4 -> 3 -> 2 -> 1.
    for (client, key) in [
        ("10.1.2.3", None),
        ("10.1.2.4", None),
        ("198.51.100.9", Some("office-key")),
    ] {
        let res = office(client, key);
        assert_eq!(res.status, 200, "{client} {key:?}");
        assert_eq!(res.header("ratelimit"), None, "no limit applies to it");
    }
    // Over its own limit: still forwarded; refused by a limit, so (all or
    // nothing) charged to none.
    assert_eq!(office("10.1.2.3", None).status, 200);
    assert_eq!(office("198.51.100.9", Some("office-key")).status, 200);
    assert_eq!(office("198.51.100.1", Some("k-1")).status, 200);
    let other = office("198.51.100.2", Some("k-2"));
    assert_eq!(
        other.status, 429,
        "the office's traffic spent the global budget"
    );
    assert_eq!(other.text(), "Too Many Requests: limit \"api-total\"\n");
    assert_eq!(office("10.1.2.5", None).status, 200, "and is never refused");
    assert_eq!(up.requests(), 7);
}

#[test]
fn denied_networks_get_403_before_any_limiter_state_is_touched() {
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "all"
match = { path = "/" }
key = "global"
limits = [{ rate = "1/h", burst = 1 }]
deny = ["203.0.113.0/24"]
"#,
    );
    let fg = with_file(up.addr(), &file)
        .env("FLOODGATE_DENY", "192.0.2.0/24")
        .run();
    for client in ["203.0.113.5", "192.0.2.77", "203.0.113.6"] {
        let res = from(fg.addr, "GET", "/", client);
        assert_eq!(res.status, 403, "{client}");
        assert_eq!(res.text(), "Forbidden: this client network is denied\n");
        assert_eq!(res.header("ratelimit"), None);
    }
    let res = from(fg.addr, "GET", "/", "198.51.100.1");
    assert_eq!(res.status, 200, "the global budget was not touched");
    assert_eq!(from(fg.addr, "GET", "/", "198.51.100.2").status, 429);
    assert_eq!(up.requests(), 1);
    let metrics = request(fg.admin, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains(
            "floodgate_requests_total{rule=\"all\",decision=\"denied\",decided_by=\"none\"} 3\n"
        ),
        "{metrics}"
    );
}

#[test]
fn a_shadow_rule_forwards_what_it_would_refuse_and_shows_no_headers() {
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "trial"
match = { path = "/" }
limits = [{ rate = "1/h", burst = 1 }]
shadow = true
"#,
    );
    let fg = with_file(up.addr(), &file).run();
    for _ in 0..3 {
        let res = from(fg.addr, "GET", "/", "198.51.100.1");
        assert_eq!(res.status, 200);
        assert_eq!(res.header("ratelimit"), None);
        assert_eq!(res.header("ratelimit-policy"), None);
        assert_eq!(res.header("retry-after"), None);
    }
    assert_eq!(up.requests(), 3);
    let metrics = request(fg.admin, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains(
            "floodgate_requests_total{rule=\"trial\",decision=\"shadow_limited\",decided_by=\"backend\"} 2\n"
        ),
        "{metrics}"
    );
}

#[test]
fn global_shadow_wins_over_a_rule() {
    let up = upstream().run();
    let file = rules_file(LOGIN);
    let fg = with_file(up.addr(), &file)
        .env("FLOODGATE_SHADOW", "true")
        .run();
    for _ in 0..4 {
        assert_eq!(from(fg.addr, "POST", "/login", "198.51.100.1").status, 200);
    }
    assert_eq!(up.requests(), 4);
}

#[test]
fn a_reload_keeps_the_counters_of_unchanged_limits_and_an_invalid_file_keeps_the_old_rules() {
    let up = upstream().run();
    let file = rules_file(LOGIN);
    let (fg, floodgate) = with_file(up.addr(), &file).run_floodgate();
    let client = "198.51.100.1";
    assert_eq!(from(fg.addr, "POST", "/login", client).status, 200);

    // A new rule before it; the login limit unchanged.
    rewrite(
        &file,
        &format!(
            "[[rules]]\nname = \"api\"\nmatch = {{ path = \"/api\" }}\nlimits = [{{ rate = \"1/h\", burst = 1 }}]\n{LOGIN}"
        ),
    );
    floodgate.reload().expect("a valid file");
    assert_eq!(
        from(fg.addr, "POST", "/login", client).status,
        200,
        "one of two left"
    );
    assert_eq!(
        from(fg.addr, "POST", "/login", client).status,
        429,
        "the reload handed out no fresh burst"
    );
    assert_eq!(from(fg.addr, "GET", "/api", client).status, 200);
    assert_eq!(
        from(fg.addr, "GET", "/api", client).status,
        429,
        "the new rule"
    );

    rewrite(
        &file,
        "[[rules]]\nname = \"Bad Name\"\nlimits = [{ rate = \"5/mn\" }]\n",
    );
    let problems = floodgate.reload().expect_err("an invalid file");
    assert!(problems.len() >= 2, "one line per problem: {problems:?}");
    assert_eq!(
        from(fg.addr, "GET", "/api", client).status,
        429,
        "the old rules stay"
    );
    let rules: serde_json::Value =
        serde_json::from_str(&request(fg.admin, "GET", "/rules", &[], b"").text()).unwrap();
    assert_eq!(rules["last_reload"]["ok"], false);
    assert_eq!(
        rules["last_reload"]["errors"].as_array().unwrap().len(),
        problems.len()
    );
    assert_eq!(rules["rules"][0]["name"], "api");
    assert_eq!(rules["rules"][1]["name"], "login");
}

#[test]
fn rules_are_served_as_json_on_the_admin_listener() {
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "login"
match = { path = "/login", methods = ["POST"], host = "*.example.com" }
limits = [
  { rate = "5/min", burst = 5 },
  { name = "daily", rate = "100/day", algorithm = "fixed_window" },
]
allow_keys = ["sk_live_office"]
deny = ["203.0.113.0/24"]
"#,
    );
    let fg = with_file(up.addr(), &file).run();
    let res = request(fg.admin, "GET", "/rules", &[], b"");
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("application/json"));
    let text = res.text();
    assert!(
        !text.contains("sk_live_office"),
        "allowed keys are secrets: {text}"
    );
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let login = &doc["rules"][0];
    assert_eq!(login["name"], "login");
    assert_eq!(login["match"]["path"], "/login");
    assert_eq!(login["match"]["methods"], serde_json::json!(["POST"]));
    assert_eq!(login["match"]["host"], "*.example.com");
    assert_eq!(login["key"], "ip");
    assert_eq!(login["limits"][0]["name"], "login.1");
    assert_eq!(login["limits"][0]["algorithm"], "gcra");
    assert_eq!(login["limits"][0]["burst"], 5);
    assert_eq!(login["limits"][1]["name"], "daily");
    assert_eq!(login["limits"][1]["rate"], "100/d");
    assert_eq!(login["limits"][1]["algorithm"], "fixed_window");
    assert_eq!(login["deny"], serde_json::json!(["203.0.113.0/24"]));
    assert_eq!(doc["default"]["name"], "default");
    assert_eq!(doc["default"]["limits"][0]["rate"], "1000/h");
    assert_eq!(doc["global"]["shadow"], false);
    assert_eq!(doc["last_reload"]["ok"], true);
    assert!(doc["last_reload"]["at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(doc["last_reload"]["errors"], serde_json::json!([]));
}

// === the real binary: SIGHUP ===

/// `GET /rules` from the admin listener, parsed.
fn rules_doc(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&request(admin, "GET", "/rules", &[], b"").text()).unwrap()
}

#[test]
fn sighup_reloads_the_file_while_traffic_flows_and_never_stops_the_process() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let up = upstream().run();
    let file = rules_file(LOGIN);
    let upstream_url = format!("http://{}", up.addr());
    let mut fg = support::Binary::start(&[
        ("FLOODGATE_UPSTREAM", upstream_url.as_str()),
        ("FLOODGATE_CONFIG", file.path().to_str().unwrap()),
        ("FLOODGATE_RATE", "100000/s"),
        ("FLOODGATE_WORKERS", "2"),
    ]);
    let addr = fg.addr;

    // Traffic on the default rule throughout: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(support::try_send(
                    addr,
                    &support::client::build("GET", "/", &[], b""),
                ));
            }
            statuses
        })
    };

    assert_eq!(request(addr, "POST", "/login", &[], b"").status, 200);
    rewrite(
        &file,
        &format!(
            "[[rules]]\nname = \"trial\"\nmatch = {{ path = \"/trial\" }}\nlimits = [{{ rate = \"1/h\", burst = 1 }}]\nshadow = true\n{LOGIN}"
        ),
    );
    fg.signal("HUP");
    support::eventually("the reloaded rules", || {
        (rules_doc(fg.admin)["rules"][0]["name"] == "trial").then_some(())
    });
    assert_eq!(
        request(addr, "POST", "/login", &[], b"").status,
        200,
        "one of two left"
    );
    assert_eq!(
        request(addr, "POST", "/login", &[], b"").status,
        429,
        "counters carried over the reload"
    );
    for _ in 0..2 {
        let res = request(addr, "GET", "/trial", &[], b"");
        assert_eq!(res.status, 200, "shadow");
        assert_eq!(res.header("ratelimit"), None);
    }

    rewrite(
        &file,
        "[[rules]]\nname = \"trial\"\nlimits = [{ rate = \"1/h\", brust = 1 }]\n",
    );
    fg.signal("HUP");
    let doc = support::eventually("the refused reload", || {
        let doc = rules_doc(fg.admin);
        (doc["last_reload"]["ok"] == false).then_some(doc)
    });
    let errors = doc["last_reload"]["errors"].as_array().unwrap().clone();
    assert!(
        errors.iter().any(|e| e.as_str().unwrap().contains("brust")),
        "{errors:?}"
    );
    assert_eq!(doc["rules"][0]["name"], "trial", "the old rules stay");
    assert_eq!(request(addr, "POST", "/login", &[], b"").status, 429);
    assert!(fg.child.try_wait().unwrap().is_none(), "still running");

    stop.store(true, Ordering::Relaxed);
    let statuses = traffic.join().unwrap();
    assert!(statuses.len() > 5, "traffic flowed: {}", statuses.len());
    for status in &statuses {
        match status {
            Ok(res) => assert_eq!(res.status, 200),
            Err(err) => panic!("a request failed during the reloads: {err}"),
        }
    }

    let stderr = fg.stderr();
    assert!(stderr.contains("rules reloaded"), "{stderr}");
    assert!(
        stderr.contains("shadow: rule=trial limit=trial would refuse key=ip:127.0.0.1"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("reload refused, the old rules stay") && l.contains("brust")),
        "{stderr}"
    );
}

#[test]
fn sighup_without_a_settings_file_keeps_serving() {
    let up = upstream().run();
    let upstream_url = format!("http://{}", up.addr());
    let mut fg = support::Binary::start(&[("FLOODGATE_UPSTREAM", upstream_url.as_str())]);
    for _ in 0..3 {
        fg.signal("HUP");
        assert!(
            fg.wait_exit(std::time::Duration::from_millis(200))
                .is_none(),
            "SIGHUP never stops floodgate"
        );
        assert_eq!(request(fg.addr, "GET", "/", &[], b"").status, 200);
    }
    assert_eq!(rules_doc(fg.admin)["last_reload"]["ok"], true);
    let stderr = fg.stderr();
    assert!(
        stderr.contains("SIGHUP received: reloading the rules"),
        "{stderr}"
    );
}

// === on Redis ===

#[test]
fn several_limits_are_all_or_nothing_on_redis_too() {
    let redis = support::RedisServer::start();
    let up = upstream().run();
    let file = rules_file(
        r#"
[[rules]]
name = "api"
match = { path = "/api" }
limits = [
  { rate = "1/h", burst = 1 },
  { name = "api-total", rate = "2/h", burst = 2, key = "global" },
]
"#,
    );
    let fg = with_file(up.addr(), &file)
        .env("FLOODGATE_BACKEND", "redis")
        .env("FLOODGATE_REDIS_URL", &redis.url())
        .env("FLOODGATE_REDIS_FAILURE", "closed")
        .run();
    support::eventually("redis connected", || {
        (request(fg.admin, "GET", "/readyz", &[], b"").status == 200).then_some(())
    });
    assert_eq!(from(fg.addr, "GET", "/api", "198.51.100.1").status, 200);
    for _ in 0..3 {
        let refused = from(fg.addr, "GET", "/api", "198.51.100.1");
        assert_eq!(refused.status, 429);
        assert_eq!(refused.text(), "Too Many Requests: limit \"api.1\"\n");
    }
    assert_eq!(
        from(fg.addr, "GET", "/api", "198.51.100.2").status,
        200,
        "the refusals were charged to neither limit"
    );
    let everyone = from(fg.addr, "GET", "/api", "198.51.100.3");
    assert_eq!(everyone.status, 429);
    assert_eq!(everyone.text(), "Too Many Requests: limit \"api-total\"\n");
    assert_eq!(up.requests(), 2);
}
