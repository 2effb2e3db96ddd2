//! File operations relative to an open directory that never follow a symlink: every path
//! component is opened with `O_NOFOLLOW | O_DIRECTORY`, files with `O_NOFOLLOW`, and names are
//! single components (no `/`, not `.` or `..`). Restores, forks and the sandbox's hand-over
//! work through these, so a link planted in a tree can never redirect a write (or a read)
//! outside it.
//!
//! Invariants this module keeps (tests/restore_tamper.rs, tests/sandbox.rs and
//! tests/layered_forks.rs depend on them):
//! - every descriptor it opens is `O_CLOEXEC`;
//! - a directory is only ever opened with `O_DIRECTORY | O_NOFOLLOW`, a file with `O_NOFOLLOW`;
//! - `stat` and `chown_name` act on the name itself (`AT_SYMLINK_NOFOLLOW`);
//! - a name is one plain component, checked before any system call.
//!
//! A leaf: it uses nothing else of the crate. The system calls are rustix's (no `unsafe`).

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::process::{Gid, Uid};

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
    // The field types of `struct stat` differ between architectures, hence the casts.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn of(st: &rustix::fs::Stat) -> Self {
        let kind = match FileType::from_raw_mode(st.st_mode as _) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino as u64,
            dev: st.st_dev as u64,
        }
    }
}

/// `name` as a C string, when it is one plain component (else `InvalidInput`).
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

/// How every directory is opened: read-only, a directory, never through a symlink, closed on
/// exec.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits)
}

impl Dir {
    /// Open `path` as a directory; its last component must not be a symlink (the components
    /// above it are the server's own paths).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        Ok(Dir(rustix::fs::open(
            c.as_c_str(),
            DIR_FLAGS,
            Mode::empty(),
        )?))
    }

    /// The subdirectory `name` (a symlink there is an error, `ELOOP` or `ENOTDIR`).
    pub fn dir(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let c = name_c(name.as_ref())?;
        Ok(Dir(rustix::fs::openat(
            &self.0,
            c.as_c_str(),
            DIR_FLAGS,
            Mode::empty(),
        )?))
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
        match rustix::fs::statat(&self.0, c.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat::of(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `fstat` of this directory.
    pub fn stat_self(&self) -> io::Result<Stat> {
        Ok(Stat::of(&rustix::fs::fstat(&self.0)?))
    }

    pub fn mkdir(&self, name: impl AsRef<OsStr>, mode_bits: u32) -> io::Result<()> {
        let c = name_c(name.as_ref())?;
        Ok(rustix::fs::mkdirat(&self.0, c.as_c_str(), mode(mode_bits))?)
    }

    /// Create `name`, which must not exist yet, for writing.
    pub fn create(&self, name: impl AsRef<OsStr>, mode_bits: u32) -> io::Result<File> {
        self.open_file(
            name.as_ref(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            mode_bits,
        )
    }

    /// Open the regular file `name` for reading (a symlink is `ELOOP`, a fifo never blocks).
    pub fn read(&self, name: impl AsRef<OsStr>) -> io::Result<File> {
        let file = self.open_file(name.as_ref(), OFlags::RDONLY | OFlags::NONBLOCK, 0)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} is not a regular file", name.as_ref()),
            ));
        }
        Ok(file)
    }

    fn open_file(&self, name: &OsStr, flags: OFlags, mode_bits: u32) -> io::Result<File> {
        let c = name_c(name)?;
        let fd = rustix::fs::openat(
            &self.0,
            c.as_c_str(),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode(mode_bits),
        )?;
        Ok(File::from(fd))
    }

    pub fn symlink(&self, target: impl AsRef<OsStr>, name: impl AsRef<OsStr>) -> io::Result<()> {
        let t = CString::new(target.as_ref().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in link target"))?;
        let c = name_c(name.as_ref())?;
        Ok(rustix::fs::symlinkat(t.as_c_str(), &self.0, c.as_c_str())?)
    }

    pub fn read_link(&self, name: impl AsRef<OsStr>) -> io::Result<OsString> {
        let c = name_c(name.as_ref())?;
        let target = rustix::fs::readlinkat(&self.0, c.as_c_str(), Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// `renameat`: `name` here becomes `to_name` in `to` (replacing a file there).
    pub fn rename(
        &self,
        name: impl AsRef<OsStr>,
        to: &Dir,
        to_name: impl AsRef<OsStr>,
    ) -> io::Result<()> {
        let (a, b) = (name_c(name.as_ref())?, name_c(to_name.as_ref())?);
        Ok(rustix::fs::renameat(
            &self.0,
            a.as_c_str(),
            &to.0,
            b.as_c_str(),
        )?)
    }

    /// Remove the file or symlink `name`.
    pub fn unlink(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let c = name_c(name.as_ref())?;
        Ok(rustix::fs::unlinkat(
            &self.0,
            c.as_c_str(),
            AtFlags::empty(),
        )?)
    }

    /// Remove the empty directory `name`.
    pub fn rmdir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let c = name_c(name.as_ref())?;
        Ok(rustix::fs::unlinkat(
            &self.0,
            c.as_c_str(),
            AtFlags::REMOVEDIR,
        )?)
    }

    /// chmod this directory.
    pub fn chmod(&self, mode_bits: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(&self.0, mode(mode_bits))?)
    }

    /// chown `name` itself: a symlink is changed, never followed.
    pub fn chown_name(&self, name: impl AsRef<OsStr>, uid: u32, gid: u32) -> io::Result<()> {
        let c = name_c(name.as_ref())?;
        Ok(rustix::fs::chownat(
            &self.0,
            c.as_c_str(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// chown this directory.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        Ok(rustix::fs::fchown(
            &self.0,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )?)
    }

    /// The names in this directory (not `.` and `..`).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        // The stream reads through a duplicate of this descriptor, which shares its offset:
        // rewind first, so every listing starts at the top.
        let mut entries = rustix::fs::Dir::new(self.0.try_clone()?)?;
        entries.rewind();
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let bytes = entry.file_name().to_bytes();
            if bytes != b"." && bytes != b".." {
                out.push(OsString::from_vec(bytes.to_vec()));
            }
        }
        Ok(out)
    }
}

