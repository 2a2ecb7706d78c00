//! Rules: which limits apply to a request, whom they count, and who is
//! never limited or always refused.
//!
//! A [`Rules`] set is a plain value: parsed from the settings file's
//! `[[rules]]` (see [`crate::config`]) or built in code, and replaced whole
//! on a reload. [`Rules::select`] picks the rule for a request: rules are
//! tried in order, the first whose [`Match`] fits wins, and a request no rule
//! fits gets the default rule (`default`, from `FLOODGATE_RATE`,
//! `FLOODGATE_BURST`, `FLOODGATE_KEY` and `FLOODGATE_ALGORITHM`).
//!
//! ```
//! use std::num::NonZeroU32;
//! use actix_web::http::Method;
//! use floodgate::Limit;
//! use floodgate::policy::{KeySpec, Match, Rule, Rules};
//!
//! let login = Rule::new("login")
//!     .matching(Match::any().path("/login").methods([Method::POST]))
//!     .limit(Limit::new("login", "5/min".parse().unwrap(), NonZeroU32::new(5).unwrap()));
//! let default = Rule::new("default")
//!     .key("header:x-api-key+ip".parse::<KeySpec>().unwrap())
//!     .limit(Limit::new("default", "100/s".parse().unwrap(), NonZeroU32::new(200).unwrap()));
//! let rules = Rules::new(vec![login], default).unwrap();
//!
//! assert_eq!(&*rules.select(&Method::POST, "//%6Cogin/", None).name, "login");
//! assert_eq!(&*rules.select(&Method::GET, "/login", None).name, "default");
//! ```

mod keyspec;
pub(crate) mod matcher;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use actix_web::http::Method;
use actix_web::http::header::HeaderValue;
use bytes::Bytes;
use ipnet::IpNet;

use crate::key::canonical;
use crate::limiter::Limit;

pub use keyspec::{ExtractedKey, KeyPart, KeySpec, KeySpecError, SpecKey, client_addr};
pub use matcher::{HostPattern, HostPatternError, Match, normalize_path};

/// The name of the rule unmatched requests get.
pub const DEFAULT_RULE: &str = "default";

// === Lists ===

/// Who is never limited and who is always refused, and whether refusals
/// are only logged. A rule has its own; [`Rules::global`] holds
/// `FLOODGATE_ALLOW`, `FLOODGATE_DENY` and `FLOODGATE_SHADOW`, which apply to
/// every rule on top of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lists {
    /// Client networks never limited (still counted).
    pub allow: Vec<IpNet>,
    /// Key header values never limited.
    pub allow_keys: Vec<Bytes>,
    /// Client networks answered 403; deny wins over allow.
    pub deny: Vec<IpNet>,
    /// Decide and count, but refuse nothing.
    pub shadow: bool,
}

/// What the lists say about a request, before any limit is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The address is denied: answer 403, touch no limiter state.
    Deny,
    /// The address or a key value is allowed: never limited.
    Allow,
    /// Neither: the rule's limits decide.
    Limit,
}

fn contains(nets: &[IpNet], addr: IpAddr) -> bool {
    let addr = canonical(addr);
    nets.iter().any(|net| net.contains(&addr))
}

// === RuleLimit ===

/// One limit of a rule, with the key it counts when that is not the rule's.
#[derive(Debug, Clone)]
pub struct RuleLimit {
    /// The limit; its name is what `RateLimit-Policy` and a 429 show.
    pub limit: Limit,
    /// Counts this key instead of the rule's (e.g. `global`).
    pub key: Option<KeySpec>,
}

impl RuleLimit {
    /// The key this limit counts: its own, or else `rule`'s.
    pub fn key_spec<'a>(&'a self, rule: &'a Rule) -> &'a KeySpec {
        self.key.as_ref().unwrap_or(&rule.key)
    }
}

/// Limits are equal when everything that decides is: name, algorithm, rate,
/// burst (so their [`Limit::id`] is equal too), and key.
impl PartialEq for RuleLimit {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.limit, &other.limit);
        a.id() == b.id()
            && a.name() == b.name()
            && a.algorithm() == b.algorithm()
            && a.rate() == b.rate()
            && a.burst() == b.burst()
            && self.key == other.key
    }
}

impl Eq for RuleLimit {}

// === Rule ===

