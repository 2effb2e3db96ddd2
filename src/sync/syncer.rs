//! The background syncer: which branches changed since their last push, and pushing them.
//!
//! Branches are marked dirty in memory (by the shared watcher in [`super::dirty`], after each
//! version, or by a full rescan) and the mark is persisted in redb's `sync_state` table by the
//! syncer loop. A dirty branch is pushed once no change was seen for `SYNC_QUIET_SECONDS` (or at
//! once after a version, or after ten quiet periods of constant change). Every push of a branch,
//! whoever asks for it, goes through [`Syncer::push_branch`]: one push per branch at a time
//! (a per-branch sync lock), its outcome recorded in redb and announced as a `sync` event on the
//! branch stream in the same transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use weldr_storage::model::{self, BranchState, SyncStateRecord};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store, StreamKey};

use super::{PushOptions, PushReport, SyncError};
use crate::base::Base;
use crate::branches::layout::{BranchKey, BranchLocks};
use crate::stream::new_event;
use crate::worker::{Worker, WorkerState};
use tokio_util::sync::CancellationToken;

type Key = BranchKey;

/// Why a push did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("a push of branch {} is running; wait for its `sync` event", .0.branch_id)]
    Running(BranchKey),
    #[error(
        "branch {} is evicted; its last snapshot is in object storage and it is restored on its next use",
        .0.branch_id
    )]
    Evicted(BranchKey),
    #[error("branch {} not found in project {}", .0.branch_id, .0.project_id)]
    BranchNotFound(BranchKey),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Pushes running at once from the background loop.
const PUSH_CONCURRENCY: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Dirty {
    /// First change not yet pushed.
    since: Instant,
    /// Latest change seen.
    last: Instant,
    /// Push without waiting for quiet (a version was just made).
    now: bool,
    /// Not yet written to redb.
    unsaved: bool,
}

/// Who asked for a push (carried in the `sync` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The branch was quiet after changes.
    Background,
    /// A version was committed.
    Version,
    /// `POST .../sync`.
    Api,
    /// Before the directory is evicted.
    Eviction,
    /// The server is stopping.
    Shutdown,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Background => "background",
            Trigger::Version => "version",
            Trigger::Api => "api",
            Trigger::Eviction => "eviction",
            Trigger::Shutdown => "shutdown",
        }
    }
}

/// Dirty marks and per-branch push locks, shared by the watcher, the loop and the API.
pub struct Syncer {
    base: Base,
    dirty: Mutex<HashMap<Key, Dirty>>,
    running: Mutex<HashSet<Key>>,
    locks: BranchLocks,
    wake: tokio::sync::Notify,
    /// The dirty watcher's inbox, to have a directory watched again (see [`Syncer::rewatch`]).
    watcher: Mutex<Option<std::sync::mpsc::Sender<notify::Result<notify::Event>>>>,
}

