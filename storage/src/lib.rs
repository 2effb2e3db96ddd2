//! redb storage for weldr-agent.
//!
//! Everything the agent must not lose lives here: projects and branches, the per-branch event
//! log, and (as later features land) workflows, the tool journal, the mirror outbox, the
//! integration queue and sessions. Every value is a [`record`] envelope (postcard plus a version
//! marker) so that records can evolve. All writes go through one [`writer`] thread that batches
//! many small transactions into one commit (one sync; for batches that only append events, one
//! sequential write to the append log, see [`wal`]); reads open their own MVCC snapshot and
//! never wait for it.

pub mod attachments;
pub mod backup;
pub mod conversation;
pub mod error;
pub mod events;
mod files;
pub mod integrations;
pub mod model;
pub mod outbox;
mod readers;
pub mod record;
pub mod tables;
pub mod wal;
pub mod workflow;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::StorageError;
pub use events::{AppendObserver, Event, NewEvent, StreamKey, StreamMeta};
pub use redb;
pub use writer::Writer;

use redb::{Database, ReadableDatabase, ReadableTable};

/// Options for opening a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Events kept per branch stream; older ones are trimmed and announced with a `reset`.
    pub event_retention: u64,
    /// redb page cache in bytes.
    pub cache_bytes: usize,
    /// Most write jobs folded into one commit.
    pub max_batch: usize,
    /// Size limit of the append log that makes event-only batches durable with one sequential
    /// write ([`wal`]); 0 commits every batch durably in redb instead.
    pub wal_bytes: u64,
    /// Note what every commit changes, for a continuous backup ([`backup`]).
    pub track_changes: bool,
    /// Write the mirrors' outbox entry in every commit that changes what they carry
    /// ([`outbox`]).
    pub outbox: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            event_retention: 50_000,
            cache_bytes: 32 << 20,
            max_batch: 1024,
            wal_bytes: 16 << 20,
            track_changes: false,
            outbox: false,
        }
    }
}

/// The open redb database plus its writer. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    /// The database readers use; the writer swaps it when it reopens the file (see
    /// [`writer`]), and [`Store::close`] empties it.
    shared: Arc<Shared>,
    writer: Writer,
    readers: readers::Readers,
    tracker: Option<Arc<backup::ChangeTracker>>,
    path: PathBuf,
    options: StoreOptions,
}

/// What the store's handle and its writer thread share.
pub(crate) struct Shared {
    db: std::sync::RwLock<DbSlot>,
    /// Why the store cannot write, while it cannot (`/health` reports it).
    problem: std::sync::Mutex<Option<String>>,
    /// Counts commits while the store writes an outbox: what mirrors wait on.
    commits: tokio::sync::watch::Sender<u64>,
}

pub(crate) enum DbSlot {
    Open(Arc<Database>),
    /// The writer is reopening the file after an I/O error (this one, when it failed).
    Reopening(String),
    /// After [`Store::close`]: the file lock goes with the last reader.
    Closed,
}

impl Shared {
    pub(crate) fn db(&self) -> Result<Arc<Database>, StorageError> {
        match &*self.db.read().unwrap_or_else(|p| p.into_inner()) {
            DbSlot::Open(db) => Ok(db.clone()),
            DbSlot::Reopening(reason) => Err(StorageError::Unwritable(format!(
                "the store is being reopened after an I/O error ({reason}); retry shortly"
            ))),
            DbSlot::Closed => Err(StorageError::Closed),
        }
    }

    /// Put `slot` in place and answer the one it replaced.
    pub(crate) fn swap(&self, slot: DbSlot) -> DbSlot {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *db, slot)
    }

    pub(crate) fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }
}

