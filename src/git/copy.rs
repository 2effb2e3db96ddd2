//! Fast tree copies for forks: hard links for immutable git objects, reflinks (copy-on-write
//! clones) for work-tree files where the filesystem has them, and a parallel copy otherwise.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{GitError, io_err};
use crate::excludes::Excludes;

enum Entry {
    Dir(PathBuf),
    File(PathBuf),
    Symlink(PathBuf),
}

/// Relative paths under `root`, directories first (parents before children).
fn walk(root: &Path, skip: &dyn Fn(&Path, bool) -> bool) -> Result<Vec<Entry>, GitError> {
    // The root itself must be a directory, not a link to one elsewhere.
    let meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(GitError::Invalid(format!(
            "{} is not a directory (a symlink is not followed)",
            root.display()
        )));
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let ft = entry.file_type().map_err(io_err(&dir))?;
            let child = rel.join(entry.file_name());
            if skip(&child, ft.is_dir()) {
                continue;
            }
            if ft.is_dir() {
                out.push(Entry::Dir(child.clone()));
                stack.push(child);
            } else if ft.is_symlink() {
                out.push(Entry::Symlink(child));
            } else if ft.is_file() {
                out.push(Entry::File(child));
            }
        }
    }
    Ok(out)
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// Run `f` over `items` on a few threads; the first error wins.
fn parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), GitError> + Sync,
) -> Result<(), GitError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let errors = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads().min(items.len().max(1)) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item) {
                        failed.store(true, Ordering::Relaxed);
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    match errors.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Hard-link every file under `src` into `dst` (object files are immutable).
pub fn link_tree(src: &Path, dst: &Path) -> Result<(), GitError> {
    let entries = walk(src, &|_, _| false)?;
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Entry::Dir(rel) => {
                let d = dst.join(rel);
                std::fs::create_dir_all(&d).map_err(io_err(&d))?;
            }
            Entry::File(rel) | Entry::Symlink(rel) => files.push(rel),
        }
    }
    parallel(&files, |rel| {
        let (from, to) = (src.join(rel), dst.join(rel));
        match std::fs::hard_link(&from, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            // Another filesystem: copy instead (a symlink is linked above, never copied).
            Err(_) => copy_nofollow(&from, &to),
        }
    })
}

/// Copy the work tree of `src` (not `.git`, not excluded paths) into `dst`: directories
/// (empty ones too), symlinks as symlinks, files with their mode, by reflink when possible.
pub fn copy_worktree(src: &Path, dst: &Path, excludes: &Excludes) -> Result<(), GitError> {
    let entries = walk(src, &|rel, is_dir| {
        rel == Path::new(".git") || excludes.is_excluded(rel, is_dir)
    })?;
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Entry::Dir(rel) => {
                let d = dst.join(&rel);
                std::fs::create_dir_all(&d).map_err(io_err(&d))?;
                let mode = std::fs::metadata(src.join(&rel))
                    .map_err(io_err(&d))?
                    .permissions();
                std::fs::set_permissions(&d, mode).map_err(io_err(&d))?;
            }
            Entry::Symlink(rel) => {
                let target = std::fs::read_link(src.join(&rel)).map_err(io_err(&rel))?;
                let to = dst.join(&rel);
                std::os::unix::fs::symlink(&target, &to).map_err(io_err(&to))?;
            }
            Entry::File(rel) => files.push(rel),
        }
    }
    let reflinks = AtomicBool::new(true);
    parallel(&files, |rel| {
        copy_file(&src.join(rel), &dst.join(rel), &reflinks)
    })
}

/// Copy one file: a reflink clone while the filesystem supports it, else a normal copy.
pub fn copy_file(from: &Path, to: &Path, try_reflink: &AtomicBool) -> Result<(), GitError> {
    let src = open_nofollow(from)?;
    let meta = src.metadata().map_err(io_err(from))?;
    if try_reflink.load(Ordering::Relaxed) {
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(meta.permissions().mode())
            .open(to)
            .map_err(io_err(to))?;
        if reflink(&src, &dst) {
            return Ok(());
        }
        try_reflink.store(false, Ordering::Relaxed);
        drop(dst);
        std::fs::remove_file(to).map_err(io_err(to))?;
    }
    copy_nofollow(from, to)
}

/// Open a regular file for reading; a symlink (or a fifo, a device) is refused.
fn open_nofollow(path: &Path) -> Result<std::fs::File, GitError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    if !file.metadata().map_err(io_err(path))?.is_file() {
        return Err(GitError::Invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Copy a regular file to the new file `to` with its mode, never following a symlink at
/// either end: a link planted in a branch cannot make a fork read outside it.
pub fn copy_nofollow(from: &Path, to: &Path) -> Result<(), GitError> {
    let mut src = open_nofollow(from)?;
    let mode = src.metadata().map_err(io_err(from))?.permissions().mode() & 0o777;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(to)
        .map_err(io_err(to))?;
    std::io::copy(&mut src, &mut dst).map_err(io_err(to))?;
    dst.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(to))?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn reflink(src: &std::fs::File, dst: &std::fs::File) -> bool {
    rustix::fs::ioctl_ficlone(dst, src).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn reflink(_src: &std::fs::File, _dst: &std::fs::File) -> bool {
    false
}
