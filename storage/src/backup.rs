//! What a continuous backup of the store needs from it: a consistent logical copy of every
//! table ([`dump`]), the changes since the last copy ([`ChangeTracker`], [`changes`]), and a
//! way to build a database again from both ([`Loader`]).
//!
//! The copy is logical, not the file's pages: a read transaction is a consistent snapshot
//! (MVCC) that never stops the writer, and the copy does not carry free pages or depend on
//! redb's file format. It is a sequence of [`Op`]s, each table's entries as raw key and value
//! bytes.
//!
//! Between copies the writer notes, in the transaction's batch, every key a job inserted or
//! removed (through [`crate::writer::WriteCtx::table`]) and every stream it appended to; it
//! merges them into the tracker while it commits, holding the tracker's lock across the
//! commit, so a reader that takes the notes and opens its snapshot under that lock sees
//! exactly the commits whose notes it took. The shipper then reads the noted keys' values and
//! the streams' new events from that snapshot: applying those ops to the previous state gives
//! exactly the snapshot's state. Notes are bounded: past [`MAX_NOTED_KEYS`] the tracker keeps
//! only "too many" (a new full copy is then due).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use redb::{
    Database, Durability, Key, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, Value, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::events::{StreamKey, StreamMeta};
use crate::record::decode;
use crate::tables::{self, EVENTS, STREAMS};

/// Noted keys beyond which the tracker gives up on the details (a full copy is due).
pub const MAX_NOTED_KEYS: usize = 100_000;

/// One change: how copies and increments describe the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` of `table` to `value` (raw redb bytes).
    Put {
        table: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Remove `key` of `table`.
    Del { table: String, key: Vec<u8> },
    /// Remove the stream's events below `below` (trimmed to the retention since).
    Trim { stream: String, below: u64 },
}

impl Op {
    /// Bytes the op takes, roughly (batch sizes).
    pub fn size(&self) -> usize {
        match self {
            Op::Put { table, key, value } => table.len() + key.len() + value.len() + 8,
            Op::Del { table, key } => table.len() + key.len() + 4,
            Op::Trim { stream, .. } => stream.len() + 12,
        }
    }
}

/// Call `$f::<K, V>($def, args...)` for the table named `$name`; an unknown name is an error.
macro_rules! with_table {
    ($name:expr, $f:ident ( $($arg:expr),* )) => {
        match $name {
            "meta" => $f(tables::META, $($arg),*),
            "projects" => $f(tables::PROJECTS, $($arg),*),
            "branches" => $f(tables::BRANCHES, $($arg),*),
            "streams" => $f(tables::STREAMS, $($arg),*),
            "events" => $f(tables::EVENTS, $($arg),*),
            "versions" => $f(tables::VERSIONS, $($arg),*),
            "workflows" => $f(tables::WORKFLOWS, $($arg),*),
            "active_workflows" => $f(tables::ACTIVE_WORKFLOWS, $($arg),*),
            "tool_journal" => $f(tables::TOOL_JOURNAL, $($arg),*),
            "outbox" => $f(tables::OUTBOX, $($arg),*),
            "integration_queue" => $f(tables::INTEGRATION_QUEUE, $($arg),*),
            "sessions" => $f(tables::SESSIONS, $($arg),*),
            "tokens" => $f(tables::TOKENS, $($arg),*),
            "browser_sessions" => $f(tables::BROWSER_SESSIONS, $($arg),*),
            "conversations" => $f(tables::CONVERSATIONS, $($arg),*),
            "idempotency" => $f(tables::IDEMPOTENCY, $($arg),*),
            "attachments" => $f(tables::ATTACHMENTS, $($arg),*),
            "attachment_bytes" => $f(tables::ATTACHMENT_BYTES, $($arg),*),
            "sync_state" => $f(tables::SYNC_STATE, $($arg),*),
            other => Err(StorageError::Corrupt {
                kind: "backup",
                message: format!("unknown table {other:?} (a backup from a newer version?)"),
            }),
        }
    };
}

/// Every table, in the order copies list them.
pub const TABLES: &[&str] = &[
    "meta",
    "projects",
    "branches",
    "streams",
    "events",
    "versions",
    "workflows",
    "active_workflows",
    "tool_journal",
    "outbox",
    "integration_queue",
    "sessions",
    "tokens",
    "browser_sessions",
    "conversations",
    "idempotency",
    "attachments",
    "attachment_bytes",
    "sync_state",
];

