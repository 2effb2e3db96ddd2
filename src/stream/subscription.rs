//! One SSE subscriber: replay from redb, then live frames from the ring, with no gap and no
//! duplicate.
//!
//! The subscriber keeps `last_sent`, the id of the last event it wrote. It subscribes to the
//! ring *before* it looks at redb, so nothing committed after that can slip between the two.
//! A ring frame with `id <= last_sent` is a duplicate and dropped; a frame with
//! `id > last_sent + 1` means a gap, and so does `Lagged`: either way the subscriber reads the
//! missing ids from redb (they are committed: the ring only ever carries committed events)
//! and then continues live. A cursor older than retention gets an explicit `reset` frame.
//!
//! Whole blocks of the log below the head it last read come from the shared [`FrameCache`]
//! (encoded once for every subscriber); the first page, the tail and anything the cache cannot
//! hold are read from redb. Only a redb read ends a catch-up, so the switch to live frames
//! always happens against a fresh snapshot of the log.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_util::sync::CancellationToken;
use weldr_storage::events::{read_meta, read_range};
use weldr_storage::{StorageError, Store, StreamKey, StreamMeta};

use super::cache::{self, FrameCache, Miss};
use super::{Frame, encode_frame};

/// Events read from redb per page.
const PAGE: usize = 1024;
/// The first page of a replay is small, so that every one of many clients resuming at once
/// gets its first events quickly; later pages are full.
const FIRST_PAGE: usize = 32;
/// A chunk written to the socket is cut at about this size.
const CHUNK_LIMIT: usize = 256 * 1024;
/// Browser reconnect delay hint.
const RETRY_MS: u64 = 2000;

/// Where a subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Only events committed after the subscription.
    Live,
    /// Every event with an id greater than this (`After(0)` replays the whole log).
    After(u64),
}

