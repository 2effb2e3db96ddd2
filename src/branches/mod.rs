//! Branch workspaces: creating and forking a branch's repository, and its versions (git
//! commits recorded in redb with a per-branch sequence number). Whether a branch is on disk at
//! all (restore, eviction) is [`crate::residency`]'s business, one floor up.
//!
//! git work runs in `spawn_blocking` (git2 is not `Sync` and blocks). Operations on one branch
//! are serialised by its lock ([`layout::BranchLocks`]), so a checkpoint and a revert never
//! interleave.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;
use weldr_storage::conversation::{self, ForkPoint};
use weldr_storage::model::{
    self, BranchRecord, BranchState, ChangeKind, FileChange, VersionKind, VersionRecord,
};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, StreamKey};

use crate::base::Base;
use crate::config::{Config, Mode};
use crate::git::{self, GitError};
use crate::sync::syncer::Syncer;

pub mod error;
pub mod layers;
pub mod layout;
pub mod registry;

pub use error::BranchError;
pub use layout::{BranchKey, BranchLocks, branch_dir};

/// A write that goes into the same transaction as a version (see
/// [`Branches::commit_locked_with`]): given the version's sequence number, if one was made.
pub type AlsoWrite = Arc<
    dyn Fn(&mut weldr_storage::writer::WriteCtx<'_>, Option<u64>) -> Result<(), StorageError>
        + Send
        + Sync,
>;

pub const AGENT_AUTHOR: &str = "weldr-agent";

/// In cloud mode a machine serves one project; any other id is refused.
pub fn check_machine_project(config: &Config, project_id: &str) -> Result<(), BranchError> {
    match (&config.mode, &config.project_id) {
        (Mode::Cloud, Some(own)) if own != project_id => Err(BranchError::WrongMachine {
            own: own.clone(),
            requested: project_id.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The record of a branch first seen at `now`: no parent, no size or versions yet.
fn new_record(key: &BranchKey, state: BranchState, now: u64) -> BranchRecord {
    BranchRecord {
        project_id: key.project_id.clone(),
        branch_id: key.branch_id.clone(),
        parent_branch_id: None,
        fork_version: None,
        created_at_ms: now,
        last_access_ms: now,
        size_bytes: 0,
        state,
        head_version: None,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, BranchError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// Where a new branch starts.
#[derive(Debug, Clone)]
pub struct ForkFrom {
    pub branch_id: String,
    /// A version of the parent; its head when None.
    pub version: Option<u64>,
}

pub struct Created {
    pub branch: BranchRecord,
    pub created: bool,
    /// The store did not know the branch but object storage did: it was restored from its
    /// latest snapshot (a machine that lost its volume).
    pub adopted: bool,
    pub dir: PathBuf,
}

fn to_changes(changed: &[git::FileChange]) -> Vec<FileChange> {
    changed
        .iter()
        .map(|c| FileChange {
            path: c.path.clone(),
            kind: match c.kind {
                git::ChangeKind::Added => ChangeKind::Added,
                git::ChangeKind::Modified => ChangeKind::Modified,
                git::ChangeKind::Deleted => ChangeKind::Deleted,
            },
        })
        .collect()
}

/// A use this recent is not written again: many streams opening on one branch at once share
/// one commit instead of queueing on the branch lock for one fsync each. Capped at half the
/// eviction grace, so that a fresh record still keeps a pass away (see
/// [`crate::residency::Residency::ensure_present`]).
fn touch_window(config: &Config) -> u64 {
    (config.eviction_grace.as_millis() as u64 / 2).min(1000)
}

/// Whether `branch`'s recorded use is recent enough not to be written again.
pub fn recently_touched(config: &Config, branch: &BranchRecord) -> bool {
    now_ms().saturating_sub(branch.last_access_ms) < touch_window(config)
}

/// Creating branches and their versions.
pub struct Branches {
    base: Base,
    syncer: Arc<Syncer>,
}

impl Branches {
    pub fn new(base: Base, syncer: Arc<Syncer>) -> Self {
        Self { base, syncer }
    }

    /// Create branch `key` (a git repository with an initial commit on `main`, or a fork of
    /// another branch of the same project at one of its versions). The caller holds the
    /// branch's lock and has checked that the project exists and the branch does not (see
    /// [`crate::residency::Residency::create_branch`]); the parent is present on disk.
    pub async fn create_locked(
        &self,
        key: &BranchKey,
        from: Option<ForkFrom>,
    ) -> Result<Created, BranchError> {
        let dir = self.base.dir(key);
        let now = now_ms();
        let mut record = new_record(key, BranchState::Active, now);
        let inherited = match &from {
            None => {
                let d = dir.clone();
                let init = blocking(move || git::init_branch(&d, AGENT_AUTHOR)).await?;
                vec![VersionRecord {
                    seq: 1,
                    commit_hash: init.hash,
                    message: "Initial commit".into(),
                    description: None,
                    kind: VersionKind::Checkpoint,
                    changed: Vec::new(),
                    author: AGENT_AUTHOR.into(),
                    created_at_ms: now,
                    restores: None,
                    workflow_id: None,
                }]
            }
            Some(fork) => self.fork_into(key, fork, &mut record).await?,
        };
        record.head_version = inherited.last().map(|v| v.seq);
        // A fork starts with its parent's conversation up to the fork point.
        let thread = from.as_ref().map(|fork| {
            let point = match (fork.version, inherited.last()) {
                (Some(_), Some(at)) => ForkPoint::Version {
                    workflow_id: at.workflow_id.clone(),
                    created_at_ms: at.created_at_ms,
                },
                _ => ForkPoint::Head,
            };
            (StreamKey::new(&key.project_id, &fork.branch_id), point)
        });
        let own_key = StreamKey::new(&key.project_id, &key.branch_id);
        let to_store = record.clone();
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let stored = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                if model::get_branch_for_update(ctx, &p, &b)?.is_some() {
                    return Err(StorageError::AlreadyExists(format!("branch {b}")));
                }
                model::put_branch(ctx, &to_store)?;
                for v in &inherited {
                    model::put_version(ctx, &p, &b, v)?;
                }
                if let Some((parent, point)) = &thread {
                    conversation::copy_for_fork(ctx, parent, &own_key, point)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = stored {
            let (config, k, d) = (self.base.config.clone(), key.clone(), dir.clone());
            let _ = tokio::task::spawn_blocking(move || layers::remove_branch_dir(&config, &k, &d))
                .await;
            return Err(e.into());
        }
        registry::refresh_size(&self.base.store, key, dir.clone());
        Ok(Created {
            branch: record,
            created: true,
            adopted: false,
            dir,
        })
    }

    /// Make `key`'s directory a fork of `fork` and fill in `record`'s parent; answers the
    /// parent's versions up to the fork point, which the child inherits.
    async fn fork_into(
        &self,
        key: &BranchKey,
        fork: &ForkFrom,
        record: &mut BranchRecord,
    ) -> Result<Vec<VersionRecord>, BranchError> {
        crate::ids::check_id("fromBranchId", &fork.branch_id)?;
        if fork.branch_id == key.branch_id {
            return Err(BranchError::ForkItself);
        }
        let parent_key = key.sibling(&fork.branch_id);
        let (p, pb) = (parent_key.project_id.clone(), parent_key.branch_id.clone());
        let (parent, versions, parent_workflow) = self
            .base
            .read(move |rtx| {
                Ok((
                    model::get_branch(rtx, &p, &pb)?,
                    model::list_versions(rtx, &p, &pb)?,
                    model::active_workflow(rtx, &p, &pb)?,
                ))
            })
            .await?;
        let parent = parent.ok_or_else(|| BranchError::BranchNotFound(parent_key.clone()))?;
        let at = match fork.version {
            Some(seq) => versions
                .iter()
                .find(|v| v.seq == seq)
                .cloned()
                .ok_or_else(|| BranchError::VersionNotFound {
                    seq,
                    branch: fork.branch_id.clone(),
                })?,
            None => versions.last().cloned().ok_or(BranchError::EmptyParent)?,
        };
        let _parent_guard = self.base.locks.lock(&parent_key).await;
        let (src, dst) = (self.base.dir(&parent_key), self.base.dir(key));
        let hash = at.commit_hash.clone();
        // At the parent's head, uncommitted work travels too; at an older version, its tree.
        let include_worktree = fork.version.is_none() || Some(at.seq) == parent.head_version;
        // A workflow's tools may write into the parent at any moment: never freeze it then.
        let layered = include_worktree
            && self.base.config.fork_layers
            && parent_workflow.is_none()
            && self.fork_layered(&parent_key, key).await?;
        if !layered {
            blocking(move || git::fork(&src, &dst, &hash, include_worktree)).await?;
        }
        record.parent_branch_id = Some(parent.branch_id.clone());
        record.fork_version = Some(at.seq);
        Ok(versions.into_iter().filter(|v| v.seq <= at.seq).collect())
    }

    /// Fork `parent` into `child` as copy-on-write layers. False when that cannot be done now
    /// (no overlayfs here, the parent in use, its stack too deep): the caller copies instead.
    async fn fork_layered(
        &self,
        parent: &BranchKey,
        child: &BranchKey,
    ) -> Result<bool, BranchError> {
        let config = self.base.config.clone();
        let (parent_dir, child_dir) = (self.base.dir(parent), self.base.dir(child));
        let (p, pb, cb) = (
            parent.project_id.clone(),
            parent.branch_id.clone(),
            child.branch_id.clone(),
        );
        let (pd, cd) = (parent_dir.clone(), child_dir.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            layers::Layers::new(&config).fork(&p, (&pb, &pd), (&cb, &cd))
        })
        .await?;
        match outcome {
            Ok(Ok(())) => {
                self.syncer.rewatch(&parent_dir);
                self.syncer.rewatch(&child_dir);
                Ok(true)
            }
            Ok(Err(declined)) => {
                if !matches!(declined, layers::Declined::Unavailable) {
                    tracing::info!(branch = %child, reason = ?declined, "fork copies instead of layering");
                }
                Ok(false)
            }
            Err(e) => {
                tracing::error!(branch = %child, error = %e, "layered fork failed");
                Err(BranchError::Fork(e.to_string()))
            }
        }
    }

    /// Commit the branch's current tree as a new version. None when nothing changed.
    pub async fn commit_version(
        &self,
        key: &BranchKey,
        message: &str,
        description: Option<String>,
        kind: VersionKind,
        workflow_id: Option<String>,
    ) -> Result<Option<VersionRecord>, BranchError> {
        let _guard = self.base.locks.lock(key).await;
        self.commit_locked(key, message, description, kind, workflow_id)
            .await
    }

    /// [`Self::commit_version`] for a caller that holds the branch lock.
    async fn commit_locked(
        &self,
        key: &BranchKey,
        message: &str,
        description: Option<String>,
        kind: VersionKind,
        workflow_id: Option<String>,
    ) -> Result<Option<VersionRecord>, BranchError> {
        let dir = self.base.dir(key);
        let msg = message.to_string();
        let Some(commit) = blocking(move || git::commit_all(&dir, &msg, AGENT_AUTHOR)).await?
        else {
            return Ok(None);
        };
        let version = VersionRecord {
            seq: 0,
            commit_hash: commit.hash,
            message: message.to_string(),
            description,
            kind,
            changed: to_changes(&commit.changed),
            author: AGENT_AUTHOR.into(),
            created_at_ms: now_ms(),
            restores: None,
            workflow_id,
        };
        Ok(Some(self.record_version(key, version).await?))
    }

    /// [`Self::commit_version`] for a caller that holds the branch lock, with `also` written in
    /// the same transaction as the version (given its sequence number; None, in a write of its
    /// own, when nothing changed): what an integration install records its job with.
    pub async fn commit_locked_with(
        &self,
        key: &BranchKey,
        message: &str,
        kind: VersionKind,
        also: Option<AlsoWrite>,
    ) -> Result<Option<VersionRecord>, BranchError> {
        let dir = self.base.dir(key);
        let msg = message.to_string();
        let Some(commit) = blocking(move || git::commit_all(&dir, &msg, AGENT_AUTHOR)).await?
        else {
            if let Some(also) = also {
                self.base
                    .store
                    .writer()
                    .write(move |ctx| also(ctx, None))
                    .await?;
            }
            return Ok(None);
        };
        let version = VersionRecord {
            seq: 0,
            commit_hash: commit.hash,
            message: message.to_string(),
            description: None,
            kind,
            changed: to_changes(&commit.changed),
            author: AGENT_AUTHOR.into(),
            created_at_ms: now_ms(),
            restores: None,
            workflow_id: None,
        };
        Ok(Some(self.record_version_with(key, version, also).await?))
    }

    /// Store a version with the next sequence number, move the branch head, and announce it.
    async fn record_version(
        &self,
        key: &BranchKey,
        version: VersionRecord,
    ) -> Result<VersionRecord, BranchError> {
        self.record_version_with(key, version, None).await
    }

    async fn record_version_with(
        &self,
        key: &BranchKey,
        mut version: VersionRecord,
        also: Option<AlsoWrite>,
    ) -> Result<VersionRecord, BranchError> {
        let (p, b, stream) = (key.project_id.clone(), key.branch_id.clone(), key.stream());
        let v = version.clone();
        let seq = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let mut version = v.clone();
                version.seq = model::next_version_seq(ctx, &p, &b)?;
                model::put_version(ctx, &p, &b, &version)?;
                if let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? {
                    branch.head_version = Some(version.seq);
                    branch.last_access_ms = now_ms();
                    model::put_branch(ctx, &branch)?;
                }
                let event = crate::stream::new_event(
                    "version",
                    json!({
                        "versionId": version.seq.to_string(),
                        "commitHash": version.commit_hash,
                        "kind": version.kind.as_str(),
                        "message": version.message,
                        "restores": version.restores.map(|s| s.to_string()),
                        "workflowId": version.workflow_id,
                        "changedFiles": version.changed.len(),
                    }),
                )
                .map_err(|e| StorageError::Conflict(e.to_string()))?;
                ctx.append(&stream, event)?;
                if let Some(also) = &also {
                    also(ctx, Some(version.seq))?;
                }
                Ok(version.seq)
            })
            .await?;
        version.seq = seq;
        self.syncer.push_soon(key);
        registry::refresh_size(&self.base.store, key, self.base.dir(key));
        Ok(version)
    }

    /// Restore the tree of version `seq` as a new `revert` version (a later revert is a redo).
    /// [`BranchError::Busy`] while a workflow is active on the branch.
    pub async fn revert(&self, key: &BranchKey, seq: u64) -> Result<VersionRecord, BranchError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let (active, target) = self
            .base
            .read(move |rtx| {
                Ok((
                    model::active_workflow(rtx, &p, &b)?,
                    model::get_version(rtx, &p, &b, seq)?,
                ))
            })
            .await?;
        if let Some(workflow_id) = active {
            return Err(BranchError::Busy { workflow_id });
        }
        let target = target.ok_or_else(|| BranchError::VersionNotFound {
            seq,
            branch: key.branch_id.clone(),
        })?;
        let _guard = self.base.locks.lock(key).await;
        // Re-check under the lock: a workflow may have claimed the branch meanwhile.
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        if let Some(workflow_id) = self
            .base
            .read(move |rtx| model::active_workflow(rtx, &p, &b))
            .await?
        {
            return Err(BranchError::Busy { workflow_id });
        }
        // Uncommitted work is kept as a version of its own before the tree is replaced.
        self.commit_locked(
            key,
            "Uncommitted changes before revert",
            None,
            VersionKind::Checkpoint,
            None,
        )
        .await?;
        let dir = self.base.dir(key);
        let message = format!("Revert to version {seq}: {}", target.message);
        let (hash, msg) = (target.commit_hash.clone(), message.clone());
        let commit = blocking(move || git::restore_tree(&dir, &hash, &msg, AGENT_AUTHOR)).await?;
        let version = VersionRecord {
            seq: 0,
            commit_hash: commit.hash,
            message,
            description: None,
            kind: VersionKind::Revert,
            changed: to_changes(&commit.changed),
            author: AGENT_AUTHOR.into(),
            created_at_ms: now_ms(),
            restores: Some(seq),
            workflow_id: None,
        };
        self.record_version(key, version).await
    }

    /// The diff of version `seq` against its parent commit.
    pub async fn version_diff(
        &self,
        key: &BranchKey,
        seq: u64,
    ) -> Result<(VersionRecord, Vec<git::FileDiff>), BranchError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let version = self
            .base
            .read(move |rtx| model::get_version(rtx, &p, &b, seq))
            .await?
            .ok_or_else(|| BranchError::VersionNotFound {
                seq,
                branch: key.branch_id.clone(),
            })?;
        let dir = self.base.dir(key);
        let hash = version.commit_hash.clone();
        let diff = blocking(move || git::diff(&dir, &hash)).await?;
        Ok((version, diff))
    }

    /// Record a use of the branch now (unless one was just recorded) and answer its record.
    /// Call under the branch lock: every write of `last_access_ms` happens under it, so an
    /// eviction pass, which holds the lock from its check to its mark, never has it refreshed
    /// behind its back.
    pub async fn touch_locked(
        &self,
        key: &BranchKey,
        branch: BranchRecord,
    ) -> Result<BranchRecord, BranchError> {
        if recently_touched(&self.base.config, &branch) {
            return Ok(branch);
        }
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let branch = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? else {
                    return Ok(None);
                };
                branch.last_access_ms = now_ms();
                model::put_branch(ctx, &branch)?;
                Ok(Some(branch))
            })
            .await?;
        branch.ok_or_else(|| BranchError::BranchNotFound(key.clone()))
    }

    /// A layered branch's overlay is mounted before use (a no-op when it is; one stat for a
    /// plain branch).
    pub async fn mount_if_layered(&self, key: &BranchKey) -> Result<(), BranchError> {
        layers::mounted_dir(&self.base.config, &key.project_id, &key.branch_id)
            .await
            .map(drop)
            .map_err(|e| {
                tracing::error!(branch = %key, error = %e, "cannot mount a layered branch");
                BranchError::Mount {
                    branch: key.branch_id.clone(),
                    reason: e.to_string(),
                }
            })
    }

    /// Start an existing branch's repository again, empty, when its directory went away
    /// outside our control.
    pub async fn reinit_if_missing(&self, key: &BranchKey) -> Result<(), BranchError> {
        let dir = self.base.dir(key);
        if !dir.join(".git").exists() {
            blocking(move || git::init_branch(&dir, AGENT_AUTHOR).map(drop)).await?;
        }
        Ok(())
    }

    /// Set a branch's residency state (and record the use).
    /// Record branch `key`, which the store does not know but object storage holds, as
    /// evicted (the caller holds its lock and restores it next). False when the store knows
    /// it after all.
    pub async fn adopt_locked(&self, key: &BranchKey) -> Result<bool, BranchError> {
        let record = new_record(key, BranchState::Evicted, now_ms());
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let adopted = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                if model::get_branch_for_update(ctx, &p, &b)?.is_some() {
                    return Ok(false);
                }
                model::put_branch(ctx, &record)?;
                Ok(true)
            })
            .await?;
        Ok(adopted)
    }

    /// Versions for a branch whose records were lost but whose repository came back: one per
    /// commit along HEAD's first parents, oldest first (their messages and times; the files
    /// each changed). Nothing when the branch has versions.
    pub async fn rebuild_versions(&self, key: &BranchKey) -> Result<usize, BranchError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let known = self
            .base
            .read(move |rtx| model::list_versions(rtx, &p, &b))
            .await?;
        if !known.is_empty() {
            return Ok(0);
        }
        let dir = self.base.dir(key);
        let history = blocking(move || {
            let log = git::log(&dir, usize::MAX)?;
            let mut out = Vec::new();
            for (hash, message, secs) in log.into_iter().rev() {
                let changed = git::commit_changes(&dir, &hash).unwrap_or_default();
                out.push((hash, message, secs, changed));
            }
            Ok(out)
        })
        .await?;
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let count = history.len();
        self.base
            .store
            .writer()
            .write(move |ctx| {
                if !model::list_versions_for_update(ctx, &p, &b)?.is_empty() {
                    return Ok(());
                }
                for (i, (hash, message, secs, changed)) in history.iter().enumerate() {
                    let v = VersionRecord {
                        seq: i as u64 + 1,
                        commit_hash: hash.clone(),
                        message: message.clone(),
                        description: None,
                        kind: VersionKind::Checkpoint,
                        changed: to_changes(changed),
                        author: AGENT_AUTHOR.into(),
                        created_at_ms: u64::try_from(*secs).unwrap_or(0).saturating_mul(1000),
                        restores: None,
                        workflow_id: None,
                    };
                    model::put_version(ctx, &p, &b, &v)?;
                }
                if let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? {
                    branch.head_version = (!history.is_empty()).then_some(history.len() as u64);
                    model::put_branch(ctx, &branch)?;
                }
                Ok(())
            })
            .await?;
        Ok(count)
    }

    pub async fn set_state(&self, key: &BranchKey, state: BranchState) -> Result<(), BranchError> {
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        self.base
            .store
            .writer()
            .write(move |ctx| {
                if let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? {
                    branch.state = state;
                    branch.last_access_ms = now_ms();
                    model::put_branch(ctx, &branch)?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }
}
