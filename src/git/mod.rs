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

/// Open the branch's own repository, `{dir}/.git`, with `dir` as its work tree whatever its
/// config says. The repository is the agent's to write, so nothing in it may move git's work
/// (the work tree, another git directory, shared objects) or make git read or run something
/// outside: `.git` must be a directory (not a symlink, not a `gitdir:` file), no `commondir`
/// or object alternates, no parent directory is searched, and [`sanitize_repo_config`] strips
/// the config keys that redirect git before libgit2 reads the file.
///
/// Left open: a process of the agent that rewrites `.git/config` between the strip and
/// libgit2's read wins that race; the work tree stays pinned and includes are the most it gets.
fn open(dir: &Path) -> Result<Repository, GitError> {
    let not_found =
        |why: String| GitError::NotFound(format!("repository {}: {why}", dir.display()));
    let git_dir = dir.join(".git");
    match std::fs::symlink_metadata(&git_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(GitError::Invalid(format!(
                "{} is not a directory; the branch's repository must live in its own .git",
                git_dir.display()
            )));
        }
        Err(e) => return Err(not_found(e.to_string())),
    }
    sanitize_repo_config(&git_dir)?;
    for redirect in ["commondir", "objects/info/alternates"] {
        if std::fs::symlink_metadata(git_dir.join(redirect)).is_ok() {
            return Err(GitError::Invalid(format!(
                "{} has .git/{redirect}, which points git at another repository; remove it",
                dir.display()
            )));
        }
    }
    let repo = Repository::open_ext(
        dir,
        git2::RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&std::ffi::OsStr>(),
    )
    .map_err(|e| not_found(e.message().to_string()))?;
    let real = |p: &Path| std::fs::canonicalize(p).ok();
    if real(repo.path()).is_none() || real(repo.path()) != real(&git_dir) {
        return Err(GitError::Invalid(format!(
            "{} opened as {}; the branch's repository must be its own .git",
            dir.display(),
            repo.path().display()
        )));
    }
    repo.set_workdir(dir, false)?;
    Ok(repo)
}

/// The config a repository gets when its own cannot be read safely (a link, not a file, too
/// big, not parseable).
const MINIMAL_CONFIG: &[u8] = b"[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n";

/// Largest `.git/config` read; anything bigger is replaced by [`MINIMAL_CONFIG`].
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Strip the keys [`sanitize_config`] refuses from `{git_dir}/config`, in place (a new file
/// renamed over it, only when something changed). A `config` that is a symlink or no regular
/// file is replaced by a minimal one: libgit2 would follow it.
pub fn sanitize_repo_config(git_dir: &Path) -> Result<(), GitError> {
    use crate::fsx::{Dir, Kind};
    use std::io::Read;
    let dir = Dir::open(git_dir).map_err(io_err(git_dir))?;
    let path = git_dir.join("config");
    let stat = dir.stat("config").map_err(io_err(&path))?;
    let (new, mode) = match stat {
        None => return Ok(()),
        Some(st) if st.kind == Kind::File && st.size <= MAX_CONFIG_BYTES => {
            let mut text = Vec::new();
            dir.read("config")
                .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut text))
                .map_err(io_err(&path))?;
            let new = if text.len() as u64 > MAX_CONFIG_BYTES {
                Some(MINIMAL_CONFIG.to_vec())
            } else {
                sanitize_config(&text)
            };
            match new {
                None => return Ok(()),
                Some(new) => (new, st.mode & 0o777),
            }
        }
        Some(_) => (MINIMAL_CONFIG.to_vec(), 0o644),
    };
    tracing::warn!(path = %path.display(), "stripped config that redirects git");
    let tmp = "config.weldr-sanitize";
    let write = || -> std::io::Result<()> {
        match dir.unlink(tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = dir.create(tmp, mode)?;
        std::io::Write::write_all(&mut f, &new)?;
        f.sync_all()?;
        if stat.is_some_and(|st| st.kind == Kind::Dir) {
            dir.rename("config", &dir, "config.weldr-dir")?;
        }
        dir.rename(tmp, &dir, "config")
    };
    write().map_err(io_err(&path))
}

/// `.git/config` text without the keys that make git run a program, read another file as
/// config or ignore rules, or work somewhere else: `core.worktree`, `core.hooksPath`,
/// `core.fsmonitor`, `core.sshCommand`, `core.gitProxy`, `core.pager`, `core.editor`,
/// `include.*` and `includeIf.*`, `filter.*`, `credential.*`, `alias.*`, any `*.command`,
/// `*.program`, `*.cmd`, `*.textconv`, `*.driver`, ... (see [`forbidden_config_key`]).
/// None when nothing needs to go; text git could not parse becomes [`MINIMAL_CONFIG`].
pub fn sanitize_config(text: &[u8]) -> Option<Vec<u8>> {
    let Some(cuts) = config_cuts(text) else {
        return Some(MINIMAL_CONFIG.to_vec());
    };
    if cuts.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(text.len());
    let mut at = 0;
    for cut in cuts {
        out.extend_from_slice(&text[at..cut.start]);
        at = cut.end;
    }
    out.extend_from_slice(&text[at..]);
    Some(out)
}

