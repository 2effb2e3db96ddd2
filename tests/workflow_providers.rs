//! trigger → plan → code → version → end through each real provider client, against a fake
//! provider server speaking that provider's streaming wire format: the stream's event
//! sequence, the file written and the commit.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::time::Duration;

use common::*;
use fake_llm::{FakeLlm, Reply, Turn};
use serde_json::{Value, json};

fn script() -> Vec<Reply> {
    let plan = json!({
        "acceptanceCriteria": ["hello.txt says hello"],
        "tasks": [{"id": 1, "summary": "write hello", "description": "create hello.txt",
                   "acceptanceCriteria": ["exists"], "dependencies": []}]
    })
    .to_string();
    let (plan_a, plan_b) = plan.split_at(plan.len() / 2);
    let write = json!({"filePath": "hello.txt", "content": "hello from the model\n"}).to_string();
    let (write_a, write_b) = write.split_at(20);
    vec![
        Reply::Turn(
            Turn::text(&["Let me ", "look around."])
                .call("c1", "list_dir", &["{}"])
                .usage(100, 10),
        ),
        Reply::Turn(
            Turn::text(&["Here is the plan."])
                .call("c2", "submit_plan", &[plan_a, plan_b])
                .usage(120, 40),
        ),
        Reply::Turn(
            Turn::text(&["Writing ", "the file."])
                .call("c3", "write_file", &[write_a, write_b])
                .usage(150, 30),
        ),
        Reply::Turn(
            Turn::default()
                .call("c4", "done", &[r#"{"summary":"wrote hello.txt"}"#])
                .usage(160, 5),
        ),
    ]
}

/// A server with these provider keys, project `p` and branch `b`, and one workflow on `model`
/// read from the branch stream up to its `end`: (workspace, server, workflow id, frames).
async fn run_workflow(
    keys: weldr_agent::config::ProviderKeys,
    model: &str,
) -> (tempfile::TempDir, TestServer, String, Vec<common::Frame>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.providers = keys;
    let s = start(cfg).await;
    for (path, body) in [
        ("/projects", json!({"projectId": "p"})),
        ("/projects/p/branches", json!({"branchId": "b"})),
    ] {
        let res = s.http.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 201, "{model}: {path}");
    }
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let res = s
        .http
        .post(s.url("/trigger"))
        .json(&json!({"projectId": "p", "branchId": "b",
                      "message": {"content": [{"type": "text", "text": "say hello"}]},
                      "model": model}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{model}");
    let wf = res.json::<Value>().await.unwrap()["workflowId"]
        .as_str()
        .unwrap()
        .to_string();
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), sse.next())
            .await
            .unwrap_or_else(|_| panic!("{model}: no event within 60 s after {frames:#?}"))
            .expect("stream ended");
        let end = frame.event == "end";
        frames.push(frame);
        if end {
            return (tmp, s, wf, frames);
        }
    }
}

async fn run_with(provider: &str) {
    run_with_script(provider, "test-model", script()).await;
}

/// The script with each turn changed by `f`.
fn script_with(f: impl Fn(&mut Turn)) -> Vec<Reply> {
    script()
        .into_iter()
        .map(|r| match r {
            Reply::Turn(mut t) => {
                f(&mut t);
                Reply::Turn(t)
            }
            other => other,
        })
        .collect()
}

