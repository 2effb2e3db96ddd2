//! Versioned record envelopes.
//!
//! postcard has no schema evolution: a struct that gains a field can no longer read old bytes.
//! So every stored value is `[MAGIC, version, postcard...]`. A type declares its current
//! [`Record::VERSION`]; decoding an older version goes through [`Record::migrate`], which the
//! type implements by decoding its previous shape and converting it (the garage `Migrate` way).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::StorageError;

/// First byte of every envelope: guards against reading some other encoding as a record.
pub const MAGIC: u8 = 0xA7;

pub trait Record: Serialize + DeserializeOwned + Sized {
    /// Name used in error messages.
    const KIND: &'static str;
    /// The version this binary writes.
    const VERSION: u8;

    /// Decode a record written with an older `version`. The default knows no older versions.
    fn migrate(version: u8, _body: &[u8]) -> Result<Self, StorageError> {
        Err(StorageError::UnknownVersion {
            kind: Self::KIND,
            version,
        })
    }
}

pub fn encode<R: Record>(record: &R) -> Vec<u8> {
    let mut out = vec![MAGIC, R::VERSION];
    // Serializing plain data structures into a Vec cannot fail.
    let body = postcard::to_stdvec(record).expect("postcard serialization of a record");
    out.extend_from_slice(&body);
    out
}

pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, StorageError> {
    let corrupt = |message: String| StorageError::Corrupt {
        kind: R::KIND,
        message,
    };
    match bytes {
        [MAGIC, version, body @ ..] => {
            if *version == R::VERSION {
                postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))
            } else if *version < R::VERSION {
                R::migrate(*version, body)
            } else {
                Err(StorageError::UnknownVersion {
                    kind: R::KIND,
                    version: *version,
                })
            }
        }
        _ => Err(corrupt("missing envelope header".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        name: String,
    }
    impl Record for V1 {
        const KIND: &'static str = "thing";
        const VERSION: u8 = 1;
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V2 {
        name: String,
        size: u64,
    }
    impl Record for V2 {
        const KIND: &'static str = "thing";
        const VERSION: u8 = 2;
        fn migrate(version: u8, body: &[u8]) -> Result<Self, StorageError> {
            match version {
                1 => {
                    let old: V1 =
                        postcard::from_bytes(body).map_err(|e| StorageError::Corrupt {
                            kind: Self::KIND,
                            message: e.to_string(),
                        })?;
                    Ok(V2 {
                        name: old.name,
                        size: 0,
                    })
                }
                v => Err(StorageError::UnknownVersion {
                    kind: Self::KIND,
                    version: v,
                }),
            }
        }
    }

    #[test]
    fn old_records_migrate_and_newer_ones_are_refused() {
        let old = encode(&V1 { name: "a".into() });
        assert_eq!(
            decode::<V2>(&old).unwrap(),
            V2 {
                name: "a".into(),
                size: 0
            }
        );
        let new = encode(&V2 {
            name: "b".into(),
            size: 7,
        });
        assert!(matches!(
            decode::<V1>(&new),
            Err(StorageError::UnknownVersion { version: 2, .. })
        ));
        assert!(matches!(
            decode::<V2>(b"junk"),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<V2>(&[MAGIC, 2, 0xff]),
            Err(StorageError::Corrupt { .. })
        ));
    }
}
