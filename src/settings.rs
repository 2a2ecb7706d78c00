//! Settings: built-in defaults < `FLOODGATE_CONFIG` file < `FLOODGATE_*`
//! environment, every value validated before anything listens.
//!
//! The built-in layer is `settings/default.toml`, compiled in, so the file
//! that documents every key is also the one that defines the defaults and the
//! two cannot drift. Values are read as text from every layer and parsed here,
//! so that one run reports every problem at once, each on its own line naming
//! where the value came from (`FLOODGATE_RATE="10/mn"` or `rate = "10/mn" in
//! /etc/floodgate.toml`), the value and what is accepted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use actix_web::http::header::HeaderName;
use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use ipnet::IpNet;

use crate::headers::HeaderStyle;
use crate::limiter::{Fallback, MAX_TOLERANCE, Rate};
use crate::proxy::{HostHeader, Upstream};

/// The shipped, commented defaults (also the lowest settings layer).
pub const DEFAULT_TOML: &str = include_str!("../settings/default.toml");

/// Environment variables start with this, then the key in upper case.
pub const ENV_PREFIX: &str = "FLOODGATE_";

/// Names a settings file; not itself a setting.
pub const CONFIG_VAR: &str = "FLOODGATE_CONFIG";

/// Largest `max_connections` accepted: more than one process can have
/// sockets open under any open-file limit Linux allows (`fs.nr_open` is at
/// most 2^30).
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 30;

/// Every settings key.
pub const KEYS: &[&str] = &[
    "listen",
    "upstream",
    "upstream_timeout",
    "client_timeout",
    "host_header",
    "max_body",
    "upstream_reuse_after_body",
    "rate",
    "burst",
    "key",
    "trusted_proxies",
    "ipv6_prefix",
    "headers",
    "max_keys",
    "backend",
    "redis_url",
    "redis_cluster",
    "redis_prefix",
    "redis_timeout",
    "redis_failure",
    "admin_listen",
    "workers",
    "shutdown_timeout",
    "send_timeout",
    "websocket_idle_timeout",
    "max_connections",
];

/// Every environment variable floodgate reads.
pub fn env_vars() -> impl Iterator<Item = String> {
    std::iter::once(CONFIG_VAR.to_owned()).chain(KEYS.iter().map(|k| env_name(k)))
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// How requests are counted (`FLOODGATE_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// `ip`: the client address (the TCP peer, or the `X-Forwarded-For`
    /// address a trusted proxy gave; IPv6 per `ipv6_prefix` network).
    Ip,
    /// `header:<name>`: the value of this request header (an API key, say);
    /// a request without it is counted by address.
    Header(HeaderName),
}

/// Where limiter state lives (`FLOODGATE_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// `memory`: this process's own memory, at most `max_keys` keys.
    Memory,
    /// `redis`: a Redis server or cluster shared by every replica.
    Redis,
}

/// Redis connection and behaviour (`FLOODGATE_REDIS_*`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `FLOODGATE_REDIS_URL`, default `redis://127.0.0.1:6379/`:
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    /// May hold a password; the `Debug` output redacts it.
    pub url: String,
    /// `FLOODGATE_REDIS_CLUSTER`, default empty: Redis Cluster node URLs;
    /// when not empty they are used instead of `url`.
    pub cluster: Vec<String>,
    /// `FLOODGATE_REDIS_PREFIX`, default `floodgate:`: the start of every key
    /// floodgate writes to Redis (never `{` or `}`, which floodgate's keys use
    /// as the cluster hash tag).
    pub prefix: String,
    /// `FLOODGATE_REDIS_TIMEOUT`, default 50 ms (at least 1 ms): how long one
    /// decision may wait for Redis before `failure` applies.
    pub timeout: Duration,
    /// `FLOODGATE_REDIS_FAILURE`, default `local`: what a decision does when
    /// Redis is slow or down (limit from this replica's memory, allow, or
    /// answer 503).
    pub failure: Fallback,
}

/// Never prints passwords.
impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("failure", &self.failure)
            .finish()
    }
}