/// A named rule: which requests ([`Match`]), whom they count ([`KeySpec`]),
/// the limits that must all allow a request, and its lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique in a rule set, `[a-z0-9_-]+`.
    pub name: Arc<str>,
    /// Which requests this rule applies to (ignored for the default rule).
    pub matcher: Match,
    /// Whom the limits count, unless a limit names its own key.
    pub key: KeySpec,
    /// Every one must allow a request; none may refuse: a request passes
    /// only if all allow it. No limits: never limited.
    pub limits: Vec<RuleLimit>,
    /// Client networks never limited (still counted).
    pub allow: Vec<IpNet>,
    /// Header values never limited: a request whose key has a header part
    /// with one of these values (as counted: surrounding whitespace
    /// trimmed; for `Authorization` the scheme in lower case).
    pub allow_keys: Vec<Bytes>,
    /// Client networks answered 403.
    pub deny: Vec<IpNet>,
    /// Decide and count, but refuse nothing.
    pub shadow: bool,
}

impl Rule {
    /// A rule named `name` that fits every request, counts by `ip`, and has
    /// no limits or lists yet.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Rule {
            name: name.into(),
            matcher: Match::any(),
            key: KeySpec::ip(),
            limits: Vec::new(),
            allow: Vec::new(),
            allow_keys: Vec::new(),
            deny: Vec::new(),
            shadow: false,
        }
    }

    /// Applies to requests `matcher` fits.
    pub fn matching(mut self, matcher: Match) -> Self {
        self.matcher = matcher;
        self
    }

    /// Counts by `key`.
    pub fn key(mut self, key: KeySpec) -> Self {
        self.key = key;
        self
    }

    /// Adds a limit counting the rule's key.
    pub fn limit(mut self, limit: Limit) -> Self {
        self.limits.push(RuleLimit { limit, key: None });
        self
    }

    /// Adds a limit counting its own key.
    pub fn limit_by(mut self, limit: Limit, key: KeySpec) -> Self {
        self.limits.push(RuleLimit {
            limit,
            key: Some(key),
        });
        self
    }

    /// Never limits these client networks.
    pub fn allow(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.allow.extend(nets);
        self
    }

    /// Never limits requests whose key has one of these header values.
    pub fn allow_keys(mut self, values: impl IntoIterator<Item = Bytes>) -> Self {
        self.allow_keys.extend(values);
        self
    }

    /// Answers these client networks 403.
    pub fn deny(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.deny.extend(nets);
        self
    }

    /// Whether refusals are only logged.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Whether `addr` (the client address through trusted proxies) is
    /// denied by this rule or by `global`.
    pub fn is_denied(&self, addr: IpAddr, global: &Lists) -> bool {
        contains(&self.deny, addr) || contains(&global.deny, addr)
    }

    /// Whether the request is exempt from this rule's limits: `addr` in an
    /// `allow` list, or one of `header_values` (the values of its key's
    /// header parts, [`ExtractedKey::header_values`]) in an `allow_keys`
    /// list. Says nothing of `deny`, which wins: see [`access`](Self::access).
    pub fn is_allowed(
        &self,
        addr: Option<IpAddr>,
        header_values: &[HeaderValue],
        global: &Lists,
    ) -> bool {
        let by_addr = addr.is_some_and(|a| contains(&self.allow, a) || contains(&global.allow, a));
        by_addr
            || header_values.iter().any(|v| {
                let v = v.as_bytes();
                self.allow_keys
                    .iter()
                    .chain(&global.allow_keys)
                    .any(|k| k == v)
            })
    }

    /// Deny, allow or limit, deny winning.
    pub fn access(
        &self,
        addr: Option<IpAddr>,
        header_values: &[HeaderValue],
        global: &Lists,
    ) -> Access {
        if addr.is_some_and(|a| self.is_denied(a, global)) {
            Access::Deny
        } else if self.is_allowed(addr, header_values, global) {
            Access::Allow
        } else {
            Access::Limit
        }
    }

    /// Whether this rule only logs refusals: its own `shadow`, or
    /// `FLOODGATE_SHADOW=true`, which wins over a rule's `false`.
    pub fn is_shadow(&self, global: &Lists) -> bool {
        self.shadow || global.shadow
    }

    /// The key specs this rule's limits count, each once, the rule's own
    /// first when a limit uses it.
    pub fn key_specs(&self) -> impl Iterator<Item = &KeySpec> {
        let mut seen: Vec<&KeySpec> = Vec::new();
        for l in &self.limits {
            let spec = l.key_spec(self);
            if !seen.contains(&spec) {
                seen.push(spec);
            }
        }
        seen.into_iter()
    }
}

// === Rules ===

