//! The event log and the writer against a real redb file.

use std::sync::{Arc, Mutex};

use weldr_storage::events::{NoObserver, read_meta, read_range};
use weldr_storage::{
    AppendObserver, Event, NewEvent, StorageError, Store, StoreOptions, StreamKey,
};

fn ev(i: usize) -> NewEvent {
    NewEvent {
        kind: "text".into(),
        data: format!("{{\"n\":{i}}}"),
    }
}

fn open(path: &std::path::Path, retention: u64) -> Store {
    let opts = StoreOptions {
        event_retention: retention,
        ..StoreOptions::default()
    };
    Store::open(path, opts, Arc::new(NoObserver)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_increase_by_one_and_continue_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let key = StreamKey::new("p1", "b1");
    {
        let store = open(&path, 1000);
        let got = store
            .writer()
            .append(key.clone(), (0..5).map(ev).collect())
            .await
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let store2 = store.clone();
        tokio::task::spawn_blocking(move || store2.close())
            .await
            .unwrap();
    }
    let store = open(&path, 1000);
    let got = store
        .writer()
        .append(key.clone(), vec![ev(5)])
        .await
        .unwrap();
    assert_eq!(got[0].id, 6);
    let rtx = store.begin_read().unwrap();
    let all = read_range(&rtx, &key, 1, u64::MAX, 100).unwrap();
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(all[2].data, "{\"n\":2}");
    // Another stream has its own ids.
    let other = store
        .writer()
        .append(StreamKey::new("p1", "b2"), vec![ev(0)])
        .await
        .unwrap();
    assert_eq!(other[0].id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_unique_gapless_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("s.redb"), 100_000);
    let key = StreamKey::new("p", "b");
    let mut tasks = Vec::new();
    for t in 0..64 {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                ids.push(
                    store
                        .writer()
                        .append(key.clone(), vec![ev(t * 100 + i)])
                        .await
                        .unwrap()[0]
                        .id,
                );
            }
            ids
        }));
    }
    let mut ids: Vec<u64> = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids.sort();
    assert_eq!(ids, (1..=3200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_oldest_and_meta_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("s.redb"), 10);
    let key = StreamKey::new("p", "b");
    store
        .writer()
        .append(key.clone(), (0..25).map(ev).collect())
        .await
        .unwrap();
    let rtx = store.begin_read().unwrap();
    let meta = read_meta(&rtx, &key).unwrap();
    assert_eq!((meta.first_id, meta.last_id()), (16, 25));
    let kept = read_range(&rtx, &key, 1, u64::MAX, 100).unwrap();
    assert_eq!(kept.first().unwrap().id, 16);
    assert_eq!(kept.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_does_not_take_its_batch_down() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("s.redb"), 100);
    let key = StreamKey::new("p", "b");
    let mut tasks = Vec::new();
    for i in 0..40usize {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store
                .writer()
                .write(move |ctx| {
                    let e = ctx.append(&key, ev(i))?;
                    if i % 7 == 3 {
                        return Err(StorageError::Conflict("refused".into()));
                    }
                    Ok(e.id)
                })
                .await
        }));
    }
    let mut ok = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => ok.push(id),
            Err(StorageError::Conflict(_)) => failed += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    ok.sort();
    assert_eq!(failed, 6);
    // Only committed jobs consumed ids: no holes.
    assert_eq!(ok, (1..=34).collect::<Vec<_>>());
    let rtx = store.begin_read().unwrap();
    assert_eq!(read_range(&rtx, &key, 1, u64::MAX, 100).unwrap().len(), 34);
}

struct Recorder(Mutex<Vec<u64>>);
impl AppendObserver for Recorder {
    fn committed(&self, events: &[(StreamKey, Arc<Event>)]) {
        self.0
            .lock()
            .unwrap()
            .extend(events.iter().map(|(_, e)| e.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observer_sees_commits_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
    let store = Store::open(
        &dir.path().join("s.redb"),
        StoreOptions::default(),
        rec.clone(),
    )
    .unwrap();
    let key = StreamKey::new("p", "b");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store.writer().append(key, vec![ev(i)]).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Callers are answered before the observer is told: wait (bounded) for the last batch.
    for _ in 0..500 {
        if rec.0.lock().unwrap().len() >= 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let seen = rec.0.lock().unwrap().clone();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>());
}

#[test]
fn a_second_open_of_the_same_file_says_who_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = open(&path, 10);
    match Store::open(&path, StoreOptions::default(), Arc::new(NoObserver)) {
        Err(StorageError::AlreadyOpen(p)) => assert_eq!(p, path),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened twice"),
    }
}
