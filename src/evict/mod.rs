//! The disk watermark loop: when the workspace volume reaches `MAX_VOLUME_USAGE_PERCENT`, evict
//! least-recently-used branches until it is at `TARGET_VOLUME_USAGE_PERCENT` or below.
//!
//! Evicting a branch means: take its lock, push it, check that the stored snapshot matches the
//! directory file for file, mark it `evicted` in redb, and only then delete the directory (off the
//! runtime). Any failure keeps the directory. A branch with an active workflow, open stream
//! subscribers, recent use (`EVICTION_GRACE_SECONDS`) or an operation holding its lock is never
//! evicted. An evicted branch comes back on its next use
//! ([`crate::residency::Residency::ensure_present`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use weldr_storage::StorageError;
use weldr_storage::model::{self, BranchRecord, BranchState};
use weldr_storage::writer::now_ms;

use crate::base::Base;
use crate::branches::layers::remove_branch_dir;
use crate::branches::layout::BranchKey;
use crate::sync::syncer::{Syncer, Trigger};
use crate::worker::{Worker, WorkerState};

/// Why a cleanup pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    #[error("cannot read the disk usage of {path}: {source}")]
    Usage {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Space on the workspace volume, as `df` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// Available to unprivileged users (root's reserve excluded).
    pub available_bytes: u64,
}

impl Usage {
    /// `used / (used + available)`, the percentage `df` prints.
    pub fn percent(&self) -> f64 {
        let denominator = self.used_bytes + self.available_bytes;
        if denominator == 0 {
            return 0.0;
        }
        self.used_bytes as f64 * 100.0 / denominator as f64
    }
}

/// Where disk usage comes from.
pub trait DiskUsage: Send + Sync {
    fn usage(&self, path: &Path) -> std::io::Result<Usage>;
}

/// The real source: `statvfs(2)` of the path's filesystem (sysinfo hides tmpfs and friends).
pub struct Statvfs;

impl DiskUsage for Statvfs {
    fn usage(&self, path: &Path) -> std::io::Result<Usage> {
        use std::os::unix::ffi::OsStrExt;
        if path.as_os_str().as_bytes().contains(&0) {
            return Err(std::io::Error::other("path contains a NUL byte"));
        }
        let st = rustix::fs::statvfs(path)?;
        let frsize = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        Ok(Usage {
            total_bytes: st.f_blocks * frsize,
            used_bytes: st.f_blocks.saturating_sub(st.f_bfree) * frsize,
            available_bytes: st.f_bavail * frsize,
        })
    }
}

/// Disk usage and the cleanup pass.
pub struct Evictor {
    base: Base,
    syncer: Arc<Syncer>,
    disk: Box<dyn DiskUsage>,
    /// One cleanup pass at a time.
    pass: tokio::sync::Mutex<()>,
}

/// Whether a pass brought the volume under the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PassStatus {
    Success,
    /// Usage is still at or above the maximum.
    Failed,
}

/// One branch in eviction order, and whether it may be evicted now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub project_id: String,
    pub branch_id: String,
    pub last_accessed_at_ms: u64,
    pub size_bytes: u64,
    #[serde(serialize_with = "state_name")]
    pub state: BranchState,
    pub evictable: bool,
    /// Why not, when not: `evicted`, `restoring`, `active_workflow`, `subscribers`,
    /// `recently_used`, `busy` or `no_directory`.
    pub reason: Option<Blocker>,
}

/// What keeps a branch from eviction now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Blocker {
    Evicted,
    Restoring,
    ActiveWorkflow,
    Subscribers,
    RecentlyUsed,
    /// An operation holds the branch's lock.
    Busy,
    NoDirectory,
}

impl Blocker {
    pub fn as_str(self) -> &'static str {
        match self {
            Blocker::Evicted => "evicted",
            Blocker::Restoring => "restoring",
            Blocker::ActiveWorkflow => "active_workflow",
            Blocker::Subscribers => "subscribers",
            Blocker::RecentlyUsed => "recently_used",
            Blocker::Busy => "busy",
            Blocker::NoDirectory => "no_directory",
        }
    }
}

