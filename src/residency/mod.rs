//! Residency: whether a branch's directory is on this machine. A branch is `active` (here),
//! `restoring` (being pulled back from object storage) or `evicted` (only in object storage).
//! This floor owns making a branch present before it is used ([`Residency::ensure_present`]),
//! restoring it, making room first ([`Residency::ensure_space`]), and creating branches, which
//! needs all of these. It stands above branches, sync and evict, which never call up into it.

use std::sync::Arc;

use serde_json::json;
use weldr_storage::StorageError;
use weldr_storage::model::{self, BranchRecord, BranchState};

use crate::base::Base;
use crate::branches::layers;
use crate::branches::{
    BranchError, BranchKey, Branches, Created, ForkFrom, check_machine_project, recently_touched,
};
use crate::evict::{CleanupReport, EvictError, Evictor};
use crate::sync::{self, PullReport};

#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error(transparent)]
    Branch(#[from] BranchError),
    #[error(
        "the workspace volume is {usage:.1}% full (maximum {max}%) and no more branches can be evicted; free space or raise MAX_VOLUME_USAGE_PERCENT"
    )]
    DiskFull {
        usage: f64,
        max: u8,
        report: Box<CleanupReport>,
    },
    #[error(
        "branch {branch} is evicted and could not be restored from object storage: {reason}; retry later"
    )]
    RestoreFailed { branch: String, reason: String },
    #[error(transparent)]
    Evict(#[from] EvictError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Object storage could not be listed for branches this machine does not know.
    #[error("listing the branches in object storage: {0}")]
    Discover(sync::SyncError),
}

impl From<tokio::task::JoinError> for ResidencyError {
    fn from(e: tokio::task::JoinError) -> Self {
        ResidencyError::Branch(e.into())
    }
}

pub struct Residency {
    base: Base,
    branches: Arc<Branches>,
    evictor: Arc<Evictor>,
}

impl Residency {
    pub fn new(base: Base, branches: Arc<Branches>, evictor: Arc<Evictor>) -> Self {
        Self {
            base,
            branches,
            evictor,
        }
    }

    /// Create a branch, or hand back the existing one (present: restored if it was evicted).
    /// A fork of an existing branch id is [`BranchError::BranchExists`].
    pub async fn create_branch(
        &self,
        key: &BranchKey,
        from: Option<ForkFrom>,
    ) -> Result<Created, ResidencyError> {
        check_machine_project(&self.base.config, &key.project_id)?;
        // Before any lock: a cleanup pass takes other branches' locks.
        self.ensure_space().await?;
        if let Some(fork) = &from
            && fork.branch_id != key.branch_id
        {
            crate::ids::check_id("fromBranchId", &fork.branch_id).map_err(BranchError::from)?;
            match self.ensure_present(&key.sibling(&fork.branch_id)).await {
                // Reported by the fork itself, with the project checked first.
                Err(ResidencyError::Branch(BranchError::BranchNotFound(_))) => {}
                other => {
                    other?;
                }
            }
        }
        let _guard = self.base.locks.lock(key).await;
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let (project, existing) = self
            .base
            .read(move |rtx| model::get_project_and_branch(rtx, &p, &b))
            .await?;
        if project.is_none() {
            return Err(BranchError::ProjectNotFound(key.project_id.clone()).into());
        }
        let Some(branch) = existing else {
            // A branch object storage holds (this machine lost its volume, or another machine
            // pushed it) comes back with its history instead of starting empty.
            if from.is_none()
                && let Some(branch) = self.adopt_locked(key).await?
            {
                return Ok(Created {
                    branch,
                    created: false,
                    adopted: true,
                    dir: self.base.dir(key),
                });
            }
            return Ok(self.branches.create_locked(key, from).await?);
        };
        if from.is_some() {
            return Err(BranchError::BranchExists(key.branch_id.clone()).into());
        }
        let branch = if branch.state == BranchState::Active {
            self.branches.mount_if_layered(key).await?;
            self.branches.reinit_if_missing(key).await?;
            self.branches.touch_locked(key, branch).await?
        } else {
            self.restore_locked(key).await?
        };
        Ok(Created {
            branch,
            created: false,
            adopted: false,
            dir: self.base.dir(key),
        })
    }

    /// Branches the store records as here whose directory is not (the store came back from its
    /// backup on a fresh volume, or someone removed a directory) are recorded as evicted: their
    /// first use restores them from object storage. Run before anything uses a branch. Answers
    /// how many.
    pub async fn settle_missing(&self) -> Result<usize, ResidencyError> {
        let branches = self.base.read(model::list_all_branches).await?;
        let mut settled = 0;
        for branch in branches {
            if branch.state == BranchState::Evicted {
                continue;
            }
            let key = BranchKey::new(&branch.project_id, &branch.branch_id);
            if self.base.dir(&key).exists() {
                continue;
            }
            let _guard = self.base.locks.lock(&key).await;
            if self.base.dir(&key).exists() {
                continue;
            }
            tracing::info!(branch = %key, "its directory is missing: recorded as evicted, restored on first use");
            self.branches.set_state(&key, BranchState::Evicted).await?;
            settled += 1;
        }
        Ok(settled)
    }

