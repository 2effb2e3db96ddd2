//! A full disk: the store says it cannot write while it cannot, keeps serving reads, and writes
//! again once space is freed, without a restart and without losing an acknowledged event.
//!
//! The disk is a real one: a small tmpfs (the tests run as root).

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[path = "../../tests/common/tmpfs.rs"]
mod tmpfs;

use tmpfs::Tmpfs;
use weldr_storage::events::{NoObserver, read_meta, read_range};
use weldr_storage::{NewEvent, StorageError, Store, StoreOptions, StreamKey};

fn event(i: u64) -> NewEvent {
    NewEvent {
        kind: "text".into(),
        data: format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(8 << 10)),
    }
}

fn open(path: &Path) -> Store {
    Store::open(path, StoreOptions::default(), Arc::new(NoObserver)).unwrap()
}

fn all_events(store: &Store, key: &StreamKey) -> Vec<(u64, String)> {
    let rtx = store.begin_read().unwrap();
    read_range(&rtx, key, 1, u64::MAX, 1_000_000)
        .unwrap()
        .iter()
        .map(|e| (e.id, e.data.clone()))
        .collect()
}

/// Fill the disk with a file until writing fails.
fn fill(path: &PathBuf) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 64 << 10];
    while file
        .write_all(&chunk)
        .and_then(|()| file.sync_data())
        .is_ok()
    {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_the_store_until_space_is_freed_and_loses_nothing() {
    let disk = Tmpfs::mount("8m");
    let path = disk.path().join("data").join("state.redb");
    let store = open(&path);
    let key = StreamKey::new("p", "a");
    assert_eq!(store.write_problem(), None);

    // Acknowledged appends, until the disk is full.
    let mut acked: Vec<(u64, String)> = Vec::new();
    let ballast = disk.path().join("ballast");
    let mut n = 0;
    for _ in 0..50 {
        n += 1;
        let ev = event(n);
        let events = store
            .writer()
            .append(key.clone(), vec![ev.clone()])
            .await
            .unwrap();
        acked.push((events[0].id, ev.data));
    }
    fill(&ballast);
    let failure = loop {
        n += 1;
        assert!(n < 100_000, "the disk never filled up");
        let ev = event(n);
        match store.writer().append(key.clone(), vec![ev.clone()]).await {
            Ok(events) => acked.push((events[0].id, ev.data)),
            Err(e) => break e,
        }
        // Room the store had at the start runs out after a while; keep the rest of the disk full.
        if n % 16 == 0 {
            std::fs::remove_file(&ballast).unwrap();
            fill(&ballast);
        }
    };
    assert!(
        matches!(failure, StorageError::Unwritable(_)),
        "a full disk answers Unwritable: {failure:?}"
    );
    let problem = store
        .write_problem()
        .expect("the store says it cannot write");
    assert!(problem.starts_with("cannot write: "), "{problem}");
    assert!(acked.len() >= 50);

    // Readers are not affected: every acknowledged event is there, in order.
    assert_eq!(all_events(&store, &key), acked);
    // Writes keep failing while the disk is full, and say why.
    for _ in 0..3 {
        let err = store
            .writer()
            .append(key.clone(), vec![event(0)])
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Unwritable(_)), "{err:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert!(store.write_problem().is_some());
    assert_eq!(all_events(&store, &key), acked);

    // Space comes back: the store writes again, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let mut tries = 0;
    let id = loop {
        tries += 1;
        let ev = event(1_000_000 + tries);
        match store.writer().append(key.clone(), vec![ev.clone()]).await {
            Ok(events) => {
                acked.push((events[0].id, ev.data));
                break events[0].id;
            }
            Err(StorageError::Unwritable(_)) if tries < 100 => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not write again: {e}"),
        }
    };
    assert_eq!(id, acked.len() as u64, "ids go on without a gap or a reuse");
    assert_eq!(store.write_problem(), None);
    for i in 0..5 {
        let ev = event(2_000_000 + i);
        let events = store
            .writer()
            .append(key.clone(), vec![ev.clone()])
            .await
            .unwrap();
        acked.push((events[0].id, ev.data));
    }
    assert_eq!(all_events(&store, &key), acked);

    // And after a restart, everything acknowledged is still there, in order.
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .unwrap();
    drop(store);
    let store = open(&path);
    assert_eq!(all_events(&store, &key), acked);
    let rtx = store.begin_read().unwrap();
    assert_eq!(read_meta(&rtx, &key).unwrap().last_id(), acked.len() as u64);
}
