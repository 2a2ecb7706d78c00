//! Which requests a rule applies to: a path prefix (matched after
//! normalisation, so a rule cannot be dodged by spelling the path another
//! way), a list of methods and a host pattern.
//!
//! # Path normalisation
//!
//! [`normalize_path`] is applied to the request path before matching, and to
//! a rule's own `path` when the rule is built:
//!
//! * percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded (`/%6Cogin` is `/login`); other escapes stay, with their hex
//!   digits in upper case (`%3a` is `%3A`); `%25` is never decoded further,
//!   and a `%` that starts no escape is taken as a literal `%25`;
//! * an encoded slash (`%2F`, `%2f`), an encoded backslash (`%5C`) and a
//!   bare backslash count as `/`: some upstreams decode them into path
//!   separators, and a rule on `/admin` must not be dodged by
//!   `/admin%2Fusers` or `/admin\users`;
//! * repeated slashes are merged (`//login` is `/login`);
//! * dot segments are removed (RFC 3986 §5.2.4: `/static/../login` is
//!   `/login`, also when spelled `%2e%2e`); `..` never climbs above `/`;
//! * the query (`?…`) and fragment (`#…`) are not part of the path;
//! * a segment's `;` parameters are not part of it (`/login;jsessionid=1`
//!   is `/login`, `/x/..;/login` is `/login`): Tomcat, Jetty and Spring
//!   strip them before routing, so a rule on `/login` must not be dodged by
//!   adding one.
//!
//! This is for matching only: the upstream sees the request path exactly as
//! the client sent it. Paths are compared case-sensitively (RFC 3986).

use std::borrow::Cow;

use actix_web::http::Method;

/// What a rule applies to. Every part that is set must fit; an empty
/// `Match` fits every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    path: Option<String>,
    methods: Vec<Method>,
    host: Option<HostPattern>,
}

impl Match {
    /// Fits every request.
    pub fn any() -> Self {
        Match::default()
    }

    /// Only requests whose normalised path is `prefix` or below it, segment
    /// by segment: `/api` fits `/api`, `/api/` and `/api/x`, not `/apix`.
    /// The prefix is normalised as request paths are (a trailing slash does
    /// not matter; `/` fits every path).
    pub fn path(mut self, prefix: &str) -> Self {
        let normalized = normalize_path(prefix);
        let trimmed = normalized.trim_end_matches('/');
        self.path = Some(if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        });
        self
    }

    /// Only requests with one of these methods (an empty list: any method).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Only requests for this host (see [`HostPattern`]).
    pub fn host(mut self, host: HostPattern) -> Self {
        self.host = Some(host);
        self
    }

    /// The path prefix, normalised, if one is set.
    pub fn path_prefix(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The methods, empty for any.
    pub fn method_list(&self) -> &[Method] {
        &self.methods
    }

    /// The host pattern, if one is set.
    pub fn host_pattern(&self) -> Option<&HostPattern> {
        self.host.as_ref()
    }

    /// Whether a request fits. `path` must already be normalised
    /// ([`normalize_path`]); `host` is the request's host, with or without
    /// a port (`None`: a request without one fits no host pattern).
    pub fn fits(&self, method: &Method, path: &str, host: Option<&str>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        if let Some(prefix) = &self.path
            && !path_has_prefix(path, prefix)
        {
            return false;
        }
        match &self.host {
            None => true,
            Some(pattern) => host.is_some_and(|h| pattern.fits(h)),
        }
    }
}

/// Whether `path` is `prefix` or below it, segment by segment. `prefix` has
/// no trailing slash (or is `/`).
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

// === HostPattern ===

/// A request host to match, compared case-insensitively and without the
/// port: `example.com` exactly, or `*.example.com`, which fits every
/// subdomain (`a.example.com`, `a.b.example.com`) and not `example.com`
/// itself. An IP address (`192.0.2.1`, `[::1]` or `::1`) is an exact host.
/// A trailing dot on the request's host (`example.com.`) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// This host, in lower case.
    Exact(String),
    /// Subdomains of this domain: holds `.example.com`, in lower case.
    Subdomains(String),
}

