//! The mirrors' outbox: one entry per commit that touches what mirrors carry, in one gapless
//! global sequence; batches resolve keys to the snapshot's values; cursors prune; the cap
//! drops the oldest and the sink behind sees the gap.

use std::sync::Arc;

use weldr_storage::events::NoObserver;
use weldr_storage::model::ProjectRecord;
use weldr_storage::outbox::{self, Change};
use weldr_storage::record::encode;
use weldr_storage::tables::{PROJECTS, SESSIONS};
use weldr_storage::{NewEvent, Store, StoreOptions, StreamKey};

fn open(path: &std::path::Path, outbox: bool) -> Store {
    let options = StoreOptions {
        outbox,
        ..StoreOptions::default()
    };
    Store::open(path, options, Arc::new(NoObserver)).unwrap()
}

fn event(n: u32) -> NewEvent {
    NewEvent {
        kind: "text".into(),
        data: format!("{{\"n\":{n}}}"),
    }
}

async fn project(store: &Store, id: &'static str, title: &'static str) {
    let record = ProjectRecord {
        project_id: id.into(),
        title: Some(title.into()),
        owner: None,
        created_at_ms: 1,
    };
    store
        .writer()
        .write(move |ctx| {
            ctx.table(PROJECTS)?
                .insert(id, encode(&record).as_slice())?;
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_name_what_commits_changed_and_cursors_prune_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("state.redb"), true);
    let stream = StreamKey::new("p", "b");
    store
        .writer()
        .append(stream.clone(), vec![event(1), event(2)])
        .await
        .unwrap();
    // Not mirrored: no entry.
    store
        .writer()
        .write(|ctx| {
            ctx.table(SESSIONS)?.insert("s", &b"x"[..])?;
            Ok(())
        })
        .await
        .unwrap();
    store
        .writer()
        .append(stream.clone(), vec![event(3)])
        .await
        .unwrap();

    let rtx = store.begin_read().unwrap();
    let bounds = outbox::bounds(&rtx).unwrap();
    assert_eq!(
        (bounds.first, bounds.next),
        (1, 3),
        "two entries: {bounds:?}"
    );
    let batch = outbox::read_batch(&rtx, 0, 100, 100).unwrap().unwrap();
    assert_eq!(batch.last_seq, 2);
    assert!(batch.gap.is_none());
    assert_eq!(batch.events.len(), 1);
    let ids: Vec<u64> = batch.events[0].1.iter().map(|e| e.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert!(outbox::read_batch(&rtx, 2, 100, 100).unwrap().is_none());
    drop(rtx);

    // A record's entry carries its key; the batch holds the value as the snapshot has it.
    project(&store, "p1", "first").await;
    project(&store, "p1", "second").await;
    let rtx = store.begin_read().unwrap();
    let batch = outbox::read_batch(&rtx, 2, 100, 100).unwrap().unwrap();
    assert_eq!(batch.entries, 2);
    assert_eq!(batch.changes.len(), 1, "one key, once");
    match &batch.changes[0] {
        Change::Project { project_id, record } => {
            assert_eq!(project_id, "p1");
            assert_eq!(record.as_ref().unwrap().title.as_deref(), Some("second"));
        }
        other => panic!("{other:?}"),
    }
    drop(rtx);

    // Two sinks: entries go once both have passed them.
    let sinks = ["a", "b"];
    store
        .writer()
        .write(move |ctx| outbox::advance(ctx, "a", 4, &sinks, 1000))
        .await
        .unwrap();
    let rtx = store.begin_read().unwrap();
    assert_eq!(
        outbox::bounds(&rtx).unwrap().first,
        1,
        "b has passed nothing"
    );
    drop(rtx);
    let advanced = store
        .writer()
        .write(move |ctx| outbox::advance(ctx, "b", 2, &sinks, 1000))
        .await
        .unwrap();
    assert_eq!(advanced.pruned, 2);
    let rtx = store.begin_read().unwrap();
    assert_eq!(
        outbox::bounds(&rtx).unwrap(),
        outbox::Bounds { first: 3, next: 5 }
    );
    assert_eq!(outbox::cursor(&rtx, "a").unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_the_oldest_are_dropped_and_the_reader_sees_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("state.redb"), true);
    let stream = StreamKey::new("p", "b");
    for i in 0..20 {
        store
            .writer()
            .append(stream.clone(), vec![event(i)])
            .await
            .unwrap();
    }
    let dropped = store
        .writer()
        .write(|ctx| outbox::enforce_cap(ctx, 5))
        .await
        .unwrap();
    assert_eq!(dropped, 15);
    let rtx = store.begin_read().unwrap();
    let batch = outbox::read_batch(&rtx, 0, 100, 100).unwrap().unwrap();
    assert_eq!(batch.gap, Some((1, 15)));
    assert_eq!(batch.last_seq, 20);
    let ids: Vec<u64> = batch.events[0].1.iter().map(|e| e.id).collect();
    assert_eq!(ids, (16..=20).collect::<Vec<_>>());
    let mut records = Vec::new();
    outbox::all_records(&rtx, &mut |c| {
        records.push(c);
        Ok(())
    })
    .unwrap();
    assert!(records.iter().all(|c| !matches!(c, Change::Project { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mirrors_nothing_is_written_and_numbers_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let store = open(&path, false);
        store
            .writer()
            .append(StreamKey::new("p", "b"), vec![event(1)])
            .await
            .unwrap();
        let rtx = store.begin_read().unwrap();
        assert_eq!(
            outbox::bounds(&rtx).unwrap(),
            outbox::Bounds { first: 1, next: 1 }
        );
    }
    {
        let store = open(&path, true);
        for i in 0..3 {
            store
                .writer()
                .append(StreamKey::new("p", "b"), vec![event(i)])
                .await
                .unwrap();
        }
        let sinks = ["a"];
        store
            .writer()
            .write(move |ctx| outbox::advance(ctx, "a", 3, &sinks, 100))
            .await
            .unwrap();
    }
    // Reopened: the sequence goes on after the pruned entries (no number is used twice).
    let store = open(&path, true);
    store
        .writer()
        .append(StreamKey::new("p", "b"), vec![event(9)])
        .await
        .unwrap();
    let rtx = store.begin_read().unwrap();
    assert_eq!(
        outbox::bounds(&rtx).unwrap(),
        outbox::Bounds { first: 4, next: 5 }
    );
    let batch = outbox::read_batch(&rtx, 3, 10, 10).unwrap().unwrap();
    assert_eq!(batch.events[0].1[0].id, 5);
}