/// `meta` keys that describe this machine's files rather than the data (the append log's
/// epoch, the write probe): a copy leaves them out and a restore ignores them, so a restored
/// store starts its own append log at epoch 0, and a copy taken after a checkpoint equals one
/// taken before it.
pub fn machine_local(table: &str, key: &[u8]) -> bool {
    table == "meta"
        && (key == crate::wal::EPOCH_KEY.as_bytes() || key == crate::writer::PROBE_KEY.as_bytes())
}

fn key_bytes<K: Key + 'static>(key: &K::SelfType<'_>) -> Vec<u8> {
    K::as_bytes(key).as_ref().to_vec()
}

/// A consistent copy of every table in `rtx`, op by op (in key order per table).
pub fn dump(
    rtx: &ReadTransaction,
    emit: &mut dyn FnMut(Op) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    fn one<K: Key + 'static, V: Value + 'static>(
        def: TableDefinition<K, V>,
        rtx: &ReadTransaction,
        name: &str,
        emit: &mut dyn FnMut(Op) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let table = match rtx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for entry in table.iter()? {
            let (k, v) = entry?;
            let key = key_bytes::<K>(&k.value());
            if machine_local(name, &key) {
                continue;
            }
            let value = V::as_bytes(&v.value()).as_ref().to_vec();
            emit(Op::Put {
                table: name.to_string(),
                key,
                value,
            })?;
        }
        Ok(())
    }
    for name in TABLES {
        with_table!(*name, one(rtx, name, emit))?;
    }
    Ok(())
}

/// What the writer noted since the shipper last took the notes.
#[derive(Debug, Default)]
pub struct Pending {
    /// Keys inserted or removed, by table.
    pub keys: HashMap<String, BTreeSet<Vec<u8>>>,
    /// Streams appended to.
    pub streams: HashSet<StreamKey>,
    /// When the oldest note was made (what the backup's lag is measured from).
    pub since: Option<Instant>,
    /// Commits noted.
    pub commits: u64,
    /// More keys than [`MAX_NOTED_KEYS`] were noted: the details were dropped.
    pub overflow: bool,
    noted: usize,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.commits == 0 && !self.overflow
    }

    fn note(&mut self, changed: Vec<(Arc<str>, Vec<u8>)>, streams: &[StreamKey]) {
        if changed.is_empty() && streams.is_empty() {
            return;
        }
        self.since.get_or_insert_with(Instant::now);
        self.commits += 1;
        if self.overflow {
            return;
        }
        for (table, key) in changed {
            let set = self.keys.entry(table.to_string()).or_default();
            if set.insert(key) {
                self.noted += 1;
            }
        }
        self.streams.extend(streams.iter().cloned());
        if self.noted + self.streams.len() > MAX_NOTED_KEYS {
            self.overflow = true;
            self.keys.clear();
            self.streams.clear();
            self.noted = 0;
        }
    }
}

/// Notes of what changed, shared by the writer and the backup shipper.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    pending: Mutex<Pending>,
    /// Told when a note arrives while none was pending.
    wake: tokio::sync::Notify,
}

impl ChangeTracker {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note a batch's changes; the writer holds the answer across its commit.
    pub(crate) fn note(
        &self,
        changed: Vec<(Arc<str>, Vec<u8>)>,
        streams: &[StreamKey],
    ) -> MutexGuard<'_, Pending> {
        let mut pending = self.lock();
        let was_empty = pending.is_empty();
        pending.note(changed, streams);
        if was_empty && !pending.is_empty() {
            self.wake.notify_one();
        }
        pending
    }

    /// Resolves once something was noted while nothing was pending (at once when that
    /// happened since the last call).
    pub async fn notified(&self) {
        if self.has_pending() {
            return;
        }
        self.wake.notified().await;
    }

    /// Whether anything was noted since the notes were last taken.
    pub fn has_pending(&self) -> bool {
        !self.lock().is_empty()
    }

    /// When the oldest untaken note was made.
    pub fn pending_since(&self) -> Option<Instant> {
        self.lock().since
    }

    /// Take the notes and open a snapshot that holds exactly the commits they describe.
    pub fn take(&self, db: &Database) -> Result<(Pending, ReadTransaction), StorageError> {
        let mut pending = self.lock();
        let rtx = db.begin_read()?;
        Ok((std::mem::take(&mut *pending), rtx))
    }
}

