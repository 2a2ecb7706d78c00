//! Who a request is counted against.
//!
//! The stock extractors cover what operators configure with `FLOODGATE_KEY`:
//! the client address ([`ClientIp`], optionally read from `X-Forwarded-For`
//! set by trusted proxies) and an API-key header ([`HeaderKey`]); [`Global`]
//! counts every request as one key. Embedders can implement [`KeyExtractor`]
//! for anything else.
//!
//! A key that is a secret (an API key) is never stored or shown in clear:
//! Redis key names carry its [`Fingerprint`] instead, and logs a shortened
//! form.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::limiter::RateKey;

/// Default IPv6 grouping: one /64 is what a single subscriber usually gets,
/// so counting per /64 stops a client from rotating through its own addresses.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// Derives the [`RateKey`] for a request.
pub trait KeyExtractor: Send + Sync + 'static {
    /// Runs once per request, before any backend is asked. An `Err` answers
    /// the request with `400 Bad Request` and counts against nothing.
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError>;
}

/// Why no key could be derived. Each is the client's fault (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The address is the key (or the fallback) but the request has none:
    /// a connection that is not TCP, or a test request built without one.
    #[error("the connection has no peer address")]
    NoPeerAddress,
    /// The request carries the key header more than once ([`HeaderKey`]).
    #[error("more than one {0} header: the rate-limit key is ambiguous")]
    AmbiguousHeader(HeaderName),
    /// The request's `Connection` header names the key header, asking for
    /// the header that was counted to be stripped ([`HeaderKey`]).
    #[error("the Connection header names {0}, the rate-limit key header")]
    KeyHeaderInConnection(HeaderName),
}

impl<T: KeyExtractor + ?Sized> KeyExtractor for Arc<T> {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        (**self).extract(req)
    }
}

// === Global ===

/// Every request shares one key: a limit for the whole upstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _req: &ServiceRequest) -> Result<RateKey, KeyError> {
        Ok(RateKey::global())
    }
}

// === ClientIp ===

/// The client's address: the TCP peer, or, when the peer is a trusted proxy,
/// the address that proxy saw, read from `X-Forwarded-For`.
///
/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) count as the IPv4 address,
/// and IPv6 addresses are grouped by a prefix (default /64).
///
/// # Spoofing
///
/// `X-Forwarded-For` is whatever the client wrote, plus whatever each proxy
/// appended. It is read only when the TCP peer is in `trusted`, and then right
/// to left: the first address that is not itself a trusted proxy is the client.
/// Taking the leftmost address instead (as some middlewares do) lets any
/// client pick its own key by sending the header. List only proxies you run.
#[derive(Debug, Clone)]
pub struct ClientIp {
    trusted: Arc<[IpNet]>,
    ipv6_prefix: u8,
}

impl Default for ClientIp {
    fn default() -> Self {
        ClientIp {
            trusted: Arc::from(Vec::new()),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }
}

impl ClientIp {
    /// The TCP peer's address, trusting no proxy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Believe `X-Forwarded-For` from peers in these networks.
    pub fn trust(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted = proxies.into_iter().map(|n| n.trunc()).collect();
        self
    }

    /// Group IPv6 clients by this prefix length (0–128).
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix.min(128);
        self
    }

    /// Whether `addr` is a trusted proxy.
    pub fn is_trusted(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.trusted.iter().any(|net| net.contains(&addr))
    }

