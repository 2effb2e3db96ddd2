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
            // Another filesystem: copy instead.
            Err(_) => std::fs::copy(&from, &to).map(|_| ()).map_err(io_err(&to)),
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
    let meta = std::fs::metadata(from).map_err(io_err(from))?;
    if try_reflink.load(Ordering::Relaxed) {
        let src = std::fs::File::open(from).map_err(io_err(from))?;
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
    std::fs::copy(from, to).map_err(io_err(to))?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn reflink(src: &std::fs::File, dst: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open files owned by the caller for the whole call.
    unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn reflink(_src: &std::fs::File, _dst: &std::fs::File) -> bool {
    false
}
