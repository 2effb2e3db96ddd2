//! The append log: a cheap durable write in front of redb for batches that only append events.
//!
//! A durable redb commit writes every page the batch touched (the events leaf, its parents,
//! the streams table, the table tree: about ten scattered 4 KiB writes) and then syncs; on a
//! virtio disk each scattered write costs about as much as the sync itself. An event-only batch
//! instead becomes one record written sequentially into this file and synced (`fdatasync` of
//! already allocated, already written blocks: no file-system metadata moves), and redb commits
//! the batch without syncing ([`redb::Durability::None`]). Readers see that commit at once; it
//! reaches the disk with the next durable commit, the *checkpoint*.
//!
//! Epochs say which records are not yet in redb for sure. Every record carries the epoch it
//! was written in; a checkpoint is a durable commit that also stores the next epoch in the
//! `meta` table, after which the log is written from its start again. When the store opens,
//! the records of the stored epoch are exactly the appends that may have been lost with redb's
//! unsynced commits: they are applied again (an event whose id the stream already has is
//! skipped) in one durable commit that moves to the next epoch. A torn or stale record (bad
//! checksum, other epoch) ends the log: records are written in order, each synced before the
//! next is started, so nothing valid can follow one that is not.
//!
//! The file is filled with zeros a chunk at a time as it grows (so that a sync never has to
//! allocate blocks) up to its size limit; a record that would not fit makes its batch a
//! checkpoint instead. A batch that does anything else than append (a job that used
//! [`crate::writer::WriteCtx::tx`]) is always committed durably. Checkpoints also happen once
//! [`CHECKPOINT_BYTES`] of records are pending (redb then writes what its unsynced commits
//! touched, so this bounds that stall: about 17 ms at most against 53 ms for 16 MiB, at the
//! same throughput), [`CHECKPOINT_INTERVAL`] after the log takes a record, and at shutdown.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::StorageError;
use crate::events::{Event, StreamKey};
use crate::record::Record;

/// `WLR1`: the start of every record.
const MAGIC: u32 = 0x3152_4C57;
/// magic u32, format u8, 3 bytes padding, epoch u64, length u32, crc32 u32.
const HEADER: usize = 24;
/// Record layout version (the byte after the magic); the payload is postcard `Vec<WalEvent>`.
const FORMAT: u8 = 1;
/// The file grows by zero-filled chunks of this size.
const CHUNK: u64 = 1 << 20;
/// Longest time between checkpoints while records are pending.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Records written since the last checkpoint that make the next one due. redb writes the
/// pages its unsynced commits touched at the checkpoint: this bounds how long that takes.
pub const CHECKPOINT_BYTES: u64 = 2 << 20;

/// The epoch the log is written in, stored in the `meta` table under [`EPOCH_KEY`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct WalEpoch {
    pub epoch: u64,
}

impl Record for WalEpoch {
    const KIND: &'static str = "append log epoch";
    const VERSION: u8 = 1;
}

pub(crate) const EPOCH_KEY: &str = "wal_epoch";

/// One event as the log stores it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct WalEvent {
    pub stream: String,
    pub id: u64,
    pub kind: String,
    pub data: String,
    pub at_ms: u64,
}

#[derive(Serialize)]
struct WalEventRef<'a> {
    stream: &'a str,
    id: u64,
    kind: &'a str,
    data: &'a str,
    at_ms: u64,
}

/// What [`Wal::recover_damaged`] read.
pub(crate) struct Damaged {
    /// Every readable event, in the log's order.
    pub events: Vec<WalEvent>,
    /// Index of the first event read after the first damage (`events.len()` without damage).
    pub after_damage: usize,
    /// Unreadable bytes between readable records.
    pub damaged_bytes: u64,
}

pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Epoch of the records written now.
    epoch: u64,
    /// Where the next record goes.
    pos: u64,
    /// Bytes known to be zero-filled (or written) and synced.
    allocated: u64,
    max_bytes: u64,
    /// A record whose batch failed could not be withdrawn: nothing more may be written in
    /// this epoch (its ids will be used again), the next commit must be a checkpoint.
    spoiled: bool,
}

