//! The live status page: `GET /` (one HTML page built into the binary, no
//! external resources) and `GET /status.json`, the document it refreshes
//! from every [`REFRESH_SECS`] seconds.
//!
//! ```json
//! {
//!   "version": 1,
//!   "generated_at": 1764770000,
//!   "refresh_seconds": 2,
//!   "totals": { "allowed": 10, "limited": 7, "shadow_limited": 0, "allow_listed": 0,
//!               "denied": 0, "bad_key": 0, "undecided": 0 },
//!   "series": { "until": 1764769999, "seconds": 180 },
//!   "rules": [ { "rule": "login", "in_force": true,
//!                "totals": { "allowed": 4, "limited": 5, … },
//!                "allowed": [0, 0, …, 4], "limited": [0, 0, …, 5] } ],
//!   "top_limited": { "minutes": 5, "clients": [ { "client": "ip:203.0.113.7", "limited": 3, "error": 0 } ] },
//!   "backend": { "kind": "redis", "state": "degraded", "note": "…", "failure_policy": "local" },
//!   "upstream_errors": { "connect": 0, "timeout": 0 },
//!   "rules_in_force": { … the `GET /rules` document … }
//! }
//! ```
//!
//! `totals` count since start what `floodgate_requests_total` counts by
//! `decision` (they are equal for the same traffic); each rule's `allowed`
//! and `limited` arrays hold one count per second, oldest first, ending with
//! the complete second `series.until`. Rules seen since start but no longer
//! in force (after a reload) stay, with `in_force: false`. Clients are named
//! as Redis key names name them: an address in clear, an API key only as
//! its fingerprint.
//!
//! Both routes are behind the admin guard ([`Admin::guard`]): with
//! `FLOODGATE_ADMIN_TOKEN` set they need `Authorization: Bearer <token>`,
//! else they answer loopback peers only. The page fetches its JSON from its
//! own origin with the credentials the browser holds for it, so a
//! header-setting proxy in front of the admin listener covers both requests.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderValue};
use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use super::Admin;
use super::rules::rules_json;
use crate::limiter::{Fallback, Health};
use crate::observe::Metrics;
use crate::observe::board::{TOP_MINUTES, Totals};

/// The page, inline CSS and JavaScript included.
pub const PAGE: &str = include_str!("status.html");

/// How often the page fetches `/status.json`, in seconds.
pub const REFRESH_SECS: u64 = 2;

/// The page may run its own inline script and style, fetch from its origin
/// and nothing else: no CDN, no external font, no framing.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Adds `GET /` and `GET /status.json` (the caller wraps them in
/// [`Admin::guard`]).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page))
        .route("/status.json", web::get().to(status));
}

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .insert_header((
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_POLICY),
        ))
        .body(PAGE)
}

async fn status(admin: web::Data<Admin>) -> HttpResponse {
    let doc = status_json(&admin, Instant::now());
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .body(doc.to_string())
}

/// Upstream failures by kind, as `floodgate_upstream_errors_total` counts
/// them (the one place the page reads them from the metrics).
fn upstream_errors(metrics: &Metrics) -> Value {
    let kinds: serde_json::Map<String, Value> = metrics
        .upstream_errors()
        .map(|(kind, n)| (kind.label().to_owned(), json!(n)))
        .collect();
    Value::Object(kinds)
}

/// The `/status.json` document at `now`.
pub fn status_json(admin: &Admin, now: Instant) -> Value {
    let snapshot = admin.board.snapshot(now);
    let rules = admin.rate_limit.rules();
    let in_force: Vec<&str> = rules
        .rules()
        .chain(Some(rules.default_rule()))
        .map(|r| &*r.name)
        .collect();

    let mut totals = Totals::default();
    let mut series: Vec<Value> = Vec::with_capacity(in_force.len());
    // The rules in force first, in their order (with zeros when they saw no
    // traffic yet), then those a reload removed.
    for name in &in_force {
        match snapshot.rules.iter().find(|r| r.rule == *name) {
            Some(rule) => {
                totals += rule.totals;
                series.push(json!({
                    "rule": rule.rule, "in_force": true, "totals": rule.totals,
                    "allowed": rule.allowed, "limited": rule.limited,
                }));
            }
            None => series.push(json!({
                "rule": name, "in_force": true, "totals": Totals::default(),
                "allowed": vec![0; snapshot.seconds], "limited": vec![0; snapshot.seconds],
            })),
        }
    }
    for rule in snapshot
        .rules
        .iter()
        .filter(|r| !in_force.contains(&r.rule.as_str()))
    {
        totals += rule.totals;
        series.push(json!({
            "rule": rule.rule, "in_force": false, "totals": rule.totals,
            "allowed": rule.allowed, "limited": rule.limited,
        }));
    }

    let kind = admin.backend.kind();
    let (state, note) = match admin.backend.health() {
        Health::Up => ("up", None),
        Health::Degraded(note) => ("degraded", Some(note)),
        Health::Down(note) => ("down", Some(note)),
    };
    // The failure policy applies only where there is a store to fail.
    let failure_policy = (kind == "redis").then_some(match admin.redis_failure {
        Fallback::Local => "local",
        Fallback::Open => "open",
        Fallback::Closed => "closed",
    });
    let generated_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    json!({
        "version": 1,
        "generated_at": generated_at,
        "refresh_seconds": REFRESH_SECS,
        "totals": totals,
        "series": { "until": snapshot.until, "seconds": snapshot.seconds },
        "rules": series,
        "top_limited": { "minutes": TOP_MINUTES, "clients": snapshot.top_limited },
        "backend": {
            "kind": kind,
            "state": state,
            "note": note,
            "failure_policy": failure_policy,
        },
        "upstream_errors": upstream_errors(&admin.metrics),
        "rules_in_force": rules_json(&rules, &admin.last_reload.get(), &admin.fingerprints),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_needs_nothing_from_elsewhere() {
        // The SVG namespace is a name, not a place the page loads from.
        let page = PAGE.replace("http://www.w3.org/2000/svg", "");
        for external in ["http://", "https://", "//cdn", "@import", "src=", "url("] {
            assert!(!page.contains(external), "the page refers to {external}");
        }
        assert!(PAGE.contains("status.json"));
    }
}
