//! Better Auth session cookies and bearer values.
//!
//! Better Auth (through better-call) signs the session token as
//! `urlencode(token + "." + base64(HMAC-SHA256(secret, token)))` and sets it as
//! `<prefix>.session_token` (or `__Secure-<prefix>.session_token` over HTTPS). These functions
//! find and verify such values; they never panic on any input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Longest token accepted (Better Auth tokens are 32 characters).
pub const MAX_TOKEN_LEN: usize = 512;

/// The signature of `token` as Better Auth writes it (standard base64 with padding).
pub fn sign(secret: &[u8], token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(token.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Verify `token.signature` (already URL-decoded) in constant time; returns the token.
pub fn verify_signed(secret: &[u8], value: &str) -> Option<String> {
    let (token, signature) = value.rsplit_once('.')?;
    if token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || signature.len() != 44
        || !signature.ends_with('=')
    {
        return None;
    }
    let expected = STANDARD.decode(signature).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(token.as_bytes());
    mac.verify_slice(&expected).ok()?;
    Some(token.to_string())
}

/// The raw (still URL-encoded) session cookie value from a `Cookie` header, if present.
/// `__Secure-` wins when both are sent.
/// Every `Cookie` header of a request as one `name=value; …` string (HTTP/2 may split them).
pub fn cookie_header(headers: &http::HeaderMap) -> String {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn find_session_cookie<'a>(cookie_header: &'a str, prefix: &str) -> Option<&'a str> {
    let plain = format!("{prefix}.session_token");
    let secure = format!("__Secure-{plain}");
    let mut found = None;
    for pair in cookie_header.split(';') {
        let Some((name, value)) = pair.trim().split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if name.trim() == secure {
            return Some(value);
        }
        if name.trim() == plain {
            found = Some(value);
        }
    }
    found
}

/// URL-decode a cookie value (`%2B` → `+`, ...). None if it is not valid UTF-8.
pub fn url_decode(value: &str) -> Option<String> {
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The session token carried by a cookie header, verified against `secret`.
pub fn session_token_from_cookie(
    cookie_header: &str,
    prefix: &str,
    secret: &[u8],
) -> Option<String> {
    let raw = find_session_cookie(cookie_header, prefix)?;
    verify_signed(secret, &url_decode(raw)?)
}

/// What an `Authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bearer {
    /// A local API token (`wa_...`).
    Local(String),
    /// A Better Auth session token, signed (verified) or raw.
    Session(String),
}

/// Parse `Authorization: Bearer <value>`. A signed value must verify; a raw one is taken as
/// a session token to look up. None for anything malformed.
pub fn parse_bearer(header: &str, secret: Option<&[u8]>) -> Option<Bearer> {
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let value = value.trim();
    if value.is_empty()
        || value.len() > MAX_TOKEN_LEN + 64
        || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        return None;
    }
    if value.starts_with(super::tokens::TOKEN_PREFIX) {
        return Some(Bearer::Local(value.to_string()));
    }
    let decoded = url_decode(value)?;
    if decoded.contains('.') {
        return verify_signed(secret?, &decoded).map(Bearer::Session);
    }
    (decoded.len() <= MAX_TOKEN_LEN).then_some(Bearer::Session(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed independently with Python:
    //   base64.b64encode(hmac.new(b"better-auth-secret-123", b"YpZ3kTq8...", hashlib.sha256).digest())
    const SECRET: &[u8] = b"better-auth-secret-123";
    const TOKEN: &str = "YpZ3kTq8Lm2Nv5Rx7Wb9Cd1Ef4Gh6Jk0";
    const SIGNATURE: &str = include_str!("../../tests/vectors/better_auth_signature.txt");

    #[test]
    fn signature_matches_an_independent_vector() {
        assert_eq!(sign(SECRET, TOKEN), SIGNATURE.trim());
        let value = format!("{TOKEN}.{}", SIGNATURE.trim());
        assert_eq!(verify_signed(SECRET, &value).as_deref(), Some(TOKEN));
        assert_eq!(verify_signed(b"other", &value), None);
    }

    #[test]
    fn cookie_lookup() {
        let signed = format!("{TOKEN}.{}", SIGNATURE.trim());
        let encoded =
            percent_encoding::utf8_percent_encode(&signed, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let header = format!("a=b; weldr.session_token={encoded}; c=d");
        assert_eq!(
            session_token_from_cookie(&header, "weldr", SECRET).as_deref(),
            Some(TOKEN)
        );
        let secure = format!("__Secure-weldr.session_token={encoded}");
        assert_eq!(
            session_token_from_cookie(&secure, "weldr", SECRET).as_deref(),
            Some(TOKEN)
        );
        assert_eq!(session_token_from_cookie(&header, "other", SECRET), None);
        assert_eq!(
            session_token_from_cookie("weldr.session_token=abc", "weldr", SECRET),
            None
        );
    }

    #[test]
    fn bearer_forms() {
        let signed = format!("{TOKEN}.{}", SIGNATURE.trim());
        assert_eq!(
            parse_bearer(&format!("Bearer {signed}"), Some(SECRET)),
            Some(Bearer::Session(TOKEN.into()))
        );
        assert_eq!(parse_bearer(&format!("Bearer {signed}"), Some(b"x")), None);
        assert_eq!(
            parse_bearer("Bearer raw-token", None),
            Some(Bearer::Session("raw-token".into()))
        );
        assert_eq!(
            parse_bearer("Bearer wa_abc", None),
            Some(Bearer::Local("wa_abc".into()))
        );
        assert_eq!(parse_bearer("Basic abc", None), None);
        assert_eq!(parse_bearer("Bearer ", None), None);
    }
}
