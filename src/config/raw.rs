//! Every layer's values as text, where each came from, and every problem
//! found turning them into [`Settings`]: all of them, one line each.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ::config::{Value, ValueKind};

use super::parse::*;
use super::rules::{Inherited, Problems, file_rules, make_limit, most_burst};
use super::{
    BackendKind, EnvSnapshot, FILE_KEYS, KEYS, MAX_CONNECTIONS_LIMIT, Policy, RedisSettings,
    Settings, Static, env_name,
};
use crate::admin::auth::{AdminToken, AdminTokenError};
use crate::headers::HeaderStyle;
use crate::limiter::{ALGORITHM_SYNTAX, Algorithm, Fallback};
use crate::observe::LogFormat;
use crate::observe::log_format::LOG_FORMAT_SYNTAX;
use crate::policy::{DEFAULT_RULE, Lists, Rule, Rules};
use crate::proxy::{HostHeader, Upstream};

/// The merged text values, and the problems found parsing them.
pub(super) struct Raw<'a> {
    values: BTreeMap<String, (String, Origin)>,
    file: Option<&'a Path>,
    pub(super) problems: Vec<String>,
    /// The file's `rules`, if it has any.
    rules: Option<Value>,
    /// Keys whose environment variable is set but blank (the environment
    /// layer drops those, so they would otherwise read as unset).
    blank_env: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Env,
    File,
    Default,
}

impl<'a> Raw<'a> {
    pub(super) fn new(
        merged: &::config::Map<String, Value>,
        env: &HashMap<String, String>,
        file: Option<&'a Path>,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut values = BTreeMap::new();
        let mut rules = None;
        let mut raw_problems = std::mem::take(problems);
        for (key, value) in merged {
            let key = key.to_ascii_lowercase();
            let from_env = env.contains_key(&env_name(&key));
            let origin = if from_env {
                Origin::Env
            } else if value.origin().is_some() {
                Origin::File
            } else {
                Origin::Default
            };
            if FILE_KEYS.contains(&key.as_str()) && origin == Origin::File {
                rules = Some(value.clone());
                continue;
            }
            if !KEYS.contains(&key.as_str()) {
                if origin == Origin::File {
                    raw_problems.push(format!(
                        "{key:?} in {}: unknown setting; known keys are {}",
                        file.map_or("settings".into(), |p| p.display().to_string()),
                        KEYS.join(", ")
                    ));
                }
                continue;
            }
            match text(value) {
                Some(text) => {
                    values.insert(key, (text, origin));
                }
                None => raw_problems.push(format!(
                    "{key:?} in {}: expected a string, number or list of strings",
                    file.map_or("settings".into(), |p| p.display().to_string())
                )),
            }
        }
        let blank_env = KEYS
            .iter()
            .filter(|key| env.get(&env_name(key)).is_some_and(|v| v.trim().is_empty()))
            .map(|key| (*key).to_owned())
            .collect();
        Raw {
            values,
            file,
            problems: raw_problems,
            rules,
            blank_env,
        }
    }

