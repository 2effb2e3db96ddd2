//! The workflow engine over the real API with the replay provider: the event sequence on the
//! branch stream, files on disk, the git commit, 409 while busy, replies without a plan, plan
//! validation, cancel, provider errors, and recovery after a stop mid-workflow.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use weldr_agent::llm::ToolSpec;
use weldr_agent::workflow::tools::{BranchTools, Tools};

fn transcript(dir: &Path, name: &str, turns: Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&turns).unwrap()).unwrap();
    format!("replay:{}", path.display())
}

/// The test config, with the workspace as `REPLAY_DIR` (where the transcripts are written).
fn replay_config(dir: &Path) -> weldr_agent::Config {
    let mut config = config(dir);
    config.providers.replay_dir = Some(dir.to_path_buf());
    config
}

fn plan_turn(id: &str, deps: Value) -> Value {
    json!([
        {"type": "reasoning", "text": "Let me look at the project first."},
        {"type": "tool_call", "id": id, "name": "submit_plan", "input": {
            "acceptanceCriteria": ["hello.txt says hello"],
            "tasks": [
                {"id": 1, "summary": "write hello", "description": "create hello.txt",
                 "acceptanceCriteria": ["exists"], "dependencies": deps}
            ]
        }}
    ])
}

fn happy_turns() -> Value {
    json!([
        [
            {"type": "text", "text": "I will read the tree, then plan."},
            {"type": "tool_call", "id": "c1", "name": "list_dir", "input": {}}
        ],
        plan_turn("c2", json!([])),
        [
            {"type": "text", "text": "Writing the file now."},
            {"type": "tool_call", "id": "c3", "name": "write_file",
             "input": {"filePath": "hello.txt", "content": "hello\n"}}
        ],
        [{"type": "tool_call", "id": "c4", "name": "done", "input": {"summary": "wrote it"}}]
    ])
}

async fn setup(name: &str) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let s = start(replay_config(dir.path())).await;
    create_branch(&s, name).await;
    (dir, s)
}

