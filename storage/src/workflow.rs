//! Workflows and their journal.
//!
//! A [`WorkflowRecord`] holds a workflow's state machine (status, plan, per-task status); the
//! branch is claimed in `ACTIVE_WORKFLOWS` in the same transaction that creates it and released
//! in the one that makes it terminal. The journal (`TOOL_JOURNAL`, keyed `(workflowId, seq)`)
//! records every model turn and every finished tool call, so that recovery rebuilds the
//! conversation and never runs a finished tool call again. JSON values (messages, tool inputs)
//! are stored as JSON text: postcard cannot carry `serde_json::Value`.

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::model::{claim_branch, release_branch};
use crate::record::{Record, decode, encode};
use crate::tables::{TOOL_JOURNAL, WORKFLOWS};
use crate::writer::WriteCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkflowStatus {
    Pending,
    Planning,
    Coding,
    Deploying,
    Complete,
    Failed,
    Cancelled,
}

impl WorkflowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Planning => "planning",
            Self::Coding => "coding",
            Self::Deploying => "deploying",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanTask {
    pub id: u64,
    pub summary: String,
    pub description: String,
    pub acceptance_criteria: Vec<String>,
    pub dependencies: Vec<u64>,
    pub sub_tasks: Vec<String>,
    pub implementation_notes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub acceptance_criteria: Vec<String>,
    pub tasks: Vec<PlanTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    pub id: u64,
    pub status: TaskStatus,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRecord {
    pub workflow_id: String,
    pub project_id: String,
    pub branch_id: String,
    pub status: WorkflowStatus,
    /// `provider:model`.
    pub model: String,
    pub user_message: String,
    pub plan: Option<Plan>,
    pub tasks: Vec<TaskState>,
    /// The version committed while deploying.
    pub version: Option<u64>,
    pub error: Option<String>,
    /// The model's final reply when it answered without a plan.
    pub reply: Option<String>,
    /// Prompt tokens, the cached ones included, as the providers reported them.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    pub cancel_requested: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Record for WorkflowRecord {
    const KIND: &'static str = "workflow";
    const VERSION: u8 = 2;

    fn migrate(version: u8, body: &[u8]) -> Result<Self, StorageError> {
        /// Version 1: no cache token counts.
        #[derive(Deserialize)]
        struct V1 {
            workflow_id: String,
            project_id: String,
            branch_id: String,
            status: WorkflowStatus,
            model: String,
            user_message: String,
            plan: Option<Plan>,
            tasks: Vec<TaskState>,
            version: Option<u64>,
            error: Option<String>,
            reply: Option<String>,
            input_tokens: u64,
            output_tokens: u64,
            cancel_requested: bool,
            created_at_ms: u64,
            updated_at_ms: u64,
        }
        match version {
            1 => {
                let v: V1 = postcard::from_bytes(body).map_err(|e| StorageError::Corrupt {
                    kind: Self::KIND,
                    message: e.to_string(),
                })?;
                Ok(Self {
                    workflow_id: v.workflow_id,
                    project_id: v.project_id,
                    branch_id: v.branch_id,
                    status: v.status,
                    model: v.model,
                    user_message: v.user_message,
                    plan: v.plan,
                    tasks: v.tasks,
                    version: v.version,
                    error: v.error,
                    reply: v.reply,
                    input_tokens: v.input_tokens,
                    output_tokens: v.output_tokens,
                    cache_read_tokens: 0,
                    cache_write_tokens: 0,
                    cancel_requested: v.cancel_requested,
                    created_at_ms: v.created_at_ms,
                    updated_at_ms: v.updated_at_ms,
                })
            }
            v => Err(StorageError::UnknownVersion {
                kind: Self::KIND,
                version: v,
            }),
        }
    }
}

/// One journal entry. `phase` names the conversation it belongs to (`plan`, or
/// `task:<id>:<attempt>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A user message that opens or continues a conversation (JSON of the message).
    User { phase: String, message_json: String },
    /// One model turn: the assistant message (JSON), with its tool calls.
    Turn { phase: String, message_json: String },
    /// A finished tool call and its result.
    ToolResult {
        phase: String,
        call_id: String,
        name: String,
        input_json: String,
        content: String,
        is_error: bool,
    },
    /// What the workflow was given when it started, so that a recovered workflow continues
    /// with the same context: the project's instructions (file name, text) and the branch
    /// conversation it continues: the entries before `thread_before` (its own user message),
    /// from the summary at `summary` on if there is one.
    Context {
        instructions: Option<(String, String)>,
        thread_before: u64,
        summary: Option<u64>,
    },
    /// A model-written summary that stands, in every later request, for the workflow's
    /// conversation messages `1..upto` (the opening request stays whole).
    Summary { upto: u64, text: String },
}

