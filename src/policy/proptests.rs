//! Property tests for path normalisation: a rule cannot be dodged by
//! spelling a path differently.

use proptest::prelude::*;

use super::matcher::normalize_path;
use super::*;

/// Path-like text: segments of unreserved characters, dots, slashes,
/// escapes and backslashes.
fn pathish() -> impl Strategy<Value = String> {
    "[/a-z0-9._~%\\\\-]{0,40}"
}

/// Percent-encodes some unreserved characters and doubles some slashes.
fn respell(path: &str, mask: &[bool]) -> String {
    let mut out = String::new();
    for (i, c) in path.chars().enumerate() {
        let flip = mask.get(i % mask.len().max(1)).copied().unwrap_or(false);
        match c {
            '/' if flip => out.push_str("//"),
            c if flip && (c.is_ascii_alphanumeric() || "-._~".contains(c)) => {
                out.push_str(&format!("%{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

proptest! {
    #[test]
    fn normalising_is_idempotent_and_yields_a_clean_path(path in pathish()) {
        let once = normalize_path(&path).into_owned();
        prop_assert!(once.starts_with('/'), "{:?} -> {:?}", path, once);
        prop_assert!(!once.contains("//"), "{:?} -> {:?}", path, once);
        prop_assert!(!once.contains('\\'), "{:?} -> {:?}", path, once);
        for segment in once.split('/') {
            prop_assert!(segment != "." && segment != "..", "{:?} -> {:?}", path, once);
        }
        prop_assert_eq!(normalize_path(&once).into_owned(), once.clone(), "{:?}", path);
    }

    /// Encoding unreserved characters and doubling slashes never changes
    /// which rule a request gets.
    #[test]
    fn respelt_paths_select_the_same_rule(
        segments in prop::collection::vec("[a-z0-9._-]{1,6}", 1..5),
        mask in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let path = format!("/{}", segments.join("/"));
        let rules = Rules::new(
            vec![Rule::new("first").matching(Match::any().path(&format!("/{}", segments[0])))],
            Rule::new("default"),
        ).unwrap();
        let respelt = respell(&path, &mask);
        let method = actix_web::http::Method::GET;
        prop_assert_eq!(
            &rules.select(&method, &path, None).name,
            &rules.select(&method, &respelt, None).name,
            "{:?} vs {:?}", path, respelt
        );
        prop_assert_eq!(normalize_path(&path), normalize_path(&respelt));
    }
}
