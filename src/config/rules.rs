//! The settings file's `[[rules]]`: a typed schema (serde), and the
//! [`Rules`] built from it and from the default rule the environment
//! describes. Every problem is found in one pass and reported on its own
//! line naming the rule, the field, the value and what is accepted.
//!
//! The schema is lenient on purpose: each field deserialises either to its
//! type or to the raw value ([`Lenient`]), and unknown fields are collected
//! (`#[serde(flatten)]`), so one bad field never hides the next.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use ::config::{Value, ValueKind};
use actix_web::http::Method;
use bytes::Bytes;
use ipnet::IpNet;
use serde::Deserialize;

use super::parse::parse_cidrs;
use crate::limiter::{Algorithm, Limit, MAX_TOLERANCE, Rate};
use crate::policy::{self, HostPattern, KeySpec, Match, Rule, RuleLimit, is_valid_name};

/// The fields of a rule, for error messages and suggestions.
pub const RULE_FIELDS: &[&str] = &[
    "name",
    "match",
    "key",
    "limits",
    "allow",
    "allow_keys",
    "deny",
    "shadow",
];
/// The fields of a rule's `match`.
pub const MATCH_FIELDS: &[&str] = &["path", "methods", "host"];
/// The fields of one of a rule's `limits`.
pub const LIMIT_FIELDS: &[&str] = &["name", "rate", "burst", "algorithm", "key"];

// === schema ===

/// A field's value: its type, or what was written instead.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Lenient<T> {
    Good(T),
    Bad(Value),
}

/// One `[[rules]]` entry.
#[derive(Debug, Deserialize)]
pub(super) struct RuleFile {
    name: Option<Lenient<String>>,
    #[serde(rename = "match")]
    matcher: Option<Lenient<MatchFile>>,
    key: Option<Lenient<String>>,
    limits: Option<Lenient<Vec<Lenient<LimitFile>>>>,
    allow: Option<Lenient<Vec<String>>>,
    allow_keys: Option<Lenient<Vec<String>>>,
    deny: Option<Lenient<Vec<String>>>,
    shadow: Option<Lenient<bool>>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// A rule's `match = { path, methods, host }`.
#[derive(Debug, Deserialize)]
pub(super) struct MatchFile {
    path: Option<Lenient<String>>,
    methods: Option<Lenient<Vec<String>>>,
    host: Option<Lenient<String>>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

/// One of a rule's `limits = [{ name, rate, burst, algorithm, key }]`.
#[derive(Debug, Deserialize)]
pub(super) struct LimitFile {
    name: Option<Lenient<String>>,
    rate: Option<Lenient<String>>,
    burst: Option<Lenient<u32>>,
    algorithm: Option<Lenient<String>>,
    key: Option<Lenient<String>>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

// === building ===

/// What the rules inherit from the environment's default rule.
pub(super) struct Inherited<'a> {
    /// `FLOODGATE_KEY`: the key of a rule without `key`.
    pub key: &'a KeySpec,
}

/// Collects problems, each prefixed with where it is.
pub(super) struct Problems<'a> {
    pub file: &'a str,
    pub lines: Vec<String>,
}

impl Problems<'_> {
    fn push(
        &mut self,
        rule: &str,
        field: &str,
        value: Option<&Value>,
        accepted: impl std::fmt::Display,
    ) {
        let shown = match value {
            Some(v) => format!("{field} = {}", show(v)),
            None => field.to_owned(),
        };
        self.lines
            .push(format!("{rule} in {}: {shown}: {accepted}", self.file));
    }

    fn unknown(
        &mut self,
        rule: &str,
        prefix: &str,
        unknown: &BTreeMap<String, Value>,
        known: &[&str],
    ) {
        for field in unknown.keys() {
            let hint = match suggest(field, known) {
                Some(near) => format!(
                    "unknown field; did you mean {near}? known fields: {}",
                    known.join(", ")
                ),
                None => format!("unknown field; known fields: {}", known.join(", ")),
            };
            self.lines.push(format!(
                "{rule} in {}: {prefix}{field:?}: {hint}",
                self.file
            ));
        }
    }
}

