//! The per-branch event log: types and range reads. Appends happen in the [`crate::writer`].
//!
//! Ids start at 1 and grow by one per stream; they survive restarts because the next id is
//! stored with the stream ([`StreamMeta`]) in the same transaction as the event. Retention
//! trims the oldest events; `first_id` tells readers what is still there.

use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::record::{Record, decode};
use crate::tables::{EVENTS, STREAMS};

/// `"projectId/branchId"`. Ids are validated by the caller and never contain `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey(Arc<str>);

impl StreamKey {
    pub fn new(project_id: &str, branch_id: &str) -> Self {
        Self(format!("{project_id}/{branch_id}").into())
    }

    /// From its `"projectId/branchId"` form (as stored).
    pub(crate) fn from_joined(key: &str) -> Self {
        Self(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn project_id(&self) -> &str {
        self.0.split_once('/').map(|(p, _)| p).unwrap_or(&self.0)
    }

    pub fn branch_id(&self) -> &str {
        self.0.split_once('/').map(|(_, b)| b).unwrap_or("")
    }
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event to append: its type and its JSON object payload (without id, type or time).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub data: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: u64,
    pub kind: String,
    /// JSON object text.
    pub data: String,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredEvent {
    pub kind: String,
    pub data: String,
    pub at_ms: u64,
}

impl Record for StoredEvent {
    const KIND: &'static str = "event";
    const VERSION: u8 = 1;
}

/// Where a stream stands: ids `first_id..next_id` are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub first_id: u64,
    pub next_id: u64,
}

impl StreamMeta {
    pub const EMPTY: StreamMeta = StreamMeta {
        first_id: 1,
        next_id: 1,
    };

    /// Id of the newest event, 0 when none was ever appended.
    pub fn last_id(&self) -> u64 {
        self.next_id - 1
    }
}

impl Record for StreamMeta {
    const KIND: &'static str = "stream";
    const VERSION: u8 = 1;
}

/// Told about events once their batch is durable, in commit order.
pub trait AppendObserver: Send + Sync {
    fn committed(&self, events: &[(StreamKey, Arc<Event>)]);
}

/// An observer that ignores everything (CLI tools, tests).
pub struct NoObserver;

impl AppendObserver for NoObserver {
    fn committed(&self, _events: &[(StreamKey, Arc<Event>)]) {}
}

/// The stream's bounds; [`StreamMeta::EMPTY`] when nothing was appended yet.
pub fn read_meta(rtx: &ReadTransaction, stream: &StreamKey) -> Result<StreamMeta, StorageError> {
    let streams = rtx.open_table(STREAMS)?;
    match streams.get(stream.as_str())? {
        Some(bytes) => decode(bytes.value()),
        None => Ok(StreamMeta::EMPTY),
    }
}

/// Events with `from_id <= id <= to_id`, at most `limit` of them, in order.
pub fn read_range(
    rtx: &ReadTransaction,
    stream: &StreamKey,
    from_id: u64,
    to_id: u64,
    limit: usize,
) -> Result<Vec<Arc<Event>>, StorageError> {
    let events = rtx.open_table(EVENTS)?;
    let mut out = Vec::with_capacity(limit.min(1024));
    if from_id > to_id {
        return Ok(out);
    }
    for entry in events
        .range((stream.as_str(), from_id)..=(stream.as_str(), to_id))?
        .take(limit)
    {
        let (key, value) = entry?;
        let stored: StoredEvent = decode(value.value())?;
        out.push(Arc::new(Event {
            id: key.value().1,
            kind: stored.kind,
            data: stored.data,
            at_ms: stored.at_ms,
        }));
    }
    Ok(out)
}

/// Every stream with its bounds (for status and benchmarks).
pub fn list_streams(rtx: &ReadTransaction) -> Result<Vec<(String, StreamMeta)>, StorageError> {
    let streams = rtx.open_table(STREAMS)?;
    let mut out = Vec::new();
    for entry in streams.iter()? {
        let (key, value) = entry?;
        out.push((key.value().to_string(), decode(value.value())?));
    }
    Ok(out)
}