/// The ops that bring a state to `rtx`'s: the noted keys' values (or removals) and each noted
/// stream's events after the id `shipped` holds for it (which this moves on). Streams not in
/// `shipped` are sent from their first stored event.
pub fn changes(
    rtx: &ReadTransaction,
    pending: &Pending,
    shipped: &mut HashMap<String, u64>,
    emit: &mut dyn FnMut(Op) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    fn keys<K: Key + 'static, V: Value + 'static>(
        def: TableDefinition<K, V>,
        rtx: &ReadTransaction,
        name: &str,
        keys: &BTreeSet<Vec<u8>>,
        emit: &mut dyn FnMut(Op) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let table = rtx.open_table(def)?;
        for key in keys {
            let op = match table.get(K::from_bytes(key))? {
                Some(v) => Op::Put {
                    table: name.to_string(),
                    key: key.clone(),
                    value: V::as_bytes(&v.value()).as_ref().to_vec(),
                },
                None => Op::Del {
                    table: name.to_string(),
                    key: key.clone(),
                },
            };
            emit(op)?;
        }
        Ok(())
    }
    for (name, set) in &pending.keys {
        with_table!(name.as_str(), keys(rtx, name, set, emit))?;
    }
    let streams = rtx.open_table(STREAMS)?;
    let events = rtx.open_table(EVENTS)?;
    let mut noted: Vec<&StreamKey> = pending.streams.iter().collect();
    noted.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    for stream in noted {
        let Some(bytes) = streams.get(stream.as_str())? else {
            continue;
        };
        let raw = bytes.value().to_vec();
        let meta: StreamMeta = decode(&raw)?;
        let from = shipped
            .get(stream.as_str())
            .map_or(meta.first_id, |last| (last + 1).max(meta.first_id));
        emit(Op::Trim {
            stream: stream.as_str().to_string(),
            below: meta.first_id,
        })?;
        for entry in events.range((stream.as_str(), from)..(stream.as_str(), meta.next_id))? {
            let (k, v) = entry?;
            emit(Op::Put {
                table: "events".into(),
                key: key_bytes::<(&str, u64)>(&k.value()),
                value: v.value().to_vec(),
            })?;
        }
        emit(Op::Put {
            table: "streams".into(),
            key: stream.as_str().as_bytes().to_vec(),
            value: raw,
        })?;
        shipped.insert(stream.as_str().to_string(), meta.last_id());
    }
    Ok(())
}

/// Each stream's last id in `rtx` (where a shipper that just copied it stands).
pub fn stream_heads(rtx: &ReadTransaction) -> Result<HashMap<String, u64>, StorageError> {
    Ok(crate::events::list_streams(rtx)?
        .into_iter()
        .map(|(name, meta)| (name, meta.last_id()))
        .collect())
}

