//! Branch workspaces: where a branch's directory lives, creating and forking it, and its
//! versions (git commits recorded in redb with a per-branch sequence number).
//!
//! git work runs in `spawn_blocking` (git2 is not `Sync` and blocks). Operations on one branch
//! are serialised by a per-branch lock, so a checkpoint and a revert never interleave.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::json;
use weldr_storage::StorageError;
use weldr_storage::model::{
    self, BranchRecord, BranchState, ChangeKind, FileChange, VersionKind, VersionRecord,
};
use weldr_storage::writer::now_ms;

use crate::app::App;
use crate::config::{Config, Mode};
use crate::error::ApiError;
use crate::git::{self, GitError};
use crate::registry::{branch_not_found, project_not_found};

pub mod layers;

pub const AGENT_AUTHOR: &str = "weldr-agent";

/// In cloud mode a machine serves one project; any other id is refused.
pub fn check_machine_project(config: &Config, project_id: &str) -> Result<(), ApiError> {
    match (&config.mode, &config.project_id) {
        (Mode::Cloud, Some(own)) if own != project_id => Err(ApiError::bad_request(
            "wrong_machine",
            format!(
                "this machine serves project {own} only; send requests for {project_id} to its own machine"
            ),
        )),
        _ => Ok(()),
    }
}

/// `{base}/{project}/{branch}` locally, `{base}/{branch}` in cloud mode (one project).
pub fn branch_dir(config: &Config, project_id: &str, branch_id: &str) -> PathBuf {
    match config.mode {
        Mode::Local => config.workspace_base.join(project_id).join(branch_id),
        Mode::Cloud => config.workspace_base.join(branch_id),
    }
}

type LockMap = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// One async lock per branch.
#[derive(Default)]
pub struct BranchLocks {
    locks: Mutex<LockMap>,
}

impl BranchLocks {
    fn get(&self, project_id: &str, branch_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks
            .entry((project_id.to_string(), branch_id.to_string()))
            .or_default()
            .clone()
    }

    pub async fn lock(
        &self,
        project_id: &str,
        branch_id: &str,
    ) -> tokio::sync::OwnedMutexGuard<()> {
        self.get(project_id, branch_id).lock_owned().await
    }

    /// The lock if nobody holds it now.
    pub fn try_lock(
        &self,
        project_id: &str,
        branch_id: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.get(project_id, branch_id).try_lock_owned().ok()
    }
}

