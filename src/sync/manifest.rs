//! The snapshot format and the directory walk.
//!
//! Store layout (under the branch's bucket or prefix):
//! - `objects/{sha256}`: a big file's content, uploaded on its own (multipart, streamed);
//! - `packs/{sha256}`: small files' contents concatenated, so many small files cost one request;
//! - `snapshots/{id}.json`: a [`Manifest`], written after all the content it references;
//! - `latest`: the id of the newest snapshot, written last.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SyncError;
use crate::excludes::Excludes;

pub const MANIFEST_VERSION: u32 = 1;

/// A restore stages the new tree in a hidden directory of this prefix at the top of the branch
/// directory: no snapshot may hold such a name, and a push never takes one.
pub const STAGING_PREFIX: &str = ".weldr-restore-";
/// Largest manifest read (a few hundred bytes an entry: about half a million files).
pub const MAX_MANIFEST_BYTES: u64 = 128 << 20;
/// Largest pack read (a push writes them at about 9 MiB).
pub const MAX_PACK_BYTES: u64 = 64 << 20;
/// Largest `latest` pointer read.
pub const MAX_POINTER_BYTES: u64 = 4 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub created_at_ms: u64,
    /// The branch's git HEAD commit when it was pushed: a later push from a tree whose
    /// history does not contain it is refused (it would hide this snapshot's work). Absent in
    /// snapshots of older versions and of directories that are not repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// Sorted by path; every directory is listed (so empty ones travel).
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        /// sha256 of the content, hex.
        hash: String,
        loc: Loc,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::Symlink { path, .. } | Entry::File { path, .. } => {
                path
            }
        }
    }
}

/// Where a file's content is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case")]
pub enum Loc {
    /// `objects/{hash}`.
    Object,
    /// `packs/{pack}` at `offset`, `size` bytes.
    Pack { pack: String, offset: u64 },
}

pub fn object_path(hash: &str) -> String {
    format!("objects/{hash}")
}

pub fn pack_path(pack: &str) -> String {
    format!("packs/{pack}")
}

pub fn manifest_path(id: &str) -> String {
    format!("snapshots/{id}.json")
}

/// Snapshot ids are opaque to users but must be safe as object names.
pub fn check_snapshot_id(id: &str) -> Result<(), SyncError> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(SyncError::NotFound(format!(
            "{id:?} is not a snapshot id (letters, digits, '-' and '_')"
        )))
    }
}

/// Reject a manifest that could write outside the target or through a symlink: every path
/// must be relative and plain, listed once, in order, with its parent listed as a directory.
pub fn validate(m: &Manifest) -> Result<(), SyncError> {
    let bad = |path: &str, why: &str| {
        Err(SyncError::Corrupt(format!(
            "snapshot {}: entry {path:?} {why}",
            m.id
        )))
    };
    let mut dirs = std::collections::HashSet::new();
    let mut previous: Option<&str> = None;
    for e in &m.entries {
        let path = e.path();
        let p = Path::new(path);
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255)
            || path.contains('\0')
        {
            return bad(path, "is not a plain relative path");
        }
        if path.starts_with(STAGING_PREFIX) {
            return bad(path, "uses a name reserved for restores");
        }
        if let Entry::Symlink { target, .. } = e
            && (target.is_empty() || target.contains('\0'))
        {
            return bad(path, "is a symlink with an empty target or a NUL");
        }
        if previous.is_some_and(|prev| prev >= path) {
            return bad(path, "is out of order or listed twice");
        }
        previous = Some(path);
        if let Some(parent) = p.parent().and_then(Path::to_str)
            && !parent.is_empty()
            && !dirs.contains(parent)
        {
            return bad(path, "has a parent that is not a directory of the snapshot");
        }
        if let Entry::Dir { .. } = e {
            dirs.insert(path);
        }
    }
    Ok(())
}

