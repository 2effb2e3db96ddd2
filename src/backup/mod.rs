//! The store's continuous backup to object storage, Litestream-style, and its restore.
//!
//! A *generation* starts with a consistent full copy of `state.redb` (a logical copy from one
//! read snapshot, see `weldr_storage::backup`), taken at start, every
//! `STORE_BACKUP_FULL_SECONDS` with changes, after 64 MiB of increments, and whenever the
//! writer's notes overflowed. Between copies, *increments* carry what commits changed: the
//! writer notes the keys each commit wrote and the streams it appended to; the shipper takes
//! the notes with a snapshot that holds exactly those commits, reads the values and new events
//! from it, and ships them as one object. It wakes on the first note and waits half of
//! `STORE_BACKUP_INTERVAL_MS` to batch before every shipment, so an idle store makes no request
//! at all and a busy one makes about two a second. The writer is never waited on: taking the notes
//! holds its lock for the time it takes to open a read transaction.
//!
//! What was durable locally but not yet shipped when the machine died is lost with it: at most
//! `STORE_BACKUP_INTERVAL_MS` plus one upload (the README's RPO). A failed upload is retried
//! with the same bytes before anything newer is shipped.

pub mod format;
pub mod restore;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use weldr_storage::backup::{self as sb, Op};
use weldr_storage::{StorageError, Store};

use crate::config::{Config, StoreBackupSettings};
use crate::sync::SyncError;
use crate::sync::store::Store as Objects;
use crate::worker::{Worker, WorkerState};
use format::{KIND_FULL, KIND_INCREMENT, Manifest, PartRef};

/// A full copy is cut into parts of about this size.
const PART_BYTES: usize = 8 << 20;
/// An increment bigger than this becomes a new full copy instead.
const MAX_INCREMENT_BYTES: usize = 16 << 20;
/// Increments that make a new full copy due (restore time stays bounded).
const INCREMENTS_PER_GENERATION_BYTES: u64 = 64 << 20;
/// Lags kept for the status's percentiles.
const LAGS_KEPT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StorageError),
    #[error("{0}")]
    Objects(#[from] SyncError),
    /// The backup is damaged or incomplete; the message says what was found and how to
    /// restore the newest point that verifies.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Refused(String),
}

/// What the backup has done, for `/health`, `status` and the benchmark.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupStats {
    pub generation: Option<String>,
    /// Increments shipped in the current generation.
    pub increments: u64,
    pub full_copies: u64,
    pub bytes_shipped: u64,
    pub requests: u64,
    pub last_shipped_at_ms: Option<u64>,
    /// From the oldest commit an increment carried to its upload's end.
    pub last_lag_ms: Option<u64>,
    /// How long the oldest change not yet shipped has waited (0 when none waits).
    pub pending_ms: u64,
    #[serde(skip)]
    pub lags_us: VecDeque<u64>,
}

struct Current {
    name: String,
    seq: u64,
    started: Instant,
    increment_bytes: u64,
}

/// An increment whose upload failed: shipped again, unchanged, before anything newer.
struct Unsent {
    seq: u64,
    at_ms: u64,
    framed: Vec<u8>,
    since: Option<Instant>,
}

#[derive(Default)]
struct ShipState {
    generation: Option<Current>,
    /// Each stream's last id the backup holds.
    shipped: HashMap<String, u64>,
    unsent: Option<Unsent>,
}

/// What one unit of shipping did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    Nothing,
    Increment,
    FullCopy,
}

pub struct StoreBackup {
    store: Store,
    objects: Objects,
    settings: StoreBackupSettings,
    state: tokio::sync::Mutex<ShipState>,
    stats: std::sync::Mutex<BackupStats>,
    bucket_made: std::sync::atomic::AtomicBool,
}