    /// Branches object storage holds that the store does not know (this machine lost its
    /// volume, or another machine pushed them) are recorded as evicted, their projects
    /// registered without an owner when missing (so the operator's, like the CLI's): they show
    /// in the lists and are restored, with versions rebuilt from their history, on first use.
    /// In cloud mode only the machine's project. Returns how many were added.
    pub async fn adopt_discovered(&self) -> Result<usize, ResidencyError> {
        let found = sync::store::discover(&self.base.config)
            .await
            .map_err(ResidencyError::Discover)?;
        let known: std::collections::HashSet<(String, String)> = self
            .base
            .read(model::list_all_branches)
            .await?
            .into_iter()
            .map(|b| (b.project_id, b.branch_id))
            .collect();
        let mut added = 0;
        for (project, branch) in found {
            // Known ones are left alone, without their lock (an eviction pass skips a busy
            // branch).
            if known.contains(&(project.clone(), branch.clone()))
                || check_machine_project(&self.base.config, &project).is_err()
            {
                continue;
            }
            let key = BranchKey::new(&project, &branch);
            // A bucket or prefix without a finished snapshot (a first push that died) is not
            // a branch to restore.
            match sync::latest_snapshot(&self.base.config, &key).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(e) => return Err(ResidencyError::Discover(e)),
            }
            match crate::branches::registry::create_project(&self.base.store, &project, None, None)
                .await
            {
                Ok(_) | Err(BranchError::ProjectExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let _guard = self.base.locks.lock(&key).await;
            if self.branches.adopt_locked(&key).await? {
                tracing::info!(branch = %key, "found in object storage: recorded as evicted");
                added += 1;
            }
        }
        Ok(added)
    }

    /// A branch the store does not know, restored from object storage when a snapshot of it
    /// is there (recorded as evicted first: a failed restore leaves it so, to be restored on
    /// its next use), with versions rebuilt from its git history. None when object storage has
    /// none, or cannot be asked (then the branch starts empty; a push from it never replaces
    /// a snapshot its history does not contain).
    async fn adopt_locked(&self, key: &BranchKey) -> Result<Option<BranchRecord>, ResidencyError> {
        match sync::latest_snapshot(&self.base.config, key).await {
            Ok(Some(snapshot)) => {
                tracing::info!(branch = %key, snapshot = %snapshot, "the branch is in object storage: restoring it");
            }
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(branch = %key, error = %e, "cannot ask object storage for the branch; starting it empty");
                return Ok(None);
            }
        }
        if !self.branches.adopt_locked(key).await? {
            return Ok(None);
        }
        let branch = self.restore_locked(key).await?;
        tracing::info!(branch = %key, "restored a branch from object storage");
        Ok(Some(branch))
    }

    /// Make sure a branch's directory is here before it is used: an evicted branch is restored
    /// from object storage (state `restoring` while it is pulled, then `active`). Also records
    /// the use (under the branch lock, unless one was recorded within the touch window), so
    /// that an eviction pass never removes a branch that was just handed to a caller.
    pub async fn ensure_present(&self, key: &BranchKey) -> Result<BranchRecord, ResidencyError> {
        let branch = self.read_branch(key).await?;
        self.ensure_present_from(branch).await
    }

    /// [`Self::ensure_present`] for a caller that has just read the branch's record (the
    /// access check does): one read less on every request.
    pub async fn ensure_present_from(
        &self,
        branch: BranchRecord,
    ) -> Result<BranchRecord, ResidencyError> {
        let key = BranchKey::new(&branch.project_id, &branch.branch_id);
        if branch.state == BranchState::Active && recently_touched(&self.base.config, &branch) {
            // Used within the touch window, which is shorter than the eviction grace: a pass
            // that starts now skips the branch, and one under way cannot be (it checked the use
            // under the lock and no use is recorded without it), so it is here without taking
            // the lock.
            self.branches.mount_if_layered(&key).await?;
            return Ok(branch);
        }
        if branch.state != BranchState::Active {
            // Before the lock: a cleanup pass takes other branches' locks.
            self.ensure_space().await?;
        }
        let _guard = self.base.locks.lock(&key).await;
        let branch = self.read_branch(&key).await?;
        if branch.state == BranchState::Active {
            self.branches.mount_if_layered(&key).await?;
            return Ok(self.branches.touch_locked(&key, branch).await?);
        }
        self.restore_locked(&key).await
    }

