//! The store's continuous backup (`src/backup`): what it costs while the store is busy, how
//! far behind it runs, how long a restore takes, and what it does while nothing happens.
//!
//! Run: `cargo bench --bench store_backup` (about 4 minutes on 2 cores); `BENCH_QUICK=1` for a
//! short smoke run (5 s runs, one repeat, smaller stores). `BENCH_RUN_SECS` and
//! `BENCH_REPEATS` override the load runs. Scratch space goes under `STORE_BACKUP_BENCH_DIR`
//! (default: the current directory, so the figures are for the workspace's filesystem, not a
//! tmpfs). The backup goes to the fs object store (local mode); when `python3 -m moto.server`
//! starts (`pip install 'moto[server]'`; `BENCH_S3=0` skips it) sections 1 and 2 run once
//! more against moto as a real S3 (one repeat). Prints Markdown tables with the targets'
//! verdicts at the end; progress goes to stderr.
//!
//! The load: 10 producer tasks, each appending one ~200-byte event to its own branch stream
//! every 2 ms (5,000 events/s), open loop: every tick starts an append and its latency is
//! measured from the tick's scheduled instant, so a stalled writer is not hidden by producers
//! that wait (no coordinated omission). Every run opens a fresh store in its own directory,
//! after one discarded warm-up run.
//!
//! 1. Backup lag under that load with `STORE_BACKUP_INTERVAL_MS` 1000 (the default) and 200,
//!    shipped by the real [`BackupWorker`] under the real [`Workers`] runner, as the server
//!    runs it (the worker waits for a change and then half the interval before every unit).
//!    Lag is from the oldest commit an increment carries to the end of its upload
//!    (`BackupStats::lags_us`); also increments/s, requests/s and bytes/s shipped.
//! 2. Append latency (p50/p99/p99.9) with the backup on (store tracking changes, worker
//!    shipping) against off (`track_changes: false`, no worker). The three configurations
//!    (off, on at 1 s, on at 200 ms) take turns within each of 3 repeats of 10 s, the order
//!    rotating every repeat; section 1's figures are these same on-runs, pooled (30 s of load
//!    per interval).
//! 3. Restore time: (a) 1,000 branches × 1,000 events, (b) ~1 GB of 1 MB random attachment
//!    values (1,000,000 bytes: a value of exactly 1 MiB plus its key takes a 2 MiB redb page,
//!    which would double the file and time redb's rounding rather than the backup). A full
//!    copy with `ship_once`, then `restore::restore` into a new file, against the floor:
//!    `std::fs::copy` of `state.redb` plus an fsync (both read a file the page cache holds).
//!    Every restore is verified (entry counts and value bytes of events, streams and
//!    attachment bytes, read with redb from both files) before its time is reported.
//! 4. Idle: after the full copy, the worker runs for 30 s with nothing written; its requests
//!    and bytes, per hour. Then one event is written: exactly one increment should follow.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use tokio_util::sync::CancellationToken;
use weldr_agent::backup::{BackupWorker, Shipped, StoreBackup, restore};
use weldr_agent::config::{Config, Secret};
use weldr_agent::sync::store::Store as Objects;
use weldr_agent::worker::{Worker, WorkerState, Workers};
use weldr_storage::events::NoObserver;
use weldr_storage::redb::{self, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use weldr_storage::tables::{ATTACHMENT_BYTES, EVENTS, STREAMS};
use weldr_storage::{NewEvent, Store, StoreOptions, StreamKey};

const PRODUCERS: usize = 10;
const PERIOD: Duration = Duration::from_millis(2);
/// With the log's own fields the stored event is about 200 bytes.
const PAYLOAD: usize = 180;
const DEFAULT_INTERVAL: Duration = Duration::from_millis(1000);
const FAST_INTERVAL: Duration = Duration::from_millis(200);

struct Plan {
    quick: bool,
    /// Length of one load run.
    window: Duration,
    repeats: usize,
    /// Restore (a): branches × events each.
    branches: usize,
    events_per_branch: usize,
    /// Restore (b): values of [`BLOB`] bytes.
    blobs: usize,
    idle: Duration,
}

impl Plan {
    fn new() -> Plan {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let secs = env_num("BENCH_RUN_SECS", if quick { 5 } else { 10 });
        Plan {
            quick,
            window: Duration::from_secs(secs as u64),
            repeats: env_num("BENCH_REPEATS", if quick { 1 } else { 3 }),
            branches: if quick { 100 } else { 1000 },
            events_per_branch: 1000,
            blobs: if quick { 64 } else { 1000 },
            idle: Duration::from_secs(if quick { 5 } else { 30 }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where the backup goes

#[derive(Clone)]
enum Backend {
    Fs,
    S3(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Fs => "fs",
            Backend::S3(_) => "S3 (moto)",
        }
    }

    /// A local-mode config whose store backup goes to `dir/objects` (fs) or to its own bucket
    /// `bucket` on the S3 endpoint.
    fn config(&self, dir: &Path, interval: Duration, bucket: &str) -> Config {
        let mut config = Config::for_workspace(dir);
        config.object_store_dir = dir.join("objects");
        config.store_backup.enabled = true;
        config.store_backup.interval = interval;
        if let Backend::S3(endpoint) = self {
            config.s3.endpoint = endpoint.clone();
            config.s3.region = "us-east-1".into();
            config.s3.access_key_id = Some(Secret("benchaccesskey".into()));
            config.s3.secret_access_key = Some(Secret("benchsecretkey".into()));
            config.s3.bucket = None;
            config.store_backup.bucket = bucket.to_string();
        }
        config
    }
}

/// `python3 -m moto.server` on a free loopback port; killed on drop.
struct Moto {
    endpoint: String,
    child: Child,
}

impl Moto {
    fn start() -> Option<Moto> {
        if std::env::var("BENCH_S3").is_ok_and(|v| v == "0") {
            return None;
        }
        let port = free_port();
        let mut child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Moto {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    child,
                });
            }
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Stores and the worker

fn open_store(path: &Path, track_changes: bool, wal: bool) -> Store {
    let defaults = StoreOptions::default();
    let options = StoreOptions {
        track_changes,
        wal_bytes: if wal { defaults.wal_bytes } else { 0 },
        ..defaults
    };
    Store::open(path, options, Arc::new(NoObserver)).expect("open the store")
}

async fn close(store: Store) {
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

/// What the worker did, unit by unit.
#[derive(Default)]
struct Tally {
    units: u64,
    increments: u64,
    full_copies: u64,
    /// Lag of every increment, in µs.
    lags_us: Vec<u64>,
}

/// [`BackupWorker`] with a tally of each unit (read from the backup's stats after it), so the
/// benchmark sees every increment however many there are.
struct Counted {
    inner: BackupWorker,
    backup: Arc<StoreBackup>,
    tally: Arc<Mutex<Tally>>,
    last: (u64, u64, Option<String>),
}

impl Counted {
    fn new(backup: Arc<StoreBackup>, tally: Arc<Mutex<Tally>>) -> Self {
        Counted {
            inner: BackupWorker::new(backup.clone()),
            backup,
            tally,
            last: (0, 0, None),
        }
    }
}

#[async_trait]
impl Worker for Counted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn work(&mut self, shutdown: &CancellationToken) -> Result<WorkerState, String> {
        let outcome = self.inner.work(shutdown).await;
        let s = self.backup.stats();
        let (full_copies, increments, generation) = &self.last;
        let mut t = self.tally.lock().unwrap();
        t.units += 1;
        if s.full_copies > *full_copies {
            t.full_copies += s.full_copies - full_copies;
        } else if s.increments != *increments || s.generation != *generation {
            // Normally one; two when a failed upload was sent again before the next.
            let new = if s.generation == *generation {
                s.increments.saturating_sub(*increments)
            } else {
                s.increments
            };
            t.increments += new;
            let kept = s.lags_us.len();
            t.lags_us
                .extend(s.lags_us.iter().skip(kept.saturating_sub(new as usize)));
        }
        self.last = (s.full_copies, s.increments, s.generation.clone());
        outcome
    }

    async fn wait_for_work(&mut self) {
        self.inner.wait_for_work().await
    }
}

/// A store's backup, shipped by its worker under the real runner.
struct Shipper {
    backup: Arc<StoreBackup>,
    tally: Arc<Mutex<Tally>>,
    workers: Workers,
}

impl Shipper {
    /// Start the worker and wait for its first full copy (and for it to go idle).
    async fn start(store: &Store, config: &Config) -> Shipper {
        let objects = Objects::open_store_backup(config).expect("open the backup's objects");
        let backup = Arc::new(StoreBackup::with_objects(
            store.clone(),
            objects,
            config.store_backup.clone(),
        ));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let workers = Workers::new(CancellationToken::new());
        workers.spawn(Counted::new(backup.clone(), tally.clone()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while backup.stats().full_copies == 0 {
            assert!(Instant::now() < deadline, "no full copy after 120 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Shipper {
            backup,
            tally,
            workers,
        }
    }

    fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap())
    }

    /// Wait until nothing noted waits to be shipped (at most `limit`).
    async fn drain(&self, store: &Store, limit: Duration) {
        let deadline = Instant::now() + limit;
        while store.tracker().is_some_and(|t| t.has_pending()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        self.workers.join(Duration::from_secs(30)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1 + 2: the load, with the backup on and off

/// Append latencies of one load run.
struct Load {
    lat: Vec<Duration>,
    secs: f64,
}

/// 5,000 events/s for `window`, open loop (see the top of the file).
async fn drive(store: &Store, window: Duration) -> Load {
    let data = "x".repeat(PAYLOAD);
    let (lat, secs) = open_loop_appends(store, window, PRODUCERS, PERIOD, &data).await;
    Load { lat, secs }
}

/// What the worker shipped during a load run (after its first full copy).
struct Shipping {
    tally: Tally,
    bytes: u64,
    requests: u64,
}

struct Run {
    load: Load,
    shipping: Option<Shipping>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.load.lat.len() as f64 / self.load.secs
    }

    fn pct_ms(&self, p: f64) -> f64 {
        ms(percentile(&self.load.lat, p))
    }
}

/// How a load run's store is backed up.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    /// None: off (the store does not track changes, no worker).
    interval: Option<Duration>,
}

/// The configurations that take turns, in the order of the first repeat.
const MODES: [Mode; 3] = [
    Mode {
        name: "off",
        interval: None,
    },
    Mode {
        name: "on, interval 1 s",
        interval: Some(DEFAULT_INTERVAL),
    },
    Mode {
        name: "on, interval 200 ms",
        interval: Some(FAST_INTERVAL),
    },
];

/// One load run on a fresh store.
async fn load_run(scratch: &Path, backend: &Backend, mode: Mode, window: Duration) -> Run {
    let dir = scratch_dir(scratch, "load");
    let store = open_store(
        &dir.path().join("state.redb"),
        mode.interval.is_some(),
        true,
    );
    let shipper = match mode.interval {
        Some(iv) => {
            let bucket = format!("bench-load-{}", unique());
            let config = backend.config(dir.path(), iv, &bucket);
            Some(Shipper::start(&store, &config).await)
        }
        None => None,
    };
    let before = shipper.as_ref().map(|s| {
        s.take();
        s.backup.stats()
    });
    let load = drive(&store, window).await;
    let mut shipping = None;
    if let (Some(shipper), Some(before)) = (shipper, before) {
        // The tail: what the last commits noted, shipped as the worker would.
        shipper.drain(&store, Duration::from_secs(10)).await;
        let after = shipper.backup.stats();
        let tally = shipper.take();
        shipper.stop().await;
        shipping = Some(Shipping {
            tally,
            bytes: after.bytes_shipped - before.bytes_shipped,
            requests: after.requests - before.requests,
        });
    }
    close(store).await;
    Run { load, shipping }
}

// ---------------------------------------------------------------------------------------------
// 3: restore

#[derive(Debug, PartialEq, Eq, Default)]
struct Counts {
    events: u64,
    event_bytes: u64,
    streams: u64,
    blobs: u64,
    blob_bytes: u64,
}

/// Entry counts and value bytes of a closed store file, read with redb.
fn counts(path: &Path) -> Counts {
    let mut tries = 0;
    let db = loop {
        match redb::Database::open(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    };
    let rtx = db.begin_read().unwrap();
    let mut c = Counts::default();
    let events = rtx.open_table(EVENTS).unwrap();
    c.events = events.len().unwrap();
    for entry in events.iter().unwrap() {
        c.event_bytes += entry.unwrap().1.value().len() as u64;
    }
    c.streams = rtx.open_table(STREAMS).unwrap().len().unwrap();
    let blobs = rtx.open_table(ATTACHMENT_BYTES).unwrap();
    c.blobs = blobs.len().unwrap();
    for entry in blobs.iter().unwrap() {
        c.blob_bytes += entry.unwrap().1.value().len() as u64;
    }
    c
}

async fn fill_events(store: &Store, branches: usize, per_branch: usize) {
    let data = "x".repeat(PAYLOAD);
    let all: Vec<usize> = (0..branches).collect();
    for chunk in all.chunks(10) {
        let streams: Vec<StreamKey> = chunk
            .iter()
            .map(|b| StreamKey::new("p", &format!("b{b:04}")))
            .collect();
        let data = data.clone();
        store
            .writer()
            .write(move |ctx| {
                for stream in &streams {
                    for _ in 0..per_branch {
                        let kind = "bench".to_string();
                        let data = data.clone();
                        ctx.append(stream, NewEvent { kind, data })?;
                    }
                }
                Ok(())
            })
            .await
            .expect("write events");
    }
}

/// One attachment value: 1 MB, just under redb's 1 MiB page order (see the top of the file).
const BLOB: usize = 1_000_000;

async fn fill_blobs(store: &Store, count: usize) {
    let mut rng = Rng(0x5eed_0fb1_0b00);
    let mut next = 0;
    while next < count {
        let batch: Vec<(String, Vec<u8>)> = (next..(next + 16).min(count))
            .map(|i| {
                let mut bytes = vec![0u8; BLOB];
                rng.fill(&mut bytes);
                (format!("att{i:05}"), bytes)
            })
            .collect();
        next += batch.len();
        store
            .writer()
            .write(move |ctx| {
                let mut table = ctx.table(ATTACHMENT_BYTES)?;
                for (id, bytes) in &batch {
                    table.insert(("p", id.as_str()), bytes.as_slice())?;
                }
                Ok(())
            })
            .await
            .expect("write attachment bytes");
    }
}

struct RestoreRow {
    what: String,
    build_s: f64,
    file_bytes: u64,
    backup_bytes: u64,
    restored_bytes: u64,
    copy_s: f64,
    restore_s: f64,
    floor_s: f64,
    counts: Counts,
}

/// Full copy of `store` (in `dir`), then the `cp` floor and a verified restore.
async fn copy_and_restore(dir: &Path, store: Store, what: String, build_s: f64) -> RestoreRow {
    let config = Backend::Fs.config(dir, DEFAULT_INTERVAL, "unused");
    let objects = Objects::open_store_backup(&config).unwrap();
    let backup = StoreBackup::with_objects(store.clone(), objects, config.store_backup.clone());
    let t = Instant::now();
    let shipped = backup.ship_once().await.expect("full copy");
    let copy_s = t.elapsed().as_secs_f64();
    assert_eq!(shipped, Shipped::FullCopy);
    let backup_bytes = backup.stats().bytes_shipped;
    drop(backup);
    close(store).await;

    let src = dir.join("state.redb");
    let file_bytes = std::fs::metadata(&src).unwrap().len();
    let floor = dir.join("floor.redb");
    let t = Instant::now();
    std::fs::copy(&src, &floor).unwrap();
    std::fs::File::open(&floor).unwrap().sync_all().unwrap();
    let floor_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&floor).unwrap();

    // A fresh handle, as a new machine would have.
    let objects = Objects::open_store_backup(&config).unwrap();
    let target = dir.join("restored.redb");
    let t = Instant::now();
    let restored = restore::restore(&objects, &target, None, Vec::new())
        .await
        .expect("restore")
        .expect("a backup to restore");
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(restored.increments, 0);
    let restored_bytes = std::fs::metadata(&target).unwrap().len();

    let want = counts(&src);
    let got = counts(&target);
    assert_eq!(
        got, want,
        "{what}: the restored store differs from the original"
    );
    RestoreRow {
        what,
        build_s,
        file_bytes,
        backup_bytes,
        restored_bytes,
        copy_s,
        restore_s,
        floor_s,
        counts: got,
    }
}

async fn restore_events(scratch: &Path, plan: &Plan) -> RestoreRow {
    let dir = scratch_dir(scratch, "restore-events");
    let store = open_store(&dir.path().join("state.redb"), true, false);
    let t = Instant::now();
    fill_events(&store, plan.branches, plan.events_per_branch).await;
    let build_s = t.elapsed().as_secs_f64();
    let what = format!(
        "(a) {} branches × {} events",
        thousands(plan.branches as u64),
        thousands(plan.events_per_branch as u64)
    );
    let row = copy_and_restore(dir.path(), store, what, build_s).await;
    let want = (plan.branches * plan.events_per_branch) as u64;
    assert_eq!(row.counts.events, want, "events restored");
    assert_eq!(row.counts.streams, plan.branches as u64, "streams restored");
    row
}

async fn restore_blobs(scratch: &Path, plan: &Plan) -> RestoreRow {
    let dir = scratch_dir(scratch, "restore-blobs");
    let store = open_store(&dir.path().join("state.redb"), true, false);
    let t = Instant::now();
    fill_blobs(&store, plan.blobs).await;
    let build_s = t.elapsed().as_secs_f64();
    let what = format!(
        "(b) {} attachment values of 1 MB",
        thousands(plan.blobs as u64)
    );
    let row = copy_and_restore(dir.path(), store, what, build_s).await;
    assert_eq!(row.counts.blobs, plan.blobs as u64, "values restored");
    assert_eq!(row.counts.blob_bytes, (plan.blobs * BLOB) as u64);
    row
}

// ---------------------------------------------------------------------------------------------
// 4: idle

struct Idle {
    window: Duration,
    requests: u64,
    bytes: u64,
    wakeups: u64,
    /// After one event:
    one_increments: u64,
    one_requests: u64,
    one_bytes: u64,
    one_lag_ms: Option<f64>,
    one_units: u64,
}

async fn idle(scratch: &Path, backend: &Backend, plan: &Plan) -> Idle {
    let dir = scratch_dir(scratch, "idle");
    let store = open_store(&dir.path().join("state.redb"), true, true);
    fill_events(&store, 10, 100).await;
    let bucket = format!("bench-idle-{}", unique());
    let config = backend.config(dir.path(), DEFAULT_INTERVAL, &bucket);
    let shipper = Shipper::start(&store, &config).await;
    // Past the first interval: the notes the copy took left one wake-up behind (a unit that
    // finds nothing), which is the copy's, not the idle store's.
    tokio::time::sleep(DEFAULT_INTERVAL).await;
    shipper.take();
    let before = shipper.backup.stats();
    tokio::time::sleep(plan.idle).await;
    let quiet = shipper.backup.stats();
    let quiet_tally = shipper.take();
    store
        .writer()
        .append(
            StreamKey::new("p", "b0000"),
            vec![NewEvent {
                kind: "bench".into(),
                data: "one".into(),
            }],
        )
        .await
        .unwrap();
    // Several intervals: long enough for a second increment, were one to follow.
    tokio::time::sleep(DEFAULT_INTERVAL * 4).await;
    let after = shipper.backup.stats();
    let one = shipper.take();
    shipper.stop().await;
    close(store).await;
    Idle {
        window: plan.idle,
        requests: quiet.requests - before.requests,
        bytes: quiet.bytes_shipped - before.bytes_shipped,
        wakeups: quiet_tally.units,
        one_increments: one.increments,
        one_requests: after.requests - quiet.requests,
        one_bytes: after.bytes_shipped - quiet.bytes_shipped,
        one_lag_ms: one.lags_us.first().map(|us| *us as f64 / 1000.0),
        one_units: one.units,
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn scratch_dir(scratch: &Path, name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(scratch)
        .unwrap()
}

/// A short lowercase tag, unique in this process (bucket names).
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn fstype(path: &Path) -> String {
    Command::new("df")
        .args(["--output=fstype"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn pct_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn progress(msg: &str) {
    eprintln!("[store_backup] {msg}");
}

// ---------------------------------------------------------------------------------------------
// The report

/// Lag rows: each backed-up mode with its runs, pooled.
fn lag_table(out: &mut String, backend: &Backend, rows: &[(Mode, &[Run])], window: Duration) {
    out.push_str(&format!(
        "\n### Backup lag at 5,000 appends/s ({}; runs of {} s, pooled per row)\n\n",
        backend.name(),
        window.as_secs()
    ));
    out.push_str("| worker | runs | increments | increments/s | requests/s | waits/s | shipped/s | bytes per increment | lag p50 ms | lag p99 ms | lag max ms | target: p99 ≤ interval |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for (mode, runs) in rows {
        let Some(interval) = mode.interval else {
            continue;
        };
        let mut lags: Vec<u64> = Vec::new();
        let (mut incs, mut reqs, mut waits, mut bytes, mut secs) = (0u64, 0u64, 0u64, 0u64, 0f64);
        for run in runs.iter() {
            let s = run.shipping.as_ref().unwrap();
            lags.extend(&s.tally.lags_us);
            incs += s.tally.increments;
            reqs += s.requests;
            // The worker waits before every unit.
            waits += s.tally.units;
            bytes += s.bytes;
            secs += run.load.secs;
        }
        lags.sort_unstable();
        let p99 = pct_us(&lags, 0.99);
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} MB | {:.1} KB | {:.1} | {:.1} | {:.1} | {} |\n",
            mode.name,
            runs.len(),
            thousands(incs),
            incs as f64 / secs,
            reqs as f64 / secs,
            waits as f64 / secs,
            bytes as f64 / secs / 1e6,
            bytes as f64 / incs.max(1) as f64 / 1e3,
            pct_us(&lags, 0.5),
            p99,
            pct_us(&lags, 1.0),
            if p99 <= interval.as_secs_f64() * 1000.0 {
                "met"
            } else {
                "missed"
            },
        ));
    }
}

/// `runs[m]` holds the runs of `MODES[m]`, repeat by repeat.
fn latency_table(out: &mut String, backend: &Backend, runs: &[Vec<Run>], window: Duration) {
    out.push_str(&format!(
        "\n### Append latency at 5,000 appends/s, backup on against off ({}; {} interleaved repeat(s) of {} s; median (min–max) over the repeats)\n\n",
        backend.name(),
        runs[0].len(),
        window.as_secs()
    ));
    out.push_str(
        "| backup | appends/s | p50 ms | p99 ms | p99.9 ms | max ms | p99 ÷ off's p99 (same repeat) |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for (m, mode) in MODES.iter().enumerate() {
        let col = |f: &dyn Fn(&Run) -> f64, digits: usize| {
            fmt(&runs[m].iter().map(f).collect::<Vec<_>>(), digits)
        };
        let ratio = if mode.interval.is_none() {
            "—".to_string()
        } else {
            let r: Vec<f64> = runs[m]
                .iter()
                .zip(&runs[0])
                .map(|(on, off)| on.pct_ms(0.99) / off.pct_ms(0.99))
                .collect();
            format!("{}×", fmt(&r, 2))
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {ratio} |\n",
            mode.name,
            col(&|r| r.rate(), 0),
            col(&|r| r.pct_ms(0.5), 2),
            col(&|r| r.pct_ms(0.99), 2),
            col(&|r| r.pct_ms(0.999), 2),
            col(&|r| r.pct_ms(1.0), 1),
        ));
    }
    // Noise: how far off's own p99 spreads over the repeats, and never less than 10%.
    let off: Vec<f64> = runs[0].iter().map(|r| r.pct_ms(0.99)).collect();
    let (lo, hi) = range(&off);
    let tolerance = 1.0 + ((hi - lo) / median(&off)).max(0.10);
    out.push('\n');
    for (m, mode) in MODES.iter().enumerate().skip(1) {
        let ratio = median(
            &runs[m]
                .iter()
                .zip(&runs[0])
                .map(|(on, off)| on.pct_ms(0.99) / off.pct_ms(0.99))
                .collect::<Vec<_>>(),
        );
        out.push_str(&format!(
            "Target, p99 within noise, backup {}: p99 on ÷ off {ratio:.2}× (median over the repeats) against a tolerance of {tolerance:.2}× (off's p99 ranges {lo:.2}–{hi:.2} ms; at least 10%): {}.\n",
            mode.name,
            if ratio <= tolerance { "met" } else { "missed" }
        ));
    }
}

fn restore_table(out: &mut String, rows: &[RestoreRow]) {
    out.push_str("\n### Restore from the backup (fs object store), against the `cp` floor\n\n");
    out.push_str("| store | built in | `state.redb` | full copy shipped | restored file | full copy s | restore s | floor: cp + fsync s | restore ÷ floor | full copy ÷ floor | verified |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let verified = if r.counts.blobs > 0 {
            format!(
                "{} values, {} (counts equal)",
                thousands(r.counts.blobs),
                mb(r.counts.blob_bytes)
            )
        } else {
            format!(
                "{} events in {} streams (counts equal)",
                thousands(r.counts.events),
                thousands(r.counts.streams)
            )
        };
        out.push_str(&format!(
            "| {} | {:.1} s | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1}× | {:.1}× | {verified} |\n",
            r.what,
            r.build_s,
            mb(r.file_bytes),
            mb(r.backup_bytes),
            mb(r.restored_bytes),
            r.copy_s,
            r.restore_s,
            r.floor_s,
            r.restore_s / r.floor_s,
            r.copy_s / r.floor_s,
        ));
    }
}

fn idle_table(out: &mut String, backend: &Backend, i: &Idle) {
    let per_hour = 3600.0 / i.window.as_secs_f64();
    out.push_str(&format!(
        "\n### Idle store ({}; interval 1 s; after the full copy, nothing written for {} s)\n\n",
        backend.name(),
        i.window.as_secs()
    ));
    out.push_str("| window | worker units | requests | bytes shipped | requests per hour | bytes per hour | target: near zero |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    out.push_str(&format!(
        "| {} s idle | {} | {} | {} | {:.0} | {:.0} | {} |\n",
        i.window.as_secs(),
        i.wakeups,
        i.requests,
        i.bytes,
        i.requests as f64 * per_hour,
        i.bytes as f64 * per_hour,
        if i.requests == 0 && i.bytes == 0 {
            "met"
        } else {
            "missed"
        }
    ));
    out.push_str("\n| then one event, 4 s later | worker units | increments | requests | bytes shipped | its lag ms | target: exactly one increment |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    out.push_str(&format!(
        "| 1 event | {} | {} | {} | {} | {} | {} |\n",
        i.one_units,
        i.one_increments,
        i.one_requests,
        i.one_bytes,
        i.one_lag_ms.map_or("—".to_string(), |l| format!("{l:.1}")),
        if i.one_increments == 1 {
            "met"
        } else {
            "missed"
        }
    ));
}

async fn one_run(scratch: &Path, backend: &Backend, mode: Mode, window: Duration) -> Run {
    let run = load_run(scratch, backend, mode, window).await;
    progress(&format!(
        "  {:.0} appends/s, p99 {:.2} ms{}",
        run.rate(),
        run.pct_ms(0.99),
        run.shipping.as_ref().map_or(String::new(), |s| format!(
            ", {} increments, {} requests",
            s.tally.increments, s.requests
        ))
    ));
    run
}

/// The load runs on `backend`: `repeats` rounds of [`MODES`], the order rotating; `runs[m]`
/// holds the runs of `MODES[m]`.
async fn load_runs(scratch: &Path, backend: &Backend, plan: &Plan) -> Vec<Vec<Run>> {
    // Warm-up (discarded): the first store of the process, the runtime's threads.
    progress(&format!("{}: warm-up", backend.name()));
    load_run(scratch, backend, MODES[1], Duration::from_secs(2)).await;
    let mut runs: Vec<Vec<Run>> = MODES.iter().map(|_| Vec::new()).collect();
    for repeat in 0..plan.repeats {
        for k in 0..MODES.len() {
            let m = (k + repeat) % MODES.len();
            progress(&format!(
                "{}: repeat {}/{}, backup {}",
                backend.name(),
                repeat + 1,
                plan.repeats,
                MODES[m].name
            ));
            runs[m].push(one_run(scratch, backend, MODES[m], plan.window).await);
        }
    }
    runs
}

/// Section 1 and 2 on `backend`.
async fn load_section(out: &mut String, scratch: &Path, backend: &Backend, plan: &Plan) {
    let runs = load_runs(scratch, backend, plan).await;
    let rows: Vec<(Mode, &[Run])> = MODES
        .iter()
        .zip(&runs)
        .map(|(m, r)| (*m, r.as_slice()))
        .collect();
    lag_table(out, backend, &rows, plan.window);
    latency_table(out, backend, &runs, plan.window);
}

fn main() {
    let plan = Plan::new();
    weldr_agent::install_crypto_provider();
    let base: PathBuf = std::env::var_os("STORE_BACKUP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let scratch = tempfile::Builder::new()
        .prefix(".bench-store-backup-")
        .tempdir_in(&base)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut out = format!(
        "\n## Store backup ({} cores, scratch on {}{})\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        fstype(scratch.path()),
        if plan.quick { ", BENCH_QUICK" } else { "" }
    );
    rt.block_on(async {
        let fs = Backend::Fs;
        load_section(&mut out, scratch.path(), &fs, &plan).await;

        progress("restore (a): events");
        let a = restore_events(scratch.path(), &plan).await;
        progress("restore (b): attachment values");
        let b = restore_blobs(scratch.path(), &plan).await;
        restore_table(&mut out, &[a, b]);

        progress(&format!("idle for {} s", plan.idle.as_secs()));
        let i = idle(scratch.path(), &fs, &plan).await;
        idle_table(&mut out, &fs, &i);

        match Moto::start() {
            Some(moto) => {
                let s3 = Backend::S3(moto.endpoint.clone());
                let s3_plan = Plan {
                    repeats: 1,
                    ..Plan::new()
                };
                load_section(&mut out, scratch.path(), &s3, &s3_plan).await;
            }
            None => out.push_str(
                "\n(S3 rows skipped: `python3 -m moto.server` did not start, or BENCH_S3=0.)\n",
            ),
        }
    });
    out.push_str(&format!(
        "\nWall time of the benchmark: {:.0} s.\n",
        started.elapsed().as_secs_f64()
    ));
    println!("{out}");
}
