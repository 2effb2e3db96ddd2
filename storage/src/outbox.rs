//! The mirrors' outbox: what each commit changed that Postgres and Redis carry, written in the
//! commit itself.
//!
//! When the store is opened with [`crate::StoreOptions::outbox`], every commit that writes a
//! mirrored table ([`MIRRORED`]) or appends events also inserts one [`OutboxEntry`] under the
//! next number of one global sequence (kept in `meta`, so numbers never repeat after a prune).
//! An entry names what changed — the keys, and each stream's range of new ids — not the values:
//! a mirror reads the values from the snapshot it reads the entry from, which holds the same
//! or a newer state, and upserts them (a replayed batch changes nothing). Event-only commits
//! are made durable by the append log, and its replay after a crash inserts the entries again
//! for the events it puts back, so nothing committed is skipped.
//!
//! Each sink keeps its cursor (the last sequence number upstream acknowledged) in `meta`.
//! [`advance`] moves a cursor and prunes what every sink has passed; past the backlog cap the
//! oldest entries are dropped, and a sink finds the hole ([`Batch::gap`]) when it reads next.
//! The outbox and the cursors describe this machine's mirrors, so the store's backup leaves
//! them out (see [`crate::backup::machine_local`]).

use std::collections::{BTreeSet, HashMap};

use redb::{ReadTransaction, ReadableTable, Value, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::events::{Event, StreamKey, StreamMeta};
use crate::integrations::IntegrationJob;
use crate::model::{BranchRecord, ProjectRecord, SyncStateRecord, VersionRecord};
use crate::record::{Record, decode, encode};
use crate::tables::{
    BRANCHES, INTEGRATION_QUEUE, META, OUTBOX, PROJECTS, STREAMS, SYNC_STATE, VERSIONS, WORKFLOWS,
};
use crate::workflow::WorkflowRecord;
use crate::{StorageError, writer::WriteCtx};

/// The tables a mirror carries (with the events).
pub const MIRRORED: &[&str] = &[
    "projects",
    "branches",
    "sync_state",
    "versions",
    "workflows",
    "integration_queue",
];

/// `meta` key of the next sequence number.
pub(crate) const NEXT_KEY: &str = "outbox_next";
/// `meta` key prefix of the sinks' cursors.
pub(crate) const CURSOR_PREFIX: &str = "mirror_cursor/";

/// One commit's changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// `(table, key bytes)` of every mirrored key written (inserted or removed).
    pub keys: Vec<(String, Vec<u8>)>,
    /// The ids each stream got: `(stream, first, last)`.
    pub events: Vec<(String, u64, u64)>,
    /// When it was committed (ms since the epoch): what a mirror's lag is measured from.
    pub at_ms: u64,
}

impl Record for OutboxEntry {
    const KIND: &'static str = "outbox entry";
    const VERSION: u8 = 1;
}

impl OutboxEntry {
    pub fn event_count(&self) -> u64 {
        self.events.iter().map(|(_, a, b)| b + 1 - a).sum()
    }
}

/// Insert the entry of a commit that wrote `keys` and appended `ranges` (nothing when it
/// touched nothing mirrored). Called by [`WriteCtx`] before the commit.
pub(crate) fn write_entry(
    tx: &WriteTransaction,
    keys: impl Iterator<Item = (String, Vec<u8>)>,
    ranges: &HashMap<StreamKey, (u64, u64)>,
) -> Result<(), StorageError> {
    let keys: BTreeSet<(String, Vec<u8>)> = keys
        .filter(|(table, _)| MIRRORED.contains(&table.as_str()))
        .collect();
    if keys.is_empty() && ranges.is_empty() {
        return Ok(());
    }
    let mut events: Vec<(String, u64, u64)> = ranges
        .iter()
        .map(|(s, (a, b))| (s.as_str().to_string(), *a, *b))
        .collect();
    events.sort();
    let entry = OutboxEntry {
        keys: keys.into_iter().collect(),
        events,
        at_ms: crate::writer::now_ms(),
    };
    let mut meta = tx.open_table(META)?;
    let seq = next_seq(&meta)?;
    meta.insert(NEXT_KEY, (seq + 1).to_le_bytes().as_slice())?;
    tx.open_table(OUTBOX)?
        .insert(seq, encode(&entry).as_slice())?;
    Ok(())
}

fn read_u64(bytes: &[u8]) -> u64 {
    bytes
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
        .unwrap_or(0)
}