impl From<GitError> for ApiError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::NotFound(what) => {
                ApiError::not_found("version_not_found", format!("{what} not found"))
            }
            other => {
                tracing::error!(error = %other, "git failed");
                ApiError::internal(format!("git failed: {other}"))
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

fn read<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StorageError> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, ApiError>> {
    let store = app.store.clone();
    async move { Ok(tokio::task::spawn_blocking(move || f(&store.begin_read()?)).await??) }
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

/// Create a branch (a git repository with an initial commit on `main`, or a fork of another
/// branch of the same project at one of its versions), or reuse it if it exists.
pub async fn create_branch(
    app: &App,
    project_id: &str,
    branch_id: &str,
    from: Option<ForkFrom>,
) -> Result<Created, ApiError> {
    check_machine_project(&app.config, project_id)?;
    // Before any lock: a cleanup pass takes other branches' locks.
    crate::evict::ensure_space(app).await?;
    if let Some(fork) = &from
        && fork.branch_id != branch_id
    {
        crate::ids::check_id("fromBranchId", &fork.branch_id)?;
        match ensure_present(app, project_id, &fork.branch_id).await {
            // Reported below, with the project checked first.
            Err(e) if e.code == "branch_not_found" => {}
            other => {
                other?;
            }
        }
    }
    let _guard = app.branch_locks.lock(project_id, branch_id).await;
    let dir = branch_dir(&app.config, project_id, branch_id);
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let (project, existing) = read(app, move |rtx| {
        Ok((
            model::get_project(rtx, &p)?,
            model::get_branch(rtx, &p, &b)?,
        ))
    })
    .await?;
    if project.is_none() {
        return Err(project_not_found(project_id));
    }
    if let Some(branch) = existing {
        if from.is_some() {
            return Err(ApiError::conflict(
                "branch_exists",
                format!("branch {branch_id} already exists"),
            ));
        }
        let branch = if branch.state == BranchState::Active {
            mount_if_layered(app, project_id, branch_id).await?;
            if !dir.join(".git").exists() {
                // The directory went away outside our control: start it again, empty.
                let d = dir.clone();
                blocking(move || git::init_branch(&d, AGENT_AUTHOR)).await?;
            }
            touch_locked(app, project_id, branch_id, branch).await?
        } else {
            restore_locked(app, project_id, branch_id).await?
        };
        return Ok(Created {
            branch,
            created: false,
            dir,
        });
    }

    let now = now_ms();
    let mut record = BranchRecord {
        project_id: project_id.to_string(),
        branch_id: branch_id.to_string(),
        parent_branch_id: None,
        fork_version: None,
        created_at_ms: now,
        last_access_ms: now,
        size_bytes: 0,
        state: BranchState::Active,
        head_version: None,
    };
    let mut inherited: Vec<VersionRecord> = Vec::new();
    match &from {
        None => {
            let d = dir.clone();
            let init = blocking(move || git::init_branch(&d, AGENT_AUTHOR)).await?;
            inherited.push(VersionRecord {
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
            });
        }
        Some(fork) => {
            crate::ids::check_id("fromBranchId", &fork.branch_id)?;
            let (p, pb) = (project_id.to_string(), fork.branch_id.clone());
            let (parent, versions, parent_workflow) = read(app, move |rtx| {
                Ok((
                    model::get_branch(rtx, &p, &pb)?,
                    model::list_versions(rtx, &p, &pb)?,
                    model::active_workflow(rtx, &p, &pb)?,
                ))
            })
            .await?;
            let parent = parent.ok_or_else(|| branch_not_found(project_id, &fork.branch_id))?;
            let at = match fork.version {
                Some(seq) => versions
                    .iter()
                    .find(|v| v.seq == seq)
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::not_found(
                            "version_not_found",
                            format!("version {seq} is not on branch {}", fork.branch_id),
                        )
                    })?,
                None => versions.last().cloned().ok_or_else(|| {
                    ApiError::conflict("empty_branch", "the parent branch has no version yet")
                })?,
            };
            let _parent_guard = if fork.branch_id != branch_id {
                Some(app.branch_locks.lock(project_id, &fork.branch_id).await)
            } else {
                return Err(ApiError::bad_request(
                    "invalid_fork",
                    "a branch cannot fork itself",
                ));
            };
            let src = branch_dir(&app.config, project_id, &parent.branch_id);
            let (d, hash) = (dir.clone(), at.commit_hash.clone());
            // At the parent's head, uncommitted work travels too; at an older version, its tree.
            let include_worktree = fork.version.is_none() || Some(at.seq) == parent.head_version;
            // A workflow's tools may write into the parent at any moment: never freeze it then.
            let layered = include_worktree
                && app.config.fork_layers
                && parent_workflow.is_none()
                && fork_layered(app, project_id, &parent.branch_id, branch_id).await?;
            if !layered {
                blocking(move || git::fork(&src, &d, &hash, include_worktree)).await?;
            }
            record.parent_branch_id = Some(parent.branch_id.clone());
            record.fork_version = Some(at.seq);
            inherited = versions.into_iter().filter(|v| v.seq <= at.seq).collect();
        }
    }
    record.head_version = inherited.last().map(|v| v.seq);
    let to_store = record.clone();
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let stored = app
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
            Ok(())
        })
        .await;
    if let Err(e) = stored {
        let (config, p, b, d) = (
            app.config.clone(),
            project_id.to_string(),
            branch_id.to_string(),
            dir.clone(),
        );
        let _ = tokio::task::spawn_blocking(move || remove_branch_dir(&config, &p, &b, &d)).await;
        return Err(e.into());
    }
    crate::registry::refresh_size(&app.store, project_id, branch_id, dir.clone());
    Ok(Created {
        branch: record,
        created: true,
        dir,
    })
}