/// Validated settings: what [`Settings::load`] returns once every value has
/// parsed. Each field names its environment variable and built-in default;
/// `settings/default.toml` has the full user documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `FLOODGATE_LISTEN`, default `0.0.0.0:8000`: address and port clients
    /// connect to.
    pub listen: SocketAddr,
    /// `FLOODGATE_UPSTREAM`, default `http://127.0.0.1:8080`: the web server
    /// floodgate forwards to, `http://host[:port]` with no path (checked by
    /// [`Upstream::new`]).
    pub upstream: String,
    /// `FLOODGATE_UPSTREAM_TIMEOUT`, default 30 s: how long the upstream may
    /// take to answer once it has the request, and the longest pause while
    /// either body streams. Past it: 504, or a closed connection mid-body.
    pub upstream_timeout: Duration,
    /// `FLOODGATE_CLIENT_TIMEOUT`, default 60 s: the longest pause between
    /// two chunks of a client's request body, and the time allowed for each
    /// request's headers (the admin listener's too). Past it: 408 and the
    /// connection closes.
    pub client_timeout: Duration,
    /// `FLOODGATE_HOST_HEADER`, default `client`: whether the upstream sees
    /// the client's `Host` or the upstream URL's host:port.
    pub host_header: HostHeader,
    /// `FLOODGATE_MAX_BODY`, default empty: the longest request body in bytes
    /// that is forwarded; `None` (empty or `0`): unlimited. A longer
    /// `Content-Length` is answered 413 before anything is forwarded or
    /// counted; a chunked body is cut off at the cap with 413.
    pub max_body: Option<u64>,
    /// `FLOODGATE_UPSTREAM_REUSE_AFTER_BODY`, default `false`: whether an
    /// upstream connection that carried a request body may be used again.
    /// `false` sends such requests with `Connection: close`, so an upstream
    /// that does not read a body cannot make its bytes into uncounted
    /// requests.
    pub upstream_reuse_after_body: bool,
    /// `FLOODGATE_RATE`, default `10/min`: the default limit, `<n>/<period>`.
    pub rate: Rate,
    /// `FLOODGATE_BURST`, default empty, meaning the rate's n: requests
    /// allowed at once before the rate spaces them out.
    pub burst: NonZeroU32,
    /// `FLOODGATE_KEY`, default `ip`: whom a limit counts.
    pub key: KeyKind,
    /// `FLOODGATE_TRUSTED_PROXIES`, default empty: the proxies (CIDRs) whose
    /// `X-Forwarded-For` is believed. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<IpNet>,
    /// `FLOODGATE_IPV6_PREFIX`, default 64 (0 to 128): IPv6 clients are
    /// counted per network of this prefix length.
    pub ipv6_prefix: u8,
    /// `FLOODGATE_HEADERS`, default `ietf`: which rate-limit headers every
    /// response carries (`ietf`, `legacy` or `none`).
    pub headers: HeaderStyle,
    /// `FLOODGATE_MAX_KEYS`, default 1 000 000: keys the memory backend (and
    /// the Redis fallback) tracks at most; when full, the keys closest to a
    /// full burst are forgotten first.
    pub max_keys: usize,
    /// `FLOODGATE_BACKEND`, default `memory`: where limiter state lives.
    pub backend: BackendKind,
    /// The `FLOODGATE_REDIS_*` settings, used when `backend` is `redis`.
    pub redis: RedisSettings,
    /// `FLOODGATE_ADMIN_LISTEN`, default `127.0.0.1:9000`: address of
    /// `/healthz`, `/readyz` and `/metrics`. Keep it private.
    pub admin_listen: SocketAddr,
    /// `FLOODGATE_WORKERS`, default empty, meaning one per CPU this process
    /// may use (1 to 1024): worker threads serving clients.
    pub workers: usize,
    /// `FLOODGATE_SHUTDOWN_TIMEOUT`, default 30 s: on SIGTERM or SIGINT, how
    /// long in-flight requests may take to finish.
    pub shutdown_timeout: Duration,
    /// `FLOODGATE_SEND_TIMEOUT`, default 30 s: the longest any write toward a
    /// client may make no progress before the connection (and the upstream
    /// connection serving it) is closed. A slow reader that keeps reading is
    /// never cut.
    pub send_timeout: Duration,
    /// `FLOODGATE_WEBSOCKET_IDLE_TIMEOUT`, default 10 min: an upgraded tunnel
    /// that carries no byte either way for this long is closed on both sides.
    pub websocket_idle_timeout: Duration,
    /// `FLOODGATE_MAX_CONNECTIONS`, default 10 000: open client connections
    /// this process serves at most, split evenly across the workers; past it,
    /// new connections wait in the kernel's listen queue. The admin listener
    /// is not counted.
    pub max_connections: usize,
    /// The settings file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// One line per bad setting: where the value came from, the value, and
    /// what is accepted. Never empty.
    pub problems: Vec<String>,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for SettingsError {}