/// The next sequence number, as `meta` holds it (1 before the first entry).
fn next_seq(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64, StorageError> {
    Ok(meta
        .get(NEXT_KEY)?
        .map_or(1, |v| read_u64(v.value()))
        .max(1))
}

/// The cursor of `sink` as `meta` holds it (0 before its first acknowledgement).
fn read_cursor(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    sink: &str,
) -> Result<u64, StorageError> {
    let key = format!("{CURSOR_PREFIX}{sink}");
    Ok(meta.get(key.as_str())?.map_or(0, |v| read_u64(v.value())))
}

/// Remove the entries from `first` that leave more than `cap` before `next`; answers how many.
fn drop_beyond_cap(
    outbox: &mut redb::Table<'_, u64, &'static [u8]>,
    first: u64,
    next: u64,
    cap: u64,
) -> Result<u64, StorageError> {
    if next.saturating_sub(first) <= cap {
        return Ok(0);
    }
    let bound = next - cap;
    outbox.retain_in(first..bound, |_, _| false)?;
    Ok(bound - first)
}

/// Where the outbox stands: its first stored entry and the next number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bounds {
    /// The first entry still stored (== `next` when it is empty).
    pub first: u64,
    pub next: u64,
}

pub fn bounds(rtx: &ReadTransaction) -> Result<Bounds, StorageError> {
    let next = next_seq(&rtx.open_table(META)?)?;
    let outbox = rtx.open_table(OUTBOX)?;
    let first = match outbox.first()? {
        Some((k, _)) => k.value(),
        None => next,
    };
    Ok(Bounds { first, next })
}

/// The cursor of `sink`: the last sequence number it has acknowledged (0 before any).
pub fn cursor(rtx: &ReadTransaction, sink: &str) -> Result<u64, StorageError> {
    read_cursor(&rtx.open_table(META)?, sink)
}

/// A change as a mirror writes it: the record as the snapshot holds it (None: removed).
#[derive(Debug, Clone)]
pub enum Change {
    Project {
        project_id: String,
        record: Option<ProjectRecord>,
    },
    Branch {
        project_id: String,
        branch_id: String,
        record: Option<BranchRecord>,
    },
    SyncState {
        project_id: String,
        branch_id: String,
        record: Option<SyncStateRecord>,
    },
    Version {
        project_id: String,
        branch_id: String,
        seq: u64,
        record: Option<VersionRecord>,
    },
    Workflow {
        workflow_id: String,
        record: Option<WorkflowRecord>,
    },
    IntegrationJob {
        project_id: String,
        branch_id: String,
        seq: u64,
        record: Option<IntegrationJob>,
    },
}

/// What a sink writes for a run of entries.
#[derive(Debug, Default)]
pub struct Batch {
    /// The last sequence number it covers (the cursor after it is acknowledged).
    pub last_seq: u64,
    /// Entries read.
    pub entries: u64,
    /// Entries dropped (backlog cap) between the sink's cursor and this batch: `(from, to)`.
    pub gap: Option<(u64, u64)>,
    /// The changed records, each key once (its value as of the snapshot).
    pub changes: Vec<Change>,
    /// New events per stream, in id order (streams in first-seen order).
    pub events: Vec<(StreamKey, Vec<Event>)>,
    /// Events the retention trimmed before they were read (the stream's first stored id).
    pub trimmed: u64,
    /// When the batch's first entry was committed (ms since the epoch), for the lag.
    pub oldest_ms: Option<u64>,
    /// The outbox's bounds in the snapshot read.
    pub bounds: Bounds,
}

impl Batch {
    pub fn event_count(&self) -> usize {
        self.events.iter().map(|(_, e)| e.len()).sum()
    }
}

