//! Versions as git commits, in each branch's own repository (libgit2, vendored: the binary needs
//! no system git). Everything here blocks: callers run it in `spawn_blocking`.
//!
//! * [`init_branch`]: a repository with an initial empty commit on `main`.
//! * [`commit_all`]: stage the whole work tree (honouring `.gitignore`) and commit.
//! * [`restore_tree`]: a new commit whose tree is exactly an earlier (or later) commit's tree;
//!   the work tree and index follow. History is kept, so restoring forward is a redo.
//! * [`diff`]: what a commit changed against its first parent.
//! * [`fork`]: a new branch directory from another at a commit, sharing git's immutable object
//!   files by hard link (as `git clone --local` does) and copying the work tree with reflinks
//!   where the filesystem has them, in parallel otherwise.

pub mod copy;

use std::path::Path;

use git2::{
    Commit, DiffOptions, IndexAddOption, Repository, RepositoryInitOptions, Signature, Tree,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |source| GitError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone)]
pub struct CommitInfo {
    pub hash: String,
    pub changed: Vec<FileChange>,
}

/// One file of a diff.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileDiff {
    pub path: String,
    pub kind: ChangeKind,
    pub binary: bool,
    /// Unified diff for text files (empty for binary ones).
    pub patch: String,
    pub truncated: bool,
}

/// Largest patch text returned per file.
pub const MAX_PATCH_BYTES: usize = 256 * 1024;

fn signature(author: &str) -> Result<Signature<'static>, GitError> {
    Ok(Signature::now(author, "agent@weldr.local")?)
}

fn open(dir: &Path) -> Result<Repository, GitError> {
    Repository::open(dir)
        .map_err(|e| GitError::NotFound(format!("repository {}: {}", dir.display(), e.message())))
}

fn head_commit(repo: &Repository) -> Result<Commit<'_>, GitError> {
    Ok(repo.head()?.peel_to_commit()?)
}

/// Parse a full or abbreviated (≥ 7) hex commit id and find it.
fn find_commit<'r>(repo: &'r Repository, hash: &str) -> Result<Commit<'r>, GitError> {
    if hash.len() < 7 || hash.len() > 40 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(GitError::Invalid(format!("{hash:?} is not a commit id")));
    }
    let object = repo
        .revparse_single(hash)
        .map_err(|_| GitError::NotFound(format!("commit {hash}")))?;
    object
        .peel_to_commit()
        .map_err(|_| GitError::NotFound(format!("commit {hash}")))
}

fn changes(repo: &Repository, old: Option<&Tree>, new: &Tree) -> Result<Vec<FileChange>, GitError> {
    let diff = repo.diff_tree_to_tree(old, Some(new), None)?;
    let mut out = Vec::new();
    for delta in diff.deltas() {
        let kind = match delta.status() {
            git2::Delta::Added | git2::Delta::Copied | git2::Delta::Untracked => ChangeKind::Added,
            git2::Delta::Deleted => ChangeKind::Deleted,
            _ => ChangeKind::Modified,
        };
        let file = if kind == ChangeKind::Deleted {
            delta.old_file()
        } else {
            delta.new_file()
        };
        let path = file
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(FileChange { path, kind });
    }
    Ok(out)
}

