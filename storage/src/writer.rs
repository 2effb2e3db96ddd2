//! The one writer.
//!
//! redb allows one write transaction at a time and each durable commit costs a sync. A
//! dedicated thread takes write jobs from a queue and folds every job waiting at that moment
//! into one transaction, so N concurrent appends share one sync. A batch that only appends
//! events is made durable by one sequential record in the append log ([`crate::wal`]) and
//! redb commits it without syncing; any other batch is a durable redb commit. Either way a
//! job's caller is answered only after its batch is durable; events appended by a job are
//! handed to the [`AppendObserver`] after that, in commit order, so nobody ever sees an event
//! that could still be lost. The callers are answered first: a producer should not wait while
//! the observer wakes a thousand subscribers, and nothing depends on the other order (a
//! subscriber drops frames it already has, and the next batch is observed only after this one).
//!
//! If one job of a batch fails, the batch is aborted and its jobs run again one transaction
//! each, so a bad job never takes good ones down with it.
//!
//! An I/O error (a full disk) latches redb: every later transaction fails until the file is
//! closed and opened again. The writer then reopens the database in place at once, so that
//! readers are served by a working handle (with the appends only the append log holds put back
//! by a commit that does not sync), answers jobs with [`StorageError::Unwritable`], and tries
//! a durable commit again each [`CHECKPOINT_INTERVAL`] (or at the next job after that long);
//! the first that succeeds makes the store writable again. Nothing acknowledged is lost on
//! the way: what redb's unsynced commits held is still in the append log, which only a durable
//! commit moves to a new epoch.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::backup::ChangeTracker;
use crate::events::{AppendObserver, Event, NewEvent, StoredEvent, StreamKey, StreamMeta};
use crate::record::{decode, encode};
use crate::tables::{EVENTS, META, STREAMS};
use crate::wal::{CHECKPOINT_INTERVAL, EPOCH_KEY, Wal, WalEpoch, WalEvent};
use crate::{DbSlot, Shared, StorageError, StoreOptions};

/// Queue depth before writers wait (back-pressure instead of unbounded memory).
const QUEUE_DEPTH: usize = 8192;

/// What a write job sees: the transaction, plus event appends that are published on commit.
///
/// One context serves a whole batch: the event tables stay open and each stream's bounds are
/// kept in memory and written once before the commit, so an append costs one insert however
/// many share the commit. Jobs therefore never open the `events` or `streams` tables themselves.
pub struct WriteCtx<'a> {
    tx: &'a WriteTransaction,
    /// A job used the transaction itself: the batch is more than appends (see [`crate::wal`]).
    raw: Cell<bool>,
    retention: u64,
    appended: Vec<(StreamKey, Arc<Event>)>,
    events: Option<redb::Table<'a, (&'static str, u64), &'static [u8]>>,
    metas: HashMap<StreamKey, StreamMeta>,
    /// Keys written through [`WriteCtx::table`], when the store tracks changes (backup,
    /// outbox).
    changed: Option<RefCell<Vec<Noted>>>,
    /// Write the mirrors' outbox entry of this commit ([`crate::outbox`]).
    outbox: bool,
    /// The ids each stream got in this commit: first and last.
    ranges: HashMap<StreamKey, (u64, u64)>,
}

impl<'a> WriteCtx<'a> {
    pub(crate) fn new(tx: &'a WriteTransaction, retention: u64) -> Self {
        Self {
            tx,
            raw: Cell::new(false),
            retention,
            appended: Vec::new(),
            events: None,
            metas: HashMap::new(),
            changed: None,
            outbox: false,
            ranges: HashMap::new(),
        }
    }

    /// Write the commit's outbox entry at [`WriteCtx::finish`] (when `on`).
    pub(crate) fn with_outbox(mut self, on: bool) -> Self {
        if on {
            self.outbox = true;
            if self.changed.is_none() {
                self.changed = Some(RefCell::new(Vec::new()));
            }
        }
        self
    }

