//! Property tests for the `<n>/<period>` rate syntax.

use proptest::prelude::*;

use super::*;

/// Units as operators may spell them, with their length in seconds.
fn unit() -> impl Strategy<Value = (&'static str, u64)> {
    prop::sample::select(vec![
        ("s", 1),
        ("sec", 1),
        ("secs", 1),
        ("second", 1),
        ("seconds", 1),
        ("m", 60),
        ("min", 60),
        ("mins", 60),
        ("minute", 60),
        ("minutes", 60),
        ("h", 3_600),
        ("hr", 3_600),
        ("hour", 3_600),
        ("hours", 3_600),
        ("d", 86_400),
        ("day", 86_400),
        ("days", 86_400),
        ("MIN", 60),
        ("Hour", 3_600),
    ])
}

/// A rate that `Rate::new` accepts: a whole number of seconds (the syntax
/// has no smaller unit) and at most one per microsecond.
fn rate() -> impl Strategy<Value = Rate> {
    (
        1u32..=u32::MAX,
        prop_oneof![1u64..=10 * 365 * 86_400, 1u64..=u64::MAX],
    )
        .prop_filter_map("too fast", |(count, secs)| {
            Rate::new(NonZeroU32::new(count)?, Duration::from_secs(secs)).ok()
        })
}

proptest! {
    #[test]
    fn parsing_never_panics(s in "\\PC{0,30}") {
        let _ = s.parse::<Rate>();
    }

    #[test]
    fn parsing_rate_like_text_never_panics(s in "[ 0-9]{0,12}/[ 0-9]{0,25}[a-zA-Z]{0,8}") {
        let _ = s.parse::<Rate>();
    }

    #[test]
    fn the_display_form_parses_back_to_the_same_rate(rate in rate()) {
        let shown = rate.to_string();
        prop_assert_eq!(shown.parse::<Rate>(), Ok(rate), "{}", shown);
    }

    /// Every spelling means count per multiple × unit, and what it parses
    /// to displays in a form that parses to the same rate again.
    #[test]
    fn every_spelling_means_what_it_says(
        count in 1u32..=1_000_000,
        multiple in proptest::option::of(1u64..=10_000),
        (unit, unit_secs) in unit(),
        pad in "[ ]{0,2}",
    ) {
        let n = multiple.map_or(String::new(), |m| m.to_string());
        let text = format!("{pad}{count}{pad}/{pad}{n}{unit}{pad}");
        let secs = multiple.unwrap_or(1) * unit_secs;
        let expected = Rate::new(NonZeroU32::new(count).unwrap(), Duration::from_secs(secs));
        let parsed = text.parse::<Rate>();
        prop_assert_eq!(&parsed, &expected, "{:?}", text);
        if let Ok(rate) = parsed {
            prop_assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate));
        }
    }
}