/// A value as it would be written in TOML.
fn show(value: &Value) -> String {
    match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(show).collect::<Vec<_>>().join(", ")
            )
        }
        ValueKind::Table(table) => format!(
            "{{ {} }}",
            table
                .iter()
                .map(|(k, v)| format!("{k} = {}", show(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        ValueKind::Nil => "nothing".into(),
        other => other.to_string(),
    }
}

/// The known name nearest to `field`, if it is a plausible typo.
fn suggest<'a>(field: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(&field.to_ascii_lowercase(), k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance, counting a swap of two neighbours as one edit
/// (`brust` → `burst`).
fn levenshtein(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The largest burst `rate` allows: a key may run at most
/// [`MAX_TOLERANCE`] ahead of schedule.
pub(super) fn most_burst(rate: Rate) -> u128 {
    MAX_TOLERANCE.as_micros() / rate.emission_interval().as_micros() + 1
}

/// The file's `rules` value as rules, or the problems.
pub(super) fn file_rules(
    value: &Value,
    inherited: &Inherited<'_>,
    problems: &mut Problems<'_>,
) -> Vec<Rule> {
    let entries = match &value.kind {
        ValueKind::Array(entries) => entries,
        _ => {
            problems.push(
                "rules",
                "rules",
                Some(value),
                "expected a list of rules ([[rules]] tables in TOML, a list of maps in YAML)",
            );
            return Vec::new();
        }
    };
    let mut rules = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match entry.clone().try_deserialize::<RuleFile>() {
            Ok(file) => {
                if let Some(rule) = build_rule(i, file, inherited, problems) {
                    rules.push(rule);
                }
            }
            Err(_) => problems.push(
                &format!("rules[{i}]"),
                "rule",
                Some(entry),
                "expected a table of name, match, key, limits, allow, allow_keys, deny, shadow",
            ),
        }
    }
    rules
}

fn build_rule(
    i: usize,
    file: RuleFile,
    inherited: &Inherited<'_>,
    p: &mut Problems<'_>,
) -> Option<Rule> {
    let before = p.lines.len();
    let mut label = format!("rules[{i}]");
    let name = match file.name {
        Some(Lenient::Good(name)) if is_valid_name(&name) => {
            label = format!("rule {name:?}");
            Some(name)
        }
        Some(Lenient::Good(name)) => {
            let value = Value::from(name.clone());
            p.push(
                &label,
                "name",
                Some(&value),
                "expected lower-case letters, digits, _ and - only",
            );
            None
        }
        Some(Lenient::Bad(value)) => {
            p.push(
                &label,
                "name",
                Some(&value),
                "expected a string of lower-case letters, digits, _ and -",
            );
            None
        }
        None => {
            p.push(
                &label,
                "name",
                None,
                "missing; every rule needs a unique name ([a-z0-9_-]+)",
            );
            None
        }
    };
    let rule_name = name.clone().unwrap_or_default();
    p.unknown(&label, "", &file.unknown, RULE_FIELDS);

    let matcher = match file.matcher {
        None => Some(Match::any()),
        Some(Lenient::Bad(value)) => {
            p.push(&label, "match", Some(&value), "expected a table such as { path = \"/login\", methods = [\"POST\"], host = \"example.com\" }");
            None
        }
        Some(Lenient::Good(m)) => build_match(&label, m, p),
    };

    let key = match file.key {
        None => Some(inherited.key.clone()),
        Some(k) => key_spec(&label, "key", k, p),
    };

    let limits = match file.limits {
        None => Vec::new(),
        Some(Lenient::Bad(value)) => {
            p.push(
                &label,
                "limits",
                Some(&value),
                "expected a list of limits such as [{ rate = \"5/min\", burst = 5 }]",
            );
            Vec::new()
        }
        Some(Lenient::Good(limits)) => {
            let several = limits.len() > 1;
            let mut built = Vec::new();
            for (j, limit) in limits.into_iter().enumerate() {
                let field = format!("limits[{j}]");
                let default_name = if several {
                    format!("{rule_name}.{}", j + 1)
                } else {
                    rule_name.clone()
                };
                match limit {
                    Lenient::Bad(value) => p.push(
                        &label,
                        &field,
                        Some(&value),
                        "expected a table of name, rate, burst, algorithm, key",
                    ),
                    Lenient::Good(l) => {
                        if let Some(l) = build_limit(&label, &field, default_name, l, p) {
                            built.push(l);
                        }
                    }
                }
            }
            built
        }
    };

    let allow = cidrs(&label, "allow", file.allow, p);
    let deny = cidrs(&label, "deny", file.deny, p);
    let allow_keys = match file.allow_keys {
        None => Vec::new(),
        Some(Lenient::Bad(value)) => {
            p.push(
                &label,
                "allow_keys",
                Some(&value),
                "expected a list of header values, e.g. [\"office-key\"]",
            );
            Vec::new()
        }
        Some(Lenient::Good(values)) => values
            .into_iter()
            .filter_map(|v| {
                let trimmed = v.trim();
                if trimmed.is_empty() {
                    p.push(
                        &label,
                        "allow_keys",
                        Some(&Value::from(v.clone())),
                        "an empty value would never match; expected a header value",
                    );
                    None
                } else {
                    Some(Bytes::from(trimmed.to_owned()))
                }
            })
            .collect(),
    };
    let shadow = match file.shadow {
        None => false,
        Some(Lenient::Good(b)) => b,
        Some(Lenient::Bad(value)) => {
            p.push(&label, "shadow", Some(&value), "expected true or false");
            false
        }
    };
    if p.lines.len() > before {
        return None;
    }
    Some(Rule {
        name: name?.into(),
        matcher: matcher?,
        key: key?,
        limits,
        allow: allow?,
        allow_keys,
        deny: deny?,
        shadow,
    })
}

fn build_match(label: &str, m: MatchFile, p: &mut Problems<'_>) -> Option<Match> {
    let mut out = Match::any();
    let mut ok = m.unknown.is_empty();
    p.unknown(label, "match.", &m.unknown, MATCH_FIELDS);
    match m.path {
        None => {}
        Some(Lenient::Good(path)) if path.starts_with('/') => out = out.path(&path),
        Some(Lenient::Good(path)) => {
            p.push(
                label,
                "match.path",
                Some(&Value::from(path)),
                "expected a path starting with /, e.g. /login",
            );
            ok = false;
        }
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                "match.path",
                Some(&value),
                "expected a path starting with /, e.g. /login",
            );
            ok = false;
        }
    }
    match m.methods {
        None => {}
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                "match.methods",
                Some(&value),
                "expected a list of methods, e.g. [\"GET\", \"POST\"]",
            );
            ok = false;
        }
        Some(Lenient::Good(methods)) => {
            let mut parsed = Vec::new();
            for method in methods {
                match parse_method(&method) {
                    Some(m) => parsed.push(m),
                    None => {
                        p.push(
                            label,
                            "match.methods",
                            Some(&Value::from(method)),
                            "expected an HTTP method such as GET, POST, PUT, DELETE",
                        );
                        ok = false;
                    }
                }
            }
            out = out.methods(parsed);
        }
    }
    match m.host {
        None => {}
        Some(Lenient::Good(host)) => match host.parse::<HostPattern>() {
            Ok(pattern) => out = out.host(pattern),
            Err(e) => {
                p.push(label, "match.host", Some(&Value::from(host)), e);
                ok = false;
            }
        },
        Some(Lenient::Bad(value)) => {
            p.push(label, "match.host", Some(&value), policy::HostPatternError);
            ok = false;
        }
    }
    ok.then_some(out)
}

