//! A branch's integration install jobs (the persistent install queue).
//!
//! Jobs are keyed `("projectId/branchId", seq)` in `INTEGRATION_QUEUE`, in the order they were
//! queued; they run in that order, one at a time per branch. Every change of a job's status is
//! written together with its `integration` event on the branch stream by the caller (one
//! transaction), so the queue and the stream never disagree.

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::events::StreamKey;
use crate::record::{Record, decode, encode};
use crate::tables::INTEGRATION_QUEUE;
use crate::writer::WriteCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Ready to run once the jobs queued before it on the branch have run.
    Queued,
    /// Waits for a dependency to be installed (the job's message says which).
    Blocked,
    /// Being installed; at start, a job found here is rolled back and run again.
    Installing,
    Installed,
    Cancelled,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Blocked => "blocked",
            Self::Installing => "installing",
            Self::Installed => "installed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    /// Installed, cancelled or failed: the job will not run (again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Installed | Self::Cancelled | Self::Failed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrationJob {
    pub job_id: String,
    /// The integration's key in the catalog.
    pub key: String,
    /// Its options as given, with the catalog's defaults applied (JSON text).
    pub options_json: String,
    pub status: JobStatus,
    /// Why it is blocked or failed; what an install did.
    pub message: Option<String>,
    /// The commit the branch was at when the install started (what a crash rolls back to).
    pub base_commit: Option<String>,
    /// The version the install committed.
    pub version: Option<u64>,
    /// Start a workflow on the branch once this job (the last of its request) has run.
    pub then_workflow: Option<String>,
    /// The workflow that queued it (`add_integrations`), which installs it itself.
    pub workflow_id: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Record for IntegrationJob {
    const KIND: &'static str = "integration_job";
    const VERSION: u8 = 1;
}

/// Queue a job on `key`'s branch; returns its sequence number (from 1).
pub fn enqueue(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
    job: &IntegrationJob,
) -> Result<u64, StorageError> {
    let k = key.as_str();
    let mut t = ctx.table(INTEGRATION_QUEUE)?;
    let last = t
        .range((k, 0)..=(k, u64::MAX))?
        .next_back()
        .transpose()?
        .map(|(k, _)| k.value().1);
    let seq = last.unwrap_or(0) + 1;
    t.insert((k, seq), encode(job).as_slice())?;
    Ok(seq)
}

/// Replace job `seq` of `key`'s branch.
pub fn put(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
    seq: u64,
    job: &IntegrationJob,
) -> Result<(), StorageError> {
    let mut t = ctx.table(INTEGRATION_QUEUE)?;
    t.insert((key.as_str(), seq), encode(job).as_slice())?;
    Ok(())
}

/// Every job of `key`'s branch, in queue order, for a writer that changes some of them.
pub fn list_for_update(
    ctx: &mut WriteCtx<'_>,
    key: &StreamKey,
) -> Result<Vec<(u64, IntegrationJob)>, StorageError> {
    let k = key.as_str();
    let t = ctx.table(INTEGRATION_QUEUE)?;
    let mut out = Vec::new();
    for entry in t.range((k, 0)..=(k, u64::MAX))? {
        let (key, v) = entry?;
        out.push((key.value().1, decode(v.value())?));
    }
    Ok(out)
}

/// Every job of `key`'s branch, in queue order.
pub fn list(
    rtx: &ReadTransaction,
    key: &StreamKey,
) -> Result<Vec<(u64, IntegrationJob)>, StorageError> {
    let k = key.as_str();
    let t = rtx.open_table(INTEGRATION_QUEUE)?;
    let mut out = Vec::new();
    for entry in t.range((k, 0)..=(k, u64::MAX))? {
        let (key, v) = entry?;
        out.push((key.value().1, decode(v.value())?));
    }
    Ok(out)
}

/// The branches (stream keys) with a job that is queued, blocked or installing.
pub fn branches_with_work(rtx: &ReadTransaction) -> Result<Vec<String>, StorageError> {
    let t = rtx.open_table(INTEGRATION_QUEUE)?;
    let mut out: Vec<String> = Vec::new();
    for entry in t.iter()? {
        let (key, v) = entry?;
        let job: IntegrationJob = decode(v.value())?;
        let branch = key.value().0;
        if !job.status.is_terminal() && out.last().is_none_or(|l| l != branch) {
            out.push(branch.to_string());
        }
    }
    Ok(out)
}