    /// The client address for a request from `peer` with `headers`, before
    /// IPv6 grouping.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.trusted.is_empty()
            || !self.is_trusted(peer)
            || connection_names(headers, &header::X_FORWARDED_FOR)
        {
            // A trusted proxy that names X-Forwarded-For in `Connection`
            // meant it for this hop alone; the upstream is not shown it
            // either (`proxy::write_request_head`).
            return peer;
        }
        // Walk every X-Forwarded-For line, right to left. The rightmost entry
        // was written by our peer, a trusted proxy; each entry left of a
        // trusted address was written by that trusted proxy too. The first
        // untrusted address is the client. If the chain runs out (or turns
        // to garbage) the last address we could believe is used, as nginx's
        // `real_ip_recursive` does.
        let lines: Vec<&HeaderValue> = headers.get_all(header::X_FORWARDED_FOR).collect();
        let mut client = peer;
        for line in lines.iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let Some(addr) = parse_forwarded_addr(entry) else {
                    return client;
                };
                client = canonical(addr);
                if !self.is_trusted(client) {
                    return client;
                }
            }
        }
        client
    }

    /// The key for a client address: IPv6 grouped by the prefix.
    pub fn key_for(&self, addr: IpAddr) -> RateKey {
        RateKey::ip(match canonical(addr) {
            IpAddr::V6(v6) => IpAddr::V6(mask_v6(v6, self.ipv6_prefix)),
            v4 => v4,
        })
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        let peer = req.peer_addr().ok_or(KeyError::NoPeerAddress)?.ip();
        Ok(self.key_for(self.client_addr(peer, req.headers())))
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn mask_v6(addr: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = match prefix {
        0 => 0,
        p if p >= 128 => u128::MAX,
        p => u128::MAX << (128 - u32::from(p)),
    };
    Ipv6Addr::from(bits & mask)
}

/// An `X-Forwarded-For` entry: `192.0.2.1`, `2001:db8::1`, or with a port
/// (`192.0.2.1:5555`, `[2001:db8::1]:5555`).
fn parse_forwarded_addr(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
}

// === HeaderKey ===

/// An API key from a request header, e.g. `X-Api-Key`.
///
/// Header names are case-insensitive, so `X-API-KEY` and `x-api-key` are the
/// same header and cannot be used to get a second budget. Nor can spellings
/// of one value that the upstream reads alike: the value's surrounding
/// whitespace is not part of the key, and for `Authorization` neither is the
/// case of the auth scheme nor the amount of whitespace after it
/// (RFC 9110 §11.1). A request without the header (or with it empty or
/// blank) is counted by client address instead, using `fallback`. A request
/// carrying the header twice is refused (400): which of
/// the two the upstream would authenticate is not ours to guess, and taking
/// either would let a client pair its real key with a fresh one. So is a
/// request whose `Connection` header names the key header, which would ask
/// us to strip the very header we counted.
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
    fallback: ClientIp,
}

impl HeaderKey {
    /// Counts by the value of the `name` header, and requests without it by
    /// address as `fallback` derives it (so give `fallback` the same trusted
    /// proxies and IPv6 prefix as an IP-keyed limit would have).
    pub fn new(name: HeaderName, fallback: ClientIp) -> Self {
        HeaderKey { name, fallback }
    }

    /// The header counted by, in lower case.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        match header_value(&self.name, req.headers())? {
            Some(value) => Ok(RateKey::header(value)),
            None => self.fallback.extract(req),
        }
    }
}

/// The value of the key header `name` as [`HeaderKey`] counts it: `Ok(None)`
/// when the request has none (or it is empty or blank, after the
/// normalisation [`HeaderKey`] describes), and the same refusals: the header
/// twice, or named in `Connection`. Rules with composite keys use it for
/// each header part.
pub fn header_value(
    name: &HeaderName,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, KeyError> {
    if connection_names(headers, name) {
        return Err(KeyError::KeyHeaderInConnection(name.clone()));
    }
    let mut values = headers.get_all(name);
    match (values.next(), values.next()) {
        (Some(_), Some(_)) => Err(KeyError::AmbiguousHeader(name.clone())),
        (Some(value), None) => Ok(normalize(name, value)),
        (None, _) => Ok(None),
    }
}

/// The value as the upstream reads it (see [`normalize_credentials`] and
/// [`trim_ows`]), or `None` when nothing is left. Allocates only when the
/// value changes.
fn normalize(name: &HeaderName, value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    let normalized = if is_credentials_header(name) {
        normalize_credentials(bytes)
    } else {
        Cow::Borrowed(trim_ows(bytes))
    };
    if normalized.is_empty() {
        return None;
    }
    if normalized.len() == bytes.len() && *normalized == *bytes {
        return Some(value.clone());
    }
    // Only removes whitespace and lower-cases ASCII: still a valid value.
    HeaderValue::from_bytes(&normalized).ok()
}

/// Headers holding `credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`
/// (RFC 9110 §11.4, §11.7.2).
fn is_credentials_header(name: &HeaderName) -> bool {
    *name == header::AUTHORIZATION || *name == header::PROXY_AUTHORIZATION
}

/// A header value without its optional whitespace (RFC 9110 §5.5: `OWS`,
/// spaces and tabs, before and after the value is not part of it).
pub(crate) fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// An `Authorization` value as an upstream compares it (RFC 9110 §11.1):
/// the auth scheme is case-insensitive, so it is lower-cased; the spaces (or
/// tabs, which lenient servers accept) between scheme and credentials become
/// one space; surrounding whitespace goes. The credentials themselves
/// (`token68` or auth-params) stay exactly as sent: they are case-sensitive.
/// So `Bearer tok`, `bearer tok`, `BEARER  tok` and `Bearer\ttok` are one
/// key, and `Bearer Tok` another.
pub(crate) fn normalize_credentials(value: &[u8]) -> Cow<'_, [u8]> {
    let value = trim_ows(value);
    let scheme_len = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_len);
    let credentials = trim_ows(rest);
    let canonical = !scheme.iter().any(u8::is_ascii_uppercase)
        && (credentials.is_empty() || (rest.len() == credentials.len() + 1 && rest[0] == b' '));
    if canonical {
        return Cow::Borrowed(value);
    }
    let mut out = Vec::with_capacity(scheme.len() + 1 + credentials.len());
    out.extend(scheme.iter().map(u8::to_ascii_lowercase));
    if !credentials.is_empty() {
        out.push(b' ');
        out.extend_from_slice(credentials);
    }
    Cow::Owned(out)
}

