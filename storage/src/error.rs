//! The storage layer's one error type.

use std::path::PathBuf;

/// What can go wrong in storage. `Clone` because one failed commit answers every job of a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error(
        "the store {0} is held by another process (is `weldr-agent serve` running?); \
         stop it or run this command through the running server"
    )]
    AlreadyOpen(PathBuf),
    #[error("storage error: {0}")]
    Database(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("record `{kind}` has unknown version {version}; this binary is older than the data")]
    UnknownVersion { kind: &'static str, version: u8 },
    #[error("record `{kind}` is corrupt: {message}")]
    Corrupt { kind: &'static str, message: String },
    #[error("the store is closed (the server is shutting down)")]
    Closed,
    /// The database cannot write (an I/O error, e.g. a full disk); the writer reopens it in
    /// place once a durable commit succeeds again.
    #[error("the store cannot write: {0}")]
    Unwritable(String),
    /// The store will not open as it is; the message says what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Database(e.to_string())
            }
        }
    )*};
}

from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
