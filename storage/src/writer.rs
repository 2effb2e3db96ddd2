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

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::StorageError;
use crate::events::{AppendObserver, Event, NewEvent, StoredEvent, StreamKey, StreamMeta};
use crate::record::{decode, encode};
use crate::tables::{EVENTS, META, STREAMS};
use crate::wal::{CHECKPOINT_INTERVAL, EPOCH_KEY, Wal, WalEpoch, WalEvent};

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
        }
    }

    /// The transaction, for anything but appends (which go through [`WriteCtx::append`]). A
    /// batch whose jobs use it is always committed durably by redb itself.
    pub fn tx(&self) -> &'a WriteTransaction {
        self.raw.set(true);
        self.tx
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

    fn meta(&self, stream: &StreamKey) -> Result<StreamMeta, StorageError> {
        Ok(match self.metas.get(stream) {
            Some(meta) => *meta,
            None => {
                let streams = self.tx.open_table(STREAMS)?;
                match streams.get(stream.as_str())? {
                    Some(bytes) => decode::<StreamMeta>(bytes.value())?,
                    None => StreamMeta::EMPTY,
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

    /// Write the streams' bounds and close the tables, before the commit.
    pub(crate) fn finish(mut self) -> Result<(), StorageError> {
        self.events.take();
        if self.metas.is_empty() {
            return Ok(());
        }
        let mut streams = self.tx.open_table(STREAMS)?;
        for (stream, meta) in &self.metas {
            streams.insert(stream.as_str(), encode(meta).as_slice())?;
        }
        Ok(())
    }
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
    /// found records in it).
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
        db: Arc<Database>,
        max_batch: usize,
        retention: u64,
        wal: Option<Wal>,
        observer: Arc<dyn AppendObserver>,
    ) -> Result<Self, StorageError> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let mut tick = None;
        if wal.is_some() {
            // Checkpoints while appends are quiet, so that redb catches up on its own and a
            // crash leaves little to replay: the writer says when the log holds records, and
            // a checkpoint follows one interval later. An idle store never wakes this thread.
            // It ends when the writer has stopped (its side of `pending` is dropped).
            let (pending, wait) = std::sync::mpsc::sync_channel::<()>(1);
            tick = Some(pending);
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("redb-checkpoint".into())
                .spawn(move || {
                    while wait.recv().is_ok() {
                        std::thread::sleep(CHECKPOINT_INTERVAL);
                        if let Err(mpsc::error::TrySendError::Closed(_)) =
                            queue.try_send(Msg::Checkpoint)
                        {
                            break;
                        }
                    }
                })
                .map_err(|e| StorageError::Database(format!("starting a thread: {e}")))?;
        }
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || {
                run(
                    db,
                    rx,
                    max_batch.max(1),
                    retention.max(1),
                    wal,
                    tick,
                    observer,
                )
            })
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

fn run(
    db: Arc<Database>,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    retention: u64,
    mut wal: Option<Wal>,
    tick: Option<std::sync::mpsc::SyncSender<()>>,
    observer: Arc<dyn AppendObserver>,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut shutdown = false;
    let mut writer = BatchWriter {
        db: &db,
        retention,
        wal: wal.as_mut(),
        tick,
        observer: observer.as_ref(),
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
    writer.checkpoint();
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

struct BatchWriter<'a> {
    db: &'a Database,
    retention: u64,
    wal: Option<&'a mut Wal>,
    /// Wakes the checkpoint thread (see [`Self::nudge`]).
    tick: Option<std::sync::mpsc::SyncSender<()>>,
    observer: &'a dyn AppendObserver,
}

impl BatchWriter<'_> {
    /// Commit `batch`, durably in redb when `checkpoint` (or when it is more than appends).
    fn commit(&mut self, mut batch: Vec<Box<dyn Job>>, checkpoint: bool) {
        let mut tx = match self.db.begin_write() {
            Ok(tx) => tx,
            Err(e) => {
                let err = StorageError::from(e);
                batch
                    .into_iter()
                    .for_each(|job| job.finish(Err(err.clone())));
                return;
            }
        };
        let mut per_job: Vec<Vec<(StreamKey, Arc<Event>)>> = Vec::with_capacity(batch.len());
        let mut failure = None;
        let mut ctx = WriteCtx::new(&tx, self.retention);
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
        match ctx.finish() {
            Err(e) if failure.is_none() => failure = Some(e),
            _ => {}
        }
        let logged = match failure {
            None => self.log_or_checkpoint(&mut tx, &per_job, only_appends && !checkpoint),
            Some(e) => Err(e),
        };
        let logged = match logged {
            Ok(logged) => logged,
            Err(err) => {
                let _ = tx.abort();
                if batch.len() == 1 {
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
        match tx.commit() {
            Ok(()) => {
                if let Some(wal) = self.wal.as_deref_mut()
                    && let Commit::Checkpoint(epoch) = logged
                {
                    wal.checkpointed(epoch);
                }
                for job in batch {
                    job.finish(Ok(()));
                }
                for appended in per_job.iter().filter(|a| !a.is_empty()) {
                    self.observer.committed(appended);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "redb commit failed");
                if let (Some(wal), Commit::Logged(offset)) = (self.wal.as_deref_mut(), logged) {
                    wal.withdraw(offset);
                }
                let err = StorageError::from(e);
                batch
                    .into_iter()
                    .for_each(|job| job.finish(Err(err.clone())));
            }
        }
    }

    /// Ask the checkpoint thread for a checkpoint when the log holds records (new ones, or
    /// ones a failed checkpoint or withdrawal left): one follows [`CHECKPOINT_INTERVAL`] later,
    /// and a failed one asks again. A token already waiting is enough: its checkpoint comes
    /// after this.
    fn nudge(&self) {
        if let (Some(tick), Some(wal)) = (&self.tick, self.wal.as_deref())
            && wal.pending()
        {
            let _ = tick.try_send(());
        }
    }

    /// A durable commit of nothing but the append log's next epoch, when the log holds records.
    fn checkpoint(&mut self) {
        let Some(wal) = self.wal.as_deref_mut().filter(|w| w.pending()) else {
            return;
        };
        // On failure the log still holds everything; the next checkpoint or open tries again.
        if let Err(e) = commit_checkpoint(self.db, wal, |_| Ok(())) {
            tracing::error!(error = %e, "append log checkpoint failed");
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
        let Some(wal) = self.wal.as_deref_mut() else {
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