/// Create `dir` as a repository on `main` with an initial empty commit; an existing repository
/// is reused as it is. Returns its head.
pub fn init_branch(dir: &Path, author: &str) -> Result<CommitInfo, GitError> {
    if let Ok(repo) = Repository::open(dir) {
        let head = head_commit(&repo)?;
        return Ok(CommitInfo {
            hash: head.id().to_string(),
            changed: Vec::new(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut opts = RepositoryInitOptions::new();
    opts.initial_head("main").no_reinit(true);
    let repo = Repository::init_opts(dir, &opts)?;
    let tree_id = repo.index()?.write_tree()?;
    let tree = repo.find_tree(tree_id)?;
    let sig = signature(author)?;
    let oid = repo.commit(Some("HEAD"), &sig, &sig, "Initial commit", &tree, &[])?;
    Ok(CommitInfo {
        hash: oid.to_string(),
        changed: Vec::new(),
    })
}

/// Stage everything (additions, modifications, deletions, modes, symlinks; `.gitignore`
/// honoured) and commit on HEAD. None when the tree did not change.
pub fn commit_all(dir: &Path, message: &str, author: &str) -> Result<Option<CommitInfo>, GitError> {
    let repo = open(dir)?;
    let mut index = repo.index()?;
    index.add_all(["*"].iter(), IndexAddOption::DEFAULT, None)?;
    index.update_all(["*"].iter(), None)?;
    index.write()?;
    let tree_id = index.write_tree()?;
    let parent = head_commit(&repo)?;
    if parent.tree_id() == tree_id {
        return Ok(None);
    }
    let tree = repo.find_tree(tree_id)?;
    let changed = changes(&repo, Some(&parent.tree()?), &tree)?;
    let sig = signature(author)?;
    let oid = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&parent])?;
    Ok(Some(CommitInfo {
        hash: oid.to_string(),
        changed,
    }))
}

/// Whether the work tree differs from HEAD (ignored files aside).
pub fn is_dirty(dir: &Path) -> Result<bool, GitError> {
    let repo = open(dir)?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    Ok(!repo.statuses(Some(&mut opts))?.is_empty())
}

/// A new commit on HEAD whose tree is exactly the tree of `hash` (reachable from HEAD); the
/// work tree and index are made equal to it: files added since are removed, deleted ones come
/// back, modes and symlinks are as they were. Ignored files are left alone.
pub fn restore_tree(
    dir: &Path,
    hash: &str,
    message: &str,
    author: &str,
) -> Result<CommitInfo, GitError> {
    let repo = open(dir)?;
    let target = find_commit(&repo, hash)?;
    let head = head_commit(&repo)?;
    if target.id() != head.id() && !repo.graph_descendant_of(head.id(), target.id())? {
        return Err(GitError::NotFound(format!("commit {hash} on this branch")));
    }
    let tree = target.tree()?;
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout
        .force()
        .remove_untracked(true)
        .remove_ignored(false);
    repo.checkout_tree(tree.as_object(), Some(&mut checkout))?;
    let mut index = repo.index()?;
    index.read_tree(&tree)?;
    index.write()?;
    remove_empty_dirs(dir)?;
    let changed = changes(&repo, Some(&head.tree()?), &tree)?;
    let sig = signature(author)?;
    let oid = repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head])?;
    Ok(CommitInfo {
        hash: oid.to_string(),
        changed,
    })
}

/// Remove directories left empty under `dir` (not `.git`): a tree has no empty directories.
fn remove_empty_dirs(dir: &Path) -> Result<(), GitError> {
    fn walk(path: &Path, top: bool) -> std::io::Result<bool> {
        let mut empty = true;
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() && !(top && entry.file_name() == ".git") {
                if walk(&entry.path(), false)? {
                    std::fs::remove_dir(entry.path())?;
                } else {
                    empty = false;
                }
            } else {
                empty = false;
            }
        }
        Ok(empty)
    }
    walk(dir, true).map(|_| ()).map_err(io_err(dir))
}

