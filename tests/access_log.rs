//! README, "Access log": the real binary with `FLOODGATE_ACCESS_LOG=json`
//! and `text` writes one parseable line per client request on stdout with
//! the documented fields, never the query and never an API key in clear,
//! and nothing for admin requests; `off` writes nothing.
//! `FLOODGATE_LOG_FORMAT=json` makes every stderr line a JSON object. Bad
//! values of either stop startup with one line naming the variable.

mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;

use floodgate::key::Fingerprinter;
use support::{Binary, get, request, upstream};

/// The API key the header-keyed rule counts by: it must never be printed.
const API_KEY: &str = "sk_live_7f3a9c1e55d04b2a";
/// A secret in a query string: paths are logged, queries never.
const QUERY_SECRET: &str = "qs-secret-51c2e8";

const RULES: &str = r#"
[[rules]]
name = "login"
match = { path = "/login" }
limits = [{ name = "login-burst", rate = "1/min", burst = 1 }]

[[rules]]
name = "blocked"
match = { path = "/blocked" }
deny = ["127.0.0.0/8"]

[[rules]]
name = "api"
match = { path = "/api" }
key = "header:x-api-key"
limits = [{ name = "api-keyed", rate = "1/min", burst = 1 }]
"#;

/// One expected line: the request sent and the fields its line must hold
/// (`None`: absent, `null` in JSON).
struct Expected {
    path: &'static str,
    status: u16,
    rule: Option<&'static str>,
    decision: Option<&'static str>,
    limit: Option<&'static str>,
    keyed: bool,
    forwarded: bool,
}

/// Runs floodgate with `env` plus the rules and the upstream, sends the
/// known sequence, stops it, and returns (expected lines, stdout, stderr).
fn run(env: &[(&str, &str)]) -> (Vec<Expected>, String, String) {
    let up = upstream()
        .route("/hello", "hello")
        .route("/login", "welcome")
        .route("/api/items", "[1,2]")
        .run();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::File::create(&rules)
        .unwrap()
        .write_all(RULES.as_bytes())
        .unwrap();
    let upstream_url = format!("http://{}", up.addr());
    let mut all = vec![
        ("FLOODGATE_UPSTREAM", upstream_url.as_str()),
        ("FLOODGATE_CONFIG", rules.to_str().unwrap()),
        ("FLOODGATE_RATE", "100/min"),
        ("FLOODGATE_WORKERS", "2"),
        // Refusals are logged at debug: they too must not show the key.
        ("RUST_LOG", "info,floodgate=debug"),
    ];
    all.extend_from_slice(env);
    let mut fg = Binary::start_capturing(&all);
    let expected = send_sequence(fg.addr, fg.admin);
    let (status, stdout, stderr) = fg.stop_and_output();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    (expected, stdout, stderr)
}