/// Does the link at `path` (to `target`) point outside the tree? Resolved lexically from the
/// link's directory, following the snapshot's other links on the way as the file system
/// would: absolute targets, `..` above the root, and loops (or too long chains) leave the tree.
pub fn link_leaves_tree(links: &HashMap<&str, &str>, path: &str, target: &str) -> bool {
    fn resolve(
        links: &HashMap<&str, &str>,
        at: &mut Vec<String>,
        target: &str,
        budget: &mut usize,
        depth: usize,
    ) -> bool {
        // Linux gives up after 40 links in one lookup (ELOOP).
        if depth > 40 || target.is_empty() || target.starts_with('/') || target.contains('\0') {
            return true;
        }
        for comp in target.split('/') {
            if *budget == 0 {
                return true;
            }
            *budget -= 1;
            match comp {
                "" | "." => {}
                ".." => {
                    if at.pop().is_none() {
                        return true;
                    }
                }
                name => {
                    at.push(name.to_string());
                    if let Some(next) = links.get(at.join("/").as_str()) {
                        at.pop();
                        if resolve(links, at, next, budget, depth + 1) {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }
    let mut at: Vec<String> = path.split('/').map(str::to_string).collect();
    at.pop();
    resolve(links, &mut at, target, &mut 4096, 0)
}

/// One walked path, before its content is located in the store.
#[derive(Debug, Clone)]
pub enum Scanned {
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        hash: String,
    },
}

impl Scanned {
    pub fn path(&self) -> &str {
        match self {
            Scanned::Dir { path, .. }
            | Scanned::Symlink { path, .. }
            | Scanned::File { path, .. } => path,
        }
    }
}

/// What a file looked like when it was last hashed: reused when size, mtime, ctime and inode
/// all match, so a no-op push does not re-read the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl StatKey {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
}

pub type StatCache = HashMap<String, (StatKey, String)>;

fn rel_string(rel: &Path) -> Result<String, SyncError> {
    rel.to_str().map(str::to_string).ok_or_else(|| {
        SyncError::Io(format!(
            "{} is not valid UTF-8; rename it to sync this branch",
            rel.display()
        ))
    })
}

/// sha256 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<String, SyncError> {
    let mut file = std::fs::File::open(path).map_err(SyncError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(SyncError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn hash_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Walk `root` (blocking): every directory, regular file and symlink, sorted by path, minus the
/// excludes. `cache` (may be empty) avoids re-hashing unchanged files; `fresh` receives the
/// entries safe to cache (files not modified within the last two seconds).
///
/// Directories are shared out to a few threads (stat and hashing latency overlap, and a first
/// push hashes on every core); the result does not depend on how the work was split.
pub fn scan(
    root: &Path,
    cache: &StatCache,
    fresh: &mut StatCache,
) -> Result<Vec<Scanned>, SyncError> {
    let walk = Walk {
        root,
        cache,
        excludes: Excludes::for_dir(root),
        now_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        queue: std::sync::Mutex::new(WalkQueue {
            dirs: vec![PathBuf::new()],
            busy: 0,
            failed: false,
        }),
        wake: std::sync::Condvar::new(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_mul(2)
        .clamp(2, 16);
    let results: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(|| walk.work())).collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(SyncError::Io("a scan thread panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::new();
    for result in results {
        let (scanned, cached) = result?;
        out.extend(scanned);
        fresh.extend(cached);
    }
    out.sort_unstable_by(|a, b| a.path().cmp(b.path()));
    Ok(out)
}

struct Walk<'a> {
    root: &'a Path,
    cache: &'a StatCache,
    excludes: Excludes,
    now_ns: i64,
    queue: std::sync::Mutex<WalkQueue>,
    wake: std::sync::Condvar,
}

struct WalkQueue {
    /// Directories (relative to the root) not yet read.
    dirs: Vec<PathBuf>,
    /// Directories being read right now: the walk is over when none is queued or busy.
    busy: usize,
    failed: bool,
}

impl Walk<'_> {
    /// One thread's share: (entries found, entries safe to cache).
    fn work(&self) -> Result<(Vec<Scanned>, StatCache), SyncError> {
        let (mut out, mut fresh, mut subdirs) = (Vec::new(), StatCache::new(), Vec::new());
        let lock = || self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let dir = {
                let mut q = lock();
                loop {
                    if q.failed {
                        // The thread that failed reports the error.
                        return Ok((out, fresh));
                    }
                    if let Some(dir) = q.dirs.pop() {
                        q.busy += 1;
                        break dir;
                    }
                    if q.busy == 0 {
                        return Ok((out, fresh));
                    }
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let result = self.read_dir(&dir, &mut out, &mut fresh, &mut subdirs);
            let mut q = lock();
            q.busy -= 1;
            if result.is_err() {
                q.failed = true;
            }
            q.dirs.append(&mut subdirs);
            self.wake.notify_all();
            result?;
        }
    }

    fn read_dir(
        &self,
        rel_dir: &Path,
        out: &mut Vec<Scanned>,
        fresh: &mut StatCache,
        subdirs: &mut Vec<PathBuf>,
    ) -> Result<(), SyncError> {
        let abs_dir = self.root.join(rel_dir);
        for dir_entry in std::fs::read_dir(&abs_dir).map_err(SyncError::io(&abs_dir))? {
            let dir_entry = dir_entry.map_err(SyncError::io(&abs_dir))?;
            if rel_dir.as_os_str().is_empty()
                && dir_entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(STAGING_PREFIX)
            {
                // A restore's staging directory (or one a crash left): not the branch's.
                continue;
            }
            let rel = rel_dir.join(dir_entry.file_name());
            // lstat relative to the open directory: no path walk from the root per file.
            let meta = dir_entry
                .metadata()
                .map_err(SyncError::io(&dir_entry.path()))?;
            let ft = meta.file_type();
            // The walk never enters an excluded directory, so the path itself is all to match.
            if self.excludes.is_excluded_here(&rel, ft.is_dir()) {
                continue;
            }
            let path = rel_string(&rel)?;
            let mode = meta.permissions().mode() & 0o7777;
            if ft.is_dir() {
                out.push(Scanned::Dir { path, mode });
                subdirs.push(rel);
            } else if ft.is_symlink() {
                let abs = dir_entry.path();
                let target = std::fs::read_link(&abs).map_err(SyncError::io(&abs))?;
                let target = rel_string(&target)?;
                out.push(Scanned::Symlink { path, target });
            } else if ft.is_file() {
                let key = StatKey::of(&meta);
                let hash = match self.cache.get(&path) {
                    Some((k, h)) if *k == key => h.clone(),
                    _ => hash_file(&dir_entry.path())?,
                };
                if self.now_ns - key.mtime_ns > 2_000_000_000
                    && self.now_ns - key.ctime_ns > 2_000_000_000
                {
                    fresh.insert(path.clone(), (key.clone(), hash.clone()));
                }
                out.push(Scanned::File {
                    path,
                    mode,
                    size: key.size,
                    hash,
                });
            }
            // Sockets, fifos and devices are not part of a workspace snapshot.
        }
        Ok(())
    }
}

/// Does `scanned` describe exactly the manifest's tree (content, modes, links, directories)?
pub fn matches(manifest: &Manifest, scanned: &[Scanned]) -> bool {
    manifest
        .entries
        .iter()
        .map(Entry::item)
        .eq(scanned.iter().map(Scanned::item))
}

/// One path of a tree as a snapshot sees it: what [`matches`] compares and [`tree_digest`]
/// hashes, the same whether it comes from a walk or from a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeItem<'a> {
    Dir(&'a str, u32),
    Symlink(&'a str, &'a str),
    /// path, mode, size, content hash.
    File(&'a str, u32, u64, &'a str),
}

impl Entry {
    pub fn item(&self) -> TreeItem<'_> {
        match self {
            Entry::Dir { path, mode } => TreeItem::Dir(path, *mode),
            Entry::Symlink { path, target } => TreeItem::Symlink(path, target),
            Entry::File {
                path,
                mode,
                size,
                hash,
                ..
            } => TreeItem::File(path, *mode, *size, hash),
        }
    }
}

impl Scanned {
    pub fn item(&self) -> TreeItem<'_> {
        match self {
            Scanned::Dir { path, mode } => TreeItem::Dir(path, *mode),
            Scanned::Symlink { path, target } => TreeItem::Symlink(path, target),
            Scanned::File {
                path,
                mode,
                size,
                hash,
            } => TreeItem::File(path, *mode, *size, hash),
        }
    }
}

/// sha256 over a tree's items in order (every field length-prefixed or fixed-width, so no two
/// different listings encode alike): two trees with equal digests are the same snapshot tree.
/// The local index keeps the digest of the last snapshot, so a no-op push compares 32 bytes
/// instead of loading that snapshot's manifest.
pub fn tree_digest<'a>(items: impl Iterator<Item = TreeItem<'a>>) -> [u8; 32] {
    fn text(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    for item in items {
        match item {
            TreeItem::Dir(path, mode) => {
                h.update([b'd']);
                text(&mut h, path);
                h.update(mode.to_le_bytes());
            }
            TreeItem::Symlink(path, target) => {
                h.update([b'l']);
                text(&mut h, path);
                text(&mut h, target);
            }
            TreeItem::File(path, mode, size, hash) => {
                h.update([b'f']);
                text(&mut h, path);
                h.update(mode.to_le_bytes());
                h.update(size.to_le_bytes());
                text(&mut h, hash);
            }
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(entries: Vec<Entry>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: "s".into(),
            created_at_ms: 0,
            head: None,
            entries,
        }
    }

    fn file(path: &str) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            size: 0,
            hash: hash_bytes(b""),
            loc: Loc::Object,
        }
    }

    fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }

    #[test]
    fn manifests_that_escape_or_write_through_links_are_rejected() {
        assert!(validate(&m(vec![dir("a"), file("a/b"), file("c")])).is_ok());
        for bad in [
            vec![file("../evil")],
            vec![file("/etc/passwd")],
            vec![dir("a"), file("a/../../x")],
            vec![file("a/b")],
            vec![
                Entry::Symlink {
                    path: "l".into(),
                    target: "/tmp".into(),
                },
                file("l/x"),
            ],
            vec![file("b"), file("a")],
            vec![file("a"), file("a")],
            vec![file("")],
            vec![file("a//b")],
            vec![dir("a"), file("a/./b")],
            vec![file("a/")],
            vec![file("a\0b")],
            vec![file(".weldr-restore-x")],
            // One path both a file and a directory's parent.
            vec![file("a"), dir("a"), file("a/b")],
            vec![file("a"), file("a/b")],
        ] {
            assert!(validate(&m(bad.clone())).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn links_that_leave_the_tree_are_found() {
        let links: HashMap<&str, &str> = [("d/up", ".."), ("dot", "."), ("d/in", "../x")]
            .into_iter()
            .collect();
        for (path, target, leaves) in [
            ("l", "x", false),
            ("d/l", "../x", false),
            ("d/e/l", "../../x", false),
            ("l", "/etc", true),
            ("l", "../x", true),
            ("d/l", "../../x", true),
            ("d/l", "./../a/../../x", true),
            // Through the snapshot's own links: `d/up` is the root, `dot` is the root.
            ("d/l", "up/x", false),
            ("d/l", "up/../x", true),
            ("l", "dot/dot/../x", true),
            ("l", "d/in", false),
        ] {
            assert_eq!(
                link_leaves_tree(&links, path, target),
                leaves,
                "{path} -> {target}"
            );
        }
        let loops: HashMap<&str, &str> = [("a", "b"), ("b", "a")].into_iter().collect();
        assert!(link_leaves_tree(&loops, "l", "a"));
    }

    #[test]
    fn scan_sees_modes_links_and_empty_dirs_and_skips_excludes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("e/f")).unwrap();
        std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
        std::fs::write(root.join("node_modules/x/i.js"), "x").unwrap();
        std::fs::write(root.join("run"), "x").unwrap();
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("run", root.join("l")).unwrap();
        let mut fresh = StatCache::new();
        let s = scan(root, &StatCache::new(), &mut fresh).unwrap();
        let paths: Vec<_> = s.iter().map(Scanned::path).collect();
        assert_eq!(paths, ["e", "e/f", "l", "run"]);
        assert!(matches!(&s[3], Scanned::File { mode: 0o750, .. }));
        assert!(matches!(&s[2], Scanned::Symlink { target, .. } if target == "run"));
    }
}