/// Held while a push of one branch runs; lets `POST .../sync` answer 409 instead of waiting.
struct Running<'a> {
    syncer: &'a Syncer,
    key: Key,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.syncer
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Syncer {
    pub fn new(base: Base) -> Self {
        Self {
            base,
            dirty: Default::default(),
            running: Default::default(),
            locks: Default::default(),
            wake: Default::default(),
            watcher: Default::default(),
        }
    }

    /// A branch directory was mounted anew (a layered fork): its old watches saw the tree
    /// that is now hidden or frozen. Has the watcher walk it again, and marks it dirty.
    pub fn rewatch(&self, dir: &std::path::Path) {
        let event =
            notify::Event::new(notify::EventKind::Create(notify::event::CreateKind::Folder))
                .add_path(dir.to_path_buf());
        if let Some(tx) = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(Ok(event));
        }
    }

    /// Where [`Syncer::rewatch`] sends (set by the dirty watcher when it starts).
    pub(crate) fn set_watcher(&self, tx: std::sync::mpsc::Sender<notify::Result<notify::Event>>) {
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Note a change in a branch directory. Cheap; callable from any thread.
    pub fn mark_dirty(&self, key: &BranchKey) {
        self.mark(key, false);
    }

    /// A version was made: push as soon as possible.
    pub fn push_soon(&self, key: &BranchKey) {
        self.mark(key, true);
    }

    fn mark(&self, key: &BranchKey, now: bool) {
        let at = Instant::now();
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let entry = dirty.entry(key.clone()).or_insert(Dirty {
            since: at,
            last: at,
            now: false,
            unsaved: true,
        });
        entry.last = at;
        entry.now |= now;
        drop(dirty);
        if now {
            self.wake.notify_one();
        }
    }

    pub fn is_dirty(&self, key: &BranchKey) -> bool {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    /// Forget a branch's dirty mark (its directory is gone: evicted).
    pub fn clear(&self, key: &BranchKey) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Every active branch is dirty: after an inotify queue overflow, at startup, or when no
    /// watcher could be had. Blocks on a redb read: call off the async runtime's workers.
    pub fn mark_all_dirty(&self) {
        let branches = self
            .base
            .store
            .begin_read()
            .and_then(|rtx| model::list_all_branches(&rtx));
        match branches {
            Ok(list) => {
                // A branch without a directory (registered, never written) has nothing to push.
                let mut marked = 0;
                for key in list
                    .iter()
                    .filter(|b| b.state == BranchState::Active)
                    .map(|b| BranchKey::new(&b.project_id, &b.branch_id))
                    .filter(|key| self.base.dir(key).is_dir())
                {
                    self.mark_dirty(&key);
                    marked += 1;
                }
                tracing::info!(branches = marked, "full rescan: every branch is dirty");
            }
            Err(e) => tracing::warn!(error = %e, "full rescan: cannot list branches"),
        }
    }

    /// Branches marked dirty in memory, oldest change first.
    pub fn dirty_branches(&self) -> Vec<Key> {
        let dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<(Key, Instant)> =
            dirty.iter().map(|(k, d)| (k.clone(), d.since)).collect();
        list.sort_by_key(|(_, since)| *since);
        list.into_iter().map(|(k, _)| k).collect()
    }

    /// Branches due for a background push now.
    fn due(&self, quiet: Duration) -> Vec<Key> {
        let at = Instant::now();
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        dirty
            .iter()
            .filter(|(k, d)| {
                !running.contains(*k)
                    && (d.now
                        || at.duration_since(d.last) >= quiet
                        || at.duration_since(d.since) >= quiet * 10)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Write new dirty marks to redb (one transaction).
    async fn save_marks(&self) {
        let unsaved: Vec<Key> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            dirty
                .iter_mut()
                .filter(|(_, d)| d.unsaved)
                .map(|(k, d)| {
                    d.unsaved = false;
                    k.clone()
                })
                .collect()
        };
        if unsaved.is_empty() {
            return;
        }
        let marks = unsaved.clone();
        let unknown = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let mut unknown = Vec::new();
                for k in &marks {
                    let (p, b) = (&k.project_id, &k.branch_id);
                    // No registered branch (a directory made by hand), or an evicted one whose
                    // directory is being deleted: nothing to push.
                    let active = model::get_branch_for_update(ctx, p, b)?
                        .is_some_and(|branch| branch.state == BranchState::Active);
                    if !active {
                        unknown.push(k.clone());
                        continue;
                    }
                    let mut state =
                        model::get_sync_state_for_update(ctx, p, b)?.unwrap_or_default();
                    if !state.dirty {
                        state.dirty = true;
                        model::put_sync_state(ctx, p, b, &state)?;
                    }
                }
                Ok(unknown)
            })
            .await;
        match unknown {
            Ok(unknown) => {
                let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                for k in unknown {
                    dirty.remove(&k);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not record dirty branches");
                let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                for k in unsaved {
                    if let Some(d) = dirty.get_mut(&k) {
                        d.unsaved = true;
                    }
                }
            }
        }
    }

    /// Is a push of this branch running now?
    pub fn is_running(&self, key: &BranchKey) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Push a branch now, record the outcome and emit a `sync` event. With `wait` false, a push
    /// of the branch that is already running answers [`PushError::Running`]; with `wait` true
    /// this push waits for it. A branch that is not active answers [`PushError::Evicted`].
    pub async fn push_branch(
        &self,
        key: &BranchKey,
        trigger: Trigger,
        wait: bool,
    ) -> Result<PushReport, PushError> {
        // No git operation (commit, revert, fork) is half done while the push reads the
        // branch. The eviction pass holds this lock already; the order is always this lock,
        // then the push lock.
        let _git = match trigger {
            Trigger::Eviction => None,
            _ => Some(self.base.locks.lock(key).await),
        };
        let _guard = if wait {
            self.locks.lock(key).await
        } else {
            self.locks
                .try_lock(key)
                .ok_or_else(|| PushError::Running(key.clone()))?
        };
        let k = key.clone();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k.clone());
        let _running = Running {
            syncer: self,
            key: k.clone(),
        };

        let (p, b) = (k.project_id.clone(), k.branch_id.clone());
        let branch = self
            .base
            .read(move |rtx| model::get_branch(rtx, &p, &b))
            .await?;
        match branch {
            None => {
                self.clear(key);
                return Err(PushError::BranchNotFound(key.clone()));
            }
            Some(b) if b.state != BranchState::Active => {
                self.clear(key);
                return Err(PushError::Evicted(key.clone()));
            }
            Some(_) => {}
        }

        // Changes seen from here on belong to the next push.
        let taken = self
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&k);
        let result = super::push_with(&self.base.config, key, &PushOptions::default()).await;
        if result.is_err()
            && let Some(mut d) = taken
        {
            // Still dirty: put the mark back (merged with changes seen meanwhile).
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let entry = dirty.entry(k.clone()).or_insert(d);
            d.since = d.since.min(entry.since);
            d.last = d.last.max(entry.last);
            d.now = false;
            d.unsaved = false;
            *entry = d;
        }
        self.record(key, trigger, &result).await;
        match result {
            Ok(report) => {
                tracing::info!(
                    branch = %key,
                    trigger = trigger.as_str(),
                    snapshot = %report.snapshot_id,
                    unchanged = report.unchanged,
                    uploaded_bytes = report.uploaded_bytes,
                    "pushed"
                );
                Ok(report)
            }
            Err(e) => {
                tracing::warn!(branch = %key, trigger = trigger.as_str(), error = %e, "push failed");
                Err(e.into())
            }
        }
    }

    /// Persist the outcome of a push and announce it, in one transaction.
    async fn record(
        &self,
        key: &BranchKey,
        trigger: Trigger,
        result: &Result<PushReport, SyncError>,
    ) {
        let at = now_ms();
        let mut fields = match result {
            Ok(report) => {
                let mut v = serde_json::to_value(report).unwrap_or_else(|_| json!({}));
                v["status"] = "success".into();
                v
            }
            Err(e) => json!({ "status": "failed", "error": e.to_string() }),
        };
        fields["action"] = "push".into();
        fields["trigger"] = trigger.as_str().into();
        let Ok(event) = new_event("sync", fields) else {
            return;
        };
        let outcome: Result<PushReport, String> = match result {
            Ok(r) => Ok(r.clone()),
            Err(e) => Err(e.to_string()),
        };
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        // Changes seen during the push keep the branch dirty.
        let dirty_now = self.is_dirty(key);
        let written = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let mut state = model::get_sync_state_for_update(ctx, &p, &b)?.unwrap_or_default();
                match &outcome {
                    Ok(r) => {
                        state.snapshot_id = Some(r.snapshot_id.clone());
                        state.last_sync_ms = Some(at);
                        state.files = r.files;
                        state.bytes = r.bytes;
                        state.uploaded_bytes = r.uploaded_bytes;
                        state.duration_ms = r.duration_ms;
                        state.last_error = None;
                        state.last_error_ms = None;
                        state.dirty = dirty_now;
                    }
                    Err(e) => {
                        state.last_error = Some(e.clone());
                        state.last_error_ms = Some(at);
                        state.dirty = true;
                    }
                }
                model::put_sync_state(ctx, &p, &b, &state)?;
                ctx.append(&StreamKey::new(&p, &b), event.clone())?;
                Ok(())
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record a push");
        }
    }

    /// Push every dirty branch (the server is stopping). The caller bounds the time.
    pub async fn flush(&self) {
        // A push under way took its branch's mark: it is pushed again after it (and waits for
        // it), so that the runtime never stops in the middle of the only push of a change.
        let mut list = self.dirty_branches();
        let running: Vec<Key> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for k in running {
            if !list.contains(&k) {
                list.push(k);
            }
        }
        if list.is_empty() {
            return;
        }
        tracing::info!(
            branches = list.len(),
            "pushing dirty branches before stopping"
        );
        let pushes = list.into_iter().map(|key| async move {
            let _ = self.push_branch(&key, Trigger::Shutdown, true).await;
        });
        futures_util::StreamExt::collect::<Vec<()>>(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(pushes),
            PUSH_CONCURRENCY,
        ))
        .await;
    }
}

