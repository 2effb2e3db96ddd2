//! Dirty tracking: one inotify watcher (through `notify`) for every branch directory.
//!
//! A user has only 128 inotify instances, so the whole workspace shares one watcher, owned by a
//! dedicated thread. Directories are watched one by one (non-recursive watches), which lets the
//! thread skip what the syncer skips anyway (`node_modules`, `.next`, `.weldrignore` patterns):
//! watches on those would cost kernel memory and bring events that never matter. An event's path
//! names its branch (`{base}/{projectId}/{branchId}/...` locally, `{base}/{branchId}/...` in cloud
//! mode); the branch is marked dirty in the [`Syncer`](super::syncer::Syncer). Reads (open
//! events) are ignored, so a push never makes its own branch dirty. A queue overflow (`Rescan`)
//! marks every branch dirty.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::base::Base;
use crate::branches::layout::BranchKey;
use crate::config::{Config, Mode};
use crate::excludes::Excludes;
use crate::ids::is_valid_id;
use crate::sync::syncer::Syncer;
use crate::worker::{Worker, WorkerState};

/// Where a path is in the workspace.
#[derive(Debug, PartialEq, Eq)]
pub enum Place {
    /// A project directory (local mode): it holds branch directories.
    Project(String),
    /// Inside (or the root of) a branch directory; `rel` is relative to the branch root.
    Branch {
        project_id: String,
        branch_id: String,
        rel: PathBuf,
    },
}

/// Map a path under `WORKSPACE_BASE` to its project or branch. None for the base itself, the
/// data and object-store directories, and names that are no valid ids (staging directories of
/// a pull start with a dot).
pub fn locate(config: &Config, path: &Path) -> Option<Place> {
    if path.starts_with(&config.data_dir) || path.starts_with(&config.object_store_dir) {
        return None;
    }
    let rel = path.strip_prefix(&config.workspace_base).ok()?;
    let mut parts = rel.components();
    let mut next_id = || match parts.next() {
        Some(Component::Normal(name)) => name.to_str().filter(|n| is_valid_id(n)).map(String::from),
        _ => None,
    };
    let (project_id, branch_id) = match config.mode {
        Mode::Local => {
            let project_id = next_id()?;
            match next_id() {
                Some(branch_id) => (project_id, branch_id),
                None if rel.components().count() == 1 => return Some(Place::Project(project_id)),
                None => return None,
            }
        }
        Mode::Cloud => (config.project_id.clone()?, next_id()?),
    };
    Some(Place::Branch {
        project_id,
        branch_id,
        rel: parts.as_path().to_path_buf(),
    })
}

/// The watcher thread's state.
struct Tracker {
    base: Base,
    syncer: Arc<Syncer>,
    watcher: RecommendedWatcher,
    excludes: HashMap<PathBuf, Excludes>,
}

impl Tracker {
    fn branch_root(&self, project_id: &str, branch_id: &str) -> PathBuf {
        self.base.dir(&BranchKey::new(project_id, branch_id))
    }

    fn is_excluded(&mut self, root: &Path, rel: &Path, is_dir: bool) -> bool {
        if rel.as_os_str().is_empty() {
            return false;
        }
        self.excludes
            .entry(root.to_path_buf())
            .or_insert_with(|| Excludes::for_dir(root))
            .is_excluded(rel, is_dir)
    }

    fn watch_one(&mut self, dir: &Path) {
        if let Err(e) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
            // The directory may be gone already; anything else is worth a line in the log.
            if dir.exists() {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
    }

    /// Watch `dir` (inside the branch at `root`) and every directory below it that the syncer
    /// does not exclude.
    fn watch_tree(&mut self, root: &Path, dir: &Path) {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            self.watch_one(&dir);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                if !self.is_excluded(root, &rel, true) {
                    stack.push(path);
                }
            }
        }
    }

    /// Watch a project directory and the branches in it (local mode); answers the branches.
    fn watch_project(&mut self, dir: &Path) -> Vec<(String, String)> {
        self.watch_one(dir);
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Some(Place::Branch {
                project_id,
                branch_id,
                ..
            }) = locate(&self.base.config, &path)
            {
                self.watch_tree(&path, &path);
                found.push((project_id, branch_id));
            }
        }
        found
    }

    /// Watch the whole workspace.
    fn watch_all(&mut self) {
        let base = self.base.config.workspace_base.clone();
        if let Err(e) = std::fs::create_dir_all(&base) {
            tracing::warn!(dir = %base.display(), error = %e, "cannot create the workspace");
        }
        self.watch_one(&base);
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            match locate(&self.base.config, &path) {
                Some(Place::Project(_)) => {
                    self.watch_project(&path);
                }
                Some(Place::Branch { .. }) => self.watch_tree(&path, &path),
                None => {}
            }
        }
    }

    fn handle(&mut self, event: Event) {
        if event.need_rescan() {
            tracing::warn!("inotify queue overflowed: every branch is treated as changed");
            self.syncer.mark_all_dirty();
            self.excludes.clear();
            self.watch_all();
            return;
        }
        // Opening and reading files (a push, a grep) changes nothing.
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for path in &event.paths {
            let Some(place) = locate(&self.base.config, path) else {
                continue;
            };
            let is_dir = std::fs::symlink_metadata(path)
                .map(|m| m.is_dir())
                .unwrap_or(matches!(
                    event.kind,
                    EventKind::Remove(notify::event::RemoveKind::Folder)
                ));
            match place {
                Place::Project(_) => {
                    // Branches made in it before its watch began are new: push them.
                    if is_dir {
                        for (p, b) in self.watch_project(path) {
                            self.syncer.mark_dirty(&BranchKey::new(p, b));
                        }
                    }
                }
                Place::Branch {
                    project_id,
                    branch_id,
                    rel,
                } => {
                    let root = self.branch_root(&project_id, &branch_id);
                    if rel == Path::new(".weldrignore") {
                        self.excludes.remove(&root);
                    }
                    if self.is_excluded(&root, &rel, is_dir) {
                        continue;
                    }
                    if is_dir && matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_)) {
                        self.watch_tree(&root, path);
                    }
                    self.syncer
                        .mark_dirty(&BranchKey::new(project_id, branch_id));
                }
            }
        }
    }
}