fn send_sequence(addr: SocketAddr, admin: SocketAddr) -> Vec<Expected> {
    let keyed = [("X-API-Key", API_KEY)];
    let steps: Vec<(Expected, u16)> = vec![
        (
            Expected {
                path: "/hello",
                status: 200,
                rule: Some("default"),
                decision: Some("allowed"),
                limit: None,
                keyed: false,
                forwarded: true,
            },
            get(addr, "/hello").status,
        ),
        (
            Expected {
                path: "/login",
                status: 200,
                rule: Some("login"),
                decision: Some("allowed"),
                limit: None,
                keyed: false,
                forwarded: true,
            },
            get(addr, "/login").status,
        ),
        (
            Expected {
                path: "/login",
                status: 429,
                rule: Some("login"),
                decision: Some("limited"),
                limit: Some("login-burst"),
                keyed: false,
                forwarded: false,
            },
            get(addr, "/login").status,
        ),
        (
            Expected {
                path: "/blocked",
                status: 403,
                rule: Some("blocked"),
                decision: Some("denied"),
                limit: None,
                keyed: false,
                forwarded: false,
            },
            get(addr, "/blocked").status,
        ),
        (
            Expected {
                path: "/api/items",
                status: 200,
                rule: Some("api"),
                decision: Some("allowed"),
                limit: None,
                keyed: true,
                forwarded: true,
            },
            request(addr, "GET", "/api/items", &keyed, b"").status,
        ),
        (
            Expected {
                path: "/api/items",
                status: 429,
                rule: Some("api"),
                decision: Some("limited"),
                limit: Some("api-keyed"),
                keyed: true,
                forwarded: false,
            },
            request(addr, "GET", "/api/items", &keyed, b"").status,
        ),
        (
            Expected {
                path: "/hello",
                status: 200,
                rule: Some("default"),
                decision: Some("allowed"),
                limit: None,
                keyed: false,
                forwarded: true,
            },
            get(addr, &format!("/hello?token={QUERY_SECRET}&x=1")).status,
        ),
    ];
    // The admin listener: never in the access log.
    assert_eq!(get(admin, "/healthz").status, 200);
    assert_eq!(get(admin, "/metrics").status, 200);
    steps
        .into_iter()
        .map(|(expected, got)| {
            assert_eq!(got, expected.status, "{}", expected.path);
            expected
        })
        .collect()
}

/// The fingerprint the access log shows for [`API_KEY`] with the default
/// Redis prefix.
fn api_key_fingerprint() -> String {
    format!(
        "h:{}",
        Fingerprinter::new(b"floodgate:").fingerprint(API_KEY.as_bytes())
    )
}

/// What no output may hold.
fn assert_no_secrets(stdout: &str, stderr: &str) {
    for (name, text) in [("stdout", stdout), ("stderr", stderr)] {
        assert!(!text.contains(API_KEY), "{name} holds the API key:\n{text}");
        assert!(
            !text.contains(&API_KEY[8..]),
            "{name} holds part of the API key:\n{text}"
        );
        assert!(
            !text.contains(QUERY_SECRET),
            "{name} holds the query:\n{text}"
        );
    }
}

/// One line's fields as text (`None` for JSON `null` or a text field left
/// out).
type Fields = BTreeMap<String, Option<String>>;

/// Matches lines to requests by path and status: each worker hands its
/// lines over in batches, so lines from two workers are not in request
/// order (their `time` is).
fn check(expected: &[Expected], lines: &[Fields], stdout: &str) {
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per request:\n{stdout}"
    );
    let field = |line: &Fields, name: &str| line.get(name).cloned().flatten();
    let mut expected: Vec<&Expected> = expected.iter().collect();
    expected.sort_by_key(|e| (e.path, e.status));
    let mut lines: Vec<&Fields> = lines.iter().collect();
    lines.sort_by_key(|l| (field(l, "path"), field(l, "status")));
    for (want, line) in expected.into_iter().zip(lines) {
        let ctx = format!("{} {}: {line:?}", want.path, want.status);
        let time = field(line, "time").expect("time");
        assert!(time.ends_with('Z'), "{ctx}");
        assert_eq!(
            time.split_once('.').map(|(_, ms)| ms.len()),
            Some(4),
            "milliseconds: {ctx}"
        );
        time.parse::<jiff::Timestamp>().expect("RFC 3339");
        assert_eq!(field(line, "method").as_deref(), Some("GET"), "{ctx}");
        assert_eq!(field(line, "path").as_deref(), Some(want.path), "{ctx}");
        assert_eq!(
            field(line, "status"),
            Some(want.status.to_string()),
            "{ctx}"
        );
        let bytes: u64 = field(line, "bytes").unwrap().parse().unwrap();
        if want.path == "/hello" {
            assert_eq!(bytes, 5, "{ctx}");
        } else {
            assert!(bytes > 0, "{ctx}");
        }
        let total: f64 = field(line, "total_ms").unwrap().parse().unwrap();
        assert!(total >= 0.0, "{ctx}");
        match field(line, "upstream_ms") {
            Some(ms) => {
                assert!(want.forwarded, "{ctx}");
                let ms: f64 = ms.parse().unwrap();
                assert!(ms <= total, "{ctx}");
            }
            None => assert!(!want.forwarded, "{ctx}"),
        }
        assert_eq!(field(line, "rule").as_deref(), want.rule, "{ctx}");
        assert_eq!(field(line, "decision").as_deref(), want.decision, "{ctx}");
        assert_eq!(field(line, "limit").as_deref(), want.limit, "{ctx}");
        assert_eq!(
            field(line, "decided_by").as_deref(),
            Some(if want.decision == Some("denied") {
                "not_asked"
            } else {
                "backend"
            }),
            "{ctx}"
        );
        assert_eq!(field(line, "client").as_deref(), Some("127.0.0.1"), "{ctx}");
        let key = field(line, "key");
        if want.keyed {
            assert_eq!(key, Some(api_key_fingerprint()), "{ctx}");
        } else {
            assert_eq!(key, None, "an address key is shown as the client: {ctx}");
        }
    }
}

