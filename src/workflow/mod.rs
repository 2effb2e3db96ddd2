//! The workflow engine: `pending → planning → coding → deploying → complete` (or `failed`,
//! `cancelled`).
//!
//! Every step is persisted before it is announced: a transition, a model turn or a tool result
//! is one write that updates the [`WorkflowRecord`], appends to the journal and appends the
//! branch-stream events together. Recovery (at startup, [`Recovery`]) reloads every unfinished
//! workflow and continues from its record and journal: the conversation is rebuilt from the
//! journaled turns and results, and a tool call with a journaled result is never run again.

pub mod context;
pub mod plan;
pub mod tools;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use weldr_storage::conversation::{self as convs, AttachmentRef, ConversationEntry, EntryKind};
use weldr_storage::model::VersionKind;
use weldr_storage::workflow::{
    self as wfs, JournalEntry, TaskState, TaskStatus, WorkflowRecord, WorkflowStatus,
};
use weldr_storage::{NewEvent, StorageError, StreamKey};

use crate::base::Base;
use crate::branches::{BranchError, BranchKey, Branches};
use crate::integrations::{self as integ, Integrations};
use crate::llm::{
    ChatRequest, Delta, LlmProvider, Message, ModelSpec, Part, Role, ToolSpec, provider_for,
};
use crate::residency::{Residency, ResidencyError};
use crate::stream::{EventError, new_event};
use crate::sync::syncer::{Syncer, Trigger};
use crate::worker::{Worker, WorkerState};
use tools::{BranchTools, READ_ONLY, Tools};

/// Model steps per planning conversation and per task attempt.
pub const MAX_STEPS: usize = 25;
/// Attempts per task.
pub const MAX_ATTEMPTS: u32 = 3;
/// Largest tool result kept in an event (the journal keeps it whole).
const EVENT_RESULT_CHARS: usize = 4096;
/// Turns asked again after a malformed tool call or an empty turn, per conversation.
const MAX_TURN_RETRIES: u32 = 2;

/// Why a workflow could not be started or asked to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("workflow {holder} is active on branch {branch}")]
    Busy { holder: String, branch: String },
    #[error("workflow {0} not found")]
    NotFound(String),
    /// An idempotency key sent again with a different request.
    #[error("{0}")]
    IdempotencyReused(String),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The workflow engine: what a run uses, concurrency permits, tools, cancel signals.
pub struct Workflows {
    base: Base,
    branches: Arc<Branches>,
    syncer: Arc<Syncer>,
    /// Brings a recovered workflow's branch back when it was evicted or lost with the volume.
    residency: Arc<Residency>,
    /// `add_integrations` queues here; coding starts after the branch's installs.
    integrations: Arc<Integrations>,
    permits: Arc<Semaphore>,
    tools: RwLock<Arc<dyn Tools>>,
    /// Where commands (run_command, the build) run.
    sandbox: Arc<crate::sandbox::Sandbox>,
    /// Fired when a running workflow is asked to cancel: a model call in flight (a hanging
    /// provider, a retry wait) ends at once instead of at its next safe point.
    cancels:
        std::sync::Mutex<std::collections::HashMap<String, tokio_util::sync::CancellationToken>>,
}

impl Workflows {
    pub fn new(
        base: Base,
        branches: Arc<Branches>,
        syncer: Arc<Syncer>,
        residency: Arc<Residency>,
        integrations: Arc<Integrations>,
        sandbox: Arc<crate::sandbox::Sandbox>,
    ) -> Self {
        let concurrency = base.config.workflow_concurrency;
        Self {
            base,
            branches,
            syncer,
            residency,
            integrations,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            tools: RwLock::new(Arc::new(BranchTools {
                sandbox: sandbox.clone(),
            })),
            sandbox,
            cancels: Default::default(),
        }
    }