/// Fork `parent` into `child` as copy-on-write layers. False when that cannot be done now (no
/// overlayfs here, the parent in use, its stack too deep): the caller copies instead.
async fn fork_layered(
    app: &App,
    project_id: &str,
    parent_id: &str,
    child_id: &str,
) -> Result<bool, ApiError> {
    let config = app.config.clone();
    let (p, parent, child) = (
        project_id.to_string(),
        parent_id.to_string(),
        child_id.to_string(),
    );
    let outcome = tokio::task::spawn_blocking(move || {
        let parent_dir = branch_dir(&config, &p, &parent);
        let child_dir = branch_dir(&config, &p, &child);
        layers::Layers::new(&config).fork(&p, (&parent, &parent_dir), (&child, &child_dir))
    })
    .await?;
    match outcome {
        Ok(Ok(())) => {
            for b in [parent_id, child_id] {
                app.syncer.rewatch(&branch_dir(&app.config, project_id, b));
            }
            Ok(true)
        }
        Ok(Err(declined)) => {
            if !matches!(declined, layers::Declined::Unavailable) {
                tracing::info!(project = project_id, branch = child_id, reason = ?declined, "fork copies instead of layering");
            }
            Ok(false)
        }
        Err(e) => {
            tracing::error!(project = project_id, branch = child_id, error = %e, "layered fork failed");
            Err(ApiError::internal(format!("the fork failed: {e}")))
        }
    }
}

/// Delete a branch's directory: unmount a layered branch and drop its own layer of changes, or
/// delete a plain directory. Blocks.
pub fn remove_branch_dir(
    config: &Config,
    project_id: &str,
    branch_id: &str,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    if layers::Layers::new(config).remove_branch(project_id, branch_id, dir)? {
        return Ok(());
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Commit the branch's current tree as a new version. None when nothing changed.
pub async fn commit_version(
    app: &App,
    project_id: &str,
    branch_id: &str,
    message: &str,
    description: Option<String>,
    kind: VersionKind,
    workflow_id: Option<String>,
) -> Result<Option<VersionRecord>, ApiError> {
    let _guard = app.branch_locks.lock(project_id, branch_id).await;
    commit_locked(
        app,
        project_id,
        branch_id,
        message,
        description,
        kind,
        workflow_id,
    )
    .await
}

/// [`commit_version`] for a caller that holds the branch lock.
async fn commit_locked(
    app: &App,
    project_id: &str,
    branch_id: &str,
    message: &str,
    description: Option<String>,
    kind: VersionKind,
    workflow_id: Option<String>,
) -> Result<Option<VersionRecord>, ApiError> {
    let dir = branch_dir(&app.config, project_id, branch_id);
    let msg = message.to_string();
    let Some(commit) = blocking(move || git::commit_all(&dir, &msg, AGENT_AUTHOR)).await? else {
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
    Ok(Some(
        record_version(app, project_id, branch_id, version).await?,
    ))
}

/// Store a version with the next sequence number, move the branch head, and announce it.
async fn record_version(
    app: &App,
    project_id: &str,
    branch_id: &str,
    mut version: VersionRecord,
) -> Result<VersionRecord, ApiError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let v = version.clone();
    let seq = app
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
            let event = crate::app::new_event(
                "version",
                json!({
                    "versionId": version.seq.to_string(),
                    "commitHash": version.commit_hash,
                    "kind": kind_name(version.kind),
                    "message": version.message,
                    "restores": version.restores.map(|s| s.to_string()),
                    "workflowId": version.workflow_id,
                    "changedFiles": version.changed.len(),
                }),
            )
            .map_err(|e| StorageError::Conflict(e.message))?;
            ctx.append(&weldr_storage::StreamKey::new(&p, &b), event)?;
            Ok(version.seq)
        })
        .await?;
    version.seq = seq;
    app.syncer.push_soon(project_id, branch_id);
    crate::registry::refresh_size(
        &app.store,
        project_id,
        branch_id,
        branch_dir(&app.config, project_id, branch_id),
    );
    Ok(version)
}

pub fn kind_name(kind: VersionKind) -> &'static str {
    match kind {
        VersionKind::Checkpoint => "checkpoint",
        VersionKind::Integration => "integration",
        VersionKind::Revert => "revert",
    }
}