    /// The transaction itself, for the storage crate's own bookkeeping writes that neither the
    /// backup nor the mirrors carry (the outbox's cursors). The batch is committed durably.
    pub(crate) fn raw_tx(&mut self) -> &'a WriteTransaction {
        self.raw.set(true);
        self.tx
    }

    /// Note the keys written through [`WriteCtx::table`] (for the backup's increments).
    pub(crate) fn tracking(mut self) -> Self {
        self.changed = Some(RefCell::new(Vec::new()));
        self
    }

    /// Open `table` for this job: reads as a redb table, and inserts and removals that the
    /// store's backup notes. A batch whose jobs use it is committed durably by redb itself.
    pub fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        def: redb::TableDefinition<'static, K, V>,
    ) -> Result<Tracked<'_, K, V>, StorageError> {
        self.raw.set(true);
        Ok(Tracked {
            name: self
                .changed
                .as_ref()
                .map(|_| Arc::from(redb::TableHandle::name(&def))),
            table: self.tx.open_table(def)?,
            changed: self.changed.as_ref(),
        })
    }

    /// Append one event to `stream` in this transaction; it gets the stream's next id.
    pub fn append(
        &mut self,
        stream: &StreamKey,
        event: NewEvent,
    ) -> Result<Arc<Event>, StorageError> {
        let meta = self.meta(stream)?;
        let event = Event {
            id: meta.next_id,
            kind: event.kind,
            data: event.data,
            at_ms: now_ms(),
        };
        self.insert(stream, meta, event)
    }

    /// Put back an event from the append log; an id the stream already has is skipped (false).
    pub(crate) fn restore(&mut self, event: WalEvent) -> Result<bool, StorageError> {
        let stream = StreamKey::from_joined(&event.stream);
        let meta = self.meta(&stream)?;
        if event.id < meta.next_id {
            return Ok(false);
        }
        if event.id > meta.next_id {
            return Err(StorageError::Corrupt {
                kind: "append log",
                message: format!(
                    "event {} of {stream} follows {} (a gap)",
                    event.id,
                    meta.last_id()
                ),
            });
        }
        let event = Event {
            id: event.id,
            kind: event.kind,
            data: event.data,
            at_ms: event.at_ms,
        };
        self.insert(&stream, meta, event)?;
        // Restored events are not news: nobody is subscribed while the store opens.
        self.appended.clear();
        Ok(true)
    }

    /// Put back an event of a damaged append log ([`crate::recover`]): the ids between the
    /// stream's last event and this one were handed out in the unreadable part, so each gets a
    /// `lost` event in its place (a stream's ids stay contiguous, and none is used again).
    /// Answers how many were marked lost; an id the stream already has is skipped.
    pub(crate) fn restore_over_gap(&mut self, event: WalEvent) -> Result<u64, StorageError> {
        let stream = StreamKey::from_joined(&event.stream);
        let meta = self.meta(&stream)?;
        if event.id < meta.next_id {
            return Ok(0);
        }
        let lost = self.mark_lost(&stream, event.id - meta.next_id)?;
        self.restore(event)?;
        Ok(lost)
    }

    /// Append `count` `lost` events to `stream`: ids that were handed out for events that
    /// could not be recovered.
    pub(crate) fn mark_lost(
        &mut self,
        stream: &StreamKey,
        count: u64,
    ) -> Result<u64, StorageError> {
        for _ in 0..count {
            let meta = self.meta(stream)?;
            let event = Event {
                id: meta.next_id,
                kind: LOST_EVENT.into(),
                data: "{\"reason\":\"its append-log record was damaged; \
                       `weldr-agent store recover` kept what was readable\"}"
                    .into(),
                at_ms: now_ms(),
            };
            self.insert(stream, meta, event)?;
        }
        self.appended.clear();
        Ok(count)
    }

    fn meta(&self, stream: &StreamKey) -> Result<StreamMeta, StorageError> {
        Ok(match self.metas.get(stream) {
            Some(meta) => *meta,
            None => {
                let streams = self.tx.open_table(STREAMS)?;
                match streams.get(stream.as_str())? {
                    Some(bytes) => decode::<StreamMeta>(bytes.value())?,
                    None => new_stream_meta(self.tx)?,
                }
            }
        })
    }

    /// Store `event` (whose id is `meta.next_id`) and trim to the retention.
    fn insert(
        &mut self,
        stream: &StreamKey,
        mut meta: StreamMeta,
        event: Event,
    ) -> Result<Arc<Event>, StorageError> {
        if self.events.is_none() {
            self.events = Some(self.tx.open_table(EVENTS)?);
        }
        let events = self.events.as_mut().ok_or(StorageError::Closed)?;
        let stored = StoredEvent {
            kind: event.kind,
            data: event.data,
            at_ms: event.at_ms,
        };
        events.insert((stream.as_str(), event.id), encode(&stored).as_slice())?;
        if self.outbox {
            self.ranges
                .entry(stream.clone())
                .and_modify(|r| r.1 = event.id)
                .or_insert((event.id, event.id));
        }
        meta.next_id += 1;
        while meta.next_id - meta.first_id > self.retention {
            events.remove((stream.as_str(), meta.first_id))?;
            meta.first_id += 1;
        }
        self.metas.insert(stream.clone(), meta);
        let event = Arc::new(Event {
            id: event.id,
            kind: stored.kind,
            data: stored.data,
            at_ms: stored.at_ms,
        });
        self.appended.push((stream.clone(), event.clone()));
        Ok(event)
    }

    /// Write the streams' bounds and the outbox entry, and close the tables, before the
    /// commit. Answers the keys the jobs wrote (when tracked).
    pub(crate) fn finish(mut self) -> Result<Vec<Noted>, StorageError> {
        self.events.take();
        let changed = self
            .changed
            .take()
            .map(RefCell::into_inner)
            .unwrap_or_default();
        if !self.metas.is_empty() {
            let mut streams = self.tx.open_table(STREAMS)?;
            for (stream, meta) in &self.metas {
                streams.insert(stream.as_str(), encode(meta).as_slice())?;
            }
        }
        if self.outbox {
            crate::outbox::write_entry(
                self.tx,
                changed.iter().map(|(t, k)| (t.to_string(), k.clone())),
                &self.ranges,
            )?;
        }
        Ok(changed)
    }
}

