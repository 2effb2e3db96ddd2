//! The background workers: every one is listed in `/health` with its state, recovery finishes,
//! and a shutdown joins them all (none is left running behind a stopped server).

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn workers_show_in_health_and_are_joined_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.eviction_interval = Duration::from_secs(3600);
    let s = start(config).await;

    // Recovery has nothing to resume and discovery nothing to find: each runs once and is done.
    let mut health = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, h) = s.get_json("/health").await;
        assert_eq!(status, 200, "{h}");
        health = h;
        let done = |name: &str| {
            health["workers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["name"] == name && w["state"] == "done")
        };
        if done("recovery") && done("discover") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workers = health["workers"].as_array().expect("workers in /health");
    let by_name = |name: &str| {
        workers
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no {name} worker in {health}"))
    };
    assert_eq!(by_name("recovery")["state"], "done", "{health}");
    // Object storage was listed for branches this machine does not know: none here.
    assert_eq!(by_name("discover")["state"], "done", "{health}");
    assert_eq!(by_name("discover")["errors"], 0, "{health}");
    for name in ["syncer", "evictor"] {
        let w = by_name(name);
        assert!(
            ["idle", "busy"].contains(&w["state"].as_str().unwrap()),
            "{name}: {w}"
        );
        assert_eq!(w["errors"], 0, "{name}: {w}");
        assert!(w["lastError"].is_null(), "{name}: {w}");
    }
    assert!(
        by_name("syncer")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("dirty")),
        "{health}"
    );

    let app = s.app().clone();
    s.stop().await;
    // Joined: every worker has ended, none was left behind the stopped server.
    for w in app.workers.status() {
        assert_eq!(
            w.state, "done",
            "{} still {} after shutdown",
            w.name, w.state
        );
    }
}
