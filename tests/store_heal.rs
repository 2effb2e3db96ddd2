//! `/health` while the disk under the store is full: 503 with the reason while the store cannot
//! write, 200 again once space is freed, without a restart, and every acknowledged event is
//! still served in order.
//!
//! The disk is a real one: a small tmpfs for the data directory (the tests run as root).

mod common;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::path::Path;
use std::time::Duration;

use tmpfs::Tmpfs;

/// Fill the disk with a file until writing fails.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 64 << 10];
    while file
        .write_all(&chunk)
        .and_then(|()| file.sync_data())
        .is_ok()
    {}
}

async fn health(s: &common::TestServer) -> (u16, serde_json::Value) {
    let res = reqwest::get(s.url("/health")).await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_disk_is_full_and_200_once_space_is_freed() {
    let workspace = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount("8m");
    let mut config = common::config(workspace.path());
    config.data_dir = disk.path().join("data");
    let s = common::start(config).await;
    common::branch(s.app(), "p", "b").await;
    let (status, body) = health(&s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["store"], "ok");

    let pad = "x".repeat(8 << 10);
    let emit = |n: u64| {
        let app = s.app().clone();
        let pad = pad.clone();
        async move {
            app.base
                .emit(
                    &weldr_agent::branches::BranchKey::new("p", "b"),
                    "text",
                    serde_json::json!({ "n": n, "pad": pad }),
                )
                .await
                .map(|e| e.id)
        }
    };
    let mut acked: Vec<(u64, u64)> = Vec::new();
    for n in 1..=20 {
        acked.push((emit(n).await.unwrap(), n));
    }
    let ballast = disk.path().join("ballast");
    fill(&ballast);
    let mut n = 20;
    loop {
        n += 1;
        assert!(n < 100_000, "the disk never filled up");
        match emit(n).await {
            Ok(id) => acked.push((id, n)),
            Err(_) => break,
        }
        if n % 16 == 0 {
            std::fs::remove_file(&ballast).unwrap();
            fill(&ballast);
        }
    }

    let (status, body) = health(&s).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    let store = body["store"].as_str().unwrap();
    assert!(store.starts_with("cannot write: "), "{body}");
    // Still 503 a while later: the disk is still full.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(health(&s).await.0, 503);

    // Space comes back: 200 again without a restart, and appends work.
    std::fs::remove_file(&ballast).unwrap();
    let mut tries = 0;
    loop {
        let (status, body) = health(&s).await;
        if status == 200 {
            assert_eq!(body["status"], "ok");
            assert_eq!(body["store"], "ok");
            break;
        }
        tries += 1;
        assert!(tries < 100, "the store never wrote again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in 1_000_001..=1_000_003 {
        acked.push((emit(n).await.unwrap(), n));
    }

    // Every acknowledged event is served, in order, with consecutive ids.
    let ids: Vec<u64> = acked.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=acked.len() as u64).collect::<Vec<_>>());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    for (id, n) in &acked {
        let frame = tokio::time::timeout(Duration::from_secs(30), sse.next())
            .await
            .expect("a frame")
            .expect("the stream goes on");
        assert_eq!(frame.id, Some(*id));
        assert_eq!(frame.data["n"], *n);
    }
    drop(sse);
    s.stop().await;
}
