//! `GET /rules`: the rules in force, as JSON, and the
//! outcome of the last reload.
//!
//! ```json
//! {
//!   "rules": [ { "name": "login", "match": { "path": "/login", "methods": ["POST"], "host": null },
//!                "key": "ip", "shadow": false,
//!                "limits": [ { "name": "login.1", "rate": "5/min", "algorithm": "gcra", "burst": 5, "key": "ip" } ],
//!                "allow": ["10.0.0.0/8"], "allow_keys": ["<fingerprint>"], "deny": [] } ],
//!   "default": { "name": "default", … },
//!   "global": { "allow": [], "allow_keys": [], "deny": [], "shadow": false },
//!   "last_reload": { "ok": true, "at": 1764770000, "errors": [] }
//! }
//! ```
//!
//! `allow_keys` are API keys, secrets: they are shown only as their
//! fingerprints (as Redis key names carry them), never in clear.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use crate::key::Fingerprinter;
use crate::limiter::Algorithm;
use crate::policy::{Lists, Rule, Rules};

/// The outcome of the last reload (or of the startup load, before any).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastReload {
    /// Whether the file was read and its rules took effect.
    pub ok: bool,
    /// When, in Unix seconds.
    pub at: u64,
    /// One line per problem when it was refused (the old rules stayed).
    pub errors: Vec<String>,
}

impl LastReload {
    /// A success, now.
    pub fn ok() -> Self {
        LastReload {
            ok: true,
            at: now(),
            errors: Vec::new(),
        }
    }

    /// A refusal, now, for these problems.
    pub fn refused(errors: Vec<String>) -> Self {
        LastReload {
            ok: false,
            at: now(),
            errors,
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the last reload's outcome is kept (the admin listener reads it;
/// the request path never does).
#[derive(Debug)]
pub struct ReloadStatus(Mutex<LastReload>);

impl Default for ReloadStatus {
    fn default() -> Self {
        ReloadStatus(Mutex::new(LastReload::ok()))
    }
}

impl ReloadStatus {
    /// Records `outcome`.
    pub fn set(&self, outcome: LastReload) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
    }

    /// The last outcome.
    pub fn get(&self) -> LastReload {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The `/rules` document for `rules` and `last_reload`.
pub fn rules_json(rules: &Rules, last_reload: &LastReload, fingerprints: &Fingerprinter) -> Value {
    json!({
        "rules": rules.rules().map(|r| rule_json(r, fingerprints)).collect::<Vec<_>>(),
        "default": rule_json(rules.default_rule(), fingerprints),
        "global": lists_json(rules.global(), fingerprints),
        "last_reload": last_reload,
    })
}

fn rule_json(rule: &Rule, fingerprints: &Fingerprinter) -> Value {
    let limits: Vec<Value> = rule
        .limits
        .iter()
        .map(|l| {
            let limit = &l.limit;
            let burst = match limit.algorithm() {
                Algorithm::Gcra => json!(limit.burst().get()),
                _ => Value::Null,
            };
            json!({
                "name": limit.name(),
                "rate": limit.rate().to_string(),
                "algorithm": limit.algorithm().to_string(),
                "burst": burst,
                "key": l.key_spec(rule).to_string(),
            })
        })
        .collect();
    json!({
        "name": &*rule.name,
        "match": {
            "path": rule.matcher.path_prefix(),
            "methods": rule.matcher.method_list().iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "host": rule.matcher.host_pattern().map(ToString::to_string),
        },
        "key": rule.key.to_string(),
        "limits": limits,
        "allow": rule.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "allow_keys": rule.allow_keys.iter().map(|k| fingerprints.fingerprint(k).to_string()).collect::<Vec<_>>(),
        "deny": rule.deny.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "shadow": rule.shadow,
    })
}

fn lists_json(lists: &Lists, fingerprints: &Fingerprinter) -> Value {
    json!({
        "allow": lists.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "allow_keys": lists.allow_keys.iter().map(|k| fingerprints.fingerprint(k).to_string()).collect::<Vec<_>>(),
        "deny": lists.deny.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "shadow": lists.shadow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Limit;
    use crate::policy::{KeySpec, Match};
    use actix_web::http::Method;
    use std::num::NonZeroU32;

    #[test]
    fn rules_as_json_never_show_an_allowed_key() {
        let login = Rule::new("login")
            .matching(Match::any().path("/login").methods([Method::POST]))
            .limit(Limit::new(
                "login",
                "5/min".parse().unwrap(),
                NonZeroU32::new(5).unwrap(),
            ))
            .limit_by(
                Limit::window(
                    "login-all",
                    "1000/s".parse().unwrap(),
                    Algorithm::FixedWindow,
                )
                .unwrap(),
                KeySpec::global(),
            )
            .allow_keys([bytes::Bytes::from_static(b"sk_live_secret")])
            .deny(["203.0.113.0/24".parse().unwrap()]);
        let default = Rule::new("default").limit(Limit::new(
            "default",
            "10/min".parse().unwrap(),
            NonZeroU32::new(10).unwrap(),
        ));
        let rules = Rules::new(vec![login], default).unwrap();
        let fp = Fingerprinter::new(b"floodgate:");
        let doc = rules_json(&rules, &LastReload::refused(vec!["bad".into()]), &fp);
        let text = doc.to_string();
        assert!(!text.contains("sk_live_secret"), "{text}");
        let login = &doc["rules"][0];
        assert_eq!(login["name"], "login");
        assert_eq!(login["match"]["path"], "/login");
        assert_eq!(login["match"]["methods"][0], "POST");
        assert_eq!(login["limits"][0]["rate"], "5/min");
        assert_eq!(login["limits"][0]["burst"], 5);
        assert_eq!(login["limits"][1]["algorithm"], "fixed_window");
        assert_eq!(login["limits"][1]["burst"], Value::Null);
        assert_eq!(login["limits"][1]["key"], "global");
        assert_eq!(login["deny"][0], "203.0.113.0/24");
        assert_eq!(
            login["allow_keys"][0],
            fp.fingerprint(b"sk_live_secret").to_string()
        );
        assert_eq!(doc["default"]["limits"][0]["name"], "default");
        assert_eq!(doc["last_reload"]["ok"], false);
        assert_eq!(doc["last_reload"]["errors"][0], "bad");
        assert!(doc["last_reload"]["at"].as_u64().unwrap() > 1_700_000_000);
    }
}
