//! The upstream mirrors (`src/mirror`): how far behind they run under load, how fast they catch
//! up after an outage against the naive client a user would write, and what they cost the
//! agent's own appends.
//!
//! Run: `cargo bench --bench mirrors` (about 4 minutes on 2 cores); `BENCH_QUICK=1` for a short
//! smoke run. `BENCH_RUN_SECS` (default 20) sets the load runs, `BENCH_BACKLOG` (default
//! 300,000: a 60 s outage at 5,000 events/s) the outage backlog. Needs the machine's Postgres (`BENCH_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; the mirror writes into a schema of its own,
//! dropped at the end) and `redis-server` (a private one, no persistence, started here).
//!
//! The load: 10 producers, each appending one ~200-byte event to its own branch every 2 ms
//! (5,000 events/s), open loop (latency from each tick's scheduled instant).
//!
//! 1. Lag: the load for `BENCH_RUN_SECS` with both mirrors running (Postgres with
//!    `MIRROR_EVENTS=on`); per upstream batch, from the commit of its first outbox entry to
//!    upstream's acknowledgement (`Mirrors::lags`), p50/p99.
//! 2. Append latency with the mirrors running against without them (store without outbox, no
//!    workers), the same load, alternating, 2 runs each; target: within noise.
//! 3. Catch-up: `BENCH_BACKLOG` events appended while no mirror runs (an outage), then the
//!    workers start; events/s until both have acknowledged everything, against the naive
//!    clients for the same events: one autocommitted `INSERT` per event (prepared) and one
//!    awaited `XADD` per event.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;
use weldr_agent::config::{Config, Secret};
use weldr_agent::mirror::Mirrors;
use weldr_agent::worker::Workers;
use weldr_storage::events::NoObserver;
use weldr_storage::{NewEvent, Store, StoreOptions, StreamKey};

const PRODUCERS: usize = 10;
const PERIOD: Duration = Duration::from_millis(2);
const PAYLOAD: usize = 200;

fn open(dir: &std::path::Path, outbox: bool) -> Store {
    let options = StoreOptions {
        outbox,
        ..StoreOptions::default()
    };
    Store::open(&dir.join("state.redb"), options, Arc::new(NoObserver)).unwrap()
}

fn config(dir: &std::path::Path, pg: &str, schema: &str, redis: &str) -> Config {
    let mut c = Config::for_workspace(dir);
    c.mirror.postgres_url = Some(Secret(pg.into()));
    c.mirror.redis_url = Some(Secret(redis.into()));
    c.mirror.schema = schema.into();
    c.mirror.events = true;
    c
}

/// 5,000 events/s for `window`, open loop; the append latencies, sorted.
async fn drive(store: &Store, window: Duration) -> Vec<Duration> {
    let data = format!("{{\"text\":\"{}\"}}", "x".repeat(PAYLOAD - 11));
    open_loop_appends(store, window, PRODUCERS, PERIOD, &data)
        .await
        .0
}