async fn create_branch(s: &TestServer, name: &str) {
    let res = s
        .http
        .post(s.url("/projects"))
        .json(&json!({"projectId": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{name}: create project");
    let res = s
        .http
        .post(s.url("/projects/p/branches"))
        .json(&json!({"branchId": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{name}: create branch");
}

async fn trigger(s: &TestServer, text: &str, model: &str) -> reqwest::Response {
    s.http
        .post(s.url("/trigger"))
        .json(&json!({"projectId": "p", "branchId": "b",
                      "message": {"content": [{"type": "text", "text": text}]},
                      "model": model}))
        .send()
        .await
        .unwrap()
}

async fn started(s: &TestServer, model: &str) -> String {
    let res = trigger(s, "say hello", model).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["streamUrl"], "/stream/p/b");
    body["workflowId"].as_str().unwrap().to_string()
}

fn statuses(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.event == "status")
        .map(|f| f.data["status"].as_str().unwrap().to_string())
        .collect()
}

fn assert_consecutive(frames: &[Frame]) {
    let ids = ids(frames);
    for w in ids.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ids {ids:?}");
    }
}

#[tokio::test]
async fn trigger_plan_code_version_end() {
    let (dir, s) = setup("happy").await;
    let model = transcript(dir.path(), "t.json", happy_turns());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_consecutive(&frames);
    assert_eq!(
        statuses(&frames),
        ["pending", "planning", "coding", "deploying", "complete"]
    );
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    for k in [
        "text",
        "reasoning",
        "tool-call",
        "tool-result",
        "plan",
        "task",
        "version",
        "end",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let text: String = frames
        .iter()
        .filter(|f| f.event == "text")
        .map(|f| f.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        "I will read the tree, then plan.Writing the file now."
    );
    let tasks: Vec<&str> = frames
        .iter()
        .filter(|f| f.event == "task")
        .map(|f| f.data["status"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["in_progress", "completed"]);
    // The version comes after deploying and before complete.
    let pos = |k: &str, st: Option<&str>| {
        frames
            .iter()
            .position(|f| f.event == k && st.is_none_or(|st| f.data["status"] == st))
            .unwrap()
    };
    assert!(pos("status", Some("deploying")) < pos("version", None));
    assert!(pos("version", None) < pos("status", Some("complete")));
    // The snapshot was pushed before the workflow completed.
    assert!(pos("sync", None) < pos("status", Some("complete")));
    let end = frames.last().unwrap();
    assert!(end.data["snapshotId"].is_string(), "{:?}", end.data);
    let branch_dir = dir.path().join("p").join("b");
    let on_disk = std::fs::read_to_string(s.app().config.workspace_base.join("p/b/hello.txt"))
        .or_else(|_| std::fs::read_to_string(branch_dir.join("hello.txt")))
        .unwrap();
    assert_eq!(on_disk, "hello\n");
    let w = s.workflow(&wf).await;
    assert_eq!(w["status"], "complete");
    assert_eq!(w["tasks"][0]["status"], "completed");
    assert_eq!(w["plan"]["tasks"][0]["summary"], "write hello");
    let version = w["versionId"].as_str().unwrap().to_string();
    let versions: Value = s
        .http
        .get(s.url("/projects/p/branches/b/versions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = versions.to_string();
    assert!(
        text.contains("hello.txt") && text.contains("say hello"),
        "{text}"
    );
    let wd = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    let log = std::process::Command::new("git")
        .args(["log", "--format=%s", "-1"])
        .current_dir(&wd)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&log.stdout).trim(), "say hello");
    assert!(!version.is_empty());
    // The branch is free again.
    let again = trigger(&s, "again", &model).await;
    assert_eq!(again.status(), 202);
}

#[tokio::test]
async fn second_trigger_is_409_while_active_and_bad_input_is_400() {
    let (dir, s) = setup("busy").await;
    let gate = Arc::new(Gate::default());
    s.app().workflows.set_tools(gate.clone());
    let model = transcript(dir.path(), "t.json", happy_turns());
    let wf = started(&s, &model).await;
    let res = trigger(&s, "another", &model).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "branch_busy");
    assert_eq!(body["error"]["details"]["workflowId"], wf);
    for bad in [
        json!({"projectId": "p", "branchId": "../b", "message": {"content": [{"type": "text", "text": "x"}]}}),
        json!({"projectId": "p", "branchId": "b", "message": {"content": [{"type": "text", "text": "  "}]}}),
        json!({"projectId": "p", "branchId": "b", "message": {"content": [{"type": "text", "text": "x".repeat(100_001)}]}}),
        json!({"projectId": "p", "branchId": "b", "message": {"content": [{"type": "text", "text": "x"}]}, "model": "nope"}),
    ] {
        let res = s
            .http
            .post(s.url("/trigger"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }
    gate.open();
}

/// Tools that count executions per call id and hold `block` until opened.
#[derive(Default)]
struct Gate {
    runs: Mutex<HashMap<String, usize>>,
    opened: tokio::sync::Notify,
    is_open: std::sync::atomic::AtomicBool,
    block: Mutex<Option<String>>,
    /// Never return the blocked call (the server is stopped meanwhile).
    forever: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn open(&self) {
        self.is_open
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.opened.notify_waiters();
    }
}

#[async_trait::async_trait]
impl Tools for Gate {
    fn specs(&self) -> Vec<ToolSpec> {
        BranchTools::default().specs()
    }
    async fn execute(&self, dir: &Path, name: &str, input: &Value) -> (String, bool) {
        let key = format!("{name}:{}", input);
        *self.runs.lock().unwrap().entry(key.clone()).or_default() += 1;
        let blocked = self.block.lock().unwrap().as_deref() == Some(name)
            || self.block.lock().unwrap().is_none();
        if blocked {
            if self.forever.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let waiter = self.opened.notified();
            if !self.is_open.load(std::sync::atomic::Ordering::SeqCst) {
                waiter.await;
            }
        }
        BranchTools::default().execute(dir, name, input).await
    }
}

#[tokio::test]
async fn a_reply_without_a_plan_completes_with_the_reply() {
    let (dir, s) = setup("reply").await;
    let model = transcript(
        dir.path(),
        "t.json",
        json!([[{"type": "text", "text": "Which language should the greeting be in?"}]]),
    );
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_eq!(statuses(&frames), ["pending", "planning", "complete"]);
    let w = s.workflow(&wf).await;
    assert_eq!(w["status"], "complete");
    assert_eq!(w["reply"], "Which language should the greeting be in?");
    assert!(w["versionId"].is_null());
}

#[tokio::test]
async fn a_plan_with_a_cycle_goes_back_to_the_model() {
    let (dir, s) = setup("cycle").await;
    let cyclic = json!([[{"type": "tool_call", "id": "p1", "name": "submit_plan", "input": {
    "acceptanceCriteria": [],
    "tasks": [
        {"id": 1, "summary": "a", "description": "", "acceptanceCriteria": [], "dependencies": [2]},
        {"id": 2, "summary": "b", "description": "", "acceptanceCriteria": [], "dependencies": [1]}
    ]}}]]);
    let mut turns = cyclic.as_array().unwrap().clone();
    turns.extend(happy_turns().as_array().unwrap()[1..].iter().cloned());
    let model = transcript(dir.path(), "t.json", Value::Array(turns));
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    let results: Vec<&Frame> = frames.iter().filter(|f| f.event == "tool-result").collect();
    assert_eq!(results[0].data["callId"], "p1");
    assert_eq!(results[0].data["isError"], true);
    assert!(
        results[0].data["content"]
            .as_str()
            .unwrap()
            .contains("cycle")
    );
    assert_eq!(results[1].data["isError"], false);
    assert_eq!(s.workflow(&wf).await["status"], "complete");
}

#[tokio::test]
async fn cancel_during_coding() {
    let (dir, s) = setup("cancel").await;
    let gate = Arc::new(Gate::default());
    *gate.block.lock().unwrap() = Some("write_file".into());
    s.app().workflows.set_tools(gate.clone());
    let model = transcript(dir.path(), "t.json", happy_turns());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    // Wait for the write_file call (coding).
    loop {
        let f = sse.next().await.unwrap();
        if f.event == "tool-call" && f.data["name"] == "write_file" {
            break;
        }
    }
    let res = s
        .http
        .post(s.url(&format!("/workflows/{wf}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    gate.open();
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_eq!(statuses(&frames).last().unwrap(), "cancelled");
    let w = s.workflow(&wf).await;
    assert_eq!(w["status"], "cancelled");
    assert!(w["versionId"].is_null());
    let res = s
        .http
        .post(s.url(&format!("/workflows/{wf}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
}

#[tokio::test]
async fn a_model_whose_provider_has_no_key_is_refused_at_once() {
    let (_dir, s) = setup("nokey").await;
    let res = trigger(&s, "say hello", "anthropic:x").await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_model", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ANTHROPIC_API_KEY"),
        "{body}"
    );
    // Nothing was started: the branch is free and its stream holds no workflow.
    let (status, events) = s.get_json("/projects/p/branches/b").await;
    assert_eq!(status, 200, "{events}");
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let res = trigger(&s, "say hello", "nope:x").await;
    assert_eq!(res.status(), 400);
    // Whatever the stream holds (from 0) is not a workflow's: none was started.
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_millis(300), sse.next()).await {
        assert_ne!(frame.event, "status", "no workflow may start: {frame:?}");
    }
    assert_eq!(
        s.http
            .get(s.url("/workflows/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn recovery_after_a_stop_mid_coding() {
    let dir = tempfile::tempdir().unwrap();
    let turns = json!([
        plan_turn("c1", json!([])),
        [
            {"type": "tool_call", "id": "c2", "name": "write_file", "input": {"filePath": "a.txt", "content": "a"}},
            {"type": "tool_call", "id": "c3", "name": "list_dir", "input": {}}
        ],
        [{"type": "tool_call", "id": "c4", "name": "write_file", "input": {"filePath": "b.txt", "content": "b"}}],
        [{"type": "tool_call", "id": "c5", "name": "done", "input": {}}]
    ]);
    let model = transcript(dir.path(), "t.json", turns);
    let gate = Arc::new(Gate::default());
    *gate.block.lock().unwrap() = Some("list_dir".into());
    gate.forever
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let s = start(replay_config(dir.path())).await;
    create_branch(&s, "recovery").await;
    s.app().workflows.set_tools(gate.clone());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let mut before = Vec::new();
    loop {
        let f = sse.next().await.unwrap();
        let stop = f.event == "tool-result" && f.data["callId"] == "c2";
        before.push(f);
        if stop {
            break;
        }
    }
    // c3 (list_dir) is now running and never returns; stop the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sse);
    s.server.shutdown().await;
    let last = before.last().unwrap().id.unwrap();

    let gate2 = Arc::new(Gate::default());
    gate2.open();
    // Count across both runs.
    *gate2.runs.lock().unwrap() = gate.runs.lock().unwrap().clone();
    let app = weldr_agent::App::open(replay_config(dir.path())).unwrap();
    app.workflows.set_tools(gate2.clone());
    let token = weldr_agent::auth::tokens::create(&app.store, "t2")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s2 = TestServer {
        server: weldr_agent::server::start_on(app, listener).unwrap(),
        dir: dir.path().to_path_buf(),
        mounts: DetachOnDrop(dir.path().to_path_buf()),
        http: client_with_token(&token),
        token,
    };
    let mut sse = s2.sse("/stream/p/b", Some(&last.to_string())).await;
    let after = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_eq!(after[0].id, Some(last + 1), "ids continue without a gap");
    let mut all = before.clone();
    all.extend(after.clone());
    assert_consecutive(&all);
    assert_eq!(statuses(&after).last().unwrap(), "complete", "{after:#?}");
    let runs = gate2.runs.lock().unwrap().clone();
    let count = |k: &str| {
        runs.iter()
            .filter(|(key, _)| key.starts_with(k))
            .map(|(_, n)| *n)
            .sum::<usize>()
    };
    assert_eq!(count("write_file:{\"content\":\"a\""), 1, "{runs:?}");
    assert_eq!(count("write_file:{\"content\":\"b\""), 1, "{runs:?}");
    // The unfinished list_dir ran again once (it never finished the first time).
    assert_eq!(count("list_dir"), 2, "{runs:?}");
    let w = s2.workflow(&wf).await;
    assert_eq!(w["status"], "complete");
    let wd = weldr_agent::branches::branch_dir(
        &s2.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    assert_eq!(std::fs::read_to_string(wd.join("a.txt")).unwrap(), "a");
    assert_eq!(std::fs::read_to_string(wd.join("b.txt")).unwrap(), "b");
}

#[tokio::test]
async fn a_model_cannot_write_outside_the_branch() {
    let (dir, s) = setup("escape").await;
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let wd = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::os::unix::fs::symlink(&outside, wd.join("link")).unwrap();
    let abs = outside.join("abs.txt");
    let turns = json!([
        plan_turn("c1", json!([])),
        [
            {"type": "tool_call", "id": "e1", "name": "write_file",
             "input": {"filePath": "../../outside/up.txt", "content": "x"}},
            {"type": "tool_call", "id": "e2", "name": "write_file",
             "input": {"filePath": abs.to_str().unwrap(), "content": "x"}},
            {"type": "tool_call", "id": "e3", "name": "write_file",
             "input": {"filePath": "link/through.txt", "content": "x"}},
            {"type": "tool_call", "id": "e4", "name": "edit_file",
             "input": {"filePath": "link/../../outside/up.txt", "oldText": "a", "newText": "b"}},
            {"type": "tool_call", "id": "e5", "name": "delete_file",
             "input": {"filePath": "../escape"}},
            {"type": "tool_call", "id": "e6", "name": "write_file",
             "input": {"filePath": ".git/config", "content": "x"}}
        ],
        [{"type": "tool_call", "id": "c2", "name": "write_file",
          "input": {"filePath": "inside.txt", "content": "ok"}}],
        [{"type": "tool_call", "id": "c3", "name": "done", "input": {}}]
    ]);
    let model = transcript(dir.path(), "t.json", turns);
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    for id in ["e1", "e2", "e3", "e4", "e5", "e6"] {
        let result = frames
            .iter()
            .find(|f| f.event == "tool-result" && f.data["callId"] == id)
            .unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(result.data["isError"], true, "{id}: {:?}", result.data);
    }
    // Refusals went back to the model; the workflow carried on and completed.
    assert_eq!(statuses(&frames).last().unwrap(), "complete");
    assert_eq!(
        std::fs::read_to_string(wd.join("inside.txt")).unwrap(),
        "ok"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert!(!dir.path().join("escape").exists());
    assert!(
        !std::fs::read_to_string(wd.join(".git/config"))
            .unwrap()
            .eq("x")
    );
}

#[tokio::test]
async fn a_failing_build_fails_the_workflow_and_keeps_the_version() {
    let (dir, s) = setup("build").await;
    let wd = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::write(
        wd.join("weldr.json"),
        json!({"buildCommand": "echo compiling; echo 'error: it broke' >&2; exit 3"}).to_string(),
    )
    .unwrap();
    let model = transcript(dir.path(), "t.json", happy_turns());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    let build = frames
        .iter()
        .find(|f| f.event == "build")
        .expect("build event");
    assert_eq!(build.data["exitCode"], 3);
    assert!(build.data["output"].as_str().unwrap().contains("it broke"));
    assert_eq!(statuses(&frames).last().unwrap(), "failed");
    let w = s.workflow(&wf).await;
    assert_eq!(w["status"], "failed");
    assert!(w["error"].as_str().unwrap().contains("build"), "{w}");
    assert!(
        w["versionId"].is_string(),
        "the work is kept as a version: {w}"
    );

    // A passing build completes; a broken weldr.json is a clear failure, not a crash.
    std::fs::write(
        wd.join("weldr.json"),
        r#"{"buildCommand": "test -f hello.txt"}"#,
    )
    .unwrap();
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_eq!(statuses(&frames).last().unwrap(), "complete");
    let build = frames
        .iter()
        .find(|f| f.event == "build")
        .expect("build event");
    assert_eq!(build.data["exitCode"], 0);
    std::fs::write(wd.join("weldr.json"), "{not json").unwrap();
    let wf = started(&s, &model).await;
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert_eq!(statuses(&frames).last().unwrap(), "failed");
    let w = s.workflow(&wf).await;
    assert!(w["error"].as_str().unwrap().contains("weldr.json"), "{w}");
}

#[tokio::test]
async fn triggers_are_rate_limited_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = replay_config(dir.path());
    cfg.trigger_rate_per_minute = 2;
    let s = start(cfg).await;
    create_branch(&s, "rate").await;
    let model = transcript(dir.path(), "t.json", happy_turns());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let first = started(&s, &model).await;
    sse.until_end(&first, Duration::from_secs(30)).await;
    let second = started(&s, &model).await;
    sse.until_end(&second, Duration::from_secs(30)).await;
    let res = trigger(&s, "third", &model).await;
    assert_eq!(res.status(), 429);
    // When to come back: a whole number of seconds, at most the minute the bucket refills in.
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // The refused trigger left nothing behind: the branch is free, no workflow was recorded.
    let store = s.app().store.clone();
    let active = weldr_storage::model::active_workflow(&store.begin_read().unwrap(), "p", "b");
    assert!(matches!(active, Ok(None)), "{active:?}");
}
