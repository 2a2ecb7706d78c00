//! Settings: built-in defaults < `FLOODGATE_CONFIG` file < `FLOODGATE_*`
//! environment, every value validated before anything listens.
//!
//! The built-in layer is `settings/default.toml`, compiled in, so the file
//! that documents every key is also the one that defines the defaults and the
//! two cannot drift. Values are read as text from every layer and parsed here,
//! so that one run reports every problem at once, each on its own line naming
//! where the value came from (`FLOODGATE_RATE="10/mn"` or `rate = "10/mn" in
//! /etc/floodgate.toml`), the value and what is accepted.

mod parse;
mod raw;
mod rules;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ::config::{Config, Environment, File, FileFormat};
use ipnet::IpNet;

use crate::admin::AdminToken;
use crate::headers::HeaderStyle;
use crate::limiter::{Fallback, Limit};
use crate::observe::LogFormat;
use crate::policy::{KeySpec, Rules};
use crate::proxy::HostHeader;

#[allow(unused_imports)] // the tests reach the private parsers through here
use parse::*;
pub use parse::{parse_duration, parse_size, redact_url};
use raw::Raw;
pub use rules::{LIMIT_FIELDS, MATCH_FIELDS, RULE_FIELDS};

/// The shipped, commented defaults (also the lowest settings layer).
pub const DEFAULT_TOML: &str = include_str!("../../settings/default.toml");

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
    "algorithm",
    "allow",
    "deny",
    "shadow",
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
    "admin_token",
    "workers",
    "shutdown_timeout",
    "send_timeout",
    "websocket_idle_timeout",
    "max_connections",
    "access_log",
    "log_format",
];

/// Keys only a settings file may hold (tables, not environment values).
pub const FILE_KEYS: &[&str] = &["rules"];

/// Every environment variable floodgate reads.
pub fn env_vars() -> impl Iterator<Item = String> {
    std::iter::once(CONFIG_VAR.to_owned()).chain(KEYS.iter().map(|k| env_name(k)))
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
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
/// parsed, in two parts: [`Static`], fixed for the life of the process, and
/// [`Policy`], the part a reload may replace. `Settings` dereferences to its
/// [`Static`] part, so `settings.listen` reads as it always has. Two
/// settings are equal when both parts are, whatever environment they came
/// from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What is fixed at startup.
    pub startup: Static,
    /// What limits requests: the reloadable part.
    pub policy: Policy,
    /// The environment these settings were loaded from.
    pub env: EnvSnapshot,
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.startup == other.startup && self.policy == other.policy
    }
}

impl Eq for Settings {}

impl Settings {
    /// [`reload`] with the environment these settings were loaded from.
    pub fn reload(&self) -> Result<Rules, SettingsError> {
        reload(&self.env)
    }
}

impl std::ops::Deref for Settings {
    type Target = Static;

    fn deref(&self) -> &Static {
        &self.startup
    }
}

/// The settings fixed at startup: where to listen, where to forward, how
/// long to wait, where limiter state lives. Changing one of them needs a
/// restart. Each field names its environment variable and built-in default;
/// `settings/default.toml` has the full user documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Static {
    /// `FLOODGATE_LISTEN`, default `0.0.0.0:8000`: address and port clients
    /// connect to.
    pub listen: SocketAddr,
    /// `FLOODGATE_UPSTREAM`, default `http://127.0.0.1:8080`: the web server
    /// floodgate forwards to, `http://host[:port]` with no path (checked by
    /// [`Upstream::new`](crate::proxy::Upstream::new)).
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
    /// `FLOODGATE_ADMIN_TOKEN`, default unset: when set, `/rules`,
    /// `/limits/…` and the status page answer only requests carrying
    /// `Authorization: Bearer <token>` (from any peer); unset, they answer
    /// loopback peers only. Set but empty is an error. Never shown (`Debug`
    /// hides it).
    pub admin_token: Option<AdminToken>,
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
    /// `FLOODGATE_ACCESS_LOG`, default `off`: a line per client request on
    /// stdout, in this format (`text` or `json`); `None`: no access log.
    pub access_log: Option<LogFormat>,
    /// `FLOODGATE_LOG_FORMAT`, default `text`: how floodgate's own log lines
    /// on stderr are spelled (`text` or `json`).
    pub log_format: LogFormat,
    /// The settings file that was read, if any.
    pub config_file: Option<PathBuf>,
}