#[test]
fn json_access_log_lines_parse_and_hold_every_field() {
    let (expected, stdout, stderr) = run(&[("FLOODGATE_ACCESS_LOG", "json")]);
    assert_no_secrets(&stdout, &stderr);
    let lines: Vec<Fields> = stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let object = value.as_object().expect("an object per line");
            for name in [
                "time",
                "method",
                "path",
                "status",
                "bytes",
                "total_ms",
                "upstream_ms",
                "rule",
                "decision",
                "decided_by",
                "limit",
                "client",
                "key",
            ] {
                assert!(object.contains_key(name), "{name} missing: {line}");
            }
            object
                .iter()
                .map(|(k, v)| {
                    let text = match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .collect();
    check(&expected, &lines, &stdout);
}

/// Parses one logfmt line: `key=value` pairs separated by spaces, a value
/// either bare or double-quoted with `\"`, `\\` and `\xNN` escapes.
fn logfmt(line: &str) -> Fields {
    let mut fields = Fields::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let eq = line[i..].find('=').map(|n| i + n).expect("key=value");
        let key = &line[i..eq];
        assert!(
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "bad key {key:?} in {line}"
        );
        i = eq + 1;
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match bytes.get(i) {
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        match bytes.get(i + 1) {
                            Some(b'x') => {
                                let hex = &line[i + 2..i + 4];
                                value.push(u8::from_str_radix(hex, 16).unwrap());
                                i += 4;
                                continue;
                            }
                            Some(&c @ (b'"' | b'\\')) => value.push(c),
                            other => panic!("bad escape {other:?} in {line}"),
                        }
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                    None => panic!("unterminated quote in {line}"),
                }
            }
        } else {
            while let Some(&c) = bytes.get(i).filter(|c| **c != b' ') {
                assert!(c.is_ascii_graphic() && c != b'"', "{line}");
                value.push(c);
                i += 1;
            }
        }
        let old = fields.insert(key.to_owned(), Some(String::from_utf8(value).unwrap()));
        assert!(old.is_none(), "{key} twice in {line}");
        match bytes.get(i) {
            None => {}
            Some(b' ') => i += 1,
            Some(_) => panic!("no space after {key} in {line}"),
        }
    }
    fields
}

#[test]
fn text_access_log_lines_are_logfmt_and_hold_every_field() {
    let (expected, stdout, stderr) = run(&[("FLOODGATE_ACCESS_LOG", "text")]);
    assert_no_secrets(&stdout, &stderr);
    let lines: Vec<Fields> = stdout.lines().map(logfmt).collect();
    check(&expected, &lines, &stdout);
}

