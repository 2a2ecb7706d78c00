//! The operator-facing value syntaxes: each parser returns the value or
//! what is accepted (the text after `: ` in a problem line), and each
//! `*_text` function writes a value back as an operator would.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use ::config::FileFormat;
use ipnet::IpNet;

use std::str::FromStr;

use crate::headers::HeaderStyle;
use crate::limiter::Fallback;
use crate::limiter::Rate;
use crate::policy::KeySpec;
use crate::proxy::HostHeader;

pub(crate) fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

// === parsers: Ok(value) or Err(what is accepted) ===

pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
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

pub(crate) fn parse_key(s: &str) -> Result<KeySpec, String> {
    s.parse::<KeySpec>().map_err(|e| e.to_string())
}

/// `FLOODGATE_RATE`: a comma-separated list of rates, or `none` (no list:
/// unmatched requests are not limited).
pub(crate) fn parse_rates(s: &str) -> Result<Vec<Rate>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|part| {
            Rate::from_str(part.trim()).map_err(|e| {
                if s.contains(',') {
                    format!(
                        "{:?}: {e}; several rates are separated by commas, e.g. 10/s,1000/day",
                        part.trim()
                    )
                } else {
                    format!("{e}; or several separated by commas, or none")
                }
            })
        })
        .collect()
}

pub(crate) fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    list(s)
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(unmap_v4)
                .map_err(|_| {
                    format!("{part:?} is not a CIDR; expected a comma-separated list such as 10.0.0.0/8, 192.168.1.1, fd00::/8")
                })
        })
        .collect()
}

/// `::ffff:a.b.c.d/p` (p >= 96) as the IPv4 network it spells: client
/// addresses are compared in their IPv4 form (`key::canonical`), so a list
/// entry written as a dual-stack listener shows IPv4 clients must mean them.
fn unmap_v4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

pub(crate) fn parse_redis_url(s: &str) -> Result<(), String> {
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

// === values as the operator writes them (the inverse of the parsers) ===

/// A duration in the largest unit [`parse_duration`] reads that shows it
/// exactly: `50ms`, `30s`, `2m`, `1h`.
pub(crate) fn duration_text(d: Duration) -> String {
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

pub(crate) fn header_style_text(style: HeaderStyle) -> &'static str {
    match style {
        HeaderStyle::Ietf => "ietf",
        HeaderStyle::Legacy => "legacy",
        HeaderStyle::None => "none",
    }
}

pub(crate) fn host_header_text(host: HostHeader) -> &'static str {
    match host {
        HostHeader::Client => "client",
        HostHeader::Upstream => "upstream",
    }
}

pub(crate) fn fallback_text(fallback: Fallback) -> &'static str {
    match fallback {
        Fallback::Local => "local",
        Fallback::Open => "open",
        Fallback::Closed => "closed",
    }
}

pub(crate) fn file_format(path: &Path) -> Result<FileFormat, String> {
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

#[cfg(test)]
mod unmap_tests {
    use super::*;

    #[test]
    fn ipv4_mapped_entries_mean_their_ipv4_networks() {
        let nets = parse_cidrs("::ffff:203.0.113.7, ::ffff:10.0.0.0/104, 2001:db8::/32").unwrap();
        assert_eq!(
            nets,
            vec![
                "203.0.113.7/32".parse::<IpNet>().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]
        );
    }
}
