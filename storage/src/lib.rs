//! redb storage for weldr-agent.
//!
//! Everything the agent must not lose lives here: projects and branches, the per-branch event
//! log, and (as later features land) workflows, the tool journal, the mirror outbox, the
//! integration queue and sessions. Every value is a [`record`] envelope (postcard plus a version
//! marker) so that records can evolve. All writes go through one [`writer`] thread that batches
//! many small transactions into one commit (one fsync); reads open their own MVCC snapshot and
//! never wait for it.

pub mod error;
pub mod events;
pub mod model;
mod readers;
pub mod record;
pub mod tables;
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            event_retention: 50_000,
            cache_bytes: 32 << 20,
            max_batch: 1024,
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
        let db = Arc::new(db);
        let writer = Writer::start(
            db.clone(),
            options.max_batch,
            options.event_retention,
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
    /// async code reads redb without blocking the runtime (see [`readers`]).
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
