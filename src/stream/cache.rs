//! Encoded frames of whole blocks of a stream's log, shared by every subscriber that catches up.
//!
//! A client that resumes far behind the head replays events from redb. Read and encoded per
//! client, a replay costs a decode, an allocation and a frame encoding per event per client; a
//! thousand clients resuming the same branch after a deploy repeat the same work a thousand
//! times. Stored events never change (ids are never reused: streams are never deleted and
//! retention only drops the oldest), so a block of [`BLOCK`] consecutive events, once complete,
//! can be encoded once and its bytes handed to every subscriber that passes through it.
//!
//! The cache holds complete blocks only (the tail of a log still grows and is read from redb),
//! is bounded in bytes (least recently used blocks go first), and loads each block once however
//! many subscribers ask for it at the same moment. It is only an accelerator: redb stays the
//! source of truth, and a block that cannot be loaded whole is simply read the ordinary way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;
use weldr_storage::{Event, StorageError, StreamKey};

use super::encode_frame;

/// Events per block. Block `k` holds ids `k * BLOCK + 1 ..= (k + 1) * BLOCK`.
pub const BLOCK: u64 = 256;

/// The block that holds `id` (ids start at 1).
pub fn block_of(id: u64) -> u64 {
    id.saturating_sub(1) / BLOCK
}

/// First and last id of block `index`.
pub fn block_ids(index: u64) -> (u64, u64) {
    (index * BLOCK + 1, (index + 1) * BLOCK)
}

/// The frames of one complete block, encoded once.
#[derive(Debug)]
pub struct Block {
    first_id: u64,
    bytes: Bytes,
    /// Where each event's frame starts in `bytes`.
    starts: Vec<u32>,
}

impl Block {
    /// Encode `events`, which must be the consecutive ids of one whole block.
    pub fn encode(events: &[Arc<Event>]) -> Option<Block> {
        let first_id = events.first()?.id;
        let whole = events.len() as u64 == BLOCK
            && (first_id - 1) % BLOCK == 0
            && events.iter().zip(first_id..).all(|(e, id)| e.id == id);
        if !whole {
            return None;
        }
        let size: usize = events.iter().map(|e| e.data.len() + 96).sum();
        let mut buf = Vec::with_capacity(size);
        let mut starts = Vec::with_capacity(events.len());
        for event in events {
            starts.push(u32::try_from(buf.len()).ok()?);
            encode_frame(event, &mut buf);
        }
        Some(Block {
            first_id,
            bytes: Bytes::from(buf),
            starts,
        })
    }

    pub fn last_id(&self) -> u64 {
        self.first_id + self.starts.len() as u64 - 1
    }

    /// The frames of `id` and every later event of the block (shared, not copied).
    pub fn frames_from(&self, id: u64) -> Bytes {
        let index = id.saturating_sub(self.first_id) as usize;
        match self.starts.get(index) {
            Some(start) => self.bytes.slice(*start as usize..),
            None => Bytes::new(),
        }
    }

    fn size(&self) -> usize {
        self.bytes.len() + self.starts.len() * 4 + 64
    }
}

/// Why a block did not come from the cache.
#[derive(Debug)]
pub enum Miss {
    /// Not cached (the cache is off, or the block is not whole in the log because retention
    /// trimmed it meanwhile): read it the ordinary way.
    Uncached,
    Storage(StorageError),
}

struct Entry {
    cell: Arc<OnceCell<Arc<Block>>>,
    /// When it was last used (a tick of [`Inner::clock`]); the smallest goes first.
    used: u64,
    /// Bytes counted against the budget (0 while loading).
    size: usize,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<(StreamKey, u64), Entry>,
    bytes: usize,
    clock: u64,
}

/// Complete blocks of encoded frames, bounded by `budget` bytes.
pub struct FrameCache {
    budget: usize,
    inner: Mutex<Inner>,
}

impl FrameCache {
    /// A cache of at most `budget` bytes; 0 turns it off.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Block `index` of `key`, from the cache or from `load` (run once for everyone asking at
    /// the same moment). `load` gives the block's events.
    pub async fn get_or_load<F, Fut>(
        &self,
        key: &StreamKey,
        index: u64,
        load: F,
    ) -> Result<Arc<Block>, Miss>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Arc<Event>>, StorageError>>,
    {
        if self.budget == 0 {
            return Err(Miss::Uncached);
        }
        let cell = {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            let entry = inner
                .blocks
                .entry((key.clone(), index))
                .or_insert_with(|| Entry {
                    cell: Arc::default(),
                    used: now,
                    size: 0,
                });
            entry.used = now;
            if let Some(block) = entry.cell.get() {
                return Ok(block.clone());
            }
            entry.cell.clone()
        };
        let loaded = cell
            .get_or_try_init(|| async {
                let events = load().await.map_err(Miss::Storage)?;
                Block::encode(&events).map(Arc::new).ok_or(Miss::Uncached)
            })
            .await
            .cloned();
        match loaded {
            Ok(block) => {
                self.admit(key, index, &cell, block.size());
                Ok(block)
            }
            Err(miss) => {
                self.forget_empty(key, index, &cell);
                Err(miss)
            }
        }
    }

