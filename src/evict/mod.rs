//! The disk watermark loop: when the workspace volume reaches `MAX_VOLUME_USAGE_PERCENT`, evict
//! least-recently-used branches until it is at `TARGET_VOLUME_USAGE_PERCENT` or below.
//!
//! Evicting a branch means: take its lock, push it, check that the stored snapshot matches the
//! directory file for file, mark it `evicted` in redb, and only then delete the directory (off the
//! runtime). Any failure keeps the directory. A branch with an active workflow, open stream
//! subscribers, recent use (`EVICTION_GRACE_SECONDS`) or an operation holding its lock is never
//! evicted. An evicted branch comes back on its next use ([`crate::branches::ensure_present`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use weldr_storage::model::{self, BranchRecord, BranchState};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, StreamKey};

use crate::app::App;
use crate::branches::branch_dir;
use crate::error::ApiError;
use crate::sync::syncer::Trigger;

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

/// The evictor's shared state on [`App`].
pub struct Evictor {
    pub disk: Box<dyn DiskUsage>,
    /// One cleanup pass at a time.
    pass: tokio::sync::Mutex<()>,
}

impl Default for Evictor {
    fn default() -> Self {
        Self {
            disk: Box::new(Statvfs),
            pass: tokio::sync::Mutex::new(()),
        }
    }
}

/// Usage of the workspace volume, read off the runtime.
pub async fn usage(app: &App) -> Result<Usage, ApiError> {
    let path = app.config.workspace_base.clone();
    let app_disk = &app.evictor.disk;
    // statvfs is one quick system call; it does not need a blocking thread.
    app_disk.usage(&path).map_err(|e| {
        ApiError::internal(format!(
            "cannot read the disk usage of {}: {e}",
            path.display()
        ))
    })
}

/// One branch in eviction order, and whether it may be evicted now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub project_id: String,
    pub branch_id: String,
    pub last_accessed_at_ms: u64,
    pub size_bytes: u64,
    pub state: &'static str,
    pub evictable: bool,
    /// Why not, when not: `evicted`, `restoring`, `active_workflow`, `subscribers`,
    /// `recently_used`, `busy` or `no_directory`.
    pub reason: Option<&'static str>,
}

pub fn state_name(state: BranchState) -> &'static str {
    match state {
        BranchState::Active => "active",
        BranchState::Evicted => "evicted",
        BranchState::Restoring => "restoring",
    }
}

/// Why a branch may not be evicted now (None: it may).
fn blocker(app: &App, b: &BranchRecord, active_workflow: bool, now: u64) -> Option<&'static str> {
    match b.state {
        BranchState::Evicted => return Some("evicted"),
        BranchState::Restoring => return Some("restoring"),
        BranchState::Active => {}
    }
    if active_workflow {
        return Some("active_workflow");
    }
    if app
        .bus
        .subscriber_count(&StreamKey::new(&b.project_id, &b.branch_id))
        > 0
    {
        return Some("subscribers");
    }
    let grace = app.config.eviction_grace.as_millis() as u64;
    if now.saturating_sub(b.last_access_ms) < grace {
        return Some("recently_used");
    }
    if !branch_dir(&app.config, &b.project_id, &b.branch_id).is_dir() {
        return Some("no_directory");
    }
    None
}

