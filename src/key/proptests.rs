//! Property tests for the `X-Forwarded-For` walk in [`ClientIp`] and the
//! credential normaliser behind `header:authorization` keys.

use proptest::collection::vec;
use proptest::prelude::*;

use std::net::Ipv4Addr;

use super::*;

/// The trusted proxies of every case.
fn trusted() -> ClientIp {
    ClientIp::new().trust(
        ["10.0.0.0/8", "192.168.1.1/32", "fd00::/8"]
            .iter()
            .map(|n| n.parse::<IpNet>().expect("a CIDR")),
    )
}

/// Addresses inside and outside the trusted networks, in every form an
/// entry may take (IPv4-mapped IPv6 included).
fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 3]>().prop_map(|[a, b, c]| IpAddr::from([10, a, b, c])),
        Just(IpAddr::from([192, 168, 1, 1])),
        Just(IpAddr::from([192, 168, 1, 2])),
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 7]>()
            .prop_map(|s| IpAddr::from([0xfd00, s[0], s[1], s[2], s[3], s[4], s[5], s[6]])),
        any::<[u16; 8]>().prop_map(IpAddr::from),
        any::<[u8; 3]>()
            .prop_map(|[a, b, c]| IpAddr::V6(Ipv4Addr::new(10, a, b, c).to_ipv6_mapped())),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

#[derive(Debug, Clone)]
enum Entry {
    Addr(IpAddr, Option<u16>, bool),
    Garbage(String),
}

impl Entry {
    fn text(&self) -> String {
        match self {
            Entry::Addr(IpAddr::V4(v4), None, _) => v4.to_string(),
            Entry::Addr(IpAddr::V4(v4), Some(port), _) => format!("{v4}:{port}"),
            Entry::Addr(IpAddr::V6(v6), None, false) => v6.to_string(),
            Entry::Addr(IpAddr::V6(v6), None, true) => format!("[{v6}]"),
            Entry::Addr(IpAddr::V6(v6), Some(port), _) => format!("[{v6}]:{port}"),
            Entry::Garbage(g) => g.clone(),
        }
    }
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => (addr(), proptest::option::of(any::<u16>()), any::<bool>())
            .prop_map(|(a, p, b)| Entry::Addr(a, p, b)),
        1 => prop_oneof![
            Just("unknown".to_owned()),
            Just("_hidden".to_owned()),
            Just("10.0.0".to_owned()),
            Just("[10.0.0.1]".to_owned()),
            Just("[fd00::1".to_owned()),
            Just("999.0.0.1".to_owned()),
            Just("10.0.0.1:99999".to_owned()),
            "[ -+\\--~]{1,12}",
        ]
        .prop_filter("not an address", |g| {
            !g.trim().is_empty() && parse_forwarded_addr(g.trim()).is_none()
        })
        .prop_map(Entry::Garbage),
    ]
}

/// One `X-Forwarded-For` line: entries with any whitespace and empty
/// elements between them, or a line that is not text at all.
#[derive(Debug, Clone)]
enum Line {
    Entries(Vec<(Entry, String, usize)>),
    Binary,
}

impl Line {
    fn value(&self) -> HeaderValue {
        match self {
            Line::Binary => {
                HeaderValue::from_bytes(b"10.0.0.1, \xff").expect("obs-text is allowed")
            }
            Line::Entries(entries) => {
                let mut text = String::new();
                for (i, (entry, space, empties)) in entries.iter().enumerate() {
                    if i > 0 {
                        text.push(',');
                    }
                    text.push_str(&" ,".repeat(*empties));
                    text.push_str(space);
                    text.push_str(&entry.text());
                    text.push_str(space);
                }
                HeaderValue::from_str(&text).expect("visible ASCII")
            }
        }
    }
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        9 => vec((entry(), "[ \t]{0,2}", 0usize..2), 0..5).prop_map(Line::Entries),
        1 => Just(Line::Binary),
    ]
}

/// What the walk should find, read off the structured lines: right to left,
/// the first untrusted address, stopping at the first entry that is not an
/// address (keeping the last believable one).
fn expected(ip: &ClientIp, peer: IpAddr, lines: &[Line]) -> IpAddr {
    let mut client = canonical(peer);
    if !ip.is_trusted(client) {
        return client;
    }
    for line in lines.iter().rev() {
        let Line::Entries(entries) = line else {
            return client;
        };
        for (entry, ..) in entries.iter().rev() {
            let Entry::Addr(addr, ..) = entry else {
                return client;
            };
            client = canonical(*addr);
            if !ip.is_trusted(client) {
                return client;
            }
        }
    }
    client
}