    /// Drop the entry of a load that failed, unless another load filled it meanwhile.
    fn forget_empty(&self, key: &StreamKey, index: u64, cell: &Arc<OnceCell<Arc<Block>>>) {
        let mut inner = self.lock();
        let k = (key.clone(), index);
        if inner
            .blocks
            .get(&k)
            .is_some_and(|e| Arc::ptr_eq(&e.cell, cell) && !e.cell.initialized())
        {
            inner.blocks.remove(&k);
        }
    }

    /// Count a loaded block against the budget, then drop the least recently used blocks
    /// until the cache fits.
    fn admit(&self, key: &StreamKey, index: u64, cell: &Arc<OnceCell<Arc<Block>>>, size: usize) {
        let mut inner = self.lock();
        let Some(entry) = inner.blocks.get_mut(&(key.clone(), index)) else {
            return;
        };
        if !Arc::ptr_eq(&entry.cell, cell) || entry.size != 0 {
            return;
        }
        entry.size = size;
        inner.bytes += size;
        while inner.bytes > self.budget {
            let oldest = inner
                .blocks
                .iter()
                .filter(|(_, e)| e.size > 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some(gone) = inner.blocks.remove(&oldest) {
                inner.bytes -= gone.size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(first: u64, count: u64) -> Vec<Arc<Event>> {
        (first..first + count)
            .map(|id| {
                Arc::new(Event {
                    id,
                    kind: "text".into(),
                    data: format!("{{\"n\":{id}}}"),
                    at_ms: 1,
                })
            })
            .collect()
    }

    #[test]
    fn blocks_are_aligned_whole_and_sliced_per_event() {
        assert_eq!(block_of(1), 0);
        assert_eq!(block_of(BLOCK), 0);
        assert_eq!(block_of(BLOCK + 1), 1);
        assert_eq!(block_ids(1), (BLOCK + 1, 2 * BLOCK));
        assert!(Block::encode(&events(2, BLOCK)).is_none(), "not aligned");
        assert!(Block::encode(&events(1, BLOCK - 1)).is_none(), "not whole");
        let mut gap = events(1, BLOCK);
        gap.remove(7);
        gap.extend(events(BLOCK + 1, 1));
        assert!(Block::encode(&gap).is_none(), "a hole");

        let evs = events(BLOCK + 1, BLOCK);
        let block = Block::encode(&evs).unwrap();
        assert_eq!(block.last_id(), 2 * BLOCK);
        let mut expected = Vec::new();
        for e in &evs[10..] {
            encode_frame(e, &mut expected);
        }
        assert_eq!(&block.frames_from(BLOCK + 11)[..], &expected[..]);
        assert!(block.frames_from(3 * BLOCK).is_empty());
    }

    #[tokio::test]
    async fn a_block_loads_once_and_the_budget_drops_the_least_recently_used() {
        let key = StreamKey::new("p", "b");
        let one = Block::encode(&events(1, BLOCK)).unwrap().size();
        let cache = FrameCache::new(one * 2 + one / 2);
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = |index: u64| {
            let loads = &loads;
            move || async move {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(events(index * BLOCK + 1, BLOCK))
            }
        };
        let got =
            futures_util::future::join_all((0..10).map(|_| cache.get_or_load(&key, 0, load(0))))
                .await;
        assert!(got.iter().all(|b| b.as_ref().unwrap().last_id() == BLOCK));
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);

        cache.get_or_load(&key, 1, load(1)).await.unwrap();
        cache.get_or_load(&key, 0, load(0)).await.unwrap(); // 0 is now fresher than 1
        cache.get_or_load(&key, 2, load(2)).await.unwrap(); // over budget: 1 goes
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert!(cache.bytes() <= one * 2 + one / 2);
        cache.get_or_load(&key, 0, load(0)).await.unwrap();
        assert_eq!(
            loads.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "0 stayed"
        );
        cache.get_or_load(&key, 1, load(1)).await.unwrap();
        assert_eq!(
            loads.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "1 was dropped"
        );
    }

    #[tokio::test]
    async fn a_block_that_is_not_whole_or_fails_is_not_kept() {
        let key = StreamKey::new("p", "b");
        let cache = FrameCache::new(1 << 20);
        let short = cache
            .get_or_load(&key, 0, || async { Ok(events(5, BLOCK - 4)) })
            .await;
        assert!(matches!(short, Err(Miss::Uncached)));
        let failed = cache
            .get_or_load(&key, 0, || async { Err(StorageError::Closed) })
            .await;
        assert!(matches!(failed, Err(Miss::Storage(_))));
        assert_eq!(cache.bytes(), 0);
        assert!(
            cache.lock().blocks.is_empty(),
            "failed loads leave no entry"
        );
        let block = cache
            .get_or_load(&key, 0, || async { Ok(events(1, BLOCK)) })
            .await
            .unwrap();
        assert_eq!(block.last_id(), BLOCK);
        let off = FrameCache::new(0);
        assert!(matches!(
            off.get_or_load(&key, 0, || async { Ok(events(1, BLOCK)) })
                .await,
            Err(Miss::Uncached)
        ));
    }
}