/// Apply one op to a write transaction.
pub fn apply(tx: &WriteTransaction, op: &Op) -> Result<(), StorageError> {
    fn put<K: Key + 'static, V: Value + 'static>(
        def: TableDefinition<K, V>,
        tx: &WriteTransaction,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StorageError> {
        tx.open_table(def)?
            .insert(K::from_bytes(key), V::from_bytes(value))?;
        Ok(())
    }
    fn del<K: Key + 'static, V: Value + 'static>(
        def: TableDefinition<K, V>,
        tx: &WriteTransaction,
        key: &[u8],
    ) -> Result<(), StorageError> {
        tx.open_table(def)?.remove(K::from_bytes(key))?;
        Ok(())
    }
    match op {
        Op::Put { table, key, .. } | Op::Del { table, key } if machine_local(table, key) => Ok(()),
        Op::Put { table, key, value } => with_table!(table.as_str(), put(tx, key, value)),
        Op::Del { table, key } => with_table!(table.as_str(), del(tx, key)),
        Op::Trim { stream, below } => {
            let mut events = tx.open_table(EVENTS)?;
            let stale: Vec<u64> = events
                .range((stream.as_str(), 0)..(stream.as_str(), *below))?
                .map(|e| e.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for id in stale {
                events.remove((stream.as_str(), id))?;
            }
            Ok(())
        }
    }
}

/// Builds a database from a copy and increments: writes in transactions of about
/// [`Loader::BATCH_BYTES`] that do not sync, and one durable commit at the end.
pub struct Loader {
    db: Database,
    tx: Option<WriteTransaction>,
    bytes: usize,
    pub ops: u64,
}

impl Loader {
    const BATCH_BYTES: usize = 32 << 20;

    /// Create a new, empty database at `path` (which must not exist).
    pub fn create(path: &Path) -> Result<Self, StorageError> {
        if path.exists() {
            return Err(StorageError::Refused(format!(
                "{} exists; a restore writes a new file",
                path.display()
            )));
        }
        let db = Database::create(path)
            .map_err(|e| StorageError::Database(format!("creating {}: {e}", path.display())))?;
        tables::create_all(&db)?;
        Ok(Self {
            db,
            tx: None,
            bytes: 0,
            ops: 0,
        })
    }

    pub fn apply(&mut self, op: &Op) -> Result<(), StorageError> {
        if self.tx.is_none() {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(Durability::None)
                .map_err(|e| StorageError::Database(e.to_string()))?;
            self.tx = Some(tx);
        }
        let tx = self.tx.as_ref().ok_or(StorageError::Closed)?;
        apply(tx, op)?;
        self.ops += 1;
        self.bytes += op.size();
        if self.bytes >= Self::BATCH_BYTES {
            self.bytes = 0;
            if let Some(tx) = self.tx.take() {
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// Commit what is left durably and close the file.
    pub fn finish(mut self) -> Result<u64, StorageError> {
        if let Some(tx) = self.tx.take() {
            tx.commit()?;
        }
        // A durable commit of nothing makes the unsynced ones durable too.
        let tx = self.db.begin_write()?;
        tx.commit()?;
        Ok(self.ops)
    }
}

/// Encode ops as one payload (length-prefixed postcard) and decode it again.
pub fn encode_ops(ops: &[Op], out: &mut Vec<u8>) {
    for op in ops {
        encode_op(op, out);
    }
}

pub fn encode_op(op: &Op, out: &mut Vec<u8>) {
    let body = postcard::to_stdvec(op).expect("postcard serialization of an op");
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
}

pub fn decode_ops(mut bytes: &[u8]) -> Result<Vec<Op>, StorageError> {
    let corrupt = |message: String| StorageError::Corrupt {
        kind: "backup",
        message,
    };
    let mut ops = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("a truncated op length".into()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(corrupt(format!(
                "an op of {len} bytes with {} left",
                rest.len()
            )));
        }
        let (body, rest) = rest.split_at(len);
        ops.push(postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))?);
        bytes = rest;
    }
    Ok(ops)
}

/// For a store file that exists: None when it holds projects, branches or events (it is
/// somebody's data, never replaced by a restore); else the ops that keep what it does hold
/// worth keeping in a restored store (its API tokens).
pub fn fresh_store_keeps(path: &Path) -> Result<Option<Vec<Op>>, StorageError> {
    let db = match Database::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StorageError::AlreadyOpen(path.to_path_buf()));
        }
        Err(e) => {
            return Err(StorageError::Database(format!(
                "opening {}: {e}",
                path.display()
            )));
        }
    };
    let rtx = db.begin_read()?;
    fn is_empty<K: Key + 'static, V: Value + 'static>(
        def: TableDefinition<K, V>,
        rtx: &ReadTransaction,
    ) -> Result<bool, StorageError> {
        match rtx.open_table(def) {
            Ok(t) => Ok(t.is_empty()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
    if !is_empty(tables::PROJECTS, &rtx)?
        || !is_empty(tables::BRANCHES, &rtx)?
        || !is_empty(tables::STREAMS, &rtx)?
        || !is_empty(tables::WORKFLOWS, &rtx)?
    {
        return Ok(None);
    }
    let mut keep = Vec::new();
    if let Ok(tokens) = rtx.open_table(tables::TOKENS) {
        for entry in tokens.iter()? {
            let (k, v) = entry?;
            keep.push(Op::Put {
                table: "tokens".into(),
                key: k.value().as_bytes().to_vec(),
                value: v.value().to_vec(),
            });
        }
    }
    Ok(Some(keep))
}