fn headers(lines: &[Line]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines {
        headers.append(header::X_FORWARDED_FOR, line.value());
    }
    headers
}

proptest! {
    /// The result is the peer or an address from the header; it is a
    /// trusted proxy only when the walk ran out of addresses it could
    /// believe; and it is the rightmost untrusted address before any
    /// garbage.
    #[test]
    fn the_walk_stops_at_the_first_untrusted_address(
        peer in addr(),
        lines in vec(line(), 0..4),
    ) {
        let ip = trusted();
        let got = ip.client_addr(peer, &headers(&lines));
        prop_assert_eq!(got, expected(&ip, peer, &lines));

        let mut seen: Vec<IpAddr> = vec![canonical(peer)];
        for line in &lines {
            if let Line::Entries(entries) = line {
                for (entry, ..) in entries {
                    if let Entry::Addr(addr, ..) = entry {
                        seen.push(canonical(*addr));
                    }
                }
            }
        }
        prop_assert!(seen.contains(&got), "{} is neither the peer nor in the header", got);
        if !ip.is_trusted(peer) {
            prop_assert_eq!(got, canonical(peer), "an untrusted peer is the client");
        }
        let clean = lines.iter().all(|l| matches!(l, Line::Entries(e) if e.iter().all(|(e, ..)| matches!(e, Entry::Addr(..)))));
        if clean && ip.is_trusted(got) {
            prop_assert!(seen.iter().all(|a| ip.is_trusted(*a)), "a trusted result, yet {:?} is untrusted", seen);
        }
    }

    #[test]
    fn arbitrary_header_bytes_never_panic(
        peer in addr(),
        lines in vec(vec(any::<u8>(), 0..60), 0..4),
    ) {
        let mut map = HeaderMap::new();
        for line in lines {
            if let Ok(value) = HeaderValue::from_bytes(&line) {
                map.append(header::X_FORWARDED_FOR, value);
            }
        }
        let ip = trusted();
        let got = ip.client_addr(peer, &map);
        if !ip.is_trusted(peer) {
            prop_assert_eq!(got, canonical(peer));
        }
        let _ = ip.key_for(got);
    }

    #[test]
    fn entries_never_panic(s in "\\PC{0,50}") {
        let _ = parse_forwarded_addr(&s);
    }
}

// === credentials ===

proptest! {
    /// Any spelling an upstream reads alike (scheme in any case, any run of
    /// spaces or tabs after it, whitespace around) is one key: the scheme
    /// lower-cased, one space, the credentials exactly as sent.
    #[test]
    fn credentials_spelled_alike_normalise_alike(
        scheme in "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,10}",
        gap in "[ \t]{1,4}",
        credentials in "[A-Za-z0-9._~+/=-]{1,24}",
        before in "[ \t]{0,2}",
        after in "[ \t]{0,2}",
    ) {
        let sent = format!("{before}{scheme}{gap}{credentials}{after}");
        let got = normalize_credentials(sent.as_bytes());
        let expected = format!("{} {credentials}", scheme.to_ascii_lowercase());
        prop_assert_eq!(&got[..], expected.as_bytes());
        prop_assert_eq!(&normalize_credentials(&got)[..], &got[..], "normalising twice changes nothing");
    }

    /// Credentials differing in case stay different keys.
    #[test]
    fn credentials_keep_their_case(
        scheme in "[A-Za-z]{1,8}",
        credentials in "[a-z]{1,16}",
    ) {
        let lower = format!("{scheme} {credentials}");
        let upper = format!("{scheme} {}", credentials.to_ascii_uppercase());
        prop_assert_ne!(normalize_credentials(lower.as_bytes()), normalize_credentials(upper.as_bytes()));
    }

    /// Arbitrary bytes never panic, and what comes out has no surrounding
    /// whitespace and is stable under a second pass.
    #[test]
    fn arbitrary_credentials_never_panic(value in vec(any::<u8>(), 0..64)) {
        let got = normalize_credentials(&value);
        prop_assert_eq!(trim_ows(&got), &got[..]);
        prop_assert_eq!(&normalize_credentials(&got)[..], &got[..]);
    }
}