/// Is `section.[subsection.]key` (lowercase section and key) one [`sanitize_config`] strips?
pub fn forbidden_config_key(section: &str, key: &str) -> bool {
    matches!(
        section,
        "include" | "includeif" | "filter" | "credential" | "alias" | "pager" | "sendemail"
    ) || matches!(
        (section, key),
        (
            "core",
            "worktree"
                | "hookspath"
                | "fsmonitor"
                | "pager"
                | "askpass"
                | "excludesfile"
                | "attributesfile"
        ) | ("extensions", "worktreeconfig")
            | ("submodule", "update")
    ) || [
        "command", "program", "cmd", "proxy", "hook", "editor", "askpass",
    ]
    .iter()
    .any(|end| key.ends_with(end))
        || matches!(
            key,
            "textconv" | "driver" | "helper" | "uploadpack" | "receivepack" | "external" | "vcs"
        )
}

/// Byte ranges of the forbidden variables in a git config file, parsed as git parses it
/// (sections `[name "sub"]` or `[name.sub]`, variables with quoted values, escapes, `\`
/// continuations and comments). None when git would not parse it.
fn config_cuts(t: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut i = if t.starts_with(b"\xEF\xBB\xBF") { 3 } else { 0 };
    let mut section: Option<String> = None;
    let mut cuts = Vec::new();
    while i < t.len() {
        let c = t[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' || c == b';' {
            while i < t.len() && t[i] != b'\n' {
                i += 1;
            }
        } else if c == b'[' {
            i += 1;
            let start = i;
            while i < t.len() && (t[i].is_ascii_alphanumeric() || t[i] == b'-' || t[i] == b'.') {
                i += 1;
            }
            let name = String::from_utf8_lossy(&t[start..i]).to_ascii_lowercase();
            while i < t.len() && (t[i] == b' ' || t[i] == b'\t') {
                i += 1;
            }
            if t.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match t.get(i)? {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\n' => return None,
                        _ => i += 1,
                    }
                }
            }
            if t.get(i) != Some(&b']') || name.is_empty() {
                return None;
            }
            i += 1;
            section = Some(name.split('.').next().unwrap_or_default().to_string());
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < t.len() && (t[i].is_ascii_alphanumeric() || t[i] == b'-') {
                i += 1;
            }
            let key = String::from_utf8_lossy(&t[start..i]).to_ascii_lowercase();
            while i < t.len() && (t[i] == b' ' || t[i] == b'\t') {
                i += 1;
            }
            match t.get(i) {
                None | Some(b'\n' | b'\r' | b'=' | b'#' | b';') => {}
                Some(_) => return None,
            }
            let mut quoted = false;
            while i < t.len() {
                match t[i] {
                    b'\n' if quoted => return None,
                    b'\n' => break,
                    b'\\' => {
                        // An escape, or a continuation onto the next line (`\` CR LF too).
                        i += if t.get(i + 1) == Some(&b'\r') { 3 } else { 2 };
                        continue;
                    }
                    b'"' => quoted = !quoted,
                    b'#' | b';' if !quoted => {
                        while i < t.len() && t[i] != b'\n' {
                            i += 1;
                        }
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
            i = i.min(t.len());
            let section = section.as_deref()?;
            if forbidden_config_key(section, &key) {
                cuts.push(start..i);
            }
        } else {
            return None;
        }
    }
    Some(cuts)
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
    if let Ok(repo) = open(dir) {
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

/// The paths (at most `max`) where the work tree differs from HEAD, ignored files aside.
pub fn dirty_paths(dir: &Path, max: usize) -> Result<Vec<String>, GitError> {
    let repo = open(dir)?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    let statuses = repo.statuses(Some(&mut opts))?;
    Ok(statuses
        .iter()
        .filter_map(|s| s.path().ok().map(str::to_string))
        .take(max)
        .collect())
}

/// Whether the work tree differs from HEAD (ignored files aside).
pub fn is_dirty(dir: &Path) -> Result<bool, GitError> {
    Ok(!dirty_paths(dir, 1)?.is_empty())
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

/// Move HEAD back to `hash` (reachable from HEAD) and make the work tree and index equal to
/// it: changes and files added since are dropped; ignored files are left alone. What an
/// interrupted install is rolled back with.
pub fn reset_hard(dir: &Path, hash: &str) -> Result<(), GitError> {
    let repo = open(dir)?;
    let target = find_commit(&repo, hash)?;
    let head = head_commit(&repo)?;
    if target.id() != head.id() && !repo.graph_descendant_of(head.id(), target.id())? {
        return Err(GitError::NotFound(format!("commit {hash} on this branch")));
    }
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout
        .force()
        .remove_untracked(true)
        .remove_ignored(false);
    repo.reset(
        target.as_object(),
        git2::ResetType::Hard,
        Some(&mut checkout),
    )?;
    remove_empty_dirs(dir)?;
    Ok(())
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
            if std::fs::symlink_metadata(&index).is_ok_and(|m| m.is_file()) {
                let to = repo.path().join("index");
                let _ = std::fs::remove_file(&to);
                copy::copy_nofollow(&index, &to)?;
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

/// Whether the history at commit `head` contains commit `ancestor` (itself included); false
/// when either is unknown to the repository.
pub fn contains(dir: &Path, head: &str, ancestor: &str) -> bool {
    let (Ok(repo), Ok(head), Ok(ancestor)) = (
        open(dir),
        git2::Oid::from_str(head),
        git2::Oid::from_str(ancestor),
    ) else {
        return false;
    };
    if repo.find_commit(ancestor).is_err() {
        return false;
    }
    head == ancestor || repo.graph_descendant_of(head, ancestor).unwrap_or(false)
}

/// The files commit `hash` changed against its first parent (everything, for a root commit).
pub fn commit_changes(dir: &Path, hash: &str) -> Result<Vec<FileChange>, GitError> {
    let repo = open(dir)?;
    let commit = repo.find_commit(git2::Oid::from_str(hash)?)?;
    let parent = commit.parents().next().map(|p| p.tree()).transpose()?;
    changes(&repo, parent.as_ref(), &commit.tree()?)
}

/// The id of HEAD.
pub fn head(dir: &Path) -> Result<String, GitError> {
    Ok(head_commit(&open(dir)?)?.id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(text: &str) -> String {
        match sanitize_config(text.as_bytes()) {
            Some(out) => String::from_utf8(out).unwrap(),
            None => text.to_string(),
        }
    }

    #[test]
    fn config_keys_that_redirect_git_are_stripped() {
        let plain = "[core]\n\trepositoryformatversion = 0\n\tbare = false\n[user]\n\tname = A\n";
        assert_eq!(sanitize_config(plain.as_bytes()), None);
        let out = clean(
            "[core]\n\tbare = false\n\tworkTree = /outside\n\thooksPath=/x ; c\n\
             [Include]\n\tpath = /dev/zero\n[includeIf \"gitdir:/\"]\n\tpath = /etc/shadow\n\
             [core]fsmonitor = \"sh -c 'x'\"\n[diff \"x\"]\n\ttextconv = cat\n\
             [core]\n\tsshCommand = a \\\n  b\n\tfilemode = true\n[remote \"o\"]\n\turl = u\n\tuploadpack = p\n",
        );
        for gone in [
            "outside",
            "hooksPath",
            "/dev/zero",
            "shadow",
            "fsmonitor",
            "textconv",
            "sshCommand",
            "b\n",
            "uploadpack",
        ] {
            assert!(!out.contains(gone), "{gone:?} left in {out}");
        }
        for kept in [
            "bare = false",
            "filemode = true",
            "url = u",
            "[remote \"o\"]",
        ] {
            assert!(out.contains(kept), "{kept:?} lost from {out}");
        }
        // Git would not parse it: a minimal config instead, never the text.
        for bad in [
            "worktree = /x\n",
            "[core\nworktree=/x\n",
            "[core]\n\tworktree/x = 1\n",
        ] {
            assert_eq!(clean(bad).as_bytes(), MINIMAL_CONFIG, "{bad:?}");
        }
    }

    #[test]
    fn open_pins_the_work_tree_and_strips_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, outside) = (tmp.path().join("b"), tmp.path().join("outside"));
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        init_branch(&dir, "t").unwrap();
        let config = dir.join(".git/config");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\tworktree = {}\n", outside.display()));
        std::fs::write(&config, text).unwrap();
        std::fs::write(dir.join("mine"), "m").unwrap();
        let commit = commit_all(&dir, "c", "t").unwrap().unwrap();
        assert_eq!(commit.changed.len(), 1);
        assert_eq!(commit.changed[0].path, "mine");
        assert!(
            !std::fs::read_to_string(&config)
                .unwrap()
                .contains("worktree")
        );
        // A `.git` that is a link to another repository is refused.
        let other = tmp.path().join("c");
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(dir.join(".git"), other.join(".git")).unwrap();
        assert!(commit_all(&other, "c", "t").is_err());
    }
}