/// An HTTP method, in upper case (`post` in a file means `POST`): a token of
/// letters (and `-`, `_`).
fn parse_method(s: &str) -> Option<Method> {
    let upper = s.trim().to_ascii_uppercase();
    if upper.is_empty()
        || !upper
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return None;
    }
    Method::from_bytes(upper.as_bytes()).ok()
}

fn key_spec(
    label: &str,
    field: &str,
    value: Lenient<String>,
    p: &mut Problems<'_>,
) -> Option<KeySpec> {
    match value {
        Lenient::Good(text) => match text.parse::<KeySpec>() {
            Ok(spec) => Some(spec),
            Err(e) => {
                p.push(label, field, Some(&Value::from(text)), e);
                None
            }
        },
        Lenient::Bad(value) => {
            p.push(label, field, Some(&value), policy::KeySpecError::Syntax);
            None
        }
    }
}

fn cidrs(
    label: &str,
    field: &str,
    value: Option<Lenient<Vec<String>>>,
    p: &mut Problems<'_>,
) -> Option<Vec<IpNet>> {
    match value {
        None => Some(Vec::new()),
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                field,
                Some(&value),
                "expected a list of CIDRs, e.g. [\"10.0.0.0/8\", \"192.168.1.1\"]",
            );
            None
        }
        Some(Lenient::Good(entries)) => {
            let mut nets = Vec::new();
            let mut ok = true;
            for entry in entries {
                match parse_cidrs(&entry) {
                    Ok(mut parsed) if parsed.len() == 1 => nets.append(&mut parsed),
                    _ => {
                        p.push(
                            label,
                            field,
                            Some(&Value::from(entry)),
                            "expected a CIDR such as 10.0.0.0/8, 192.168.1.1 or fd00::/8",
                        );
                        ok = false;
                    }
                }
            }
            ok.then_some(nets)
        }
    }
}

