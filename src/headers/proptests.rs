//! Property tests for [`tokens`], the `Connection`-header splitter.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// Optional whitespace as senders write it around list elements.
fn ows() -> impl Strategy<Value = String> {
    "[ \t]{0,3}"
}

proptest! {
    /// Whatever the bytes, every token is non-empty, has no comma and no
    /// surrounding whitespace, and tokens come out in order, as found.
    #[test]
    fn tokens_are_trimmed_non_empty_and_in_order(value in vec(any::<u8>(), 0..200)) {
        let mut from = 0;
        for token in tokens(&value) {
            prop_assert!(!token.is_empty());
            prop_assert!(!token.contains(&b','));
            prop_assert_eq!(token, token.trim_ascii());
            let at = value[from..]
                .windows(token.len())
                .position(|w| w == token)
                .expect("every token is a piece of the value");
            from += at + token.len();
        }
    }

    /// A list of tokens, joined with commas, any whitespace and empty
    /// elements (`a, ,b`, RFC 9110 §5.6.1), splits back into exactly that list.
    #[test]
    fn a_written_list_splits_back_into_its_tokens(
        items in vec(("[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}", ows(), ows(), 0usize..2), 0..8),
        lead in ows(),
    ) {
        let mut value = lead;
        for (i, (token, before, after, empties)) in items.iter().enumerate() {
            if i > 0 {
                value.push(',');
            }
            for _ in 0..*empties {
                value.push_str(" ,");
            }
            value.push_str(before);
            value.push_str(token);
            value.push_str(after);
        }
        let got: Vec<&[u8]> = tokens(value.as_bytes()).collect();
        let want: Vec<&[u8]> = items.iter().map(|(t, ..)| t.as_bytes()).collect();
        prop_assert_eq!(got, want, "{:?}", value);
    }
}