    /// The cancel signal of workflow `id` (made on first use).
    fn cancel_signal(&self, id: &str) -> tokio_util::sync::CancellationToken {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn forget_cancel_signal(&self, id: &str) {
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Replace the tool executor (the full tool module, or a test double).
    pub fn set_tools(&self, tools: Arc<dyn Tools>) {
        *self.tools.write().unwrap_or_else(|p| p.into_inner()) = tools;
    }

    fn tools(&self) -> Arc<dyn Tools> {
        self.tools.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a run stopped early.
enum Stop {
    /// The server is shutting down or the store is closed: leave the workflow for recovery.
    Shutdown,
    Cancelled,
    Fail(String),
    /// The provider refused the request as longer than the model's context: the engine's
    /// estimate was low for this model's tokenizer.
    Overflow(String),
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Closed => Stop::Shutdown,
            other => Stop::Fail(format!("storage: {other}")),
        }
    }
}

impl From<EventError> for Stop {
    fn from(e: EventError) -> Self {
        Stop::Fail(e.to_string())
    }
}

impl From<BranchError> for Stop {
    fn from(e: BranchError) -> Self {
        match e {
            BranchError::Storage(StorageError::Closed) => Stop::Shutdown,
            other => Stop::Fail(other.to_string()),
        }
    }
}

pub fn now_ms() -> u64 {
    weldr_storage::writer::now_ms()
}

fn event(wf: &WorkflowRecord, kind: &str, mut fields: Value) -> Result<NewEvent, EventError> {
    if let Value::Object(map) = &mut fields {
        map.insert("workflowId".into(), wf.workflow_id.clone().into());
        map.insert("messageId".into(), message_ids(&wf.workflow_id).1.into());
    }
    new_event(kind, fields)
}

fn status_event(wf: &WorkflowRecord) -> Result<NewEvent, EventError> {
    let mut fields = json!({"status": wf.status.as_str()});
    if let Some(e) = &wf.error {
        fields["error"] = e.clone().into();
    }
    event(wf, "status", fields)
}

/// Persist `wf`, append `journal` entries and `events` in one transaction.
async fn persist(
    engine: &Workflows,
    wf: &WorkflowRecord,
    journal: Vec<JournalEntry>,
    events: Vec<NewEvent>,
) -> Result<(), StorageError> {
    persist_with(engine, wf, journal, events, None).await
}

/// [`persist`], and add `said` to the branch conversation in the same transaction (a
/// workflow's outcome goes in with its terminal status).
async fn persist_with(
    engine: &Workflows,
    wf: &WorkflowRecord,
    journal: Vec<JournalEntry>,
    events: Vec<NewEvent>,
    said: Option<ConversationEntry>,
) -> Result<(), StorageError> {
    let wf = wf.clone();
    let key = StreamKey::new(&wf.project_id, &wf.branch_id);
    engine
        .base
        .store
        .writer()
        .write(move |ctx| {
            // A cancel request may have landed since `wf` was read: keep it.
            let mut wf = wf.clone();
            if let Some(current) = wfs::get_workflow_for_update(ctx, &wf.workflow_id)? {
                wf.cancel_requested |= current.cancel_requested;
            }
            wfs::put_workflow(ctx, &wf)?;
            for entry in &journal {
                wfs::append_journal(ctx, &wf.workflow_id, entry)?;
            }
            for e in &events {
                ctx.append(&key, e.clone())?;
            }
            if let Some(entry) = &said {
                convs::append(ctx, &key, entry)?;
            }
            Ok(())
        })
        .await
}

/// The conversation entry of a workflow that ends as `wf` says: its reply, plan, version and
/// the files it changed (for one that did not complete: the files it left changed and
/// uncommitted), its failure, and its tool calls.
async fn outcome_entry(engine: &Workflows, wf: &WorkflowRecord) -> ConversationEntry {
    let (_, message_id) = message_ids(&wf.workflow_id);
    let mut entry = ConversationEntry::new(
        message_id,
        EntryKind::Assistant,
        wf.reply.clone().unwrap_or_default(),
        now_ms(),
    );
    entry.workflow_id = Some(wf.workflow_id.clone());
    entry.plan_json = wf.plan.as_ref().map(|p| plan_value(p).to_string());
    entry.status = Some(wf.status.as_str().to_string());
    entry.version = wf.version;
    entry.error = wf.error.clone();
    let journal = load_journal(engine, &wf.workflow_id)
        .await
        .unwrap_or_default();
    entry.tool_calls = journal
        .iter()
        .filter_map(|(_, e)| match e {
            JournalEntry::ToolResult {
                name,
                input_json,
                is_error,
                ..
            } => Some(convs::ToolCallNote {
                name: name.clone(),
                target: call_target(input_json),
                is_error: *is_error,
            }),
            _ => None,
        })
        .take(MAX_TOOL_NOTES)
        .collect();
    if entry.text.is_empty() {
        // The model's last words, if it said any.
        entry.text = journal
            .iter()
            .rev()
            .find_map(|(_, e)| match e {
                JournalEntry::Turn { message_json, .. } => {
                    serde_json::from_str::<Message>(message_json)
                        .ok()
                        .map(|m| m.text())
                        .filter(|t| !t.trim().is_empty())
                }
                _ => None,
            })
            .unwrap_or_default();
    }
    let key = BranchKey::new(&wf.project_id, &wf.branch_id);
    entry.files_changed = match wf.version {
        Some(seq) => {
            let (p, b) = (wf.project_id.clone(), wf.branch_id.clone());
            engine
                .base
                .read(move |rtx| weldr_storage::model::get_version(rtx, &p, &b, seq))
                .await
                .ok()
                .flatten()
                .map(|v| v.changed.into_iter().map(|c| c.path).collect())
                .unwrap_or_default()
        }
        None if wf.status != WorkflowStatus::Complete => {
            let dir = engine.base.dir(&key);
            tokio::task::spawn_blocking(move || crate::git::dirty_paths(&dir, MAX_TOOL_NOTES))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    if wf.status == WorkflowStatus::Cancelled && !entry.files_changed.is_empty() {
        entry.text = format!(
            "Cancelled. The changes made so far are left uncommitted in the working tree: {}.",
            entry.files_changed.join(", ")
        );
    }
    entry
}

/// Most tool calls (and files) an outcome entry lists.
const MAX_TOOL_NOTES: usize = 200;

/// What a tool call worked on: its path, pattern or command, shortened.
fn call_target(input_json: &str) -> String {
    let input: Value = serde_json::from_str(input_json).unwrap_or(Value::Null);
    let target = ["filePath", "path", "pattern", "query", "command"]
        .iter()
        .find_map(|k| input[*k].as_str())
        .unwrap_or("");
    context::one_line(target, 120)
}

async fn load(engine: &Workflows, id: &str) -> Result<WorkflowRecord, Stop> {
    let id2 = id.to_string();
    engine
        .base
        .read(move |rtx| wfs::get_workflow(rtx, &id2))
        .await?
        .ok_or_else(|| Stop::Fail(format!("workflow {id} vanished")))
}

async fn load_journal(engine: &Workflows, id: &str) -> Result<Vec<(u64, JournalEntry)>, Stop> {
    let id = id.to_string();
    Ok(engine.base.read(move |rtx| wfs::journal(rtx, &id)).await?)
}

/// What the user asked: the text, and the files attached to it (by content address).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserInput {
    pub text: String,
    pub attachments: Vec<AttachmentRef>,
}

/// A retried trigger's key (`Idempotency-Key`, or the body's `clientMessageId`) and a digest
/// of what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: String,
}

/// A trigger's answer: the workflow, and whether an earlier trigger with the same
/// idempotency key started it.
#[derive(Debug, Clone)]
pub struct Triggered {
    pub workflow: WorkflowRecord,
    pub replayed: bool,
}

/// The message ids of workflow `id`'s user message and of its outcome (the assistant's
/// message, which its stream events carry as `messageId`).
pub fn message_ids(workflow_id: &str) -> (String, String) {
    let hex = workflow_id.strip_prefix("wf-").unwrap_or(workflow_id);
    (format!("msg-{hex}-user"), format!("msg-{hex}-agent"))
}

/// What a trigger's transaction found.
enum Claim {
    New,
    Replay(Box<WorkflowRecord>),
    Reused(String),
}

/// Create a workflow (claiming the branch), add the user's message to the branch's
/// conversation, and start it, all in one transaction. `Busy` when another workflow is
/// active on the branch; with an idempotency key that started a workflow before, that
/// workflow (`replayed`), whatever its state.
pub async fn trigger(
    engine: &Arc<Workflows>,
    project_id: &str,
    branch_id: &str,
    input: UserInput,
    model: String,
    idempotency: Option<Idempotency>,
) -> Result<Triggered, WorkflowError> {
    let now = now_ms();
    let wf = WorkflowRecord {
        workflow_id: new_workflow_id(),
        project_id: project_id.into(),
        branch_id: branch_id.into(),
        status: WorkflowStatus::Pending,
        model,
        user_message: input.text.clone(),
        plan: None,
        tasks: vec![],
        version: None,
        error: None,
        reply: None,
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cancel_requested: false,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let (user_id, _) = message_ids(&wf.workflow_id);
    let status = event(
        &wf,
        "status",
        json!({"status": wf.status.as_str(), "userMessageId": user_id}),
    )?;
    let mut entry = ConversationEntry::new(user_id, EntryKind::User, input.text, now);
    entry.workflow_id = Some(wf.workflow_id.clone());
    entry.attachments = input.attachments;
    let key = StreamKey::new(project_id, branch_id);
    let record = wf.clone();
    // Claimed under the branch lock: an integration install (or a revert) in progress
    // finishes before the workflow can start reading the tree.
    let _guard = engine
        .base
        .locks
        .lock(&BranchKey::new(project_id, branch_id))
        .await;
    let created = engine
        .base
        .store
        .writer()
        .write(move |ctx| {
            if let Some(idem) = &idempotency
                && let Some(first) = convs::get_idempotency_for_update(ctx, &key, &idem.key)?
            {
                if first.fingerprint != idem.fingerprint {
                    return Ok(Claim::Reused(idem.key.clone()));
                }
                let wf =
                    wfs::get_workflow_for_update(ctx, &first.workflow_id)?.ok_or_else(|| {
                        StorageError::NotFound(format!("workflow {}", first.workflow_id))
                    })?;
                return Ok(Claim::Replay(Box::new(wf)));
            }
            wfs::create_workflow(ctx, &record)?;
            convs::append(ctx, &key, &entry)?;
            if let Some(idem) = &idempotency {
                let first = convs::IdempotencyRecord {
                    workflow_id: record.workflow_id.clone(),
                    fingerprint: idem.fingerprint.clone(),
                    created_at_ms: record.created_at_ms,
                };
                convs::put_idempotency(ctx, &key, &idem.key, &first)?;
            }
            ctx.append(&key, status.clone())?;
            Ok(Claim::New)
        })
        .await;
    match created {
        Ok(Claim::Replay(first)) => Ok(Triggered {
            workflow: *first,
            replayed: true,
        }),
        Ok(Claim::Reused(key)) => Err(WorkflowError::IdempotencyReused(format!(
            "the idempotency key {key:?} was sent before with a different request"
        ))),
        Ok(Claim::New) => {
            spawn(engine.clone(), wf.workflow_id.clone());
            Ok(Triggered {
                workflow: wf,
                replayed: false,
            })
        }
        Err(StorageError::Conflict(holder)) => Err(WorkflowError::Busy {
            holder,
            branch: branch_id.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

fn new_workflow_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS random source");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("wf-{hex}")
}

/// Ask a workflow to stop at its next safe point.
pub async fn request_cancel(engine: &Workflows, id: &str) -> Result<WorkflowRecord, WorkflowError> {
    let (id, id2) = (id.to_string(), id.to_string());
    let wf = engine
        .base
        .store
        .writer()
        .write(move |ctx| {
            let mut wf = wfs::get_workflow_for_update(ctx, &id)?
                .ok_or_else(|| StorageError::NotFound(format!("workflow {id}")))?;
            if !wf.status.is_terminal() && !wf.cancel_requested {
                wf.cancel_requested = true;
                wf.updated_at_ms = now_ms();
                wfs::put_workflow(ctx, &wf)?;
            }
            Ok(wf)
        })
        .await
        .map_err(|e| match e {
            StorageError::NotFound(_) => WorkflowError::NotFound(id2),
            other => other.into(),
        })?;
    if wf.cancel_requested && !wf.status.is_terminal() {
        engine.cancel_signal(&wf.workflow_id).cancel();
    }
    Ok(wf)
}

/// Recovery as a [`Worker`]: at startup, resume every unfinished workflow, then done. A
/// failed listing (the store unreadable for a moment) is retried with the runner's backoff.
pub struct Recovery {
    engine: Arc<Workflows>,
}

impl Recovery {
    pub fn new(engine: Arc<Workflows>) -> Self {
        Self { engine }
    }
}

#[async_trait::async_trait]
impl Worker for Recovery {
    fn name(&self) -> &'static str {
        "recovery"
    }

    async fn work(
        &mut self,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<WorkerState, String> {
        let list = self
            .engine
            .base
            .read(wfs::list_unfinished)
            .await
            .map_err(|e| format!("listing unfinished workflows: {e}"))?;
        for wf in list {
            tracing::info!(workflow = %wf.workflow_id, status = wf.status.as_str(), "resuming workflow");
            spawn(self.engine.clone(), wf.workflow_id);
        }
        Ok(WorkerState::Done)
    }

    async fn wait_for_work(&mut self) {}
}

fn spawn(engine: Arc<Workflows>, id: String) {
    tokio::spawn(async move {
        let permits = engine.permits.clone();
        // A workflow cancelled while it waits for a permit ends at once, without one.
        let cancel = engine.cancel_signal(&id);
        let _permit = tokio::select! {
            p = permits.acquire_owned() => match p {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            _ = cancel.cancelled() => None,
        };
        let outcome = match present(&engine, &id, &cancel).await {
            Ok(()) => drive(&engine, &id).await,
            Err(stop) => Err(stop),
        };
        engine.forget_cancel_signal(&id);
        let end = match outcome {
            Ok(()) | Err(Stop::Shutdown) => return,
            Err(Stop::Cancelled) => (WorkflowStatus::Cancelled, None),
            Err(Stop::Fail(message) | Stop::Overflow(message)) => {
                (WorkflowStatus::Failed, Some(message))
            }
        };
        if let Err(e) = finish(&engine, &id, end.0, end.1).await {
            tracing::warn!(workflow = %id, error = %e, "could not record the end of a workflow");
        }
    });
}

/// Make the workflow's branch present before the run touches its directory: a workflow
/// recovered at start may find its branch evicted, or gone with a lost volume (the store
/// restored from its backup, the branch settled as evicted). Object storage out of reach or a
/// full disk is waited out with backoff, not turned into a failed workflow; anything else
/// fails it with the reason.
async fn present(
    engine: &Workflows,
    id: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), Stop> {
    let wf = load(engine, id).await?;
    if wf.status.is_terminal() {
        return Ok(());
    }
    let key = BranchKey::new(&wf.project_id, &wf.branch_id);
    let mut attempt = 0;
    loop {
        check(engine, &load(engine, id).await?)?;
        match engine.residency.ensure_present(&key).await {
            Ok(_) => return Ok(()),
            Err(e @ (ResidencyError::RestoreFailed { .. } | ResidencyError::DiskFull { .. })) => {
                attempt += 1;
                tracing::warn!(workflow = %id, branch = %key, error = %e, attempt, "the workflow waits for its branch");
                tokio::select! {
                    _ = tokio::time::sleep(crate::worker::backoff(attempt)) => {}
                    _ = cancel.cancelled() => return Err(Stop::Cancelled),
                    _ = engine.base.shutdown.cancelled() => return Err(Stop::Shutdown),
                }
            }
            Err(e) => {
                return Err(Stop::Fail(format!(
                    "the branch could not be made ready: {e}"
                )));
            }
        }
    }
}

/// Record a terminal status (releasing the branch) with its `error`, `status` and `end` events.
async fn finish(
    engine: &Workflows,
    id: &str,
    status: WorkflowStatus,
    error: Option<String>,
) -> Result<(), StorageError> {
    let Ok(mut wf) = load(engine, id).await else {
        return Err(StorageError::NotFound(format!("workflow {id}")));
    };
    if wf.status.is_terminal() {
        return Ok(());
    }
    wf.status = status;
    wf.error = error.clone();
    wf.updated_at_ms = now_ms();
    let mut events = Vec::new();
    if let Some(message) = &error {
        // Not `error`: a server event of that name fires `EventSource`'s own error handler.
        events.extend(event(&wf, "failure", json!({"message": message})).ok());
    }
    events.extend(status_event(&wf).ok());
    events.extend(event(&wf, "end", json!({"status": status.as_str()})).ok());
    tracing::info!(workflow = %id, status = status.as_str(), error = ?error, "workflow ended");
    let said = outcome_entry(engine, &wf).await;
    persist_with(engine, &wf, vec![], events, Some(said)).await
}

async fn transition(
    engine: &Workflows,
    wf: &mut WorkflowRecord,
    to: WorkflowStatus,
) -> Result<(), Stop> {
    wf.status = to;
    wf.updated_at_ms = now_ms();
    let events = vec![status_event(wf)?];
    persist(engine, wf, vec![], events).await?;
    Ok(())
}

fn check(engine: &Workflows, wf: &WorkflowRecord) -> Result<(), Stop> {
    if engine.base.shutdown.is_cancelled() {
        return Err(Stop::Shutdown);
    }
    if wf.cancel_requested {
        return Err(Stop::Cancelled);
    }
    Ok(())
}

async fn drive(engine: &Arc<Workflows>, id: &str) -> Result<(), Stop> {
    loop {
        let mut wf = load(engine, id).await?;
        if wf.status.is_terminal() {
            return Ok(());
        }
        check(engine, &wf)?;
        match wf.status {
            WorkflowStatus::Pending => {
                transition(engine, &mut wf, WorkflowStatus::Planning).await?
            }
            WorkflowStatus::Planning => planning(engine, wf).await?,
            WorkflowStatus::Coding => coding(engine, wf).await?,
            WorkflowStatus::Deploying => return deploying(engine, wf).await,
            _ => return Ok(()),
        }
    }
}

/// What ended a conversation.
enum Outcome {
    /// `submit_plan` was accepted (the record is in `coding` now).
    PlanAccepted,
    /// The model ended its turn without a tool call.
    Reply(String),
    /// `done` was called (the task is `completed` now).
    TaskDone,
    StepsExhausted,
}

#[derive(Clone, Copy)]
enum Mode {
    Plan,
    Task(u64),
}

/// A workflow's conversation rebuilt from its journal.
struct Rebuilt {
    /// Every phase's messages, in order (a task sees what planning read).
    messages: Vec<Message>,
    /// Results of the phase's finished tool calls, by call id.
    finished: HashMap<String, (String, bool)>,
    /// Model turns the phase has taken.
    steps: usize,
    /// Model turns the workflow has taken (every phase).
    turns: usize,
    /// The newest summary of older messages: `messages[1..upto]` are replaced by `text`.
    summary: Option<(usize, String)>,
    /// The message the phase's opening (a task's instructions) went into, and its parts: a
    /// summary that stands for that message must not lose them.
    phase_opening: Option<(usize, Vec<Part>)>,
}

/// The workflow's conversation as journaled (every phase, in order: a task sees what planning
/// read), the results of the finished tool calls of `phase`, and the model steps of `phase`.
fn conversation(journal: &[(u64, JournalEntry)], phase: &str) -> Result<Rebuilt, Stop> {
    let mut messages: Vec<Message> = Vec::new();
    let mut finished = HashMap::new();
    let mut steps = 0;
    let mut turns = 0;
    let mut summary = None;
    let mut phase_opening = None;
    let parse = |json: &str| -> Result<Message, Stop> {
        serde_json::from_str(json).map_err(|e| Stop::Fail(format!("corrupt journal entry: {e}")))
    };
    for (_, entry) in journal {
        let here = entry.phase() == phase;
        let (role, parts) = match entry {
            JournalEntry::User { message_json, .. } => {
                let parts = parse(message_json)?.parts;
                if here {
                    let index = match messages.last() {
                        Some(m) if m.role == Role::User => messages.len() - 1,
                        _ => messages.len(),
                    };
                    phase_opening = Some((index, parts.clone()));
                }
                (Role::User, parts)
            }
            JournalEntry::Turn { message_json, .. } => {
                steps += usize::from(here);
                turns += 1;
                (Role::Assistant, parse(message_json)?.parts)
            }
            JournalEntry::Summary { upto, text } => {
                summary = Some((usize::try_from(*upto).unwrap_or(usize::MAX), text.clone()));
                continue;
            }
            JournalEntry::Context { .. } => continue,
            JournalEntry::ToolResult {
                call_id,
                name,
                content,
                is_error,
                ..
            } => {
                if here {
                    finished.insert(call_id.clone(), (content.clone(), *is_error));
                }
                let part = Part::ToolResult {
                    id: call_id.clone(),
                    name: name.clone(),
                    content: content.clone(),
                    is_error: *is_error,
                };
                (Role::User, vec![part])
            }
        };
        // Roles alternate: consecutive user entries share one message.
        match messages.last_mut() {
            Some(m) if m.role == Role::User && role == Role::User => m.parts.extend(parts),
            _ => messages.push(Message { role, parts }),
        }
    }
    Ok(Rebuilt {
        messages,
        finished,
        steps,
        turns,
        summary,
        phase_opening,
    })
}

struct Ctx {
    provider: Arc<dyn LlmProvider>,
    model: String,
    /// The most output tokens one turn may take.
    output_limit: u32,
    dir: PathBuf,
    tools: Arc<dyn Tools>,
    /// The project's instructions (file name, text), read when the workflow started.
    instructions: Option<(String, String)>,
    /// The branch conversation before this workflow, as messages.
    thread: Vec<Message>,
    /// The parts of the user's attachments, added to the workflow's opening message.
    attachments: Vec<Part>,
    /// The context budget, and the scale learned from the provider's usage reports.
    budget: std::sync::Mutex<context::Budget>,
    /// Tool results of the workflow's messages before this index are sent shortened. It only
    /// moves forward, so the requests of a workflow share their prefix for as long as they fit.
    shortened: std::sync::atomic::AtomicUsize,
    /// Where `add_integrations` queues, for which branch and workflow.
    integrations: Arc<Integrations>,
    key: BranchKey,
    workflow_id: String,
}

fn context(engine: &Workflows, wf: &WorkflowRecord) -> Result<Ctx, Stop> {
    let spec = ModelSpec::parse(&wf.model).map_err(|e| Stop::Fail(e.to_string()))?;
    let provider = provider_for(&engine.base.config.providers, &spec)
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let window = crate::llm::limits::context_tokens(
        &spec.provider,
        &spec.model,
        engine.base.config.providers.context_tokens,
    );
    let budget = context::Budget::new(window);
    let output_limit = crate::llm::limits::max_output_tokens(
        &spec.provider,
        &spec.model,
        engine.base.config.providers.max_output_tokens,
    );
    Ok(Ctx {
        provider,
        model: spec.model,
        output_limit,
        dir: engine
            .base
            .dir(&BranchKey::new(&wf.project_id, &wf.branch_id)),
        tools: engine.tools(),
        instructions: None,
        thread: Vec::new(),
        attachments: Vec::new(),
        budget: std::sync::Mutex::new(budget),
        shortened: Default::default(),
        integrations: engine.integrations.clone(),
        key: BranchKey::new(&wf.project_id, &wf.branch_id),
        workflow_id: wf.workflow_id.clone(),
    })
}

/// The context a workflow started with (written to its journal when it starts, read back
/// after a restart): the project's instructions, the thread (an older part of it summarized
/// first when it takes more than its share of the budget), the user's attachments.
async fn prepare(engine: &Arc<Workflows>, wf: &WorkflowRecord, ctx: &mut Ctx) -> Result<(), Stop> {
    let journal = load_journal(engine, &wf.workflow_id).await?;
    let key = StreamKey::new(&wf.project_id, &wf.branch_id);
    let (user_id, _) = message_ids(&wf.workflow_id);
    let k = key.clone();
    let entries = engine.base.read(move |rtx| convs::all(rtx, &k)).await?;
    let own = entries.iter().find(|(_, e)| e.message_id == user_id);
    if let Some((_, e)) = own {
        ctx.attachments = attachment_parts(engine, &wf.project_id, &e.attachments).await?;
    }
    let fixed = journal.iter().find_map(|(_, e)| match e {
        JournalEntry::Context {
            instructions,
            thread_before,
            summary,
        } => Some((instructions.clone(), *thread_before, *summary)),
        _ => None,
    });
    let (instructions, thread_before, summary) = match fixed {
        Some(fixed) => fixed,
        None => {
            // A workflow from before conversations were kept has no user entry: no thread.
            let before = own.map(|(seq, _)| *seq).unwrap_or(0);
            let instructions = {
                let dir = ctx.dir.clone();
                tokio::task::spawn_blocking(move || context::read_instructions(&dir))
                    .await
                    .ok()
                    .flatten()
            };
            let summary = summarize_thread(engine, wf, ctx, &entries, before).await?;
            let entry = JournalEntry::Context {
                instructions: instructions.clone(),
                thread_before: before,
                summary,
            };
            let current = load(engine, &wf.workflow_id).await?;
            persist(engine, &current, vec![entry], vec![]).await?;
            (instructions, before, summary)
        }
    };
    ctx.instructions = instructions;
    ctx.thread = thread_of(&entries, thread_before, summary);
    Ok(())
}

/// The thread before entry `before`, from the summary at `summary` on.
fn thread_of(
    entries: &[(u64, ConversationEntry)],
    before: u64,
    summary: Option<u64>,
) -> Vec<Message> {
    let summary_entry = summary.and_then(|s| entries.iter().find(|(seq, _)| *seq == s));
    let covered = summary_entry
        .and_then(|(_, e)| e.covers_through)
        .unwrap_or(0);
    let kept: Vec<ConversationEntry> = entries
        .iter()
        .filter(|(seq, e)| *seq > covered && *seq < before && e.kind != EntryKind::Summary)
        .map(|(_, e)| e.clone())
        .collect();
    context::thread_messages(summary_entry.map(|(_, e)| e), &kept)
}

/// When the thread before `before` takes more than its share of the budget, its older part
/// is summarized by the model (the summary before it included) and the summary is added to
/// the branch conversation, for this workflow and the ones after it. Returns the summary to
/// start the thread from.
async fn summarize_thread(
    engine: &Arc<Workflows>,
    wf: &WorkflowRecord,
    ctx: &Ctx,
    entries: &[(u64, ConversationEntry)],
    before: u64,
) -> Result<Option<u64>, Stop> {
    let latest = entries
        .iter()
        .rev()
        .find(|(seq, e)| *seq < before && e.kind == EntryKind::Summary)
        .map(|(seq, _)| *seq);
    let limit = {
        let b = lock(&ctx.budget);
        b.prompt_limit(ctx.output_limit.min(b.output_cap())) as f64
    };
    let thread = thread_of(entries, before, latest);
    let size: u64 = thread.iter().map(context::message_tokens).sum();
    if (size as f64) <= limit * context::THREAD_SHARE {
        return Ok(latest);
    }
    // Keep the newest entries that fit in the smaller share whole; summarize the rest.
    let covered = latest
        .and_then(|s| entries.iter().find(|(seq, _)| *seq == s))
        .and_then(|(_, e)| e.covers_through)
        .unwrap_or(0);
    let candidates: Vec<&(u64, ConversationEntry)> = entries
        .iter()
        .filter(|(seq, e)| *seq > covered && *seq < before && e.kind != EntryKind::Summary)
        .collect();
    let cut = context::thread_cut(
        candidates.iter().map(|(_, e)| e),
        limit * context::THREAD_KEEP_SHARE,
    );
    if cut == 0 {
        return Ok(latest);
    }
    let through = candidates[cut - 1].0;
    let old = thread_of(entries, through + 1, latest);
    let text = summarize(engine, wf, ctx, &old).await?;
    let now = now_ms();
    let mut entry = ConversationEntry::new(
        format!("msg-summary-{through}"),
        EntryKind::Summary,
        text,
        now,
    );
    entry.covers_through = Some(through);
    let key = StreamKey::new(&wf.project_id, &wf.branch_id);
    let seq = engine
        .base
        .store
        .writer()
        .write(move |c| convs::append(c, &key, &entry))
        .await?;
    Ok(Some(seq))
}

/// A summary of `messages` written by the model (a side request that is not a turn), or,
/// when the model cannot write one, every user message's first line and the tool calls.
async fn summarize(
    engine: &Arc<Workflows>,
    wf: &WorkflowRecord,
    ctx: &Ctx,
    messages: &[Message],
) -> Result<String, Stop> {
    let max_chars = {
        let b = lock(&ctx.budget);
        usize::try_from(b.prompt_limit(2048).saturating_mul(3) / 2).unwrap_or(usize::MAX)
    };
    let request = ChatRequest {
        model: ctx.model.clone(),
        system: context::SUMMARY_SYSTEM.into(),
        messages: vec![Message::user_text(format!(
            "Summarize this conversation:\n\n{}",
            context::transcript(messages, max_chars)
        ))],
        tools: Vec::new(),
        max_tokens: 2048.min(ctx.output_limit),
        stable_prefix: 0,
        turn: None,
    };
    let cancel = engine.cancel_signal(&wf.workflow_id);
    let quiet = |_: Delta| {};
    let answer = tokio::select! {
        r = ctx.provider.chat(&request, &quiet) => r,
        _ = cancel.cancelled() => return Err(Stop::Cancelled),
        _ = engine.base.shutdown.cancelled() => return Err(Stop::Shutdown),
    };
    match answer {
        Ok(r) if !r.message.text().trim().is_empty() => {
            let mut current = load(engine, &wf.workflow_id).await?;
            current.input_tokens += r.usage.input_tokens;
            current.output_tokens += r.usage.output_tokens;
            current.cache_read_tokens += r.usage.cache_read_tokens;
            current.cache_write_tokens += r.usage.cache_write_tokens;
            persist(engine, &current, vec![], vec![]).await?;
            Ok(r.message.text())
        }
        Ok(_) => Ok(context::extractive_summary(messages)),
        Err(e) => {
            tracing::warn!(workflow = %wf.workflow_id, error = %e, "the model could not summarize; keeping the requests and tool calls instead");
            Ok(context::extractive_summary(messages))
        }
    }
}

/// The model parts of the user's attachments: images as images (the API refused images to a
/// model without image input), text files as text. An attachment that is gone is named.
async fn attachment_parts(
    engine: &Arc<Workflows>,
    project_id: &str,
    refs: &[AttachmentRef],
) -> Result<Vec<Part>, Stop> {
    let mut parts = Vec::new();
    for a in refs {
        let (p, id) = (project_id.to_string(), a.id.clone());
        let bytes = engine
            .base
            .read(move |rtx| weldr_storage::attachments::get_bytes(rtx, &p, &id))
            .await?;
        let name = a.filename.clone().unwrap_or_else(|| a.id.clone());
        match bytes {
            None => parts.push(Part::Text {
                text: format!("[attachment {name} is no longer available]"),
            }),
            Some(bytes) if a.media_type.starts_with("image/") => {
                use base64::Engine as _;
                parts.push(Part::Image {
                    media_type: a.media_type.clone(),
                    data: base64::engine::general_purpose::STANDARD.encode(&bytes),
                });
            }
            Some(bytes) => parts.push(Part::Text {
                text: format!(
                    "<attached-file name={name:?} type={:?}>\n{}\n</attached-file>",
                    a.media_type,
                    String::from_utf8_lossy(&bytes)
                ),
            }),
        }
    }
    Ok(parts)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn system_base() -> String {
    format!(
        "You are a coding agent working in a project directory, in two phases. Planning: read \
         the code with the read-only tools ({}), then call `submit_plan` with acceptance \
         criteria and ordered tasks; if the request is unclear, answer with a question instead \
         of a plan (tools that change anything are refused while planning). Coding: you are \
         given one task at a time; carry it out with the tools, then call `done`. The \
         conversation with the user so far comes before their latest message, which may answer \
         a question you asked.",
        READ_ONLY.join(", ")
    )
}

/// Run the conversation of `phase` until it ends (see [`Outcome`]): answer the tool calls of
/// the last turn, then ask the model for the next turn, until a turn has no tool call, a tool
/// call ends the phase, or the steps run out.
async fn converse(
    engine: &Arc<Workflows>,
    id: &str,
    ctx: &Ctx,
    mode: Mode,
    phase: &str,
    opening: Message,
) -> Result<Outcome, Stop> {
    let mut convo = resume(engine, id, phase, opening).await?;
    let (system, specs) = toolset(ctx);
    let mut budget = TurnBudget {
        max_tokens: crate::llm::limits::START_OUTPUT_TOKENS.min(ctx.output_limit),
        retries: 0,
        estimate: 0,
    };
    let mut overflows = 0;
    loop {
        let wf = load(engine, id).await?;
        check(engine, &wf)?;
        if let Some(last) = convo.last_turn() {
            let calls: Vec<(String, String, Value)> = last
                .tool_calls()
                .map(|(i, n, v)| (i.to_string(), n.to_string(), v.clone()))
                .collect();
            if calls.is_empty() {
                return Ok(Outcome::Reply(last.text()));
            }
            let (results, outcome) = run_tool_calls(
                engine,
                id,
                ctx,
                mode,
                phase,
                calls,
                &mut convo.rebuilt.finished,
            )
            .await?;
            if let Some(o) = outcome {
                return Ok(o);
            }
            convo.rebuilt.messages.push(Message {
                role: Role::User,
                parts: results,
            });
        }
        if convo.rebuilt.steps >= MAX_STEPS {
            return Ok(Outcome::StepsExhausted);
        }
        // The prompt is planned with at most a quarter of the window kept for the output; a
        // turn may ask for more when the prompt leaves room.
        let reserve = budget.max_tokens.min(lock(&ctx.budget).output_cap());
        let fitted = fit_request(engine, &wf, ctx, &system, &specs, &mut convo, reserve).await?;
        budget.estimate = fitted.tokens;
        let (messages, stable_prefix) = (fitted.messages, fitted.stable_prefix);
        let room = lock(&ctx.budget).output_room(budget.estimate);
        let request = ChatRequest {
            model: ctx.model.clone(),
            system: system.clone(),
            messages,
            tools: specs.clone(),
            max_tokens: budget.max_tokens.min(room),
            stable_prefix,
            turn: Some(convo.rebuilt.turns),
        };
        let message = match model_turn(engine, id, ctx, phase, wf, request, &mut budget).await {
            Err(Stop::Overflow(message)) => {
                // Count tokens more generously and fit the request again, a few times.
                overflows += 1;
                if overflows > MAX_TURN_RETRIES {
                    return Err(Stop::Fail(message));
                }
                tracing::info!(workflow = %id, "the provider found the request too long; fitting it again");
                lock(&ctx.budget).grow();
                ctx.shortened.store(0, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            other => other?,
        };
        convo.rebuilt.messages.push(message);
        convo.rebuilt.steps += 1;
        convo.rebuilt.turns += 1;
    }
}

/// The messages of the next request within the budget, their estimated tokens, and how many
/// of them the request after it will send unchanged. The thread, then the workflow's messages: the opening with
/// the attachments (and the summary of older turns, if any), the turns after the summary,
/// tool results before the watermark shortened. Over the budget, the watermark moves on;
/// when shortening every older result is not enough, the older turns are summarized (once:
/// the summary is journaled) and the request is built again.
#[allow(clippy::too_many_arguments)]
async fn fit_request(
    engine: &Arc<Workflows>,
    wf: &WorkflowRecord,
    ctx: &Ctx,
    system: &str,
    specs: &[ToolSpec],
    convo: &mut Conversation,
    max_tokens: u32,
) -> Result<context::Fitted, Stop> {
    use std::sync::atomic::Ordering;
    let fixed = context::fixed_tokens(system, specs);
    let (limit, scale) = {
        let b = lock(&ctx.budget);
        (b.prompt_limit(max_tokens), b.clone())
    };
    for _ in 0..3 {
        let own = context::own_messages(
            &convo.rebuilt.messages,
            convo.rebuilt.summary.as_ref(),
            convo.rebuilt.phase_opening.as_ref(),
            &ctx.attachments,
        );
        let mut watermark = ctx.shortened.load(Ordering::Relaxed);
        let fitted = context::fit(&ctx.thread, own, fixed, limit, &scale, &mut watermark);
        ctx.shortened.store(watermark, Ordering::Relaxed);
        if let Some(fitted) = fitted {
            return Ok(fitted);
        }
        // Still over: summarize the older turns of the workflow.
        let Some((cut, old)) = context::to_summarize(
            &convo.rebuilt.messages,
            convo.rebuilt.summary.as_ref(),
            limit,
        ) else {
            break;
        };
        let text = summarize(engine, wf, ctx, &old).await?;
        let current = load(engine, &wf.workflow_id).await?;
        let entry = JournalEntry::Summary {
            upto: cut as u64,
            text: text.clone(),
        };
        persist(engine, &current, vec![entry], vec![]).await?;
        convo.rebuilt.summary = Some((cut, text));
        ctx.shortened.store(0, Ordering::Relaxed);
    }
    // Last resort: the newest results shortened too (the model can read again what it needs).
    let mut own = context::own_messages(
        &convo.rebuilt.messages,
        convo.rebuilt.summary.as_ref(),
        convo.rebuilt.phase_opening.as_ref(),
        &ctx.attachments,
    );
    let all = own.len();
    context::shorten_results(&mut own, all);
    let total = fixed
        + ctx
            .thread
            .iter()
            .chain(own.iter())
            .map(context::message_tokens)
            .sum::<u64>();
    if scale.scaled(total) <= limit {
        let mut messages = ctx.thread.clone();
        let stable_prefix = messages.len();
        messages.extend(own);
        return Ok(context::Fitted {
            messages,
            stable_prefix,
            tokens: total,
        });
    }
    Err(Stop::Fail(format!(
        "the request does not fit in the model's context window of {} tokens even with older \
         turns summarized; raise WELDR_CONTEXT_TOKENS or ask for smaller steps",
        lock(&ctx.budget).window
    )))
}

/// A conversation rebuilt from the journal.
struct Conversation {
    rebuilt: Rebuilt,
}

impl Conversation {
    /// The phase's last model turn when it is the last message (its tool calls are answered
    /// next); None when the model is to be asked.
    fn last_turn(&self) -> Option<&Message> {
        self.rebuilt
            .messages
            .last()
            .filter(|m| m.role == Role::Assistant && self.rebuilt.steps > 0)
    }
}

/// The conversation of `phase` as journaled, ready to go on: a turn stopped between two of
/// its tool calls loses its partial results (the finished ones stay in `finished` and are not
/// run again), and a phase not started yet journals `opening` before it is used.
async fn resume(
    engine: &Arc<Workflows>,
    id: &str,
    phase: &str,
    opening: Message,
) -> Result<Conversation, Stop> {
    let journal = load_journal(engine, id).await?;
    let mut rebuilt = conversation(&journal, phase)?;
    let fresh = !journal.iter().any(|(_, e)| e.phase() == phase);
    let messages = &mut rebuilt.messages;
    // Stopped between two tool calls of a turn: drop the partial results; the loop of
    // `converse` takes the finished ones from the journal and runs only the others.
    let partial = messages.len() >= 2
        && rebuilt.steps > 0
        && messages[messages.len() - 1]
            .parts
            .iter()
            .all(|p| matches!(p, Part::ToolResult { .. }))
        && messages[messages.len() - 2]
            .tool_calls()
            .any(|(call_id, _, _)| !rebuilt.finished.contains_key(call_id));
    if partial {
        messages.pop();
    }
    if fresh {
        let wf = load(engine, id).await?;
        let entry = JournalEntry::User {
            phase: phase.into(),
            message_json: serde_json::to_string(&opening).unwrap_or_default(),
        };
        persist(engine, &wf, vec![entry], vec![]).await?;
        let parts = opening.parts.clone();
        let index = match messages.last_mut() {
            Some(m) if m.role == Role::User => {
                m.parts.extend(opening.parts);
                messages.len() - 1
            }
            _ => {
                messages.push(opening);
                messages.len() - 1
            }
        };
        rebuilt.phase_opening = Some((index, parts));
    }
    Ok(Conversation { rebuilt })
}

/// The system prompt and the tools, the same in every phase and every workflow of a branch
/// (the providers cache the prompt by its prefix, tools and system prompt first): planning may
/// call only the read-only tools and `submit_plan` (others are refused as tool errors), a task
/// every tool and `done`.
fn toolset(ctx: &Ctx) -> (String, Vec<ToolSpec>) {
    let mut specs = ctx.tools.specs();
    specs.push(plan::submit_plan_spec());
    specs.push(plan::add_integrations_spec());
    specs.push(plan::done_spec());
    (
        context::system_prompt(&system_base(), ctx.instructions.as_ref()),
        specs,
    )
}

/// Answer every tool call of a turn, in order, each result journaled (with its events) before
/// the next call starts; a call with a journaled result is not run again. Returns the results
/// and the outcome when a call ended the phase.
async fn run_tool_calls(
    engine: &Arc<Workflows>,
    id: &str,
    ctx: &Ctx,
    mode: Mode,
    phase: &str,
    calls: Vec<(String, String, Value)>,
    finished: &mut HashMap<String, (String, bool)>,
) -> Result<(Vec<Part>, Option<Outcome>), Stop> {
    let mut results = Vec::new();
    let mut outcome = None;
    for (call_id, name, input) in calls {
        if let Some((content, is_error)) = finished.get(&call_id) {
            results.push(Part::ToolResult {
                id: call_id,
                name,
                content: content.clone(),
                is_error: *is_error,
            });
            continue;
        }
        let mut wf = load(engine, id).await?;
        check(engine, &wf)?;
        // A cancel or a shutdown ends a call in flight at once: its command's sandbox (or
        // process group) is killed when the call is dropped, and no result is journaled.
        let cancel = engine.cancel_signal(id);
        let answer = tokio::select! {
            a = answer_call(ctx, mode, &mut wf, &name, &input, outcome.is_some()) => a?,
            _ = cancel.cancelled() => return Err(Stop::Cancelled),
            _ = engine.base.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        let (content, is_error) = (answer.content, answer.is_error);
        let shown: String = content.chars().take(EVENT_RESULT_CHARS).collect();
        let mut events = vec![event(
            &wf,
            "tool-result",
            json!({"callId": call_id, "name": name, "content": shown, "isError": is_error,
                   "truncated": shown.len() < content.len()}),
        )?];
        events.extend(answer.events);
        wf.updated_at_ms = now_ms();
        let entry = JournalEntry::ToolResult {
            phase: phase.into(),
            call_id: call_id.clone(),
            name: name.clone(),
            input_json: input.to_string(),
            content: content.clone(),
            is_error,
        };
        persist(engine, &wf, vec![entry], events).await?;
        if answer.outcome.is_some() {
            outcome = answer.outcome;
        }
        finished.insert(call_id.clone(), (content.clone(), is_error));
        results.push(Part::ToolResult {
            id: call_id,
            name,
            content,
            is_error,
        });
    }
    Ok((results, outcome))
}

/// The answer to one tool call, and what it changes beyond its result.
struct Answer {
    content: String,
    is_error: bool,
    /// Events of what the call changed in the record (`plan`, `status`, `task`).
    events: Vec<NewEvent>,
    /// The call ended the phase.
    outcome: Option<Outcome>,
}

/// Run one tool call, or answer it without running: the phase tools (`submit_plan`, `done`)
/// change `wf` (persisted by the caller with the result), a tool the mode does not offer is
/// refused, and nothing runs once an earlier call of the turn ended the phase.
async fn answer_call(
    ctx: &Ctx,
    mode: Mode,
    wf: &mut WorkflowRecord,
    name: &str,
    input: &Value,
    phase_ended: bool,
) -> Result<Answer, Stop> {
    let mut events = Vec::new();
    let mut outcome = None;
    let (content, is_error) = match (mode, name) {
        // Every call of a turn gets a result (the APIs refuse a conversation
        // with an unanswered call), but nothing runs after the phase ended.
        _ if phase_ended => (
            match mode {
                Mode::Plan => "not run: the plan was accepted by an earlier call",
                Mode::Task(_) => "not run: the task was marked done by an earlier call",
            }
            .to_string(),
            true,
        ),
        (Mode::Plan, "submit_plan") => match plan::parse_plan(input) {
            Ok(p) => {
                wf.tasks = p
                    .tasks
                    .iter()
                    .map(|t| TaskState {
                        id: t.id,
                        status: TaskStatus::Pending,
                        attempts: 0,
                    })
                    .collect();
                events.push(event(wf, "plan", plan_json(&p))?);
                wf.plan = Some(p);
                wf.status = WorkflowStatus::Coding;
                events.push(status_event(wf)?);
                outcome = Some(Outcome::PlanAccepted);
                ("plan accepted".to_string(), false)
            }
            Err(e) => (e, true),
        },
        (Mode::Task(task_id), "done") => {
            if let Some(t) = wf.tasks.iter_mut().find(|t| t.id == task_id) {
                t.status = TaskStatus::Completed;
            }
            events.push(task_event(wf, task_id)?);
            outcome = Some(Outcome::TaskDone);
            ("task marked done".to_string(), false)
        }
        (Mode::Plan, "add_integrations") => add_integrations(ctx, input).await,
        (Mode::Task(_), "add_integrations") => (
            "integrations are added while planning; they are installed before coding starts"
                .to_string(),
            true,
        ),
        (Mode::Plan, n) if !READ_ONLY.contains(&n) => (
            format!("`{n}` is not available while planning; submit a plan first"),
            true,
        ),
        (_, "submit_plan") => ("the plan is already accepted".to_string(), true),
        (Mode::Plan, "done") => ("`done` ends a task, not a plan".to_string(), true),
        _ => ctx.tools.execute(&ctx.dir, name, input).await,
    };
    Ok(Answer {
        content,
        is_error,
        events,
        outcome,
    })
}

/// `add_integrations {keys}`: queue them on the branch (installed before coding starts).
async fn add_integrations(ctx: &Ctx, input: &Value) -> (String, bool) {
    let keys: Vec<String> = match input.get("keys").and_then(Value::as_array) {
        Some(keys) if !keys.is_empty() => {
            match keys
                .iter()
                .map(|k| k.as_str().map(str::to_string))
                .collect()
            {
                Some(keys) => keys,
                None => return ("`keys` must be a list of integration keys".into(), true),
            }
        }
        _ => {
            return (
                "`keys` must be a non-empty list of integration keys".into(),
                true,
            );
        }
    };
    let requests = keys
        .into_iter()
        .map(|key| integ::Request { key, options: None })
        .collect();
    match ctx
        .integrations
        .queue(&ctx.key, requests, None, Some(ctx.workflow_id.clone()))
        .await
    {
        Ok(jobs) => {
            let lines: Vec<String> = jobs
                .iter()
                .map(|j| match &j.job.message {
                    Some(m) => format!("{}: {} ({m})", j.job.key, j.job.status.as_str()),
                    None => format!("{}: {}", j.job.key, j.job.status.as_str()),
                })
                .collect();
            (
                format!(
                    "{}\nThey are installed before coding starts; plan the tasks on top of them.",
                    lines.join("\n")
                ),
                false,
            )
        }
        Err(
            e @ (integ::IntegrationError::Unknown(_)
            | integ::IntegrationError::InvalidOptions { .. }),
        ) => {
            let known = ctx
                .integrations
                .catalog()
                .map(|c| {
                    c.integrations
                        .iter()
                        .map(|i| i.manifest.key.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            (format!("{e} (known: {known})"), true)
        }
        Err(e) => (format!("could not queue the integrations: {e}"), true),
    }
}

/// The output limit of the next model turn and the turns asked again so far in this
/// conversation (see [`judge_turn`]).
struct TurnBudget {
    max_tokens: u32,
    retries: u32,
    /// The engine's estimate of the request's prompt tokens (checked against the provider's
    /// count to calibrate the context budget).
    estimate: u64,
}

/// One model turn, asked again as [`judge_turn`] says (a dropped turn's token usage is still
/// counted). The turn taken is journaled with its `tool-call` events before it is returned.
async fn model_turn(
    engine: &Arc<Workflows>,
    id: &str,
    ctx: &Ctx,
    phase: &str,
    mut wf: WorkflowRecord,
    mut request: ChatRequest,
    budget: &mut TurnBudget,
) -> Result<Message, Stop> {
    loop {
        let response = chat(engine, &wf, ctx, &request).await?;
        lock(&ctx.budget).calibrate(budget.estimate, response.usage.input_tokens);
        wf = load(engine, id).await?;
        // What the model generated counts, also in a turn that is dropped below.
        wf.input_tokens += response.usage.input_tokens;
        wf.output_tokens += response.usage.output_tokens;
        wf.cache_read_tokens += response.usage.cache_read_tokens;
        wf.cache_write_tokens += response.usage.cache_write_tokens;
        wf.updated_at_ms = now_ms();
        let judged = judge_turn(
            &response,
            budget.max_tokens,
            ctx.output_limit,
            &mut budget.retries,
        );
        if !matches!(judged, Ok(None)) {
            // The turn is dropped; its usage is kept.
            persist(engine, &wf, vec![], vec![]).await?;
        }
        if let Some(next) = judged? {
            budget.max_tokens = next;
            let room = lock(&ctx.budget).output_room(budget.estimate);
            request.max_tokens = next.min(room);
            // As before every model call: stop here when cancelled or shutting down.
            wf = load(engine, id).await?;
            check(engine, &wf)?;
            continue;
        }
        let mut events = Vec::new();
        for (call_id, name, input) in response.message.tool_calls() {
            events.push(event(
                &wf,
                "tool-call",
                json!({"callId": call_id, "name": name, "input": input}),
            )?);
        }
        let entry = JournalEntry::Turn {
            phase: phase.into(),
            message_json: serde_json::to_string(&response.message).unwrap_or_default(),
        };
        persist(engine, &wf, vec![entry], events).await?;
        return Ok(response.message);
    }
}

/// What to do with a turn by its stop reason: `None` to take it; `Some(limit)` to drop it and
/// ask again with that output limit (cut off at the limit: twice the limit; a malformed tool
/// call or an empty turn: the same, a bounded number of times); a failure the user reads when
/// the model refused, was blocked, or cannot fit its turn in its maximum output.
fn judge_turn(
    response: &crate::llm::ChatResponse,
    max_tokens: u32,
    output_limit: u32,
    retries: &mut u32,
) -> Result<Option<u32>, Stop> {
    use crate::llm::StopReason;
    let text = response.message.text();
    let mut again = |what: &str| {
        *retries += 1;
        if *retries > MAX_TURN_RETRIES {
            return Err(Stop::Fail(format!(
                "the model {what} {} times in a row",
                *retries
            )));
        }
        tracing::info!(what, "asking the model again");
        Ok(Some(max_tokens))
    };
    match response.stop {
        StopReason::MaxTokens => match crate::llm::limits::raised(max_tokens, output_limit) {
            Some(next) => {
                tracing::info!(
                    from = max_tokens,
                    to = next,
                    "a turn was cut off at its output limit; asking again with a higher limit"
                );
                Ok(Some(next))
            }
            None => Err(Stop::Fail(format!(
                "the model's turn was cut off at its output limit of {output_limit} tokens; ask for smaller steps or raise WELDR_MAX_OUTPUT_TOKENS"
            ))),
        },
        StopReason::Refusal => Err(Stop::Fail(format!(
            "the model refused: {}",
            if text.trim().is_empty() {
                "no reason given (blocked by the provider's safety filter)"
            } else {
                text.trim()
            }
        ))),
        StopReason::MalformedCall => again("produced a malformed tool call"),
        _ if response.message.tool_calls().next().is_none() && text.trim().is_empty() => {
            again("ended its turn without a reply or a tool call")
        }
        _ => Ok(None),
    }
}

/// One model call; deltas go to the branch stream as they arrive (coalesced while the
/// writer is busy), all before the turn itself is persisted.
async fn chat(
    engine: &Arc<Workflows>,
    wf: &WorkflowRecord,
    ctx: &Ctx,
    request: &ChatRequest,
) -> Result<crate::llm::ChatResponse, Stop> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delta>();
    let forward = {
        let (engine, wf) = (engine.clone(), wf.clone());
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(d) = rx.try_recv() {
                    batch.push(d);
                }
                let mut merged: Vec<(&str, String)> = Vec::new();
                for d in batch {
                    let (kind, text) = match d {
                        Delta::Text(t) => ("text", t),
                        Delta::Reasoning(t) => ("reasoning", t),
                    };
                    match merged.last_mut() {
                        Some((k, acc)) if *k == kind => acc.push_str(&text),
                        _ => merged.push((kind, text)),
                    }
                }
                let events: Vec<NewEvent> = merged
                    .into_iter()
                    .filter_map(|(kind, text)| event(&wf, kind, json!({"text": text})).ok())
                    .collect();
                let key = StreamKey::new(&wf.project_id, &wf.branch_id);
                if engine
                    .base
                    .store
                    .writer()
                    .append(key, events)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let sink = move |d: Delta| {
        let _ = tx.send(d);
    };
    let cancel = engine.cancel_signal(&wf.workflow_id);
    let result = tokio::select! {
        r = ctx.provider.chat(request, &sink) => r.map_err(|e| {
            if crate::llm::http::is_context_overflow(&e) {
                Stop::Overflow(e.to_string())
            } else {
                Stop::Fail(e.to_string())
            }
        }),
        _ = cancel.cancelled() => Err(Stop::Cancelled),
        _ = engine.base.shutdown.cancelled() => Err(Stop::Shutdown),
    };
    drop(sink);
    let _ = forward.await;
    result
}

/// The JSON form of a plan (as in the `plan` event and `GET /workflows/{id}`).
pub fn plan_value(p: &weldr_storage::workflow::Plan) -> Value {
    json!({
            "acceptanceCriteria": p.acceptance_criteria,
            "tasks": p.tasks.iter().map(|t| json!({
                "id": t.id,
                "summary": t.summary,
                "description": t.description,
                "acceptanceCriteria": t.acceptance_criteria,
                "dependencies": t.dependencies,
                "subTasks": t.sub_tasks,
                "implementationNotes": t.implementation_notes,
            })).collect::<Vec<_>>(),
    })
}

fn plan_json(p: &weldr_storage::workflow::Plan) -> Value {
    json!({ "plan": plan_value(p) })
}

fn task_event(wf: &WorkflowRecord, task_id: u64) -> Result<NewEvent, EventError> {
    let t = wf.tasks.iter().find(|t| t.id == task_id);
    event(
        wf,
        "task",
        json!({
            "taskId": task_id,
            "status": t.map(|t| t.status.as_str()).unwrap_or("pending"),
            "attempts": t.map(|t| t.attempts).unwrap_or(0),
        }),
    )
}

async fn planning(engine: &Arc<Workflows>, wf: WorkflowRecord) -> Result<(), Stop> {
    let mut ctx = context(engine, &wf)?;
    prepare(engine, &wf, &mut ctx).await?;
    let (p, b) = (wf.project_id.clone(), wf.branch_id.clone());
    let versions = engine
        .base
        .read(move |rtx| weldr_storage::model::list_versions(rtx, &p, &b))
        .await?;
    let dir = ctx.dir.clone();
    let tree = tokio::task::spawn_blocking(move || context::tree_context(&dir, &versions))
        .await
        .map_err(|e| Stop::Fail(format!("listing the tree: {e}")))?;
    let opening = Message {
        role: Role::User,
        parts: vec![
            Part::Text { text: tree },
            Part::Text {
                text: format!("Plan this request:\n{}", wf.user_message),
            },
        ],
    };
    match converse(engine, &wf.workflow_id, &ctx, Mode::Plan, "plan", opening).await? {
        Outcome::PlanAccepted => Ok(()),
        Outcome::Reply(text) => {
            // A reply without a plan (a question to the user) ends the workflow.
            let mut wf = load(engine, &wf.workflow_id).await?;
            wf.reply = Some(text.clone());
            wf.status = WorkflowStatus::Complete;
            wf.updated_at_ms = now_ms();
            let events = vec![
                status_event(&wf)?,
                event(&wf, "end", json!({"status": "complete", "reply": text}))?,
            ];
            let said = outcome_entry(engine, &wf).await;
            persist_with(engine, &wf, vec![], events, Some(said)).await?;
            Ok(())
        }
        Outcome::TaskDone => Ok(()),
        Outcome::StepsExhausted => {
            Err(Stop::Fail(format!("no plan after {MAX_STEPS} model steps")))
        }
    }
}

/// Before coding: install what is queued on the branch (`add_integrations`, or queued by the
/// API while the workflow held the branch). Returns a note for the tasks naming what this
/// workflow's integrations installed (or why not), empty when it queued none.
async fn install_integrations(
    engine: &Arc<Workflows>,
    wf: &WorkflowRecord,
) -> Result<String, Stop> {
    let key = BranchKey::new(&wf.project_id, &wf.branch_id);
    if let Err(e) = engine
        .integrations
        .run_branch(&key, Some(&wf.workflow_id))
        .await
    {
        tracing::warn!(workflow = %wf.workflow_id, error = %e, "integration installs could not run");
    }
    let jobs = engine
        .integrations
        .list(&key)
        .await
        .map_err(|e| Stop::Fail(format!("listing the integrations: {e}")))?;
    let mine: Vec<String> = jobs
        .iter()
        .filter(|j| j.job.workflow_id.as_deref() == Some(wf.workflow_id.as_str()))
        .map(|j| match (&j.job.status, &j.job.message) {
            (integ::JobStatusView::Installed, _) => format!("- {}: installed", j.job.key),
            (s, m) => format!(
                "- {}: {}{}",
                j.job.key,
                s.as_str(),
                m.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
            ),
        })
        .collect();
    if mine.is_empty() {
        return Ok(String::new());
    }
    Ok(format!(
        "Integrations added while planning (their files are in the tree now):\n{}\n\n",
        mine.join("\n")
    ))
}

async fn coding(engine: &Arc<Workflows>, wf: WorkflowRecord) -> Result<(), Stop> {
    let mut ctx = context(engine, &wf)?;
    prepare(engine, &wf, &mut ctx).await?;
    let installed = install_integrations(engine, &wf).await?;
    let plan = wf
        .plan
        .clone()
        .ok_or_else(|| Stop::Fail("coding without a plan".into()))?;
    let order = plan::order(&plan).map_err(Stop::Fail)?;
    for task_id in order {
        let task = plan
            .tasks
            .iter()
            .find(|t| t.id == task_id)
            .cloned()
            .ok_or_else(|| Stop::Fail(format!("task {task_id} missing")))?;
        loop {
            let mut wf = load(engine, &wf.workflow_id).await?;
            check(engine, &wf)?;
            let state = wf
                .tasks
                .iter_mut()
                .find(|t| t.id == task_id)
                .ok_or_else(|| Stop::Fail(format!("task {task_id} has no state")))?;
            match state.status {
                TaskStatus::Completed => break,
                TaskStatus::Failed => {
                    return Err(Stop::Fail(format!(
                        "task {task_id} failed after {MAX_ATTEMPTS} attempts"
                    )));
                }
                TaskStatus::Pending => {
                    state.status = TaskStatus::InProgress;
                    state.attempts += 1;
                    wf.updated_at_ms = now_ms();
                    let events = vec![task_event(&wf, task_id)?];
                    persist(engine, &wf, vec![], events).await?;
                    continue;
                }
                TaskStatus::InProgress => {}
            }
            let attempt = state.attempts;
            let phase = format!("task:{task_id}:{attempt}");
            let opening = Message::user_text(format!(
                "{installed}Request: {}\n\nTask {}: {}\n\n{}\n\nAcceptance criteria:\n{}{}",
                wf.user_message,
                task.id,
                task.summary,
                task.description,
                task.acceptance_criteria
                    .iter()
                    .map(|c| format!("- {c}\n"))
                    .collect::<String>(),
                task.implementation_notes
                    .as_deref()
                    .map(|n| format!("\nNotes: {n}"))
                    .unwrap_or_default(),
            ));
            let outcome = converse(
                engine,
                &wf.workflow_id,
                &ctx,
                Mode::Task(task_id),
                &phase,
                opening,
            )
            .await?;
            if matches!(outcome, Outcome::TaskDone) {
                break;
            }
            // The attempt ended without `done`: retry or fail the task.
            let mut wf = load(engine, &wf.workflow_id).await?;
            if let Some(state) = wf.tasks.iter_mut().find(|t| t.id == task_id) {
                state.status = if state.attempts >= MAX_ATTEMPTS {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Pending
                };
            }
            wf.updated_at_ms = now_ms();
            let events = vec![task_event(&wf, task_id)?];
            persist(engine, &wf, vec![], events).await?;
        }
    }
    let mut wf = load(engine, &wf.workflow_id).await?;
    check(engine, &wf)?;
    transition(engine, &mut wf, WorkflowStatus::Deploying).await
}

async fn deploying(engine: &Arc<Workflows>, wf: WorkflowRecord) -> Result<(), Stop> {
    let mut wf = wf;
    if wf.version.is_none() {
        // After a crash the commit may exist already: it names this workflow.
        let (p, b, id) = (
            wf.project_id.clone(),
            wf.branch_id.clone(),
            wf.workflow_id.clone(),
        );
        let existing = engine
            .base
            .read(move |rtx| {
                weldr_storage::model::list_versions(rtx, &p, &b).map(|vs| {
                    vs.into_iter()
                        .find(|v| v.workflow_id.as_deref() == Some(id.as_str()))
                        .map(|v| v.seq)
                })
            })
            .await?;
        let version = match existing {
            Some(seq) => Some(seq),
            None => {
                // Nothing lands in git after a cancel.
                check(engine, &load(engine, &wf.workflow_id).await?)?;
                let message: String = wf
                    .user_message
                    .lines()
                    .next()
                    .unwrap_or("workflow")
                    .chars()
                    .take(200)
                    .collect();
                engine
                    .branches
                    .commit_version(
                        &BranchKey::new(&wf.project_id, &wf.branch_id),
                        &message,
                        Some(wf.user_message.clone()),
                        VersionKind::Checkpoint,
                        Some(wf.workflow_id.clone()),
                    )
                    .await?
                    .map(|v| v.seq)
            }
        };
        wf = load(engine, &wf.workflow_id).await?;
        wf.version = version;
    }
    // The version is recorded before the build: a crash during the build resumes here without
    // committing again, and a failed build keeps the work.
    wf.updated_at_ms = now_ms();
    persist(engine, &wf, vec![], vec![]).await?;
    let dir = engine
        .base
        .dir(&BranchKey::new(&wf.project_id, &wf.branch_id));
    if let Some(build) = BuildConfig::read(&dir).map_err(Stop::Fail)? {
        check(engine, &wf)?;
        let cancel = engine.cancel_signal(&wf.workflow_id);
        let report = tokio::select! {
            r = run_build(&engine.sandbox, &dir, &build) => r,
            _ = cancel.cancelled() => return Err(Stop::Cancelled),
            _ = engine.base.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        let ok = report["exitCode"] == json!(0) && report["timedOut"] != json!(true);
        wf = load(engine, &wf.workflow_id).await?;
        let events = vec![event(&wf, "build", report.clone())?];
        persist(engine, &wf, vec![], events).await?;
        if !ok {
            let tail: String = report["output"].as_str().unwrap_or_default().to_string();
            let tail = tail_chars(&tail, 2000);
            return Err(Stop::Fail(format!(
                "the build command `{}` failed (exit {}); the version is kept. Output:\n{tail}",
                build.command, report["exitCode"]
            )));
        }
    }
    // The snapshot goes to object storage before the workflow completes. A push that fails is
    // recorded (a `sync` event) and retried by the background syncer; the workflow completes
    // anyway, its work is safe in the branch's git history.
    let snapshot = match engine
        .syncer
        .push_branch(
            &BranchKey::new(&wf.project_id, &wf.branch_id),
            Trigger::Version,
            true,
        )
        .await
    {
        Ok(report) => Some(report.snapshot_id),
        Err(e) => {
            tracing::warn!(workflow = %wf.workflow_id, error = %e, "snapshot push failed; the syncer retries");
            None
        }
    };
    wf = load(engine, &wf.workflow_id).await?;
    wf.status = WorkflowStatus::Complete;
    wf.updated_at_ms = now_ms();
    let mut end = json!({"status": "complete"});
    if let Some(v) = wf.version {
        end["versionId"] = v.to_string().into();
    }
    if let Some(id) = snapshot {
        end["snapshotId"] = id.into();
    }
    let events = vec![status_event(&wf)?, event(&wf, "end", end)?];
    let said = outcome_entry(engine, &wf).await;
    persist_with(engine, &wf, vec![], events, Some(said)).await?;
    Ok(())
}

/// The project's build, configured in the branch's `weldr.json`:
/// `{"buildCommand": "npm run build", "buildTimeoutSeconds": 300}`.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    pub command: String,
    pub timeout_seconds: u64,
}

/// Build timeout when `weldr.json` names none.
pub const DEFAULT_BUILD_TIMEOUT_SECS: u64 = 300;

/// The name of the branch file that configures the build.
pub const BUILD_CONFIG_FILE: &str = "weldr.json";

impl BuildConfig {
    /// The build of the branch at `dir`: none without `weldr.json` or without a
    /// `buildCommand` in it; an error (the workflow fails with it) when the file is unreadable.
    pub fn read(dir: &std::path::Path) -> Result<Option<Self>, String> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(rename = "buildCommand")]
            command: Option<String>,
            #[serde(rename = "buildTimeoutSeconds")]
            timeout_seconds: Option<u64>,
        }
        let path = dir.join(BUILD_CONFIG_FILE);
        // Not followed through a symlink: the file must be the branch's own.
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{BUILD_CONFIG_FILE}: {e}")),
            Ok(m) if !m.is_file() => {
                return Err(format!("{BUILD_CONFIG_FILE} is not a regular file"));
            }
            Ok(_) => {}
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{BUILD_CONFIG_FILE}: {e}"))?;
        let file: File = serde_json::from_str(&text)
            .map_err(|e| format!("{BUILD_CONFIG_FILE} is not valid: {e}"))?;
        Ok(file
            .command
            .filter(|c| !c.trim().is_empty())
            .map(|command| BuildConfig {
                command,
                timeout_seconds: file
                    .timeout_seconds
                    .unwrap_or(DEFAULT_BUILD_TIMEOUT_SECS)
                    .clamp(1, crate::tools::MAX_TIMEOUT_SECS),
            }))
    }
}

/// Run the build like `run_command` (in the branch directory, in the sandbox, a timeout,
/// capped output, no server secrets): `{command, exitCode, output, truncated, timedOut,
/// durationMs}`.
async fn run_build(
    sandbox: &Arc<crate::sandbox::Sandbox>,
    dir: &std::path::Path,
    build: &BuildConfig,
) -> Value {
    let started = std::time::Instant::now();
    let mut report = match crate::tools::Workspace::with_sandbox(dir, sandbox.clone()) {
        Ok(ws) => {
            let input = json!({"command": build.command, "timeoutSeconds": build.timeout_seconds});
            let outcome = crate::tools::execute(&ws, "run_command", &input).await;
            match outcome.result {
                Ok(content) => serde_json::from_str::<Value>(&content)
                    .unwrap_or_else(|_| json!({"exitCode": null, "output": content})),
                Err(message) => json!({"exitCode": null, "output": message}),
            }
        }
        Err(e) => {
            json!({"exitCode": null, "output": format!("the branch directory is not usable: {e}")})
        }
    };
    report["command"] = build.command.clone().into();
    report["durationMs"] = u64::try_from(started.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .into();
    report
}

/// The last `n` characters of `s`.
fn tail_chars(s: &str, n: usize) -> &str {
    let count = s.chars().count();
    match s.char_indices().nth(count.saturating_sub(n)) {
        Some((i, _)) if count > n => &s[i..],
        _ => s,
    }
}
