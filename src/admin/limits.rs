//! `GET /limits/{rule}/{key}`: what one client key has left under each
//! limit of a rule, without charging it; `DELETE /limits/{rule}/{key}`:
//! forget that key's state under the rule, so its next request gets a full
//! burst.
//!
//! # The key
//!
//! `{key}` is written per the rule's key (`FLOODGATE_KEY`, or the rule's
//! `key`), one piece per part, pieces joined by `+` in the key's order, each
//! piece percent-encoded (a `+`, `/` or `%` inside a piece is `%2B`, `%2F`,
//! `%25`):
//!
//! | part | piece |
//! | --- | --- |
//! | `ip` | an address, `192.0.2.1` or `2001:db8::1`; IPv6 grouped by `FLOODGATE_IPV6_PREFIX` as requests are |
//! | `header:<name>` | the header's value (normalised as requests' are), or `h:<fingerprint>` (32 hex digits, as logs and these answers show it), or `ip:<address>` for requests that came without the header (counted by address in its place); `raw:<value>` for a value that itself starts with `h:`, `ip:` or `raw:` |
//! | `global` | `global` |
//!
//! So `header:x-api-key+ip` is `/limits/api/k-123+192.0.2.1`. A header
//! value is a secret: answers show it only as its fingerprint (the Redis key
//! names' fingerprint, `h:<fingerprint>` in `id`), never in clear.
//!
//! # Limits with a key of their own
//!
//! A limit whose `key` differs from its rule's (say `global`) counts a key
//! built from the parts of the rule's key it names: `global` always, `ip`
//! from the `ip` piece. GET shows such limits too (a client is refused if
//! any limit refuses it); DELETE resets only limits whose key contains the
//! client's own parts, never a `global` one: resetting one client must not
//! hand every client a fresh shared budget. A limit whose key needs a part
//! the rule's key does not have is listed with a `note` and left alone.
//!
//! # Answers
//!
//! ```json
//! GET  {"rule":"login","key":{"kind":"ip","value":"192.0.2.1","id":"ip:192.0.2.1"},
//!       "allowed_now":true,
//!       "limits":[{"name":"login","key":"ip","algorithm":"gcra","limit":5,"remaining":3,
//!                  "reset_after":24.0,"retry_after":null,"allowed_now":true,"note":null}]}
//! DELETE {"rule":"login","key":{…},
//!       "limits":[{"name":"login","key":"ip","reset":true,"had_state":true,"note":null}]}
//! error {"error":"unknown_rule","message":"…"}
//! ```
//!
//! Times are seconds (fractions allowed). Errors: `unknown_rule` 404,
//! `bad_key` 400, `needs_value` 400 (a fingerprint given to an embedder's
//! backend that keeps keys by value), `custom_key` 501 (an embedder's extractor makes the
//! keys), `unsupported` 501 (a backend without inspect and reset),
//! `backend_unavailable` 503.

use std::net::IpAddr;

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use smallvec::SmallVec;

use super::Admin;
use crate::key::{ClientIp, Fingerprint, Fingerprinter, header_value};
use crate::limiter::{Check, Decision, KeyStateError, RateKey};
use crate::policy::{KeyPart, KeySpec, Rule, Rules};

/// Why a `/limits` request was refused.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// No rule has this name.
    #[error("no rule named {name:?}; the rules are {known}")]
    UnknownRule {
        /// The name asked for.
        name: String,
        /// The names there are, comma-separated.
        known: String,
    },
    /// `{key}` does not spell a key of the rule's kind.
    #[error("{0}")]
    BadKey(String),
    /// The rule's keys come from an embedder's extractor.
    #[error("rule {0:?} counts keys made by a custom extractor, which the admin API cannot spell")]
    CustomKey(String),
    /// The backend could not look or forget.
    #[error(transparent)]
    State(#[from] KeyStateError),
}

