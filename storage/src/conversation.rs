//! A branch's conversation: what the user asked, what the agent answered and did.
//!
//! Entries are keyed `("projectId/branchId", seq)` in `CONVERSATIONS`, in the order they
//! happened. A workflow adds two: its user message, in the transaction that creates the
//! workflow, and its outcome (the reply, the plan, the version and files changed, the failure,
//! a compact record of the tool calls), in the transaction that makes it terminal. So the
//! thread never disagrees with the workflows, whatever moment the process dies at. A summary
//! entry replaces the entries before it when the thread is given to a model (see the workflow
//! engine's context budget); it is written once and read by every later workflow.
//!
//! Retried triggers: an idempotency key (`Idempotency-Key`, or the body's `clientMessageId`)
//! is recorded with the workflow it started in the same transaction (`IDEMPOTENCY`).

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::events::StreamKey;
use crate::record::{Record, decode, encode};
use crate::tables::{CONVERSATIONS, IDEMPOTENCY};
use crate::writer::WriteCtx;

/// A file the user attached to a message: its content address (sha-256, hex) in the
/// project's attachments, never the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub id: String,
    pub media_type: String,
    pub filename: Option<String>,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A message from the user (the request of a workflow).
    User,
    /// A workflow's outcome: its reply, plan, version, failure and tool calls.
    Assistant,
    /// A model-written summary of every entry up to `covers_through`.
    Summary,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Summary => "summary",
        }
    }
}

/// One tool call, compactly: the tool, what it worked on, whether it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallNote {
    pub name: String,
    /// The path, pattern or command it was called with (shortened).
    pub target: String,
    pub is_error: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationEntry {
    /// Unique in the branch (kept by forks).
    pub message_id: String,
    pub kind: EntryKind,
    pub workflow_id: Option<String>,
    /// The user's text, the agent's reply (or its last words), or the summary.
    pub text: String,
    pub attachments: Vec<AttachmentRef>,
    /// The accepted plan, as JSON text.
    pub plan_json: Option<String>,
    /// The workflow's final status (`complete`, `failed`, `cancelled`).
    pub status: Option<String>,
    /// The version the workflow committed.
    pub version: Option<u64>,
    /// Files the version changed; for a cancelled or failed workflow, the files it left
    /// changed and uncommitted in the working tree.
    pub files_changed: Vec<String>,
    pub error: Option<String>,
    pub tool_calls: Vec<ToolCallNote>,
    /// A summary: the last entry (seq) it stands for.
    pub covers_through: Option<u64>,
    pub created_at_ms: u64,
}

impl Record for ConversationEntry {
    const KIND: &'static str = "conversation_entry";
    const VERSION: u8 = 1;
}

impl ConversationEntry {
    /// An entry of `kind` with `text` and nothing else.
    pub fn new(message_id: String, kind: EntryKind, text: String, now_ms: u64) -> Self {
        Self {
            message_id,
            kind,
            workflow_id: None,
            text,
            attachments: Vec::new(),
            plan_json: None,
            status: None,
            version: None,
            files_changed: Vec::new(),
            error: None,
            tool_calls: Vec::new(),
            covers_through: None,
            created_at_ms: now_ms,
        }
    }
}

/// Append an entry to `key`'s conversation; returns its sequence number (from 1).
pub fn append(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
    entry: &ConversationEntry,
) -> Result<u64, StorageError> {
    let k = key.as_str();
    let mut t = ctx.table(CONVERSATIONS)?;
    let last = t
        .range((k, 0)..=(k, u64::MAX))?
        .next_back()
        .transpose()?
        .map(|(k, _)| k.value().1);
    let seq = last.unwrap_or(0) + 1;
    t.insert((k, seq), encode(entry).as_slice())?;
    Ok(seq)
}

/// Up to `limit` entries before `before` (exclusive; None: the newest), oldest first, and
/// whether older ones remain.
pub fn page(
    rtx: &ReadTransaction,
    key: &StreamKey,
    before: Option<u64>,
    limit: usize,
) -> Result<(Vec<(u64, ConversationEntry)>, bool), StorageError> {
    let k = key.as_str();
    let t = rtx.open_table(CONVERSATIONS)?;
    let end = before.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    let mut more = false;
    for entry in t.range((k, 0)..(k, end))?.rev() {
        if out.len() == limit {
            more = true;
            break;
        }
        let (key, v) = entry?;
        out.push((key.value().1, decode(v.value())?));
    }
    out.reverse();
    Ok((out, more))
}

/// The whole conversation of `key`, oldest first.
pub fn all(
    rtx: &ReadTransaction,
    key: &StreamKey,
) -> Result<Vec<(u64, ConversationEntry)>, StorageError> {
    after(rtx, key, 0)
}

