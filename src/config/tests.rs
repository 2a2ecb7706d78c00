//! Loading settings: defaults, layers, and every problem at once.

use super::*;
use crate::limiter::Algorithm;

/// The default rule's first limit.
fn first(s: &Settings) -> &Limit {
    s.policy.default_limit().expect("a default limit")
}

fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

#[test]
fn defaults_are_the_documented_ones() {
    let s = Settings::default();
    assert_eq!(s.listen, "0.0.0.0:8000".parse().unwrap());
    assert_eq!(s.upstream, "http://127.0.0.1:8080");
    assert_eq!(first(&s).rate(), "10/min".parse().unwrap());
    assert_eq!(first(&s).burst().get(), 10);
    assert_eq!(s.policy.key().to_string(), "ip");
    assert!(s.trusted_proxies.is_empty());
    assert_eq!(s.ipv6_prefix, 64);
    assert_eq!(s.headers, HeaderStyle::Ietf);
    assert_eq!(s.max_keys, 1_000_000);
    assert_eq!(s.backend, BackendKind::Memory);
    assert_eq!(s.redis.url, "redis://127.0.0.1:6379/");
    assert_eq!(s.redis.prefix, "floodgate:");
    assert_eq!(s.redis.timeout, Duration::from_millis(50));
    assert_eq!(s.redis.failure, Fallback::Local);
    assert_eq!(s.admin_listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(s.upstream_timeout, Duration::from_secs(30));
    assert_eq!(s.client_timeout, Duration::from_secs(60));
    assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(s.send_timeout, Duration::from_secs(30));
    assert_eq!(s.websocket_idle_timeout, Duration::from_secs(600));
    assert_eq!(s.max_connections, 10_000);
    assert!(s.workers >= 1);
    assert_eq!(s.host_header, HostHeader::Client);
    assert!(!s.upstream_reuse_after_body);
    assert_eq!(s.access_log, None);
    assert_eq!(s.log_format, LogFormat::Text);
}

#[test]
fn log_formats_are_read_and_bad_ones_named() {
    let s = load(&[
        ("FLOODGATE_ACCESS_LOG", "JSON"),
        ("FLOODGATE_LOG_FORMAT", "json"),
    ])
    .unwrap();
    assert_eq!(s.access_log, Some(LogFormat::Json));
    assert_eq!(s.log_format, LogFormat::Json);
    assert!(
        s.summary().ends_with(" access_log=json log_format=json"),
        "{}",
        s.summary()
    );
    let s = load(&[("FLOODGATE_ACCESS_LOG", "text")]).unwrap();
    assert_eq!(s.access_log, Some(LogFormat::Text));
    assert_eq!(
        load(&[("FLOODGATE_ACCESS_LOG", "off")]).unwrap().access_log,
        None
    );
    assert!(!Settings::default().summary().contains("log"));

    let err = load(&[
        ("FLOODGATE_ACCESS_LOG", "yes"),
        ("FLOODGATE_LOG_FORMAT", "xml"),
    ])
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            "FLOODGATE_ACCESS_LOG=\"yes\": expected off, text or json",
            "FLOODGATE_LOG_FORMAT=\"xml\": expected text or json",
        ]
    );
}

#[test]
fn every_key_is_in_the_shipped_file() {
    for key in KEYS {
        assert!(
            DEFAULT_TOML
                .lines()
                .any(|l| l.starts_with(&format!("{key} = "))),
            "settings/default.toml lacks {key}"
        );
    }
}

