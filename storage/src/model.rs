//! Projects and branches: the registry every other feature hangs off.

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::record::{Record, decode, encode};
use crate::tables::{BRANCHES, PROJECTS};
use crate::writer::WriteCtx;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRecord {
    pub project_id: String,
    pub title: Option<String>,
    /// User that registered the project (None for the embedded default's local owner).
    pub owner: Option<String>,
    pub created_at_ms: u64,
}

impl Record for ProjectRecord {
    const KIND: &'static str = "project";
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchState {
    Active,
    Evicted,
    Restoring,
}

impl BranchState {
    /// The name clients see (`active`, `evicted`, `restoring`).
    pub fn as_str(self) -> &'static str {
        match self {
            BranchState::Active => "active",
            BranchState::Evicted => "evicted",
            BranchState::Restoring => "restoring",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub project_id: String,
    pub branch_id: String,
    pub parent_branch_id: Option<String>,
    pub fork_version: Option<u64>,
    pub created_at_ms: u64,
    pub last_access_ms: u64,
    pub size_bytes: u64,
    pub state: BranchState,
    pub head_version: Option<u64>,
}

impl Record for BranchRecord {
    const KIND: &'static str = "branch";
    const VERSION: u8 = 1;
}

pub fn get_project(
    rtx: &ReadTransaction,
    project_id: &str,
) -> Result<Option<ProjectRecord>, StorageError> {
    let t = rtx.open_table(PROJECTS)?;
    t.get(project_id)?.map(|v| decode(v.value())).transpose()
}

pub fn list_projects(rtx: &ReadTransaction) -> Result<Vec<ProjectRecord>, StorageError> {
    let t = rtx.open_table(PROJECTS)?;
    let mut out = Vec::new();
    for entry in t.iter()? {
        out.push(decode(entry?.1.value())?);
    }
    Ok(out)
}

pub fn get_branch(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<BranchRecord>, StorageError> {
    let t = rtx.open_table(BRANCHES)?;
    t.get((project_id, branch_id))?
        .map(|v| decode(v.value()))
        .transpose()
}

/// A project and one of its branches, from one read transaction.
pub fn get_project_and_branch(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
) -> Result<(Option<ProjectRecord>, Option<BranchRecord>), StorageError> {
    Ok((
        get_project(rtx, project_id)?,
        get_branch(rtx, project_id, branch_id)?,
    ))
}

pub fn list_branches(
    rtx: &ReadTransaction,
    project_id: &str,
) -> Result<Vec<BranchRecord>, StorageError> {
    let t = rtx.open_table(BRANCHES)?;
    let mut out = Vec::new();
    for entry in t.range((project_id, "")..)? {
        let (key, value) = entry?;
        if key.value().0 != project_id {
            break;
        }
        out.push(decode(value.value())?);
    }
    Ok(out)
}

pub fn list_all_branches(rtx: &ReadTransaction) -> Result<Vec<BranchRecord>, StorageError> {
    let t = rtx.open_table(BRANCHES)?;
    let mut out = Vec::new();
    for entry in t.iter()? {
        out.push(decode(entry?.1.value())?);
    }
    Ok(out)
}

/// Insert a new project; `AlreadyExists` if the id is taken.
pub fn insert_project(ctx: &mut WriteCtx<'_>, project: &ProjectRecord) -> Result<(), StorageError> {
    let mut t = ctx.table(PROJECTS)?;
    if t.get(project.project_id.as_str())?.is_some() {
        return Err(StorageError::AlreadyExists(format!(
            "project {}",
            project.project_id
        )));
    }
    t.insert(project.project_id.as_str(), encode(project).as_slice())?;
    Ok(())
}

/// Write a branch record (insert or replace).
pub fn put_branch(ctx: &mut WriteCtx<'_>, branch: &BranchRecord) -> Result<(), StorageError> {
    let mut t = ctx.table(BRANCHES)?;
    t.insert(
        (branch.project_id.as_str(), branch.branch_id.as_str()),
        encode(branch).as_slice(),
    )?;
    Ok(())
}

/// Read a branch inside a write transaction.
pub fn get_branch_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<BranchRecord>, StorageError> {
    let t = ctx.table(BRANCHES)?;
    t.get((project_id, branch_id))?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn project_exists_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
) -> Result<bool, StorageError> {
    let t = ctx.table(PROJECTS)?;
    Ok(t.get(project_id)?.is_some())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionKind {
    Checkpoint,
    Integration,
    Revert,
}

impl VersionKind {
    /// The name clients see (`checkpoint`, `integration`, `revert`).
    pub fn as_str(self) -> &'static str {
        match self {
            VersionKind::Checkpoint => "checkpoint",
            VersionKind::Integration => "integration",
            VersionKind::Revert => "revert",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    pub kind: ChangeKind,
}

/// A version: one git commit on a branch, numbered per branch from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub seq: u64,
    pub commit_hash: String,
    pub message: String,
    pub description: Option<String>,
    pub kind: VersionKind,
    pub changed: Vec<FileChange>,
    pub author: String,
    pub created_at_ms: u64,
    /// For a revert: the version whose tree this one restores.
    pub restores: Option<u64>,
    /// The workflow that made it, if any.
    pub workflow_id: Option<String>,
}

impl Record for VersionRecord {
    const KIND: &'static str = "version";
    const VERSION: u8 = 1;
}

pub fn list_versions(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
) -> Result<Vec<VersionRecord>, StorageError> {
    let t = rtx.open_table(crate::tables::VERSIONS)?;
    let mut out = Vec::new();
    for entry in t.range((project_id, branch_id, 0)..=(project_id, branch_id, u64::MAX))? {
        out.push(decode(entry?.1.value())?);
    }
    Ok(out)
}

/// [`list_versions`] inside a write transaction.
pub fn list_versions_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<Vec<VersionRecord>, StorageError> {
    let t = ctx.table(crate::tables::VERSIONS)?;
    let mut out = Vec::new();
    for entry in t.range((project_id, branch_id, 0)..=(project_id, branch_id, u64::MAX))? {
        out.push(decode(entry?.1.value())?);
    }
    Ok(out)
}

pub fn get_version(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
    seq: u64,
) -> Result<Option<VersionRecord>, StorageError> {
    let t = rtx.open_table(crate::tables::VERSIONS)?;
    t.get((project_id, branch_id, seq))?
        .map(|v| decode(v.value()))
        .transpose()
}

/// The next free version number of a branch, inside a write transaction.
pub fn next_version_seq(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<u64, StorageError> {
    let t = ctx.table(crate::tables::VERSIONS)?;
    let last = t
        .range((project_id, branch_id, 0)..=(project_id, branch_id, u64::MAX))?
        .next_back()
        .transpose()?;
    Ok(last.map(|(k, _)| k.value().2 + 1).unwrap_or(1))
}

pub fn put_version(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
    version: &VersionRecord,
) -> Result<(), StorageError> {
    let mut t = ctx.table(crate::tables::VERSIONS)?;
    t.insert(
        (project_id, branch_id, version.seq),
        encode(version).as_slice(),
    )?;
    Ok(())
}

/// The active workflow of a branch, if any (one per branch, enforced here).
pub fn active_workflow(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<String>, StorageError> {
    let t = rtx.open_table(crate::tables::ACTIVE_WORKFLOWS)?;
    Ok(t.get((project_id, branch_id))?
        .map(|v| v.value().to_string()))
}

pub fn active_workflow_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<String>, StorageError> {
    let t = ctx.table(crate::tables::ACTIVE_WORKFLOWS)?;
    Ok(t.get((project_id, branch_id))?
        .map(|v| v.value().to_string()))
}

/// Claim the branch for `workflow_id`; `Conflict` naming the holder if another holds it.
pub fn claim_branch(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
    workflow_id: &str,
) -> Result<(), StorageError> {
    let mut t = ctx.table(crate::tables::ACTIVE_WORKFLOWS)?;
    if let Some(holder) = t.get((project_id, branch_id))? {
        let holder = holder.value().to_string();
        if holder != workflow_id {
            return Err(StorageError::Conflict(holder));
        }
        return Ok(());
    }
    t.insert((project_id, branch_id), workflow_id)?;
    Ok(())
}

pub fn release_branch(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
    workflow_id: &str,
) -> Result<(), StorageError> {
    let mut t = ctx.table(crate::tables::ACTIVE_WORKFLOWS)?;
    let held = t
        .get((project_id, branch_id))?
        .map(|v| v.value() == workflow_id)
        .unwrap_or(false);
    if held {
        t.remove((project_id, branch_id))?;
    }
    Ok(())
}

/// Record the owner of a project (cloud mode learns it upstream).
pub fn set_project_owner(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    owner: &str,
) -> Result<(), StorageError> {
    let mut t = ctx.table(PROJECTS)?;
    let current = t
        .get(project_id)?
        .map(|v| decode::<ProjectRecord>(v.value()))
        .transpose()?;
    if let Some(mut project) = current {
        project.owner = Some(owner.to_string());
        t.insert(project_id, encode(&project).as_slice())?;
    }
    Ok(())
}

/// A branch's object-storage sync state: whether it has changes not yet pushed, and the outcome
/// of its last push. Kept apart from [`BranchRecord`] so that marking a branch dirty (often)
/// rewrites a small record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStateRecord {
    /// Changed since the last successful push (or never pushed).
    pub dirty: bool,
    /// The snapshot the last successful push wrote or found (the one an evicted branch is
    /// restored from).
    pub snapshot_id: Option<String>,
    pub last_sync_ms: Option<u64>,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_bytes: u64,
    pub duration_ms: u64,
    /// The last push's error, cleared by the next successful push.
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

impl Record for SyncStateRecord {
    const KIND: &'static str = "sync_state";
    const VERSION: u8 = 1;
}

pub fn get_sync_state(
    rtx: &ReadTransaction,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<SyncStateRecord>, StorageError> {
    let t = rtx.open_table(crate::tables::SYNC_STATE)?;
    t.get((project_id, branch_id))?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn get_sync_state_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<SyncStateRecord>, StorageError> {
    let t = ctx.table(crate::tables::SYNC_STATE)?;
    t.get((project_id, branch_id))?
        .map(|v| decode(v.value()))
        .transpose()
}

pub fn put_sync_state(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
    state: &SyncStateRecord,
) -> Result<(), StorageError> {
    let mut t = ctx.table(crate::tables::SYNC_STATE)?;
    t.insert((project_id, branch_id), encode(state).as_slice())?;
    Ok(())
}