/// The entries after `seq`, oldest first.
pub fn after(
    rtx: &ReadTransaction,
    key: &StreamKey,
    seq: u64,
) -> Result<Vec<(u64, ConversationEntry)>, StorageError> {
    let k = key.as_str();
    let t = rtx.open_table(CONVERSATIONS)?;
    let mut out = Vec::new();
    for entry in t.range((k, seq.saturating_add(1))..=(k, u64::MAX))? {
        let (key, v) = entry?;
        out.push((key.value().1, decode(v.value())?));
    }
    Ok(out)
}

/// The newest summary of `key`'s conversation, with its seq.
pub fn latest_summary(
    rtx: &ReadTransaction,
    key: &StreamKey,
) -> Result<Option<(u64, ConversationEntry)>, StorageError> {
    let k = key.as_str();
    let t = rtx.open_table(CONVERSATIONS)?;
    for entry in t.range((k, 0)..=(k, u64::MAX))?.rev() {
        let (key, v) = entry?;
        let e: ConversationEntry = decode(v.value())?;
        if e.kind == EntryKind::Summary {
            return Ok(Some((key.value().1, e)));
        }
    }
    Ok(None)
}

/// Where a fork's conversation ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkPoint {
    /// Forked at the parent's head: the whole conversation.
    Head,
    /// Forked at a version: the entries up to the outcome of the workflow that made it, or
    /// (a version no workflow made) those written before the version's time.
    Version {
        workflow_id: Option<String>,
        created_at_ms: u64,
    },
}

/// Copy `from`'s conversation up to `point` to `to` (a new branch, with no conversation yet),
/// keeping the sequence numbers and message ids. A summary that stands for entries past the
/// point is left out.
pub fn copy_for_fork(
    ctx: &mut WriteCtx<'_>,
    from: &StreamKey,
    to: &StreamKey,
    point: &ForkPoint,
) -> Result<u64, StorageError> {
    let (f, d) = (from.as_str(), to.as_str());
    let mut t = ctx.table(CONVERSATIONS)?;
    let mut entries = Vec::new();
    for entry in t.range((f, 0)..=(f, u64::MAX))? {
        let (key, v) = entry?;
        entries.push((key.value().1, v.value().to_vec()));
    }
    let last = match point {
        ForkPoint::Head => entries.last().map(|(s, _)| *s).unwrap_or(0),
        ForkPoint::Version {
            workflow_id,
            created_at_ms,
        } => {
            let mut last = 0;
            for (seq, bytes) in &entries {
                let e: ConversationEntry = decode(bytes)?;
                let made_it = workflow_id.is_some()
                    && e.workflow_id == *workflow_id
                    && e.kind == EntryKind::Assistant;
                if made_it {
                    last = *seq;
                    break;
                }
                if workflow_id.is_none() && e.created_at_ms <= *created_at_ms {
                    last = *seq;
                }
            }
            last
        }
    };
    let mut copied = 0;
    for (seq, bytes) in entries.into_iter().filter(|(s, _)| *s <= last) {
        let e: ConversationEntry = decode(&bytes)?;
        if e.covers_through.is_some_and(|c| c > last) {
            continue;
        }
        t.insert((d, seq), bytes.as_slice())?;
        copied += 1;
    }
    Ok(copied)
}

/// The workflow a retried trigger already started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub workflow_id: String,
    /// A digest of what the first trigger asked for: the same key with another request is
    /// refused rather than answered with a workflow that does something else.
    pub fingerprint: String,
    pub created_at_ms: u64,
}

impl Record for IdempotencyRecord {
    const KIND: &'static str = "idempotency";
    const VERSION: u8 = 1;
}

pub fn get_idempotency(
    rtx: &ReadTransaction,
    key: &StreamKey,
    idempotency_key: &str,
) -> Result<Option<IdempotencyRecord>, StorageError> {
    let t = rtx.open_table(IDEMPOTENCY)?;
    t.get((key.as_str(), idempotency_key))?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn get_idempotency_for_update(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
    idempotency_key: &str,
) -> Result<Option<IdempotencyRecord>, StorageError> {
    let t = ctx.table(IDEMPOTENCY)?;
    t.get((key.as_str(), idempotency_key))?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn put_idempotency(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
    idempotency_key: &str,
    record: &IdempotencyRecord,
) -> Result<(), StorageError> {
    let mut t = ctx.table(IDEMPOTENCY)?;
    t.insert((key.as_str(), idempotency_key), encode(record).as_slice())?;
    Ok(())
}