    /// The value of `key`, or `None` if unset or empty.
    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(|(text, _)| text.trim())
            .filter(|text| !text.is_empty())
    }

    /// Parses `key` with `parse`, recording a problem on failure.
    fn parse<T>(&mut self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let text = self.get(key)?.to_owned();
        match parse(&text) {
            Ok(value) => Some(value),
            Err(accepted) => {
                let shown = if key.starts_with("redis") {
                    redact_url(&text)
                } else {
                    text
                };
                let place = self.describe(key, &shown);
                self.problems.push(format!("{place}: {accepted}"));
                None
            }
        }
    }

    /// `FLOODGATE_RATE="x"` or `rate = "x" in file`.
    fn describe(&self, key: &str, shown: &str) -> String {
        let origin = self.values.get(key).map_or(Origin::Default, |(_, o)| *o);
        match origin {
            Origin::Env => format!("{}={shown:?}", env_name(key)),
            Origin::File => format!(
                "{key} = {shown:?} in {}",
                self.file
                    .map_or("settings".into(), |p| p.display().to_string())
            ),
            Origin::Default => format!("{key} = {shown:?} (built-in default)"),
        }
        .replace("\\\"", "\"")
    }

    /// A required key (always present through the defaults).
    fn required<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if self.get(key).is_none() {
            self.problems
                .push(format!("{}: must not be empty", env_name(key)));
            return None;
        }
        self.parse(key, parse)
    }

    /// `admin_token`: `Some(None)` when unset, `None` after a problem. Set
    /// but empty is a problem (not "unset"): an operator who wrote the
    /// variable meant to protect the admin API. The value is never shown.
    fn admin_token(&mut self) -> Option<Option<AdminToken>> {
        const KEY: &str = "admin_token";
        let (text, origin) = self
            .values
            .get(KEY)
            .map_or((String::new(), Origin::Default), |(t, o)| (t.clone(), *o));
        let result = if self.blank_env.iter().any(|k| k == KEY) {
            Err((format!("{}=\"\"", env_name(KEY)), AdminTokenError::Empty))
        } else if text.trim().is_empty() && origin != Origin::File {
            return Some(None);
        } else {
            let shown = if text.trim().is_empty() {
                ""
            } else {
                "<hidden>"
            };
            AdminToken::new(&text).map_err(|e| (self.describe(KEY, shown), e))
        };
        match result {
            Ok(token) => Some(Some(token)),
            Err((place, err)) => {
                self.problems.push(format!("{place}: {err}"));
                None
            }
        }
    }

    pub(super) fn settings(
        &mut self,
        config_file: Option<PathBuf>,
        env: EnvSnapshot,
    ) -> Option<Settings> {
        let listen = self.required("listen", parse_addr);
        let upstream = self.required("upstream", |s| {
            Upstream::new(s)
                .map(|_| s.to_owned())
                .map_err(|e| format!("{e}; expected e.g. http://127.0.0.1:8080"))
        });
        let upstream_timeout = self.required("upstream_timeout", parse_duration);
        let client_timeout = self.required("client_timeout", parse_duration);
        let host_header = self.required("host_header", |s| match s.to_ascii_lowercase().as_str() {
            "client" => Ok(HostHeader::Client),
            "upstream" => Ok(HostHeader::Upstream),
            _ => Err("expected client or upstream".into()),
        });
        let max_body = self.parse("max_body", parse_size).flatten();
        let upstream_reuse_after_body = self.required("upstream_reuse_after_body", parse_bool);
        let rules = self.policy();
        let trusted_proxies = self
            .parse("trusted_proxies", parse_cidrs)
            .unwrap_or_default();
        let ipv6_prefix = self.required("ipv6_prefix", |s| match s.parse::<u8>() {
            Ok(p) if p <= 128 => Ok(p),
            _ => Err("expected a prefix length from 0 to 128".into()),
        });
        let headers = self.required("headers", |s| {
            HeaderStyle::from_str(s).map_err(|()| "expected ietf, legacy or none".into())
        });
        let max_keys = self.required("max_keys", |s| match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err("expected a whole number of at least 1".into()),
        });
        let backend = self.required("backend", |s| match s.to_ascii_lowercase().as_str() {
            "memory" => Ok(BackendKind::Memory),
            "redis" => Ok(BackendKind::Redis),
            _ => Err("expected memory or redis".into()),
        });
        let redis_url = self.required("redis_url", |s| parse_redis_url(s).map(|()| s.to_owned()));
        let redis_cluster = self
            .parse("redis_cluster", |s| {
                list(s)
                    .map(|u| parse_redis_url(u).map(|()| u.to_owned()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_default();
        let redis_prefix = self
            .parse("redis_prefix", |s| {
                if s.contains(['{', '}']) {
                    Err("must not contain { or }: floodgate's keys use them as the Redis Cluster hash tag".into())
                } else {
                    Ok(s.to_owned())
                }
            })
            .unwrap_or_default();
        let redis_timeout = self.required("redis_timeout", |s| match parse_duration(s)? {
            d if d < Duration::from_millis(1) => Err("expected at least 1ms".into()),
            d => Ok(d),
        });
        let redis_failure =
            self.required("redis_failure", |s| match s.to_ascii_lowercase().as_str() {
                "local" => Ok(Fallback::Local),
                "open" => Ok(Fallback::Open),
                "closed" => Ok(Fallback::Closed),
                _ => Err("expected local, open or closed".into()),
            });
        let admin_listen = self.required("admin_listen", parse_addr);
        let admin_token = self.admin_token();
        let workers = match self.get("workers") {
            None => Some(std::thread::available_parallelism().map_or(1, |n| n.get())),
            Some(_) => self.parse("workers", |s| match s.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(n),
                _ => Err("expected a whole number from 1 to 1024".into()),
            }),
        };
        let shutdown_timeout = self.required("shutdown_timeout", parse_duration);
        let send_timeout = self.required("send_timeout", parse_duration);
        let websocket_idle_timeout = self.required("websocket_idle_timeout", parse_duration);
        let max_connections = self.required("max_connections", |s| match s.parse::<usize>() {
            Ok(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => Ok(n),
            _ => Err(format!(
                "expected a whole number from 1 to {MAX_CONNECTIONS_LIMIT}"
            )),
        });
        let access_log = self.required("access_log", |s| {
            match s.trim().to_ascii_lowercase().as_str() {
                "off" => Ok(None),
                other => LogFormat::from_str(other)
                    .map(Some)
                    .map_err(|()| "expected off, text or json".into()),
            }
        });
        let log_format = self.required("log_format", |s| {
            LogFormat::from_str(s).map_err(|()| format!("expected {LOG_FORMAT_SYNTAX}"))
        });

        Some(Settings {
            startup: Static {
                listen: listen?,
                upstream: upstream?,
                upstream_timeout: upstream_timeout?,
                client_timeout: client_timeout?,
                host_header: host_header?,
                max_body,
                upstream_reuse_after_body: upstream_reuse_after_body?,
                trusted_proxies,
                ipv6_prefix: ipv6_prefix?,
                headers: headers?,
                max_keys: max_keys?,
                backend: backend?,
                redis: RedisSettings {
                    url: redis_url?,
                    cluster: redis_cluster,
                    prefix: redis_prefix,
                    timeout: redis_timeout?,
                    failure: redis_failure?,
                },
                admin_listen: admin_listen?,
                admin_token: admin_token?,
                workers: workers?,
                shutdown_timeout: shutdown_timeout?,
                send_timeout: send_timeout?,
                websocket_idle_timeout: websocket_idle_timeout?,
                max_connections: max_connections?,
                access_log: access_log?,
                log_format: log_format?,
                config_file,
            },
            policy: Policy { rules: rules? },
            env,
        })
    }
}

/// A value as text: strings as they are, numbers and booleans printed, lists
/// joined with commas.
fn text(value: &Value) -> Option<String> {
    match &value.kind {
        ValueKind::Nil => Some(String::new()),
        ValueKind::Array(items) => items
            .iter()
            .map(text)
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        ValueKind::Table(_) => None,
        _ => value.clone().into_string().ok(),
    }
}

// === the policy ===

impl Raw<'_> {
    /// The default rule from the environment, the global lists, and the
    /// file's rules, checked together.
    fn policy(&mut self) -> Option<Rules> {
        let algorithm = self.required("algorithm", |s| {
            Algorithm::from_str(s.trim()).map_err(|_| format!("expected {ALGORITHM_SYNTAX}"))
        });
        let rates = self.required("rate", parse_rates);
        // `None`: a problem; `Some(None)`: unset, the rate's n.
        let burst: Option<Option<NonZeroU32>> = match self.get("burst") {
            None => Some(None),
            Some(_) => self.parse("burst", |s| {
                let burst = s
                    .parse::<NonZeroU32>()
                    .map_err(|_| format!("expected a whole number from 1 to {}", u32::MAX))?;
                match (&rates, algorithm) {
                    (_, Some(a)) if a.is_window() => Err(format!(
                        "burst belongs to gcra alone; FLOODGATE_ALGORITHM is {a}, which admits the rate's n per window"
                    )),
                    (Some(rates), _) if rates.is_empty() => Err(
                        "FLOODGATE_RATE is none: there is no limit to give a burst".into(),
                    ),
                    // A key may run at most MAX_TOLERANCE ahead of schedule.
                    (Some(rates), _) if u128::from(burst.get()) > most_burst(rates[0]) => {
                        Err(format!(
                            "with this rate a burst may be at most {} (100 years' worth of requests)",
                            most_burst(rates[0])
                        ))
                    }
                    _ => Ok(burst),
                }
            })
            .map(Some),
        };
        let key = self.required("key", parse_key);
        let allow = self.parse("allow", parse_cidrs).unwrap_or_default();
        let deny = self.parse("deny", parse_cidrs).unwrap_or_default();
        let shadow = self.required("shadow", parse_bool);

        let mut default = None;
        if let (Some(rates), Some(algorithm), Some(burst), Some(key)) =
            (&rates, algorithm, burst, &key)
        {
            let several = rates.len() > 1;
            let mut rule = Rule::new(DEFAULT_RULE).key(key.clone());
            let mut ok = true;
            for (i, rate) in rates.iter().enumerate() {
                let name = if several {
                    format!("{DEFAULT_RULE}.{}", i + 1)
                } else {
                    DEFAULT_RULE.to_owned()
                };
                let burst = if i == 0 { burst } else { None };
                match make_limit(name, *rate, burst, algorithm) {
                    Ok(limit) => rule = rule.limit(limit),
                    Err(e) => {
                        let place = self.describe("rate", self.get("rate").unwrap_or_default());
                        self.problems.push(format!("{place}: {rate}: {e}"));
                        ok = false;
                    }
                }
            }
            if ok {
                default = Some(rule);
            }
        }

        let file_rules = match (&self.rules, &key) {
            (Some(value), Some(key)) => {
                let file = self
                    .file
                    .map_or("settings".into(), |p| p.display().to_string());
                let mut problems = Problems {
                    file: &file,
                    lines: Vec::new(),
                };
                let rules = file_rules(value, &Inherited { key }, &mut problems);
                let default_for_check = default.clone().unwrap_or_else(|| Rule::new(DEFAULT_RULE));
                if let Err(errors) = Rules::check(&rules, &default_for_check) {
                    problems
                        .lines
                        .extend(errors.into_iter().map(|e| format!("rules in {file}: {e}")));
                }
                self.problems.append(&mut problems.lines);
                rules
            }
            _ => Vec::new(),
        };
        let rules = Rules::new(file_rules, default?).ok()?;
        Some(rules.with_global(Lists {
            allow,
            allow_keys: Vec::new(),
            deny,
            shadow: shadow?,
        }))
    }
}
