//! redb storage for weldr-agent.
//!
//! Everything the agent must not lose lives here: projects and branches, the per-branch event
//! log, and (as later features land) workflows, the tool journal, the mirror outbox, the
//! integration queue and sessions. Every value is a [`record`] envelope (postcard plus a version
//! marker) so that records can evolve. All writes go through one [`writer`] thread that batches
//! many small transactions into one commit (one sync; for batches that only append events, one
//! sequential write to the append log, see [`wal`]); reads open their own MVCC snapshot and
//! never wait for it.

pub mod error;
pub mod events;
pub mod model;
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

use redb::{Database, ReadableDatabase};

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
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            event_retention: 50_000,
            cache_bytes: 32 << 20,
            max_batch: 1024,
            wal_bytes: 16 << 20,
        }
    }
}

/// The open redb database plus its writer. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    /// None after [`Store::close`], so that the file lock goes with the last reader.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    writer: Writer,
    readers: readers::Readers,
    path: PathBuf,
    options: StoreOptions,
}

impl Store {
    /// Open (or create) the store at `path`. Fails with [`StorageError::AlreadyOpen`] when
    /// another process (or this one) holds the file.
    pub fn open(
        path: &Path,
        options: StoreOptions,
        observer: Arc<dyn AppendObserver>,
    ) -> Result<Self, StorageError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StorageError::Io {
                path: parent.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_bytes);
        let db = builder.create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StorageError::AlreadyOpen(path.to_path_buf())
            }
            other => StorageError::Database(format!("opening {}: {other}", path.display())),
        })?;
        tables::create_all(&db)?;
        let wal = open_wal(&db, path, &options)?;
        let db = Arc::new(db);
        let writer = Writer::start(
            db.clone(),
            options.max_batch,
            options.event_retention,
            wal,
            observer,
        )?;
        Ok(Self {
            inner: Arc::new(StoreInner {
                db: std::sync::RwLock::new(Some(db)),
                writer,
                readers: readers::Readers::start(readers::Readers::default_threads())?,
                path: path.to_path_buf(),
                options,
            }),
        })
    }

    /// A read snapshot; never waits for the writer.
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, StorageError> {
        let db = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        Ok(db.as_ref().ok_or(StorageError::Closed)?.begin_read()?)
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
        self.inner
            .db
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
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
fn open_wal(
    db: &Database,
    path: &Path,
    options: &StoreOptions,
) -> Result<Option<wal::Wal>, StorageError> {
    let wal_path = wal_path(path);
    if options.wal_bytes == 0 && !wal_path.exists() {
        return Ok(None);
    }
    let mut wal = wal::Wal::open(&wal_path, options.wal_bytes)?;
    let events = wal.recover(writer::stored_epoch(db)?)?;
    if wal.pending() {
        let (restored, skipped) = writer::commit_checkpoint(db, &mut wal, |tx| {
            let (mut restored, mut skipped) = (0usize, 0usize);
            let mut ctx = writer::WriteCtx::new(tx, options.event_retention.max(1));
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
        tracing::info!(
            restored,
            skipped,
            path = %wal_path.display(),
            "append log replayed"
        );
    }
    Ok((options.wal_bytes > 0).then_some(wal))
}
