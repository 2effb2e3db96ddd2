//! The append log in front of redb: appends acknowledged before a crash come back at the next
//! open, exactly once and without holes, also around durable commits of other work.
//!
//! The crash is real: the test runs itself as a child process that appends and then aborts
//! without closing the store, so redb's unsynced commits die with it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use weldr_storage::events::{NoObserver, read_meta, read_range};
use weldr_storage::tables::META;
use weldr_storage::{NewEvent, Store, StoreOptions, StreamKey, wal_path};

const CHILD: &str = "WELDR_APPEND_LOG_CHILD";

fn ev(i: u64) -> NewEvent {
    NewEvent {
        kind: "text".into(),
        data: format!("{{\"n\":{i}}}"),
    }
}

fn open(path: &Path, retention: u64, wal_bytes: u64) -> Store {
    let options = StoreOptions {
        event_retention: retention,
        wal_bytes,
        ..StoreOptions::default()
    };
    Store::open(path, options, Arc::new(NoObserver)).unwrap()
}

/// Run `scenario` in a child process that aborts when it returns; answers the child's stdout.
fn crash_after(test: &str, scenario: &str, dir: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{scenario}:{}", dir.display()))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the child was to abort: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// In the child: the scenario and directory to work in, when this process is one.
fn child() -> Option<(String, std::path::PathBuf)> {
    let spec = std::env::var(CHILD).ok()?;
    let (scenario, dir) = spec.split_once(':')?;
    Some((scenario.to_string(), dir.into()))
}

fn acked(stdout: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        // The harness may have started the first line with the test's name.
        .filter_map(|l| l.split_once("acked ").map(|(_, rest)| rest))
        .map(|l| {
            let (stream, id) = l.split_once(' ').unwrap();
            (stream.to_string(), id.parse().unwrap())
        })
        .collect()
}

async fn append_and_report(store: &Store, key: &StreamKey, range: std::ops::Range<u64>) {
    let mut tasks = Vec::new();
    for i in range {
        let (store, key) = (store.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store.writer().append(key, vec![ev(i)]).await.unwrap()
        }));
    }
    for task in tasks {
        for e in task.await.unwrap() {
            println!("acked {key} {}", e.id);
        }
    }
}

async fn close(store: Store) {
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

/// Append one event; answers its id.
async fn append_one(store: &Store, key: &StreamKey) -> u64 {
    store
        .writer()
        .append(key.clone(), vec![ev(0)])
        .await
        .unwrap()[0]
        .id
}

fn ids(store: &Store, key: &StreamKey) -> Vec<u64> {
    let rtx = store.begin_read().unwrap();
    read_range(&rtx, key, 1, u64::MAX, 1_000_000)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_crash_through_the_append_log() {
    let a = StreamKey::new("p", "a");
    let b = StreamKey::new("p", "b");
    if let Some((scenario, dir)) = child() {
        assert_eq!(scenario, "appends");
        let store = open(&dir.join("s.redb"), 1000, 16 << 20);
        append_and_report(&store, &a, 0..300).await;
        append_and_report(&store, &b, 0..40).await;
        // Other work is committed by redb itself, durably, and moves the log to a new epoch...
        store
            .writer()
            .write(|ctx| {
                ctx.table(META)?.insert("test", &[1u8][..])?;
                Ok(())
            })
            .await
            .unwrap();
        // ...and the appends after it are again only in the log.
        append_and_report(&store, &a, 300..1500).await;
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = crash_after(
        "acknowledged_appends_survive_a_crash_through_the_append_log",
        "appends",
        dir.path(),
    );
    let acked = acked(&out);
    assert_eq!(acked.len(), 1540, "the child acknowledged every append");
    assert!(
        std::fs::metadata(wal_path(&dir.path().join("s.redb")))
            .unwrap()
            .len()
            > 0
    );

    let store = open(&dir.path().join("s.redb"), 1000, 16 << 20);
    // Retention (1,000) applies to restored events as it did to the appends.
    assert_eq!(ids(&store, &a), (501..=1500).collect::<Vec<_>>());
    assert_eq!(ids(&store, &b), (1..=40).collect::<Vec<_>>());
    let rtx = store.begin_read().unwrap();
    assert_eq!(read_meta(&rtx, &a).unwrap().next_id, 1501);
    let last = read_range(&rtx, &a, 1500, 1500, 1).unwrap();
    assert!(last[0].data.starts_with("{\"n\":"));
    drop(rtx);
    // Ids go on where they stopped.
    assert_eq!(append_one(&store, &a).await, 1501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_left_by_a_crash_is_replayed_even_when_the_log_is_now_off() {
    let key = StreamKey::new("p", "c");
    if let Some((_, dir)) = child() {
        let store = open(&dir.join("s.redb"), 100_000, 16 << 20);
        append_and_report(&store, &key, 0..200).await;
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = crash_after(
        "a_log_left_by_a_crash_is_replayed_even_when_the_log_is_now_off",
        "off",
        dir.path(),
    );
    assert_eq!(acked(&out).len(), 200);
    let store = open(&dir.path().join("s.redb"), 100_000, 0);
    assert_eq!(ids(&store, &key), (1..=200).collect::<Vec<_>>());
    // Replayed once: a second open finds nothing more to do and no duplicates.
    close(store).await;
    let store = open(&dir.path().join("s.redb"), 100_000, 16 << 20);
    assert_eq!(ids(&store, &key), (1..=200).collect::<Vec<_>>());
    assert_eq!(append_one(&store, &key).await, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_writer_checkpoints_on_its_own() {
    let key = StreamKey::new("p", "e");
    if let Some((_, dir)) = child() {
        let store = open(&dir.join("s.redb"), 100_000, 16 << 20);
        append_and_report(&store, &key, 0..100).await;
        // Longer than the checkpoint interval (1 s), with nothing else written.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        // Once checkpointed, an idle store's threads sleep: nothing wakes them on a timer.
        let before = store_thread_wakes();
        tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
        println!("idle wakes {}", store_thread_wakes() - before);
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = crash_after("a_quiet_writer_checkpoints_on_its_own", "quiet", dir.path());
    assert_eq!(acked(&out).len(), 100);
    assert!(
        out.contains("idle wakes 0\n"),
        "an idle store's writer or checkpoint thread woke up: {out}"
    );
    // Without the log, only what redb made durable is there: all of it, thanks to the tick.
    let path = dir.path().join("s.redb");
    std::fs::remove_file(wal_path(&path)).unwrap();
    let store = open(&path, 100_000, 16 << 20);
    assert_eq!(ids(&store, &key), (1..=100).collect::<Vec<_>>());
}

/// Voluntary context switches of this process's writer and checkpoint threads so far.
fn store_thread_wakes() -> u64 {
    let mut wakes = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !matches!(name.trim(), "redb-writer" | "redb-checkpoint") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        wakes += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .unwrap();
    }
    wakes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_leaves_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let key = StreamKey::new("p", "d");
    let store = open(&path, 100, 16 << 20);
    append_and_report(&store, &key, 0..50).await;
    close(store).await;
    // With the log file gone, the events are still there: the close checkpointed them.
    std::fs::remove_file(wal_path(&path)).unwrap();
    let store = open(&path, 100, 16 << 20);
    assert_eq!(ids(&store, &key), (1..=50).collect::<Vec<_>>());
}