pub struct Subscription {
    store: Store,
    frames: Arc<FrameCache>,
    key: StreamKey,
    /// The log's bounds at the last redb read (None before the first).
    bounds: Option<StreamMeta>,
    rx: broadcast::Receiver<Arc<Frame>>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    last_sent: u64,
    catching_up: bool,
    /// Pages read from redb so far.
    pages: u64,
    /// Counts this replay among those whose first page is not out yet (see [`Opening`]).
    opening: Option<Opening>,
    preamble: Option<Bytes>,
    done: bool,
    /// When the last chunk went out, and a timer that fires at most once per heartbeat
    /// interval: a live event only notes the time instead of re-arming a timer.
    last_write: tokio::time::Instant,
    heartbeat_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Subscription {
    /// Subscribe to `key` from `cursor`. `rx` must come from the bus before this is called.
    pub async fn start(
        store: Store,
        frames: Arc<FrameCache>,
        key: StreamKey,
        rx: broadcast::Receiver<Arc<Frame>>,
        cursor: Cursor,
        shutdown: CancellationToken,
        heartbeat: Duration,
    ) -> Result<Self, StorageError> {
        let (last_sent, catching_up) = match cursor {
            Cursor::After(n) => (n, true),
            Cursor::Live => {
                let meta = read_bounds(&store, &key).await?;
                (meta.last_id(), false)
            }
        };
        Ok(Self {
            store,
            frames,
            key,
            bounds: None,
            rx,
            shutdown,
            heartbeat,
            last_sent,
            catching_up,
            opening: catching_up.then(Opening::new),
            pages: 0,
            preamble: Some(Bytes::from(format!("retry: {RETRY_MS}\n: connected\n\n"))),
            done: false,
            last_write: tokio::time::Instant::now(),
            heartbeat_timer: Box::pin(tokio::time::sleep(heartbeat)),
        })
    }

    /// What can go out with the response head without waiting for a live event: the
    /// preamble and, when replaying, the first page. A stream then opens with one write.
    pub async fn first_chunk(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if let Some(preamble) = self.preamble.take() {
            out.extend_from_slice(&preamble);
        }
        self.replay(&mut out).await;
        self.last_write = tokio::time::Instant::now();
        out.freeze()
    }

    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// The SSE body as a stream of byte chunks.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(self, |mut sub| async move {
            sub.next_chunk().await.map(|chunk| (Ok(chunk), sub))
        })
    }

    /// The next bytes to write, or None when the stream ends (shutdown or storage failure).
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        // A long replay ends at shutdown too, not only a live wait.
        if self.done || self.shutdown.is_cancelled() {
            self.done = true;
            return None;
        }
        let mut out = BytesMut::new();
        if let Some(preamble) = self.preamble.take() {
            out.extend_from_slice(&preamble);
        }
        loop {
            self.replay(&mut out).await;
            if !out.is_empty() || self.done {
                if out.is_empty() {
                    return None;
                }
                self.last_write = tokio::time::Instant::now();
                return Some(out.freeze());
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.done = true;
                    return None;
                }
                received = self.rx.recv() => match received {
                    Ok(frame) => {
                        self.take_live(&frame, &mut out);
                        while !self.catching_up && out.len() < CHUNK_LIMIT {
                            match self.rx.try_recv() {
                                Ok(frame) => self.take_live(&frame, &mut out),
                                Err(TryRecvError::Lagged(_)) => self.catching_up = true,
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => self.catching_up = true,
                    Err(RecvError::Closed) => self.done = true,
                },
                _ = self.heartbeat_timer.as_mut() => {
                    let now = tokio::time::Instant::now();
                    let due = self.last_write + self.heartbeat;
                    if due > now {
                        // Something went out since the timer was set: wait out the rest.
                        self.heartbeat_timer.as_mut().reset(due);
                    } else {
                        out.extend_from_slice(b": keep-alive\n\n");
                        self.heartbeat_timer.as_mut().reset(now + self.heartbeat);
                    }
                }
            }
        }
    }

    /// Catch up into `out` when behind; a storage failure ends the stream.
    async fn replay(&mut self, out: &mut BytesMut) {
        // Boxed: the replay's future is large and rarely needed; an idle subscriber's task
        // should not carry it.
        if self.catching_up
            && !self.done
            && let Err(e) = Box::pin(self.catch_up(out)).await
        {
            tracing::warn!(stream = %self.key, error = %e, "ending SSE stream: replay from storage failed");
            self.done = true;
        }
    }

    fn take_live(&mut self, frame: &Frame, out: &mut BytesMut) {
        if frame.id <= self.last_sent {
            return;
        }
        if frame.id == self.last_sent + 1 {
            out.extend_from_slice(&frame.bytes);
            self.last_sent = frame.id;
        } else {
            self.catching_up = true;
        }
    }

    /// Append events after `last_sent` from redb until caught up or the chunk is full.
    async fn catch_up(&mut self, out: &mut BytesMut) -> Result<(), StorageError> {
        // Everything after the first page is bulk: it waits its turn (see [`bulk`]), then lets
        // new clients go first for a little while. In that order: the turns wake waiters one
        // at a time, so only those holding one wait on the new clients.
        let _turn = if self.pages > 0 {
            let permit = bulk().acquire().await;
            let permit = permit.map_err(|e| StorageError::Database(e.to_string()))?;
            Opening::let_them_go_first().await;
            Some(permit)
        } else {
            None
        };
        while self.catching_up && out.len() < CHUNK_LIMIT {
            if let Some(frames) = self.cached_frames().await? {
                out.extend_from_slice(&frames);
                continue;
            }
            let limit = if self.pages == 0 { FIRST_PAGE } else { PAGE };
            self.pages += 1;
            let (meta, events) =
                read_page(&self.store, &self.key, self.last_sent + 1, limit).await?;
            self.bounds = Some(meta);
            if self.last_sent > meta.last_id() {
                // The client knows ids this log never had (e.g. the store was replaced).
                self.reset(out, meta.last_id(), "cursor_ahead", &meta);
                self.catching_up = false;
                break;
            }
            if self.last_sent + 1 < meta.first_id {
                self.reset(out, meta.first_id - 1, "cursor_expired", &meta);
                continue;
            }
            let before = self.last_sent;
            let mut buf = Vec::new();
            for event in &events {
                if event.id != self.last_sent + 1 {
                    break;
                }
                encode_frame(event, &mut buf);
                self.last_sent = event.id;
            }
            out.extend_from_slice(&buf);
            if self.last_sent >= meta.last_id() {
                self.catching_up = false;
            } else if self.last_sent == before {
                // One read snapshot holds ids first_id..=last_id contiguously; a hole is damage.
                return Err(StorageError::Corrupt {
                    kind: "event",
                    message: format!("stream {} has no event {}", self.key, before + 1),
                });
            }
            if self.pages == 1 {
                // The first events go out on their own.
                break;
            }
        }
        if self.pages > 0 || !self.catching_up {
            self.opening = None;
        }
        Ok(())
    }

    /// The frames after `last_sent` to the end of its block, when the block is whole in the
    /// log as last read and the cache has it or loads it; None sends the caller to redb.
    async fn cached_frames(&mut self) -> Result<Option<Bytes>, StorageError> {
        let Some(bounds) = self.bounds else {
            return Ok(None);
        };
        let next = self.last_sent + 1;
        let index = cache::block_of(next);
        let (first, last) = cache::block_ids(index);
        if first < bounds.first_id || last > bounds.last_id() {
            return Ok(None);
        }
        let (store, key) = (&self.store, &self.key);
        let load = || async move {
            read_page(store, key, first, cache::BLOCK as usize)
                .await
                .map(|(_, events)| events)
        };
        match self.frames.get_or_load(key, index, load).await {
            Ok(block) => {
                // Events trimmed since `bounds` was read may be among them: they are still
                // the log's events, in order, so sending them is right.
                self.last_sent = block.last_id();
                Ok(Some(block.frames_from(next)))
            }
            Err(Miss::Uncached) => Ok(None),
            Err(Miss::Storage(e)) => Err(e),
        }
    }

    fn reset(&mut self, out: &mut BytesMut, new_last: u64, reason: &str, meta: &StreamMeta) {
        let frame = format!(
            "id: {new_last}\nevent: reset\ndata: {{\"id\":{new_last},\"type\":\"reset\",\"reason\":\"{reason}\",\
             \"requestedAfter\":{},\"oldestId\":{},\"latestId\":{}}}\n\n",
            self.last_sent,
            meta.first_id,
            meta.last_id()
        );
        out.extend_from_slice(frame.as_bytes());
        self.last_sent = new_last;
    }
}