/// The reloadable policy: which limits apply to a request and whom they
/// count, built into [`Rules`].
///
/// * The default rule (`default`), for requests no file rule fits:
///   `FLOODGATE_RATE` (a comma list makes several limits, named `default`
///   for one and `default.1`, `default.2`, … for several; `none`: unmatched
///   requests are not limited), `FLOODGATE_ALGORITHM` (all of its limits),
///   `FLOODGATE_BURST` (the first limit only, which must be `gcra`; the
///   others admit their rate's n at once) and `FLOODGATE_KEY`.
/// * The file's `[[rules]]`, tried in order before the default.
/// * `FLOODGATE_ALLOW`, `FLOODGATE_DENY`, `FLOODGATE_SHADOW`: the global
///   lists ([`Rules::global`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The rule set the gate uses.
    pub rules: Rules,
}

impl Policy {
    /// The default rule's first limit, if it has any.
    pub fn default_limit(&self) -> Option<&Limit> {
        self.rules.default_rule().limits.first().map(|l| &l.limit)
    }

    /// `FLOODGATE_KEY`: the default rule's key.
    pub fn key(&self) -> &KeySpec {
        &self.rules.default_rule().key
    }
}

/// The environment [`Settings::load`] read, kept for [`reload`]: on a
/// reload the file is read again, the environment is not. Its `Debug` shows
/// variable names only (values may hold passwords).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvSnapshot(BTreeMap<String, String>);

impl fmt::Debug for EnvSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl EnvSnapshot {
    /// The `FLOODGATE_*` variables of `env`.
    pub fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        EnvSnapshot(
            env.into_iter()
                .filter(|(name, _)| name.starts_with(ENV_PREFIX))
                .collect(),
        )
    }
}

/// Builds the rules again from the settings file `env` names (re-read now)
/// and the environment as it was (`env`; variables are not re-read): the
/// reload entry point. The same problems, in the same words, as at startup,
/// static settings included (a file whose `listen` no longer parses is
/// refused too); a valid file's static settings are not applied (they need
/// a restart).
pub fn reload(env: &EnvSnapshot) -> Result<Rules, SettingsError> {
    Settings::load(env.0.clone()).map(|s| s.policy.rules)
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
        let snapshot = EnvSnapshot::new(env);
        let env: HashMap<String, String> = snapshot.0.clone().into_iter().collect();
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
        let settings = raw.settings(config_file.clone(), snapshot);
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
        let key = self.policy.key();
        let default = self.policy.rules.default_rule();
        let rate = if default.limits.is_empty() {
            "none".to_owned()
        } else {
            default
                .limits
                .iter()
                .map(|l| l.limit.rate().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let burst = self
            .policy
            .default_limit()
            .map_or("none".to_owned(), |l| l.burst().to_string());
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
        let mut line = format!(
            "listen={} upstream={} rate={} burst={} key={key} trusted_proxies={trusted} backend={backend} \
             headers={} host_header={} admin_listen={} workers={} upstream_timeout={} client_timeout={} \
             send_timeout={} websocket_idle_timeout={} max_connections={} max_body={} \
             upstream_reuse_after_body={}",
            self.listen,
            self.upstream,
            rate,
            burst,
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
        );
        // Only what differs from a setup without rules, so that line stays
        // as it always was.
        if let Some(algorithm) = self
            .policy
            .default_limit()
            .map(|l| l.algorithm())
            .filter(|a| a.is_window())
        {
            line.push_str(&format!(" algorithm={algorithm}"));
        }
        let global = self.policy.rules.global();
        for (name, nets) in [("allow", &global.allow), ("deny", &global.deny)] {
            if !nets.is_empty() {
                let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                line.push_str(&format!(" {name}={}", nets.join(",")));
            }
        }
        if global.shadow {
            line.push_str(" shadow=true");
        }
        if let Some(format) = self.access_log {
            line.push_str(&format!(" access_log={format}"));
        }
        if self.log_format != LogFormat::Text {
            line.push_str(&format!(" log_format={}", self.log_format));
        }
        let rules: Vec<&str> = self.policy.rules.rules().map(|r| &*r.name).collect();
        if !rules.is_empty() {
            line.push_str(&format!(" rules={}", rules.join(",")));
        }
        if self.admin_token.is_some() {
            // Whether one is set, never what it is.
            line.push_str(" admin_token=set");
        }
        line
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