fn build_limit(
    label: &str,
    field: &str,
    default_name: String,
    l: LimitFile,
    p: &mut Problems<'_>,
) -> Option<RuleLimit> {
    let before = p.lines.len();
    p.unknown(label, &format!("{field}."), &l.unknown, LIMIT_FIELDS);
    let name = match l.name {
        None => Some(default_name),
        Some(Lenient::Good(name)) if is_limit_name(&name) => Some(name),
        Some(Lenient::Good(name)) => {
            p.push(
                label,
                &format!("{field}.name"),
                Some(&Value::from(name)),
                "expected lower-case letters, digits, _, - and . only",
            );
            None
        }
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                &format!("{field}.name"),
                Some(&value),
                "expected a string of lower-case letters, digits, _, - and .",
            );
            None
        }
    };
    let rate = match l.rate {
        None => {
            p.push(
                label,
                &format!("{field}.rate"),
                None,
                format!("missing; expected {}", crate::limiter::RATE_SYNTAX),
            );
            None
        }
        Some(Lenient::Good(text)) => match text.parse::<Rate>() {
            Ok(rate) => Some(rate),
            Err(e) => {
                p.push(label, &format!("{field}.rate"), Some(&Value::from(text)), e);
                None
            }
        },
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                &format!("{field}.rate"),
                Some(&value),
                format!("expected {}", crate::limiter::RATE_SYNTAX),
            );
            None
        }
    };
    let algorithm = match l.algorithm {
        None => Some(Algorithm::Gcra),
        Some(Lenient::Good(text)) => match text.parse::<Algorithm>() {
            Ok(a) => Some(a),
            Err(e) => {
                p.push(
                    label,
                    &format!("{field}.algorithm"),
                    Some(&Value::from(text)),
                    e,
                );
                None
            }
        },
        Some(Lenient::Bad(value)) => {
            p.push(
                label,
                &format!("{field}.algorithm"),
                Some(&value),
                format!("expected {}", crate::limiter::ALGORITHM_SYNTAX),
            );
            None
        }
    };
    let key = l
        .key
        .and_then(|k| key_spec(label, &format!("{field}.key"), k, p).map(Some))
        .flatten();
    let burst = match (l.burst, algorithm) {
        (None, _) => None,
        (Some(Lenient::Good(b)), Some(a)) if a.is_window() => {
            p.push(
                label,
                &format!("{field}.burst"),
                Some(&Value::from(u64::from(b))),
                format!("burst belongs to gcra alone; a {a} limit admits its rate's n per window"),
            );
            None
        }
        (Some(Lenient::Good(b)), _) => {
            match (NonZeroU32::new(b), rate) {
                (None, _) => {
                    p.push(
                        label,
                        &format!("{field}.burst"),
                        Some(&Value::from(u64::from(b))),
                        format!("expected a whole number from 1 to {}", u32::MAX),
                    );
                    None
                }
                (Some(burst), Some(rate)) if u128::from(b) > most_burst(rate) => {
                    let _ = burst;
                    p.push(label, &format!("{field}.burst"), Some(&Value::from(u64::from(b))), format!("with this rate a burst may be at most {} (100 years' worth of requests)", most_burst(rate)));
                    None
                }
                (Some(burst), _) => Some(burst),
            }
        }
        (Some(Lenient::Bad(value)), _) => {
            p.push(
                label,
                &format!("{field}.burst"),
                Some(&value),
                format!("expected a whole number from 1 to {}", u32::MAX),
            );
            None
        }
    };
    if p.lines.len() > before {
        return None;
    }
    let (name, rate, algorithm) = (name?, rate?, algorithm?);
    let limit = match make_limit(name, rate, burst, algorithm) {
        Ok(limit) => limit,
        Err(e) => {
            p.push(
                label,
                &format!("{field}.rate"),
                Some(&Value::from(rate.to_string())),
                e,
            );
            return None;
        }
    };
    Some(RuleLimit { limit, key })
}

/// A limit: GCRA with `burst` (default: the rate's n), or a window.
pub(super) fn make_limit(
    name: String,
    rate: Rate,
    burst: Option<NonZeroU32>,
    algorithm: Algorithm,
) -> Result<Limit, crate::limiter::LimitError> {
    if algorithm.is_window() {
        Limit::window(name, rate, algorithm)
    } else {
        Ok(Limit::new(name, rate, burst.unwrap_or(rate.count())))
    }
}

/// Limit names: rule names plus `.` (`login.1`).
fn is_limit_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_get_the_nearest_field() {
        assert_eq!(suggest("brust", LIMIT_FIELDS), Some("burst"));
        assert_eq!(suggest("algoritm", LIMIT_FIELDS), Some("algorithm"));
        assert_eq!(suggest("RATE", LIMIT_FIELDS), Some("rate"));
        assert_eq!(suggest("allowkeys", RULE_FIELDS), Some("allow_keys"));
        assert_eq!(suggest("colour", RULE_FIELDS), None);
        assert_eq!(levenshtein("brust", "burst"), 1);
        assert_eq!(levenshtein("", "abc"), 3);
    }

    #[test]
    fn methods_are_tokens_in_upper_case() {
        assert_eq!(parse_method("post"), Some(Method::POST));
        assert_eq!(
            parse_method("PURGE").map(|m| m.to_string()),
            Some("PURGE".into())
        );
        assert_eq!(parse_method("GE T"), None);
        assert_eq!(parse_method(""), None);
        assert_eq!(parse_method("GET/1"), None);
    }
}