/// Read the entries after `after`, at most `max_entries` of them and stopping once
/// `max_events` events are collected, and resolve them against `rtx`. None when there is
/// nothing after `after`.
pub fn read_batch(
    rtx: &ReadTransaction,
    after: u64,
    max_entries: usize,
    max_events: usize,
) -> Result<Option<Batch>, StorageError> {
    let bounds = bounds(rtx)?;
    if bounds.next <= after + 1 {
        return Ok(None);
    }
    let mut batch = Batch {
        last_seq: after,
        bounds,
        ..Batch::default()
    };
    if bounds.first > after + 1 {
        batch.gap = Some((after + 1, bounds.first - 1));
        batch.last_seq = bounds.first - 1;
    }
    let outbox = rtx.open_table(OUTBOX)?;
    let mut keys: BTreeSet<(String, Vec<u8>)> = BTreeSet::new();
    let mut ranges: Vec<(StreamKey, u64, u64)> = Vec::new();
    let mut index: HashMap<StreamKey, usize> = HashMap::new();
    let mut events = 0u64;
    for entry in outbox.range(after + 1..)?.take(max_entries.max(1)) {
        let (seq, value) = entry?;
        let entry: OutboxEntry = decode(value.value())?;
        batch.oldest_ms.get_or_insert(entry.at_ms);
        batch.last_seq = seq.value();
        batch.entries += 1;
        keys.extend(entry.keys);
        for (stream, first, last) in entry.events {
            events += last + 1 - first;
            let stream = StreamKey::from_joined(&stream);
            match index.get(&stream) {
                Some(&i) => {
                    let r = &mut ranges[i];
                    r.1 = r.1.min(first);
                    r.2 = r.2.max(last);
                }
                None => {
                    index.insert(stream.clone(), ranges.len());
                    ranges.push((stream, first, last));
                }
            }
        }
        if events as usize >= max_events {
            break;
        }
    }
    for (table, key) in keys {
        batch.changes.push(resolve(rtx, &table, &key)?);
    }
    let streams = rtx.open_table(STREAMS)?;
    for (stream, first, last) in ranges {
        let stored_first = match streams.get(stream.as_str())? {
            Some(v) => decode::<StreamMeta>(v.value())?.first_id,
            None => last + 1,
        };
        let from = first.max(stored_first);
        batch.trimmed += from.saturating_sub(first).min(last + 1 - first);
        let read = crate::events::read_range(rtx, &stream, from, last, usize::MAX)?;
        let read: Vec<Event> = read.iter().map(|e| Event::clone(e)).collect();
        if !read.is_empty() {
            batch.events.push((stream, read));
        }
    }
    Ok(Some(batch))
}

fn resolve(rtx: &ReadTransaction, table: &str, key: &[u8]) -> Result<Change, StorageError> {
    type Pair = (&'static str, &'static str);
    type Triple = (&'static str, &'static str, u64);
    type Queue = (&'static str, u64);
    let split = |joined: &str| -> (String, String) {
        let k = StreamKey::from_joined(joined);
        (k.project_id().to_string(), k.branch_id().to_string())
    };
    Ok(match table {
        "projects" => {
            let id = <&str as Value>::from_bytes(key);
            let t = rtx.open_table(PROJECTS)?;
            let record = t.get(id)?.map(|v| decode(v.value())).transpose()?;
            Change::Project {
                project_id: id.to_string(),
                record,
            }
        }
        "branches" => {
            let (p, b) = <Pair as Value>::from_bytes(key);
            let t = rtx.open_table(BRANCHES)?;
            let record = t.get((p, b))?.map(|v| decode(v.value())).transpose()?;
            Change::Branch {
                project_id: p.to_string(),
                branch_id: b.to_string(),
                record,
            }
        }
        "sync_state" => {
            let (p, b) = <Pair as Value>::from_bytes(key);
            let t = rtx.open_table(SYNC_STATE)?;
            let record = t.get((p, b))?.map(|v| decode(v.value())).transpose()?;
            Change::SyncState {
                project_id: p.to_string(),
                branch_id: b.to_string(),
                record,
            }
        }
        "versions" => {
            let (p, b, seq) = <Triple as Value>::from_bytes(key);
            let t = rtx.open_table(VERSIONS)?;
            let record = t.get((p, b, seq))?.map(|v| decode(v.value())).transpose()?;
            Change::Version {
                project_id: p.to_string(),
                branch_id: b.to_string(),
                seq,
                record,
            }
        }
        "workflows" => {
            let id = <&str as Value>::from_bytes(key);
            let t = rtx.open_table(WORKFLOWS)?;
            let record = t.get(id)?.map(|v| decode(v.value())).transpose()?;
            Change::Workflow {
                workflow_id: id.to_string(),
                record,
            }
        }
        "integration_queue" => {
            let (joined, seq) = <Queue as Value>::from_bytes(key);
            let t = rtx.open_table(INTEGRATION_QUEUE)?;
            let record = t
                .get((joined, seq))?
                .map(|v| decode(v.value()))
                .transpose()?;
            let (p, b) = split(joined);
            Change::IntegrationJob {
                project_id: p,
                branch_id: b,
                seq,
                record,
            }
        }
        other => {
            return Err(StorageError::Corrupt {
                kind: "outbox entry",
                message: format!("names table {other:?}, which no mirror carries"),
            });
        }
    })
}

/// Every mirrored record as `rtx` holds it (a sink's full resync after a gap).
pub fn all_records(
    rtx: &ReadTransaction,
    emit: &mut dyn FnMut(Change) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    fn keys<K: redb::Key + 'static, V: Value + 'static>(
        rtx: &ReadTransaction,
        def: redb::TableDefinition<K, V>,
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let t = rtx.open_table(def)?;
        let mut out = Vec::new();
        for e in t.iter()? {
            let (k, _) = e?;
            out.push(K::as_bytes(&k.value()).as_ref().to_vec());
        }
        Ok(out)
    }
    let tables: [(&str, Vec<Vec<u8>>); 6] = [
        ("projects", keys(rtx, PROJECTS)?),
        ("branches", keys(rtx, BRANCHES)?),
        ("sync_state", keys(rtx, SYNC_STATE)?),
        ("versions", keys(rtx, VERSIONS)?),
        ("workflows", keys(rtx, WORKFLOWS)?),
        ("integration_queue", keys(rtx, INTEGRATION_QUEUE)?),
    ];
    for (table, keys) in tables {
        for key in keys {
            emit(resolve(rtx, table, &key)?)?;
        }
    }
    Ok(())
}

/// What [`advance`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Advanced {
    /// Entries removed because every sink had passed them.
    pub pruned: u64,
    /// Entries dropped unread by some sink because the backlog passed the cap.
    pub dropped: u64,
}

