//! A project's attachments: files a user sends with a message (screenshots, logs, specs).
//!
//! Content-addressed: an attachment's id is the lowercase hex sha-256 of its bytes, so the
//! same bytes sent twice (an upload retried, the same screenshot in two messages) are stored
//! once, and whoever holds an id holds exactly those bytes. The record (`ATTACHMENTS`, a
//! [`Record`] envelope) and the raw bytes (`ATTACHMENT_BYTES`, no envelope: they are never
//! decoded) are keyed `(projectId, id)` and written in the same transaction, so a record
//! never exists without its bytes. The first upload's media type and filename stay: storing
//! the same bytes again changes nothing and answers the record already stored.
//!
//! Conversations and workflows carry only the id (`conversation::AttachmentRef`), never the
//! bytes.

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::StorageError;
use crate::model::project_exists_for_update;
use crate::record::{Record, decode, encode};
use crate::tables::{ATTACHMENT_BYTES, ATTACHMENTS};
use crate::writer::WriteCtx;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// Lowercase hex sha-256 of the bytes.
    pub id: String,
    pub project_id: String,
    /// The media type's essence, lowercase (`image/png`, `text/plain`).
    pub media_type: String,
    pub filename: Option<String>,
    pub size: u64,
    pub created_at_ms: u64,
}

impl Record for AttachmentRecord {
    const KIND: &'static str = "attachment";
    const VERSION: u8 = 1;
}

/// The id of `bytes`: their sha-256, lowercase hex.
pub fn content_id(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `id` has the shape of a content id (64 lowercase hex digits).
pub fn is_content_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// What to store: the bytes and what the uploader said about them.
#[derive(Debug, Clone)]
pub struct NewAttachment {
    pub project_id: String,
    pub media_type: String,
    pub filename: Option<String>,
    pub bytes: Vec<u8>,
}

/// Store `new` in its project unless the same bytes are there already. Answers the stored
/// record and whether this call stored it (false: it was there before, and is unchanged).
/// `NotFound` when the project does not exist.
pub fn put(
    ctx: &mut WriteCtx<'_>,
    new: &NewAttachment,
    now_ms: u64,
) -> Result<(AttachmentRecord, bool), StorageError> {
    if !project_exists_for_update(ctx, &new.project_id)? {
        return Err(StorageError::NotFound(format!(
            "project {}",
            new.project_id
        )));
    }
    let id = content_id(&new.bytes);
    let key = (new.project_id.as_str(), id.as_str());
    let mut records = ctx.table(ATTACHMENTS)?;
    if let Some(existing) = records.get(key)? {
        return Ok((decode(existing.value())?, false));
    }
    let record = AttachmentRecord {
        id: id.clone(),
        project_id: new.project_id.clone(),
        media_type: new.media_type.clone(),
        filename: new.filename.clone(),
        size: new.bytes.len() as u64,
        created_at_ms: now_ms,
    };
    records.insert(key, encode(&record).as_slice())?;
    ctx.table(ATTACHMENT_BYTES)?
        .insert(key, new.bytes.as_slice())?;
    Ok((record, true))
}

/// The record of attachment `id` of `project_id`.
pub fn get(
    rtx: &ReadTransaction,
    project_id: &str,
    id: &str,
) -> Result<Option<AttachmentRecord>, StorageError> {
    let t = rtx.open_table(ATTACHMENTS)?;
    t.get((project_id, id))?
        .map(|v| decode(v.value()))
        .transpose()
}

/// The bytes of attachment `id` of `project_id`.
pub fn get_bytes(
    rtx: &ReadTransaction,
    project_id: &str,
    id: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    let t = rtx.open_table(ATTACHMENT_BYTES)?;
    Ok(t.get((project_id, id))?.map(|v| v.value().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ProjectRecord, insert_project};
    use crate::{Store, StoreOptions};

    #[test]
    fn content_ids_are_sha256_hex() {
        // sha-256 of "abc" (FIPS 180-2 test vector).
        assert_eq!(
            content_id(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_content_id(&content_id(b"")));
        assert!(!is_content_id("ABC"));
        assert!(!is_content_id(&"A".repeat(64)));
    }

    #[tokio::test]
    async fn the_same_bytes_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("s.redb"),
            StoreOptions::default(),
            std::sync::Arc::new(crate::events::NoObserver),
        )
        .unwrap();
        let project = ProjectRecord {
            project_id: "p".into(),
            title: None,
            owner: None,
            created_at_ms: 1,
        };
        store
            .writer()
            .write(move |ctx| insert_project(ctx, &project))
            .await
            .unwrap();
        let new = NewAttachment {
            project_id: "p".into(),
            media_type: "text/plain".into(),
            filename: Some("a.txt".into()),
            bytes: b"hello".to_vec(),
        };
        let first = new.clone();
        let (a, created) = store
            .writer()
            .write(move |ctx| put(ctx, &first, 10))
            .await
            .unwrap();
        assert!(created);
        let mut again = new.clone();
        again.filename = Some("b.txt".into());
        let (b, created) = store
            .writer()
            .write(move |ctx| put(ctx, &again, 20))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(a, b, "the first upload's record stays");
        let rtx = store.begin_read().unwrap();
        assert_eq!(get(&rtx, "p", &a.id).unwrap(), Some(a.clone()));
        assert_eq!(
            get_bytes(&rtx, "p", &a.id).unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(get(&rtx, "q", &a.id).unwrap(), None);

        let mut orphan = new;
        orphan.project_id = "nope".into();
        let res = store.writer().write(move |ctx| put(ctx, &orphan, 30)).await;
        assert!(matches!(res, Err(StorageError::NotFound(_))));
    }
}
