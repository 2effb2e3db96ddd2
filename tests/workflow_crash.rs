//! The real binary SIGKILLed in the middle of a workflow — during planning, between two tool
//! calls of a coding turn, and during deploying — then started again on the same workspace:
//! each workflow completes, no finished tool call runs again, and the branch stream's ids
//! continue with no repeat and no hole. The model is a fake OpenAI-compatible server (the
//! `ollama:` provider) that can stall a reply, so the kill lands where the test wants it.

#[path = "common/binary.rs"]
mod binary;
mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use binary::{cli, free_port, run_ok, serve_with, sigkill};
use common::{Frame, SseClient, client_with_token};
use fake_llm::{FakeLlm, Reply, Turn, call, plan_args};
use serde_json::{Value, json};

struct Harness {
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    port: u16,
    server: Child,
    http: reqwest::Client,
    fake: FakeLlm,
}

impl Harness {
    async fn start(script: Vec<Reply>) -> Self {
        let fake = FakeLlm::start(script).await;
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().to_path_buf();
        let port = free_port();
        let server = Self::serve(&ws, port, &fake);
        let token = run_ok(cli(&ws).args(["token", "create", "--name", "t"]))
            .trim()
            .to_string();
        let h = Harness {
            _tmp: tmp,
            ws,
            port,
            server,
            http: client_with_token(&token),
            fake,
        };
        for (path, body) in [
            ("/projects", json!({"projectId": "p"})),
            ("/projects/p/branches", json!({"branchId": "b"})),
        ] {
            let res = h.http.post(h.url(path)).json(&body).send().await.unwrap();
            assert_eq!(res.status(), 201, "{path}");
        }
        h
    }