#[test]
fn environment_overrides() {
    let s = load(&[
        ("FLOODGATE_RATE", "100/10s"),
        ("FLOODGATE_BURST", "20"),
        ("FLOODGATE_KEY", "header:X-Api-Key"),
        ("FLOODGATE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
        ("FLOODGATE_UPSTREAM", "http://web:80/"),
        ("FLOODGATE_WORKERS", "3"),
        ("UNRELATED", "ignored"),
    ])
    .unwrap();
    assert_eq!(first(&s).rate(), "100/10s".parse().unwrap());
    assert_eq!(first(&s).burst().get(), 20);
    assert_eq!(s.policy.key().to_string(), "header:x-api-key");
    assert_eq!(s.trusted_proxies.len(), 2);
    assert_eq!(s.upstream, "http://web:80/");
    assert_eq!(s.workers, 3);
}

#[test]
fn burst_defaults_to_the_rate_count_and_empty_means_unset() {
    let s = load(&[("FLOODGATE_RATE", "100/s"), ("FLOODGATE_BURST", "")]).unwrap();
    assert_eq!(first(&s).burst().get(), 100);
}

#[test]
fn every_problem_is_reported_at_once_naming_variable_and_value() {
    let err = load(&[
        ("FLOODGATE_RATE", "10/mn"),
        ("FLOODGATE_BURST", "0"),
        ("FLOODGATE_UPSTREAM", "ftp://x"),
        ("FLOODGATE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("FLOODGATE_BACKEND", "postgres"),
        ("FLOODGATE_KEY", "cookie:sid"),
        ("FLOODGATE_LISTEN", "nowhere"),
        ("FLOODGATE_RAET", "10/min"),
    ])
    .unwrap_err();
    let lines = &err.problems;
    assert_eq!(lines.len(), 8, "{err}");
    let has = |needle: &str| {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no {needle:?} in\n{err}"
        )
    };
    has("FLOODGATE_RATE=\"10/mn\": unknown period unit \"mn\"");
    has("FLOODGATE_BURST=\"0\": expected a whole number");
    has("FLOODGATE_UPSTREAM=\"ftp://x\": the scheme must be http");
    has("FLOODGATE_TRUSTED_PROXIES=\"10.0.0.0/33\"");
    has("FLOODGATE_BACKEND=\"postgres\": expected memory or redis");
    has("FLOODGATE_KEY=\"cookie:sid\": expected ip or header:<name>");
    has("FLOODGATE_LISTEN=\"nowhere\": expected address:port");
    has("FLOODGATE_RAET: unknown setting");
}

#[test]
fn files_layer_between_defaults_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("f.toml");
    std::fs::write(
        &toml,
        "rate = \"5/s\"\nburst = 7\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n",
    )
    .unwrap();
    let s = load(&[
        ("FLOODGATE_CONFIG", toml.to_str().unwrap()),
        ("FLOODGATE_BURST", "9"),
    ])
    .unwrap();
    assert_eq!(first(&s).rate(), "5/s".parse().unwrap());
    assert_eq!(first(&s).burst().get(), 9, "environment wins over the file");
    assert_eq!(s.trusted_proxies.len(), 2);
    assert_eq!(s.config_file.as_deref(), Some(toml.as_path()));

    let yaml = dir.path().join("f.yaml");
    std::fs::write(&yaml, "rate: 3/min\nkey: header:x-api-key\n").unwrap();
    let s = load(&[("FLOODGATE_CONFIG", yaml.to_str().unwrap())]).unwrap();
    assert_eq!(first(&s).rate(), "3/min".parse().unwrap());
    assert_eq!(first(&s).burst().get(), 3);
}

#[test]
fn file_problems_name_the_file_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("bad.toml");
    std::fs::write(&toml, "rate = \"fast\"\nraet = \"1/s\"\n").unwrap();
    let err = load(&[("FLOODGATE_CONFIG", toml.to_str().unwrap())]).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("rate = \"fast\" in {}", toml.display())),
        "{err}"
    );
    assert!(err.to_string().contains("\"raet\" in"), "{err}");
}

