//! The branch event stream over real HTTP: exact resume, many subscribers, slow readers,
//! retention resets, restarts and graceful shutdown.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_header_and_query_then_live() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p1", "b1").await;
    emit_n(s.app(), "p1", "b1", 10).await;

    let mut by_header = s.sse("/stream/p1/b1", Some("4")).await;
    let mut by_query = s.sse("/stream/p1/b1?lastEventId=7", None).await;
    // The header wins over the query parameter.
    let mut both = s.sse("/stream/p1/b1?lastEventId=2", Some("8")).await;
    emit_n(s.app(), "p1", "b1", 2).await;

    assert_eq!(
        ids(&by_header.read_until(12).await),
        (5..=12).collect::<Vec<_>>()
    );
    assert!(by_header.retry_seen, "a retry hint comes first");
    assert_eq!(
        ids(&by_query.read_until(12).await),
        (8..=12).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(&both.read_until(12).await),
        (9..=12).collect::<Vec<_>>()
    );

    let mut all = s.sse("/stream/p1/b1", Some("0")).await;
    let frames = all.read_until(12).await;
    assert_eq!(ids(&frames), (1..=12).collect::<Vec<_>>());
    let first = &frames[0];
    assert_eq!(first.event, "text");
    assert_eq!(first.data["type"], "text");
    assert_eq!(first.data["id"], 1);
    assert_eq!(first.data["n"], 0);
    assert!(first.data["timestamp"].as_u64().unwrap() > 0);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cursor_means_live_only() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 3).await;
    let mut live = s.sse("/stream/p/b", None).await;
    emit_n(s.app(), "p", "b", 2).await;
    assert_eq!(ids(&live.read_until(5).await), vec![4, 5]);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_server_restart_on_the_same_store() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 5).await;
    let mut client = s.sse("/stream/p/b", Some("0")).await;
    let seen = client.read_until(5).await;
    assert_eq!(ids(&seen), vec![1, 2, 3, 4, 5]);
    s.server.shutdown().await;
    // The stream ends with the shutdown instead of hanging.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), client.next())
            .await
            .unwrap()
            .is_none()
    );

    let s = start(config(tmp.path())).await;
    let more = emit_n(s.app(), "p", "b", 5).await;
    // Shutdown may have recorded its sync of the branch after event 5; ids go on from there.
    assert!(more[0] > 5, "ids continue after a restart: {more:?}");
    assert_eq!(more, (more[0]..more[0] + 5).collect::<Vec<_>>());
    let last = more[4];
    let mut resumed = s.sse("/stream/p/b", Some("3")).await;
    assert_eq!(
        ids(&resumed.read_until(last).await),
        (4..=last).collect::<Vec<_>>()
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_see_identical_sequences_during_concurrent_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 20).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        // Half replay from the start, half from the middle of what exists.
        let cursor = if i % 2 == 0 { "0" } else { "10" };
        clients.push(s.sse("/stream/p/b", Some(cursor)).await);
    }
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let app = s.app().clone();
            tokio::spawn(async move { emit_n(&app, "p", "b", 250).await })
        })
        .collect();
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| tokio::spawn(async move { (i, ids(&c.read_until(1020).await)) }))
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    for r in readers {
        let (i, got) = r.await.unwrap();
        let from = if i % 2 == 0 { 1 } else { 11 };
        assert_eq!(got, (from..=1020).collect::<Vec<_>>(), "subscriber {i}");
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_still_gets_every_event() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    let mut slow = s.sse("/stream/p/b", Some("0")).await;
    let mut fast = s.sse("/stream/p/b", None).await;
    // Far more than the in-memory ring (1024) and the socket buffers hold, with big payloads.
    let big = "x".repeat(2000);
    for i in 0..6000 {
        s.app()
            .base
            .emit(
                &weldr_agent::branches::BranchKey::new("p", "b"),
                "text",
                serde_json::json!({ "n": i, "pad": big }),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        ids(&fast.read_until(6000).await),
        (1..=6000).collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = slow.read_until(6000).await;
    assert_eq!(ids(&got), (1..=6000).collect::<Vec<_>>());
    assert!(got.iter().all(|f| f.event == "text"));
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_gets_an_explicit_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.event_retention = 10;
    let s = start(cfg).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 30).await;
    let mut c = s.sse("/stream/p/b", Some("5")).await;
    let frames = c.read_until(30).await;
    assert_eq!(frames[0].event, "reset");
    assert_eq!(frames[0].id, Some(20));
    assert_eq!(frames[0].data["oldestId"], 21);
    assert_eq!(frames[0].data["reason"], "cursor_expired");
    assert_eq!(ids(&frames[1..]), (21..=30).collect::<Vec<_>>());

    // A cursor from the future (e.g. a replaced store) resets to the head.
    let mut ahead = s.sse("/stream/p/b", Some("500")).await;
    emit_n(s.app(), "p", "b", 1).await;
    let frames = ahead.read_until(31).await;
    assert_eq!(
        (frames[0].event.as_str(), frames[0].id),
        ("reset", Some(30))
    );
    assert_eq!(ids(&frames[1..]), vec![31]);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(s.sse("/stream/p/b", None).await);
    }
    tokio::time::timeout(Duration::from_secs(15), s.server.shutdown())
        .await
        .expect("shutdown hung");
    for mut c in clients {
        assert!(c.next().await.is_none());
    }
}