impl StoreBackup {
    /// The backup of `store` as configured; None when it is off or the store was not opened to
    /// track changes.
    pub fn new(config: &Config, store: Store) -> Result<Option<Arc<Self>>, BackupError> {
        if !config.store_backup.enabled || store.tracker().is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self::with_objects(
            store,
            Objects::open_store_backup(config)?,
            config.store_backup.clone(),
        ))))
    }

    pub fn with_objects(store: Store, objects: Objects, settings: StoreBackupSettings) -> Self {
        Self {
            store,
            objects,
            settings,
            state: Default::default(),
            stats: Default::default(),
            bucket_made: Default::default(),
        }
    }

    pub fn stats(&self) -> BackupStats {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        stats.pending_ms = self
            .store
            .tracker()
            .and_then(|t| t.pending_since())
            .map_or(0, |since| since.elapsed().as_millis() as u64);
        stats.requests = self.objects.requests();
        stats
    }

    fn note(&self, f: impl FnOnce(&mut BackupStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// One unit: a full copy when one is due, else an increment of what changed.
    pub async fn ship_once(&self) -> Result<Shipped, BackupError> {
        let mut state = self.state.lock().await;
        self.ensure_place().await?;
        if let Some(unsent) = state.unsent.take() {
            self.send_increment(&mut state, unsent).await?;
        }
        let due = match &state.generation {
            None => true,
            Some(g) => {
                g.increment_bytes >= INCREMENTS_PER_GENERATION_BYTES
                    || (g.started.elapsed() >= self.settings.full_every
                        && self.store.tracker().is_some_and(|t| t.has_pending()))
            }
        };
        if due {
            self.full_copy(&mut state).await?;
            return Ok(Shipped::FullCopy);
        }
        self.increment(&mut state).await
    }

    /// Ship everything noted so far (at shutdown).
    pub async fn flush(&self) -> Result<(), BackupError> {
        for _ in 0..3 {
            if self.ship_once().await? == Shipped::Nothing {
                break;
            }
        }
        Ok(())
    }

    async fn ensure_place(&self) -> Result<(), BackupError> {
        use std::sync::atomic::Ordering;
        if !self.bucket_made.load(Ordering::Relaxed) {
            self.objects.ensure_bucket().await?;
            self.bucket_made.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn increment(&self, state: &mut ShipState) -> Result<Shipped, BackupError> {
        let store = self.store.clone();
        let mut shipped = std::mem::take(&mut state.shipped);
        let built = tokio::task::spawn_blocking(move || {
            let out = build_increment(&store, &mut shipped);
            (out, shipped)
        })
        .await
        .map_err(|e| BackupError::Refused(format!("the backup's reader panicked: {e}")))?;
        let (built, shipped) = built;
        state.shipped = shipped;
        let Some(generation) = state.generation.as_mut() else {
            return Ok(Shipped::Nothing);
        };
        match built? {
            Built::Nothing => Ok(Shipped::Nothing),
            Built::TooMuch => {
                // The notes were taken: only a full copy covers them now.
                state.generation = None;
                self.full_copy(state).await?;
                Ok(Shipped::FullCopy)
            }
            Built::Ops {
                payload,
                at_ms,
                since,
            } => {
                generation.seq += 1;
                let seq = generation.seq;
                let unsent = Unsent {
                    seq,
                    at_ms,
                    framed: format::frame(KIND_INCREMENT, seq, at_ms, &payload),
                    since,
                };
                self.send_increment(state, unsent).await?;
                Ok(Shipped::Increment)
            }
        }
    }

    async fn send_increment(
        &self,
        state: &mut ShipState,
        unsent: Unsent,
    ) -> Result<(), BackupError> {
        let Some(generation) = state.generation.as_mut() else {
            return Ok(());
        };
        let path = format!(
            "{}{}",
            format::dir(&generation.name),
            format::increment_name(unsent.seq, unsent.at_ms)
        );
        let bytes = unsent.framed.len() as u64;
        if let Err(e) = self.objects.put(&path, unsent.framed.clone()).await {
            state.unsent = Some(unsent);
            return Err(e.into());
        }
        generation.increment_bytes += bytes;
        let lag = unsent.since.map(|s| s.elapsed());
        self.note(|s| {
            s.increments = unsent.seq;
            s.bytes_shipped += bytes;
            s.last_shipped_at_ms = Some(weldr_storage::writer::now_ms());
            if let Some(lag) = lag {
                s.last_lag_ms = Some(lag.as_millis() as u64);
                if s.lags_us.len() == LAGS_KEPT {
                    s.lags_us.pop_front();
                }
                s.lags_us.push_back(lag.as_micros() as u64);
            }
        });
        Ok(())
    }

    /// A new generation: a full copy from one snapshot, in parts, then its manifest; older
    /// generations beyond `STORE_BACKUP_KEEP` are deleted afterwards.
    async fn full_copy(&self, state: &mut ShipState) -> Result<(), BackupError> {
        state.generation = None;
        state.unsent = None;
        let (parts_tx, mut parts_rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(1);
        let store = self.store.clone();
        let producer = tokio::task::spawn_blocking(move || copy_store(&store, parts_tx));
        let mut generation: Option<String> = None;
        let mut parts = Vec::new();
        let mut bytes = 0u64;
        let mut failed = None;
        while let Some((at_ms, part)) = parts_rx.recv().await {
            let name = generation.get_or_insert_with(|| format::generation_name(at_ms));
            let part_name = format::part_name(parts.len());
            let size = part.len() as u64;
            let sha256 = format::sha256_hex(&part);
            if let Err(e) = self
                .objects
                .put(&format!("{}{part_name}", format::dir(name)), part)
                .await
            {
                failed = Some(e);
                break;
            }
            bytes += size;
            parts.push(PartRef {
                name: part_name,
                bytes: size,
                sha256,
            });
        }
        drop(parts_rx);
        let copied = producer
            .await
            .map_err(|e| BackupError::Refused(format!("the backup's reader panicked: {e}")))?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let copied = copied?;
        let name = generation.unwrap_or_else(|| format::generation_name(copied.at_ms));
        let manifest = Manifest {
            format: format::MANIFEST_FORMAT,
            generation: name.clone(),
            at_ms: copied.at_ms,
            parts,
            ops: copied.ops,
            bytes,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BackupError::Refused(format!("encoding the manifest: {e}")))?;
        self.objects
            .put(&format::manifest_path(&name), json)
            .await?;
        tracing::info!(generation = %name, ops = copied.ops, bytes, "store backup: full copy");
        state.shipped = copied.heads;
        state.generation = Some(Current {
            name: name.clone(),
            seq: 0,
            started: Instant::now(),
            increment_bytes: 0,
        });
        self.note(|s| {
            s.generation = Some(name.clone());
            s.increments = 0;
            s.full_copies += 1;
            s.bytes_shipped += bytes;
            s.last_shipped_at_ms = Some(weldr_storage::writer::now_ms());
        });
        if let Err(e) = self.prune(&name).await {
            tracing::warn!(error = %e, "store backup: deleting old generations failed");
        }
        Ok(())
    }

    /// Delete generations older than the `keep` newest complete ones (and unfinished ones older
    /// than `current`).
    async fn prune(&self, current: &str) -> Result<(), BackupError> {
        let names = restore::generations(&self.objects).await?;
        let mut complete = 0usize;
        for name in names.iter().rev() {
            if name.as_str() > current {
                continue;
            }
            let keep = name == current
                || (complete < self.settings.keep
                    && self
                        .objects
                        .operator()
                        .exists(&format::manifest_path(name))
                        .await
                        .unwrap_or(true));
            if keep {
                complete += 1;
            }
            if !keep {
                self.objects.count();
                self.objects
                    .operator()
                    .delete_with(&format::dir(name))
                    .recursive(true)
                    .await
                    .map_err(|e| SyncError::store(&format!("delete generation {name}"), e))?;
                tracing::info!(generation = %name, "store backup: old generation deleted");
            }
        }
        Ok(())
    }
}

struct Copied {
    at_ms: u64,
    ops: u64,
    heads: HashMap<String, u64>,
}

/// Copy the store from one snapshot into framed parts sent to `parts` (bounded: one part in
/// flight). The tracker's notes are taken with the snapshot: the copy holds what they said.
fn copy_store(
    store: &Store,
    parts: tokio::sync::mpsc::Sender<(u64, Vec<u8>)>,
) -> Result<Copied, BackupError> {
    let (_, rtx) = store
        .take_changes()?
        .ok_or_else(|| BackupError::Refused("the store does not track changes".into()))?;
    let at_ms = weldr_storage::writer::now_ms();
    let heads = sb::stream_heads(&rtx)?;
    let mut buf = Vec::with_capacity(PART_BYTES + (1 << 16));
    let mut index = 0u64;
    let mut ops = 0u64;
    let send = |buf: &mut Vec<u8>, index: &mut u64| -> Result<(), StorageError> {
        let framed = format::frame(KIND_FULL, *index, at_ms, buf);
        buf.clear();
        *index += 1;
        parts
            .blocking_send((at_ms, framed))
            .map_err(|_| StorageError::Closed)
    };
    sb::dump(&rtx, &mut |op: Op| {
        sb::encode_op(&op, &mut buf);
        ops += 1;
        if buf.len() >= PART_BYTES {
            send(&mut buf, &mut index)?;
        }
        Ok(())
    })?;
    if !buf.is_empty() || index == 0 {
        send(&mut buf, &mut index)?;
    }
    Ok(Copied { at_ms, ops, heads })
}

enum Built {
    Nothing,
    /// More than an increment may hold: a full copy instead.
    TooMuch,
    Ops {
        payload: Vec<u8>,
        at_ms: u64,
        since: Option<Instant>,
    },
}

fn build_increment(
    store: &Store,
    shipped: &mut HashMap<String, u64>,
) -> Result<Built, BackupError> {
    let Some((pending, rtx)) = store.take_changes()? else {
        return Ok(Built::Nothing);
    };
    if pending.is_empty() {
        return Ok(Built::Nothing);
    }
    if pending.overflow {
        return Ok(Built::TooMuch);
    }
    let at_ms = weldr_storage::writer::now_ms();
    let mut payload = Vec::new();
    let mut next = shipped.clone();
    let outcome = sb::changes(&rtx, &pending, &mut next, &mut |op| {
        sb::encode_op(&op, &mut payload);
        if payload.len() > MAX_INCREMENT_BYTES {
            return Err(StorageError::Refused("too big".into()));
        }
        Ok(())
    });
    match outcome {
        Ok(()) => {}
        Err(StorageError::Refused(_)) => return Ok(Built::TooMuch),
        Err(e) => return Err(e.into()),
    }
    *shipped = next;
    Ok(Built::Ops {
        payload,
        at_ms,
        since: pending.since,
    })
}

/// The backup as a [`Worker`]: wakes on the first change, waits half the interval to batch,
/// ships, and waits again before the next unit, so a store under steady load makes about two
/// increments a second (at the default interval) instead of one per write.
pub struct BackupWorker {
    backup: Arc<StoreBackup>,
    detail: Option<String>,
}

impl BackupWorker {
    pub fn new(backup: Arc<StoreBackup>) -> Self {
        Self {
            backup,
            detail: None,
        }
    }
}

#[async_trait]
impl Worker for BackupWorker {
    fn name(&self) -> &'static str {
        "store-backup"
    }

    fn detail(&self) -> Option<String> {
        self.detail.clone()
    }

    async fn work(&mut self, _shutdown: &CancellationToken) -> Result<WorkerState, String> {
        self.backup.ship_once().await.map_err(|e| e.to_string())?;
        let stats = self.backup.stats();
        self.detail = Some(format!(
            "generation {}, {} increments, lag {} ms, {} bytes shipped",
            stats.generation.as_deref().unwrap_or("none"),
            stats.increments,
            stats.last_lag_ms.unwrap_or(0),
            stats.bytes_shipped
        ));
        // Idle after a shipment too: the runner waits (`wait_for_work`) before the next unit,
        // which is what paces increments under load.
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        if let Some(tracker) = self.backup.store.tracker() {
            tracker.notified().await;
        }
        tokio::time::sleep(self.backup.settings.interval / 2).await;
    }
}

/// Percentile (0..=100) of the lags kept, in microseconds.
pub fn lag_percentile(stats: &BackupStats, pct: f64) -> Option<Duration> {
    let mut lags: Vec<u64> = stats.lags_us.iter().copied().collect();
    if lags.is_empty() {
        return None;
    }
    lags.sort_unstable();
    let at = ((lags.len() - 1) as f64 * pct / 100.0).round() as usize;
    Some(Duration::from_micros(lags[at.min(lags.len() - 1)]))
}

/// At start, before the store opens: when `state.redb` is missing (or holds no project,
/// branch, event or workflow) and the object store holds a backup, restore its newest point.
/// A damaged backup refuses the start with what was found (see [`restore::restore`]).
pub async fn restore_at_start(config: &Config) -> Result<Option<restore::Restored>, BackupError> {
    if !config.store_backup.enabled {
        return Ok(None);
    }
    let path = config.store_path();
    let wal = weldr_storage::wal_path(&path);
    let keep = if path.exists() {
        match sb::fresh_store_keeps(&path)? {
            Some(keep) => keep,
            None => return Ok(None),
        }
    } else if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        // The database is gone but its append log is not: opening refuses with its own advice.
        return Ok(None);
    } else {
        Vec::new()
    };
    let objects = Objects::open_store_backup(config)?;
    if !restore::exists(&objects).await? {
        return Ok(None);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| BackupError::Refused(format!("creating {}: {e}", dir.display())))?;
    }
    let restored = restore::restore(&objects, &path, None, keep).await?;
    // The restored store starts its append log afresh.
    let _ = std::fs::remove_file(&wal);
    Ok(restored)
}