/// Restore the tree of version `seq` as a new `revert` version (a later revert is a redo).
/// 409 while a workflow is active on the branch.
pub async fn revert(
    app: &App,
    project_id: &str,
    branch_id: &str,
    seq: u64,
) -> Result<VersionRecord, ApiError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let (active, target) = read(app, move |rtx| {
        Ok((
            model::active_workflow(rtx, &p, &b)?,
            model::get_version(rtx, &p, &b, seq)?,
        ))
    })
    .await?;
    if let Some(workflow_id) = active {
        return Err(ApiError::conflict(
            "branch_busy",
            "a workflow is active on this branch; wait for it or cancel it",
        )
        .with_details(json!({ "workflowId": workflow_id })));
    }
    let target = target.ok_or_else(|| {
        ApiError::not_found(
            "version_not_found",
            format!("version {seq} is not on branch {branch_id}"),
        )
    })?;
    let _guard = app.branch_locks.lock(project_id, branch_id).await;
    // Re-check under the lock: a workflow may have claimed the branch meanwhile.
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    if let Some(workflow_id) = read(app, move |rtx| model::active_workflow(rtx, &p, &b)).await? {
        return Err(
            ApiError::conflict("branch_busy", "a workflow is active on this branch")
                .with_details(json!({ "workflowId": workflow_id })),
        );
    }
    // Uncommitted work is kept as a version of its own before the tree is replaced.
    commit_locked(
        app,
        project_id,
        branch_id,
        "Uncommitted changes before revert",
        None,
        VersionKind::Checkpoint,
        None,
    )
    .await?;
    let dir = branch_dir(&app.config, project_id, branch_id);
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
    record_version(app, project_id, branch_id, version).await
}

/// The diff of version `seq` against its parent commit.
pub async fn version_diff(
    app: &App,
    project_id: &str,
    branch_id: &str,
    seq: u64,
) -> Result<(VersionRecord, Vec<git::FileDiff>), ApiError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let version = read(app, move |rtx| model::get_version(rtx, &p, &b, seq))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "version_not_found",
                format!("version {seq} is not on branch {branch_id}"),
            )
        })?;
    let dir = branch_dir(&app.config, project_id, branch_id);
    let hash = version.commit_hash.clone();
    let diff = blocking(move || git::diff(&dir, &hash)).await?;
    Ok((version, diff))
}

/// A use this recent is not written again: many streams opening on one branch at once share
/// one commit instead of queueing on the branch lock for one fsync each. Capped at half the
/// eviction grace, so that a fresh record still keeps a pass away (see [`ensure_present`]).
fn touch_window(config: &Config) -> u64 {
    (config.eviction_grace.as_millis() as u64 / 2).min(1000)
}

/// Whether `branch`'s recorded use is recent enough not to be written again.
fn recently_touched(config: &Config, branch: &BranchRecord) -> bool {
    now_ms().saturating_sub(branch.last_access_ms) < touch_window(config)
}

/// Record a use of the branch now (unless one was just recorded) and answer its record.
/// Call under the branch lock: every write of `last_access_ms` happens under it, so an
/// eviction pass, which holds the lock from its check to its mark, never has it refreshed
/// behind its back.
async fn touch_locked(
    app: &App,
    project_id: &str,
    branch_id: &str,
    branch: BranchRecord,
) -> Result<BranchRecord, ApiError> {
    if recently_touched(&app.config, &branch) {
        return Ok(branch);
    }
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let branch = app
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
    branch.ok_or_else(|| branch_not_found(project_id, branch_id))
}

/// Record a use of `branch` (for the eviction loop's LRU order) in the background, unless its
/// record, just read by the caller, shows one within the touch window.
pub fn touch(app: &Arc<App>, branch: &BranchRecord) {
    if recently_touched(&app.config, branch) {
        return;
    }
    let (app, p, b) = (
        app.clone(),
        branch.project_id.clone(),
        branch.branch_id.clone(),
    );
    tokio::spawn(async move {
        let _guard = app.branch_locks.lock(&p, &b).await;
        let (p2, b2) = (p.clone(), b.clone());
        let result = match read(&app, move |rtx| model::get_branch(rtx, &p2, &b2)).await {
            Ok(Some(branch)) => touch_locked(&app, &p, &b, branch).await.map(drop),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e.message, "could not record branch access");
        }
    });
}

/// Make sure a branch's directory is here before it is used: an evicted branch is restored from
/// object storage (state `restoring` while it is pulled, then `active`). Also records the use
/// (under the branch lock, unless one was recorded within the touch window), so that an
/// eviction pass never removes a branch that was just handed to a caller.
pub async fn ensure_present(
    app: &App,
    project_id: &str,
    branch_id: &str,
) -> Result<BranchRecord, ApiError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let branch = read(app, move |rtx| model::get_branch(rtx, &p, &b))
        .await?
        .ok_or_else(|| branch_not_found(project_id, branch_id))?;
    ensure_present_from(app, branch).await
}