impl Store {
    /// Open (or create) the store at `path`. Fails with [`StorageError::AlreadyOpen`] when
    /// another process (or this one) holds the file, and with [`StorageError::Refused`] when
    /// the database file is missing or empty but a previous store left its append log.
    pub fn open(
        path: &Path,
        options: StoreOptions,
        observer: Arc<dyn AppendObserver>,
    ) -> Result<Self, StorageError> {
        if let Some(parent) = path.parent() {
            files::private_dir(parent)?;
        }
        files::refuse_lost_database(path)?;
        let db = open_database(path, &options)?;
        files::owner_only(path)?;
        tables::create_all(&db)?;
        let wal = open_wal(&db, path, &options)?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            db: std::sync::RwLock::new(DbSlot::Open(db)),
            problem: std::sync::Mutex::new(None),
            commits: tokio::sync::watch::Sender::new(0),
        });
        let tracker = options
            .track_changes
            .then(|| Arc::new(backup::ChangeTracker::default()));
        let writer = Writer::start(
            shared.clone(),
            writer::Reopen {
                path: path.to_path_buf(),
                options: options.clone(),
            },
            wal,
            observer,
            tracker.clone(),
        )?;
        Ok(Self {
            inner: Arc::new(StoreInner {
                shared,
                writer,
                readers: readers::Readers::start(readers::Readers::default_threads())?,
                tracker,
                path: path.to_path_buf(),
                options,
            }),
        })
    }

    /// A read snapshot; never waits for the writer.
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, StorageError> {
        Ok(self.inner.shared.db()?.begin_read()?)
    }

    /// Why the store cannot write right now (`cannot write: <reason>`), or None when it can.
    /// After an I/O error (a full disk) the writer reopens the database in place once a
    /// durable commit succeeds again; until then this says why not.
    pub fn write_problem(&self) -> Option<String> {
        self.inner
            .shared
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Run `f` (short reads) on one of the store's reader threads and await its answer: how
    /// async code reads redb without blocking the runtime (see `readers.rs`).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Store) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        self.inner.readers.submit(Box::new(move || {
            let _ = tx.send(f(&store));
        }));
        rx.await.map_err(|_| {
            E::from(StorageError::Database(
                "a storage read failed (its thread panicked)".into(),
            ))
        })?
    }

    /// Changes (to a count of commits) after each commit, when the store writes the mirrors'
    /// outbox ([`StoreOptions::outbox`]).
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.shared.commits.subscribe()
    }

    /// The notes of what commits changed, when the store was opened to track them.
    pub fn tracker(&self) -> Option<&Arc<backup::ChangeTracker>> {
        self.inner.tracker.as_ref()
    }

    /// Take the tracker's notes together with a snapshot holding exactly the commits they
    /// describe (see [`backup`]); None when the store does not track changes.
    pub fn take_changes(
        &self,
    ) -> Result<Option<(backup::Pending, redb::ReadTransaction)>, StorageError> {
        let Some(tracker) = &self.inner.tracker else {
            return Ok(None);
        };
        let db = self.inner.shared.db()?;
        tracker.take(&db).map(Some)
    }

    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// Stop the writer after it has committed everything queued so far, and let go of the
    /// database: the file is unlocked once read transactions still open have ended. Later
    /// reads and writes fail with [`StorageError::Closed`]. Blocks; idempotent.
    pub fn close(&self) {
        self.inner.writer.shutdown();
        self.inner.shared.swap(DbSlot::Closed);
    }
}

/// Open (or create) the redb file at `path`.
pub(crate) fn open_database(path: &Path, options: &StoreOptions) -> Result<Database, StorageError> {
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_bytes);
    builder.create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StorageError::AlreadyOpen(path.to_path_buf()),
        other => StorageError::Database(format!("opening {}: {other}", path.display())),
    })
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Events put back from the append log.
    pub restored: u64,
    /// `lost` events standing for ids that were handed out in unreadable records.
    pub marked_lost: u64,
    /// Unreadable bytes in the middle of the append log.
    pub damaged_bytes: u64,
    /// Where streams created from now on start (1 unless ids may have been lost).
    pub id_floor: u64,
}

