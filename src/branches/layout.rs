//! Where a branch lives: the `(projectId, branchId)` key every layer names branches by, its
//! directory, and the per-branch lock that serialises git work, pushes and evictions on it.
//! A leaf: it uses only the configuration.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::{Config, Mode};

/// One branch of one project. Both ids are validated ([`crate::ids`]) before a key is made
/// from request input; a key is what paths, locks and stream keys are derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    pub project_id: String,
    pub branch_id: String,
}

impl BranchKey {
    pub fn new(project_id: impl Into<String>, branch_id: impl Into<String>) -> Self {
        Self {
            project_id: project_id.into(),
            branch_id: branch_id.into(),
        }
    }

    /// The branch's event stream.
    pub fn stream(&self) -> weldr_storage::StreamKey {
        weldr_storage::StreamKey::new(&self.project_id, &self.branch_id)
    }

    /// Another branch of the same project.
    pub fn sibling(&self, branch_id: &str) -> Self {
        Self::new(self.project_id.clone(), branch_id)
    }
}

impl fmt::Display for BranchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.project_id, self.branch_id)
    }
}

/// `{base}/{project}/{branch}` locally, `{base}/{branch}` in cloud mode (one project).
pub fn branch_dir(config: &Config, key: &BranchKey) -> PathBuf {
    match config.mode {
        Mode::Local => config
            .workspace_base
            .join(&key.project_id)
            .join(&key.branch_id),
        Mode::Cloud => config.workspace_base.join(&key.branch_id),
    }
}

type LockMap = HashMap<BranchKey, Arc<tokio::sync::Mutex<()>>>;

/// One async lock per branch. Taken by every git operation (commit, revert, fork), by a push
/// (before its own push lock) and by an eviction pass from its check to its mark.
#[derive(Default)]
pub struct BranchLocks {
    locks: Mutex<LockMap>,
}

impl BranchLocks {
    fn get(&self, key: &BranchKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.clone()).or_default().clone()
    }

    pub async fn lock(&self, key: &BranchKey) -> tokio::sync::OwnedMutexGuard<()> {
        self.get(key).lock_owned().await
    }

    /// The lock if nobody holds it now.
    pub fn try_lock(&self, key: &BranchKey) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.get(key).try_lock_owned().ok()
    }
}