impl LimitsError {
    /// The status and the stable code of the JSON body.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            LimitsError::UnknownRule { .. } => (StatusCode::NOT_FOUND, "unknown_rule"),
            LimitsError::BadKey(_) => (StatusCode::BAD_REQUEST, "bad_key"),
            LimitsError::CustomKey(_) => (StatusCode::NOT_IMPLEMENTED, "custom_key"),
            LimitsError::State(KeyStateError::NeedsValue(_)) => {
                (StatusCode::BAD_REQUEST, "needs_value")
            }
            LimitsError::State(KeyStateError::Unsupported(_)) => {
                (StatusCode::NOT_IMPLEMENTED, "unsupported")
            }
            LimitsError::State(KeyStateError::Backend(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable")
            }
        }
    }

    /// `{"error": code, "message": text}` with the status.
    pub fn response(&self) -> HttpResponse {
        let (status, code) = self.status();
        json_response(
            status,
            &json!({ "error": code, "message": self.to_string() }),
        )
    }
}

fn json_response(status: StatusCode, doc: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(format!("{doc:#}\n"))
}

/// `GET /limits/{rule}/{key}`.
pub async fn get(admin: web::Data<Admin>, req: HttpRequest) -> HttpResponse {
    match inspect(&admin, &req).await {
        Ok(doc) => json_response(StatusCode::OK, &doc),
        Err(err) => err.response(),
    }
}

/// `DELETE /limits/{rule}/{key}`.
pub async fn delete(admin: web::Data<Admin>, req: HttpRequest) -> HttpResponse {
    match reset(&admin, &req).await {
        Ok(doc) => json_response(StatusCode::OK, &doc),
        Err(err) => err.response(),
    }
}

/// A rule and the key asked about, resolved.
struct Target {
    rules: std::sync::Arc<Rules>,
    rule: usize,
    key: ParsedKey,
}

impl Target {
    fn rule(&self) -> &Rule {
        self.rules
            .rules()
            .chain([self.rules.default_rule()])
            .nth(self.rule)
            .expect("found by index")
    }
}

fn target(admin: &Admin, req: &HttpRequest) -> Result<Target, LimitsError> {
    let name = req.match_info().get("rule").unwrap_or_default();
    let key = req.match_info().get("key").unwrap_or_default();
    let rules = admin.rate_limit.rules();
    let Some(index) = rules
        .rules()
        .chain([rules.default_rule()])
        .position(|r| *r.name == *name)
    else {
        let known: Vec<&str> = rules
            .rules()
            .chain([rules.default_rule()])
            .map(|r| &*r.name)
            .collect();
        return Err(LimitsError::UnknownRule {
            name: name.to_owned(),
            known: known.join(", "),
        });
    };
    if admin.rate_limit.has_custom_key() {
        return Err(LimitsError::CustomKey(name.to_owned()));
    }
    let rule = rules
        .rules()
        .chain([rules.default_rule()])
        .nth(index)
        .expect("found");
    let key = ParsedKey::parse(&rule.key, key, admin.rate_limit.client_ip_resolver())?;
    Ok(Target {
        rule: index,
        rules,
        key,
    })
}

async fn inspect(admin: &Admin, req: &HttpRequest) -> Result<Value, LimitsError> {
    let target = target(admin, req)?;
    let rule = target.rule();
    let keys: Vec<Option<RateKey>> = rule
        .limits
        .iter()
        .map(|l| target.key.for_spec(l.key_spec(rule)))
        .collect();
    let checks = checks(rule, &keys);
    let mut decisions = admin.backend.inspect(&checks).await?.into_iter();
    let mut allowed_now = true;
    let limits: Vec<Value> = rule
        .limits
        .iter()
        .zip(&keys)
        .map(|(l, key)| {
            let spec = l.key_spec(rule);
            let mut row = json!({
                "name": l.limit.name(),
                "key": spec.to_string(),
                "algorithm": l.limit.algorithm().to_string(),
                "limit": l.limit.burst().get(),
                "remaining": null,
                "reset_after": null,
                "retry_after": null,
                "allowed_now": null,
                "note": null,
            });
            match key.as_ref().and_then(|_| decisions.next()) {
                Some(decision) => {
                    allowed_now &= decision.is_allowed();
                    row["remaining"] = json!(decision.remaining());
                    row["reset_after"] = json!(decision.reset_after().as_secs_f64());
                    row["retry_after"] = json!(decision.retry_after().map(|d| d.as_secs_f64()));
                    row["allowed_now"] = json!(matches!(decision, Decision::Allowed { .. }));
                }
                None => row["note"] = json!(not_derivable(spec, &rule.key)),
            }
            row
        })
        .collect();
    Ok(json!({
        "rule": &*rule.name,
        "key": target.key.to_json(&admin.fingerprints),
        "allowed_now": allowed_now,
        "limits": limits,
    }))
}

