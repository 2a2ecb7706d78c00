//! Whom a rule's limits count: `ip`, `header:<name>`, `global`, or several
//! parts joined by `+` (`header:x-api-key+ip`: one budget per API key per
//! address).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use actix_web::dev::ServiceRequest;
use actix_web::http::header::{HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::key::{ClientIp, KeyError, KeyExtractor, header_value};
use crate::limiter::RateKey;

/// One part of a [`KeySpec`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// `ip`: the client address as [`ClientIp`] resolves it (trusted
    /// proxies, IPv6 grouped by prefix).
    Ip,
    /// `header:<name>`: the header's value, as [`HeaderKey`](crate::key::HeaderKey)
    /// reads it.
    Header(HeaderName),
    /// `global`: one budget shared by every client; only on its own.
    Global,
}

/// A key specification: `ip`, `header:<name>`, `global`, or parts joined by
/// `+`. Parses from and displays as that text (header names in lower case).
///
/// # A missing header
///
/// A request without a header part's header (or with it empty) is counted
/// by the client address in that part's place, as `FLOODGATE_KEY=header:…`
/// always has: `header:x-api-key` becomes the address, and
/// `header:x-api-key+ip` becomes address+address, so requests without a key
/// from one address share one budget. A header that appears twice, or that
/// the request's `Connection` header names, is refused ([`KeyError`], 400),
/// as for a single header key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpec {
    parts: SmallVec<[KeyPart; 2]>,
}

/// What a key extraction found: the key, and the header values it was made
/// of (for `allow_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedKey {
    /// The key the limits count.
    pub key: RateKey,
    /// The values of the header parts that were present, normalised as they
    /// are counted, in spec order.
    pub header_values: SmallVec<[HeaderValue; 1]>,
}

/// Why a key specification was refused; the text says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySpecError {
    /// A part is none of the accepted forms.
    #[error(
        "expected ip or header:<name>, e.g. header:x-api-key; or global; or several joined by +, e.g. header:x-api-key+ip"
    )]
    Syntax,
    /// A header floodgate drops or rewrites before the upstream sees it.
    #[error(
        "{0} is dropped or rewritten by floodgate and cannot be a key; expected ip or header:<name>, e.g. header:x-api-key; or global; or several joined by +"
    )]
    Rewritten(HeaderName),
    /// `global` combined with another part.
    #[error("global is one budget for every client and cannot be combined with other parts")]
    GlobalCombined,
    /// The same part twice.
    #[error("{0} appears twice")]
    Repeated(String),
}

impl KeySpec {
    /// `ip`.
    pub fn ip() -> Self {
        KeySpec::from_parts([KeyPart::Ip]).expect("one part")
    }

    /// `global`.
    pub fn global() -> Self {
        KeySpec::from_parts([KeyPart::Global]).expect("one part")
    }

    /// `header:<name>`.
    pub fn header(name: HeaderName) -> Result<Self, KeySpecError> {
        KeySpec::from_parts([KeyPart::Header(name)])
    }