impl JournalEntry {
    /// The conversation the entry belongs to (`context` and `summary` for the two that
    /// belong to none).
    pub fn phase(&self) -> &str {
        match self {
            Self::User { phase, .. }
            | Self::Turn { phase, .. }
            | Self::ToolResult { phase, .. } => phase,
            Self::Context { .. } => "context",
            Self::Summary { .. } => "summary",
        }
    }
}

impl Record for JournalEntry {
    const KIND: &'static str = "journal_entry";
    const VERSION: u8 = 1;
}

/// Create a workflow, claiming its branch in the same transaction: `Conflict(holder)` when
/// another workflow is active there.
pub fn create_workflow(ctx: &mut WriteCtx<'_>, wf: &WorkflowRecord) -> Result<(), StorageError> {
    claim_branch(ctx, &wf.project_id, &wf.branch_id, &wf.workflow_id)?;
    let mut t = ctx.table(WORKFLOWS)?;
    if t.get(wf.workflow_id.as_str())?.is_some() {
        return Err(StorageError::AlreadyExists(format!(
            "workflow {}",
            wf.workflow_id
        )));
    }
    t.insert(wf.workflow_id.as_str(), encode(wf).as_slice())?;
    Ok(())
}

/// Replace a workflow record; a terminal status releases the branch in the same transaction.
pub fn put_workflow(ctx: &mut WriteCtx<'_>, wf: &WorkflowRecord) -> Result<(), StorageError> {
    {
        let mut t = ctx.table(WORKFLOWS)?;
        t.insert(wf.workflow_id.as_str(), encode(wf).as_slice())?;
    }
    if wf.status.is_terminal() {
        release_branch(ctx, &wf.project_id, &wf.branch_id, &wf.workflow_id)?;
    }
    Ok(())
}

pub fn get_workflow(
    rtx: &ReadTransaction,
    workflow_id: &str,
) -> Result<Option<WorkflowRecord>, StorageError> {
    let t = rtx.open_table(WORKFLOWS)?;
    t.get(workflow_id)?.map(|v| decode(v.value())).transpose()
}

pub fn get_workflow_for_update(
    ctx: &mut WriteCtx<'_>,
    workflow_id: &str,
) -> Result<Option<WorkflowRecord>, StorageError> {
    let t = ctx.table(WORKFLOWS)?;
    t.get(workflow_id)?.map(|v| decode(v.value())).transpose()
}

/// Every workflow not in a terminal state (for recovery at startup).
pub fn list_unfinished(rtx: &ReadTransaction) -> Result<Vec<WorkflowRecord>, StorageError> {
    let t = rtx.open_table(WORKFLOWS)?;
    let mut out = Vec::new();
    for entry in t.iter()? {
        let wf: WorkflowRecord = decode(entry?.1.value())?;
        if !wf.status.is_terminal() {
            out.push(wf);
        }
    }
    Ok(out)
}

/// Append a journal entry; returns its sequence number (from 1).
pub fn append_journal(
    ctx: &mut WriteCtx<'_>,
    workflow_id: &str,
    entry: &JournalEntry,
) -> Result<u64, StorageError> {
    let mut t = ctx.table(TOOL_JOURNAL)?;
    let last = t
        .range((workflow_id, 0)..=(workflow_id, u64::MAX))?
        .next_back()
        .transpose()?
        .map(|(k, _)| k.value().1);
    let seq = last.unwrap_or(0) + 1;
    t.insert((workflow_id, seq), encode(entry).as_slice())?;
    Ok(seq)
}

/// The journal of a workflow, in order.
pub fn journal(
    rtx: &ReadTransaction,
    workflow_id: &str,
) -> Result<Vec<(u64, JournalEntry)>, StorageError> {
    let t = rtx.open_table(TOOL_JOURNAL)?;
    let mut out = Vec::new();
    for entry in t.range((workflow_id, 0)..=(workflow_id, u64::MAX))? {
        let (k, v) = entry?;
        out.push((k.value().1, decode(v.value())?));
    }
    Ok(out)
}