/// Why a host pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a host name such as example.com or *.example.com (no port, no other wildcard)")]
pub struct HostPatternError;

impl std::str::FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let literal = lower.strip_prefix('[').and_then(|l| l.strip_suffix(']'));
        if let Ok(addr) = literal.unwrap_or(&lower).parse::<std::net::IpAddr>() {
            return Ok(HostPattern::Exact(addr.to_string()));
        }
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, lower.as_str()),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(HostPatternError);
        }
        Ok(if wild {
            HostPattern::Subdomains(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Subdomains(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl HostPattern {
    /// Whether the request host `host` (maybe with `:port`, maybe an
    /// `[IPv6]` literal) fits.
    pub fn fits(&self, host: &str) -> bool {
        let host = strip_port(host.trim());
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Subdomains(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `::1`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(addr, _)| addr);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.contains(':') => {
            name
        }
        _ => host,
    }
}

// === normalize_path ===

/// The path as rules see it (see the module docs): unreserved escapes
/// decoded, `%2F`, `%5C` and `\` as `/`, repeated slashes merged, dot
/// segments removed, query and fragment cut. Borrows when the path is
/// already normal, which is the common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    // 1. Decode, with every separator spelling made a '/'.
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'?' | b'#' => break,
            b'\\' => decoded.push(b'/'),
            b'%' if i + 2 < bytes.len()
                && hex(bytes[i + 1]).is_some()
                && hex(bytes[i + 2]).is_some() =>
            {
                let value = hex(bytes[i + 1]).unwrap_or(0) << 4 | hex(bytes[i + 2]).unwrap_or(0);
                if is_unreserved(value) {
                    decoded.push(value);
                } else if value == b'/' || value == b'\\' {
                    decoded.push(b'/');
                } else {
                    decoded.push(b'%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase());
                    decoded.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
            // A '%' that starts no escape is a literal percent sign: written
            // as its escape, so that it cannot combine with what a decoded
            // character leaves behind into a new escape ("%3%30" is not
            // "%30" on a second look).
            b'%' => decoded.extend_from_slice(b"%25"),
            b => decoded.push(b),
        }
        i += 1;
    }
    // 2. Segments: empty ones merged away, dot segments resolved.
    let ends_with_slash = decoded.last() == Some(&b'/')
        || decoded.ends_with(b"/.")
        || decoded.ends_with(b"/..")
        || decoded == b"."
        || decoded == b"..";
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|b| *b == b'/') {
        // Up to its first ';': path parameters are not part of the name.
        let segment = segment.split(|b| *b == b';').next().unwrap_or_default();
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() || (ends_with_slash && !segments.is_empty()) {
        out.push(b'/');
    }
    // Only ASCII was decoded or moved, so the text is still UTF-8.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

/// A path [`normalize_path`] would return unchanged.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | b'\\' | b'?' | b'#' | b';' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // "/." followed by end, '/', or ".": a dot segment.
                match bytes.get(i + 1) {
                    None | Some(b'/') => return false,
                    Some(b'.') if matches!(bytes.get(i + 2), None | Some(b'/')) => return false,
                    _ => {}
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> String {
        normalize_path(path).into_owned()
    }

    #[test]
    fn spellings_of_login_all_normalise_to_it() {
        for path in [
            "/login",
            "/%6Cogin",
            "/%6cogin",
            "//login",
            "///login",
            "/static/../login",
            "/static/%2e%2e/login",
            "/./login",
            "/../login",
            "/login?x=1",
            "login",
        ] {
            assert_eq!(n(path), "/login", "{path}");
        }
        assert_eq!(n("/login/"), "/login/");
        assert_eq!(n("/login/."), "/login/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n(""), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/"), "/");
    }

    #[test]
    fn path_parameters_are_not_part_of_a_segment() {
        assert_eq!(n("/login;jsessionid=1"), "/login");
        assert_eq!(n("/x/..;/login"), "/login");
        assert_eq!(n("/a;b/c;d/"), "/a/c/");
        assert_eq!(n("/;x/login"), "/login");
        // An encoded ';' is a character of the name, as upstreams read it.
        assert_eq!(n("/login%3Bx"), "/login%3Bx");
    }

    #[test]
    fn encoded_and_back_slashes_are_separators() {
        assert_eq!(n("/admin%2Fusers"), "/admin/users");
        assert_eq!(n("/admin%2fusers"), "/admin/users");
        assert_eq!(n("/admin%5Cusers"), "/admin/users");
        assert_eq!(n("/admin\\users"), "/admin/users");
        assert_eq!(n("/x/..%2Fadmin"), "/admin");
    }

    #[test]
    fn other_escapes_stay_with_upper_case_hex() {
        assert_eq!(n("/a%3ab"), "/a%3Ab");
        assert_eq!(n("/a%252Fb"), "/a%252Fb", "no double decoding");
        assert_eq!(n("/a%zz"), "/a%25zz", "a lone % is a literal percent");
        assert_eq!(n("/a%2"), "/a%252");
        assert_eq!(n("/%3%30"), "/%2530", "stable under a second pass");
        assert_eq!(n("/caf\u{e9}/%41"), "/caf\u{e9}/A");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in [
            "/",
            "/login",
            "/a/b.c/d",
            "/.well-known/x",
            "/a/..b",
            "/a/.b",
        ] {
            assert!(matches!(normalize_path(path), Cow::Borrowed(_)), "{path}");
        }
    }

    #[test]
    fn path_prefixes_are_segment_aware() {
        let m = Match::any().path("/login");
        let get = Method::GET;
        for path in ["/login", "/login/", "/login/x"] {
            assert!(m.fits(&get, path, None), "{path}");
        }
        for path in ["/loginx", "/log", "/", "/x/login"] {
            assert!(!m.fits(&get, path, None), "{path}");
        }
        assert!(Match::any().path("/").fits(&get, "/anything", None));
        assert_eq!(Match::any().path("/api/").path_prefix(), Some("/api"));
        assert_eq!(Match::any().path("//%61pi").path_prefix(), Some("/api"));
    }

    #[test]
    fn methods_must_be_listed() {
        let m = Match::any().methods([Method::POST, Method::PUT]);
        assert!(m.fits(&Method::POST, "/", None));
        assert!(m.fits(&Method::PUT, "/", None));
        assert!(!m.fits(&Method::GET, "/", None));
        assert!(Match::any().fits(&Method::DELETE, "/", None));
    }

    #[test]
    fn hosts_exact_and_wildcard_case_insensitive_without_port() {
        let exact: HostPattern = "Example.COM".parse().unwrap();
        assert!(exact.fits("example.com"));
        assert!(exact.fits("EXAMPLE.com:8080"));
        assert!(exact.fits("example.com."));
        assert!(!exact.fits("a.example.com"));
        assert!(!exact.fits("example.org"));
        let wild: HostPattern = "*.example.com".parse().unwrap();
        assert!(wild.fits("a.example.com"));
        assert!(wild.fits("A.B.Example.Com:443"));
        assert!(!wild.fits("example.com"));
        assert!(!wild.fits("badexample.com"));
        assert!(!wild.fits(".example.com"), "an empty label is no subdomain");
        let v6: HostPattern = "[::1]".parse().unwrap();
        assert!(v6.fits("[::1]:8080"));
        assert!(v6.fits("[::1]"));
        assert_eq!(v6, "::1".parse().unwrap());
        assert!(
            "192.0.2.1"
                .parse::<HostPattern>()
                .unwrap()
                .fits("192.0.2.1:80")
        );
        let m = Match::any().host(wild.clone());
        assert!(!m.fits(&Method::GET, "/", None), "no host fits no pattern");
        assert_eq!(wild.to_string(), "*.example.com");
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "example.com:80",
            "a..b",
            "ex ample.com",
            "**.a",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?}");
        }
    }
}
