//! Projects and branches: the registry every other feature hangs off.

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::record::{Record, decode, encode};
use crate::tables::{BRANCHES, PROJECTS};
use crate::writer::WriteCtx;
use crate::StorageError;

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

pub fn get_project(rtx: &ReadTransaction, project_id: &str) -> Result<Option<ProjectRecord>, StorageError> {
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
    t.get((project_id, branch_id))?.map(|v| decode(v.value())).transpose()
}

pub fn list_branches(rtx: &ReadTransaction, project_id: &str) -> Result<Vec<BranchRecord>, StorageError> {
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
    let mut t = ctx.tx().open_table(PROJECTS)?;
    if t.get(project.project_id.as_str())?.is_some() {
        return Err(StorageError::AlreadyExists(format!("project {}", project.project_id)));
    }
    t.insert(project.project_id.as_str(), encode(project).as_slice())?;
    Ok(())
}

/// Write a branch record (insert or replace).
pub fn put_branch(ctx: &mut WriteCtx<'_>, branch: &BranchRecord) -> Result<(), StorageError> {
    let mut t = ctx.tx().open_table(BRANCHES)?;
    t.insert((branch.project_id.as_str(), branch.branch_id.as_str()), encode(branch).as_slice())?;
    Ok(())
}

/// Read a branch inside a write transaction.
pub fn get_branch_for_update(
    ctx: &mut WriteCtx<'_>,
    project_id: &str,
    branch_id: &str,
) -> Result<Option<BranchRecord>, StorageError> {
    let t = ctx.tx().open_table(BRANCHES)?;
    t.get((project_id, branch_id))?.map(|v| decode(v.value())).transpose()
}

pub fn project_exists_for_update(ctx: &mut WriteCtx<'_>, project_id: &str) -> Result<bool, StorageError> {
    let t = ctx.tx().open_table(PROJECTS)?;
    Ok(t.get(project_id)?.is_some())
}