async fn run_with_script(provider: &str, model: &str, script: Vec<Reply>) {
    let fake = FakeLlm::start(script).await;
    let (_tmp, s, wf, frames) = run_workflow(fake.keys(), &format!("{provider}:{model}")).await;
    // Ids increase by one, with no gap.
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "{provider}: {ids:?}"
    );
    let statuses: Vec<&str> = frames
        .iter()
        .filter(|f| f.event == "status")
        .filter_map(|f| f.data["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        ["pending", "planning", "coding", "deploying", "complete"],
        "{provider}"
    );
    let text: String = frames
        .iter()
        .filter(|f| f.event == "text")
        .filter_map(|f| f.data["text"].as_str())
        .collect();
    assert!(
        text.contains("Let me look around.") && text.contains("Writing the file."),
        "{provider}: {text}"
    );
    let calls: Vec<&str> = frames
        .iter()
        .filter(|f| f.event == "tool-call")
        .filter_map(|f| f.data["name"].as_str())
        .collect();
    assert_eq!(
        calls,
        ["list_dir", "submit_plan", "write_file", "done"],
        "{provider}"
    );
    assert!(
        frames
            .iter()
            .filter(|f| f.event == "tool-result")
            .all(|f| f.data["isError"] == false),
        "{provider}: {frames:#?}"
    );
    let version = frames
        .iter()
        .find(|f| f.event == "version")
        .unwrap_or_else(|| panic!("{provider}: no version event"));
    assert!(
        frames
            .iter()
            .all(|f| f.data["workflowId"].is_null() || f.data["workflowId"] == wf.as_str())
    );

    // The file and the commit.
    let dir = s.dir.join("p/b");
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).unwrap(),
        "hello from the model\n",
        "{provider}"
    );
    let head = git(&dir, &["rev-parse", "HEAD"]);
    assert_eq!(
        version.data["commitHash"].as_str().unwrap(),
        head.trim(),
        "{provider}"
    );
    assert_eq!(
        git(&dir, &["show", "--name-only", "--format=", "HEAD"]).trim(),
        "hello.txt"
    );
    git(&dir, &["fsck", "--strict"]);

    // The workflow record: complete, the plan, the version, usage from the provider.
    let record = s.workflow(&wf).await;
    assert_eq!(record["status"], "complete", "{provider}: {record}");
    assert_eq!(
        record["tasks"][0]["status"], "completed",
        "{provider}: {record}"
    );
    assert!(
        record["usage"]["inputTokens"].as_u64().unwrap() > 0,
        "{provider}: {record}"
    );
    // The provider got the tool results back in its own format, with its key.
    let requests = fake.requests();
    assert_eq!(requests.len(), 4, "{provider}");
    let last = requests.last().unwrap().body.to_string();
    assert!(
        last.contains("hello.txt"),
        "{provider}: the write_file call goes back: {last}"
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_end_to_end() {
    run_with("anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_end_to_end() {
    run_with("openai").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_end_to_end() {
    run_with("ollama").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_end_to_end() {
    run_with("gemini").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_3_end_to_end_with_thought_signatures() {
    // Gemini 3 refuses a conversation whose function calls lost their thought signatures.
    let script = script_with(|t| {
        *t = t.clone().reasoning(&["thinking"], Some("sig-g3"));
    });
    run_with_script("gemini", "gemini-3-pro-preview", script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_server_without_tool_call_ids_completes() {
    // Ollama, vLLM, llama.cpp may send calls without ids: each still gets its own, so the
    // engine never takes a new call for one that already ran.
    let script = script_with(|t| t.calls.iter_mut().for_each(|c| c.id.clear()));
    run_with_script("ollama", "qwen2.5-coder", script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thinking_server_gets_its_reasoning_content_back() {
    // DeepSeek-style servers refuse an assistant tool-call message without its
    // `reasoning_content`.
    let script = script_with(|t| {
        *t = t.clone().reasoning(&["let me think"], None);
    });
    run_with_script("ollama", "deepseek-reasoner", script).await;
}

/// A workflow on the OpenAI wire with these keys, run to its `end`: (frames, workflow record).
async fn run_script(keys: weldr_agent::config::ProviderKeys) -> (Vec<common::Frame>, Value) {
    let (_tmp, s, wf, frames) = run_workflow(keys, "openai:test-model").await;
    let record = s.workflow(&wf).await;
    // The server is healthy after whatever the provider did.
    let health = s.http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    s.server.shutdown().await;
    (frames, record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_then_success_completes() {
    let mut script = vec![Reply::Status {
        code: 429,
        message: "slow down".into(),
        retry_after: Some(0),
    }];
    script.extend(self::script());
    let fake = FakeLlm::start(script).await;
    let (frames, record) = run_script(fake.keys()).await;
    assert_eq!(record["status"], "complete", "{record}");
    assert!(frames.iter().all(|f| f.event != "failure"), "{frames:#?}");
    assert_eq!(fake.requests().len(), 5, "the 429 was retried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_fails_the_workflow_with_an_error_event() {
    let keys = fake_llm::keys_for(&FakeLlm::down_base().await);
    let (frames, record) = run_script(keys).await;
    assert_eq!(record["status"], "failed", "{record}");
    let error = frames
        .iter()
        .find(|f| f.event == "failure")
        .expect("error event");
    assert!(!error.data["message"].as_str().unwrap().is_empty());
    assert_eq!(frames.last().unwrap().data["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_provider_stream_fails_the_workflow_with_an_error_event() {
    let fake = FakeLlm::start(vec![Reply::Malformed; 4]).await;
    let (frames, record) = run_script(fake.keys()).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert!(frames.iter().any(|f| f.event == "failure"), "{frames:#?}");
    assert!(record["error"].as_str().is_some(), "{record}");
}

/// A workflow on `provider` playing `script`: its frames, its record and what the provider got.
async fn outcome(
    provider: &str,
    script: Vec<Reply>,
) -> (Vec<common::Frame>, Value, Vec<fake_llm::Recorded>) {
    outcome_with_limit(provider, script, None).await
}

async fn outcome_with_limit(
    provider: &str,
    script: Vec<Reply>,
    max_output_tokens: Option<u32>,
) -> (Vec<common::Frame>, Value, Vec<fake_llm::Recorded>) {
    let fake = FakeLlm::start(script).await;
    let mut keys = fake.keys();
    keys.max_output_tokens = max_output_tokens;
    let (_tmp, s, wf, frames) = run_workflow(keys, &format!("{provider}:test-model")).await;
    let record = s.workflow(&wf).await;
    s.server.shutdown().await;
    (frames, record, fake.requests())
}

/// The output limit a request asked for, in its wire's field.
fn requested_limit(body: &Value) -> u64 {
    body.get("max_tokens")
        .or(body.get("max_completion_tokens"))
        .or(body.get("max_output_tokens"))
        .or(body["generationConfig"].get("maxOutputTokens"))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no output limit in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_cut_at_the_output_limit_is_asked_again_with_a_higher_limit() {
    for provider in ["anthropic", "openai", "ollama", "gemini"] {
        let mut script = self::script();
        let mut cut = Turn::text(&["Writing ", "the file."])
            .call(
                "c3",
                "write_file",
                &[r#"{"filePath": "hello.txt", "content": "hello fr"#],
            )
            .usage(150, 999);
        cut.max_tokens = true;
        script.insert(2, Reply::Turn(cut.clone()));
        let (frames, record, requests) = outcome_with_limit(provider, script, Some(64_000)).await;
        assert_eq!(record["status"], "complete", "{provider}: {record}");
        assert_eq!(requests.len(), 5, "{provider}");
        let (cut_at, again_at) = (
            requested_limit(&requests[2].body),
            requested_limit(&requests[3].body),
        );
        assert!(again_at > cut_at, "{provider}: {cut_at} then {again_at}");
        // The cut-off turn's output counts.
        assert_eq!(
            record["usage"]["outputTokens"], 1084,
            "{provider}: {record}"
        );
        // The cut-off call never ran: one write_file result, the whole one.
        let writes = frames
            .iter()
            .filter(|f| f.event == "tool-result" && f.data["name"] == "write_file")
            .count();
        assert_eq!(writes, 1, "{provider}");

        // At the model's maximum, the workflow fails saying so, with the usage kept.
        let mut script = self::script();
        script.insert(2, Reply::Turn(cut));
        let (_, record, _) = outcome_with_limit(provider, script, Some(8_000)).await;
        assert_eq!(record["status"], "failed", "{provider}: {record}");
        assert!(
            record["error"]
                .as_str()
                .unwrap()
                .contains("output limit of 8000"),
            "{provider}: {record}"
        );
        assert_eq!(
            record["usage"]["outputTokens"], 1049,
            "{provider}: {record}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_or_safety_block_fails_the_workflow_clearly() {
    for (provider, reason) in [
        ("anthropic", "refusal"),
        ("openai", "content_filter"),
        ("ollama", "content_filter"),
        ("gemini", "SAFETY"),
    ] {
        let script = vec![Reply::Turn(
            Turn::text(&["I can't help with that."]).stop(reason),
        )];
        let (_, record, _) = outcome(provider, script).await;
        assert_eq!(record["status"], "failed", "{provider}: {record}");
        let error = record["error"].as_str().unwrap_or_default();
        assert!(error.contains("refused"), "{provider}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_call_is_asked_again_a_bounded_number_of_times() {
    let mut script = vec![Reply::Turn(Turn::default().stop("MALFORMED_FUNCTION_CALL"))];
    script.extend(self::script());
    let (_, record, requests) = outcome("gemini", script).await;
    assert_eq!(record["status"], "complete", "{record}");
    assert_eq!(requests.len(), 5);

    let script = vec![Reply::Turn(Turn::default().stop("MALFORMED_FUNCTION_CALL")); 4];
    let (_, record, requests) = outcome("gemini", script).await;
    assert_eq!(record["status"], "failed", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("malformed"),
        "{record}"
    );
    assert_eq!(requests.len(), 3, "asked again twice, then failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_of_a_turn_gets_a_result_also_after_submit_plan_and_done() {
    let plan = json!({
        "acceptanceCriteria": ["hello.txt says hello"],
        "tasks": [{"id": 1, "summary": "write hello", "description": "create hello.txt",
                   "acceptanceCriteria": ["exists"], "dependencies": []}]
    })
    .to_string();
    let write = |path: &str| json!({"filePath": path, "content": "x\n"}).to_string();
    let script = vec![
        Reply::Turn(
            Turn::text(&["Plan."])
                .call("p1", "submit_plan", &[&plan])
                .call("p2", "list_dir", &["{}"]),
        ),
        Reply::Turn(Turn::text(&["Writing."]).call("w1", "write_file", &[&write("hello.txt")])),
        Reply::Turn(Turn::default().call("d1", "done", &["{}"]).call(
            "d2",
            "write_file",
            &[&write("late.txt")],
        )),
    ];
    for provider in ["anthropic", "openai", "gemini"] {
        let (frames, record, _) = outcome(provider, script.clone()).await;
        assert_eq!(record["status"], "complete", "{provider}: {record}");
        let results: Vec<&Value> = frames
            .iter()
            .filter(|f| f.event == "tool-result")
            .map(|f| &f.data)
            .collect();
        assert_eq!(results.len(), 5, "{provider}: {results:#?}");
        for late in results.iter().filter(|r| {
            r["name"] == "list_dir" || r["content"].as_str().unwrap().contains("not run")
        }) {
            assert_eq!(late["isError"], true, "{provider}: {late}");
            assert!(
                late["content"].as_str().unwrap().starts_with("not run"),
                "{provider}: {late}"
            );
        }
        assert_eq!(
            results
                .iter()
                .filter(|r| r["content"].as_str().unwrap().starts_with("not run"))
                .count(),
            2,
            "{provider}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_keeps_reasoning_between_tool_calls() {
    // A reasoning model: every call comes back after the reasoning item it was made with (the
    // fake refuses it otherwise, as the API does for reasoning models).
    let script = script_with(|t| {
        *t = t.clone().reasoning(&["First, ", "the tree."], None);
    });
    let fake = FakeLlm::start(script).await;
    let (_tmp, s, wf, frames) = run_workflow(fake.keys(), "openai:o4-mini").await;
    let record = s.workflow(&wf).await;
    s.server.shutdown().await;
    assert_eq!(record["status"], "complete", "{record}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        assert!(r.path.ends_with("/v1/responses"), "{}", r.path);
        assert_eq!(r.body["store"], false);
        assert_eq!(r.body["include"], json!(["reasoning.encrypted_content"]));
    }
    // The planner's second request: the user's text, the reasoning item, the call, its output.
    let kinds: Vec<String> = requests[1].body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["type"]
                .as_str()
                .or(i["role"].as_str())
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "user",
            "reasoning",
            "assistant",
            "function_call",
            "function_call_output"
        ],
        "{:#}",
        requests[1].body
    );
    // Reasoning summaries stream as reasoning events.
    assert!(
        frames.iter().any(
            |f| f.event == "reasoning" && f.data["text"].as_str().unwrap().contains("the tree")
        ),
        "{frames:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_ends_a_hanging_model_call_at_once() {
    // The provider answers 200 and then nothing (its idle timeout is two minutes).
    let fake = FakeLlm::start(vec![Reply::Stall]).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.providers = fake.keys();
    let s = start(cfg).await;
    for (path, body) in [
        ("/projects", json!({"projectId": "p"})),
        ("/projects/p/branches", json!({"branchId": "b"})),
    ] {
        let res = s.http.post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 201);
    }
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let (status, body) = s
        .post_json(
            "/trigger",
            json!({"projectId": "p", "branchId": "b",
                   "message": {"content": [{"type": "text", "text": "hi"}]},
                   "model": "anthropic:claude-sonnet-4-5"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let wf = body["workflowId"].as_str().unwrap().to_string();
    // Wait until the model call is in flight.
    while fake.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = s
        .post_json(&format!("/workflows/{wf}/cancel"), json!({}))
        .await;
    assert!(status < 300, "cancel: {status}");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), sse.next())
            .await
            .expect("the cancel ends the workflow well before the provider's idle timeout")
            .expect("stream open");
        if frame.event == "end" {
            assert_eq!(frame.data["status"], "cancelled", "{frame:?}");
            break;
        }
    }
    s.server.shutdown().await;
}
