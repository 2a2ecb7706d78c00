//! The status page's JSON (`GET /status.json` on the admin listener) against
//! real traffic through floodgate: per-rule totals equal to `/metrics`,
//! per-second series, the most limited clients named without their API
//! keys, backend state, upstream errors, the rules in force; and who may
//! read it (loopback peers only). The page itself is checked in a browser by
//! `scripts/status-page-test`.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;

use actix_web::test::{TestRequest, call_service, init_service, read_body};
use actix_web::{App, http::StatusCode};
use floodgate::admin;
use floodgate::server::Floodgate;
use floodgate::settings::Settings;
use serde_json::Value;
use support::proxy::free_port;
use support::{eventually, get, proxy, request, upstream};

const API_KEY: &str = "sk_live_statusJsonSecret";

const RULES: &str = r#"
[[rules]]
name = "login"
match = { path = "/login" }
limits = [{ rate = "2/h", burst = 2 }]

[[rules]]
name = "api"
match = { path = "/api" }
key = "header:x-api-key"
limits = [{ rate = "1/h", burst = 1 }]
"#;

fn rules_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(RULES.as_bytes()).unwrap();
    file
}

fn json(admin: SocketAddr) -> Value {
    let res = get(admin, "/status.json");
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("content-type"), Some("application/json"));
    assert_eq!(res.header("cache-control"), Some("no-store"));
    serde_json::from_slice(&res.body).unwrap_or_else(|e| panic!("{e}: {}", res.text()))
}

/// `floodgate_requests_total{decision="<decision>"}` as `/metrics` renders it.
/// `floodgate_requests_total` for `decision`, summed over its other labels
/// (rule, decided_by).
fn metric(admin: SocketAddr, decision: &str) -> u64 {
    let text = get(admin, "/metrics").text();
    let label = format!("decision=\"{decision}\"");
    text.lines()
        .filter(|l| l.starts_with("floodgate_requests_total{") && l.contains(&label))
        .map(|l| {
            let value = l.rsplit(' ').next().unwrap();
            value.parse::<u64>().unwrap_or_else(|_| panic!("{l}"))
        })
        .sum()
}