/// A key a job wrote: its table's name and the key's bytes.
pub(crate) type Noted = (Arc<str>, Vec<u8>);

/// A table opened by a job ([`WriteCtx::table`]): derefs to the redb table for reads; writes
/// go through [`Tracked::insert`] and [`Tracked::remove`], which note the key for the backup.
pub struct Tracked<'c, K: redb::Key + 'static, V: redb::Value + 'static> {
    table: redb::Table<'c, K, V>,
    name: Option<Arc<str>>,
    changed: Option<&'c RefCell<Vec<Noted>>>,
}

impl<K: redb::Key + 'static, V: redb::Value + 'static> Tracked<'_, K, V> {
    fn note(&self, key: &K::SelfType<'_>) {
        if let (Some(changed), Some(name)) = (self.changed, &self.name) {
            changed
                .borrow_mut()
                .push((name.clone(), K::as_bytes(key).as_ref().to_vec()));
        }
    }

    pub fn insert<'k, 'v>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<(), StorageError> {
        self.note(key.borrow());
        self.table.insert(key, value)?;
        Ok(())
    }

    /// Remove `key`; answers whether it was there.
    pub fn remove<'k>(
        &mut self,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
    ) -> Result<bool, StorageError> {
        self.note(key.borrow());
        Ok(self.table.remove(key)?.is_some())
    }
}

impl<'c, K: redb::Key + 'static, V: redb::Value + 'static> std::ops::Deref for Tracked<'c, K, V> {
    type Target = redb::Table<'c, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

/// The type of the events that stand for ids lost to a damaged append log.
pub const LOST_EVENT: &str = "lost";

/// Where a stream that has no events yet starts: at 1, or after the ids a damaged append log
/// may have handed out to streams nobody knows of any more ([`crate::recover`]).
fn new_stream_meta(tx: &WriteTransaction) -> Result<StreamMeta, StorageError> {
    let meta = tx.open_table(META)?;
    let floor = match meta.get(ID_FLOOR_KEY)? {
        Some(bytes) => decode::<IdFloor>(bytes.value())?.first_id,
        None => 1,
    };
    Ok(StreamMeta {
        first_id: floor.max(1),
        next_id: floor.max(1),
    })
}

/// The first id of streams created after a recovery from a damaged append log.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct IdFloor {
    pub first_id: u64,
}

impl crate::record::Record for IdFloor {
    const KIND: &'static str = "stream id floor";
    const VERSION: u8 = 1;
}

pub(crate) const ID_FLOOR_KEY: &str = "stream_id_floor";

