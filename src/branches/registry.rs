//! The project and branch registry in redb: what exists, and when it was last used.

use weldr_storage::model::{self, BranchRecord, BranchState, ProjectRecord};
use weldr_storage::writer::now_ms;
use weldr_storage::{StorageError, Store};

use super::error::BranchError;
use super::layout::BranchKey;

/// Register a project; [`BranchError::ProjectExists`] if it exists.
pub async fn create_project(
    store: &Store,
    project_id: &str,
    title: Option<String>,
    owner: Option<String>,
) -> Result<ProjectRecord, BranchError> {
    let record = ProjectRecord {
        project_id: project_id.to_string(),
        title,
        owner,
        created_at_ms: now_ms(),
    };
    let to_insert = record.clone();
    store
        .writer()
        .write(move |ctx| model::insert_project(ctx, &to_insert))
        .await
        .map_err(|e| match e {
            StorageError::AlreadyExists(_) => BranchError::ProjectExists(project_id.to_string()),
            other => other.into(),
        })?;
    Ok(record)
}

/// Register a branch record (no directory). Returns the record and whether it was new.
pub async fn register_branch(
    store: &Store,
    project_id: &str,
    branch_id: &str,
    parent: Option<(String, Option<u64>)>,
) -> Result<(BranchRecord, bool), BranchError> {
    let (p, b) = (project_id.to_string(), branch_id.to_string());
    let result = store
        .writer()
        .write(move |ctx| {
            if !model::project_exists_for_update(ctx, &p)? {
                return Err(StorageError::NotFound(format!("project {p}")));
            }
            if let Some(existing) = model::get_branch_for_update(ctx, &p, &b)? {
                return Ok((existing, false));
            }
            let mut record =
                super::new_record(&BranchKey::new(&p, &b), BranchState::Active, now_ms());
            record.parent_branch_id = parent.as_ref().map(|(id, _)| id.clone());
            record.fork_version = parent.as_ref().and_then(|(_, v)| *v);
            model::put_branch(ctx, &record)?;
            Ok((record, true))
        })
        .await;
    result.map_err(|e| match e {
        StorageError::NotFound(_) => BranchError::ProjectNotFound(project_id.to_string()),
        other => other.into(),
    })
}

/// The branch, or the error naming whichever of project and branch is missing.
pub async fn require_branch(store: &Store, key: &BranchKey) -> Result<BranchRecord, BranchError> {
    let (p, b) = (key.project_id.clone(), key.branch_id.clone());
    let found = store
        .read(move |s| model::get_project_and_branch(&s.begin_read()?, &p, &b))
        .await?;
    match found {
        (None, _) => Err(BranchError::ProjectNotFound(key.project_id.clone())),
        (Some(_), None) => Err(BranchError::BranchNotFound(key.clone())),
        (Some(_), Some(branch)) => Ok(branch),
    }
}

/// Bytes a directory occupies on disk (allocated blocks, each inode counted once, so objects
/// hard-linked between forks count once per walk). Blocks; call off the runtime.
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Measure a branch directory in the background and record its size (for `GET` branch and the
/// eviction loop). Best effort: never delays the caller.
pub fn refresh_size(store: &Store, key: &BranchKey, dir: std::path::PathBuf) {
    let (store, p, b) = (store.clone(), key.project_id.clone(), key.branch_id.clone());
    tokio::spawn(async move {
        let Ok(size) = tokio::task::spawn_blocking(move || disk_usage(&dir)).await else {
            return;
        };
        let result = store
            .writer()
            .write(move |ctx| {
                if let Some(mut branch) = model::get_branch_for_update(ctx, &p, &b)? {
                    branch.size_bytes = size;
                    model::put_branch(ctx, &branch)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not record branch size");
        }
    });
}
