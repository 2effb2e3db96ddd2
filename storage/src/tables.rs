//! Table definitions. Values are [`crate::record`] envelopes (`&[u8]`), except the raw bytes
//! of attachments (`ATTACHMENT_BYTES`).
//!
//! Keys: a branch is `(projectId, branchId)`; an event stream key is `"projectId/branchId"`
//! (ids never contain `/`), with the u64 event id as the second key part so a stream is one
//! contiguous range.

use redb::{Database, TableDefinition};

use crate::StorageError;

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const PROJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("projects");
pub const BRANCHES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("branches");
pub const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
pub const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// Versions of a branch: `(projectId, branchId, sequence)`.
pub const VERSIONS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("versions");
pub const WORKFLOWS: TableDefinition<&str, &[u8]> = TableDefinition::new("workflows");
/// The one active workflow of a branch; enforces "one active workflow per branch" in storage.
pub const ACTIVE_WORKFLOWS: TableDefinition<(&str, &str), &str> =
    TableDefinition::new("active_workflows");
/// Tool calls of a workflow: `(workflowId, sequence)`.
pub const TOOL_JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("tool_journal");
/// Changes waiting to be mirrored to Postgres/Redis, by global sequence.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Integration install jobs: `("projectId/branchId", sequence)`.
pub const INTEGRATION_QUEUE: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("integration_queue");
/// Cached Better Auth sessions by token hash.
pub const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Local API tokens by token hash.
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Browser sessions (a local token exchanged for a cookie) by the cookie value's hash.
pub const BROWSER_SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("browser_sessions");
/// A branch's conversation: `("projectId/branchId", sequence)`.
pub const CONVERSATIONS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("conversations");
/// Idempotency keys of triggers: `("projectId/branchId", key)` → the workflow started.
pub const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// A project's attachments, content-addressed: `(projectId, sha-256 hex)` → the record.
pub const ATTACHMENTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("attachments");
/// The bytes of each attachment, raw (no record envelope): `(projectId, sha-256 hex)`.
pub const ATTACHMENT_BYTES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("attachment_bytes");
/// Object-storage sync state of a branch: `(projectId, branchId)`.
pub const SYNC_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sync_state");

/// Create every table so that readers never meet a missing one.
pub(crate) fn create_all(db: &Database) -> Result<(), StorageError> {
    let tx = db.begin_write()?;
    {
        tx.open_table(META)?;
        tx.open_table(PROJECTS)?;
        tx.open_table(BRANCHES)?;
        tx.open_table(STREAMS)?;
        tx.open_table(EVENTS)?;
        tx.open_table(VERSIONS)?;
        tx.open_table(WORKFLOWS)?;
        tx.open_table(ACTIVE_WORKFLOWS)?;
        tx.open_table(TOOL_JOURNAL)?;
        tx.open_table(OUTBOX)?;
        tx.open_table(BROWSER_SESSIONS)?;
        tx.open_table(INTEGRATION_QUEUE)?;
        tx.open_table(SESSIONS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(SYNC_STATE)?;
        tx.open_table(CONVERSATIONS)?;
        tx.open_table(IDEMPOTENCY)?;
        tx.open_table(ATTACHMENTS)?;
        tx.open_table(ATTACHMENT_BYTES)?;
    }
    tx.commit()?;
    Ok(())
}