/// Make streams created from now on start `by` ids later than they would; answers where.
pub(crate) fn raise_id_floor(tx: &WriteTransaction, by: u64) -> Result<u64, StorageError> {
    let mut meta = tx.open_table(META)?;
    let floor = match meta.get(ID_FLOOR_KEY)? {
        Some(bytes) => decode::<IdFloor>(bytes.value())?.first_id,
        None => 1,
    }
    .max(1);
    if by == 0 {
        return Ok(floor);
    }
    let first_id = floor + by;
    meta.insert(ID_FLOOR_KEY, encode(&IdFloor { first_id }).as_slice())?;
    Ok(first_id)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

trait Job: Send {
    /// Apply to `ctx`. Must not depend on state left by an earlier, aborted `apply`.
    fn apply(&mut self, ctx: &mut WriteCtx<'_>) -> Result<(), StorageError>;
    fn finish(self: Box<Self>, outcome: Result<(), StorageError>);
}

struct FnJob<T, F> {
    f: F,
    result: Option<T>,
    reply: oneshot::Sender<Result<T, StorageError>>,
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send,
    F: FnMut(&mut WriteCtx<'_>) -> Result<T, StorageError> + Send,
{
    fn apply(&mut self, ctx: &mut WriteCtx<'_>) -> Result<(), StorageError> {
        self.result = Some((self.f)(ctx)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), StorageError>) {
        let FnJob { result, reply, .. } = *self;
        let answer = outcome.and_then(|()| result.ok_or(StorageError::Closed));
        let _ = reply.send(answer);
    }
}

enum Msg {
    Job(Box<dyn Job>),
    /// Time for a checkpoint of the append log (sent [`CHECKPOINT_INTERVAL`] after the writer
    /// found records in it), or to try writing again while the store cannot.
    Checkpoint,
    Shutdown,
}

/// Handle to the writer thread.
pub struct Writer {
    queue: mpsc::Sender<Msg>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    pub(crate) fn start(
        shared: Arc<Shared>,
        reopen: Reopen,
        wal: Option<Wal>,
        observer: Arc<dyn AppendObserver>,
        tracker: Option<Arc<ChangeTracker>>,
    ) -> Result<Self, StorageError> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        // Checkpoints while appends are quiet, so that redb catches up on its own and a crash
        // leaves little to replay: the writer says when the log holds records (or when the
        // store cannot write), and a checkpoint follows one interval later. An idle store never
        // wakes this thread. It ends when the writer has stopped (its side of `pending` is
        // dropped).
        let (tick, wait) = std::sync::mpsc::sync_channel::<()>(1);
        let ticks = queue.clone();
        std::thread::Builder::new()
            .name("redb-checkpoint".into())
            .spawn(move || {
                while wait.recv().is_ok() {
                    std::thread::sleep(CHECKPOINT_INTERVAL);
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        ticks.try_send(Msg::Checkpoint)
                    {
                        break;
                    }
                }
            })
            .map_err(|e| StorageError::Database(format!("starting a thread: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || run(shared, reopen, rx, wal, tick, observer, tracker))
            .map_err(|e| StorageError::Database(format!("starting the writer thread: {e}")))?;
        Ok(Self {
            queue,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    fn job<T, F>(f: F) -> (Msg, oneshot::Receiver<Result<T, StorageError>>)
    where
        T: Send + 'static,
        F: FnMut(&mut WriteCtx<'_>) -> Result<T, StorageError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        (
            Msg::Job(Box::new(FnJob {
                f,
                result: None,
                reply,
            })),
            rx,
        )
    }

    /// Run `f` in a write transaction (shared with other queued jobs) and return its result
    /// once its batch is durable. `f` may run more than once if its batch is retried.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnMut(&mut WriteCtx<'_>) -> Result<T, StorageError> + Send + 'static,
    {
        let (msg, rx) = Self::job(f);
        self.queue
            .send(msg)
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// [`Writer::write`] for code outside the async runtime (CLI, blocking threads).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnMut(&mut WriteCtx<'_>) -> Result<T, StorageError> + Send + 'static,
    {
        let (msg, rx) = Self::job(f);
        self.queue
            .blocking_send(msg)
            .map_err(|_| StorageError::Closed)?;
        rx.blocking_recv().map_err(|_| StorageError::Closed)?
    }

    /// Append events to one stream; answers with their ids after the commit.
    pub async fn append(
        &self,
        stream: StreamKey,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Arc<Event>>, StorageError> {
        self.write(move |ctx| {
            events
                .iter()
                .map(|e| ctx.append(&stream, e.clone()))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    /// Commit what is queued, then stop the thread and wait for it. Idempotent. Blocks: call
    /// it from outside the async runtime's workers (e.g. `spawn_blocking`).
    pub fn shutdown(&self) {
        let Some(handle) = self.thread.lock().ok().and_then(|mut t| t.take()) else {
            return;
        };
        let mut msg = Msg::Shutdown;
        loop {
            match self.queue.try_send(msg) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => break,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    msg = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        let _ = handle.join();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where the writer reopens the database after an I/O error.
pub(crate) struct Reopen {
    pub path: PathBuf,
    pub options: StoreOptions,
}

fn run(
    shared: Arc<Shared>,
    reopen: Reopen,
    mut rx: mpsc::Receiver<Msg>,
    wal: Option<Wal>,
    tick: std::sync::mpsc::SyncSender<()>,
    observer: Arc<dyn AppendObserver>,
    tracker: Option<Arc<ChangeTracker>>,
) {
    let max_batch = reopen.options.max_batch.max(1);
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut shutdown = false;
    let mut writer = BatchWriter {
        db: shared.db().ok(),
        shared,
        retention: reopen.options.event_retention.max(1),
        reopen,
        wal,
        tick,
        observer: observer.as_ref(),
        tracker,
        broken: None,
        last_heal: None,
    };
    while !shutdown {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut checkpoint = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Job(job) => batch.push(job),
                Msg::Checkpoint => checkpoint = true,
                Msg::Shutdown => shutdown = true,
            }
            if !shutdown && batch.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            writer.commit(std::mem::take(&mut batch), checkpoint);
        } else if checkpoint {
            writer.checkpoint();
        }
        writer.nudge();
    }
    // Jobs still queued behind a shutdown are dropped; their callers get `Closed`.
    rx.close();
    // What only the append log holds goes into redb for good, so the next open replays nothing.
    if writer.broken.is_some() {
        writer.heal();
    } else {
        writer.checkpoint();
    }
}

/// The append log's epoch as the last checkpoint stored it (0 before the first).
pub(crate) fn stored_epoch(db: &Database) -> Result<u64, StorageError> {
    let rtx = db.begin_read()?;
    let meta = rtx.open_table(META)?;
    let stored = meta.get(EPOCH_KEY)?;
    Ok(match stored {
        Some(bytes) => decode::<WalEpoch>(bytes.value())?.epoch,
        None => 0,
    })
}

/// Store the append log's next epoch in `tx` (see [`crate::wal`]).
fn store_epoch(tx: &WriteTransaction, epoch: u64) -> Result<(), StorageError> {
    tx.open_table(META)?
        .insert(EPOCH_KEY, encode(&WalEpoch { epoch }).as_slice())?;
    Ok(())
}

/// A durable redb commit of what `fill` writes that also moves the append log to its next
/// epoch: afterwards redb holds everything the log did. On failure the log is unchanged.
pub(crate) fn commit_checkpoint<T>(
    db: &Database,
    wal: &mut Wal,
    fill: impl FnOnce(&WriteTransaction) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    let epoch = wal.epoch() + 1;
    let tx = db.begin_write()?;
    let out = fill(&tx)?;
    store_epoch(&tx, epoch)?;
    tx.commit()?;
    wal.checkpointed(epoch);
    Ok(out)
}

/// Longest time between two attempts to write again while the store cannot.
const HEAL_INTERVAL: std::time::Duration = CHECKPOINT_INTERVAL;

struct BatchWriter<'a> {
    shared: Arc<Shared>,
    reopen: Reopen,
    /// The database written to; None while reopening it failed.
    db: Option<Arc<Database>>,
    retention: u64,
    wal: Option<Wal>,
    /// Wakes the checkpoint thread (see [`Self::nudge`]).
    tick: std::sync::mpsc::SyncSender<()>,
    observer: &'a dyn AppendObserver,
    /// Notes of what each commit changed, for the store's backup.
    tracker: Option<Arc<ChangeTracker>>,
    /// Why the database cannot write, while it cannot.
    broken: Option<String>,
    /// When writing again was last tried.
    last_heal: Option<Instant>,
}

impl BatchWriter<'_> {
    /// Commit `batch`, durably in redb when `checkpoint` (or when it is more than appends).
    fn commit(&mut self, mut batch: Vec<Box<dyn Job>>, checkpoint: bool) {
        let db = match self.writable() {
            Ok(db) => db,
            Err(err) => {
                batch
                    .into_iter()
                    .for_each(|job| job.finish(Err(err.clone())));
                return;
            }
        };
        let mut tx = match db.begin_write() {
            Ok(tx) => tx,
            Err(e) => {
                drop(db);
                let io = matches!(&e, redb::TransactionError::Storage(s) if is_io(s));
                let err = self.failed(StorageError::from(e), io);
                batch
                    .into_iter()
                    .for_each(|job| job.finish(Err(err.clone())));
                return;
            }
        };
        let mut per_job: Vec<Vec<(StreamKey, Arc<Event>)>> = Vec::with_capacity(batch.len());
        let mut failure = None;
        let mut ctx = WriteCtx::new(&tx, self.retention).with_outbox(self.reopen.options.outbox);
        if self.tracker.is_some() {
            ctx = ctx.tracking();
        }
        for job in batch.iter_mut() {
            match job.apply(&mut ctx) {
                Ok(()) => per_job.push(std::mem::take(&mut ctx.appended)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let only_appends = !ctx.raw.get();
        let changed = match ctx.finish() {
            Ok(changed) => changed,
            Err(e) => {
                failure.get_or_insert(e);
                Vec::new()
            }
        };
        let logged = match failure {
            None => self.log_or_checkpoint(&mut tx, &per_job, only_appends && !checkpoint),
            Some(e) => Err(e),
        };
        let logged = match logged {
            Ok(logged) => logged,
            Err(err) => {
                let _ = tx.abort();
                drop(db);
                let err = self.failed(err, false);
                if batch.len() == 1 || self.broken.is_some() {
                    batch
                        .into_iter()
                        .for_each(|job| job.finish(Err(err.clone())));
                } else {
                    for job in batch {
                        self.commit(vec![job], checkpoint);
                    }
                }
                return;
            }
        };
        // The backup's notes of this batch, held across the commit: a snapshot opened under
        // the same lock holds exactly the commits whose notes were taken with it.
        let noted = self.tracker.as_deref().map(|tracker| {
            let streams: Vec<StreamKey> = per_job
                .iter()
                .flatten()
                .map(|(stream, _)| stream.clone())
                .collect();
            tracker.note(changed, &streams)
        });
        let committed = tx.commit();
        drop(noted);
        match committed {
            Ok(()) => {
                if let Some(wal) = self.wal.as_mut()
                    && let Commit::Checkpoint(epoch) = logged
                {
                    wal.checkpointed(epoch);
                }
                for job in batch {
                    job.finish(Ok(()));
                }
                if self.reopen.options.outbox {
                    self.shared.commits.send_modify(|n| *n += 1);
                }
                for appended in per_job.iter().filter(|a| !a.is_empty()) {
                    self.observer.committed(appended);
                }
            }
            Err(e) => {
                drop(db);
                tracing::error!(error = %e, "redb commit failed");
                if let (Some(wal), Commit::Logged(offset)) = (self.wal.as_mut(), logged) {
                    wal.withdraw(offset);
                }
                let io = matches!(&e, redb::CommitError::Storage(s) if is_io(s));
                let err = self.failed(StorageError::from(e), io);
                batch
                    .into_iter()
                    .for_each(|job| job.finish(Err(err.clone())));
            }
        }
    }

    /// The database to write to, after trying to write again if the store could not and the
    /// last try is [`HEAL_INTERVAL`] old; [`StorageError::Unwritable`] while it still cannot.
    fn writable(&mut self) -> Result<Arc<Database>, StorageError> {
        if self.broken.is_some()
            && self
                .last_heal
                .is_none_or(|at| at.elapsed() >= HEAL_INTERVAL)
        {
            self.heal();
        }
        match (&self.broken, &self.db) {
            (None, Some(db)) => Ok(db.clone()),
            (Some(reason), _) => Err(StorageError::Unwritable(reason.clone())),
            (None, None) => Err(StorageError::Closed),
        }
    }

    /// After `err`: when it is an I/O error or the database now refuses to write (redb latches
    /// the first I/O error), the store cannot write until [`Self::heal`] succeeds: reopen the
    /// database for the readers now, and answer [`StorageError::Unwritable`].
    fn failed(&mut self, err: StorageError, io: bool) -> StorageError {
        if self.broken.is_some() {
            return match err {
                StorageError::Unwritable(_) => err,
                _ => StorageError::Unwritable(self.broken.clone().unwrap_or_default()),
            };
        }
        let latched = match self.db.as_ref().map(|db| db.begin_write()) {
            Some(Ok(tx)) => {
                let _ = tx.abort();
                None
            }
            Some(Err(e)) => Some(e.to_string()),
            None => Some("the database is not open".into()),
        };
        if !io && latched.is_none() {
            return err;
        }
        let reason = match err {
            StorageError::Database(message) => message,
            other => other.to_string(),
        };
        tracing::error!(
            error = %reason,
            path = %self.reopen.path.display(),
            "the store cannot write; reopening it, and trying again every {:?}",
            HEAL_INTERVAL
        );
        self.set_broken(Some(reason.clone()));
        self.last_heal = Some(Instant::now());
        // The caller holds no handle any more (else the file could not be opened again).
        self.reopen_for_readers();
        StorageError::Unwritable(reason)
    }

    fn set_broken(&mut self, reason: Option<String>) {
        self.shared
            .set_problem(reason.as_ref().map(|r| format!("cannot write: {r}")));
        self.broken = reason;
    }

    /// Close the database and open it again; readers use the new handle. The appends only
    /// the append log holds are put back without a sync, so that readers see every
    /// acknowledged event even while nothing can be made durable.
    fn reopen_for_readers(&mut self) {
        let reason = self.broken.clone().unwrap_or_default();
        self.db = None;
        // Dropping the last handle closes the file; a reader may hold one for an instant.
        drop(self.shared.swap(DbSlot::Reopening(reason)));
        let mut tries = 0;
        let db = loop {
            match crate::open_database(&self.reopen.path, &self.reopen.options) {
                Ok(db) => break Arc::new(db),
                Err(StorageError::AlreadyOpen(_)) if tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => {
                    tracing::error!(error = %e, "reopening the store failed");
                    self.shared
                        .swap(DbSlot::Reopening(format!("reopening failed: {e}")));
                    return;
                }
            }
        };
        if let Some(wal) = self.wal.as_mut()
            && let Err(e) = replay_unsynced(&db, wal, self.retention, self.reopen.options.outbox)
        {
            tracing::warn!(error = %e, "the append log could not be put back before a sync");
        }
        self.shared.swap(DbSlot::Open(db.clone()));
        self.db = Some(db);
    }

    /// Try to write again: put back into the database with a durable commit what only the
    /// append log holds (a durable commit of the log's next epoch when it holds nothing). The
    /// store is writable again when that commit succeeds. A failed commit latches the handle,
    /// and reopening it ends the reads in flight: so a commit is tried only once a file of
    /// [`SPACE_PROBE`] bytes can be written beside the database.
    fn heal(&mut self) {
        self.last_heal = Some(Instant::now());
        if let Err(e) = room_to_write(&self.reopen.path) {
            let reason = format!(
                "{} (writing {} KiB beside it failed: {e})",
                self.broken.clone().unwrap_or_default(),
                SPACE_PROBE >> 10
            );
            tracing::debug!(reason, "the store still cannot write");
            return;
        }
        if self.db.is_none() {
            self.reopen_for_readers();
        }
        let Some(db) = self.db.clone() else {
            return;
        };
        let result = match self.wal.as_mut() {
            Some(wal) => {
                crate::replay_wal(&db, wal, self.retention, true, self.reopen.options.outbox)
            }
            None => probe_commit(&db),
        };
        drop(db);
        match result {
            Ok(()) => {
                tracing::info!(path = %self.reopen.path.display(), "the store writes again");
                self.set_broken(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store still cannot write");
                // The failed commit latched the handle: readers get a fresh one.
                self.reopen_for_readers();
            }
        }
    }

    /// Ask the checkpoint thread for a checkpoint when the log holds records (new ones, or
    /// ones a failed checkpoint or withdrawal left) or the store cannot write: one follows
    /// [`CHECKPOINT_INTERVAL`] later, and a failed one asks again. A token already waiting is
    /// enough: its checkpoint comes after this.
    fn nudge(&self) {
        if self.broken.is_some() || self.wal.as_ref().is_some_and(|wal| wal.pending()) {
            let _ = self.tick.try_send(());
        }
    }

    /// A durable commit of nothing but the append log's next epoch, when the log holds records;
    /// while the store cannot write, another try to write.
    fn checkpoint(&mut self) {
        if self.broken.is_some() {
            if self
                .last_heal
                .is_none_or(|at| at.elapsed() >= HEAL_INTERVAL / 2)
            {
                self.heal();
            }
            return;
        }
        let Some(db) = self.db.clone() else {
            return;
        };
        let Some(wal) = self.wal.as_mut().filter(|w| w.pending()) else {
            return;
        };
        // On failure the log still holds everything; the next checkpoint or open tries again.
        if let Err(e) = commit_checkpoint(&db, wal, |_| Ok(())) {
            drop(db);
            tracing::error!(error = %e, "append log checkpoint failed");
            self.failed(e, false);
        }
    }

    /// Make `tx` durable one way or the other before it is committed: an event-only batch as
    /// one synced append-log record (and redb commits without syncing), anything else as a
    /// durable redb commit that, when the log holds records, also moves it to a new epoch.
    fn log_or_checkpoint(
        &mut self,
        tx: &mut WriteTransaction,
        per_job: &[Vec<(StreamKey, Arc<Event>)>],
        may_log: bool,
    ) -> Result<Commit, StorageError> {
        let Some(wal) = self.wal.as_mut() else {
            return Ok(Commit::Durable);
        };
        let appended: Vec<&(StreamKey, Arc<Event>)> = per_job.iter().flatten().collect();
        if may_log
            && !appended.is_empty()
            && !wal.due()
            && let Some(record) = wal.record(&appended)
            && tx.set_durability(Durability::None).is_ok()
        {
            match wal.write(&record) {
                Ok(offset) => return Ok(Commit::Logged(offset)),
                // The slower way still works: commit durably instead.
                Err(e) => {
                    tracing::warn!(error = %e, "append log write failed");
                    tx.set_durability(Durability::Immediate)
                        .map_err(|e| StorageError::Database(e.to_string()))?;
                }
            }
        }
        if !wal.pending() {
            return Ok(Commit::Durable);
        }
        let epoch = wal.epoch() + 1;
        store_epoch(tx, epoch)?;
        Ok(Commit::Checkpoint(epoch))
    }
}

/// How a batch was made durable.
enum Commit {
    /// By redb alone; the append log holds nothing.
    Durable,
    /// By redb, moving the append log to this epoch.
    Checkpoint(u64),
    /// By the append-log record at this offset; redb commits without syncing.
    Logged(u64),
}

/// Whether redb failed on the file itself (or latched such a failure).
fn is_io(e: &redb::StorageError) -> bool {
    matches!(
        e,
        redb::StorageError::Io(_) | redb::StorageError::PreviousIo
    )
}

/// Bytes written (and synced, then removed) beside the database before a durable commit is
/// tried again while the store cannot write.
const SPACE_PROBE: usize = 1 << 20;

/// Whether [`SPACE_PROBE`] bytes can be written and synced beside the database at `db_path`.
fn room_to_write(db_path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = db_path.as_os_str().to_owned();
    name.push(".space-probe");
    let probe = PathBuf::from(name);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&probe)
        .and_then(|mut file| {
            file.write_all(&vec![0u8; SPACE_PROBE])?;
            file.sync_data()
        });
    let _ = std::fs::remove_file(&probe);
    result
}

/// The `meta` key [`probe_commit`] writes.
pub(crate) const PROBE_KEY: &str = "write_probe";

/// A durable commit of one small record: whether the database can write.
fn probe_commit(db: &Database) -> Result<(), StorageError> {
    let tx = db.begin_write()?;
    tx.open_table(META)?
        .insert(PROBE_KEY, now_ms().to_le_bytes().as_slice())?;
    tx.commit()?;
    Ok(())
}

/// Put back the records of the append log's stored epoch with a commit that does not sync
/// (it needs no new disk space before the next durable commit): readers of a reopened
/// database see every acknowledged event. The log keeps its epoch: the records stay the only
/// durable copy until a checkpoint.
fn replay_unsynced(
    db: &Database,
    wal: &mut Wal,
    retention: u64,
    outbox: bool,
) -> Result<(), StorageError> {
    let events = wal.recover(stored_epoch(db)?)?;
    if events.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None)
        .map_err(|e| StorageError::Database(e.to_string()))?;
    let mut ctx = WriteCtx::new(&tx, retention).with_outbox(outbox);
    for event in events {
        match ctx.restore(event) {
            Ok(_) => {}
            Err(e @ StorageError::Corrupt { .. }) => {
                tracing::error!(error = %e, "append log record skipped");
            }
            Err(e) => return Err(e),
        }
    }
    ctx.finish()?;
    tx.commit()?;
    Ok(())
}