/// What `hash` changed against its first parent, with patches for text files.
pub fn diff(dir: &Path, hash: &str) -> Result<Vec<FileDiff>, GitError> {
    let repo = open(dir)?;
    let commit = find_commit(&repo, hash)?;
    let tree = commit.tree()?;
    let parent_tree = match commit.parent(0) {
        Ok(parent) => Some(parent.tree()?),
        Err(_) => None,
    };
    let mut opts = DiffOptions::new();
    opts.context_lines(3);
    let diff = repo.diff_tree_to_tree(parent_tree.as_ref(), Some(&tree), Some(&mut opts))?;
    let mut out = Vec::new();
    for (i, delta) in diff.deltas().enumerate() {
        let kind = match delta.status() {
            git2::Delta::Added => ChangeKind::Added,
            git2::Delta::Deleted => ChangeKind::Deleted,
            _ => ChangeKind::Modified,
        };
        let file = if kind == ChangeKind::Deleted {
            delta.old_file()
        } else {
            delta.new_file()
        };
        let path = file
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut patch_text = String::new();
        let mut binary = delta.flags().is_binary();
        if let Some(mut patch) = git2::Patch::from_diff(&diff, i)? {
            binary |= patch.delta().flags().is_binary();
            if !binary {
                let buf = patch.to_buf()?;
                patch_text = String::from_utf8_lossy(&buf).into_owned();
            }
        }
        let truncated = patch_text.len() > MAX_PATCH_BYTES;
        if truncated {
            let mut cut = MAX_PATCH_BYTES;
            while !patch_text.is_char_boundary(cut) {
                cut -= 1;
            }
            patch_text.truncate(cut);
        }
        out.push(FileDiff {
            path,
            kind,
            binary,
            patch: if binary { String::new() } else { patch_text },
            truncated,
        });
    }
    Ok(out)
}

/// Commits from HEAD along first parents: (hash, summary, time in seconds).
pub fn log(dir: &Path, limit: usize) -> Result<Vec<(String, String, i64)>, GitError> {
    let repo = open(dir)?;
    let mut walk = repo.revwalk()?;
    walk.push_head()?;
    walk.simplify_first_parent()?;
    let mut out = Vec::new();
    for oid in walk.take(limit) {
        let commit = repo.find_commit(oid?)?;
        out.push((
            commit.id().to_string(),
            String::from_utf8_lossy(commit.message_bytes())
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            commit.time().seconds(),
        ));
    }
    Ok(out)
}

/// Create `dst` as a new branch from `src` at commit `hash`.
///
/// The object database is shared by hard links (git never rewrites an object file, so this is
/// safe, and the fork does not depend on `src` surviving). With `include_worktree` (forking at
/// the parent's head) the parent's work tree is copied as it is, uncommitted and untracked
/// files included, except the sync exclude list; its index comes along so `git status` is
/// immediately right. Otherwise the work tree is checked out from `hash`.
pub fn fork(src: &Path, dst: &Path, hash: &str, include_worktree: bool) -> Result<(), GitError> {
    let src_repo = open(src)?;
    let target = find_commit(&src_repo, hash)?.id();
    if dst.exists()
        && std::fs::read_dir(dst)
            .map_err(io_err(dst))?
            .next()
            .is_some()
    {
        return Err(GitError::Invalid(format!(
            "{} exists and is not empty",
            dst.display()
        )));
    }
    let result = (|| {
        std::fs::create_dir_all(dst).map_err(io_err(dst))?;
        let mut opts = RepositoryInitOptions::new();
        opts.initial_head("main").no_reinit(true);
        let repo = Repository::init_opts(dst, &opts)?;
        copy::link_tree(
            &src_repo.path().join("objects"),
            &repo.path().join("objects"),
        )?;
        repo.reference("refs/heads/main", target, true, "fork")?;
        repo.set_head("refs/heads/main")?;
        if include_worktree {
            copy::copy_worktree(src, dst, &crate::excludes::Excludes::for_dir(src))?;
            let index = src_repo.path().join("index");
            if index.exists() {
                std::fs::copy(&index, repo.path().join("index")).map_err(io_err(&index))?;
            }
        } else {
            let tree = repo.find_commit(target)?.tree()?;
            let mut checkout = git2::build::CheckoutBuilder::new();
            checkout.force();
            repo.checkout_tree(tree.as_object(), Some(&mut checkout))?;
            let mut index = repo.index()?;
            index.read_tree(&tree)?;
            index.write()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dst);
    }
    result
}

/// The id of HEAD.
pub fn head(dir: &Path) -> Result<String, GitError> {
    Ok(head_commit(&open(dir)?)?.id().to_string())
}
