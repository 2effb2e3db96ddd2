//! The workflow engine, through the release binary, with the replay provider (no network):
//!
//! 1. Engine overhead per tool-call round trip: a workflow of N = 200 model turns that each
//!    call a cheap tool (`list_dir`), against the same plan and tasks with no tool turns,
//!    interleaved.
//!    (T(N) − T(0)) / N is what one round trip costs — replayed model turn, persisted turn,
//!    tool run, persisted result, events streamed to a subscriber — with the model's own
//!    latency taken out. A real model answers in hundreds of milliseconds, so this is the part
//!    the engine adds.
//! 2. 50 workflows triggered at once on 50 branches (10 `write_file` turns each, then a version
//!    commit): time until all 50 ended, throughput, and the server's peak RSS, with the default
//!    `WORKFLOW_CONCURRENCY` (4) and with 50.
//!
//! Run: `cargo bench --bench workflow` (or `scripts/bench.sh workflow`). Prints Markdown.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

const REPEATS: usize = 5;
const ROUND_TRIPS: usize = 200;
/// Tool turns per task (the engine bounds a task attempt at 25 model steps).
const TURNS_PER_TASK: usize = 20;
const CONCURRENT: usize = 50;
const WRITES_PER_WORKFLOW: usize = 10;

struct Server {
    child: Child,
    port: u16,
    http: reqwest::Client,
    _ws: tempfile::TempDir,
}

impl Server {
    /// The server, playing replay transcripts from `scripts` (`REPLAY_DIR`).
    fn start(concurrency: usize, scripts: &Path) -> Server {
        let ws = tempfile::tempdir().unwrap();
        let token = {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let app =
                    weldr_agent::App::open(weldr_agent::config::Config::for_workspace(ws.path()))
                        .unwrap();
                token_then_close(&app).await
            })
        };
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_weldr-agent"))
            .arg("serve")
            .env("WELDR_MODE", "local")
            .env("WORKSPACE_BASE", ws.path())
            .env("PORT", port.to_string())
            .env("LOG_LEVEL", "warn")
            .env("WORKFLOW_CONCURRENCY", concurrency.to_string())
            .env("TRIGGER_RATE_PER_MINUTE", "100000")
            .env("REPLAY_DIR", scripts)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_healthy(port, Duration::from_secs(30)).expect("server did not start");
        weldr_agent::install_crypto_provider();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap();
        Server {
            child,
            port,
            http,
            _ws: ws,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let res = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        res.json().await.unwrap()
    }

    async fn branch(&self, branch: &str) {
        self.post("/projects/p/branches", json!({"branchId": branch}))
            .await;
    }

    /// Trigger on `branch` and wait for the workflow's `end` on the branch stream (read from
    /// the start, so nothing is missed): the time from the trigger to the end.
    async fn run(&self, branch: &str, model: &str) -> Duration {
        let started = Instant::now();
        let body = self
            .post(
                "/trigger",
                json!({"projectId": "p", "branchId": branch, "model": model,
                       "message": {"content": [{"type": "text", "text": "bench"}]}}),
            )
            .await;
        let wf = body["workflowId"].as_str().unwrap().to_string();
        let res = self
            .http
            .get(self.url(&format!("/stream/p/{branch}")))
            .header("Last-Event-ID", "0")
            .send()
            .await
            .unwrap();
        let mut stream = res.bytes_stream();
        let mut buf = Vec::new();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(300), stream.next())
                .await
                .expect("no end within 300 s")
                .expect("stream ended")
                .unwrap();
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..pos + 2).collect();
                let frame = String::from_utf8_lossy(&frame);
                if frame.contains("event: end\n") && frame.contains(&wf) {
                    assert!(
                        frame.contains("\"status\":\"complete\""),
                        "workflow did not complete: {frame}"
                    );
                    return started.elapsed();
                }
            }
        }
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn plan(tasks: usize) -> Value {
    let tasks: Vec<Value> = (1..=tasks)
        .map(|id| {
            json!({"id": id, "summary": format!("task {id}"), "description": "bench",
                   "acceptanceCriteria": ["done"], "dependencies": []})
        })
        .collect();
    json!([{"type": "tool_call", "id": "plan", "name": "submit_plan",
            "input": {"acceptanceCriteria": ["done"], "tasks": tasks}}])
}

fn done(id: String) -> Value {
    json!([{"type": "tool_call", "id": id, "name": "done", "input": {}}])
}