/// Recover a store whose append log is damaged in the middle (which [`Store::open`] refuses):
/// put back every readable event of the stored epoch, before and after the damage, and make
/// sure that no id handed out in the unreadable part is ever used again. A stream that has
/// readable events after the damage gets a `lost` event for each id missing before them
/// (exactly the lost ones); any other stream may have lost up to as many events as the
/// damaged bytes could hold, so it gets that many `lost` events; and streams that have no
/// events yet start after as many ids as the damage could hold. Ids stay contiguous, so
/// readers see `lost` events, not holes. Afterwards the store opens normally. Fails with
/// [`StorageError::AlreadyOpen`] while a server holds the store.
pub fn recover(path: &Path, options: StoreOptions) -> Result<Recovery, StorageError> {
    files::refuse_lost_database(path)?;
    let db = open_database(path, &options)?;
    tables::create_all(&db)?;
    let wal_path = wal_path(path);
    if !wal_path.exists() {
        return Ok(Recovery {
            id_floor: 1,
            ..Recovery::default()
        });
    }
    let mut wal = wal::Wal::open(&wal_path, options.wal_bytes)?;
    let read = wal.recover_damaged(writer::stored_epoch(&db)?)?;
    let retention = options.event_retention.max(1);
    let damaged = read.damaged_bytes;
    writer::commit_checkpoint(&db, &mut wal, |tx| {
        let mut report = Recovery {
            damaged_bytes: damaged,
            ..Recovery::default()
        };
        let mut ctx = writer::WriteCtx::new(tx, retention);
        let mut exact = std::collections::HashSet::new();
        for (i, event) in read.events.into_iter().enumerate() {
            if i >= read.after_damage {
                exact.insert(event.stream.clone());
            }
            let lost = ctx.restore_over_gap(event)?;
            report.marked_lost += lost;
            report.restored += 1;
        }
        ctx.finish()?;
        if damaged > 0 {
            // Every event the damage held took at least its stream's name plus 8 bytes.
            let streams: Vec<String> = {
                let table = tx.open_table(tables::STREAMS)?;
                let mut names = Vec::new();
                for entry in table.iter()? {
                    names.push(entry?.0.value().to_string());
                }
                names
            };
            let mut ctx = writer::WriteCtx::new(tx, retention);
            for name in streams.iter().filter(|s| !exact.contains(*s)) {
                let most = damaged.div_ceil(name.len() as u64 + 8);
                report.marked_lost += ctx.mark_lost(&StreamKey::from_joined(name), most)?;
            }
            ctx.finish()?;
        }
        report.id_floor = writer::raise_id_floor(tx, damaged.div_ceil(3 + 8))?;
        Ok(report)
    })
}

/// The append log next to the database file.
pub fn wal_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

/// Open the append log and put back into redb the appends that only it holds for sure (those
/// of the stored epoch: redb's unsynced commits may have died with the process). Done even
/// when the log is switched off, if a log file is there.
pub(crate) fn open_wal(
    db: &Database,
    path: &Path,
    options: &StoreOptions,
) -> Result<Option<wal::Wal>, StorageError> {
    let wal_path = wal_path(path);
    if options.wal_bytes == 0 && !wal_path.exists() {
        return Ok(None);
    }
    let mut wal = wal::Wal::open(&wal_path, options.wal_bytes)?;
    replay_wal(db, &mut wal, options.event_retention, false, options.outbox)?;
    Ok((options.wal_bytes > 0).then_some(wal))
}

/// Put back into `db` the records of the log's stored epoch, in one durable commit that moves
/// the log to its next epoch; with `always`, that commit is made even when there is nothing
/// to replay (it proves that the database can write durably).
pub(crate) fn replay_wal(
    db: &Database,
    wal: &mut wal::Wal,
    retention: u64,
    always: bool,
    outbox: bool,
) -> Result<(), StorageError> {
    let events = wal.recover(writer::stored_epoch(db)?)?;
    if !wal.pending() && !always {
        return Ok(());
    }
    let (restored, skipped) = writer::commit_checkpoint(db, wal, |tx| {
        let (mut restored, mut skipped) = (0usize, 0usize);
        let mut ctx = writer::WriteCtx::new(tx, retention.max(1)).with_outbox(outbox);
        for event in events {
            match ctx.restore(event) {
                Ok(true) => restored += 1,
                Ok(false) => {}
                // Not expected; one stream's odd record must not keep the server down.
                Err(e @ StorageError::Corrupt { .. }) => {
                    tracing::error!(error = %e, "append log record skipped");
                    skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        ctx.finish()?;
        Ok((restored, skipped))
    })?;
    if restored + skipped > 0 {
        tracing::info!(
            restored,
            skipped,
            path = %wal.path().display(),
            "append log replayed"
        );
    }
    Ok(())
}