async fn wait_caught_up(mirrors: &Mirrors, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let s = mirrors.status().await.unwrap();
        if s.iter().all(|m| m.backlog_entries == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "mirrors did not catch up: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    weldr_agent::install_crypto_provider();
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let run = Duration::from_secs(env_num("BENCH_RUN_SECS", if quick { 4 } else { 20 }) as u64);
    let backlog = env_num("BENCH_BACKLOG", if quick { 10_000 } else { 300_000 });
    let pg_url = std::env::var("BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("bench_mirror_{}", std::process::id());
    let redis = Redis::start(false);
    let redis_url = format!("redis://127.0.0.1:{}/", redis.port);
    let admin = weldr_agent::pgconn::connect(&pg_url)
        .await
        .expect("BENCH_PG_URL");
    let mut out = String::from("## Mirrors\n\n");

    // 1 + 2: lag under load, and the appends with and without the mirrors.
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut lags_pg = Vec::new();
    let mut lags_redis = Vec::new();
    for round in 0..2 {
        for on in [round == 0, round != 0] {
            let dir = tempfile::tempdir_in(".").unwrap();
            let store = open(dir.path(), on);
            if !on {
                without.extend(drive(&store, run).await);
                continue;
            }
            let cfg = config(dir.path(), &pg_url, &schema, &redis_url);
            let mirrors = Mirrors::new(&cfg, store.clone()).unwrap().unwrap();
            let workers = Workers::new(CancellationToken::new());
            for w in mirrors.take_workers() {
                workers.spawn(w);
            }
            with.extend(drive(&store, run).await);
            wait_caught_up(&mirrors, Duration::from_secs(120)).await;
            lags_pg.extend(mirrors.lags("postgres"));
            lags_redis.extend(mirrors.lags("redis"));
            workers.join(Duration::from_secs(10)).await;
            eprintln!("round {round}: load with mirrors done");
        }
    }
    with.sort();
    without.sort();
    lags_pg.sort();
    lags_redis.sort();
    out.push_str(&format!(
        "Load: 5,000 events/s for {} s per run, 2 runs each (Postgres with `MIRROR_EVENTS=on`).\n\n\
         | | p50 | p99 | batches |\n|---|---|---|---|\n\
         | Postgres lag (commit → acknowledged) | {} ms | {} ms | {} |\n\
         | Redis lag (commit → acknowledged) | {} ms | {} ms | {} |\n\n",
        run.as_secs(),
        pct(&lags_pg, 0.5),
        pct(&lags_pg, 0.99),
        lags_pg.len(),
        pct(&lags_redis, 0.5),
        pct(&lags_redis, 0.99),
        lags_redis.len(),
    ));
    let (p99_on, p99_off) = (ms(percentile(&with, 0.99)), ms(percentile(&without, 0.99)));
    out.push_str(&format!(
        "| append latency | p50 | p99 | p99.9 |\n|---|---|---|---|\n\
         | mirrors off | {:.2} ms | {:.2} ms | {:.2} ms |\n\
         | mirrors on | {:.2} ms | {:.2} ms | {:.2} ms |\n\n\
         Append p99 on ÷ off: **{:.2}×** (target: within noise).\n\n",
        ms(percentile(&without, 0.5)),
        p99_off,
        ms(percentile(&without, 0.999)),
        ms(percentile(&with, 0.5)),
        p99_on,
        ms(percentile(&with, 0.999)),
        p99_on / p99_off.max(1e-9),
    ));

    // 3: catch-up after an outage, against the naive clients.
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = open(dir.path(), true);
    let data = format!("{{\"text\":\"{}\"}}", "x".repeat(PAYLOAD - 11));
    let mut pending = Vec::new();
    for i in 0..backlog.div_ceil(100) {
        let stream = StreamKey::new("q", &format!("b{}", i % PRODUCERS));
        let events: Vec<NewEvent> = (0..100.min(backlog - i * 100))
            .map(|_| NewEvent {
                kind: "bench".into(),
                data: data.clone(),
            })
            .collect();
        let store = store.clone();
        pending.push(tokio::spawn(async move {
            store.writer().append(stream, events).await.unwrap()
        }));
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let cfg = config(dir.path(), &pg_url, &format!("{schema}_b"), &redis_url);
    let mirrors = Mirrors::new(&cfg, store.clone()).unwrap().unwrap();
    let workers = Workers::new(CancellationToken::new());
    let started = Instant::now();
    for w in mirrors.take_workers() {
        workers.spawn(w);
    }
    wait_caught_up(&mirrors, Duration::from_secs(600)).await;
    let ours = started.elapsed();
    workers.join(Duration::from_secs(10)).await;
    eprintln!("catch-up done in {ours:?}");

    // The naive clients, the same events.
    admin
        .batch_execute(&format!(
            "CREATE TABLE {schema}_naive (project_id text, branch_id text, id bigint, type text, data jsonb, at timestamptz, PRIMARY KEY (project_id, branch_id, id))"
        ))
        .await
        .unwrap();
    let insert = admin
        .prepare(&format!(
            "INSERT INTO {schema}_naive VALUES ($1, $2, $3, $4, $5::text::jsonb, to_timestamp($6::int8 / 1000.0))"
        ))
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..backlog {
        let (p, b, id, at) = ("q", format!("b{}", i % PRODUCERS), i as i64, 0i64);
        admin
            .execute(&insert, &[&p, &b, &id, &"bench", &data, &at])
            .await
            .unwrap();
    }
    let naive_pg = t.elapsed();
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let t = Instant::now();
    for i in 0..backlog {
        let key = format!("naive:{}", i % PRODUCERS);
        redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("type")
            .arg("bench")
            .arg("data")
            .arg(&data)
            .query_async::<String>(&mut con)
            .await
            .unwrap();
    }
    let naive_redis = t.elapsed();
    let rate = |d: Duration| backlog as f64 / d.as_secs_f64();
    let naive_both = naive_pg + naive_redis;
    out.push_str(&format!(
        "Catch-up after an outage: {backlog} events waiting ({} commits of 100, 60 s of the load above at the default).\n\n\
         | | time | events/s |\n|---|---|---|\n\
         | our mirrors, Postgres and Redis together | {:.2} s | {:.0} |\n\
         | naive: one `INSERT` per event | {:.2} s | {:.0} |\n\
         | naive: one `XADD` per event | {:.2} s | {:.0} |\n\n\
         Catch-up ÷ the naive clients one after the other: **{:.1}×** faster.\n",
        backlog.div_ceil(100),
        ours.as_secs_f64(),
        rate(ours),
        naive_pg.as_secs_f64(),
        rate(naive_pg),
        naive_redis.as_secs_f64(),
        rate(naive_redis),
        naive_both.as_secs_f64() / ours.as_secs_f64(),
    ));
    for s in [schema.clone(), format!("{schema}_b")] {
        let _ = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE"))
            .await;
    }
    let _ = admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {schema}_naive"))
        .await;
    println!("{out}");
}