impl Default for Settings {
    /// The built-in defaults, i.e. `settings/default.toml` with no environment.
    fn default() -> Self {
        Settings::load(HashMap::new()).expect("settings/default.toml is valid")
    }
}

impl Settings {
    /// Loads settings from the built-in defaults, the file named by
    /// `FLOODGATE_CONFIG` and the `FLOODGATE_*` variables in `env`.
    ///
    /// `env` is the process environment in production (`std::env::vars()`);
    /// tests pass their own map, never touching the real one. Variables
    /// without the prefix are ignored; an unknown `FLOODGATE_*` variable is
    /// an error, so a typo cannot silently leave a default in force.
    pub fn load(env: impl IntoIterator<Item = (String, String)>) -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        let mut problems = Vec::new();

        let mut unknown: Vec<&String> = env
            .keys()
            .filter(|name| **name != CONFIG_VAR && !KEYS.iter().any(|key| env_name(key) == **name))
            .collect();
        unknown.sort();
        for name in unknown {
            problems.push(format!(
                "{name}: unknown setting; floodgate reads {}",
                env_vars().collect::<Vec<_>>().join(", ")
            ));
        }

        let config_file = env
            .get(CONFIG_VAR)
            .filter(|p| !p.trim().is_empty())
            .map(|p| PathBuf::from(p.trim()));
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = &config_file {
            match file_format(path) {
                Ok(format) => {
                    builder =
                        builder.add_source(File::from(path.as_path()).format(format).required(true))
                }
                Err(msg) => {
                    problems.push(format!("{CONFIG_VAR}={}: {msg}", path.display()));
                    return Err(SettingsError { problems });
                }
            }
        }
        let settings_env: config::Map<String, String> = env
            .iter()
            .filter(|(name, _)| *name != CONFIG_VAR)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                .ignore_empty(true)
                .source(Some(settings_env)),
        );
        let merged = match builder.build().and_then(|c| config::Source::collect(&c)) {
            Ok(map) => map,
            Err(err) => {
                let which = config_file.as_ref().map_or("settings".to_owned(), |p| {
                    format!("{CONFIG_VAR}={}", p.display())
                });
                problems.push(format!("{which}: {err}"));
                return Err(SettingsError { problems });
            }
        };

        let mut raw = Raw::new(&merged, &env, config_file.as_deref(), &mut problems);
        let settings = raw.settings(config_file.clone());
        let mut problems = raw.problems;
        match settings {
            Some(settings) if problems.is_empty() => Ok(settings),
            _ => {
                if problems.is_empty() {
                    problems.push("settings: invalid".into());
                }
                Err(SettingsError { problems })
            }
        }
    }

    /// One line with the effective settings, for the startup log, each value
    /// spelled as it would be written in a settings file (`headers=ietf`,
    /// `redis_timeout=50ms`). No secrets.
    pub fn summary(&self) -> String {
        let key = match &self.key {
            KeyKind::Ip => "ip".to_owned(),
            KeyKind::Header(name) => format!("header:{name}"),
        };
        let backend = match self.backend {
            BackendKind::Memory => format!("memory max_keys={}", self.max_keys),
            BackendKind::Redis => {
                let redis = &self.redis;
                let at = if redis.cluster.is_empty() {
                    format!("redis_url={}", redact_url(&redis.url))
                } else {
                    format!(
                        "redis_cluster={}",
                        redis
                            .cluster
                            .iter()
                            .map(|u| redact_url(u))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                };
                format!(
                    "redis {at} redis_timeout={} redis_failure={}",
                    duration_text(redis.timeout),
                    fallback_text(redis.failure)
                )
            }
        };
        let trusted = if self.trusted_proxies.is_empty() {
            "none".to_owned()
        } else {
            self.trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "listen={} upstream={} rate={} burst={} key={key} trusted_proxies={trusted} backend={backend} \
             headers={} host_header={} admin_listen={} workers={} upstream_timeout={} client_timeout={} \
             send_timeout={} websocket_idle_timeout={} max_connections={} max_body={} \
             upstream_reuse_after_body={}",
            self.listen,
            self.upstream,
            self.rate,
            self.burst,
            header_style_text(self.headers),
            host_header_text(self.host_header),
            self.admin_listen,
            self.workers,
            duration_text(self.upstream_timeout),
            duration_text(self.client_timeout),
            duration_text(self.send_timeout),
            duration_text(self.websocket_idle_timeout),
            self.max_connections,
            self.max_body.map_or("0".to_owned(), |n| n.to_string()),
            self.upstream_reuse_after_body,
        )
    }
}