/// Whether any `Connection` header lists `name`.
pub(crate) fn connection_names(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(header::CONNECTION)
        .flat_map(|value| crate::headers::tokens(value.as_bytes()))
        .any(|token| token.eq_ignore_ascii_case(name.as_str().as_bytes()))
}

// === Fingerprint ===

/// Bytes in a [`Fingerprint`]: 128 bits, so that no two of the keys one
/// deployment ever sees share one by chance (about n²/2¹²⁹).
pub const FINGERPRINT_LEN: usize = 16;

/// What [`Fingerprinter::new`] derives its key with (BLAKE3 `derive_key`
/// context: unique to this use, fixed forever, so fingerprints stay stable
/// across versions).
const FINGERPRINT_CONTEXT: &str = "floodgate 2026-12 rate-limit key fingerprint v1";

/// The scope fingerprints are made in when nothing else is said: the
/// default Redis prefix, so logs and Redis key names agree out of the box.
pub const DEFAULT_FINGERPRINT_SCOPE: &[u8] = b"floodgate:";

/// Computes [`Fingerprint`]s: the one way floodgate turns a secret it counts
/// by (an API key) into something it may store or show. Redis key names use
/// it, and so should anything else that has to name a key (logs, metrics,
/// admin answers), so that one key has one fingerprint everywhere.
///
/// It is keyed BLAKE3, keyed by a *scope*: replicas that share state pass the
/// same scope (floodgate uses the Redis prefix, `FLOODGATE_REDIS_PREFIX`),
/// and get the same fingerprints; fingerprints from deployments with other
/// scopes cannot be compared with them. The scope is not a secret (the prefix
/// is in every Redis key name): whoever knows it can still test a guessed API
/// key against a fingerprint, one hash per guess, so fingerprints protect
/// long random API keys, not short guessable ones.
#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 32],
}

impl Fingerprinter {
    /// Fingerprints under `scope` (floodgate passes its Redis prefix).
    pub fn new(scope: &[u8]) -> Self {
        Fingerprinter {
            key: blake3::derive_key(FINGERPRINT_CONTEXT, scope),
        }
    }

    /// The fingerprint of `secret`.
    pub fn fingerprint(&self, secret: &[u8]) -> Fingerprint {
        let hash = blake3::keyed_hash(&self.key, secret);
        let mut out = [0; FINGERPRINT_LEN];
        out.copy_from_slice(&hash.as_bytes()[..FINGERPRINT_LEN]);
        Fingerprint(out)
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter { .. }")
    }
}

