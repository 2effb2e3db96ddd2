//! Branch snapshots in object storage: push, pull and verify.
//!
//! A push walks the branch directory (the excludes aside), uploads only content the store does
//! not have yet (small files packed together, big files streamed as their own multipart
//! objects), then writes the manifest and, last, the `latest` pointer: a crash mid-push leaves
//! the previous snapshot whole. See [`manifest`] for the layout.
//!
//! A restore treats the bucket as untrusted (whoever can write it must not reach outside the
//! branch, and restores run as root):
//! - manifests, packs and the `latest` pointer are read with size caps, and a manifest is
//!   refused unless every path is plain and relative (no `..`, no empty component, no NUL),
//!   listed once in order, with its parent listed as a directory: no path is both a file and a
//!   directory's parent, no entry lies under a symlink;
//! - a symlink whose target leaves the branch (absolute, or `..` above the root, resolved
//!   lexically from the link's directory through the snapshot's other links) is restored as a
//!   plain file holding the target text, as git does where links are off;
//! - files lose setuid, setgid and sticky bits; `.git/config` is restored without the keys that
//!   redirect git ([`crate::git::sanitize_config`]);
//! - the new tree is built in a hidden staging directory at the top of the branch directory
//!   (the same file system, also inside a layered branch's overlay, so every move is a rename):
//!   every download and hash check, every link and file, is done there before the first change
//!   to the branch. Then a swap moves what the snapshot does not keep into that directory and
//!   the new entries into place, each step journaled; if a step fails the journal is undone in
//!   reverse, so the branch ends as it was (contents, modes, links; directory times aside).
//!   Only a crash during the swap (renames only) can leave it half-way; the next restore
//!   finishes it and removes the leftover staging directory;
//! - everything is opened relative to the branch directory one component at a time with
//!   `O_NOFOLLOW` ([`crate::fsx`]): a restore never follows a symlink, neither
//!   one in the snapshot nor one in the branch (excluded paths included).

pub mod dirty;
mod index;
pub mod manifest;
pub mod store;
pub mod syncer;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::branches::layout::{BranchKey, branch_dir};
use crate::config::Config;
use crate::excludes::Excludes;
use crate::fsx::{Dir, Kind, Stat};
use index::{IndexFiles, LocalIndex};
use manifest::{Entry, Loc, Manifest, Scanned, StatCache};
pub use store::{Store, bucket_name};

/// Files below this size go into packs; bigger ones are objects of their own.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;
/// A pack is written once it holds this much.
pub const PACK_TARGET: usize = 8 << 20;
/// Multipart chunk size for big objects (memory per upload stays about this).
pub const CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("object store: {0}")]
    Store(String),
    #[error("network: {0}")]
    Network(String),
    #[error("file system: {0}")]
    Io(String),
    #[error("corrupt snapshot: {0}")]
    Corrupt(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("push aborted: {0}")]
    Aborted(String),
    /// The latest snapshot holds work this tree's history does not contain: pushing would hide
    /// it. Nothing was written; both stay.
    #[error("push refused: {0}")]
    Diverged(String),
}

impl SyncError {
    pub(crate) fn store(what: &str, e: opendal::Error) -> Self {
        SyncError::Store(format!(
            "{what}: {e}; check S3_ENDPOINT, the credentials and the network, then retry"
        ))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
        move |e| SyncError::Io(format!("{}: {e}", path.display()))
    }
}

/// What a push did (the `POST .../sync` answer and the `sync` event's fields).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushReport {
    pub bucket: String,
    pub snapshot_id: String,
    /// True when the tree matched the latest snapshot and nothing was written.
    pub unchanged: bool,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    /// Store requests made (a multipart upload counts once per chunk).
    pub requests: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", tag = "status")]
pub enum PullReport {
    Restored {
        bucket: String,
        snapshot_id: String,
        files: u64,
        bytes: u64,
        requests: u64,
        duration_ms: u64,
    },
    /// No snapshot in the store (the original: `REASON=bucket_not_found`).
    Skipped { bucket: String },
}

/// Called as content moves: (bytes done, bytes in total) of this push's uploads or this pull's
/// downloads. The CLI draws its progress line with it.
#[derive(Clone)]
pub struct Progress(pub std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Byte counter behind a [`Progress`] callback.
struct Meter<'a> {
    progress: Option<&'a Progress>,
    done: AtomicU64,
    total: u64,
}

impl<'a> Meter<'a> {
    fn new(progress: Option<&'a Progress>, total: u64) -> Self {
        let meter = Self {
            progress,
            done: AtomicU64::new(0),
            total,
        };
        meter.add(0);
        meter
    }

    fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = self.progress {
            (p.0)(done.min(self.total), self.total);
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Test hook: fail after this many content uploads, before the manifest (a simulated crash).
    pub fail_after_uploads: Option<u64>,
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub progress: Option<Progress>,
}

/// The object store of one branch (no request is made).
fn open_store(config: &Config, key: &BranchKey) -> Result<Store, SyncError> {
    Store::open(config, &key.project_id, &key.branch_id)
}

fn store_identity(config: &Config, store: &Store) -> String {
    match &config.s3.access_key_id {
        Some(_) => format!("s3:{}/{}", config.s3.endpoint, store.bucket),
        None => format!(
            "fs:{}",
            config.object_store_dir.join(&store.bucket).display()
        ),
    }
}

fn new_snapshot_id() -> String {
    let ms = now_ms();
    let mut rand = [0u8; 4];
    let _ = getrandom::fill(&mut rand);
    format!("{ms:013}-{}", hex::encode(rand))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SyncError> + Send + 'static,
) -> Result<T, SyncError> {
    crate::background::low_priority(f)
        .await
        .map_err(|e| SyncError::Io(e.to_string()))?
}

/// The manifest of `id`, or of `latest` when None. Ok(None): no snapshot (or no bucket) yet.
async fn fetch_manifest(store: &Store, id: Option<&str>) -> Result<Option<Manifest>, SyncError> {
    let id = match id {
        Some(id) => id.to_string(),
        None => match store
            .get_capped("latest", manifest::MAX_POINTER_BYTES)
            .await?
        {
            None => return Ok(None),
            Some(bytes) => String::from_utf8(bytes)
                .map_err(|_| SyncError::Corrupt("the latest pointer is not text".into()))?
                .trim()
                .to_string(),
        },
    };
    manifest::check_snapshot_id(&id)?;
    let Some(bytes) = store
        .get_capped(&manifest::manifest_path(&id), manifest::MAX_MANIFEST_BYTES)
        .await?
    else {
        return Err(SyncError::NotFound(format!(
            "snapshot {id} does not exist in bucket {}",
            store.bucket
        )));
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| SyncError::Corrupt(format!("manifest of snapshot {id}: {e}")))?;
    manifest::validate(&m)?;
    if m.version != manifest::MANIFEST_VERSION || m.id != id {
        return Err(SyncError::Corrupt(format!(
            "manifest of snapshot {id} has version {} and id {}; this agent reads version {}",
            m.version,
            m.id,
            manifest::MANIFEST_VERSION
        )));
    }
    Ok(Some(m))
}

/// Push the branch directory as a new snapshot (or nothing when it matches the latest one).
pub async fn push(config: &Config, key: &BranchKey) -> Result<PushReport, SyncError> {
    push_with(config, key, &PushOptions::default()).await
}

/// [`push`] with options. The phases, in order: read `latest`, walk the tree, stop early when
/// the index or the latest manifest already has this tree, plan and run the uploads, write the
/// manifest, move `latest` to it (last: a crash before leaves the previous snapshot whole) and
/// record what was pushed in the local index.
pub async fn push_with(
    config: &Config,
    key: &BranchKey,
    options: &PushOptions,
) -> Result<PushReport, SyncError> {
    let started = Instant::now();
    let dir = existing_branch_dir(config, key).await?;
    let store = open_store(config, key)?;
    let files_at = IndexFiles::new(config, key);
    let mut index = files_at.load(&store_identity(config, &store)).await;

    let latest = read_latest(&store).await?;
    let tree = scan_tree(&dir, &mut index).await?;
    let totals = tree.totals;
    let unchanged = |snapshot_id: String| push_report(&store, started, totals, snapshot_id, None);

    // The tree is the one this machine last pushed or pulled, and that is still the latest
    // snapshot: nothing to do, and nothing more to read.
    let known_latest = matches!((&latest, &index.snapshot), (Some(l), Some((id, _))) if l == id);
    let same_tree = matches!(&index.snapshot, Some((_, d)) if *d == tree.digest);
    if known_latest && same_tree {
        let id = latest.unwrap_or_default();
        if !tree.stat_unchanged {
            files_at.save(index, None).await;
        }
        return Ok(unchanged(id));
    }

    let previous = previous_manifest(&store, &files_at, latest.as_deref(), known_latest).await?;
    // A `latest` this machine did not push or pull (another machine's, or this branch's from
    // before its store was lost): the tree must descend from it, or the push would hide it.
    let head = local_head(&dir).await;
    if !known_latest
        && let Some(prev) = &previous
        && let Some(theirs) = &prev.head
        && !descends(&dir, head.as_deref(), theirs).await
    {
        return Err(SyncError::Diverged(format!(
            "the latest snapshot {} of {}/{} is at commit {theirs}, which this branch's history \
             (at {}) does not contain; pushing would hide that work. Restore the branch from \
             the snapshot (`weldr-agent pull`), or move the newer work onto it, then push",
            prev.id,
            key.project_id,
            key.branch_id,
            head.as_deref().unwrap_or("no commit")
        )));
    }
    if let Some(prev) = &previous
        && manifest::matches(prev, &tree.scanned)
    {
        // Someone else pushed this very tree, or the index was lost: remember it now.
        let id = prev.id.clone();
        record(&files_at, index, id.clone(), tree.digest, previous).await;
        return Ok(unchanged(id));
    }

    let plan = plan_uploads(tree.scanned, previous.as_ref());
    let (entries, uploaded) = upload(&store, &dir, options, plan).await?;
    let m = write_manifest(&store, entries, head).await?;
    move_latest(&store, &m.id).await?;
    let report = push_report(&store, started, totals, m.id.clone(), Some(uploaded));
    record(&files_at, index, m.id.clone(), tree.digest, Some(m)).await;
    Ok(report)
}

/// The branch directory (a layered branch's overlay mounted), or `NotFound` when there is
/// none to push.
async fn existing_branch_dir(config: &Config, key: &BranchKey) -> Result<PathBuf, SyncError> {
    let dir = mounted_branch_dir(config, key).await?;
    if !dir.is_dir() {
        return Err(SyncError::NotFound(format!(
            "branch directory {} does not exist; create or pull the branch first",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The snapshot id `latest` names in `key`'s store (None: nothing pushed, or no bucket).
pub async fn latest_snapshot(
    config: &Config,
    key: &BranchKey,
) -> Result<Option<String>, SyncError> {
    let s3 = &config.s3;
    if s3.access_key_id.is_none() || s3.secret_access_key.is_none() {
        // The fs store: opening it would make its directory; a look is enough.
        let root = config
            .object_store_dir
            .join(store::bucket_name(&key.project_id, &key.branch_id));
        if !std::fs::symlink_metadata(root.join("latest")).is_ok_and(|m| m.is_file()) {
            return Ok(None);
        }
    }
    let store = open_store(config, key)?;
    read_latest(&store).await
}

/// One request: the snapshot id `latest` names now (None: nothing pushed yet). Checked only
/// where it is used to read a manifest.
async fn read_latest(store: &Store) -> Result<Option<String>, SyncError> {
    Ok(store
        .get_capped("latest", manifest::MAX_POINTER_BYTES)
        .await?
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string()))
}

/// Files and bytes of a walked tree.
#[derive(Clone, Copy)]
struct Totals {
    files: u64,
    bytes: u64,
}

/// A walked branch directory.
struct Tree {
    /// Every entry (the excludes aside), in manifest order, files hashed.
    scanned: Vec<Scanned>,
    /// Of the whole tree: equal digests mean equal trees ([`manifest::tree_digest`]).
    digest: [u8; 32],
    /// The walk found every file as the stat cache had it (the index needs no saving).
    stat_unchanged: bool,
    totals: Totals,
}

/// Walk and hash the tree off the runtime. A file is re-hashed unless its stat key is the
/// one cached with its hash; afterwards `index.stat` holds this walk's cache.
async fn scan_tree(dir: &Path, index: &mut LocalIndex) -> Result<Tree, SyncError> {
    let cache = std::mem::take(&mut index.stat);
    let root = dir.to_path_buf();
    let (scanned, fresh, stat_unchanged, digest) = blocking(move || {
        let mut fresh = StatCache::new();
        let scanned = manifest::scan(&root, &cache, &mut fresh)?;
        let unchanged = fresh == cache;
        let digest = manifest::tree_digest(scanned.iter().map(Scanned::item));
        Ok((scanned, fresh, unchanged, digest))
    })
    .await?;
    index.stat = fresh;
    let totals = Totals {
        files: scanned
            .iter()
            .filter(|s| matches!(s, Scanned::File { .. }))
            .count() as u64,
        bytes: scanned
            .iter()
            .map(|s| match s {
                Scanned::File { size, .. } => *size,
                _ => 0,
            })
            .sum(),
    };
    Ok(Tree {
        scanned,
        digest,
        stat_unchanged,
        totals,
    })
}

/// The manifest `latest` names, from the local copy when the index says it is that snapshot
/// (no request), else from the store. None: no snapshot yet, and the bucket now exists.
async fn previous_manifest(
    store: &Store,
    files_at: &IndexFiles,
    latest: Option<&str>,
    known_latest: bool,
) -> Result<Option<Manifest>, SyncError> {
    match latest {
        None => {
            store.ensure_bucket().await?;
            Ok(None)
        }
        Some(id) if known_latest => match files_at.load_manifest(id).await {
            Some(m) => Ok(Some(m)),
            None => fetch_manifest(store, Some(id)).await,
        },
        Some(id) => fetch_manifest(store, Some(id)).await,
    }
}

/// What a push must upload, and the new manifest's entries around it.
struct UploadPlan {
    /// In scan order. Content the store has keeps its location; content to upload has a
    /// placeholder until its job (or, for a duplicate, the first copy's job) is done.
    entries: Vec<Entry>,
    jobs: Vec<Job>,
    /// (entry, earlier entry with the same content planned for upload in this push).
    dups: Vec<(usize, usize)>,
    /// Bytes the jobs upload.
    bytes: u64,
}

/// Plan the uploads: new small files grouped into packs, new big files as objects; content
/// already stored (or planned) is referenced, not uploaded again.
fn plan_uploads(scanned: Vec<Scanned>, previous: Option<&Manifest>) -> UploadPlan {
    // Content the store already has, by hash.
    let mut known: HashMap<String, Loc> = HashMap::new();
    if let Some(prev) = previous {
        for e in &prev.entries {
            if let Entry::File { hash, loc, .. } = e {
                known.insert(hash.clone(), loc.clone());
            }
        }
    }

    let mut plan = UploadPlan {
        entries: Vec::with_capacity(scanned.len()),
        jobs: Vec::new(),
        dups: Vec::new(),
        bytes: 0,
    };
    let mut current: Vec<PackItem> = Vec::new();
    let mut current_bytes = 0u64;
    let mut planned: HashMap<String, usize> = HashMap::new();
    for s in scanned {
        match s {
            Scanned::Dir { path, mode } => plan.entries.push(Entry::Dir { path, mode }),
            Scanned::Symlink { path, target } => plan.entries.push(Entry::Symlink { path, target }),
            Scanned::File {
                path,
                mode,
                size,
                hash,
            } => {
                let i = plan.entries.len();
                let loc = if let Some(loc) = known.get(&hash) {
                    loc.clone()
                } else if let Some(&first) = planned.get(&hash) {
                    // Same content as an earlier file of this push: filled in after the upload.
                    plan.dups.push((i, first));
                    Loc::Object
                } else {
                    planned.insert(hash.clone(), i);
                    plan.bytes += size;
                    if size >= SMALL_FILE_LIMIT {
                        plan.jobs.push(Job::Big {
                            path: path.clone(),
                            hash: hash.clone(),
                        });
                        Loc::Object
                    } else {
                        current.push(PackItem {
                            entry: i,
                            path: path.clone(),
                            hash: hash.clone(),
                            size,
                        });
                        current_bytes += size;
                        if current_bytes >= PACK_TARGET as u64 {
                            plan.jobs.push(Job::Pack(std::mem::take(&mut current)));
                            current_bytes = 0;
                        }
                        Loc::Pack {
                            pack: String::new(),
                            offset: 0,
                        }
                    }
                };
                plan.entries.push(Entry::File {
                    path,
                    mode,
                    size,
                    hash,
                    loc,
                });
            }
        }
    }
    if !current.is_empty() {
        plan.jobs.push(Job::Pack(current));
    }
    plan
}

/// What the uploads of a push wrote.
#[derive(Clone, Copy)]
struct Uploaded {
    objects: u64,
    bytes: u64,
}

/// Run the planned uploads concurrently and return the entries with every location filled
/// in. The first failure stops the push before any manifest is written.
async fn upload(
    store: &Store,
    dir: &Path,
    options: &PushOptions,
    plan: UploadPlan,
) -> Result<(Vec<Entry>, Uploaded), SyncError> {
    let UploadPlan {
        mut entries,
        jobs,
        dups,
        bytes,
    } = plan;
    let meter = Meter::new(options.progress.as_ref(), bytes);
    let started_uploads = AtomicU64::new(0);
    let mut uploaded = Uploaded {
        objects: 0,
        bytes: 0,
    };
    let ctx = JobCtx {
        store,
        dir,
        options,
        started: &started_uploads,
        meter: &meter,
    };
    let mut results = futures_util::stream::iter(jobs)
        .map(|job| run_job(&ctx, job))
        .buffer_unordered(UPLOAD_CONCURRENCY);
    while let Some(result) = results.next().await {
        let (placed, len) = result?;
        uploaded.objects += 1;
        uploaded.bytes += len;
        for (i, pack, off) in placed {
            if let Entry::File {
                loc: Loc::Pack { pack: p, offset },
                ..
            } = &mut entries[i]
            {
                *p = pack;
                *offset = off;
            }
        }
    }
    for (i, first) in dups {
        let loc = match &entries[first] {
            Entry::File { loc, .. } => loc.clone(),
            _ => continue,
        };
        if let Entry::File { loc: l, .. } = &mut entries[i] {
            *l = loc;
        }
    }
    Ok((entries, uploaded))
}

/// Write the manifest of a new snapshot. Every object it names is in the store already;
/// nothing points at it until [`move_latest`].
async fn write_manifest(
    store: &Store,
    entries: Vec<Entry>,
    head: Option<String>,
) -> Result<Manifest, SyncError> {
    let id = new_snapshot_id();
    let m = Manifest {
        version: manifest::MANIFEST_VERSION,
        id: id.clone(),
        created_at_ms: now_ms(),
        head,
        entries,
    };
    let body =
        serde_json::to_vec(&m).map_err(|e| SyncError::Io(format!("encode the manifest: {e}")))?;
    store.put(&manifest::manifest_path(&id), body).await?;
    Ok(m)
}

/// The branch's git HEAD commit (None when the directory is not a repository).
async fn local_head(dir: &Path) -> Option<String> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || crate::git::head(&dir).ok())
        .await
        .ok()
        .flatten()
}

/// Does the history at `head` contain commit `ancestor`?
async fn descends(dir: &Path, head: Option<&str>, ancestor: &str) -> bool {
    let Some(head) = head.map(str::to_string) else {
        return false;
    };
    let (dir, ancestor) = (dir.to_path_buf(), ancestor.to_string());
    tokio::task::spawn_blocking(move || crate::git::contains(&dir, &head, &ancestor))
        .await
        .unwrap_or(false)
}

/// Make `id` the latest snapshot: the one write that publishes a push.
async fn move_latest(store: &Store, id: &str) -> Result<(), SyncError> {
    store.put("latest", id.as_bytes().to_vec()).await
}

/// Remember in the local index that the tree with `digest` is snapshot `id` (and keep its
/// manifest when given), so that the next push of the same tree reads nothing else.
async fn record(
    files_at: &IndexFiles,
    mut index: LocalIndex,
    id: String,
    digest: [u8; 32],
    manifest: Option<Manifest>,
) {
    index.snapshot = Some((id, digest));
    files_at.save(index, manifest).await;
}

/// The answer of a push: `uploaded` None when nothing was written.
fn push_report(
    store: &Store,
    started: Instant,
    totals: Totals,
    snapshot_id: String,
    uploaded: Option<Uploaded>,
) -> PushReport {
    PushReport {
        bucket: store.bucket.clone(),
        snapshot_id,
        unchanged: uploaded.is_none(),
        files: totals.files,
        bytes: totals.bytes,
        uploaded_objects: uploaded.map_or(0, |u| u.objects),
        uploaded_bytes: uploaded.map_or(0, |u| u.bytes),
        requests: store.requests(),
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// Uploads running at once (each holds at most one pack or one multipart chunk in memory).
const UPLOAD_CONCURRENCY: usize = 4;

/// (entry index, pack name, offset) of files written into a pack.
type Placed = Vec<(usize, String, u64)>;

struct PackItem {
    entry: usize,
    path: String,
    hash: String,
    size: u64,
}

enum Job {
    Pack(Vec<PackItem>),
    Big { path: String, hash: String },
}

struct JobCtx<'a> {
    store: &'a Store,
    dir: &'a Path,
    options: &'a PushOptions,
    started: &'a AtomicU64,
    meter: &'a Meter<'a>,
}

impl JobCtx<'_> {
    fn before_upload(&self) -> Result<(), SyncError> {
        let n = self.started.fetch_add(1, Ordering::SeqCst);
        if let Some(limit) = self.options.fail_after_uploads
            && n >= limit
        {
            return Err(SyncError::Aborted(format!(
                "stopped after {limit} uploads (test hook)"
            )));
        }
        Ok(())
    }
}

/// Upload one pack or big object. Returns the pack placements (entry, pack, offset) and the
/// bytes uploaded.
async fn run_job(ctx: &JobCtx<'_>, job: Job) -> Result<(Placed, u64), SyncError> {
    match job {
        Job::Big { path, hash } => {
            ctx.before_upload()?;
            let len = upload_big(ctx.store, ctx.dir, &path, &hash, ctx.meter).await?;
            Ok((Vec::new(), len))
        }
        Job::Pack(items) => {
            let dir = ctx.dir.to_path_buf();
            let (data, offsets) = blocking(move || {
                let mut data = Vec::new();
                let mut offsets = Vec::with_capacity(items.len());
                for item in items {
                    let abs = dir.join(&item.path);
                    let bytes = std::fs::read(&abs).map_err(SyncError::io(&abs))?;
                    if bytes.len() as u64 != item.size || manifest::hash_bytes(&bytes) != item.hash
                    {
                        return Err(changed_during_push(&abs));
                    }
                    offsets.push((item.entry, data.len() as u64));
                    data.extend_from_slice(&bytes);
                }
                Ok((data, offsets))
            })
            .await?;
            ctx.before_upload()?;
            let name = manifest::hash_bytes(&data);
            let len = data.len() as u64;
            ctx.store.put(&manifest::pack_path(&name), data).await?;
            ctx.meter.add(len);
            let placed = offsets
                .into_iter()
                .map(|(i, off)| (i, name.clone(), off))
                .collect();
            Ok((placed, len))
        }
    }
}

/// Stream a big file into `objects/{hash}` (multipart, bounded memory), checking that its
/// content still hashes to `hash`; otherwise the upload is aborted.
async fn upload_big(
    store: &Store,
    dir: &Path,
    path: &str,
    hash: &str,
    meter: &Meter<'_>,
) -> Result<u64, SyncError> {
    let abs = dir.join(path);
    let mut file = tokio::fs::File::open(&abs)
        .await
        .map_err(SyncError::io(&abs))?;
    let object = manifest::object_path(hash);
    let mut writer = store
        .operator()
        .writer_with(&object)
        .chunk(CHUNK)
        .await
        .map_err(|e| SyncError::store(&format!("start upload of {object}"), e))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let result: Result<(), SyncError> = async {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < buf.len() {
                let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf[filled..])
                    .await
                    .map_err(SyncError::io(&abs))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            hasher.update(&buf);
            total += filled as u64;
            store.count();
            writer
                .write(buf)
                .await
                .map_err(|e| SyncError::store(&format!("upload {object}"), e))?;
            meter.add(filled as u64);
            if filled < CHUNK {
                break;
            }
        }
        if hex::encode(hasher.finalize_reset()) != hash {
            return Err(changed_during_push(&abs));
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer
        .close()
        .await
        .map_err(|e| SyncError::store(&format!("finish upload of {object}"), e))?;
    Ok(total)
}

fn changed_during_push(path: &Path) -> SyncError {
    SyncError::Io(format!(
        "{} changed while it was being pushed; push again once writes settle",
        path.display()
    ))
}

/// Restore the latest snapshot (or `snapshot_id`) into the branch directory.
pub async fn pull(
    config: &Config,
    key: &BranchKey,
    snapshot_id: Option<&str>,
) -> Result<PullReport, SyncError> {
    pull_with(config, key, snapshot_id, &PullOptions::default()).await
}

/// [`pull`] with progress reports.
pub async fn pull_with(
    config: &Config,
    key: &BranchKey,
    snapshot_id: Option<&str>,
    options: &PullOptions,
) -> Result<PullReport, SyncError> {
    let dir = mounted_branch_dir(config, key).await?;
    pull_into_with(config, key, snapshot_id, &dir, options).await
}

/// The branch's directory, with a layered branch's overlay mounted (the CLI may run after a
/// reboot, before any server did): never push the bare mount point as the branch, nor restore
/// into it, where the mount would hide the files.
async fn mounted_branch_dir(config: &Config, key: &BranchKey) -> Result<PathBuf, SyncError> {
    crate::branches::layers::mounted_dir(config, &key.project_id, &key.branch_id)
        .await
        .map_err(|e| SyncError::Io(format!("mounting branch {key}: {e}")))
}

/// Restore into `target` (created when missing). Every file is downloaded, verified and put
/// together in a staging directory inside `target` before anything in `target` changes; then
/// the swap puts the snapshot in place and removes what it does not have (excluded paths
/// stay). On error `target` is left as it was (and removed if this call created it).
pub async fn pull_into(
    config: &Config,
    key: &BranchKey,
    snapshot_id: Option<&str>,
    target: &Path,
) -> Result<PullReport, SyncError> {
    let options = PullOptions::default();
    pull_into_with(config, key, snapshot_id, target, &options).await
}

pub async fn pull_into_with(
    config: &Config,
    key: &BranchKey,
    snapshot_id: Option<&str>,
    target: &Path,
    options: &PullOptions,
) -> Result<PullReport, SyncError> {
    let started = Instant::now();
    let store = open_store(config, key)?;
    let Some(m) = fetch_manifest(&store, snapshot_id).await? else {
        return Ok(PullReport::Skipped {
            bucket: store.bucket.clone(),
        });
    };
    let t = target.to_path_buf();
    let (root, staging, staging_name, created) = blocking(move || prepare(&t)).await?;
    let (root, staging) = (Arc::new(root), Arc::new(staging));

    let total: u64 = m
        .entries
        .iter()
        .map(|e| match e {
            Entry::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    let meter = Meter::new(options.progress.as_ref(), total);
    let staged = stage(&store, &m, &staging, &meter).await;
    let m = Arc::new(m);
    let result = match staged {
        Ok(()) => {
            let (m2, root2, staging2, name2, target2) = (
                m.clone(),
                root.clone(),
                staging.clone(),
                staging_name.clone(),
                target.to_path_buf(),
            );
            blocking(move || {
                let placed = finish_staging(&m2, &staging2)?;
                swap(&m2, &root2, &name2, &target2, &placed)
            })
            .await
        }
        Err(e) => Err(e),
    };
    let (t, failed) = (target.to_path_buf(), result.is_err());
    let _ = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(t.join(&staging_name));
        if failed && created {
            let _ = std::fs::remove_dir(&t);
        }
    })
    .await;
    let stat = result?;
    let m = Arc::unwrap_or_clone(m);

    let files = m
        .entries
        .iter()
        .filter(|e| matches!(e, Entry::File { .. }))
        .count() as u64;
    let bytes = m
        .entries
        .iter()
        .map(|e| match e {
            Entry::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    let report = PullReport::Restored {
        bucket: store.bucket.clone(),
        snapshot_id: m.id.clone(),
        files,
        bytes,
        requests: store.requests(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    if target == branch_dir(config, key) {
        let index = LocalIndex {
            store: store_identity(config, &store),
            snapshot: Some((
                m.id.clone(),
                manifest::tree_digest(m.entries.iter().map(Entry::item)),
            )),
            stat,
        };
        IndexFiles::new(config, key).save(index, Some(m)).await;
    }
    Ok(report)
}

/// Open (or create) `target` and make a fresh staging directory at its top: (the target,
/// the staging directory, its name, whether `target` was created here).
fn prepare(target: &Path) -> Result<(Dir, Dir, String, bool), SyncError> {
    let parent = target
        .parent()
        .ok_or_else(|| SyncError::Io(format!("{} has no parent directory", target.display())))?;
    std::fs::create_dir_all(parent).map_err(SyncError::io(parent))?;
    let created = match std::fs::create_dir(target) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(SyncError::io(target)(e)),
    };
    let opened = (|| {
        let root = Dir::open(target)?;
        let mut rand = [0u8; 6];
        let _ = getrandom::fill(&mut rand);
        let name = format!("{}{}", manifest::STAGING_PREFIX, hex::encode(rand));
        root.mkdir(&name, 0o700)?;
        let staging = root.dir(&name)?;
        Ok((root, staging, name))
    })();
    match opened {
        Ok((root, staging, name)) => Ok((root, staging, name, created)),
        Err(e) => {
            if created {
                let _ = std::fs::remove_dir(target);
            }
            Err(SyncError::io(target)(e))
        }
    }
}

/// Downloads running at once (each holds at most one pack in memory).
const DOWNLOAD_CONCURRENCY: usize = 8;

enum Fetch {
    /// A pack and the entries it holds.
    Pack(String, Vec<usize>),
    /// The entry stored as its own object.
    Object(usize),
}

/// The staged name of entry `i`.
fn staged_name(i: usize) -> String {
    format!("f{i}")
}

/// A file's mode as restored: permissions only, never setuid, setgid or sticky (the restore
/// runs as root and must not hand out a root-owned setuid file).
fn file_mode(mode: u32) -> u32 {
    mode & 0o777
}

/// Download and verify every file of `m` into `staging` (flat names: `f{n}`).
async fn stage(
    store: &Store,
    m: &Manifest,
    staging: &Arc<Dir>,
    meter: &Meter<'_>,
) -> Result<(), SyncError> {
    // One request per pack, however many files it holds.
    let mut by_pack: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        match e {
            Entry::File {
                loc: Loc::Pack { pack, .. },
                ..
            } => by_pack.entry(pack.as_str()).or_default().push(i),
            Entry::File {
                loc: Loc::Object, ..
            } => jobs.push(Fetch::Object(i)),
            _ => {}
        }
    }
    jobs.extend(
        by_pack
            .into_iter()
            .map(|(pack, idxs)| Fetch::Pack(pack.to_string(), idxs)),
    );
    // After the first failure no new download starts, but the ones under way are waited
    // for: their file writes run on threads that dropping the future would not stop, and the
    // caller removes the staging directory as soon as this returns.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let failed = &failed;
    let mut results = futures_util::stream::iter(jobs)
        .map(|job| async move {
            if failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            match job {
                Fetch::Pack(pack, idxs) => fetch_pack(store, m, staging, &pack, idxs, meter).await,
                Fetch::Object(i) => fetch_object(store, m, staging, i, meter).await,
            }
        })
        .buffer_unordered(DOWNLOAD_CONCURRENCY);
    let mut first_error = None;
    while let Some(result) = results.next().await {
        if let Err(e) = result {
            failed.store(true, Ordering::Relaxed);
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn fetch_pack(
    store: &Store,
    m: &Manifest,
    staging: &Arc<Dir>,
    pack: &str,
    idxs: Vec<usize>,
    meter: &Meter<'_>,
) -> Result<(), SyncError> {
    let ppath = manifest::pack_path(pack);
    let Some(data) = store.get_capped(&ppath, manifest::MAX_PACK_BYTES).await? else {
        return Err(SyncError::Corrupt(format!(
            "{ppath} is missing from bucket {}",
            store.bucket
        )));
    };
    let items: Vec<(usize, String, u64, u64, String, u32)> = idxs
        .into_iter()
        .filter_map(|i| match &m.entries[i] {
            Entry::File {
                path,
                size,
                hash,
                mode,
                loc: Loc::Pack { offset, .. },
            } => Some((i, path.clone(), *offset, *size, hash.clone(), *mode)),
            _ => None,
        })
        .collect();
    let staging = staging.clone();
    let bytes: u64 = items.iter().map(|(_, _, _, size, _, _)| size).sum();
    blocking(move || {
        for (i, path, offset, size, hash, mode) in items {
            let slice = usize::try_from(offset)
                .ok()
                .zip(
                    offset
                        .checked_add(size)
                        .and_then(|end| usize::try_from(end).ok()),
                )
                .and_then(|(a, b)| data.get(a..b))
                .ok_or_else(|| SyncError::Corrupt(format!("{ppath} is too short for {path}")))?;
            if manifest::hash_bytes(slice) != hash {
                return Err(SyncError::Corrupt(format!(
                    "{path}: content in {ppath} does not match its hash {hash}"
                )));
            }
            let staged = || -> std::io::Result<()> {
                let mut f = staging.create(staged_name(i), 0o600)?;
                std::io::Write::write_all(&mut f, slice)?;
                f.set_permissions(std::fs::Permissions::from_mode(file_mode(mode)))
            };
            staged().map_err(|e| SyncError::Io(format!("staging {path}: {e}")))?;
        }
        Ok(())
    })
    .await?;
    meter.add(bytes);
    Ok(())
}

/// Stream one big object into its staging file, hashing as it comes (bounded memory, and no
/// more than the manifest's size is written).
async fn fetch_object(
    store: &Store,
    m: &Manifest,
    staging: &Arc<Dir>,
    i: usize,
    meter: &Meter<'_>,
) -> Result<(), SyncError> {
    let Entry::File {
        path,
        hash,
        size,
        mode,
        ..
    } = &m.entries[i]
    else {
        return Ok(());
    };
    let object = manifest::object_path(hash);
    let staging_io = |e: std::io::Error| SyncError::Io(format!("staging {path}: {e}"));
    store.count();
    let missing = |e: &opendal::Error| {
        e.kind() == opendal::ErrorKind::NotFound || e.to_string().contains("NoSuchBucket")
    };
    let reader = match store.operator().reader_with(&object).chunk(CHUNK).await {
        Ok(r) => r,
        Err(e) if missing(&e) => {
            return Err(SyncError::Corrupt(format!(
                "{object} ({path}) is missing from bucket {}",
                store.bucket
            )));
        }
        Err(e) => return Err(SyncError::store(&format!("read {object}"), e)),
    };
    let mut stream = match reader.into_bytes_stream(..).await {
        Ok(s) => s,
        Err(e) if missing(&e) => {
            return Err(SyncError::Corrupt(format!(
                "{object} ({path}) is missing from bucket {}",
                store.bucket
            )));
        }
        Err(e) => return Err(SyncError::store(&format!("read {object}"), e)),
    };
    let (st, name, p) = (staging.clone(), staged_name(i), path.clone());
    let file = blocking(move || {
        st.create(&name, 0o600)
            .map_err(|e| SyncError::Io(format!("staging {p}: {e}")))
    })
    .await?;
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SyncError::Corrupt(format!(
                "{object} ({path}) is missing from bucket {}",
                store.bucket
            )),
            _ => SyncError::Store(format!("read {object}: {e}")),
        })?;
        hasher.update(&chunk);
        total += chunk.len() as u64;
        if total > *size {
            return Err(SyncError::Corrupt(format!(
                "{path}: {object} is bigger than its {size} bytes"
            )));
        }
        meter.add(chunk.len() as u64);
        file.write_all(&chunk).await.map_err(staging_io)?;
    }
    file.flush().await.map_err(staging_io)?;
    if total != *size || hex::encode(hasher.finalize()) != *hash {
        return Err(SyncError::Corrupt(format!(
            "{path}: {object} does not match its hash"
        )));
    }
    file.set_permissions(std::fs::Permissions::from_mode(file_mode(*mode)))
        .await
        .map_err(staging_io)?;
    Ok(())
}

/// What differs on disk from an entry of the manifest: the content hash of entries restored
/// otherwise (a link that leaves the tree, as a file; `.git/config` stripped).
type Rewritten = HashMap<usize, String>;

/// The rest of the new tree, beside the downloaded files (blocking): symlinks (those that
/// leave the tree as plain files) and a stripped `.git/config`.
fn finish_staging(m: &Manifest, staging: &Dir) -> Result<Rewritten, SyncError> {
    let links: HashMap<&str, &str> = m
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Symlink { path, target } => Some((path.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    let mut placed = Rewritten::new();
    for (i, e) in m.entries.iter().enumerate() {
        let io = |e: std::io::Error| SyncError::Io(format!("staging {}: {e}", e_path(m, i)));
        match e {
            Entry::Symlink { path, target } if manifest::link_leaves_tree(&links, path, target) => {
                tracing::warn!(
                    path,
                    target,
                    "a symlink out of the branch is restored as a file"
                );
                let mut f = staging.create(staged_name(i), 0o644).map_err(io)?;
                std::io::Write::write_all(&mut f, target.as_bytes()).map_err(io)?;
                placed.insert(i, manifest::hash_bytes(target.as_bytes()));
            }
            Entry::Symlink { target, .. } => {
                staging.symlink(target, staged_name(i)).map_err(io)?;
            }
            Entry::File { path, mode, .. } if path == ".git/config" => {
                let mut text = Vec::new();
                std::io::Read::read_to_end(
                    &mut staging.read(staged_name(i)).map_err(io)?,
                    &mut text,
                )
                .map_err(io)?;
                if let Some(clean) = crate::git::sanitize_config(&text) {
                    tracing::warn!("the snapshot's .git/config redirected git: stripped");
                    let tmp = format!("{}.s", staged_name(i));
                    let mut f = staging.create(&tmp, 0o600).map_err(io)?;
                    std::io::Write::write_all(&mut f, &clean).map_err(io)?;
                    f.set_permissions(std::fs::Permissions::from_mode(file_mode(*mode)))
                        .map_err(io)?;
                    staging.rename(&tmp, staging, staged_name(i)).map_err(io)?;
                    placed.insert(i, manifest::hash_bytes(&clean));
                }
            }
            _ => {}
        }
    }
    Ok(placed)
}

fn e_path(m: &Manifest, i: usize) -> &str {
    m.entries[i].path()
}

/// One change the swap made to the branch directory (paths relative to it), to undo it.
enum Undo {
    /// `from` (directory, name) was renamed to `to`.
    Moved((PathBuf, OsString), (PathBuf, OsString)),
    /// This directory was created.
    Made(PathBuf, OsString),
    /// This directory was removed (emptied first), with this mode and owner.
    Removed(PathBuf, OsString, Stat),
    /// This directory had this mode.
    Chmod(PathBuf, u32),
}

/// The swap's moves, journaled.
struct Swap<'a> {
    root: &'a Dir,
    /// The staging directory (relative): what the swap takes out goes there as `t{n}`.
    staging: PathBuf,
    journal: Vec<Undo>,
    trash: usize,
}

impl Swap<'_> {
    fn rename(&mut self, from: (&Path, &OsStr), to: (&Path, &OsStr)) -> std::io::Result<()> {
        let (a, b) = (self.root.walk(from.0)?, self.root.walk(to.0)?);
        a.rename(from.1, &b, to.1)?;
        self.journal.push(Undo::Moved(
            (from.0.to_path_buf(), from.1.to_os_string()),
            (to.0.to_path_buf(), to.1.to_os_string()),
        ));
        Ok(())
    }

    fn chmod(&mut self, rel: &Path, old: u32, new: u32) -> std::io::Result<()> {
        self.journal.push(Undo::Chmod(rel.to_path_buf(), old));
        self.root.walk(rel)?.chmod(new)
    }

    /// Move whatever is at `dir/name` out of the tree into the staging directory.
    fn discard(&mut self, dir: &Path, name: &OsStr) -> std::io::Result<()> {
        let to = OsString::from(format!("t{}", self.trash));
        self.trash += 1;
        let staging = self.staging.clone();
        self.move_entry(dir, name, &staging, &to)
    }

    /// Rename an entry; a directory the file system will not rename (overlayfs without
    /// `redirect_dir` answers EXDEV for one from a lower layer) moves child by child.
    fn move_entry(
        &mut self,
        dir: &Path,
        name: &OsStr,
        to_dir: &Path,
        to: &OsStr,
    ) -> std::io::Result<()> {
        match self.rename((dir, name), (to_dir, to)) {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let parent = self.root.walk(dir)?;
                let st = parent.stat(name)?.ok_or(e)?;
                if st.kind != Kind::Dir {
                    return Err(std::io::Error::from_raw_os_error(libc::EXDEV));
                }
                self.root.walk(to_dir)?.mkdir(to, 0o700)?;
                self.journal
                    .push(Undo::Made(to_dir.to_path_buf(), to.to_os_string()));
                let (from_rel, to_rel) = (dir.join(name), to_dir.join(to));
                for child in parent.dir(name)?.names()? {
                    self.move_entry(&from_rel, &child, &to_rel, &child)?;
                }
                parent.rmdir(name)?;
                self.journal
                    .push(Undo::Removed(dir.to_path_buf(), name.to_os_string(), st));
                Ok(())
            }
            other => other,
        }
    }

    /// Undo every step, last first. The first failure is reported (the rest is still tried).
    fn rollback(&mut self) -> Result<(), std::io::Error> {
        let mut first = Ok(());
        while let Some(step) = self.journal.pop() {
            let r = match &step {
                Undo::Moved((dir, name), (to_dir, to)) => self
                    .root
                    .walk(to_dir)
                    .and_then(|b| Ok((b, self.root.walk(dir)?)))
                    .and_then(|(b, a)| b.rename(to, &a, name)),
                Undo::Made(dir, name) => self.root.walk(dir).and_then(|d| d.rmdir(name)),
                Undo::Removed(dir, name, st) => self.root.walk(dir).and_then(|d| {
                    d.mkdir(name, 0o700)?;
                    let made = d.dir(name)?;
                    let _ = made.chown(st.uid, st.gid);
                    made.chmod(st.mode)
                }),
                Undo::Chmod(rel, mode) => self.root.walk(rel).and_then(|d| d.chmod(*mode)),
            };
            if let Err(e) = r
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

/// Put the staged tree in place of `root`'s (blocking); see the module doc. Returns the stat
/// cache of the result.
fn swap(
    m: &Manifest,
    root: &Dir,
    staging_name: &str,
    target: &Path,
    placed: &Rewritten,
) -> Result<StatCache, SyncError> {
    let excludes = Excludes::for_dir(target);
    let mut sw = Swap {
        root,
        staging: PathBuf::from(staging_name),
        journal: Vec::new(),
        trash: 0,
    };
    let result = swap_steps(m, &mut sw, staging_name, &excludes, placed);
    match result {
        Ok(stat) => Ok(stat),
        Err((path, e)) => {
            let undo = sw.rollback();
            let undo = match undo {
                Ok(()) => "the branch directory is as it was".to_string(),
                Err(u) => format!("undoing it failed too ({u}); restore again"),
            };
            Err(SyncError::Io(format!(
                "{}: {e}; {undo}",
                target.join(path).display()
            )))
        }
    }
}

fn swap_steps(
    m: &Manifest,
    sw: &mut Swap<'_>,
    staging_name: &str,
    excludes: &Excludes,
    placed: &Rewritten,
) -> Result<StatCache, (PathBuf, std::io::Error)> {
    let wanted: HashMap<&str, &Entry> = m.entries.iter().map(|e| (e.path(), e)).collect();
    let root = sw.root;
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    // 1. Take out what the snapshot does not have (or has as another kind); excluded paths
    // stay, unless the snapshot has something else there.
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let d = root.walk(&rel_dir).map_err(at(&rel_dir))?;
        for name in d.names().map_err(at(&rel_dir))? {
            let rel = rel_dir.join(&name);
            if rel_dir.as_os_str().is_empty() && name == staging_name {
                continue;
            }
            let Some(st) = d.stat(&name).map_err(at(&rel))? else {
                continue;
            };
            let want = rel.to_str().and_then(|p| wanted.get(p));
            let same_kind = want.is_some_and(|e| {
                matches!(
                    (e, st.kind),
                    (Entry::Dir { .. }, Kind::Dir)
                        | (Entry::File { .. }, Kind::File)
                        | (Entry::Symlink { .. }, Kind::Symlink)
                )
            });
            let excluded = excludes.is_excluded(&rel, st.kind == Kind::Dir);
            if excluded && (want.is_none() || same_kind) {
                continue;
            }
            if !same_kind {
                sw.discard(&rel_dir, &name).map_err(at(&rel))?;
            } else if st.kind == Kind::Dir {
                // Writable while its contents change; its mode is set last.
                sw.chmod(&rel, st.mode, st.mode | 0o700).map_err(at(&rel))?;
                stack.push(rel);
            }
        }
    }
    // 2. Place the snapshot, parents first.
    let staging = PathBuf::from(staging_name);
    let mut stat = StatCache::new();
    for (i, e) in m.entries.iter().enumerate() {
        let rel = Path::new(e.path());
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let pd = root.walk(parent).map_err(at(rel))?;
        let existing = pd.stat(name).map_err(at(rel))?;
        match e {
            Entry::Dir { .. } => match existing {
                Some(st) if st.kind == Kind::Dir => {
                    sw.chmod(rel, st.mode, st.mode | 0o700).map_err(at(rel))?;
                }
                other => {
                    if other.is_some() {
                        sw.discard(parent, name).map_err(at(rel))?;
                    }
                    pd.mkdir(name, 0o700).map_err(at(rel))?;
                    sw.journal
                        .push(Undo::Made(parent.to_path_buf(), name.to_os_string()));
                }
            },
            Entry::File { .. } | Entry::Symlink { .. } => {
                if existing.is_some() {
                    sw.discard(parent, name).map_err(at(rel))?;
                }
                let staged = OsString::from(staged_name(i));
                sw.rename((&staging, &staged), (parent, name))
                    .map_err(at(rel))?;
                let hash = match (placed.get(&i), e) {
                    (Some(h), _) => Some(h.clone()),
                    (None, Entry::File { hash, .. }) => Some(hash.clone()),
                    _ => None,
                };
                if let (Some(hash), Some(st)) = (hash, pd.stat(name).map_err(at(rel))?)
                    && st.kind == Kind::File
                {
                    let key = manifest::StatKey {
                        size: st.size,
                        mtime_ns: st.mtime_ns,
                        ctime_ns: st.ctime_ns,
                        ino: st.ino,
                    };
                    stat.insert(e.path().to_string(), (key, hash));
                }
            }
        }
    }
    // 3. Directory modes last (deepest first), so read-only directories did not block writes.
    for e in m.entries.iter().rev() {
        if let Entry::Dir { path, mode } = e {
            let rel = Path::new(path);
            root.walk(rel)
                .and_then(|d| d.chmod(mode & 0o7777))
                .map_err(at(rel))?;
        }
    }
    Ok(stat)
}

/// Does the branch directory match the stored snapshot exactly (every file re-hashed)?
/// Eviction calls this before deleting a directory.
pub async fn verify(
    config: &Config,
    key: &BranchKey,
    snapshot_id: &str,
) -> Result<bool, SyncError> {
    let store = open_store(config, key)?;
    let Some(m) = fetch_manifest(&store, Some(snapshot_id)).await? else {
        return Ok(false);
    };
    let dir = branch_dir(config, key);
    let scanned = blocking(move || {
        let mut fresh = StatCache::new();
        manifest::scan(&dir, &StatCache::new(), &mut fresh)
    })
    .await?;
    Ok(manifest::matches(&m, &scanned))
}

/// Snapshot ids referenced by the local index and the files the store must hold: used by
/// tests and tools to inspect a snapshot.
pub async fn manifest(
    config: &Config,
    key: &BranchKey,
    snapshot_id: Option<&str>,
) -> Result<Option<Manifest>, SyncError> {
    let store = open_store(config, key)?;
    fetch_manifest(&store, snapshot_id).await
}