/// A rule set: rules tried in order, and the default rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
    default: Rule,
    global: Lists,
}

/// Why a rule set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// A name that is empty or not `[a-z0-9_-]+`.
    #[error("rule name {0:?}: expected lower-case letters, digits, _ and - only")]
    BadName(String),
    /// Two rules with one name.
    #[error("rule name {0:?} is used twice; names are unique")]
    DuplicateName(String),
    /// A rule with the default rule's name.
    #[error("rule name {0:?} is reserved for the rule unmatched requests get")]
    ReservedName(String),
    /// Two limits with one name.
    // TODO: limit state is identified by name and algorithm today; once
    // limits carry their rule and key in their identity (`Limit::scoped`),
    // names only need to be unique within a rule.
    #[error(
        "limit name {limit:?} is used by rule {first:?} and rule {second:?}; limit names are unique across rules"
    )]
    DuplicateLimitName {
        /// The limit name.
        limit: String,
        /// The first rule using it.
        first: String,
        /// The other rule using it.
        second: String,
    },
}

/// `[a-z0-9_-]+`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Rules {
    /// A rule set: `rules` in matching order, `default` for requests none
    /// fits (its [`Match`] is not consulted). Refuses bad or repeated rule
    /// names, a rule named as the default, and a limit name used twice.
    pub fn new(rules: Vec<Rule>, default: Rule) -> Result<Self, RulesError> {
        Rules::check(&rules, &default).map_err(|mut errors| errors.remove(0))?;
        Ok(Rules {
            rules,
            default,
            global: Lists::default(),
        })
    }

    /// Every problem [`new`](Self::new) would refuse, in order.
    pub fn check(rules: &[Rule], default: &Rule) -> Result<(), Vec<RulesError>> {
        let mut errors = Vec::new();
        if !is_valid_name(&default.name) {
            errors.push(RulesError::BadName(default.name.to_string()));
        }
        let mut limit_names: Vec<(&str, &str)> = Vec::new();
        for (i, rule) in rules.iter().chain([default]).enumerate() {
            if i < rules.len() {
                let error = if !is_valid_name(&rule.name) {
                    Some(RulesError::BadName(rule.name.to_string()))
                } else if rule.name == default.name {
                    Some(RulesError::ReservedName(rule.name.to_string()))
                } else if rules[..i].iter().any(|r| r.name == rule.name) {
                    Some(RulesError::DuplicateName(rule.name.to_string()))
                } else {
                    None
                };
                if let Some(error) = error {
                    // Its limits' names (often the rule's) would only
                    // repeat the problem.
                    errors.push(error);
                    continue;
                }
            }
            for l in &rule.limits {
                let name = l.limit.name();
                if let Some((_, first)) = limit_names.iter().find(|(n, _)| *n == name) {
                    errors.push(RulesError::DuplicateLimitName {
                        limit: name.to_owned(),
                        first: (*first).to_owned(),
                        second: rule.name.to_string(),
                    });
                } else {
                    limit_names.push((name, &rule.name));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Only the default rule.
    pub fn single(default: Rule) -> Result<Self, RulesError> {
        Rules::new(Vec::new(), default)
    }

    /// With these global lists (`FLOODGATE_ALLOW`, `FLOODGATE_DENY`,
    /// `FLOODGATE_SHADOW`).
    pub fn with_global(mut self, global: Lists) -> Self {
        self.global = global;
        self
    }

    /// The rule for a request: the first whose [`Match`] fits, else the
    /// default. `path` is the request path as sent (normalised here, see
    /// [`normalize_path`]); `host` the request's host, port allowed.
    pub fn select(&self, method: &Method, path: &str, host: Option<&str>) -> &Rule {
        let path = normalize_path(path);
        self.rules
            .iter()
            .find(|rule| rule.matcher.fits(method, &path, host))
            .unwrap_or(&self.default)
    }

    /// The rules in matching order, without the default.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// The rule for requests no other rule fits.
    pub fn default_rule(&self) -> &Rule {
        &self.default
    }

    /// The lists that apply to every rule.
    pub fn global(&self) -> &Lists {
        &self.global
    }

    /// Every limit of every rule, the default's last, with its rule.
    pub fn limits(&self) -> impl Iterator<Item = (&Rule, &RuleLimit)> {
        self.rules
            .iter()
            .chain([&self.default])
            .flat_map(|rule| rule.limits.iter().map(move |l| (rule, l)))
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Deny => "deny",
            Access::Allow => "allow",
            Access::Limit => "limit",
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
