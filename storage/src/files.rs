//! The store's files on disk: who may read them, and what a previous store left behind.
//!
//! The database and its append log hold every branch's events, sessions and tokens: the
//! directory they live in is the owner's alone (0700) and so are the files (0600), whatever
//! the umask. And a database file that is missing or empty while a previous store's append log
//! is still beside it is a lost store, not a new one: opening it would start over silently
//! (a new token, every project gone), so the open is refused with what to do instead.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::StorageError;

fn io_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Create `dir` (and its parents) owner-only, or make an existing one owner-only. A directory
/// that is not ours or that is shared on purpose (the sticky bit, as `/tmp`) is left as it is.
pub(crate) fn private_dir(dir: &Path) -> Result<(), StorageError> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    match fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.mode() & 0o7777;
            // The owner of /proc/self is this process's effective uid.
            let ours = fs::metadata("/proc/self").map_or(true, |me| me.uid() == meta.uid());
            if ours && mode & 0o1000 == 0 && mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    mode = format!("{mode:o}"),
                    "the store's directory was readable by others; it is now 0700"
                );
                fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))
                    .map_err(|e| io_error(dir, e))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(dir, e)),
        Err(e) => Err(io_error(dir, e)),
    }
}

/// Make the file at `path` readable and writable by its owner only.
pub(crate) fn owner_only(path: &Path) -> Result<(), StorageError> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| io_error(path, e))?;
    }
    Ok(())
}

/// Refuse to open `db_path` when it is missing or empty but the append log of a store that
/// was there is not.
pub(crate) fn refuse_lost_database(db_path: &Path) -> Result<(), StorageError> {
    let state = match fs::metadata(db_path) {
        Ok(meta) if meta.len() > 0 => return Ok(()),
        Ok(_) => "is empty",
        Err(e) if e.kind() == io::ErrorKind::NotFound => "is missing",
        Err(e) => return Err(io_error(db_path, e)),
    };
    let wal = crate::wal_path(db_path);
    if !wal.exists() {
        return Ok(());
    }
    Err(StorageError::Refused(format!(
        "the store {db} {state}, but the append log {wal} of a previous store is still beside \
         it: opening would start a new, empty store (a new token, every project gone). Put \
         back {db} from a backup; or, to really start over, move {wal} (and the rest of {dir}) \
         away and start again",
        db = db_path.display(),
        wal = wal.display(),
        dir = db_path
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    )))
}