/// The running watcher thread; it stops when the server shuts down.
pub struct DirtyWatcher {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirtyWatcher {
    /// Start watching the workspace. Without an inotify instance, answers a [`Rescan`] worker
    /// instead, which marks every branch dirty every ten quiet periods, so nothing goes
    /// unpushed; the caller runs it.
    pub fn start(base: Base, syncer: Arc<Syncer>) -> (Self, Option<Rescan>) {
        let (tx, rx) = mpsc::channel::<notify::Result<Event>>();
        syncer.set_watcher(tx.clone());
        let watcher = match notify::recommended_watcher(tx) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "no inotify watcher (raise fs.inotify.max_user_instances); falling back to periodic full rescans");
                let every = base.config.sync_quiet * 10;
                return (Self { thread: None }, Some(Rescan { syncer, every }));
            }
        };
        let shutdown = base.shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-watcher".into())
            .spawn(move || {
                let mut tracker = Tracker {
                    base,
                    syncer,
                    watcher,
                    excludes: HashMap::new(),
                };
                tracker.watch_all();
                while !shutdown.is_cancelled() {
                    match rx.recv_timeout(Duration::from_millis(250)) {
                        Ok(Ok(event)) => tracker.handle(event),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "watcher error: every branch is treated as changed");
                            tracker.syncer.mark_all_dirty();
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        match thread {
            Ok(t) => (Self { thread: Some(t) }, None),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the watcher thread");
                (Self { thread: None }, None)
            }
        }
    }

    /// Wait for the thread to end (after the shutdown token is cancelled). Blocks.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Periodic full rescans, where no watcher could be had.
pub struct Rescan {
    syncer: Arc<Syncer>,
    every: Duration,
}

#[async_trait::async_trait]
impl Worker for Rescan {
    fn name(&self) -> &'static str {
        "rescan"
    }

    async fn work(
        &mut self,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<WorkerState, String> {
        let syncer = self.syncer.clone();
        tokio::task::spawn_blocking(move || syncer.mark_all_dirty())
            .await
            .map_err(|e| format!("the rescan failed: {e}"))?;
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        tokio::time::sleep(self.every).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_branches() {
        let mut local = Config::for_workspace(Path::new("/ws"));
        local.object_store_dir = PathBuf::from("/ws/.weldr-objects");
        let b = |p: &str, b: &str, rel: &str| {
            Some(Place::Branch {
                project_id: p.into(),
                branch_id: b.into(),
                rel: rel.into(),
            })
        };
        assert_eq!(
            locate(&local, Path::new("/ws/p1/main/src/a.rs")),
            b("p1", "main", "src/a.rs")
        );
        assert_eq!(
            locate(&local, Path::new("/ws/p1/main")),
            b("p1", "main", "")
        );
        assert_eq!(
            locate(&local, Path::new("/ws/p1")),
            Some(Place::Project("p1".into()))
        );
        assert_eq!(locate(&local, Path::new("/ws")), None);
        assert_eq!(
            locate(&local, Path::new("/ws/.weldr-agent/state.redb")),
            None
        );
        assert_eq!(locate(&local, Path::new("/ws/.weldr-objects/x/y")), None);
        assert_eq!(
            locate(&local, Path::new("/ws/p1/.main.weldr-pull-ab/f1")),
            None
        );
        assert_eq!(locate(&local, Path::new("/elsewhere/p1/main")), None);

        let mut cloud = local.clone();
        cloud.mode = Mode::Cloud;
        cloud.project_id = Some("proj".into());
        assert_eq!(
            locate(&cloud, Path::new("/ws/main/.git/HEAD")),
            b("proj", "main", ".git/HEAD")
        );
        assert_eq!(locate(&cloud, Path::new("/ws/.main.weldr-pull-ab")), None);
    }
}