fn sum(values: &Value) -> u64 {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn status_json_counts_each_rule_as_metrics_do_and_names_clients_without_their_keys() {
    let up = upstream().run();
    let file = rules_file();
    let fg = proxy(up.addr())
        .rate("1000/h")
        .env("FLOODGATE_CONFIG", file.path().to_str().unwrap())
        .env("FLOODGATE_TRUSTED_PROXIES", "127.0.0.1/32")
        .run();
    let from = |path: &str, client: &str, key: Option<&str>| {
        let mut headers = vec![("X-Forwarded-For", client)];
        headers.extend(key.map(|k| ("X-Api-Key", k)));
        request(fg.addr, "GET", path, &headers, b"").status
    };
    // login: 203.0.113.7 twice allowed then refused three times,
    // 203.0.113.8 twice allowed then once refused.
    let mut statuses = Vec::new();
    statuses.extend((0..5).map(|_| from("/login", "203.0.113.7", None)));
    statuses.extend((0..3).map(|_| from("/login", "203.0.113.8", None)));
    // api: one request per key, the next two refused.
    statuses.extend((0..3).map(|_| from("/api", "203.0.113.9", Some(API_KEY))));
    // default: always allowed.
    statuses.extend((0..4).map(|_| from("/", "203.0.113.7", None)));
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(limited, 3 + 1 + 2, "{statuses:?}");

    let doc = json(fg.admin);
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["refresh_seconds"], 2);
    for decision in [
        "allowed",
        "limited",
        "shadow_limited",
        "allow_listed",
        "denied",
        "bad_key",
        "undecided",
    ] {
        assert_eq!(
            doc["totals"][decision].as_u64(),
            Some(metric(fg.admin, decision)),
            "totals.{decision} equals /metrics"
        );
    }
    assert_eq!(doc["totals"]["allowed"], 2 + 2 + 1 + 4);
    assert_eq!(doc["totals"]["limited"], 6);

    let rules = doc["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["login", "api", "default"],
        "the rules in force, in order"
    );
    let seconds = doc["series"]["seconds"].as_u64().unwrap();
    assert_eq!(seconds, 180);
    for (rule, allowed, limited) in [(&rules[0], 4, 4), (&rules[1], 1, 2), (&rules[2], 4, 0)] {
        assert_eq!(rule["in_force"], true);
        assert_eq!(rule["totals"]["allowed"], allowed, "{rule}");
        assert_eq!(rule["totals"]["limited"], limited, "{rule}");
        assert_eq!(rule["allowed"].as_array().unwrap().len() as u64, seconds);
        assert_eq!(rule["limited"].as_array().unwrap().len() as u64, seconds);
    }
    // Each request lands in its second's bucket, shown once that second is
    // complete.
    let doc = eventually("the series to hold every request", || {
        let doc = json(fg.admin);
        let rules = doc["rules"].as_array().unwrap();
        let all = rules.iter().all(|r| {
            sum(&r["allowed"]) == r["totals"]["allowed"].as_u64().unwrap()
                && sum(&r["limited"]) == r["totals"]["limited"].as_u64().unwrap()
        });
        all.then_some(doc)
    });
    let now = doc["generated_at"].as_u64().unwrap();
    let until = doc["series"]["until"].as_u64().unwrap();
    assert!(until < now && now - until <= 2, "until {until}, now {now}");

    let clients = doc["top_limited"]["clients"].as_array().unwrap();
    assert_eq!(doc["top_limited"]["minutes"], 5);
    let listed: Vec<(&str, u64)> = clients
        .iter()
        .map(|c| {
            (
                c["client"].as_str().unwrap(),
                c["limited"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed[0], ("ip:203.0.113.7", 3), "{listed:?}");
    assert!(
        listed[1].0.starts_with("h:") && listed[1].0.len() == 34,
        "{listed:?}"
    );
    assert_eq!(listed[1].1, 2);
    assert_eq!(listed[2], ("ip:203.0.113.8", 1));
    assert!(clients.iter().all(|c| c["error"] == 0));

    assert_eq!(doc["backend"]["kind"], "memory");
    assert_eq!(doc["backend"]["state"], "up");
    assert_eq!(doc["backend"]["note"], Value::Null);
    assert_eq!(doc["backend"]["failure_policy"], Value::Null);
    for (kind, n) in doc["upstream_errors"].as_object().unwrap() {
        assert_eq!(n, 0, "{kind}");
    }
    let in_force = &doc["rules_in_force"];
    assert_eq!(in_force["rules"][1]["key"], "header:x-api-key");
    assert_eq!(in_force["default"]["limits"][0]["rate"], "1000/h");
    assert_eq!(in_force["last_reload"]["ok"], true);

    let text = doc.to_string();
    assert!(!text.contains(API_KEY), "the API key in clear: {text}");
}

#[test]
fn upstream_errors_are_those_metrics_count() {
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let fg = proxy(closed).rate("1000/h").run();
    for _ in 0..3 {
        assert_eq!(get(fg.addr, "/").status, 502);
    }
    let doc = json(fg.admin);
    assert_eq!(doc["upstream_errors"]["refused"], 3);
    assert_eq!(doc["upstream_errors"]["timeout"], 0);
    let metrics = get(fg.admin, "/metrics").text();
    assert!(
        metrics.contains("floodgate_upstream_errors_total{kind=\"refused\"} 3\n"),
        "{metrics}"
    );
    // Answered 502, but the limiter allowed them: counted as allowed.
    assert_eq!(doc["totals"]["allowed"], 3);
}

#[test]
fn the_page_is_built_in_and_the_other_admin_endpoints_still_answer() {
    let up = upstream().run();
    let fg = proxy(up.addr()).run();
    let page = get(fg.admin, "/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(page.text().contains("status.json"));
    assert_eq!(page.text(), admin::status::PAGE);
    for path in ["/healthz", "/readyz", "/metrics", "/rules"] {
        assert_eq!(get(fg.admin, path).status, 200, "{path}");
    }
    assert_eq!(get(fg.admin, "/nothing-here").status, 404);
}

#[actix_web::test]
async fn only_loopback_peers_see_the_page_and_its_json() {
    let settings = Settings::load([
        ("FLOODGATE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("FLOODGATE_ADMIN_LISTEN".to_owned(), "0.0.0.0:0".to_owned()),
    ])
    .unwrap();
    let floodgate = Floodgate::new(settings).unwrap();
    let app = init_service(App::new().configure(admin::configure(floodgate.admin()))).await;
    for path in ["/", "/status.json"] {
        for peer in [
            "192.0.2.10:5000",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.1]:5000",
        ] {
            let req = TestRequest::get()
                .uri(path)
                .peer_addr(peer.parse().unwrap())
                .to_request();
            let res = call_service(&app, req).await;
            assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path} from {peer}");
        }
        for peer in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            let req = TestRequest::get()
                .uri(path)
                .peer_addr(peer.parse().unwrap())
                .to_request();
            let res = call_service(&app, req).await;
            assert_eq!(res.status(), StatusCode::OK, "{path} from {peer}");
        }
    }
    // The other endpoints are not the page's: /metrics answers scrapers
    // wherever the admin listener is bound.
    let req = TestRequest::get()
        .uri("/metrics")
        .peer_addr("192.0.2.10:5000".parse().unwrap())
        .to_request();
    let res = call_service(&app, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!read_body(res).await.is_empty());
}