/// One check per limit of `rule` whose key `keys` holds (in the rule's
/// order; a limit whose key cannot be derived is left out).
fn checks<'a>(rule: &'a Rule, keys: &'a [Option<RateKey>]) -> SmallVec<[Check<'a>; 4]> {
    rule.limits
        .iter()
        .zip(keys)
        .filter_map(|(l, key)| {
            Some(Check {
                limit: &l.limit,
                key: key.as_ref()?,
            })
        })
        .collect()
}

async fn reset(admin: &Admin, req: &HttpRequest) -> Result<Value, LimitsError> {
    let target = target(admin, req)?;
    let rule = target.rule();
    let keys: Vec<Option<RateKey>> = rule
        .limits
        .iter()
        .map(|l| {
            let spec = l.key_spec(rule);
            // Never the shared budget (see the module docs).
            if spec.is_global() {
                None
            } else {
                target.key.for_spec(spec)
            }
        })
        .collect();
    let checks = checks(rule, &keys);
    let mut forgotten = if checks.is_empty() {
        SmallVec::new()
    } else {
        admin.backend.reset(&checks).await?
    }
    .into_iter();
    let limits: Vec<Value> = rule
        .limits
        .iter()
        .zip(&keys)
        .map(|(l, key)| {
            let spec = l.key_spec(rule);
            let had = key.as_ref().and_then(|_| forgotten.next());
            let note = match had {
                Some(_) => None,
                None if spec.is_global() => Some(
                    "global: one budget shared by every client; resetting a client leaves it"
                        .to_owned(),
                ),
                None => Some(not_derivable(spec, &rule.key)),
            };
            json!({
                "name": l.limit.name(),
                "key": spec.to_string(),
                "reset": had.is_some(),
                "had_state": had,
                "note": note,
            })
        })
        .collect();
    let shown = target.key.to_json(&admin.fingerprints);
    log::info!(
        "admin reset rule={} key={} limits={}",
        rule.name,
        shown["id"].as_str().unwrap_or_default(),
        checks.len()
    );
    Ok(json!({
        "rule": &*rule.name,
        "key": shown,
        "limits": limits,
    }))
}

fn not_derivable(spec: &KeySpec, rule_key: &KeySpec) -> String {
    format!("counts {spec}, which the rule's key {rule_key} does not give")
}

// === the key ===

/// `{key}` read per a rule's key spec: one key per part, in spec order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedKey {
    parts: SmallVec<[(KeyPart, RateKey); 2]>,
}

impl ParsedKey {
    /// Reads `text` (as the route matched it: decoded but for `%2B`, `%2F`
    /// and `%25`) for `spec`.
    fn parse(spec: &KeySpec, text: &str, ip: &ClientIp) -> Result<Self, LimitsError> {
        let pieces: Vec<&str> = text.split('+').collect();
        if pieces.len() != spec.parts().len() {
            return Err(LimitsError::BadKey(format!(
                "the rule counts {spec}: expected {} piece(s) joined by + (a + inside a piece is %2B), got {}",
                spec.parts().len(),
                pieces.len()
            )));
        }
        let parts = spec
            .parts()
            .iter()
            .zip(pieces)
            .map(|(part, piece)| {
                let piece = percent_decode(piece).ok_or_else(|| {
                    LimitsError::BadKey(format!("{piece:?}: a % must start an escape such as %2B"))
                })?;
                Ok((part.clone(), parse_piece(part, &piece, ip)?))
            })
            .collect::<Result<_, LimitsError>>()?;
        Ok(ParsedKey { parts })
    }

    /// The key a limit counting `spec` counts for this client: built from
    /// the parts `spec` names; `None` if it names one this key lacks.
    fn for_spec(&self, spec: &KeySpec) -> Option<RateKey> {
        let keys: SmallVec<[RateKey; 2]> = spec
            .parts()
            .iter()
            .map(|part| match part {
                KeyPart::Global => Some(RateKey::global()),
                _ => self
                    .parts
                    .iter()
                    .find(|(p, _)| p == part)
                    .map(|(_, key)| key.clone()),
            })
            .collect::<Option<_>>()?;
        Some(RateKey::composite(keys))
    }

