//! The real binary: SIGKILL of the agent while its mirrors catch up (between an upstream write
//! and the cursor's write, among other points) leaves no duplicate and no hole upstream.

use std::time::{Duration, Instant};

#[path = "common/binary.rs"]
mod binary;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/redis.rs"]
mod redis_server;

use binary::{cli, free_port, run_ok, serve_with, sigkill};

fn xlen(redis: &redis_server::PrivateRedis) -> u64 {
    redis
        .cli(&["XLEN", "weldr:events:p:b"])
        .trim()
        .parse()
        .unwrap_or(0)
}

fn pg_count(pg: &pg::PrivatePg) -> i64 {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-tAc",
            "SELECT count(*) FROM weldr_agent.events WHERE project_id = 'p' AND branch_id = 'b'",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-1)
}

#[test]
fn sigkill_while_mirroring_leaves_no_duplicate_upstream() {
    let pg = pg::PrivatePg::start(None);
    let mut redis = redis_server::PrivateRedis::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let port = free_port();
    let (pg_url, redis_url) = (pg.url(), redis.url());
    let env = [
        ("DATABASE_URL", pg_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("MIRROR_EVENTS", "on"),
        ("STORE_BACKUP", "off"),
    ];
    let mut server = serve_with(ws, port, &env);
    run_ok(cli(ws).args(["branch", "create", "p", "b"]));

    // Both sinks down while 10,000 events are appended.
    pg.stop();
    redis.stop();
    run_ok(cli(ws).args([
        "events", "append", "p", "b", "--type", "tick", "--count", "10000",
    ]));
    pg.resume();
    redis.resume();

    // Kill the agent again and again while the mirrors catch up.
    let mut kills = 0;
    for pause_ms in [30u64, 60, 20, 90, 40, 120, 50, 200] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        sigkill(&mut server);
        eprintln!(
            "kill {kills}: redis {} postgres {}",
            xlen(&redis),
            pg_count(&pg)
        );
        kills += 1;
        server = serve_with(ws, port, &env);
        if xlen(&redis) >= 10_000 && pg_count(&pg) >= 10_000 {
            break;
        }
    }
    assert!(kills > 0);

    // Every event of the agent's own log arrives once.
    let listed = run_ok(cli(ws).args(["events", "list", "p", "b", "--limit", "20000"]));
    let stored: Vec<u64> = listed
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let n = stored.len() as u64;
    assert!(n >= 10_000, "{n} events stored");
    let deadline = Instant::now() + Duration::from_secs(120);
    while xlen(&redis) < n || pg_count(&pg) < n as i64 {
        assert!(
            Instant::now() < deadline,
            "mirrors did not catch up: redis {} postgres {} of {n}",
            xlen(&redis),
            pg_count(&pg)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Give a duplicate the time to show up, then count exactly.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(xlen(&redis), n, "redis holds each event once");
    assert_eq!(pg_count(&pg), n as i64, "postgres holds each event once");
    let ids: Vec<u64> = redis
        .cli(&["XRANGE", "weldr:events:p:b", "-", "+"])
        .lines()
        .filter(|l| l.ends_with("-1"))
        .map(|l| l.trim_end_matches("-1").parse().unwrap())
        .collect();
    assert_eq!(ids, stored, "redis holds the log's ids, in order");
    sigkill(&mut server);
}
