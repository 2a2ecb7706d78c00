use std::collections::HashMap;
use std::num::NonZeroU32;

use actix_web::http::StatusCode;

use super::*;
use crate::limiter::{Decision, Limit, MemoryBackend};
use crate::observe::{Exchange, UpstreamTiming};

/// Every sample of an exposition: series (name and labels, as written) to
/// value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn limit(name: &str) -> Limit {
    Limit::new(
        name,
        "10/min".parse().unwrap(),
        NonZeroU32::new(10).unwrap(),
    )
}

fn allowed() -> Decision {
    Decision::Allowed {
        remaining: 1,
        reset_after: Duration::from_secs(1),
    }
}

fn limited(retry: u64) -> Decision {
    Decision::Limited {
        retry_after: Duration::from_secs(retry),
        reset_after: Duration::from_secs(retry),
    }
}

fn verdict(rule: &str, shadow: bool, decisions: &[Decision], by: DecidedBy) -> Verdict {
    let limits = [limit("burst"), limit("hourly")];
    let mut v = Verdict::new(rule.into(), shadow);
    v.decided(&limits, decisions, by);
    v
}

#[test]
fn each_request_is_counted_once_by_rule_decision_and_refusing_limit() {
    let metrics = Arc::new(Metrics::default());
    let api = metrics.rule(&"api".into(), ["burst", "hourly"]);
    let other = metrics.rule(&"other".into(), ["burst", "hourly"]);
    for _ in 0..3 {
        api.record(&verdict(
            "api",
            false,
            &[allowed(), allowed()],
            DecidedBy::Backend,
        ));
    }
    api.record(&verdict(
        "api",
        false,
        &[allowed(), limited(30)],
        DecidedBy::Backend,
    ));
    api.record(&verdict(
        "api",
        false,
        &[limited(1), allowed()],
        DecidedBy::Local,
    ));
    other.record(&verdict(
        "other",
        true,
        &[limited(5), allowed()],
        DecidedBy::Backend,
    ));
    let mut denied = Verdict::new("api".into(), false);
    denied.outcome = Outcome::Denied;
    api.record(&denied);
    let mut open = Verdict::new("api".into(), false);
    open.outcome = Outcome::Undecided;
    open.decided_by = DecidedBy::FailOpen;
    api.record(&open);

    let s = samples(&metrics.render(None));
    let requests = |rule: &str, decision: &str, by: &str| {
        let series = format!(
            "floodgate_requests_total{{rule=\"{rule}\",decision=\"{decision}\",decided_by=\"{by}\"}}"
        );
        *s.get(&series).unwrap_or_else(|| panic!("no {series}"))
    };
    assert_eq!(requests("api", "allowed", "backend"), 3.0);
    assert_eq!(requests("api", "limited", "backend"), 1.0);
    assert_eq!(requests("api", "limited", "local"), 1.0);
    assert_eq!(requests("api", "denied", "none"), 1.0);
    assert_eq!(requests("api", "undecided", "fail_open"), 1.0);
    assert_eq!(
        requests("api", "undecided", "fail_closed"),
        0.0,
        "expected pairs are shown at 0"
    );
    assert_eq!(requests("other", "shadow_limited", "backend"), 1.0);
    assert_eq!(requests("other", "allowed", "backend"), 0.0);
    assert!(
        !s.keys()
            .any(|k| k.contains("decision=\"denied\",decided_by=\"backend\"")),
        "a pair the gate never makes is not shown while it is zero"
    );

    let refusals = |rule: &str, limit: &str, decision: &str| {
        s[&format!(
            "floodgate_limit_refusals_total{{rule=\"{rule}\",limit=\"{limit}\",decision=\"{decision}\"}}"
        )]
    };
    assert_eq!(refusals("api", "hourly", "limited"), 1.0);
    assert_eq!(refusals("api", "burst", "limited"), 1.0);
    assert_eq!(refusals("other", "burst", "shadow_limited"), 1.0);
    assert_eq!(refusals("other", "burst", "limited"), 0.0);
    let total: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("floodgate_requests_total{rule=\"api\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 7.0, "each request once");
}

#[test]
fn a_reloaded_rule_keeps_its_series() {
    let metrics = Metrics::default();
    let before = metrics.rule(&"api".into(), ["burst"]);
    before.record(&verdict(
        "api",
        false,
        &[allowed(), allowed()],
        DecidedBy::Backend,
    ));
    let after = metrics.rule(&"api".into(), ["burst", "hourly"]);
    assert!(Arc::ptr_eq(&before.requests, &after.requests));
    assert!(Arc::ptr_eq(&before.refusals[0], &after.refusals[0]));
    assert_eq!(after.refusals.len(), 2);
    assert_eq!(after.requests.get(0), 1);
}

#[test]
fn answers_fill_the_latency_histograms_and_upstream_classes() {
    let metrics = Arc::new(Metrics::default());
    let answer = |status: u16, upstream: Option<u64>| {
        metrics.answered(&Exchange {
            verdict: None,
            status: StatusCode::from_u16(status).unwrap(),
            elapsed: Duration::from_millis(2),
            upstream: upstream.map(|ms| UpstreamTiming {
                first_byte: Duration::from_millis(ms),
            }),
        })
    };
    answer(200, Some(1));
    answer(204, Some(1));
    answer(503, Some(1));
    answer(429, None);
    answer(403, None);
    metrics.decided_in(Duration::from_micros(50));
    let s = samples(&metrics.render(None));
    assert_eq!(s["floodgate_request_duration_seconds_count"], 5.0);
    assert_eq!(
        s["floodgate_request_duration_seconds_bucket{le=\"0.0025\"}"],
        5.0
    );
    assert_eq!(
        s["floodgate_request_duration_seconds_bucket{le=\"0.001\"}"],
        0.0
    );
    assert!((s["floodgate_request_duration_seconds_sum"] - 0.010).abs() < 1e-9);
    assert_eq!(s["floodgate_upstream_duration_seconds_count"], 3.0);
    assert_eq!(
        s["floodgate_upstream_duration_seconds_bucket{le=\"+Inf\"}"],
        3.0
    );
    assert_eq!(s["floodgate_backend_decision_duration_seconds_count"], 1.0);
    assert_eq!(
        s["floodgate_backend_decision_duration_seconds_bucket{le=\"0.0001\"}"],
        1.0
    );
    assert_eq!(s["floodgate_upstream_responses_total{class=\"2xx\"}"], 2.0);
    assert_eq!(s["floodgate_upstream_responses_total{class=\"5xx\"}"], 1.0);
    assert_eq!(s["floodgate_upstream_responses_total{class=\"4xx\"}"], 0.0);
}

#[test]
fn the_exposition_is_openmetrics_text_with_build_info_and_backend_state() {
    let metrics = Arc::new(Metrics::default());
    metrics.upstream_error(UpstreamError::Refused);
    metrics.upstream_error(UpstreamError::Truncated);
    metrics.upstream_error(UpstreamError::Truncated);
    metrics.backend_error();
    metrics.reloaded(true);
    metrics.reloaded(false);
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new(100));
    let text = metrics.render(Some(backend));
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE floodgate_requests counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE floodgate_request_duration_seconds histogram\n"),
        "{text}"
    );
    let s = samples(&text);
    let version = format!(
        "floodgate_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(s[&version], 1.0);
    assert_eq!(s["floodgate_upstream_errors_total{kind=\"refused\"}"], 1.0);
    assert_eq!(
        s["floodgate_upstream_errors_total{kind=\"truncated\"}"],
        2.0
    );
    assert_eq!(s["floodgate_upstream_errors_total{kind=\"timeout\"}"], 0.0);
    assert_eq!(s["floodgate_backend_errors_total"], 1.0);
    assert_eq!(s["floodgate_rules_reloads_total{result=\"ok\"}"], 1.0);
    assert_eq!(s["floodgate_rules_reloads_total{result=\"refused\"}"], 1.0);
    assert_eq!(s["floodgate_rules_last_reload_success"], 0.0);
    assert_eq!(
        s["floodgate_backend_health{backend=\"memory\",state=\"up\"}"],
        1.0
    );
    assert_eq!(
        s["floodgate_backend_health{backend=\"memory\",state=\"down\"}"],
        0.0
    );
    assert_eq!(s["floodgate_backend_keys"], 0.0);
    assert!(
        !text.contains("floodgate_redis_"),
        "no Redis series for memory"
    );
}