/// Replays of older events go through shared blocks of encoded frames
/// (`weldr_agent::stream::cache`). Whatever the cache holds, has dropped or is not allowed to
/// hold, every cursor around a block edge gets exactly the events after it, with the same
/// content as a replay straight from redb, and retention still resets old cursors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_through_the_shared_block_cache_are_exact_at_every_block_edge() {
    use weldr_agent::stream::cache::BLOCK;
    const LOG: u64 = 3 * BLOCK + 100;
    let cursors = [
        0,
        1,
        BLOCK - 1,
        BLOCK,
        BLOCK + 1,
        2 * BLOCK - 1,
        2 * BLOCK,
        3 * BLOCK,
        3 * BLOCK + 1,
        LOG - 1,
        LOG,
    ];
    let mut replays = Vec::new();
    // No cache, a cache that holds one block (every other load drops one), the default.
    for cache_bytes in [0, 150 * 1024, 32 << 20] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.event_cache_bytes = cache_bytes;
        let s = start(cfg).await;
        branch(s.app(), "p", "b").await;
        let big = "y".repeat(300);
        for i in 0..LOG {
            s.app()
                .base
                .emit(
                    &weldr_agent::branches::BranchKey::new("p", "b"),
                    "text",
                    serde_json::json!({ "n": i, "pad": big }),
                )
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        // Twice: the second round finds what the first one left in the cache.
        for _ in 0..2 {
            let mut clients = Vec::new();
            for c in cursors {
                clients.push((c, s.sse("/stream/p/b", Some(&c.to_string())).await));
            }
            for (c, mut client) in clients {
                if c == LOG {
                    continue;
                }
                let frames = client.read_until(LOG).await;
                assert_eq!(
                    ids(&frames),
                    (c + 1..=LOG).collect::<Vec<_>>(),
                    "cursor {c}, cache {cache_bytes}"
                );
                let data: Vec<_> = frames.iter().map(|f| f.data.clone()).collect();
                got.push((c, data));
            }
        }
        assert!(
            s.app().bus.frames.bytes() <= cache_bytes,
            "the cache stays within its budget"
        );
        replays.push(got);
        s.server.shutdown().await;
    }
    // Same frames whatever the cache did (timestamps included: each run has its own log, so
    // compare everything but the time).
    let strip = |runs: &Vec<(u64, Vec<serde_json::Value>)>| {
        runs.iter()
            .map(|(c, data)| {
                let data: Vec<_> = data
                    .iter()
                    .map(|d| {
                        let mut d = d.clone();
                        d.as_object_mut().unwrap().remove("timestamp");
                        d
                    })
                    .collect();
                (*c, data)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&replays[0]), strip(&replays[1]));
    assert_eq!(strip(&replays[0]), strip(&replays[2]));

    // Retention: a block that was cached and then trimmed is not served to a cursor before the
    // oldest event kept; that cursor gets a reset, then the rest, exactly once.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    let retention = BLOCK + 10;
    cfg.event_retention = retention;
    let s = start(cfg).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", (2 * BLOCK + 10) as usize).await;
    // Block 1 (ids BLOCK+1..=2*BLOCK) is whole and kept: this replay caches it.
    let mut c = s.sse("/stream/p/b", Some(&BLOCK.to_string())).await;
    assert_eq!(
        ids(&c.read_until(2 * BLOCK + 10).await),
        (BLOCK + 1..=2 * BLOCK + 10).collect::<Vec<_>>()
    );
    assert!(s.app().bus.frames.bytes() > 0, "the block was cached");
    emit_n(s.app(), "p", "b", 300).await;
    let last = 2 * BLOCK + 310;
    let oldest = last - retention + 1;
    for cursor in [BLOCK, BLOCK + 5] {
        let mut c = s.sse("/stream/p/b", Some(&cursor.to_string())).await;
        let frames = c.read_until(last).await;
        assert_eq!(frames[0].event, "reset", "cursor {cursor}");
        assert_eq!(frames[0].data["oldestId"], oldest);
        assert_eq!(ids(&frames[1..]), (oldest..=last).collect::<Vec<_>>());
    }
    s.server.shutdown().await;
}
