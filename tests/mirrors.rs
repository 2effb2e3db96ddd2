//! Upstream mirrors against real servers started by the tests on free ports: a private
//! Postgres (initdb + pg_ctl) and a private redis-server, each stopped and started again.

mod common;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::Value;
use weldr_agent::config::Secret;
use weldr_storage::workflow::{WorkflowRecord, WorkflowStatus, create_workflow, put_workflow};
use weldr_storage::{NewEvent, StreamKey};

async fn server(
    pg: Option<&pg::PrivatePg>,
    redis: Option<String>,
) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.mirror.postgres_url = pg.map(|p| Secret(p.url()));
    config.mirror.redis_url = redis.map(Secret);
    config.mirror.events = true;
    let s = common::start(config).await;
    (dir, s)
}

async fn workflow_row(client: &tokio_postgres::Client) -> (String, Option<String>) {
    let r = client
        .query_one(
            "SELECT status, usage->>'outputTokens' FROM weldr_agent.workflows WHERE workflow_id = 'wf-1'",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

async fn pg_client(pg: &pg::PrivatePg) -> tokio_postgres::Client {
    weldr_agent::pgconn::connect(&pg.url()).await.unwrap()
}

async fn mirrors(s: &TestServer) -> Vec<Value> {
    let (status, body) = s.get_json("/mirrors").await;
    assert_eq!(status, 200, "{body}");
    body["mirrors"].as_array().unwrap().clone()
}

/// Wait until every mirror has acknowledged everything (or fail after `secs`).
async fn caught_up(s: &TestServer, secs: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let m = mirrors(s).await;
        if m.iter()
            .all(|m| m["backlogEntries"] == 0 && m["state"] == "ok")
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "mirrors did not catch up: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn append(s: &TestServer, p: &str, b: &str, n: usize) {
    let stream = StreamKey::new(p, b);
    // In commits of 100, like a busy workflow.
    for chunk in 0..n.div_ceil(100) {
        let events = (0..100.min(n - chunk * 100))
            .map(|i| NewEvent {
                kind: "text".into(),
                data: format!("{{\"n\":{}}}", chunk * 100 + i),
            })
            .collect();
        s.app()
            .store
            .writer()
            .append(stream.clone(), events)
            .await
            .unwrap();
    }
}

/// The ids of a Redis stream, in order.
fn xrange_ids(redis: &redis_server::PrivateRedis, key: &str) -> Vec<u64> {
    redis
        .cli(&["XRANGE", key, "-", "+"])
        .lines()
        .filter(|l| l.ends_with("-1"))
        .map(|l| l.trim_end_matches("-1").parse::<u64>().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_while_both_sinks_are_down_arrive_exactly_once_and_in_order() {
    let pg = pg::PrivatePg::start(None);
    let mut redis = redis_server::PrivateRedis::start(None, None);
    let (_dir, s) = server(Some(&pg), Some(redis.url())).await;
    append(&s, "p", "b", 1_000).await;
    caught_up(&s, 30).await;

    pg.stop();
    redis.stop();
    append(&s, "p", "b", 10_000).await;
    append(&s, "p", "c", 500).await;
    // The agent's own work did not wait; the mirrors say what is wrong.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let m = mirrors(&s).await;
    assert_eq!(m.len(), 2);
    for sink in &m {
        assert_eq!(sink["state"], "retrying", "{sink}");
        assert!(sink["lastError"].as_str().is_some(), "{sink}");
        assert!(sink["backlogEntries"].as_u64().unwrap() > 0, "{sink}");
        assert!(sink["backlogSeconds"].as_f64().unwrap() > 5.0, "{sink}");
    }
    let (_, health) = s.get_json("/health").await;
    let text = health.to_string();
    assert!(
        text.contains("mirror-postgres") && text.contains("mirror-redis"),
        "{text}"
    );

    pg.resume();
    redis.resume();
    let m = caught_up(&s, 120).await;
    assert!(m.iter().all(|m| m["gaps"] == 0));

    for (branch, n) in [("b", 11_000u64), ("c", 500)] {
        let ids = xrange_ids(&redis, &format!("weldr:events:p:{branch}"));
        assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "redis stream {branch}");
        let client = pg_client(&pg).await;
        let row = client
            .query_one(
                "SELECT count(*), min(id), max(id), count(DISTINCT id) FROM weldr_agent.events \
                 WHERE project_id = 'p' AND branch_id = $1",
                &[&branch],
            )
            .await
            .unwrap();
        let (count, min, max, distinct): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            (count, min, max, distinct),
            (n as i64, 1, n as i64, n as i64)
        );
    }
    // The outbox was pruned once both had passed it.
    let bounds = s
        .app()
        .store
        .read(|st: &weldr_storage::Store| {
            let rtx = st.begin_read()?;
            weldr_storage::outbox::bounds(&rtx)
        })
        .await
        .unwrap();
    assert_eq!(bounds.first, bounds.next, "pruned: {bounds:?}");
}

fn workflow(id: &str, status: WorkflowStatus) -> WorkflowRecord {
    WorkflowRecord {
        workflow_id: id.into(),
        project_id: "p".into(),
        branch_id: "b".into(),
        status,
        model: "anthropic:claude".into(),
        user_message: "make it blue".into(),
        plan: None,
        tasks: vec![],
        version: None,
        error: None,
        reply: None,
        input_tokens: 10,
        output_tokens: 20,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cancel_requested: false,
        created_at_ms: 1,
        updated_at_ms: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_workflow_status_changes_appear_upstream() {
    let pg = pg::PrivatePg::start(None);
    let redis = redis_server::PrivateRedis::start(None, None);
    let (_dir, s) = server(Some(&pg), Some(redis.url())).await;
    common::branch(s.app(), "p", "b").await;
    let store = &s.app().store;
    let wf = workflow("wf-1", WorkflowStatus::Planning);
    store
        .writer()
        .write(move |ctx| create_workflow(ctx, &wf))
        .await
        .unwrap();
    caught_up(&s, 30).await;
    let client = pg_client(&pg).await;
    assert_eq!(
        workflow_row(&client).await,
        ("planning".into(), Some("20".into()))
    );
    assert_eq!(
        redis.cli(&["HGET", "weldr:workflow:wf-1", "status"]).trim(),
        "planning"
    );

    let mut wf = workflow("wf-1", WorkflowStatus::Failed);
    wf.error = Some("the model refused".into());
    store
        .writer()
        .write(move |ctx| put_workflow(ctx, &wf))
        .await
        .unwrap();
    caught_up(&s, 30).await;
    assert_eq!(workflow_row(&client).await.0, "failed");
    assert_eq!(
        redis.cli(&["HGET", "weldr:workflow:wf-1", "status"]).trim(),
        "failed"
    );
    assert_eq!(
        redis.cli(&["HGET", "weldr:workflow:wf-1", "error"]).trim(),
        "the model refused"
    );
    // The branch and project records, from the same outbox.
    let row = client
        .query_one(
            "SELECT state FROM weldr_agent.branches WHERE project_id = 'p' AND branch_id = 'b'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "active");
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM weldr_agent.projects WHERE project_id = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // The migrations ran once, under the mirror's schema.
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM weldr_agent.refinery_schema_history",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_is_reported_and_retried_until_it_accepts() {
    let redis = redis_server::PrivateRedis::start(Some("s3cret"), None);
    // The URL has no password: Redis refuses every command.
    let (_dir, s) = server(None, Some(redis.url())).await;
    append(&s, "p", "b", 10).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let sink = loop {
        let m = mirrors(&s).await;
        let health = s.get_json("/health").await.1.to_string();
        if m[0]["state"] == "retrying" && health.contains("NOAUTH") {
            break m[0].clone();
        }
        assert!(Instant::now() < deadline, "no refusal reported: {m:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sink["lastError"].as_str().unwrap().contains("NOAUTH"),
        "{sink}"
    );
    // The operator lifts the password: the next retry gets through.
    redis.cli(&["-a", "s3cret", "CONFIG", "SET", "requirepass", ""]);
    caught_up(&s, 90).await;
    assert_eq!(
        xrange_ids(&redis, "weldr:events:p:b"),
        (1..=10).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_redis_and_postgres_against_a_private_ca() {
    weldr_agent::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pg::make_certs(certs.path(), "localhost");
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = pg::make_certs(other.path(), "localhost");
    let redis = redis_server::PrivateRedis::start(
        None,
        Some(redis_server::RedisTls {
            cert: &cert,
            key: &key,
            ca: &ca,
        }),
    );
    let pg = pg::PrivatePg::start(Some(pg::ServerTls {
        cert: &cert,
        key: &key,
        only_tls: true,
    }));
    let pg_url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.port,
            ca.display()
        )
    };
    let redis_url = format!("rediss://localhost:{}/", redis.port);

    let start = |ca: std::path::PathBuf| {
        let (pg_url, redis_url) = (pg_url(&ca), redis_url.clone());
        async move {
            let dir = tempfile::tempdir().unwrap();
            let mut config = common::config(dir.path());
            config.mirror.postgres_url = Some(Secret(pg_url));
            config.mirror.redis_url = Some(Secret(redis_url));
            config.redis_ca_file = Some(ca);
            config.mirror.events = true;
            (dir, common::start(config).await)
        }
    };
    // The right CA: both mirrors work over TLS.
    let (_d1, s) = start(ca.clone()).await;
    append(&s, "p", "b", 5).await;
    caught_up(&s, 30).await;
    drop(s);

    // Another CA: both refuse, and say it is the certificate.
    let (_d2, s) = start(other_ca).await;
    append(&s, "p", "b", 5).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = mirrors(&s).await;
        if m.iter().all(|m| m["state"] == "retrying") {
            for sink in &m {
                let e = sink["lastError"].as_str().unwrap().to_ascii_lowercase();
                assert!(
                    e.contains("certificate") || e.contains("unknownissuer"),
                    "{sink}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TLS against another CA did not fail: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_backlog_cap_the_oldest_entries_are_dropped_and_the_sink_resyncs() {
    let mut redis = redis_server::PrivateRedis::start(None, None);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.mirror.redis_url = Some(Secret(redis.url()));
    config.mirror.max_backlog = 10;
    let s = common::start(config).await;
    common::branch(s.app(), "p", "b").await;
    caught_up(&s, 30).await;
    redis.stop();
    let wf = workflow("wf-1", WorkflowStatus::Coding);
    s.app()
        .store
        .writer()
        .write(move |ctx| create_workflow(ctx, &wf))
        .await
        .unwrap();
    // 30 commits while the sink is down: the outbox keeps the newest 10 once it retries.
    append(&s, "p", "b", 3_000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while mirrors(&s).await[0]["backlogEntries"].as_u64().unwrap() > 10 {
        assert!(Instant::now() < deadline, "the backlog stayed over the cap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.resume();
    let m = caught_up(&s, 90).await;
    assert_eq!(m[0]["gaps"], 1, "{m:#?}");
    assert!(
        m[0]["lastError"].as_str().unwrap().contains("dropped"),
        "{m:#?}"
    );
    // The gap is recorded upstream, the workflow (dropped with the oldest entries) came back
    // with the resync, and the newest events are there.
    assert!(redis.cli(&["XLEN", "weldr:gaps"]).trim() == "1");
    assert_eq!(
        redis.cli(&["HGET", "weldr:workflow:wf-1", "status"]).trim(),
        "coding"
    );
    let ids = xrange_ids(&redis, "weldr:events:p:b");
    assert_eq!(ids.last(), Some(&3_000));
    assert!(ids.len() < 3_000, "the dropped span is missing upstream");
}
