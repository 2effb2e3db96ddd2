//! Id validation: every id that names a stored thing or a directory is `[A-Za-z0-9_-]{1,64}`.
//! This is what keeps `..`, `/` and friends out of paths and keys.

use crate::error::ApiError;

pub const MAX_ID_LEN: usize = 64;

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validate `id` as the `what` of a request (`projectId`, `branchId`, ...).
pub fn check_id<'a>(what: &str, id: &'a str) -> Result<&'a str, ApiError> {
    if is_valid_id(id) {
        Ok(id)
    } else {
        Err(ApiError::bad_request(
            "invalid_id",
            format!("{what} must be 1-{MAX_ID_LEN} characters of A-Z, a-z, 0-9, '_' or '-'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "proj_1", "A-b-C", &"x".repeat(64)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            "a.b",
            "é",
            " a",
            "a\n",
            &"x".repeat(65),
            "%2e%2e",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }
}
