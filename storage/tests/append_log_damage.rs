//! Damage in the middle of the append log is not a torn tail: the store refuses to open
//! instead of dropping acknowledged events and handing their ids out again, and
//! `weldr_storage::recover` keeps every readable event and never reuses an id.
//!
//! The append log is a real one left by a crash: the test runs itself as a child process that
//! appends and then aborts without closing the store.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use weldr_storage::events::{NoObserver, read_range};
use weldr_storage::{NewEvent, StorageError, Store, StoreOptions, StreamKey, recover, wal_path};

const CHILD: &str = "WELDR_APPEND_LOG_DAMAGE_CHILD";

fn open(path: &Path) -> Result<Store, StorageError> {
    Store::open(path, StoreOptions::default(), Arc::new(NoObserver))
}

fn events(store: &Store, key: &StreamKey) -> Vec<(u64, String, String)> {
    let rtx = store.begin_read().unwrap();
    read_range(&rtx, key, 1, u64::MAX, 1_000_000)
        .unwrap()
        .iter()
        .map(|e| (e.id, e.kind.clone(), e.data.clone()))
        .collect()
}

async fn append(store: &Store, key: &StreamKey, data: String) -> u64 {
    let ev = NewEvent {
        kind: "text".into(),
        data,
    };
    store.writer().append(key.clone(), vec![ev]).await.unwrap()[0].id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_middle_record_is_refused_and_recover_never_reuses_an_id() {
    let keys = [StreamKey::new("p", "a"), StreamKey::new("p", "b")];
    if let Ok(dir) = std::env::var(CHILD) {
        let store = open(&Path::new(&dir).join("state.redb")).unwrap();
        // One record per append: each is awaited before the next.
        for i in 0..120u64 {
            let key = &keys[(i % 3 == 0) as usize];
            let id = append(&store, key, format!("{{\"i\":{i}}}")).await;
            println!("acked {key} {id} {i}");
        }
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_damaged_middle_record_is_refused_and_recover_never_reuses_an_id",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was to abort");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // stream -> id -> data
    let mut acked: HashMap<String, HashMap<u64, String>> = HashMap::new();
    for line in stdout.lines() {
        let Some((_, rest)) = line.split_once("acked ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let (stream, id, i) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse::<u64>().unwrap(),
            parts.next().unwrap(),
        );
        acked
            .entry(stream.to_string())
            .or_default()
            .insert(id, format!("{{\"i\":{i}}}"));
    }
    assert_eq!(acked.values().map(|m| m.len()).sum::<usize>(), 120);

    // Flip one byte in the payload of a record in the middle.
    let path = dir.path().join("state.redb");
    let log = std::fs::read(wal_path(&path)).unwrap();
    let starts: Vec<usize> = log
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"WLR1")
        .map(|(i, _)| i)
        .collect();
    assert!(starts.len() >= 120, "one record per append");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(wal_path(&path))
        .unwrap();
    let at = starts[60] + 24 + 2;
    file.write_all_at(&[log[at] ^ 0x40], at as u64).unwrap();
    drop(file);

    // The store refuses to open, and says what to do.
    let err = open(&path).err().expect("a damaged log is refused");
    assert!(matches!(err, StorageError::Refused(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("damaged"), "{message}");
    assert!(message.contains("weldr-agent store recover"), "{message}");
    // Refusing changed nothing: it refuses again.
    assert!(matches!(open(&path), Err(StorageError::Refused(_))));

    // Recover keeps every readable event.
    let report = recover(&path, StoreOptions::default()).unwrap();
    assert!(report.damaged_bytes > 0, "{report:?}");
    assert_eq!(report.restored, 119, "{report:?}");
    assert!(report.marked_lost >= 1, "{report:?}");
    let store = open(&path).unwrap();
    let mut lost_acked = 0;
    for key in &keys {
        let got = events(&store, key);
        let mine = &acked[key.as_str()];
        let highest = *mine.keys().max().unwrap();
        // Contiguous ids from 1, past every id handed out.
        let ids: Vec<u64> = got.iter().map(|e| e.0).collect();
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
        assert!(ids.len() as u64 >= highest);
        for (id, kind, data) in &got {
            match mine.get(id) {
                Some(expected) if kind == "text" => assert_eq!(data, expected),
                Some(_) => {
                    assert_eq!(kind, "lost");
                    lost_acked += 1;
                }
                None => assert_eq!(kind, "lost", "only lost events beyond the acked ids"),
            }
        }
        // Later appends get ids above every id ever handed out.
        let next = append(&store, key, "{}".into()).await;
        assert!(next > highest);
        assert_eq!(next, ids.len() as u64 + 1);
    }
    assert_eq!(lost_acked, 1, "exactly the damaged record's event is lost");
    // A stream nobody knows of any more may have been in the damaged record: new streams
    // start after every id it could have held.
    let fresh = append(&store, &StreamKey::new("p", "new"), "{}".into()).await;
    assert!(fresh > 1);
    assert_eq!(fresh, report.id_floor);
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .unwrap();
    drop(store);
    // And it opens normally from now on.
    open(&path).unwrap();
}