/// Copy the regular file `from` (opened without following a link) to the new file `to` with
/// `mode`; a symlink or anything else at `from` is an error.
pub fn copy_file(
    from: &Dir,
    name: &OsStr,
    to: &Dir,
    to_name: &OsStr,
    mode_bits: u32,
) -> io::Result<u64> {
    let mut src = from.read(name)?;
    let mut dst = to.create(to_name, mode_bits)?;
    let n = io::copy(&mut src, &mut dst)?;
    dst.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode_bits))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn errno(e: &io::Error) -> Option<rustix::io::Errno> {
        e.raw_os_error().map(rustix::io::Errno::from_raw_os_error)
    }

    #[test]
    fn names_must_be_one_plain_component() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        for bad in ["", ".", "..", "a/b", "/etc", "a\0b"] {
            let e = dir.stat(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            let e = dir.create(bad, 0o644).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(dir.walk(Path::new("../x")).is_err());
        assert!(dir.walk(Path::new("/x")).is_err());
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("f")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();

        // The link itself, not its target.
        let st = dir.stat("out").unwrap().unwrap();
        assert_eq!(st.kind, Kind::Symlink);
        assert_eq!(dir.read_link("out").unwrap(), outside.path().as_os_str());
        // Neither a directory nor a file is opened through it.
        let e = dir.dir("out").unwrap_err();
        assert!(matches!(
            errno(&e),
            Some(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)
        ));
        assert_eq!(
            errno(&dir.read("f").unwrap_err()),
            Some(rustix::io::Errno::LOOP)
        );
        assert!(dir.walk(Path::new("out")).is_err());
        // Creating over a link fails rather than writing through it.
        assert!(dir.create("f", 0o644).is_err());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret")).unwrap(),
            "s"
        );
        // Nor is the top directory opened through a link.
        assert!(Dir::open(&tmp.path().join("out")).is_err());
        // Unlinking removes the link, not the target.
        dir.unlink("f").unwrap();
        assert!(outside.path().join("secret").exists());
    }

    #[test]
    fn files_directories_and_links_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.stat("nope").unwrap().is_none());
        dir.mkdir("sub", 0o750).unwrap();
        let sub = dir.walk(Path::new("./sub")).unwrap();
        let st = dir.stat("sub").unwrap().unwrap();
        assert_eq!(st.kind, Kind::Dir);
        assert_eq!(st.ino, sub.stat_self().unwrap().ino);
        assert_eq!(st.dev, dir.stat_self().unwrap().dev);

        std::io::Write::write_all(&mut sub.create("a", 0o600).unwrap(), b"hello").unwrap();
        assert!(sub.create("a", 0o600).is_err(), "create never replaces");
        assert_eq!(
            copy_file(&sub, "a".as_ref(), &dir, "b".as_ref(), 0o640).unwrap(),
            5
        );
        let b = dir.stat("b").unwrap().unwrap();
        assert_eq!((b.kind, b.mode, b.size), (Kind::File, 0o640, 5));
        let meta = std::fs::metadata(tmp.path().join("b")).unwrap();
        assert_eq!(b.mtime_ns, meta.mtime() * 1_000_000_000 + meta.mtime_nsec());
        assert_eq!(b.uid, meta.uid());

        dir.symlink("sub/a", "l").unwrap();
        assert_eq!(dir.read_link("l").unwrap(), OsStr::new("sub/a"));
        dir.rename("b", &sub, "c").unwrap();
        let mut names = sub.names().unwrap();
        names.sort();
        assert_eq!(names, [OsString::from("a"), OsString::from("c")]);
        // A second listing through the same descriptor starts at the top again.
        assert_eq!(sub.names().unwrap().len(), 2);

        sub.chmod(0o700).unwrap();
        let m = std::fs::metadata(tmp.path().join("sub")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o700);
        // Chown to the owner it already has works for anyone.
        sub.chown(m.uid(), m.gid()).unwrap();
        dir.chown_name("l", b.uid, b.gid).unwrap();

        assert!(dir.rmdir("sub").is_err(), "not empty");
        sub.unlink("a").unwrap();
        sub.unlink("c").unwrap();
        dir.rmdir("sub").unwrap();
        assert!(dir.stat("sub").unwrap().is_none());
    }

    #[test]
    fn a_fifo_is_not_read_and_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tmp.path().join("p").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert_eq!(dir.stat("p").unwrap().unwrap().kind, Kind::Other);
        let e = dir.read("p").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
