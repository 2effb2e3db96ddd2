//! Property tests over the cookie and bearer parsers: any input is handled without a panic,
//! and only an exactly signed value is accepted.

use proptest::prelude::*;
use weldr_agent::auth::cookie::{
    Bearer, find_session_cookie, parse_bearer, session_token_from_cookie, sign, verify_signed,
};

const SECRET: &[u8] = b"s3cret";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_cookie_headers_never_panic(header in ".{0,400}") {
        let _ = find_session_cookie(&header, "weldr");
        let _ = session_token_from_cookie(&header, "weldr", SECRET);
    }

    #[test]
    fn arbitrary_bearers_never_panic(value in ".{0,400}") {
        let _ = parse_bearer(&value, Some(SECRET));
        let _ = parse_bearer(&format!("Bearer {value}"), Some(SECRET));
        let _ = parse_bearer(&format!("Bearer {value}"), None);
    }

    #[test]
    fn only_the_exact_signature_verifies(token in "[A-Za-z0-9]{1,64}", flip in 0usize..43, bit in 0u8..6) {
        let sig = sign(SECRET, &token);
        prop_assert_eq!(verify_signed(SECRET, &format!("{token}.{sig}")), Some(token.clone()));
        // Change one base64 character of the signature.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bytes = sig.clone().into_bytes();
        let pos = alphabet.iter().position(|c| *c == bytes[flip]).unwrap_or(0);
        bytes[flip] = alphabet[(pos + 1 + bit as usize) % 64];
        let tampered = String::from_utf8(bytes).unwrap();
        if tampered != sig {
            prop_assert_eq!(verify_signed(SECRET, &format!("{token}.{tampered}")), None);
        }
        prop_assert_eq!(verify_signed(b"other", &format!("{token}.{sig}")), None);
        let header = format!("Bearer {token}.{sig}");
        prop_assert_eq!(parse_bearer(&header, Some(SECRET)), Some(Bearer::Session(token)));
    }
}
