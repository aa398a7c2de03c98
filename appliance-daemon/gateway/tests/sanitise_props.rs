//! Property tests of the text rules: whatever comes in, what comes out
//! obeys the output rules, and sanitising is idempotent.

use airlock_gateway::sanitise::{is_bidi_control, is_clean_text, sanitise_text, Rejection};
use proptest::prelude::*;

fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        any::<char>(),
        prop::sample::select(vec![
            '\r', '\n', '\t', '\0', '\u{1b}', '\u{7f}', '\u{85}', '\u{202A}', '\u{202E}',
            '\u{2066}', '\u{2069}', '\u{200F}'
        ]),
    ]
}

proptest! {
    #[test]
    fn output_is_always_clean(text in prop::collection::vec(nasty_char(), 0..200).prop_map(String::from_iter)) {
        match sanitise_text(text.as_bytes(), 1000) {
            Ok(out) => {
                prop_assert!(is_clean_text(out.as_bytes(), 1000), "{out:?}");
                prop_assert!(!out.chars().any(is_bidi_control));
                prop_assert_eq!(sanitise_text(out.as_bytes(), 1000).unwrap(), out.clone(), "idempotent");
            }
            Err(Rejection::TextTooLong { .. }) => prop_assert!(text.len() * 2 > 1000),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let r = sanitise_text(&bytes, 300);
        if std::str::from_utf8(&bytes).is_err() {
            prop_assert!(matches!(r, Err(Rejection::BadUtf8(_))));
        }
    }
}
