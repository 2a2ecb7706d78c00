//! Every layer's values as text, where each came from, and every problem
//! found turning them into [`Settings`]: all of them, one line each.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ::config::{Value, ValueKind};

use super::parse::*;
use super::{
    BackendKind, KEYS, MAX_CONNECTIONS_LIMIT, Policy, RedisSettings, Settings, Static, env_name,
};
use crate::headers::HeaderStyle;
use crate::limiter::{Fallback, MAX_TOLERANCE, Rate};
use crate::proxy::{HostHeader, Upstream};

/// The merged text values, and the problems found parsing them.
pub(super) struct Raw<'a> {
    values: BTreeMap<String, (String, Origin)>,
    file: Option<&'a Path>,
    pub(super) problems: Vec<String>,
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
        Raw {
            values,
            file,
            problems: raw_problems,
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

    pub(super) fn settings(&mut self, config_file: Option<PathBuf>) -> Option<Settings> {
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
        let rate = self.required("rate", |s| Rate::from_str(s).map_err(|e| e.to_string()));
        let burst = match self.get("burst") {
            None => rate.map(|r| r.count()),
            Some(_) => self.parse("burst", |s| {
                let burst = s
                    .parse::<NonZeroU32>()
                    .map_err(|_| format!("expected a whole number from 1 to {}", u32::MAX))?;
                // A key may run at most MAX_TOLERANCE ahead of schedule.
                let most = rate.map(|r| MAX_TOLERANCE.as_micros() / r.emission_interval().as_micros() + 1);
                match most {
                    Some(most) if u128::from(burst.get()) > most => Err(format!(
                        "with this rate a burst may be at most {most} (100 years' worth of requests)"
                    )),
                    _ => Ok(burst),
                }
            }),
        };
        let key = self.required("key", parse_key);
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
                workers: workers?,
                shutdown_timeout: shutdown_timeout?,
                send_timeout: send_timeout?,
                websocket_idle_timeout: websocket_idle_timeout?,
                max_connections: max_connections?,
                config_file,
            },
            policy: Policy {
                rate: rate?,
                burst: burst?,
                key: key?,
            },
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
