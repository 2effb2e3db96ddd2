//! The one writer.
//!
//! redb allows one write transaction at a time and each durable commit costs an fsync (about a
//! millisecond). A dedicated thread takes write jobs from a queue and folds every job waiting
//! at that moment into one transaction, so N concurrent appends share one fsync. A job's
//! caller is answered only after the commit is durable; events appended by a job are handed to
//! the [`AppendObserver`] after the commit, in commit order, so nobody ever sees an event that
//! could still be lost. The callers are answered first: a producer should not wait while the
//! observer wakes a thousand subscribers, and nothing depends on the other order (a subscriber
//! drops frames it already has, and the next batch is observed only after this one).
//!
//! If one job of a batch fails, the batch is aborted and its jobs run again one transaction
//! each, so a bad job never takes good ones down with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::StorageError;
use crate::events::{AppendObserver, Event, NewEvent, StoredEvent, StreamKey, StreamMeta};
use crate::record::{decode, encode};
use crate::tables::{EVENTS, STREAMS};

/// Queue depth before writers wait (back-pressure instead of unbounded memory).
const QUEUE_DEPTH: usize = 8192;

/// What a write job sees: the transaction, plus event appends that are published on commit.
///
/// One context serves a whole batch: the event tables stay open and each stream's bounds are
/// kept in memory and written once before the commit, so an append costs one insert however
/// many share the commit. Jobs therefore never open the `events` or `streams` tables themselves.
pub struct WriteCtx<'a> {
    tx: &'a WriteTransaction,
    retention: u64,
    appended: Vec<(StreamKey, Arc<Event>)>,
    events: Option<redb::Table<'a, (&'static str, u64), &'static [u8]>>,
    metas: HashMap<StreamKey, StreamMeta>,
}

impl<'a> WriteCtx<'a> {
    fn new(tx: &'a WriteTransaction, retention: u64) -> Self {
        Self {
            tx,
            retention,
            appended: Vec::new(),
            events: None,
            metas: HashMap::new(),
        }
    }

    pub fn tx(&self) -> &'a WriteTransaction {
        self.tx
    }

    /// Append one event to `stream` in this transaction; it gets the stream's next id.
    pub fn append(
        &mut self,
        stream: &StreamKey,
        event: NewEvent,
    ) -> Result<Arc<Event>, StorageError> {
        let mut meta = match self.metas.get(stream) {
            Some(meta) => *meta,
            None => {
                let streams = self.tx.open_table(STREAMS)?;
                match streams.get(stream.as_str())? {
                    Some(bytes) => decode::<StreamMeta>(bytes.value())?,
                    None => StreamMeta::EMPTY,
                }
            }
        };
        if self.events.is_none() {
            self.events = Some(self.tx.open_table(EVENTS)?);
        }
        let events = self.events.as_mut().ok_or(StorageError::Closed)?;
        let id = meta.next_id;
        let at_ms = now_ms();
        let stored = StoredEvent {
            kind: event.kind,
            data: event.data,
            at_ms,
        };
        events.insert((stream.as_str(), id), encode(&stored).as_slice())?;
        meta.next_id += 1;
        while meta.next_id - meta.first_id > self.retention {
            events.remove((stream.as_str(), meta.first_id))?;
            meta.first_id += 1;
        }
        self.metas.insert(stream.clone(), meta);
        let event = Arc::new(Event {
            id,
            kind: stored.kind,
            data: stored.data,
            at_ms,
        });
        self.appended.push((stream.clone(), event.clone()));
        Ok(event)
    }

    /// Write the streams' bounds and close the tables, before the commit.
    fn finish(mut self) -> Result<(), StorageError> {
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
        observer: Arc<dyn AppendObserver>,
    ) -> Result<Self, StorageError> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || run(db, rx, max_batch.max(1), retention.max(1), observer))
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
    /// once the commit is durable. `f` may run more than once if its batch is retried.
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
    observer: Arc<dyn AppendObserver>,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        let mut shutdown = false;
        match first {
            Msg::Job(job) => batch.push(job),
            Msg::Shutdown => shutdown = true,
        }
        while !shutdown && batch.len() < max_batch {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Shutdown) => shutdown = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(
                &db,
                std::mem::take(&mut batch),
                retention,
                observer.as_ref(),
            );
        }
        if shutdown {
            // Jobs still queued behind the shutdown are dropped; their callers get `Closed`.
            rx.close();
            return;
        }
    }
}

fn commit_batch(
    db: &Database,
    mut batch: Vec<Box<dyn Job>>,
    retention: u64,
    observer: &dyn AppendObserver,
) {
    let tx = match db.begin_write() {
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
    let mut ctx = WriteCtx::new(&tx, retention);
    for job in batch.iter_mut() {
        match job.apply(&mut ctx) {
            Ok(()) => per_job.push(std::mem::take(&mut ctx.appended)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    match ctx.finish() {
        Err(e) if failure.is_none() => failure = Some(e),
        _ => {}
    }
    if let Some(err) = failure {
        let _ = tx.abort();
        if batch.len() == 1 {
            batch
                .into_iter()
                .for_each(|job| job.finish(Err(err.clone())));
        } else {
            for job in batch {
                commit_batch(db, vec![job], retention, observer);
            }
        }
        return;
    }
    match tx.commit() {
        Ok(()) => {
            for job in batch {
                job.finish(Ok(()));
            }
            for appended in per_job.iter().filter(|a| !a.is_empty()) {
                observer.committed(appended);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "redb commit failed");
            let err = StorageError::from(e);
            batch
                .into_iter()
                .for_each(|job| job.finish(Err(err.clone())));
        }
    }
}