#[test]
fn missing_or_malformed_files_are_errors() {
    let err = load(&[("FLOODGATE_CONFIG", "/nonexistent/floodgate.toml")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("FLOODGATE_CONFIG=/nonexistent/floodgate.toml"),
        "{err}"
    );
    let err = load(&[("FLOODGATE_CONFIG", "/etc/floodgate.ini")]).unwrap_err();
    assert!(err.to_string().contains(".toml, .yaml or .yml"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("broken.toml");
    std::fs::write(&toml, "rate = \n").unwrap();
    assert!(load(&[("FLOODGATE_CONFIG", toml.to_str().unwrap())]).is_err());
}

#[test]
fn upstream_reuse_after_body_is_a_bool() {
    assert!(
        load(&[("FLOODGATE_UPSTREAM_REUSE_AFTER_BODY", "TRUE")])
            .unwrap()
            .upstream_reuse_after_body
    );
    let err = load(&[("FLOODGATE_UPSTREAM_REUSE_AFTER_BODY", "yes")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "FLOODGATE_UPSTREAM_REUSE_AFTER_BODY=\"yes\": expected true or false"
    );
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("reuse.toml");
    std::fs::write(&toml, "upstream_reuse_after_body = true\n").unwrap();
    assert!(
        load(&[("FLOODGATE_CONFIG", toml.to_str().unwrap())])
            .unwrap()
            .upstream_reuse_after_body
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("5 fortnights").is_err());
}

#[test]
fn body_sizes() {
    assert_eq!(Settings::default().max_body, None, "unlimited by default");
    assert_eq!(parse_size("1048576"), Ok(Some(1_048_576)));
    assert_eq!(parse_size("512k"), Ok(Some(512 * 1024)));
    assert_eq!(parse_size("10M"), Ok(Some(10 << 20)));
    assert_eq!(parse_size("1g"), Ok(Some(1 << 30)));
    assert_eq!(parse_size("0"), Ok(None));
    for bad in ["10mb", "1.5m", "-1", "m", "lots", "99999999999999999999g"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    let s = load(&[("FLOODGATE_MAX_BODY", "10m")]).unwrap();
    assert_eq!(s.max_body, Some(10 << 20));
    let err = load(&[("FLOODGATE_MAX_BODY", "10 MB")]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.to_string()
            .starts_with("FLOODGATE_MAX_BODY=\"10 MB\": expected a size in bytes"),
        "{err}"
    );
}

#[test]
fn redis_passwords_never_show() {
    assert_eq!(
        redact_url("redis://:hunter2@host:6379/0"),
        "redis://:***@host:6379/0"
    );
    assert_eq!(
        redact_url("rediss://user:hunter2@host"),
        "rediss://user:***@host"
    );
    assert_eq!(redact_url("redis://host:6379/"), "redis://host:6379/");
    let err = load(&[("FLOODGATE_REDIS_URL", "http://:hunter2@host")]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let s = load(&[
        ("FLOODGATE_REDIS_URL", "redis://:hunter2@host:6379/0"),
        ("FLOODGATE_BACKEND", "redis"),
    ])
    .unwrap();
    assert!(!s.summary().contains("hunter2"));
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn limits_that_would_overflow_time_are_refused() {
    let err = load(&[("FLOODGATE_RATE", "1/d"), ("FLOODGATE_BURST", "300000")]).unwrap_err();
    assert!(
        err.to_string()
            .contains("FLOODGATE_BURST=\"300000\": with this rate a burst may be at most 36501"),
        "{err}"
    );
    assert!(load(&[("FLOODGATE_RATE", "1/d"), ("FLOODGATE_BURST", "36501")]).is_ok());
    let err = load(&[("FLOODGATE_RATE", "2000000/s")]).unwrap_err();
    assert!(
        err.to_string().contains("at most 1000000 per second"),
        "{err}"
    );
}

#[test]
fn variables_are_upper_case_and_prefixes_cannot_break_hash_tags() {
    let err = load(&[("FLOODGATE_rate", "1/s")]).unwrap_err();
    assert!(
        err.to_string().contains("FLOODGATE_rate: unknown setting"),
        "{err}"
    );
    let err = load(&[("FLOODGATE_REDIS_PREFIX", "app{1}:")]).unwrap_err();
    assert!(err.to_string().contains("must not contain { or }"), "{err}");
    let err = load(&[("FLOODGATE_REDIS_TIMEOUT", "0.1ms")]).unwrap_err();
    assert!(err.to_string().contains("at least 1ms"), "{err}");
}

#[test]
fn key_header_cannot_be_hop_by_hop() {
    for header in [
        "connection",
        "x-forwarded-for",
        "forwarded",
        "x_api_key",
        "host",
    ] {
        let err = load(&[("FLOODGATE_KEY", &format!("header:{header}"))]).unwrap_err();
        assert!(err.to_string().contains("dropped or rewritten"), "{err}");
    }
}

#[test]
fn connection_bounds_are_parsed_and_bad_ones_named() {
    let s = load(&[
        ("FLOODGATE_SEND_TIMEOUT", "5s"),
        ("FLOODGATE_WEBSOCKET_IDLE_TIMEOUT", "1h"),
        ("FLOODGATE_MAX_CONNECTIONS", "64"),
    ])
    .unwrap();
    assert_eq!(s.send_timeout, Duration::from_secs(5));
    assert_eq!(s.websocket_idle_timeout, Duration::from_secs(3600));
    assert_eq!(s.max_connections, 64);

    let err = load(&[
        ("FLOODGATE_SEND_TIMEOUT", "0s"),
        ("FLOODGATE_WEBSOCKET_IDLE_TIMEOUT", "forever"),
        ("FLOODGATE_MAX_CONNECTIONS", "0"),
    ])
    .unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
    for needle in [
        "FLOODGATE_SEND_TIMEOUT=\"0s\": expected a positive duration",
        "FLOODGATE_WEBSOCKET_IDLE_TIMEOUT=\"forever\": expected a positive duration",
        "FLOODGATE_MAX_CONNECTIONS=\"0\": expected a whole number from 1 to 1073741824",
    ] {
        assert!(
            err.problems.iter().any(|l| l.contains(needle)),
            "no {needle:?} in\n{err}"
        );
    }
}

#[test]
fn the_startup_line_spells_values_as_settings_do() {
    let s = load(&[("FLOODGATE_WORKERS", "2")]).unwrap();
    assert_eq!(
        s.summary(),
        "listen=0.0.0.0:8000 upstream=http://127.0.0.1:8080 rate=10/min burst=10 key=ip \
         trusted_proxies=none backend=memory max_keys=1000000 headers=ietf host_header=client \
         admin_listen=127.0.0.1:9000 workers=2 upstream_timeout=30s client_timeout=1m \
         send_timeout=30s websocket_idle_timeout=10m max_connections=10000 max_body=0 \
         upstream_reuse_after_body=false"
    );
    let s = load(&[
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", "redis://:hunter2@cache:6379/1"),
        ("FLOODGATE_REDIS_FAILURE", "Closed"),
        ("FLOODGATE_REDIS_TIMEOUT", "1.5s"),
        ("FLOODGATE_HEADERS", "legacy"),
        ("FLOODGATE_HOST_HEADER", "upstream"),
        ("FLOODGATE_UPSTREAM_TIMEOUT", "2h"),
        ("FLOODGATE_CLIENT_TIMEOUT", "90"),
    ])
    .unwrap();
    let line = s.summary();
    for part in [
        "backend=redis redis_url=redis://:***@cache:6379/1 redis_timeout=1500ms redis_failure=closed ",
        "headers=legacy host_header=upstream ",
        "upstream_timeout=2h client_timeout=90s",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    let s = load(&[
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_CLUSTER", "redis://a:7000,redis://b:7001"),
        ("FLOODGATE_REDIS_FAILURE", "open"),
        ("FLOODGATE_HEADERS", "none"),
    ])
    .unwrap();
    let line = s.summary();
    assert!(
        line.contains(
            "backend=redis redis_cluster=redis://a:7000,redis://b:7001 redis_timeout=50ms redis_failure=open "
        ),
        "{line}"
    );
    assert!(line.contains("headers=none "), "{line}");
    for debug_name in [
        "Ietf", "Legacy", "Local", "Open", "Closed", "Client", "Upstream",
    ] {
        assert!(!line.contains(debug_name), "{debug_name} in {line}");
    }
    assert_eq!(duration_text(Duration::from_micros(500)), "0.5ms");
}

// === rules and the policy ===

fn with_file(name: &str, text: &str, vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let mut env: Vec<(String, String)> = vec![(CONFIG_VAR.into(), path.display().to_string())];
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Settings::load(env)
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("settings/examples")
}

fn example(name: &str) -> Settings {
    let path = examples().join(name);
    Settings::load([(CONFIG_VAR.to_owned(), path.display().to_string())])
        .unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

#[test]
fn the_worked_example_parses_alike_from_toml_and_yaml() {
    let toml = example("rules.toml");
    let yaml = example("rules.yaml");
    assert_eq!(toml.policy.rules, yaml.policy.rules);
    let rules = &toml.policy.rules;
    let names: Vec<&str> = rules.rules().map(|r| &*r.name).collect();
    assert_eq!(names, ["login", "api"]);
    let limits: Vec<(&str, &str)> = rules
        .limits()
        .map(|(rule, l)| (&*rule.name, l.limit.name()))
        .collect();
    assert_eq!(
        limits,
        [
            ("login", "login.1"),
            ("login", "daily"),
            ("api", "api.1"),
            ("api", "api-total"),
            ("default", "default"),
        ]
    );
    let login = rules.rules().next().unwrap();
    assert_eq!(login.limits[0].limit.burst().get(), 5);
    assert_eq!(login.limits[1].limit.algorithm(), Algorithm::FixedWindow);
    assert_eq!(login.allow, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    assert_eq!(login.deny, ["203.0.113.0/24".parse::<IpNet>().unwrap()]);
    let api = rules.rules().nth(1).unwrap();
    assert_eq!(api.key.to_string(), "header:x-api-key+ip");
    assert_eq!(api.limits[1].key_spec(api).to_string(), "global");
    assert_eq!(api.allow_keys, [bytes::Bytes::from_static(b"office-key")]);
    use actix_web::http::Method;
    assert_eq!(
        &*rules.select(&Method::POST, "/%6Cogin", None).name,
        "login"
    );
    assert_eq!(&*rules.select(&Method::GET, "/login", None).name, "default");
    assert_eq!(
        &*rules.select(&Method::GET, "/api/x", Some("h:1")).name,
        "api"
    );
    assert!(
        toml.summary().ends_with(" rules=login,api"),
        "{}",
        toml.summary()
    );
}

#[test]
fn rules_without_a_key_take_floodgate_key_and_without_limits_are_unlimited() {
    let s = with_file(
        "r.toml",
        "[[rules]]\nname = \"health\"\nmatch = { path = \"/healthz\" }\n",
        &[("FLOODGATE_KEY", "header:x-api-key")],
    )
    .unwrap();
    let health = s.policy.rules.rules().next().unwrap();
    assert_eq!(health.key.to_string(), "header:x-api-key");
    assert!(health.limits.is_empty());
}

#[test]
fn every_rule_problem_is_reported_at_once_naming_rule_field_and_value() {
    let text = r#"
[[rules]]
name = "login"
match = { path = "login", methods = ["POST", "GE T"], host = "*.exa mple.com", hots = "x" }
key = "cookie:sid"
limits = [
  { rate = "5/min", brust = 5 },
  { rate = "5/mn" },
  { rate = "1/s", algorithm = "leaky" },
  { rate = "1/s", algorithm = "fixed_window", burst = 3 },
  { rate = "1/s", burst = 0 },
]
allow = ["10.0.0.0/33"]
deny = ["nowhere"]
shadow = "yes"
colour = "red"

[[rules]]
name = "Bad Name"

[[rules]]
name = "default"

[[rules]]
name = "api"

[[rules]]
name = "api"

[[rules]]
match = { path = "/x" }
"#;
    let err = with_file("bad.toml", text, &[]).unwrap_err();
    let has = |needle: &str| {
        assert!(
            err.problems.iter().any(|l| l.contains(needle)),
            "no {needle:?} in\n{err}"
        )
    };
    has("rule \"login\" in ");
    has("match.path = \"login\": expected a path starting with /");
    has("match.methods = \"GE T\": expected an HTTP method");
    has("match.host = \"*.exa mple.com\": expected a host name");
    has("\"hots\": unknown field; did you mean host?");
    has("key = \"cookie:sid\": expected ip or header:<name>");
    has("limits[0].\"brust\": unknown field; did you mean burst?");
    has("limits[1].rate = \"5/mn\": unknown period unit \"mn\"");
    has(
        "limits[2].algorithm = \"leaky\": unknown algorithm \"leaky\"; expected gcra, sliding_window or fixed_window",
    );
    has("limits[3].burst = 3: burst belongs to gcra alone");
    has("limits[4].burst = 0: expected a whole number");
    has("allow = \"10.0.0.0/33\": expected a CIDR");
    has("deny = \"nowhere\": expected a CIDR");
    has("shadow = \"yes\": expected true or false");
    has("\"colour\": unknown field; known fields: name, match");
    has("rules[1] in ");
    has("name = \"Bad Name\": expected lower-case letters, digits, _ and - only");
    has("rule name \"default\" is reserved");
    has("rule name \"api\" is used twice");
    has("rules[5] in ");
    has("name: missing; every rule needs a unique name");
    assert_eq!(err.problems.len(), 18, "{err}");
    for line in &err.problems {
        assert!(line.contains("bad.toml"), "names the file: {line}");
    }
}

#[test]
fn yaml_rule_problems_read_the_same() {
    let err = with_file(
        "bad.yaml",
        "rules:\n  - name: login\n    limits:\n      - rate: 5/min\n        brust: 5\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].contains("rule \"login\" in ")
            && err.problems[0].contains("limits[0].\"brust\": unknown field; did you mean burst?"),
        "{err}"
    );
    let err = with_file("bad.toml", "rules = \"login\"\n", &[]).unwrap_err();
    assert!(
        err.to_string().contains("expected a list of rules"),
        "{err}"
    );
}

#[test]
fn rules_are_only_read_from_a_file() {
    let err = load(&[("FLOODGATE_RULES", "x")]).unwrap_err();
    assert!(
        err.to_string().contains("FLOODGATE_RULES: unknown setting"),
        "{err}"
    );
}

#[test]
fn floodgate_rate_takes_a_list_and_burst_applies_to_the_first() {
    let s = load(&[
        ("FLOODGATE_RATE", "10/s, 1000/day"),
        ("FLOODGATE_BURST", "20"),
    ])
    .unwrap();
    let limits = &s.policy.rules.default_rule().limits;
    let shown: Vec<(&str, String, u32)> = limits
        .iter()
        .map(|l| {
            (
                l.limit.name(),
                l.limit.rate().to_string(),
                l.limit.burst().get(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("default.1", "10/s".to_owned(), 20),
            ("default.2", "1000/d".to_owned(), 1000)
        ]
    );
    assert!(
        s.summary().contains("rate=10/s,1000/d burst=20 "),
        "{}",
        s.summary()
    );
    let err = load(&[("FLOODGATE_RATE", "10/s,1000/dy")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("FLOODGATE_RATE=\"10/s,1000/dy\": \"1000/dy\": unknown period unit"),
        "{err}"
    );
}

#[test]
fn floodgate_rate_none_means_unmatched_requests_are_not_limited() {
    let s = load(&[("FLOODGATE_RATE", "none")]).unwrap();
    assert!(s.policy.rules.default_rule().limits.is_empty());
    assert!(
        s.summary().contains("rate=none burst=none "),
        "{}",
        s.summary()
    );
    let err = load(&[("FLOODGATE_RATE", "none"), ("FLOODGATE_BURST", "5")]).unwrap_err();
    assert!(
        err.to_string().contains("no limit to give a burst"),
        "{err}"
    );
}

#[test]
fn floodgate_algorithm_sets_the_default_rules_algorithm() {
    let s = load(&[
        ("FLOODGATE_ALGORITHM", "Sliding_Window"),
        ("FLOODGATE_RATE", "5/s,50/min"),
    ])
    .unwrap();
    for l in &s.policy.rules.default_rule().limits {
        assert_eq!(l.limit.algorithm(), Algorithm::SlidingWindow);
    }
    assert!(
        s.summary().contains(" algorithm=sliding_window"),
        "{}",
        s.summary()
    );
    let err = load(&[("FLOODGATE_ALGORITHM", "leaky"), ("FLOODGATE_BURST", "3")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "FLOODGATE_ALGORITHM=\"leaky\": expected gcra, sliding_window or fixed_window"
    );
    let err = load(&[
        ("FLOODGATE_ALGORITHM", "fixed_window"),
        ("FLOODGATE_BURST", "3"),
    ])
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("FLOODGATE_BURST=\"3\": burst belongs to gcra alone"),
        "{err}"
    );
}

#[test]
fn global_lists_come_from_the_environment() {
    let s = load(&[
        ("FLOODGATE_ALLOW", "10.0.0.0/8, 192.168.1.1"),
        ("FLOODGATE_DENY", "203.0.113.0/24"),
        ("FLOODGATE_SHADOW", "TRUE"),
        ("FLOODGATE_KEY", "header:x-api-key+ip"),
    ])
    .unwrap();
    let global = s.policy.rules.global();
    assert_eq!(global.allow.len(), 2);
    assert_eq!(global.deny, ["203.0.113.0/24".parse::<IpNet>().unwrap()]);
    assert!(global.shadow);
    assert_eq!(s.policy.key().to_string(), "header:x-api-key+ip");
    let err = load(&[("FLOODGATE_DENY", "nowhere"), ("FLOODGATE_SHADOW", "maybe")]).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.problems[0].starts_with("FLOODGATE_DENY=\"nowhere\": \"nowhere\" is not a CIDR"),
        "{err}"
    );
    assert_eq!(
        err.problems[1],
        "FLOODGATE_SHADOW=\"maybe\": expected true or false"
    );
    let s = load(&[("FLOODGATE_DENY", "203.0.113.0/24")]).unwrap();
    assert!(
        s.summary().ends_with(" deny=203.0.113.0/24"),
        "{}",
        s.summary()
    );
}

#[test]
fn reload_rereads_the_file_not_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        "[[rules]]\nname = \"a\"\nlimits = [{ rate = \"1/s\" }]\n",
    )
    .unwrap();
    let s = load(&[
        (CONFIG_VAR, path.to_str().unwrap()),
        ("FLOODGATE_RATE", "7/min"),
    ])
    .unwrap();
    assert!(
        !format!("{:?}", s.env).contains("7/min"),
        "values stay out of Debug"
    );
    std::fs::write(
        &path,
        "[[rules]]\nname = \"b\"\nlimits = [{ rate = \"2/s\" }]\n",
    )
    .unwrap();
    let rules = s.reload().unwrap();
    let names: Vec<&str> = rules.rules().map(|r| &*r.name).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(
        rules.default_rule().limits[0].limit.rate(),
        "7/min".parse().unwrap(),
        "the environment as it was at startup"
    );
    std::fs::write(
        &path,
        "[[rules]]\nname = \"b\"\nlimits = [{ rate = \"2/s\", brust = 1 }]\n",
    )
    .unwrap();
    let err = reload(&s.env).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(err.problems[0].contains("did you mean burst?"), "{err}");
}

#[test]
fn an_admin_token_is_kept_hidden_and_a_bad_one_stops_startup_without_showing_it() {
    assert_eq!(Settings::default().admin_token, None);
    let secret = "0123456789abcdef-admin";
    let s = load(&[("FLOODGATE_ADMIN_TOKEN", secret)]).unwrap();
    let token = s.admin_token.clone().expect("a token");
    assert!(token.matches(secret.as_bytes()));
    assert!(!format!("{s:?}").contains(secret));
    assert!(!s.summary().contains(secret));
    assert!(s.summary().ends_with(" admin_token=set"), "{}", s.summary());

    let err = load(&[("FLOODGATE_ADMIN_TOKEN", "")]).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "FLOODGATE_ADMIN_TOKEN=\"\": set but empty; unset it to serve the admin API to loopback \
             peers only, or set a secret of at least 16 characters"
        ]
    );
    assert!(load(&[("FLOODGATE_ADMIN_TOKEN", "   ")]).is_err());
    let err = load(&[("FLOODGATE_ADMIN_TOKEN", "hunter2")]).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "FLOODGATE_ADMIN_TOKEN=\"<hidden>\": 7 characters; expected a secret of at least 16 \
             (e.g. openssl rand -hex 32)"
        ]
    );
    let err = load(&[("FLOODGATE_ADMIN_TOKEN", "a token with spaces")]).unwrap_err();
    assert!(!err.to_string().contains("with spaces"), "{err}");
    assert!(
        err.problems[0].starts_with("FLOODGATE_ADMIN_TOKEN=\"<hidden>\": expected visible ASCII")
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    std::fs::write(&path, "admin_token = \"\"\n").unwrap();
    let err = load(&[("FLOODGATE_CONFIG", path.to_str().unwrap())]).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("admin_token = \"\" in ")
            && err.problems[0].contains("set but empty"),
        "{err}"
    );
}
