//! JSON request bodies: size-limited, with errors that say what is wrong.

use salvo::http::ParseError;
use salvo::prelude::*;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Parse the request body as JSON `T`. 413 above `max_bytes`; 415 for a non-JSON content type;
/// 400 naming the problem (truncated JSON, a missing field, a wrong type) otherwise.
pub async fn json_body<T: DeserializeOwned>(
    req: &mut Request,
    max_bytes: usize,
) -> Result<T, ApiError> {
    if let Some(ct) = req.headers().get("content-type") {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !ct.starts_with("application/json") {
            return Err(ApiError::new(
                salvo::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
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
