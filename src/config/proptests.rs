//! Property tests for the operator-facing value syntaxes: durations, CIDR
//! lists and `FLOODGATE_KEY`.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// The longest duration accepted.
const WEEK: Duration = Duration::from_secs(7 * 86_400);

fn ip() -> impl Strategy<Value = std::net::IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u16; 8]>().prop_map(std::net::IpAddr::from),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    (ip(), any::<u8>()).prop_map(|(addr, len)| {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        IpNet::new(addr, len % (max + 1)).expect("a prefix within range")
    })
}

proptest! {
    #[test]
    fn durations_never_panic(s in "\\PC{0,20}") {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(!d.is_zero() && d <= WEEK, "{:?} -> {:?}", s, d);
        }
    }

    #[test]
    fn duration_like_text_never_panics(s in "[ 0-9.]{0,30}[a-zA-Z]{0,4}") {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(!d.is_zero() && d <= WEEK, "{:?} -> {:?}", s, d);
        }
    }

    /// Whole numbers in every unit mean what they say, up to a week.
    #[test]
    fn whole_durations_in_every_unit(
        n in 0u64..20_000_000,
        (unit, scale_ms) in prop::sample::select(vec![
            ("ms", 1u64), ("", 1_000), ("s", 1_000), ("sec", 1_000), ("SEC", 1_000),
            ("m", 60_000), ("min", 60_000), ("h", 3_600_000), (" s", 1_000),
        ]),
    ) {
        let text = format!("{n}{unit}");
        let want = Duration::from_millis(n * scale_ms);
        let got = parse_duration(&text);
        if want.is_zero() || want > WEEK {
            prop_assert!(got.is_err(), "{:?} -> {:?}", text, got);
        } else {
            prop_assert_eq!(got, Ok(want), "{:?}", text);
        }
    }

    /// What `{:?}` prints for a duration (as the settings summary does) is
    /// read back as the same duration, for any whole number of
    /// milliseconds.
    #[test]
    fn debug_form_of_whole_milliseconds_round_trips(ms in 1u64..=WEEK.as_millis() as u64) {
        let d = Duration::from_millis(ms);
        let shown = format!("{d:?}");
        prop_assert_eq!(parse_duration(&shown), Ok(d), "{}", shown);
    }

    #[test]
    fn cidr_lists_never_panic(s in "\\PC{0,40}") {
        let _ = parse_cidrs(&s);
    }

    #[test]
    fn cidr_like_text_never_panics(s in "[0-9a-f:./, ]{0,40}") {
        let _ = parse_cidrs(&s);
    }

    /// A list of networks written in their display form, separated any way
    /// the setting allows, parses back to the same networks; a bare address
    /// is its own /32 or /128.
    #[test]
    fn cidr_lists_round_trip(
        nets in vec((net(), prop::sample::select(vec![",", ", ", " ", "\n", "\t", " , "])), 0..6),
        bare in ip(),
    ) {
        let mut text = String::new();
        for (net, sep) in &nets {
            text.push_str(&net.to_string());
            text.push_str(sep);
        }
        text.push_str(&bare.to_string());
        let mut want: Vec<IpNet> = nets.iter().map(|(n, _)| *n).collect();
        want.push(IpNet::from(bare));
        prop_assert_eq!(parse_cidrs(&text), Ok(want), "{:?}", text);
    }

    #[test]
    fn keys_never_panic(s in "\\PC{0,30}") {
        let _ = parse_key(&s);
    }

    /// An accepted header key is written back as `header:<name>` and parses
    /// to the same key; header-name case never makes a second key.
    #[test]
    fn header_keys_round_trip(name in "[A-Za-z][A-Za-z0-9_-]{0,20}", prefix in prop::sample::select(vec!["header:", "HEADER:"])) {
        let parsed = parse_key(&format!("{prefix}{name}"));
        let lower = parse_key(&format!("header:{}", name.to_ascii_lowercase()));
        prop_assert_eq!(&parsed, &lower);
        if let Ok(spec) = &parsed {
            prop_assert_eq!(parse_key(&spec.to_string()), Ok(spec.clone()));
            if let [crate::policy::KeyPart::Header(header)] = spec.parts() {
                prop_assert!(!crate::proxy::rewritten_on_the_way(header));
            }
        }
    }
}