    /// Parts counted together, checked as parsing checks them.
    pub fn from_parts(parts: impl IntoIterator<Item = KeyPart>) -> Result<Self, KeySpecError> {
        let parts: SmallVec<[KeyPart; 2]> = parts.into_iter().collect();
        if parts.is_empty() {
            return Err(KeySpecError::Syntax);
        }
        for (i, part) in parts.iter().enumerate() {
            match part {
                KeyPart::Global if parts.len() > 1 => return Err(KeySpecError::GlobalCombined),
                KeyPart::Header(name) if crate::proxy::rewritten_on_the_way(name) => {
                    return Err(KeySpecError::Rewritten(name.clone()));
                }
                _ => {}
            }
            if parts[..i].contains(part) {
                return Err(KeySpecError::Repeated(part_text(part)));
            }
        }
        Ok(KeySpec { parts })
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[KeyPart] {
        &self.parts
    }

    /// Whether this is `global`.
    pub fn is_global(&self) -> bool {
        self.parts.as_slice() == [KeyPart::Global]
    }

    /// The key for `req`, its client address resolved by `ip`.
    pub fn extract(&self, req: &ServiceRequest, ip: &ClientIp) -> Result<RateKey, KeyError> {
        self.extract_with_values(req, ip).map(|found| found.key)
    }

    /// As [`extract`](Self::extract), also giving the header values found
    /// (what `allow_keys` is compared with).
    pub fn extract_with_values(
        &self,
        req: &ServiceRequest,
        ip: &ClientIp,
    ) -> Result<ExtractedKey, KeyError> {
        self.extract_by(req, ip, || client_addr(req, ip))
    }

    /// As [`extract_with_values`](Self::extract_with_values) with the
    /// client address already resolved ([`client_addr`]; `None`: the
    /// connection has none), so a caller that needed it anyway (for the
    /// allow and deny lists) does not walk `X-Forwarded-For` twice.
    pub fn extract_at(
        &self,
        req: &ServiceRequest,
        addr: Option<IpAddr>,
        ip: &ClientIp,
    ) -> Result<ExtractedKey, KeyError> {
        self.extract_by(req, ip, || addr)
    }

    fn extract_by(
        &self,
        req: &ServiceRequest,
        ip: &ClientIp,
        resolve: impl Fn() -> Option<IpAddr>,
    ) -> Result<ExtractedKey, KeyError> {
        let mut header_values = SmallVec::new();
        let mut addr: Option<RateKey> = None;
        let address = |addr: &mut Option<RateKey>| -> Result<RateKey, KeyError> {
            if let Some(key) = addr {
                return Ok(key.clone());
            }
            let key = ip.key_for(resolve().ok_or(KeyError::NoPeerAddress)?);
            *addr = Some(key.clone());
            Ok(key)
        };
        let mut keys: SmallVec<[RateKey; 2]> = SmallVec::new();
        for part in &self.parts {
            keys.push(match part {
                KeyPart::Global => RateKey::global(),
                KeyPart::Ip => address(&mut addr)?,
                KeyPart::Header(name) => match header_value(name, req.headers())? {
                    Some(value) => {
                        header_values.push(value.clone());
                        RateKey::header(value)
                    }
                    None => address(&mut addr)?,
                },
            });
        }
        let key = if keys.len() == 1 {
            keys.pop().expect("one part")
        } else {
            RateKey::composite(keys)
        };
        Ok(ExtractedKey { key, header_values })
    }

    /// A [`KeyExtractor`] for this spec, resolving addresses with `ip`.
    pub fn extractor(&self, ip: ClientIp) -> SpecKey {
        SpecKey {
            spec: self.clone(),
            ip,
        }
    }
}

/// The client address of `req` as `ip` resolves it (before IPv6 grouping):
/// what `allow` and `deny` are compared with.
pub fn client_addr(req: &ServiceRequest, ip: &ClientIp) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    Some(ip.client_addr(peer, req.headers()))
}

/// A [`KeySpec`] with the [`ClientIp`] it resolves addresses by: a
/// [`KeyExtractor`] (what the single-limit [`RateLimit`](crate::RateLimit)
/// middleware takes).
#[derive(Debug, Clone)]
pub struct SpecKey {
    spec: KeySpec,
    ip: ClientIp,
}

impl KeyExtractor for SpecKey {
    fn extract(&self, req: &ServiceRequest) -> Result<RateKey, KeyError> {
        self.spec.extract(req, &self.ip)
    }
}

fn part_text(part: &KeyPart) -> String {
    match part {
        KeyPart::Ip => "ip".into(),
        KeyPart::Global => "global".into(),
        KeyPart::Header(name) => format!("header:{name}"),
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(&part_text(part))?;
        }
        Ok(())
    }
}

impl FromStr for KeySpec {
    type Err = KeySpecError;

    /// `ip`, `global` and `header:` in any case; header names are
    /// case-insensitive; spaces around `+` are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts = s
            .split('+')
            .map(|part| {
                let part = part.trim();
                if part.eq_ignore_ascii_case("ip") {
                    return Ok(KeyPart::Ip);
                }
                if part.eq_ignore_ascii_case("global") {
                    return Ok(KeyPart::Global);
                }
                match part.get(..7) {
                    Some(prefix) if prefix.eq_ignore_ascii_case("header:") => {
                        HeaderName::from_bytes(part[7..].trim().as_bytes())
                            .map(KeyPart::Header)
                            .map_err(|_| KeySpecError::Syntax)
                    }
                    _ => Err(KeySpecError::Syntax),
                }
            })
            .collect::<Result<SmallVec<[KeyPart; 2]>, _>>()?;
        KeySpec::from_parts(parts)
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn req(headers: &[(&str, &str)]) -> ServiceRequest {
        let mut r = TestRequest::default().peer_addr("192.0.2.7:4000".parse().unwrap());
        for (name, value) in headers {
            r = r.append_header((*name, *value));
        }
        r.to_srv_request()
    }

    fn spec(s: &str) -> KeySpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn addr() -> RateKey {
        RateKey::ip("192.0.2.7".parse().unwrap())
    }