/// Every branch, least recently used first, with what keeps it from eviction.
pub async fn lru(app: &App) -> Result<Vec<Candidate>, ApiError> {
    let store = app.store.clone();
    let (branches, active) = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
        let rtx = store.begin_read()?;
        let branches = model::list_all_branches(&rtx)?;
        let mut active = Vec::with_capacity(branches.len());
        for b in &branches {
            active.push(model::active_workflow(&rtx, &b.project_id, &b.branch_id)?.is_some());
        }
        Ok((branches, active))
    })
    .await??;
    let now = now_ms();
    let mut out: Vec<Candidate> = branches
        .iter()
        .zip(active)
        .map(|(b, active)| {
            let reason = blocker(app, b, active, now).or_else(|| {
                app.branch_locks
                    .try_lock(&b.project_id, &b.branch_id)
                    .is_none()
                    .then_some("busy")
            });
            Candidate {
                project_id: b.project_id.clone(),
                branch_id: b.branch_id.clone(),
                last_accessed_at_ms: b.last_access_ms,
                size_bytes: b.size_bytes,
                state: state_name(b.state),
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
    pub reason: &'static str,
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
    /// `success`, or `failed` when usage is still at or above the maximum.
    pub status: &'static str,
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
    Skipped(&'static str),
    Failed(String),
}

/// One pass: at or above the maximum, evict LRU branches until at or below the target.
pub async fn cleanup(app: &App) -> Result<CleanupReport, ApiError> {
    let _pass = app.evictor.pass.lock().await;
    let max = app.config.max_volume_usage_percent as f64;
    let target = app.config.target_volume_usage_percent as f64;
    let before = usage(app).await?.percent();
    let mut report = CleanupReport {
        status: "success",
        usage_before: before,
        usage_after: before,
        max_usage_percent: app.config.max_volume_usage_percent,
        target_usage_percent: app.config.target_volume_usage_percent,
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
    for c in lru(app).await? {
        if current <= target {
            break;
        }
        if c.state != "active" {
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
        match evict_branch(app, &c.project_id, &c.branch_id).await {
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
        current = usage(app).await?.percent();
    }
    report.usage_after = current;
    if current >= max {
        report.status = "failed";
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
async fn evict_branch(app: &App, project_id: &str, branch_id: &str) -> Result<(), NotEvicted> {
    let Some(_guard) = app.branch_locks.try_lock(project_id, branch_id) else {
        return Err(NotEvicted::Skipped("busy"));
    };
    let result = evict_locked(app, project_id, branch_id).await;
    let fields = match &result {
        Ok(snapshot_id) => json!({ "status": "evicted", "snapshotId": snapshot_id }),
        Err(NotEvicted::Failed(error)) => json!({ "status": "failed", "error": error }),
        Err(NotEvicted::Skipped(_)) => return result.map(|_| ()),
    };
    if let Err(NotEvicted::Failed(error)) = &result {
        tracing::warn!(
            project = project_id,
            branch = branch_id,
            error = %error,
            "eviction failed; the directory is kept"
        );
    }
    if let Err(e) = app.emit(project_id, branch_id, "eviction", fields).await {
        tracing::debug!(error = %e, "could not announce an eviction");
    }
    result.map(|_| ())
}

async fn evict_locked(app: &App, project_id: &str, branch_id: &str) -> Result<String, NotEvicted> {
    let failed = |what: &str, e: &dyn std::fmt::Display| NotEvicted::Failed(format!("{what}: {e}"));
    // Look again under the lock: the branch may have been used since the LRU list was made.
    let (store, p, b) = (
        app.store.clone(),
        project_id.to_string(),
        branch_id.to_string(),
    );
    let (branch, active) = tokio::task::spawn_blocking(move || -> Result<_, StorageError> {
        let rtx = store.begin_read()?;
        Ok((
            model::get_branch(&rtx, &p, &b)?,
            model::active_workflow(&rtx, &p, &b)?.is_some(),
        ))
    })
    .await
    .map_err(|e| failed("background task", &e))?
    .map_err(|e| failed("storage", &e))?;
    let Some(branch) = branch else {
        return Err(NotEvicted::Skipped("evicted"));
    };
    if let Some(reason) = blocker(app, &branch, active, now_ms()) {
        return Err(NotEvicted::Skipped(reason));
    }

    let report = app
        .syncer
        .push_branch(app, project_id, branch_id, Trigger::Eviction, true)
        .await
        .map_err(|e| NotEvicted::Failed(format!("push failed: {}", e.message)))?;
    let same = crate::sync::verify(&app.config, project_id, branch_id, &report.snapshot_id)
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
    app.store
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
    app.syncer.clear(project_id, branch_id);

    let dir = branch_dir(&app.config, project_id, branch_id);
    let (config, p, b) = (
        app.config.clone(),
        project_id.to_string(),
        branch_id.to_string(),
    );
    let removed = crate::background::low_priority(move || {
        crate::branches::remove_branch_dir(&config, &p, &b, &dir)
    })
    .await;
    if !matches!(removed, Ok(Ok(()))) {
        // The branch is evicted either way; a restore pulls over whatever is left.
        tracing::warn!(project = project_id, branch = branch_id, result = ?removed, "could not remove all of an evicted branch's directory");
    }
    tracing::info!(
        project = project_id,
        branch = branch_id,
        snapshot = %report.snapshot_id,
        "evicted"
    );
    Ok(report.snapshot_id)
}

/// Make room before a branch is created or restored: at or above the maximum, run a cleanup
/// pass; still at or above it, answer 507 `disk_full`.
pub async fn ensure_space(app: &App) -> Result<(), ApiError> {
    let max = app.config.max_volume_usage_percent as f64;
    let now = match usage(app).await {
        Ok(u) => u.percent(),
        Err(e) => {
            tracing::warn!(error = %e.message, "disk usage unknown; going ahead");
            return Ok(());
        }
    };
    if now < max {
        return Ok(());
    }
    let report = cleanup(app).await?;
    if report.usage_after >= max {
        return Err(ApiError::new(
            salvo::http::StatusCode::INSUFFICIENT_STORAGE,
            "disk_full",
            format!(
                "the workspace volume is {:.1}% full (maximum {}%) and no more branches can be evicted; free space or raise MAX_VOLUME_USAGE_PERCENT",
                report.usage_after, app.config.max_volume_usage_percent
            ),
        )
        .with_details(serde_json::to_value(&report).unwrap_or_default()));
    }
    Ok(())
}

/// Run a cleanup pass every `EVICTION_INTERVAL_SECONDS` until shutdown (0: never).
pub fn spawn_loop(app: Arc<App>) {
    let every = app.config.eviction_interval;
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = app.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every.max(Duration::from_secs(1))) => {}
            }
            if let Err(e) = cleanup(&app).await {
                tracing::warn!(error = %e, "cleanup pass failed");
            }
        }
    });
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