    /// Record a use of `branch` (for the eviction pass's LRU order) in the background, unless
    /// its record, just read by the caller, shows one within the touch window.
    pub fn touch(self: &Arc<Self>, branch: &BranchRecord) {
        if recently_touched(&self.base.config, branch) {
            return;
        }
        let (this, key) = (
            self.clone(),
            BranchKey::new(&branch.project_id, &branch.branch_id),
        );
        tokio::spawn(async move {
            let _guard = this.base.locks.lock(&key).await;
            let result: Result<(), ResidencyError> = match this.read_branch(&key).await {
                Ok(branch) => match this.branches.touch_locked(&key, branch).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.into()),
                },
                Err(ResidencyError::Branch(BranchError::BranchNotFound(_))) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "could not record branch access");
            }
        });
    }

    /// Make room before a branch is created or restored: at or above the maximum, run a
    /// cleanup pass; still at or above it, [`ResidencyError::DiskFull`].
    pub async fn ensure_space(&self) -> Result<(), ResidencyError> {
        let max = self.base.config.max_volume_usage_percent;
        let now = match self.evictor.usage() {
            Ok(u) => u.percent(),
            Err(e) => {
                tracing::warn!(error = %e, "disk usage unknown; going ahead");
                return Ok(());
            }
        };
        if now < max as f64 {
            return Ok(());
        }
        let report = self.evictor.cleanup().await?;
        if report.usage_after >= max as f64 {
            return Err(ResidencyError::DiskFull {
                usage: report.usage_after,
                max,
                report: Box::new(report),
            });
        }
        Ok(())
    }

    async fn read_branch(&self, key: &BranchKey) -> Result<BranchRecord, ResidencyError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        self.base
            .read(move |rtx| model::get_branch(rtx, &p, &b))
            .await?
            .ok_or_else(|| BranchError::BranchNotFound(key.clone()).into())
    }

    /// Pull an evicted branch back (the caller holds the branch lock).
    async fn restore_locked(&self, key: &BranchKey) -> Result<BranchRecord, ResidencyError> {
        let snapshot = sync::syncer::state(&self.base.store, key)
            .await?
            .snapshot_id;
        self.branches.set_state(key, BranchState::Restoring).await?;
        // Layers an interrupted eviction left behind go first: the snapshot is the branch now.
        let (config, k, dir) = (self.base.config.clone(), key.clone(), self.base.dir(key));
        tokio::task::spawn_blocking(move || {
            layers::Layers::new(&config).remove_branch(&k.project_id, &k.branch_id, &dir)
        })
        .await?
        .map_err(|e| BranchError::Mount {
            branch: key.branch_id.clone(),
            reason: format!("cannot clear the evicted branch's layers: {e}"),
        })?;
        tracing::info!(branch = %key, snapshot = ?snapshot, "restoring an evicted branch");
        let pulled = sync::pull(&self.base.config, key, snapshot.as_deref()).await;
        let outcome = match pulled {
            Ok(PullReport::Restored {
                snapshot_id,
                files,
                bytes,
                duration_ms,
                ..
            }) => Ok(json!({
                "action": "restore",
                "status": "success",
                "snapshotId": snapshot_id,
                "files": files,
                "bytes": bytes,
                "durationMs": duration_ms,
            })),
            Ok(PullReport::Skipped { bucket }) => Err(format!(
                "no snapshot of the branch in {bucket}; the object store lost it"
            )),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(fields) => {
                // A branch adopted from object storage has no versions yet: its history has.
                // The branch is back either way.
                if let Err(e) = self.branches.rebuild_versions(key).await {
                    tracing::warn!(branch = %key, error = %e, "could not rebuild the versions from the git history");
                }
                self.branches.set_state(key, BranchState::Active).await?;
                let _ = self.base.emit(key, "sync", fields).await;
                crate::branches::registry::refresh_size(&self.base.store, key, self.base.dir(key));
                self.read_branch(key).await
            }
            Err(error) => {
                tracing::warn!(branch = %key, error = %error, "restore failed");
                self.branches.set_state(key, BranchState::Evicted).await?;
                let fields = json!({ "action": "restore", "status": "failed", "error": error });
                let _ = self.base.emit(key, "sync", fields).await;
                Err(ResidencyError::RestoreFailed {
                    branch: key.branch_id.clone(),
                    reason: error,
                })
            }
        }
    }
}

/// The startup pass that records the branches object storage holds and the store does not
/// know ([`Residency::adopt_discovered`]), as a [`crate::worker::Worker`]: retried with the
/// runner's backoff while object storage cannot be listed, then done.
pub struct Discover {
    residency: Arc<Residency>,
}

impl Discover {
    pub fn new(residency: Arc<Residency>) -> Self {
        Self { residency }
    }
}

#[async_trait::async_trait]
impl crate::worker::Worker for Discover {
    fn name(&self) -> &'static str {
        "discover"
    }

    async fn work(
        &mut self,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<crate::worker::WorkerState, String> {
        let added = self
            .residency
            .adopt_discovered()
            .await
            .map_err(|e| e.to_string())?;
        if added > 0 {
            tracing::info!(added, "branches found in object storage");
        }
        Ok(crate::worker::WorkerState::Done)
    }

    async fn wait_for_work(&mut self) {}
}
