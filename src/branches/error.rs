//! What can go wrong with a project, a branch or its versions.

use weldr_storage::StorageError;

use super::layout::BranchKey;
use crate::git::GitError;
use crate::ids::IdError;

#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("project {0} not found")]
    ProjectNotFound(String),
    #[error("branch {} not found in project {}", .0.branch_id, .0.project_id)]
    BranchNotFound(BranchKey),
    #[error("project {0} already exists")]
    ProjectExists(String),
    #[error("branch {0} already exists")]
    BranchExists(String),
    #[error("version {seq} is not on branch {branch}")]
    VersionNotFound { seq: u64, branch: String },
    /// A commit or tree named by a version is missing from the repository.
    #[error("{0} not found")]
    ObjectNotFound(String),
    #[error("the parent branch has no version yet")]
    EmptyParent,
    #[error("a branch cannot fork itself")]
    ForkItself,
    #[error(
        "this machine serves project {own} only; send requests for {requested} to its own machine"
    )]
    WrongMachine { own: String, requested: String },
    #[error("workflow {workflow_id} is active on this branch; wait for it or cancel it")]
    Busy { workflow_id: String },
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("branch {branch} cannot be mounted: {reason}")]
    Mount { branch: String, reason: String },
    #[error("the fork failed: {0}")]
    Fork(String),
    #[error("git failed: {0}")]
    Git(GitError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("a background task failed: {0}")]
    Task(String),
}

impl From<GitError> for BranchError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::NotFound(what) => BranchError::ObjectNotFound(what),
            other => {
                tracing::error!(error = %other, "git failed");
                BranchError::Git(other)
            }
        }
    }
}

impl From<tokio::task::JoinError> for BranchError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "background task failed");
        BranchError::Task(e.to_string())
    }
}