/// [`ensure_present`] for a caller that has just read the branch's record (the access check
/// does): one read less on every request.
pub async fn ensure_present_from(
    app: &App,
    branch: BranchRecord,
) -> Result<BranchRecord, ApiError> {
    // Owned: `branch` is handed back or read again below.
    let (p, b) = (branch.project_id.clone(), branch.branch_id.clone());
    let (project_id, branch_id) = (p.as_str(), b.as_str());
    if branch.state == BranchState::Active && recently_touched(&app.config, &branch) {
        // Used within the touch window, which is shorter than the eviction grace: a pass that
        // starts now skips the branch, and one under way cannot be (it checked the use under
        // the lock and no use is recorded without it), so it is here without taking the lock.
        mount_if_layered(app, project_id, branch_id).await?;
        return Ok(branch);
    }
    if branch.state != BranchState::Active {
        // Before the lock: a cleanup pass takes other branches' locks.
        crate::evict::ensure_space(app).await?;
    }
    let _guard = app.branch_locks.lock(project_id, branch_id).await;
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let branch = read(app, move |rtx| model::get_branch(rtx, &p, &b))
        .await?
        .ok_or_else(|| branch_not_found(project_id, branch_id))?;
    if branch.state == BranchState::Active {
        mount_if_layered(app, project_id, branch_id).await?;
        return touch_locked(app, project_id, branch_id, branch).await;
    }
    restore_locked(app, project_id, branch_id).await
}

/// A layered branch's overlay is mounted before use (a no-op when it is; one stat for a plain
/// branch).
async fn mount_if_layered(app: &App, project_id: &str, branch_id: &str) -> Result<(), ApiError> {
    layers::mounted_dir(&app.config, project_id, branch_id)
        .await
        .map(drop)
        .map_err(|e| {
            tracing::error!(project = project_id, branch = branch_id, error = %e, "cannot mount a layered branch");
            ApiError::internal(format!("branch {branch_id} cannot be mounted: {e}"))
        })
}

async fn set_state(
    app: &App,
    project_id: &str,
    branch_id: &str,
    state: BranchState,
) -> Result<(), ApiError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    app.store
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

/// Pull an evicted branch back (the caller holds the branch lock).
async fn restore_locked(
    app: &App,
    project_id: &str,
    branch_id: &str,
) -> Result<BranchRecord, ApiError> {
    let snapshot = crate::sync::syncer::state(&app.store, project_id, branch_id)
        .await?
        .snapshot_id;
    set_state(app, project_id, branch_id, BranchState::Restoring).await?;
    // Layers an interrupted eviction left behind go first: the snapshot is the branch now.
    let (config, p, b) = (
        app.config.clone(),
        project_id.to_string(),
        branch_id.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let dir = branch_dir(&config, &p, &b);
        layers::Layers::new(&config).remove_branch(&p, &b, &dir)
    })
    .await?
    .map_err(|e| ApiError::internal(format!("cannot clear the evicted branch's layers: {e}")))?;
    tracing::info!(project = project_id, branch = branch_id, snapshot = ?snapshot, "restoring an evicted branch");
    let pulled = crate::sync::pull(&app.config, project_id, branch_id, snapshot.as_deref()).await;
    let outcome = match pulled {
        Ok(crate::sync::PullReport::Restored {
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
        Ok(crate::sync::PullReport::Skipped { bucket }) => Err(format!(
            "no snapshot of the branch in {bucket}; the object store lost it"
        )),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(fields) => {
            set_state(app, project_id, branch_id, BranchState::Active).await?;
            let _ = app.emit(project_id, branch_id, "sync", fields).await;
            crate::registry::refresh_size(
                &app.store,
                project_id,
                branch_id,
                branch_dir(&app.config, project_id, branch_id),
            );
            let (p, b) = (project_id.to_string(), branch_id.to_string());
            read(app, move |rtx| model::get_branch(rtx, &p, &b))
                .await?
                .ok_or_else(|| branch_not_found(project_id, branch_id))
        }
        Err(error) => {
            tracing::warn!(project = project_id, branch = branch_id, error = %error, "restore failed");
            set_state(app, project_id, branch_id, BranchState::Evicted).await?;
            let _ = app
                .emit(
                    project_id,
                    branch_id,
                    "sync",
                    json!({ "action": "restore", "status": "failed", "error": error }),
                )
                .await;
            Err(ApiError::unavailable(format!(
                "branch {branch_id} is evicted and could not be restored from object storage: {error}; retry later"
            ))
            .with_code("restore_failed"))
        }
    }
}
