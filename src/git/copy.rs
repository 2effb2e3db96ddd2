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

/// File operations relative to an open directory that never follow a symlink: every path
/// component is opened with `O_NOFOLLOW | O_DIRECTORY`, files with `O_NOFOLLOW`, and names are
/// single components (no `/`). Restores and forks work through these, so a link planted in a
/// tree can never redirect a write (or a read) outside it.
pub mod beneath {
    use std::ffi::{CString, OsStr, OsString};
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::Path;

    /// An open directory.
    #[derive(Debug)]
    pub struct Dir(OwnedFd);

    /// What a name in a directory is, without following it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Dir,
        File,
        Symlink,
        /// Sockets, fifos, devices.
        Other,
    }

    /// The `lstat` of a name.
    #[derive(Debug, Clone, Copy)]
    pub struct Stat {
        pub kind: Kind,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub size: u64,
        pub mtime_ns: i64,
        pub ctime_ns: i64,
        pub ino: u64,
        /// The file system it is on.
        pub dev: u64,
    }

    impl Stat {
        fn of(st: &libc::stat) -> Self {
            let kind = match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => Kind::Dir,
                libc::S_IFREG => Kind::File,
                libc::S_IFLNK => Kind::Symlink,
                _ => Kind::Other,
            };
            Stat {
                kind,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                size: st.st_size as u64,
                mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
                ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
                ino: st.st_ino,
                dev: st.st_dev,
            }
        }
    }

    fn name_c(name: &OsStr) -> io::Result<CString> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name"),
            ));
        }
        CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
    }

    fn check(r: libc::c_int) -> io::Result<libc::c_int> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    const DIR_FLAGS: libc::c_int =
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

    impl Dir {
        /// Open `path` as a directory; its last component must not be a symlink (the
        /// components above it are the server's own paths).
        pub fn open(path: &Path) -> io::Result<Dir> {
            let c = CString::new(path.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
            // SAFETY: a valid C string; the returned descriptor is owned below.
            let fd = check(unsafe { libc::open(c.as_ptr(), DIR_FLAGS) })?;
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// The subdirectory `name` (a symlink there is an error, `ELOOP` or `ENOTDIR`).
        pub fn dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C string.
            let fd = check(unsafe { libc::openat(self.0.as_raw_fd(), c.as_ptr(), DIR_FLAGS) })?;
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        /// The directory at the relative path `rel` ("" is this one), one component at a time.
        pub fn walk(&self, rel: &Path) -> io::Result<Dir> {
            let mut dir = self.try_clone()?;
            for comp in rel.components() {
                match comp {
                    std::path::Component::Normal(name) => dir = dir.dir(name)?,
                    std::path::Component::CurDir => {}
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{} is not a plain relative path", rel.display()),
                        ));
                    }
                }
            }
            Ok(dir)
        }

        pub fn try_clone(&self) -> io::Result<Dir> {
            Ok(Dir(self.0.try_clone()?))
        }

        /// `lstat` of `name`; None when it does not exist.
        pub fn stat(&self, name: impl AsRef<OsStr>) -> io::Result<Option<Stat>> {
            let c = name_c(name.as_ref())?;
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: valid descriptor, C string and out pointer.
            let r = unsafe {
                libc::fstatat(
                    self.0.as_raw_fd(),
                    c.as_ptr(),
                    st.as_mut_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::NotFound {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            // SAFETY: fstatat succeeded, so it filled `st`.
            let st = unsafe { st.assume_init() };
            Ok(Some(Stat::of(&st)))
        }

        /// `fstat` of this directory.
        pub fn stat_self(&self) -> io::Result<Stat> {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: valid descriptor and out pointer.
            check(unsafe { libc::fstat(self.0.as_raw_fd(), st.as_mut_ptr()) })?;
            // SAFETY: fstat succeeded, so it filled `st`.
            let st = unsafe { st.assume_init() };
            Ok(Stat::of(&st))
        }

        pub fn mkdir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C string.
            check(unsafe { libc::mkdirat(self.0.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })
                .map(|_| ())
        }

        /// Create `name`, which must not exist yet, for writing.
        pub fn create(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
            self.open_file(
                name.as_ref(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                mode,
            )
        }

        /// Open the regular file `name` for reading (a symlink is `ELOOP`, a fifo never blocks).
        pub fn read(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
            let file = self.open_file(name.as_ref(), libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
            if !file.metadata()?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{:?} is not a regular file", name.as_ref()),
                ));
            }
            Ok(file)
        }

        fn open_file(&self, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<File> {
            let c = name_c(name)?;
            // SAFETY: valid descriptor and C string.
            let fd = check(unsafe {
                libc::openat(
                    self.0.as_raw_fd(),
                    c.as_ptr(),
                    flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    mode as libc::c_uint,
                )
            })?;
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            Ok(unsafe { File::from_raw_fd(fd) })
        }

        pub fn symlink(
            &self,
            target: impl AsRef<OsStr>,
            name: impl AsRef<OsStr>,
        ) -> io::Result<()> {
            let t = CString::new(target.as_ref().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in link target"))?;
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C strings.
            check(unsafe { libc::symlinkat(t.as_ptr(), self.0.as_raw_fd(), c.as_ptr()) })
                .map(|_| ())
        }

        pub fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<OsString> {
            let c = name_c(name.as_ref())?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            // SAFETY: valid descriptor, C string and buffer of the given length.
            let n = unsafe {
                libc::readlinkat(
                    self.0.as_raw_fd(),
                    c.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            Ok(OsString::from_vec(buf))
        }

        /// `renameat`: `name` here becomes `to_name` in `to` (replacing a file there).
        pub fn rename(
            &self,
            name: impl AsRef<OsStr>,
            to: &Dir,
            to_name: impl AsRef<OsStr>,
        ) -> io::Result<()> {
            let (a, b) = (name_c(name.as_ref())?, name_c(to_name.as_ref())?);
            // SAFETY: valid descriptors and C strings.
            check(unsafe {
                libc::renameat(self.0.as_raw_fd(), a.as_ptr(), to.0.as_raw_fd(), b.as_ptr())
            })
            .map(|_| ())
        }

        /// Remove the file or symlink `name`.
        pub fn unlink(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C string.
            check(unsafe { libc::unlinkat(self.0.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
        }

        /// Remove the empty directory `name`.
        pub fn rmdir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C string.
            check(unsafe { libc::unlinkat(self.0.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
                .map(|_| ())
        }

        /// chmod this directory.
        pub fn chmod(&self, mode: u32) -> io::Result<()> {
            // SAFETY: valid descriptor.
            check(unsafe { libc::fchmod(self.0.as_raw_fd(), mode as libc::mode_t) }).map(|_| ())
        }

        /// chown `name` itself: a symlink is changed, never followed.
        pub fn chown_name(&self, name: impl AsRef<OsStr>, uid: u32, gid: u32) -> io::Result<()> {
            let c = name_c(name.as_ref())?;
            // SAFETY: valid descriptor and C string.
            check(unsafe {
                libc::fchownat(
                    self.0.as_raw_fd(),
                    c.as_ptr(),
                    uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map(|_| ())
        }

        /// chown this directory.
        pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
            // SAFETY: valid descriptor.
            check(unsafe { libc::fchown(self.0.as_raw_fd(), uid, gid) }).map(|_| ())
        }

        /// The names in this directory (not `.` and `..`).
        pub fn names(&self) -> io::Result<Vec<OsString>> {
            // fdopendir takes the descriptor over: give it a duplicate.
            let fd = self.0.try_clone()?;
            let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
            // SAFETY: `raw` is an open directory descriptor that the DIR stream now owns.
            let dirp = unsafe { libc::fdopendir(raw) };
            if dirp.is_null() {
                let e = io::Error::last_os_error();
                // SAFETY: fdopendir failed, so `raw` is still ours to close.
                unsafe { libc::close(raw) };
                return Err(e);
            }
            // SAFETY: `dirp` is a valid stream; it was opened at offset 0 by `open`, but a
            // duplicate shares the offset, so rewind first.
            unsafe { libc::rewinddir(dirp) };
            let mut out = Vec::new();
            let result = loop {
                // SAFETY: errno is thread-local; readdir's result is valid until the next call.
                unsafe { *libc::__errno_location() = 0 };
                let ent = unsafe { libc::readdir(dirp) };
                if ent.is_null() {
                    let e = io::Error::last_os_error();
                    break if e.raw_os_error().unwrap_or(0) == 0 {
                        Ok(())
                    } else {
                        Err(e)
                    };
                }
                // SAFETY: `ent` points to a valid dirent with a NUL-terminated name.
                let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
                let bytes = name.to_bytes();
                if bytes != b"." && bytes != b".." {
                    out.push(OsString::from_vec(bytes.to_vec()));
                }
            };
            // SAFETY: `dirp` is valid and closed once.
            unsafe { libc::closedir(dirp) };
            result.map(|()| out)
        }
    }

    /// Copy the regular file `from` (opened without following a link) to the new file `to`
    /// with `mode`; a symlink or anything else at `from` is an error.
    pub fn copy_file(
        from: &Dir,
        name: &OsStr,
        to: &Dir,
        to_name: &OsStr,
        mode: u32,
    ) -> io::Result<u64> {
        let mut src = from.read(name)?;
        let mut dst = to.create(to_name, mode)?;
        let n = io::copy(&mut src, &mut dst)?;
        dst.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        Ok(n)
    }
}