/// A short keyed hash of a secret (see [`Fingerprinter`]); shown as 32
/// lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl Fingerprint {
    /// The raw [`FINGERPRINT_LEN`] bytes, for a caller that stores them in
    /// binary rather than as hex.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_LEN] {
        &self.0
    }

    /// Reads the form [`Display`](fmt::Display) writes: exactly 32 hex
    /// digits (either case). `None` for anything else.
    pub fn from_hex(text: &str) -> Option<Fingerprint> {
        let text = text.as_bytes();
        if text.len() != 2 * FINGERPRINT_LEN {
            return None;
        }
        let digit = |b: u8| {
            char::from(b)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        let mut out = [0; FINGERPRINT_LEN];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(Fingerprint(out))
    }

    /// Appends the hex form to `out` (no formatting machinery).
    pub fn write_hex(&self, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in self.0 {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = Vec::with_capacity(2 * FINGERPRINT_LEN);
        self.write_hex(&mut hex);
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(
                header::X_FORWARDED_FOR,
                HeaderValue::from_str(line).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let extractor = ClientIp::new();
        let got = extractor.client_addr(ip("203.0.113.9"), &xff(&["198.51.100.1"]));
        assert_eq!(got, ip("203.0.113.9"));
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        let got = extractor.client_addr(ip("203.0.113.9"), &xff(&["198.51.100.1"]));
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_chain_is_walked_right_to_left_over_every_line() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        // Client wrote a lie; the edge proxy appended the real address; an
        // inner proxy appended the edge proxy on a second line.
        let headers = xff(&["1.1.1.1, 203.0.113.7", "10.0.0.2"]);
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn a_chain_the_trusted_peer_names_in_connection_is_not_read() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        let mut headers = xff(&["203.0.113.7"]);
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Forwarded-For"),
        );
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("10.0.0.3"),
            "the upstream is not shown that chain either"
        );
    }

    #[test]
    fn all_trusted_chain_yields_the_leftmost_address() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        let headers = xff(&["10.1.1.1, 10.0.0.2"]);
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_believable_address() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        let headers = xff(&["unknown, 10.0.0.2"]);
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn forwarded_entries_may_carry_ports() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        let headers = xff(&["[2001:db8::5]:4711, 192.0.2.8:80"]);
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("192.0.2.8")
        );
        let headers = xff(&["[2001:db8::5]:4711"]);
        assert_eq!(
            extractor.client_addr(ip("10.0.0.3"), &headers),
            ip("2001:db8::5")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4_everywhere() {
        let extractor = ClientIp::new().trust([net("10.0.0.0/8")]);
        assert!(extractor.is_trusted(ip("::ffff:10.0.0.1")));
        assert_eq!(
            extractor.key_for(ip("::ffff:192.0.2.1")),
            RateKey::ip(ip("192.0.2.1"))
        );
    }

    #[test]
    fn ipv6_is_grouped_by_prefix() {
        let extractor = ClientIp::new();
        assert_eq!(
            extractor.key_for(ip("2001:db8:1:2:aaaa::1")),
            extractor.key_for(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            extractor.key_for(ip("2001:db8:1:2::1")),
            extractor.key_for(ip("2001:db8:1:3::1"))
        );
        let per_address = ClientIp::new().ipv6_prefix(128);
        assert_ne!(
            per_address.key_for(ip("2001:db8:1:2::1")),
            per_address.key_for(ip("2001:db8:1:2::2"))
        );
        assert_eq!(
            mask_v6("2001:db8::1".parse().unwrap(), 0),
            Ipv6Addr::UNSPECIFIED
        );
    }

    fn header_key() -> HeaderKey {
        HeaderKey::new(HeaderName::from_static("x-api-key"), ClientIp::new())
    }

    fn peer() -> std::net::SocketAddr {
        "192.0.2.50:1234".parse().unwrap()
    }

    #[test]
    fn header_key_is_the_value_whatever_the_name_case() {
        let a = TestRequest::default()
            .peer_addr(peer())
            .insert_header(("X-API-KEY", "k1"))
            .to_srv_request();
        let b = TestRequest::default()
            .peer_addr(peer())
            .insert_header(("x-api-key", "k1"))
            .to_srv_request();
        assert_eq!(header_key().extract(&a), header_key().extract(&b));
        assert_eq!(
            header_key().extract(&a),
            Ok(RateKey::header(HeaderValue::from_static("k1")))
        );
    }

    #[test]
    fn missing_or_empty_header_falls_back_to_the_client_address() {
        let fallback = Ok(RateKey::ip(ip("192.0.2.50")));
        let none = TestRequest::default().peer_addr(peer()).to_srv_request();
        assert_eq!(header_key().extract(&none), fallback);
        let empty = TestRequest::default()
            .peer_addr(peer())
            .insert_header(("x-api-key", ""))
            .to_srv_request();
        assert_eq!(header_key().extract(&empty), fallback);
    }

    #[test]
    fn two_key_headers_are_refused() {
        let req = TestRequest::default()
            .peer_addr(peer())
            .append_header(("x-api-key", "victim"))
            .append_header(("X-Api-Key", "fresh"))
            .to_srv_request();
        assert!(matches!(
            header_key().extract(&req),
            Err(KeyError::AmbiguousHeader(_))
        ));
    }

    #[test]
    fn naming_the_key_header_in_connection_is_refused() {
        let req = TestRequest::default()
            .peer_addr(peer())
            .insert_header(("x-api-key", "k1"))
            .insert_header(("connection", "keep-alive, X-Api-Key"))
            .to_srv_request();
        assert!(matches!(
            header_key().extract(&req),
            Err(KeyError::KeyHeaderInConnection(_))
        ));
    }

    fn auth_key() -> HeaderKey {
        HeaderKey::new(header::AUTHORIZATION, ClientIp::new())
    }

    fn key_with(extractor: &HeaderKey, value: &[u8]) -> Result<RateKey, KeyError> {
        let req = TestRequest::default()
            .peer_addr(peer())
            .insert_header((
                extractor.name().clone(),
                HeaderValue::from_bytes(value).unwrap(),
            ))
            .to_srv_request();
        extractor.extract(&req)
    }

    #[test]
    fn authorization_spellings_the_upstream_reads_alike_are_one_key() {
        let spent = key_with(&auth_key(), b"Bearer tok").unwrap();
        assert_eq!(
            spent,
            RateKey::header(HeaderValue::from_static("bearer tok"))
        );
        for spelling in [
            &b"bearer tok"[..],
            b"BEARER tok",
            b"Bearer  tok",
            b"Bearer\ttok",
            b" Bearer tok ",
            b"\tBeArEr \t tok\t",
        ] {
            assert_eq!(
                key_with(&auth_key(), spelling).as_ref(),
                Ok(&spent),
                "{:?}",
                spelling.escape_ascii().to_string()
            );
        }
        assert_ne!(key_with(&auth_key(), b"Bearer Tok"), Ok(spent.clone()));
        assert_ne!(key_with(&auth_key(), b"Basic tok"), Ok(spent));
    }

    #[test]
    fn credentials_normalisation_keeps_the_credentials_as_sent() {
        for (sent, key) in [
            (&b"Bearer tok"[..], &b"bearer tok"[..]),
            (b"bearer tok", b"bearer tok"),
            (b"Bearer Tok=", b"bearer Tok="),
            (
                b"Digest  username=\"A\", realm=\"r\"",
                b"digest username=\"A\", realm=\"r\"",
            ),
            (b"Negotiate", b"negotiate"),
            (b"  ", b""),
            (b"", b""),
        ] {
            assert_eq!(
                &*normalize_credentials(sent),
                key,
                "{}",
                sent.escape_ascii()
            );
        }
        assert!(matches!(
            normalize_credentials(b"bearer tok"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn any_key_header_loses_its_optional_whitespace_and_nothing_else() {
        let k1 = Ok(RateKey::header(HeaderValue::from_static("k1")));
        for spelling in [&b"k1"[..], b" k1", b"k1 ", b"\tk1\t "] {
            assert_eq!(key_with(&header_key(), spelling), k1);
        }
        // Case and inner whitespace of other headers are the upstream's to read.
        assert_ne!(key_with(&header_key(), b"K1"), k1);
        assert_eq!(
            key_with(&header_key(), b"Bearer  tok"),
            Ok(RateKey::header(HeaderValue::from_static("Bearer  tok")))
        );
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
    }

    #[test]
    fn a_blank_key_header_falls_back_to_the_client_address() {
        let fallback = Ok(RateKey::ip(ip("192.0.2.50")));
        assert_eq!(key_with(&header_key(), b" \t "), fallback);
        assert_eq!(key_with(&auth_key(), b"  "), fallback);
    }

    #[test]
    fn fingerprints_are_keyed_by_their_scope() {
        let a = Fingerprinter::new(b"floodgate:");
        assert_eq!(
            a.fingerprint(b"k1"),
            Fingerprinter::new(b"floodgate:").fingerprint(b"k1")
        );
        assert_ne!(a.fingerprint(b"k1"), a.fingerprint(b"k2"));
        assert_ne!(
            a.fingerprint(b"k1"),
            Fingerprinter::new(b"other:").fingerprint(b"k1")
        );
        let shown = a.fingerprint(b"k1").to_string();
        assert_eq!(shown.len(), 2 * FINGERPRINT_LEN);
        assert!(shown.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.key)));
        assert_eq!(Fingerprint::from_hex(&shown), Some(a.fingerprint(b"k1")));
        assert_eq!(
            Fingerprint::from_hex(&shown.to_ascii_uppercase()),
            Some(a.fingerprint(b"k1"))
        );
        for bad in [
            "",
            &shown[1..],
            &format!("{shown}0"),
            &shown.replacen(&shown[..1], "g", 1),
        ] {
            assert_eq!(Fingerprint::from_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_peer_address_is_an_error() {
        let req = TestRequest::default().to_srv_request();
        assert_eq!(ClientIp::new().extract(&req), Err(KeyError::NoPeerAddress));
    }
}

#[cfg(test)]
mod proptests;