/// The log's bounds, read on the store's reader threads.
async fn read_bounds(store: &Store, key: &StreamKey) -> Result<StreamMeta, StorageError> {
    let key = key.clone();
    store.read(move |s| read_meta(&s.begin_read()?, &key)).await
}

/// A replay whose first page has not been made yet. While there are any, bulk chunks hold
/// back for up to [`Opening::MAX_WAIT`]: after a restart a thousand clients resume at once,
/// and the CPU should go to giving each its first events before it goes to the rest of
/// anyone's log. The wait is bounded so that a steady stream of new clients cannot starve
/// the ones catching up.
struct Opening;

struct Openers {
    count: std::sync::atomic::AtomicUsize,
    none_left: tokio::sync::Notify,
}

impl Opening {
    const MAX_WAIT: Duration = Duration::from_millis(50);

    fn openers() -> &'static Openers {
        static OPENERS: Openers = Openers {
            count: std::sync::atomic::AtomicUsize::new(0),
            none_left: tokio::sync::Notify::const_new(),
        };
        &OPENERS
    }

    fn new() -> Self {
        Self::openers()
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Opening
    }

    /// Wait until no replay is waiting for its first page, or [`Self::MAX_WAIT`].
    async fn let_them_go_first() {
        let openers = Self::openers();
        let deadline = tokio::time::Instant::now() + Self::MAX_WAIT;
        loop {
            let notified = openers.none_left.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if openers.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        let openers = Self::openers();
        if openers
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            openers.none_left.notify_waiters();
        }
    }
}

/// Replay chunks after the first page being made at once, process-wide. Without a bound, a
/// thousand clients catching up at once are all runnable at the same moment: every one of them
/// reads redb on a blocking thread or copies cached frames on the runtime, and a new client's
/// accept, authentication and first page queue behind all of them. With it, the others wait
/// on the semaphore (first come, first served) and a first page, which does not wait here,
/// goes out ahead of the bulk.
fn bulk() -> &'static tokio::sync::Semaphore {
    static BULK: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    BULK.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cpus.clamp(2, 16))
    })
}

/// The log's bounds and up to `limit` events from `from_id`, in one snapshot. A first page is
/// a short read and goes to the store's reader threads, ahead of nothing; a bulk page (taken
/// in turn, see [`bulk`]) runs on a blocking thread of its own so it never holds up the short
/// reads that new requests make.
async fn read_page(
    store: &Store,
    key: &StreamKey,
    from_id: u64,
    limit: usize,
) -> Result<(StreamMeta, Vec<Arc<weldr_storage::Event>>), StorageError> {
    let key = key.clone();
    let read = move |store: &Store| {
        let rtx = store.begin_read()?;
        let meta = read_meta(&rtx, &key)?;
        let events = read_range(
            &rtx,
            &key,
            from_id.max(meta.first_id),
            meta.last_id(),
            limit,
        )?;
        Ok((meta, events))
    };
    if limit <= FIRST_PAGE {
        return store.read(read).await;
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || read(&store))
        .await
        .map_err(|e| StorageError::Database(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bulk replay holds back for new clients, but never for good: a client that never gets
    /// its first page (stuck, or one after another without end) cannot starve the others.
    #[tokio::test]
    async fn bulk_holds_back_for_new_clients_but_not_for_good() {
        let stuck = Opening::new();
        // A minute stands for "never" (the bound is far shorter).
        let waited =
            tokio::time::timeout(Duration::from_secs(60), Opening::let_them_go_first()).await;
        assert!(waited.is_ok(), "bulk waited for a stuck client without end");
        drop(stuck);
    }
}