impl Wal {
    /// Open (or create) the log at `path`; it grows up to `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, StorageError> {
        let io_err = |e: io::Error| StorageError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        crate::files::owner_only(path)?;
        let len = file.metadata().map_err(io_err)?.len();
        // Only whole chunks count as allocated: a chunk cut short by a crash is filled again.
        let allocated = len - len % CHUNK;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            epoch: 0,
            pos: 0,
            allocated,
            max_bytes: max_bytes.max(CHUNK),
            spoiled: false,
        })
    }

    /// The records of `epoch`, from the start of the file up to the first that is torn, stale
    /// or of another epoch. Afterwards the log writes in `epoch` after the last of them.
    ///
    /// A bad record followed by a valid record of the same epoch is not a torn tail (records
    /// are synced one after the other, so nothing valid follows a torn one): it is damage in
    /// the middle, and the acknowledged events of the bad record cannot be put back. That is
    /// refused ([`StorageError::Refused`]) rather than dropped silently: `weldr-agent store
    /// recover` ([`Wal::recover_damaged`]) decides what to keep.
    pub fn recover(&mut self, epoch: u64) -> Result<Vec<WalEvent>, StorageError> {
        let (events, end) = self.read_from(0, epoch)?;
        if let Some((at, _)) = self.next_valid(end, epoch)? {
            return Err(StorageError::Refused(format!(
                "the append log {path} is damaged: the record at byte {end} is unreadable but \
                 valid records of the same epoch follow it (from byte {at}); the events it held \
                 were acknowledged and cannot be put back. Stop the server, keep a copy of the \
                 data directory, and run `weldr-agent store recover`: it keeps every readable \
                 event and continues each stream's ids after the highest one ever handed out",
                path = self.path.display(),
            )));
        }
        self.epoch = epoch;
        self.pos = end;
        Ok(events)
    }

    /// Every readable record of `epoch`, also after damage, and how many bytes of damage lie
    /// between them (what was lost was at most that big). Afterwards the log writes in
    /// `epoch` after the last readable record.
    pub fn recover_damaged(&mut self, epoch: u64) -> Result<Damaged, StorageError> {
        let (mut events, mut end) = self.read_from(0, epoch)?;
        let mut damaged = 0;
        let mut after_damage = None;
        while let Some((at, _)) = self.next_valid(end, epoch)? {
            after_damage.get_or_insert(events.len());
            damaged += at - end;
            let (more, after) = self.read_from(at, epoch)?;
            events.extend(more);
            end = after;
        }
        self.epoch = epoch;
        self.pos = end;
        Ok(Damaged {
            after_damage: after_damage.unwrap_or(events.len()),
            events,
            damaged_bytes: damaged,
        })
    }

    /// The records of `epoch` from `pos` up to the first that is not one; answers them and
    /// where that one starts.
    fn read_from(&self, mut pos: u64, epoch: u64) -> Result<(Vec<WalEvent>, u64), StorageError> {
        let mut events = Vec::new();
        while let Some((end, batch)) = self.record_at(pos, epoch)? {
            events.extend(batch);
            pos = end;
        }
        Ok((events, pos))
    }

    /// The valid record of `epoch` at `pos` (its end and events), if there is one.
    fn record_at(
        &self,
        pos: u64,
        epoch: u64,
    ) -> Result<Option<(u64, Vec<WalEvent>)>, StorageError> {
        let mut header = [0u8; HEADER];
        let read_error = |e: io::Error| StorageError::Io {
            path: self.path.clone(),
            message: format!("reading the append log: {e}"),
        };
        // The end of the file ends the log; any other read error must not pass for it.
        match self.file.read_exact_at(&mut header, pos) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(read_error(e)),
        }
        let Some((len, crc)) = parse_header(&header, epoch) else {
            return Ok(None);
        };
        let end = pos + HEADER as u64 + len as u64;
        if end > self.max_bytes.max(self.allocated) {
            return Ok(None);
        }
        let mut payload = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut payload, pos + HEADER as u64) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(read_error(e)),
        }
        if checksum(epoch, len, &payload) != crc {
            return Ok(None);
        }
        Ok(postcard::from_bytes::<Vec<WalEvent>>(&payload)
            .ok()
            .map(|batch| (end, batch)))
    }

    /// The first valid record of `epoch` that starts after `pos` (records are not aligned:
    /// every offset where the magic is found is tried).
    fn next_valid(
        &self,
        pos: u64,
        epoch: u64,
    ) -> Result<Option<(u64, Vec<WalEvent>)>, StorageError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| self.io_error(e))?
            .len()
            .min(self.max_bytes.max(self.allocated));
        if pos + 1 >= len {
            return Ok(None);
        }
        let mut rest = vec![0u8; (len - pos - 1) as usize];
        self.file
            .read_exact_at(&mut rest, pos + 1)
            .map_err(|e| self.io_error(e))?;
        let magic = MAGIC.to_le_bytes();
        for (i, window) in rest.windows(4).enumerate() {
            if window == magic {
                let at = pos + 1 + i as u64;
                if let Some(found) = self.record_at(at, epoch)? {
                    return Ok(Some((at, found.1)));
                }
            }
        }
        Ok(None)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records of this epoch are on file (or a failed one may be): the next durable commit
    /// must store a new epoch.
    pub fn pending(&self) -> bool {
        self.pos > 0 || self.spoiled
    }

    /// A checkpoint is due: [`CHECKPOINT_BYTES`] of records are pending, or a failed record
    /// could not be withdrawn. (Time is the other trigger: the writer is sent a checkpoint
    /// [`CHECKPOINT_INTERVAL`] after the log takes a record.)
    pub fn due(&self) -> bool {
        self.spoiled || self.pos >= CHECKPOINT_BYTES
    }

    /// The record for `events` in the current epoch, or None when it would not fit.
    pub fn record(&self, events: &[&(StreamKey, Arc<Event>)]) -> Option<Vec<u8>> {
        let batch: Vec<WalEventRef<'_>> = events
            .iter()
            .map(|(stream, e)| WalEventRef {
                stream: stream.as_str(),
                id: e.id,
                kind: &e.kind,
                data: &e.data,
                at_ms: e.at_ms,
            })
            .collect();
        let mut out = vec![0u8; HEADER];
        postcard::to_io(&batch, &mut out).ok()?;
        let len = u32::try_from(out.len() - HEADER).ok()?;
        if self.pos + out.len() as u64 > self.max_bytes {
            return None;
        }
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = FORMAT;
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..20].copy_from_slice(&len.to_le_bytes());
        let crc = checksum(self.epoch, len, &out[HEADER..]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        Some(out)
    }

    /// Write `record` (from [`Wal::record`]) and sync it; answers its offset.
    pub fn write(&mut self, record: &[u8]) -> Result<u64, StorageError> {
        let at = self.pos;
        let end = at + record.len() as u64;
        self.grow_to(end).map_err(|e| self.io_error(e))?;
        if let Err(e) = self
            .file
            .write_all_at(record, at)
            .and_then(|()| self.file.sync_data())
        {
            // The record may be on disk whole although the sync failed: its batch is not
            // committed, so it must not be replayed either.
            self.withdraw(at);
            return Err(self.io_error(e));
        }
        self.pos = end;
        Ok(at)
    }

    /// The commit after the record at `offset` failed: make the record unreadable and write
    /// the next one in its place, so that recovery cannot apply what was never committed.
    pub fn withdraw(&mut self, offset: u64) {
        let zeros = [0u8; HEADER];
        match self
            .file
            .write_all_at(&zeros, offset)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => self.pos = offset,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    path = %self.path.display(),
                    "could not withdraw an append-log record whose commit failed"
                );
                self.spoiled = true;
            }
        }
    }

    /// A durable commit stored `epoch`: everything written so far is in redb.
    pub fn checkpointed(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.pos = 0;
        self.spoiled = false;
    }

    /// Zero-fill whole chunks until `end` is covered, synced, so that record syncs never
    /// allocate.
    fn grow_to(&mut self, end: u64) -> io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        let zeros = vec![0u8; CHUNK as usize];
        let mut at = self.allocated;
        while at < end {
            self.file.write_all_at(&zeros, at)?;
            at += CHUNK;
        }
        self.file.sync_all()?;
        if self.allocated == 0 {
            sync_dir(&self.path)?;
        }
        self.allocated = at;
        Ok(())
    }

    fn io_error(&self, e: io::Error) -> StorageError {
        StorageError::Io {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// The payload length and checksum when `header` starts a record of `epoch`.
fn parse_header(header: &[u8; HEADER], epoch: u64) -> Option<(u32, u32)> {
    let magic = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let at_epoch = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(header[16..20].try_into().ok()?);
    let crc = u32::from_le_bytes(header[20..24].try_into().ok()?);
    (magic == MAGIC && header[4] == FORMAT && at_epoch == epoch && len > 0).then_some((len, crc))
}

fn checksum(epoch: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, id: u64) -> (StreamKey, Arc<Event>) {
        let (p, b) = stream.split_once('/').unwrap();
        (
            StreamKey::new(p, b),
            Arc::new(Event {
                id,
                kind: "text".into(),
                data: format!("{{\"n\":{id}}}"),
                at_ms: 7,
            }),
        )
    }

    fn write(wal: &mut Wal, events: &[(StreamKey, Arc<Event>)]) -> u64 {
        let refs: Vec<_> = events.iter().collect();
        let record = wal.record(&refs).unwrap();
        wal.write(&record).unwrap()
    }

    fn ids(events: &[WalEvent]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    /// The ids a fresh open of the log at `path` recovers for `epoch`.
    fn reread(path: &Path, epoch: u64) -> Vec<u64> {
        ids(&Wal::open(path, 8 << 20).unwrap().recover(epoch).unwrap())
    }

    #[test]
    fn records_of_the_epoch_come_back_in_order_and_a_torn_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut wal = Wal::open(&path, 8 << 20).unwrap();
        assert!(wal.recover(3).unwrap().is_empty());
        write(&mut wal, &[event("p/a", 1), event("p/b", 1)]);
        let second = write(&mut wal, &[event("p/a", 2)]);
        let third = write(&mut wal, &[event("p/a", 3)]);
        drop(wal);

        let mut wal = Wal::open(&path, 8 << 20).unwrap();
        let got = wal.recover(3).unwrap();
        assert_eq!(ids(&got), vec![1, 1, 2, 3]);
        assert_eq!(got[1].stream, "p/b");
        assert_eq!(got[3].data, "{\"n\":3}");
        assert!(wal.pending());
        // Another epoch's records are not this epoch's.
        assert!(reread(&path, 4).is_empty());

        // A flipped byte in the third record ends the log before it.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xFF], third + HEADER as u64 + 3)
            .unwrap();
        assert_eq!(reread(&path, 3), vec![1, 1, 2]);
        // A withdrawn record ends it too, and the next record takes its place.
        let mut wal = Wal::open(&path, 8 << 20).unwrap();
        wal.recover(3).unwrap();
        wal.withdraw(second);
        assert_eq!(reread(&path, 3), vec![1, 1]);
        assert_eq!(write(&mut wal, &[event("p/a", 2)]), second);
        assert_eq!(reread(&path, 3), vec![1, 1, 2]);
    }

    #[test]
    fn after_a_checkpoint_the_log_starts_over_and_old_records_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut wal = Wal::open(&path, 8 << 20).unwrap();
        wal.recover(0).unwrap();
        write(
            &mut wal,
            &[event("p/a", 1), event("p/a", 2), event("p/a", 3)],
        );
        wal.checkpointed(1);
        assert!(!wal.pending());
        assert_eq!(write(&mut wal, &[event("p/a", 4)]), 0);
        assert_eq!(reread(&path, 1), vec![4]);
        assert!(reread(&path, 2).is_empty());
    }

    #[test]
    fn a_record_that_would_pass_the_size_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(&dir.path().join("log"), CHUNK).unwrap();
        wal.recover(0).unwrap();
        let big: Vec<_> = (1..=50_000).map(|i| event("p/a", i)).collect();
        let refs: Vec<_> = big.iter().collect();
        assert!(wal.record(&refs).is_none());
        assert!(wal.record(&refs[..10]).is_some());
    }
}
