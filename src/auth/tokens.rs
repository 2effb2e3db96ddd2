//! Local API tokens for the embedded default and desktop mode.
//!
//! A token is `wa_` + 32 random bytes (base64url). Only its SHA-256 is stored (redb `tokens`),
//! so a leaked store does not leak tokens. The first start creates one and prints it once.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weldr_storage::record::{Record, decode, encode};
use weldr_storage::tables::TOKENS;
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store};

pub const TOKEN_PREFIX: &str = "wa_";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub created_at_ms: u64,
}

impl Record for TokenRecord {
    const KIND: &'static str = "token";
    const VERSION: u8 = 1;
}

/// A token as listed: never the secret itself.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// First 12 hex digits of the token's hash: enough to name it for `revoke`.
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_secret() -> Result<String, StorageError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StorageError::Database(format!("no randomness: {e}")))?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Create a token named `name`; returns the secret (shown once).
pub async fn create(store: &Store, name: &str) -> Result<String, StorageError> {
    let secret = new_secret()?;
    let key = hash_token(&secret);
    let record = TokenRecord {
        name: name.to_string(),
        created_at_ms: now_ms(),
    };
    store
        .writer()
        .write(move |ctx| {
            let mut t = ctx.table(TOKENS)?;
            t.insert(key.as_str(), encode(&record).as_slice())?;
            Ok(())
        })
        .await?;
    Ok(secret)
}

/// Create the first token if none exists; returns it when created.
pub async fn ensure_initial(store: &Store) -> Result<Option<String>, StorageError> {
    let secret = new_secret()?;
    let key = hash_token(&secret);
    let created = store
        .writer()
        .write(move |ctx| {
            let mut t = ctx.table(TOKENS)?;
            if t.len()? > 0 {
                return Ok(false);
            }
            let record = TokenRecord {
                name: "initial".into(),
                created_at_ms: now_ms(),
            };
            t.insert(key.as_str(), encode(&record).as_slice())?;
            Ok(true)
        })
        .await?;
    Ok(created.then_some(secret))
}

/// Whether `token` is a live local token (a blocking redb read).
pub fn verify(store: &Store, token: &str) -> Result<Option<TokenRecord>, StorageError> {
    let rtx = store.begin_read()?;
    let t = rtx.open_table(TOKENS)?;
    t.get(hash_token(token).as_str())?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn list(store: &Store) -> Result<Vec<TokenInfo>, StorageError> {
    let rtx = store.begin_read()?;
    let t = rtx.open_table(TOKENS)?;
    let mut out = Vec::new();
    for entry in t.iter()? {
        let (key, value) = entry?;
        let record: TokenRecord = decode(value.value())?;
        out.push(TokenInfo {
            id: key.value()[..12].to_string(),
            name: record.name,
            created_at_ms: record.created_at_ms,
        });
    }
    Ok(out)
}

/// Revoke tokens whose id prefix (from `list`) or name equals `which`; returns how many.
pub async fn revoke(store: &Store, which: &str) -> Result<usize, StorageError> {
    let which = which.to_string();
    store
        .writer()
        .write(move |ctx| {
            let mut t = ctx.table(TOKENS)?;
            let mut doomed = Vec::new();
            for entry in t.iter()? {
                let (key, value) = entry?;
                let record: TokenRecord = decode(value.value())?;
                let key = key.value().to_string();
                if (which.len() >= 6 && key.starts_with(&which)) || record.name == which {
                    doomed.push(key);
                }
            }
            for key in &doomed {
                t.remove(key.as_str())?;
            }
            Ok(doomed.len())
        })
        .await
}