/// A branch's sync state as stored (default when never synced).
pub async fn state(store: &Store, key: &BranchKey) -> Result<SyncStateRecord, StorageError> {
    let (p, b) = (key.project_id.clone(), key.branch_id.clone());
    store
        .read(move |s| Ok(model::get_sync_state(&s.begin_read()?, &p, &b)?.unwrap_or_default()))
        .await
}

/// The syncer as a [`Worker`]: saves new dirty marks to redb and starts pushes of branches that
/// are due (quiet, or with a new version), at most [`PUSH_CONCURRENCY`] at once.
pub struct SyncWorker {
    syncer: Arc<Syncer>,
    permits: Arc<tokio::sync::Semaphore>,
    tick: Duration,
    quiet: Duration,
}

impl SyncWorker {
    pub fn new(syncer: Arc<Syncer>) -> Self {
        let quiet = syncer.base.config.sync_quiet;
        Self {
            syncer,
            permits: Arc::new(tokio::sync::Semaphore::new(PUSH_CONCURRENCY)),
            tick: (quiet / 2).clamp(Duration::from_millis(200), Duration::from_secs(1)),
            quiet,
        }
    }
}

#[async_trait::async_trait]
impl Worker for SyncWorker {
    fn name(&self) -> &'static str {
        "syncer"
    }

    fn detail(&self) -> Option<String> {
        let dirty = self
            .syncer
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        let pushing = self
            .syncer
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        Some(format!("{dirty} dirty, {pushing} pushing"))
    }

    async fn work(&mut self, _shutdown: &CancellationToken) -> Result<WorkerState, String> {
        let syncer = &self.syncer;
        syncer.save_marks().await;
        for key in syncer.due(self.quiet) {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let trigger = if syncer
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_some_and(|d| d.now)
            {
                Trigger::Version
            } else {
                Trigger::Background
            };
            syncer
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            let syncer = syncer.clone();
            // Detached: a push is not cut short by shutdown; `flush` waits for it instead.
            tokio::spawn(async move {
                let _permit = permit;
                match syncer.push_branch(&key, trigger, true).await {
                    Ok(_) | Err(PushError::Evicted(_)) | Err(PushError::BranchNotFound(_)) => {}
                    // Retry after another quiet period, not in a tight loop.
                    Err(_) => syncer.mark_dirty(&key),
                }
            });
        }
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        tokio::select! {
            _ = self.syncer.wake.notified() => {}
            _ = tokio::time::sleep(self.tick) => {}
        }
    }
}