/// `tasks` tasks of `turns_per_task` turns that each call `list_dir`, each task then `done`.
fn overhead_transcript(tasks: usize, turns_per_task: usize) -> Value {
    let mut turns = vec![plan(tasks)];
    for t in 0..tasks {
        for i in 0..turns_per_task {
            turns.push(json!([
                {"type": "text", "text": "Looking."},
                {"type": "tool_call", "id": format!("t{t}c{i}"), "name": "list_dir", "input": {}}
            ]));
        }
        turns.push(done(format!("t{t}done")));
    }
    Value::Array(turns)
}

fn writes_transcript() -> Value {
    let mut turns = vec![plan(1)];
    for i in 0..WRITES_PER_WORKFLOW {
        turns.push(json!([
            {"type": "text", "text": format!("Writing file {i}.")},
            {"type": "tool_call", "id": format!("w{i}"), "name": "write_file",
             "input": {"filePath": format!("src/file{i}.txt"), "content": "x".repeat(1024)}}
        ]));
    }
    turns.push(done("done".into()));
    Value::Array(turns)
}

fn model(dir: &Path, name: &str, turns: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(turns).unwrap()).unwrap();
    format!("replay:{}", path.display())
}

fn bench_overhead(rt: &tokio::runtime::Runtime, scripts: &Path) {
    let tasks = ROUND_TRIPS / TURNS_PER_TASK;
    let none = model(scripts, "none.json", &overhead_transcript(tasks, 0));
    let many = model(
        scripts,
        "many.json",
        &overhead_transcript(tasks, TURNS_PER_TASK),
    );
    let server = Server::start(4, scripts);
    let (mut t0, mut tn, mut per_call) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        server.post("/projects", json!({"projectId": "p"})).await;
        for r in 0..REPEATS {
            let (a, b) = (format!("none{r}"), format!("many{r}"));
            server.branch(&a).await;
            server.branch(&b).await;
            let base = server.run(&a, &none).await;
            let full = server.run(&b, &many).await;
            t0.push(ms(base));
            tn.push(ms(full));
            per_call.push((ms(full) - ms(base)) / ROUND_TRIPS as f64);
        }
    });
    println!(
        "\n### Engine overhead per tool-call round trip ({REPEATS} runs, interleaved)\n\n\
         | workflow | time (ms), median (min–max) |\n|---|---|\n\
         | plan + {} tasks, no tool turns | {} |\n\
         | plan + {} tasks, {ROUND_TRIPS} `list_dir` turns | {} |\n\
         | **per round trip** (replayed turn, persisted turn, tool, persisted result, events streamed) | **{}** |",
        ROUND_TRIPS / TURNS_PER_TASK,
        fmt(&t0, 1),
        ROUND_TRIPS / TURNS_PER_TASK,
        fmt(&tn, 1),
        fmt(&per_call, 3),
    );
}

fn bench_concurrent(rt: &tokio::runtime::Runtime, scripts: &Path) {
    let model = model(scripts, "writes.json", &writes_transcript());
    println!(
        "\n### {CONCURRENT} workflows at once on {CONCURRENT} branches \
         ({WRITES_PER_WORKFLOW} `write_file` turns and a version commit each; 3 runs)\n\n\
         | WORKFLOW_CONCURRENCY | all ended (s) | workflows/s | tool calls/s | peak RSS (MiB) |\n\
         |---|---|---|---|---|"
    );
    for concurrency in [4, CONCURRENT] {
        let (mut total, mut wps, mut cps, mut rss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            let server = Server::start(concurrency, scripts);
            let elapsed = rt.block_on(async {
                server.post("/projects", json!({"projectId": "p"})).await;
                for b in 0..CONCURRENT {
                    server.branch(&format!("b{b}")).await;
                }
                let started = Instant::now();
                let runs: Vec<_> = (0..CONCURRENT)
                    .map(|b| server.run_owned(format!("b{b}"), model.clone()))
                    .collect();
                futures_util::future::join_all(runs).await;
                started.elapsed()
            });
            let secs = elapsed.as_secs_f64();
            total.push(secs);
            wps.push(CONCURRENT as f64 / secs);
            cps.push((CONCURRENT * (WRITES_PER_WORKFLOW + 2)) as f64 / secs);
            rss.push(server.peak_rss_kib() as f64 / 1024.0);
        }
        println!(
            "| {concurrency} | {} | {} | {} | {} |",
            fmt(&total, 2),
            fmt(&wps, 1),
            fmt(&cps, 0),
            fmt(&rss, 1)
        );
    }
}

impl Server {
    async fn run_owned(&self, branch: String, model: String) -> Duration {
        self.run(&branch, &model).await
    }
}

fn main() {
    let scripts = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "overhead" {
        bench_overhead(&rt, scripts.path());
    }
    if only.is_empty() || only == "concurrent" {
        bench_concurrent(&rt, scripts.path());
    }
}