/// Move `sink`'s cursor to `seq`, then remove the entries every one of `sinks` has passed and,
/// beyond `cap` entries, the oldest ones (the sinks behind find the gap when they read next).
pub fn advance(
    ctx: &mut WriteCtx<'_>,
    sink: &str,
    seq: u64,
    sinks: &[&str],
    cap: u64,
) -> Result<Advanced, StorageError> {
    let tx = ctx.raw_tx();
    let mut meta = tx.open_table(META)?;
    meta.insert(
        format!("{CURSOR_PREFIX}{sink}").as_str(),
        seq.to_le_bytes().as_slice(),
    )?;
    let mut min = u64::MAX;
    for s in sinks {
        min = min.min(read_cursor(&meta, s)?);
    }
    let next = next_seq(&meta)?;
    drop(meta);
    let mut outbox = tx.open_table(OUTBOX)?;
    let first = match outbox.first()? {
        Some((k, _)) => k.value(),
        None => return Ok(Advanced::default()),
    };
    let mut out = Advanced::default();
    let passed = min.saturating_add(1).min(next);
    if passed > first {
        outbox.retain_in(first..passed, |_, _| false)?;
        out.pruned = passed - first;
    }
    out.dropped = drop_beyond_cap(&mut outbox, first.max(passed), next, cap)?;
    Ok(out)
}

/// Drop the oldest entries beyond `cap` (while no sink acknowledges anything); answers how
/// many were dropped.
pub fn enforce_cap(ctx: &mut WriteCtx<'_>, cap: u64) -> Result<u64, StorageError> {
    let tx = ctx.raw_tx();
    let next = next_seq(&tx.open_table(META)?)?;
    let mut outbox = tx.open_table(OUTBOX)?;
    let Some(first) = outbox.first()?.map(|(k, _)| k.value()) else {
        return Ok(0);
    };
    drop_beyond_cap(&mut outbox, first, next, cap)
}

/// Where `sink` stands: its cursor, the outbox's bounds, and when the first entry it has not
/// acknowledged was committed (None when it is caught up).
pub fn position(
    rtx: &ReadTransaction,
    sink: &str,
) -> Result<(u64, Bounds, Option<u64>), StorageError> {
    let cursor = cursor(rtx, sink)?;
    let bounds = bounds(rtx)?;
    let outbox = rtx.open_table(OUTBOX)?;
    let oldest = match outbox.range(cursor + 1..)?.next() {
        Some(entry) => Some(decode::<OutboxEntry>(entry?.1.value())?.at_ms),
        None => None,
    };
    Ok((cursor, bounds, oldest))
}