// === values as the operator writes them (the inverse of the parsers) ===

/// A duration in the largest unit [`parse_duration`] reads that shows it
/// exactly: `50ms`, `30s`, `2m`, `1h`.
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 != 0 {
        format!("{}ms", d.as_secs_f64() * 1000.0)
    } else if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

fn header_style_text(style: HeaderStyle) -> &'static str {
    match style {
        HeaderStyle::Ietf => "ietf",
        HeaderStyle::Legacy => "legacy",
        HeaderStyle::None => "none",
    }
}

fn host_header_text(host: HostHeader) -> &'static str {
    match host {
        HostHeader::Client => "client",
        HostHeader::Upstream => "upstream",
    }
}

fn fallback_text(fallback: Fallback) -> &'static str {
    match fallback {
        Fallback::Local => "local",
        Fallback::Open => "open",
        Fallback::Closed => "closed",
    }
}

fn file_format(path: &Path) -> Result<FileFormat, String> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("toml") => Ok(FileFormat::Toml),
        Some("yaml" | "yml") => Ok(FileFormat::Yaml),
        _ => Err("a settings file must end in .toml, .yaml or .yml".into()),
    }
}

// === Raw ===

/// The merged text values, and the problems found parsing them.
struct Raw<'a> {
    values: BTreeMap<String, (String, Origin)>,
    file: Option<&'a Path>,
    problems: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Env,
    File,
    Default,
}

impl<'a> Raw<'a> {
    fn new(
        merged: &config::Map<String, Value>,
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

    fn settings(&mut self, config_file: Option<PathBuf>) -> Option<Settings> {
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
            listen: listen?,
            upstream: upstream?,
            upstream_timeout: upstream_timeout?,
            client_timeout: client_timeout?,
            host_header: host_header?,
            max_body,
            upstream_reuse_after_body: upstream_reuse_after_body?,
            rate: rate?,
            burst: burst?,
            key: key?,
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

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

// === parsers: Ok(value) or Err(what is accepted) ===

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    match s.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(addr),
        _ => Err("expected address:port, e.g. 0.0.0.0:8000 or [::]:8000".into()),
    }
}

/// `500ms`, `30s`, `2m`, `1h`; a bare number is seconds. Must be positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const ACCEPTED: &str = "expected a positive duration such as 500ms, 30s, 2m or 1h";
    let s = s.trim();
    let digits = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, unit) = s.split_at(digits);
    let number: f64 = number.parse().map_err(|_| ACCEPTED.to_owned())?;
    let secs = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" => number / 1000.0,
        "" | "s" | "sec" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(ACCEPTED.into()),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(7 * 86_400) => Ok(d),
        _ => Err(ACCEPTED.into()),
    }
}