#[test]
fn text_values_are_escaped_so_a_path_cannot_break_or_forge_a_line() {
    let up = upstream().run();
    let mut fg = Binary::start_capturing(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_ACCESS_LOG", "text"),
    ]);
    // Quotes, `=` and a percent-encoded newline: the path as sent.
    let path = "/a\"b=c%0Ad\\e";
    let _ = request(fg.addr, "GET", path, &[], b"");
    let (status, stdout, stderr) = fg.stop_and_output();
    assert!(status.is_some_and(|s| s.success()), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let fields = logfmt(lines[0]);
    assert_eq!(fields["path"].as_deref(), Some(path), "{stdout}");
    assert!(!fields.contains_key("c"), "{stdout}");
}

#[test]
fn a_line_shows_up_while_floodgate_runs() {
    let up = upstream().route("/hello", "hello").run();
    let mut fg = Binary::start_capturing(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_ACCESS_LOG", "json"),
    ]);
    let stdout = fg.child.stdout.take().unwrap();
    let (lines, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if lines.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    assert_eq!(get(fg.addr, "/hello").status, 200);
    // Handed over within the flush interval, not only at exit.
    let line = got
        .recv_timeout(support::patience())
        .expect("a line before floodgate stops");
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["path"], "/hello", "{line}");
    assert!(
        fg.wait_exit(std::time::Duration::ZERO).is_none(),
        "still running"
    );
}

#[test]
fn access_log_off_prints_nothing() {
    let (_, stdout, stderr) = run(&[("FLOODGATE_ACCESS_LOG", "off")]);
    assert_eq!(stdout, "", "{stderr}");
    let (_, stdout, stderr) = run(&[]);
    assert_eq!(stdout, "", "off by default: {stderr}");
}

#[test]
fn json_log_format_makes_every_stderr_line_json() {
    let (_, _, stderr) = run(&[
        ("FLOODGATE_LOG_FORMAT", "json"),
        ("FLOODGATE_ACCESS_LOG", "json"),
    ]);
    let mut levels = BTreeMap::new();
    for line in stderr.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for name in ["time", "level", "target", "message"] {
            assert!(value[name].is_string(), "{name}: {line}");
        }
        *levels
            .entry(value["level"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert!(
        stderr.contains(" serving: ") && stderr.contains("\"message\":\"stopped\""),
        "{stderr}"
    );
    assert!(
        levels.contains_key("INFO") && levels.contains_key("DEBUG"),
        "{levels:?}"
    );
    assert!(!stderr.contains(API_KEY), "{stderr}");
}

#[test]
fn bad_values_stop_startup_with_one_line_naming_the_variable() {
    for (name, value, accepted) in [
        ("FLOODGATE_ACCESS_LOG", "yes", "expected off, text or json"),
        ("FLOODGATE_LOG_FORMAT", "xml", "expected text or json"),
    ] {
        let out = Binary::command(&[(name, value)]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            stderr,
            format!("floodgate: error: {name}=\"{value}\": {accepted}\n"),
            "{name}={value}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn metrics_report_dropped_lines_only_when_the_access_log_is_on() {
    let up = upstream().route("/hello", "hello").run();
    let upstream_url = format!("http://{}", up.addr());
    let scrape = |access_log: &str| {
        let mut fg = Binary::start_capturing(&[
            ("FLOODGATE_UPSTREAM", upstream_url.as_str()),
            ("FLOODGATE_ACCESS_LOG", access_log),
        ]);
        assert_eq!(get(fg.addr, "/hello").status, 200);
        let metrics = get(fg.admin, "/metrics").text();
        let (status, stdout, stderr) = fg.stop_and_output();
        assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
        (metrics, stdout)
    };
    let (metrics, stdout) = scrape("json");
    assert!(
        metrics.contains("\nfloodgate_access_log_dropped_total 0\n"),
        "{metrics}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (metrics, stdout) = scrape("off");
    assert!(
        !metrics.contains("floodgate_access_log_dropped"),
        "{metrics}"
    );
    assert_eq!(stdout, "");
}