    fn serve(ws: &Path, port: u16, fake: &FakeLlm) -> Child {
        let base = format!("{}/v1", fake.base());
        serve_with(ws, port, &[("OLLAMA_BASE_URL", base.as_str())])
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn branch_dir(&self) -> PathBuf {
        self.ws.join("p").join("b")
    }

    async fn trigger(&self) -> String {
        self.trigger_with("say hello").await
    }

    async fn trigger_with(&self, text: &str) -> String {
        let res = self
            .http
            .post(self.url("/trigger"))
            .json(&json!({"projectId": "p", "branchId": "b",
                          "message": {"content": [{"type": "text", "text": text}]},
                          "model": "ollama:test-model"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        res.json::<Value>().await.unwrap()["workflowId"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// SIGKILL the server; `between` runs while it is down; then start it again.
    fn crash_and_restart(&mut self, between: impl FnOnce(&Path)) {
        sigkill(&mut self.server);
        between(&self.branch_dir());
        self.server = Self::serve(&self.ws, self.port, &self.fake);
    }

    /// The whole branch stream up to and including the workflow's `end`.
    async fn whole_stream(&self, wf: &str) -> Vec<Frame> {
        let mut sse =
            SseClient::connect_with(&self.http, &self.url("/stream/p/b"), Some("0")).await;
        let mut frames = Vec::new();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(60), sse.next())
                .await
                .unwrap_or_else(|_| panic!("no event within 60 s after {frames:#?}"))
                .expect("stream ended");
            let end = frame.event == "end" && frame.data["workflowId"] == wf;
            frames.push(frame);
            if end {
                return frames;
            }
        }
    }

    async fn workflow(&self, wf: &str) -> Value {
        self.http
            .get(self.url(&format!("/workflows/{wf}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn versions(&self) -> Vec<Value> {
        self.http
            .get(self.url("/projects/p/branches/b/versions"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Wait (polling, off the runtime's worker) until `ready` holds.
async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the server get properly into the step before the kill.
    tokio::time::sleep(Duration::from_millis(150)).await;
}

fn write_hello(id: &str) -> Reply {
    call(
        id,
        "write_file",
        json!({"filePath": "hello.txt", "content": "hello\n"}),
    )
}

/// The invariants every crashed-and-recovered stream keeps: ids 1, 2, 3... with no repeat
/// and no hole; each tool call has exactly one result; one `end`, and it says `complete`.
fn assert_recovered_stream(frames: &[Frame]) -> HashMap<String, usize> {
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids repeat or skip"
    );
    let mut results: HashMap<String, usize> = HashMap::new();
    for f in frames.iter().filter(|f| f.event == "tool-result") {
        *results
            .entry(f.data["callId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for (call, n) in &results {
        assert_eq!(*n, 1, "tool call {call} has {n} results");
    }
    let ends: Vec<&Frame> = frames.iter().filter(|f| f.event == "end").collect();
    assert_eq!(ends.len(), 1, "one end: {frames:#?}");
    assert_eq!(ends[0].data["status"], "complete", "{frames:#?}");
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_planning() {
    let plan = plan_args();
    let mut h = Harness::start(vec![
        call("c1", "list_dir", json!({})),
        // The second planning turn never comes: the server is killed while it waits.
        Reply::Stall,
        Reply::Turn(Turn::default().call("c2", "submit_plan", &[&plan])),
        write_hello("c3"),
        call("c4", "done", json!({"summary": "wrote hello.txt"})),
    ])
    .await;
    let wf = h.trigger().await;
    let fake_requests = || h.fake.requests().len();
    wait_for("the stalled planning request", || fake_requests() >= 2).await;
    h.crash_and_restart(|_| {});

    let frames = h.whole_stream(&wf).await;
    let results = assert_recovered_stream(&frames);
    assert!(results.contains_key("c1") && results.contains_key("c3"));
    // The conversation was rebuilt from the journal: the model saw c1's result again.
    let requests = h.fake.requests();
    assert_eq!(
        requests.len(),
        5,
        "one model request per turn, plus the stalled one"
    );
    assert!(
        requests[2]
            .body
            .to_string()
            .contains("\"tool_call_id\":\"c1\""),
        "{:#?}",
        requests[2].body
    );
    assert_eq!(h.workflow(&wf).await["status"], "complete");
    assert_eq!(
        std::fs::read_to_string(h.branch_dir().join("hello.txt")).unwrap(),
        "hello\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_a_follow_up_resumes_with_the_thread() {
    let plan = plan_args();
    let mut h = Harness::start(vec![
        // The first workflow asks a question.
        Reply::Turn(Turn::text(&["Should the greeting be formal?"])),
        // The follow-up: the server is killed while its first model call waits.
        Reply::Stall,
        Reply::Turn(Turn::default().call("c1", "submit_plan", &[&plan])),
        write_hello("c2"),
        call("c3", "done", json!({"summary": "wrote hello.txt"})),
    ])
    .await;
    let first = h.trigger_with("write a greeting file").await;
    let frames = h.whole_stream(&first).await;
    assert_eq!(frames.last().unwrap().data["status"], "complete");
    let wf = h.trigger_with("no, casual").await;
    wait_for("the stalled follow-up request", || {
        h.fake.requests().len() >= 2
    })
    .await;
    h.crash_and_restart(|_| {});

    let frames = h.whole_stream(&wf).await;
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    assert_eq!(frames.last().unwrap().data["status"], "complete");
    // The recovered workflow asked again with the same context: the thread, then the answer.
    let requests = h.fake.requests();
    let (stalled, resumed) = (requests[1].body.clone(), requests[2].body.clone());
    assert_eq!(
        stalled["messages"], resumed["messages"],
        "the same conversation"
    );
    let text = resumed["messages"].to_string();
    let (ask, question, answer) = (
        text.find("write a greeting file")
            .expect("the first request"),
        text.find("Should the greeting be formal?")
            .expect("the question"),
        text.find("no, casual").expect("the answer"),
    );
    assert!(ask < question && question < answer, "{text}");
    let page: Value = h
        .http
        .get(h.url("/projects/p/branches/b/messages"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["user", "assistant", "user", "assistant"],
        "{page:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_two_tool_calls_while_coding() {
    let plan = plan_args();
    let mut h = Harness::start(vec![
        Reply::Turn(Turn::default().call("c1", "submit_plan", &[&plan])),
        // One turn, two calls: the first finishes, the kill lands inside the second.
        Reply::Turn(
            Turn::default()
                .call(
                    "c2",
                    "run_command",
                    &[&json!({"command": "echo a >> ran.log"}).to_string()],
                )
                .call(
                    "c3",
                    "run_command",
                    &[&json!({"command":
                        "echo s >> started.log; while [ ! -e resume ]; do sleep 0.05; done; echo b >> ran.log"})
                    .to_string()],
                ),
        ),
        call("c4", "done", json!({"summary": "ran both"})),
    ])
    .await;
    let wf = h.trigger().await;
    let dir = h.branch_dir();
    wait_for("the second command to start", || {
        dir.join("started.log").exists()
    })
    .await;
    h.crash_and_restart(|dir| {
        std::fs::write(dir.join("resume"), "").unwrap();
        // The interrupted command died with the server: it does not finish on its own.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(std::fs::read_to_string(dir.join("ran.log")).unwrap(), "a\n");
    });

    let frames = h.whole_stream(&wf).await;
    let results = assert_recovered_stream(&frames);
    assert_eq!(results.len(), 4, "{results:?}");
    // c2 finished before the kill and did not run again; c3 was interrupted and ran once more.
    assert_eq!(
        std::fs::read_to_string(dir.join("ran.log")).unwrap(),
        "a\nb\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("started.log")).unwrap(),
        "s\ns\n"
    );
    let w = h.workflow(&wf).await;
    assert_eq!(w["status"], "complete");
    assert_eq!(w["tasks"][0]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_deploying() {
    let plan = plan_args();
    let mut h = Harness::start(vec![
        Reply::Turn(Turn::default().call("c1", "submit_plan", &[&plan])),
        write_hello("c2"),
        call("c3", "done", json!({"summary": "wrote hello.txt"})),
    ])
    .await;
    let dir = h.branch_dir();
    // The project's build: slow until the test lets it finish.
    std::fs::write(
        dir.join("weldr.json"),
        json!({"buildCommand":
            "echo built >> build.log; while [ ! -e resume ]; do sleep 0.05; done"})
        .to_string(),
    )
    .unwrap();
    let before = h.versions().await.len();
    let wf = h.trigger().await;
    wait_for("the build to start", || dir.join("build.log").exists()).await;
    h.crash_and_restart(|dir| std::fs::write(dir.join("resume"), "").unwrap());

    let frames = h.whole_stream(&wf).await;
    assert_recovered_stream(&frames);
    let statuses: Vec<&str> = frames
        .iter()
        .filter(|f| f.event == "status")
        .map(|f| f.data["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["pending", "planning", "coding", "deploying", "complete"],
        "{frames:#?}"
    );
    // The version was committed once, before the crash; the build ran again and succeeded.
    let versions = h.versions().await;
    assert_eq!(versions.len(), before + 1, "{versions:#?}");
    assert_eq!(
        frames.iter().filter(|f| f.event == "version").count(),
        1,
        "{frames:#?}"
    );
    let builds: Vec<&Frame> = frames.iter().filter(|f| f.event == "build").collect();
    assert_eq!(builds.len(), 1, "the interrupted build left no result");
    assert_eq!(builds[0].data["exitCode"], 0);
    assert_eq!(
        std::fs::read_to_string(dir.join("build.log")).unwrap(),
        "built\nbuilt\n"
    );
    let w = h.workflow(&wf).await;
    assert_eq!(w["status"], "complete");
    assert!(
        w["versionId"].is_string() || w["versionId"].is_number(),
        "{w}"
    );
}