fn state_name<S: serde::Serializer>(state: &BranchState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

impl Evictor {
    pub fn new(base: Base, syncer: Arc<Syncer>) -> Self {
        Self {
            base,
            syncer,
            disk: Box::new(Statvfs),
            pass: tokio::sync::Mutex::new(()),
        }
    }

    /// Usage of the workspace volume. statvfs is one quick system call; it does not need a
    /// blocking thread.
    pub fn usage(&self) -> Result<Usage, EvictError> {
        let path = &self.base.config.workspace_base;
        self.disk.usage(path).map_err(|source| EvictError::Usage {
            path: path.display().to_string(),
            source,
        })
    }

    /// Why a branch may not be evicted now (None: it may).
    fn blocker(&self, b: &BranchRecord, active_workflow: bool, now: u64) -> Option<Blocker> {
        match b.state {
            BranchState::Evicted => return Some(Blocker::Evicted),
            BranchState::Restoring => return Some(Blocker::Restoring),
            BranchState::Active => {}
        }
        if active_workflow {
            return Some(Blocker::ActiveWorkflow);
        }
        let key = BranchKey::new(&b.project_id, &b.branch_id);
        if self.base.bus.subscriber_count(&key.stream()) > 0 {
            return Some(Blocker::Subscribers);
        }
        let grace = self.base.config.eviction_grace.as_millis() as u64;
        if now.saturating_sub(b.last_access_ms) < grace {
            return Some(Blocker::RecentlyUsed);
        }
        if !self.base.dir(&key).is_dir() {
            return Some(Blocker::NoDirectory);
        }
        None
    }

    /// Every branch, least recently used first, with what keeps it from eviction.
    pub async fn lru(&self) -> Result<Vec<Candidate>, EvictError> {
        let (branches, active) = self
            .base
            .read(|rtx| {
                let branches = model::list_all_branches(rtx)?;
                let mut active = Vec::with_capacity(branches.len());
                for b in &branches {
                    active
                        .push(model::active_workflow(rtx, &b.project_id, &b.branch_id)?.is_some());
                }
                Ok((branches, active))
            })
            .await?;
        let now = now_ms();
        let mut out: Vec<Candidate> = branches
            .iter()
            .zip(active)
            .map(|(b, active)| {
                let reason = self.blocker(b, active, now).or_else(|| {
                    self.base
                        .locks
                        .try_lock(&BranchKey::new(&b.project_id, &b.branch_id))
                        .is_none()
                        .then_some(Blocker::Busy)
                });
                Candidate {
                    project_id: b.project_id.clone(),
                    branch_id: b.branch_id.clone(),
                    last_accessed_at_ms: b.last_access_ms,
                    size_bytes: b.size_bytes,
                    state: b.state,
                    evictable: reason.is_none(),
                    reason,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            a.last_accessed_at_ms
                .cmp(&b.last_accessed_at_ms)
                .then_with(|| (&a.project_id, &a.branch_id).cmp(&(&b.project_id, &b.branch_id)))
        });
        Ok(out)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchRef {
    pub project_id: String,
    pub branch_id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    pub project_id: String,
    pub branch_id: String,
    pub reason: Blocker,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failed {
    pub project_id: String,
    pub branch_id: String,
    pub error: String,
}

/// What one cleanup pass did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupReport {
    pub status: PassStatus,
    pub usage_before: f64,
    pub usage_after: f64,
    pub max_usage_percent: u8,
    pub target_usage_percent: u8,
    pub evicted: Vec<BranchRef>,
    pub skipped: Vec<Skipped>,
    pub failed: Vec<Failed>,
}

/// Why one branch was not evicted.
enum NotEvicted {
    Skipped(Blocker),
    Failed(String),
}

impl Evictor {
    /// One pass: at or above the maximum, evict LRU branches until at or below the target.
    pub async fn cleanup(&self) -> Result<CleanupReport, EvictError> {
        let _pass = self.pass.lock().await;
        let config = &self.base.config;
        let max = config.max_volume_usage_percent as f64;
        let target = config.target_volume_usage_percent as f64;
        let before = self.usage()?.percent();
        let mut report = CleanupReport {
            status: PassStatus::Success,
            usage_before: before,
            usage_after: before,
            max_usage_percent: config.max_volume_usage_percent,
            target_usage_percent: config.target_volume_usage_percent,
            evicted: Vec::new(),
            skipped: Vec::new(),
            failed: Vec::new(),
        };
        if before < max {
            return Ok(report);
        }
        tracing::info!(
            usage = before,
            max,
            target,
            "disk above the maximum: evicting"
        );
        let mut current = before;
        for c in self.lru().await? {
            if current <= target {
                break;
            }
            if c.state != BranchState::Active {
                continue;
            }
            if let Some(reason) = c.reason {
                report.skipped.push(Skipped {
                    project_id: c.project_id,
                    branch_id: c.branch_id,
                    reason,
                });
                continue;
            }
            match self
                .evict_branch(&BranchKey::new(&c.project_id, &c.branch_id))
                .await
            {
                Ok(()) => report.evicted.push(BranchRef {
                    project_id: c.project_id,
                    branch_id: c.branch_id,
                }),
                Err(NotEvicted::Skipped(reason)) => report.skipped.push(Skipped {
                    project_id: c.project_id,
                    branch_id: c.branch_id,
                    reason,
                }),
                Err(NotEvicted::Failed(error)) => report.failed.push(Failed {
                    project_id: c.project_id,
                    branch_id: c.branch_id,
                    error,
                }),
            }
            current = self.usage()?.percent();
        }
        report.usage_after = current;
        if current >= max {
            report.status = PassStatus::Failed;
        }
        tracing::info!(
            before,
            after = current,
            evicted = report.evicted.len(),
            skipped = report.skipped.len(),
            failed = report.failed.len(),
            "cleanup pass done"
        );
        Ok(report)
    }

    /// Push, verify, mark evicted, delete. Keeps the directory on any failure.
    async fn evict_branch(&self, key: &BranchKey) -> Result<(), NotEvicted> {
        let Some(_guard) = self.base.locks.try_lock(key) else {
            return Err(NotEvicted::Skipped(Blocker::Busy));
        };
        let result = self.evict_locked(key).await;
        let fields = match &result {
            Ok(snapshot_id) => json!({ "status": "evicted", "snapshotId": snapshot_id }),
            Err(NotEvicted::Failed(error)) => json!({ "status": "failed", "error": error }),
            Err(NotEvicted::Skipped(_)) => return result.map(|_| ()),
        };
        if let Err(NotEvicted::Failed(error)) = &result {
            tracing::warn!(
                branch = %key,
                error = %error,
                "eviction failed; the directory is kept"
            );
        }
        if let Err(e) = self.base.emit(key, "eviction", fields).await {
            tracing::debug!(error = %e, "could not announce an eviction");
        }
        result.map(|_| ())
    }

    async fn evict_locked(&self, key: &BranchKey) -> Result<String, NotEvicted> {
        let failed =
            |what: &str, e: &dyn std::fmt::Display| NotEvicted::Failed(format!("{what}: {e}"));
        let (project_id, branch_id) = (key.project_id.as_str(), key.branch_id.as_str());
        // Look again under the lock: the branch may have been used since the LRU list was made.
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let (branch, active) = self
            .base
            .read(move |rtx| {
                Ok((
                    model::get_branch(rtx, &p, &b)?,
                    model::active_workflow(rtx, &p, &b)?.is_some(),
                ))
            })
            .await
            .map_err(|e| failed("storage", &e))?;
        let Some(branch) = branch else {
            return Err(NotEvicted::Skipped(Blocker::Evicted));
        };
        if let Some(reason) = self.blocker(&branch, active, now_ms()) {
            return Err(NotEvicted::Skipped(reason));
        }

        let report = self
            .syncer
            .push_branch(key, Trigger::Eviction, true)
            .await
            .map_err(|e| NotEvicted::Failed(format!("push failed: {e}")))?;
        let same = crate::sync::verify(&self.base.config, key, &report.snapshot_id)
            .await
            .map_err(|e| failed("verifying the snapshot", &e))?;
        if !same {
            return Err(NotEvicted::Failed(format!(
                "the directory does not match snapshot {} (it changed after the push)",
                report.snapshot_id
            )));
        }

        // Evicted in redb first: a crash before the directory is gone leaves a branch that is
        // restored (over whatever is left) on its next use, never one that looks active but empty.
        let (p, b, snapshot) = (
            project_id.to_string(),
            branch_id.to_string(),
            report.snapshot_id.clone(),
        );
        self.base
            .store
            .writer()
            .write(move |ctx| {
                if let Some(holder) = model::active_workflow_for_update(ctx, &p, &b)? {
                    return Err(StorageError::Conflict(format!(
                        "workflow {holder} started on the branch"
                    )));
                }
                let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? else {
                    return Err(StorageError::NotFound(format!("branch {b}")));
                };
                branch.state = BranchState::Evicted;
                model::put_branch(ctx, &branch)?;
                let mut state = model::get_sync_state_for_update(ctx, &p, &b)?.unwrap_or_default();
                state.snapshot_id = Some(snapshot.clone());
                state.dirty = false;
                model::put_sync_state(ctx, &p, &b, &state)?;
                Ok(())
            })
            .await
            .map_err(|e| failed("marking the branch evicted", &e))?;
        self.syncer.clear(key);

        let dir = self.base.dir(key);
        let (config, k) = (self.base.config.clone(), key.clone());
        let removed =
            crate::background::low_priority(move || remove_branch_dir(&config, &k, &dir)).await;
        if !matches!(removed, Ok(Ok(()))) {
            // The branch is evicted either way; a restore pulls over whatever is left.
            tracing::warn!(branch = %key, result = ?removed, "could not remove all of an evicted branch's directory");
        }
        tracing::info!(
            branch = %key,
            snapshot = %report.snapshot_id,
            "evicted"
        );
        Ok(report.snapshot_id)
    }
}

/// The cleanup pass every `EVICTION_INTERVAL_SECONDS`, as a [`Worker`].
pub struct EvictWorker {
    evictor: Arc<Evictor>,
    every: Duration,
    /// The first pass comes one interval after the start, as every later one.
    started: bool,
}

impl EvictWorker {
    /// None when `EVICTION_INTERVAL_SECONDS` is 0 (no periodic pass).
    pub fn new(evictor: Arc<Evictor>) -> Option<Self> {
        let every = evictor.base.config.eviction_interval;
        (!every.is_zero()).then(|| Self {
            evictor,
            every: every.max(Duration::from_secs(1)),
            started: false,
        })
    }
}

#[async_trait::async_trait]
impl Worker for EvictWorker {
    fn name(&self) -> &'static str {
        "evictor"
    }

    fn detail(&self) -> Option<String> {
        let usage = self.evictor.usage().ok()?;
        Some(format!("disk {:.1}% used", usage.percent()))
    }

    async fn work(
        &mut self,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<WorkerState, String> {
        if !std::mem::replace(&mut self.started, true) {
            return Ok(WorkerState::Idle);
        }
        self.evictor
            .cleanup()
            .await
            .map(|_| WorkerState::Idle)
            .map_err(|e| e.to_string())
    }

    async fn wait_for_work(&mut self) {
        tokio::time::sleep(self.every).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_counts_like_df() {
        let u = Usage {
            total_bytes: 100,
            used_bytes: 45,
            available_bytes: 45,
        };
        assert_eq!(u.percent(), 50.0);
        let empty = Usage {
            total_bytes: 0,
            used_bytes: 0,
            available_bytes: 0,
        };
        assert_eq!(empty.percent(), 0.0);
        let real = Statvfs.usage(Path::new("/")).unwrap();
        assert!(real.total_bytes > 0 && (0.0..=100.0).contains(&real.percent()));
    }
}
