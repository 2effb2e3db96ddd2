//! JSON request bodies: size-limited, with errors that say what is wrong.

use salvo::http::ParseError;
use salvo::prelude::*;
use serde::de::DeserializeOwned;

use super::ApiError;

/// Parse the request body as JSON `T`. 413 above `max_bytes`; 415 unless the request says
/// `Content-Type: application/json` (parameters such as `charset=utf-8` allowed); 400 naming the
/// problem (truncated JSON, a missing field, a wrong type) otherwise.
///
/// The content type is required, not guessed: a browser sends a cross-site `text/plain` or form
/// body with the user's cookies and without a preflight, so a body parsed whatever its type
/// would let any page start work as the user.
pub async fn json_body<T: DeserializeOwned>(
    req: &mut Request,
    max_bytes: usize,
) -> Result<T, ApiError> {
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|ct| ct.to_str().ok());
    if !content_type.is_some_and(is_json) {
        return Err(ApiError::new(
            salvo::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body with Content-Type: application/json",
        ));
    }
    let bytes = match req.payload_with_max_size(max_bytes).await {
        Ok(bytes) => bytes,
        Err(ParseError::PayloadTooLarge) => {
            return Err(ApiError::new(
                salvo::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {max_bytes} bytes"),
            ));
        }
        Err(e) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("cannot read the request body: {e}"),
            ));
        }
    };
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("request body: {e}")))
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// For a route that takes no body: one sent anyway is held to the body limit (413 above it)
/// and otherwise ignored.
pub async fn no_body(req: &mut Request, max_bytes: usize) -> Result<(), ApiError> {
    if let Err(ParseError::PayloadTooLarge) = req.payload_with_max_size(max_bytes).await {
        return Err(ApiError::new(
            salvo::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max_bytes} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn only_application_json_is_json() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/json-seq",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