    fn header(v: &'static str) -> RateKey {
        RateKey::header(HeaderValue::from_static(v))
    }

    #[test]
    fn specs_parse_and_display() {
        for (text, shown) in [
            ("ip", "ip"),
            ("IP", "ip"),
            ("global", "global"),
            ("header:X-Api-Key", "header:x-api-key"),
            ("HEADER:x-api-key + ip", "header:x-api-key+ip"),
            ("ip+header:a+header:b", "ip+header:a+header:b"),
        ] {
            assert_eq!(spec(text).to_string(), shown);
            assert_eq!(spec(shown), spec(text));
        }
        assert_eq!(spec("ip"), KeySpec::ip());
        assert!(spec("global").is_global());
    }

    #[test]
    fn bad_specs_say_why() {
        assert_eq!("cookie:sid".parse::<KeySpec>(), Err(KeySpecError::Syntax));
        assert_eq!("".parse::<KeySpec>(), Err(KeySpecError::Syntax));
        assert_eq!("ip+".parse::<KeySpec>(), Err(KeySpecError::Syntax));
        assert_eq!("header:".parse::<KeySpec>(), Err(KeySpecError::Syntax));
        assert_eq!(
            "global+ip".parse::<KeySpec>(),
            Err(KeySpecError::GlobalCombined)
        );
        assert_eq!(
            "ip+IP".parse::<KeySpec>(),
            Err(KeySpecError::Repeated("ip".into()))
        );
        assert!(matches!(
            "header:connection".parse::<KeySpec>(),
            Err(KeySpecError::Rewritten(_))
        ));
    }

    #[test]
    fn single_parts_key_as_today() {
        let ip = ClientIp::new();
        assert_eq!(spec("ip").extract(&req(&[]), &ip), Ok(addr()));
        assert_eq!(
            spec("global").extract(&req(&[]), &ip),
            Ok(RateKey::global())
        );
        let with = req(&[("x-api-key", " k1 ")]);
        assert_eq!(
            spec("header:x-api-key").extract(&with, &ip),
            Ok(header("k1"))
        );
        assert_eq!(
            spec("header:x-api-key").extract(&req(&[]), &ip),
            Ok(addr()),
            "missing header: the address"
        );
    }

    #[test]
    fn composite_keys_count_parts_together_and_fall_back_per_part() {
        let ip = ClientIp::new();
        let s = spec("header:x-api-key+ip");
        let found = s
            .extract_with_values(&req(&[("x-api-key", "k1")]), &ip)
            .unwrap();
        assert_eq!(found.key, RateKey::composite([header("k1"), addr()]));
        assert_eq!(
            found.header_values.as_slice(),
            [HeaderValue::from_static("k1")]
        );
        let missing = s.extract_with_values(&req(&[]), &ip).unwrap();
        assert_eq!(missing.key, RateKey::composite([addr(), addr()]));
        assert!(missing.header_values.is_empty());
        assert_ne!(missing.key, addr(), "not the plain address key");
        assert_ne!(
            s.extract(&req(&[("x-api-key", "192.0.2.7")]), &ip).unwrap(),
            missing.key,
            "a header spelling the address is not the address"
        );
    }

    #[test]
    fn composite_keys_refuse_what_header_keys_refuse() {
        let ip = ClientIp::new();
        let s = spec("ip+header:x-api-key");
        let twice = req(&[("x-api-key", "a"), ("x-api-key", "b")]);
        assert!(matches!(
            s.extract(&twice, &ip),
            Err(KeyError::AmbiguousHeader(_))
        ));
        let named = req(&[("x-api-key", "a"), ("connection", "x-api-key")]);
        assert!(matches!(
            s.extract(&named, &ip),
            Err(KeyError::KeyHeaderInConnection(_))
        ));
        let no_peer = TestRequest::default().to_srv_request();
        assert_eq!(s.extract(&no_peer, &ip), Err(KeyError::NoPeerAddress));
    }

    #[test]
    fn addresses_come_through_trusted_proxies() {
        let ip = ClientIp::new().trust(["192.0.2.0/24".parse().unwrap()]);
        let r = req(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(
            spec("ip").extract(&r, &ip),
            Ok(RateKey::ip("198.51.100.9".parse().unwrap()))
        );
        assert_eq!(client_addr(&r, &ip), Some("198.51.100.9".parse().unwrap()));
        let extractor = spec("ip").extractor(ip);
        assert_eq!(
            KeyExtractor::extract(&extractor, &r),
            Ok(RateKey::ip("198.51.100.9".parse().unwrap()))
        );
    }
}