/// A size in bytes: `1048576`, or with a binary suffix, `512k`, `10m`, `1g`
/// (KiB, MiB, GiB, as nginx reads them). `0` means no limit (`None`), as
/// nginx's `client_max_body_size 0` does.
pub fn parse_size(s: &str) -> Result<Option<u64>, String> {
    const ACCEPTED: &str = "expected a size in bytes, optionally with k, m or g (KiB, MiB, GiB): 1048576, 512k, 10m, 1g; 0 for no limit";
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().map_err(|_| ACCEPTED.to_owned())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(ACCEPTED.into()),
    };
    let bytes = number
        .checked_mul(scale)
        .ok_or_else(|| ACCEPTED.to_owned())?;
    Ok((bytes > 0).then_some(bytes))
}

fn parse_key(s: &str) -> Result<KeyKind, String> {
    const ACCEPTED: &str = "expected ip or header:<name>, e.g. header:x-api-key";
    if s.eq_ignore_ascii_case("ip") {
        return Ok(KeyKind::Ip);
    }
    let Some(name) = s
        .strip_prefix("header:")
        .or_else(|| s.strip_prefix("HEADER:"))
    else {
        return Err(ACCEPTED.into());
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| ACCEPTED.to_owned())?;
    if crate::proxy::rewritten_on_the_way(&name) {
        return Err(format!(
            "{name} is dropped or rewritten by floodgate and cannot be a key; {ACCEPTED}"
        ));
    }
    Ok(KeyKind::Header(name))
}

fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    list(s)
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("{part:?} is not a CIDR; expected a comma-separated list such as 10.0.0.0/8, 192.168.1.1, fd00::/8")
                })
        })
        .collect()
}

fn parse_redis_url(s: &str) -> Result<(), String> {
    const ACCEPTED: &str = "expected redis://[user:password@]host:port/db or rediss://…";
    let lower = s.to_ascii_lowercase();
    if !(lower.starts_with("redis://") || lower.starts_with("rediss://")) {
        return Err(ACCEPTED.into());
    }
    redis::Client::open(s)
        .map(|_| ())
        .map_err(|e| format!("{ACCEPTED} ({})", redact_url(&e.to_string())))
}

/// The URL with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert_eq!(s.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(s.upstream, "http://127.0.0.1:8080");
        assert_eq!(s.rate, "10/min".parse().unwrap());
        assert_eq!(s.burst.get(), 10);
        assert_eq!(s.key, KeyKind::Ip);
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
        assert_eq!(s.rate, "100/10s".parse().unwrap());
        assert_eq!(s.burst.get(), 20);
        assert_eq!(s.key, KeyKind::Header(HeaderName::from_static("x-api-key")));
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(s.upstream, "http://web:80/");
        assert_eq!(s.workers, 3);
    }

    #[test]
    fn burst_defaults_to_the_rate_count_and_empty_means_unset() {
        let s = load(&[("FLOODGATE_RATE", "100/s"), ("FLOODGATE_BURST", "")]).unwrap();
        assert_eq!(s.burst.get(), 100);
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
        assert_eq!(s.rate, "5/s".parse().unwrap());
        assert_eq!(s.burst.get(), 9, "environment wins over the file");
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(s.config_file.as_deref(), Some(toml.as_path()));

        let yaml = dir.path().join("f.yaml");
        std::fs::write(&yaml, "rate: 3/min\nkey: header:x-api-key\n").unwrap();
        let s = load(&[("FLOODGATE_CONFIG", yaml.to_str().unwrap())]).unwrap();
        assert_eq!(s.rate, "3/min".parse().unwrap());
        assert_eq!(s.burst.get(), 3);
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
            err.to_string().contains(
                "FLOODGATE_BURST=\"300000\": with this rate a burst may be at most 36501"
            ),
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
}

#[cfg(test)]
mod proptests;
