//! Id validation: every id that names a stored thing or a directory is `[A-Za-z0-9_-]{1,64}`.
//! This is what keeps `..`, `/` and friends out of paths and keys.

pub const MAX_ID_LEN: usize = 64;

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An id in a request that is not `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field} must be 1-{MAX_ID_LEN} characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct IdError {
    /// The request field it came in (`projectId`, `branchId`, ...).
    pub field: String,
}

/// Validate `id` as the `what` of a request (`projectId`, `branchId`, ...).
pub fn check_id<'a>(what: &str, id: &'a str) -> Result<&'a str, IdError> {
    if is_valid_id(id) {
        Ok(id)
    } else {
        Err(IdError {
            field: what.to_string(),
        })
    }
}

/// A version id that is not a positive decimal number.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a version id is a positive decimal number")]
pub struct VersionIdError;

/// A version id is the decimal per-branch sequence number (from 1).
pub fn parse_version_id(raw: &str) -> Result<u64, VersionIdError> {
    if raw.is_empty() || raw.len() > 19 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VersionIdError);
    }
    raw.parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or(VersionIdError)
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