    /// How answers show the key: kinds and addresses, header values only as
    /// fingerprints, and the stable id Redis key names and logs carry.
    fn to_json(&self, fingerprints: &Fingerprinter) -> Value {
        let shown: Vec<Value> = self
            .parts
            .iter()
            .map(|(part, key)| part_json(part, key, fingerprints))
            .collect();
        let whole = RateKey::composite(self.parts.iter().map(|(_, k)| k.clone()));
        let id = String::from_utf8_lossy(&whole.stable_id(fingerprints)).into_owned();
        let mut doc = match <[Value; 1]>::try_from(shown) {
            Ok([one]) => one,
            Err(parts) => json!({ "kind": "composite", "parts": parts }),
        };
        doc["id"] = json!(id);
        doc
    }
}

fn part_json(part: &KeyPart, key: &RateKey, fingerprints: &Fingerprinter) -> Value {
    if let Some(addr) = key.ip_addr() {
        return match part {
            KeyPart::Header(name) => {
                json!({ "kind": "ip", "value": addr.to_string(), "in_place_of": format!("header:{name}") })
            }
            _ => json!({ "kind": "ip", "value": addr.to_string() }),
        };
    }
    match part {
        KeyPart::Header(name) => {
            let id = key.stable_id(fingerprints);
            let fingerprint = String::from_utf8_lossy(id.strip_prefix(b"h:").unwrap_or(&id));
            json!({ "kind": "header", "name": name.as_str(), "fingerprint": fingerprint })
        }
        _ => json!({ "kind": "global" }),
    }
}

/// One piece of `{key}`, decoded, for `part`.
fn parse_piece(part: &KeyPart, piece: &[u8], ip: &ClientIp) -> Result<RateKey, LimitsError> {
    match part {
        KeyPart::Ip => parse_addr(piece)
            .map(|addr| ip.key_for(addr))
            .ok_or_else(|| {
                LimitsError::BadKey(format!(
                    "{:?}: the rule's ip part expects an address such as 192.0.2.1 or 2001:db8::1",
                    String::from_utf8_lossy(piece)
                ))
            }),
        KeyPart::Global => match piece {
            b"global" => Ok(RateKey::global()),
            _ => Err(LimitsError::BadKey(format!(
                "{:?}: the rule counts global, one key spelled global",
                String::from_utf8_lossy(piece)
            ))),
        },
        KeyPart::Header(name) => parse_header_piece(name, piece, ip),
    }
}

fn parse_header_piece(
    name: &HeaderName,
    piece: &[u8],
    ip: &ClientIp,
) -> Result<RateKey, LimitsError> {
    if let Some(hex) = piece.strip_prefix(b"h:") {
        return std::str::from_utf8(hex)
            .ok()
            .and_then(Fingerprint::from_hex)
            .map(RateKey::header_fingerprint)
            .ok_or_else(|| {
                LimitsError::BadKey(
                    "h: starts a fingerprint: 32 hex digits expected after it (raw:h:… for a value that starts with h:)".into(),
                )
            });
    }
    if let Some(addr) = piece.strip_prefix(b"ip:") {
        return parse_addr(addr).map(|a| ip.key_for(a)).ok_or_else(|| {
            LimitsError::BadKey(
                "ip: starts the address of a request without the header: expected e.g. ip:192.0.2.1 (raw:ip:… for a value that starts with ip:)".into(),
            )
        });
    }
    let value = piece.strip_prefix(b"raw:").unwrap_or(piece);
    let bad = || {
        LimitsError::BadKey(format!(
            "not a value the {name} header can carry (empty, or with control characters)"
        ))
    };
    let value = HeaderValue::from_bytes(value).map_err(|_| bad())?;
    // The value as requests are counted by it (whitespace, an Authorization
    // scheme's case).
    let mut headers = HeaderMap::new();
    headers.insert(name.clone(), value);
    match header_value(name, &headers) {
        Ok(Some(value)) => Ok(RateKey::header(value)),
        _ => Err(bad()),
    }
}

/// `192.0.2.1`, `2001:db8::1` or `[2001:db8::1]`.
fn parse_addr(text: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(text).ok()?;
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.parse().ok()
}

/// Percent-decodes `text`; `None` for a `%` not followed by two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
