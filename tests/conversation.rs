//! Conversations, tried as a user of an app builder would: a follow-up sees the thread, a
//! planner's question and the answer read as one conversation, AGENTS.md reaches the system
//! prompt, a long session stays inside the context budget, a cancel ends a running command
//! at once, and a fork keeps its parent's thread. Against the fake Anthropic server, asserting
//! on the requests it receives (it validates them as the real API does).

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::time::Duration;

use common::*;
use fake_llm::{FakeLlm, Reply, Turn};
use serde_json::{Value, json};

const MODEL: &str = "anthropic:claude-sonnet-4-5";

async fn server(fake: &FakeLlm, tmp: &std::path::Path) -> TestServer {
    server_with(fake, tmp, |_| {}).await
}

async fn server_with(
    fake: &FakeLlm,
    tmp: &std::path::Path,
    f: impl FnOnce(&mut weldr_agent::config::Config),
) -> TestServer {
    let mut cfg = config(tmp);
    cfg.providers = fake.keys();
    f(&mut cfg);
    let s = start(cfg).await;
    for (path, body) in [
        ("/projects", json!({"projectId": "p"})),
        ("/projects/p/branches", json!({"branchId": "b"})),
    ] {
        let (status, body) = s.post_json(path, body).await;
        assert_eq!(status, 201, "{path}: {body}");
    }
    s
}

async fn trigger(s: &TestServer, text: &str) -> String {
    let (status, body) = s
        .post_json(
            "/trigger",
            json!({"projectId": "p", "branchId": "b",
                   "message": {"content": [{"type": "text", "text": text}]},
                   "model": MODEL}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["workflowId"].as_str().unwrap().to_string()
}

fn plan_turn(id: &str) -> Turn {
    let plan = json!({"acceptanceCriteria": ["done"], "tasks": [{"id": 1, "summary": "do it",
        "description": "do it", "acceptanceCriteria": ["ok"], "dependencies": []}]});
    Turn::default()
        .call(id, "submit_plan", &[&plan.to_string()])
        .usage(100, 20)
}

/// Every text of a request's messages (and tool results), in order, with its role.
fn texts(body: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in body["messages"].as_array().unwrap() {
        let role = m["role"].as_str().unwrap().to_string();
        match &m["content"] {
            Value::String(s) => out.push((role.clone(), s.clone())),
            Value::Array(blocks) => {
                for b in blocks {
                    let t = b["text"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| b["content"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    out.push((role.clone(), t));
                }
            }
            _ => {}
        }
    }
    out
}

fn system_text(body: &Value) -> String {
    match &body["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_and_its_answer_read_as_one_conversation() {
    let fake = FakeLlm::start(vec![
        // Workflow 1: the planner asks a question.
        Reply::Turn(Turn::text(&["Which framework: React or Svelte?"]).usage(50, 9)),
        // Workflow 2: the answer; plan, write, done.
        Reply::Turn(plan_turn("p1")),
        Reply::Turn(
            Turn::default()
                .call(
                    "w1",
                    "write_file",
                    &[r#"{"filePath":"App.jsx","content":"export default () => <button/>\n"}"#],
                )
                .usage(120, 30),
        ),
        Reply::Turn(Turn::default().call("d1", "done", &["{}"]).usage(130, 5)),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&fake, tmp.path()).await;
    let mut sse = s.sse("/stream/p/b", Some("0")).await;

    let first = trigger(&s, "build a todo app").await;
    let frames = sse.until_end(&first, Duration::from_secs(60)).await;
    assert_eq!(frames.last().unwrap().data["status"], "complete");
    // Every event of the workflow names the assistant message it builds.
    let message_id = frames.last().unwrap().data["messageId"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        frames
            .iter()
            .filter(|f| f.data["workflowId"] == first)
            .all(|f| f.data["messageId"] == message_id.as_str())
    );

    let second = trigger(&s, "React, please").await;
    let frames = sse.until_end(&second, Duration::from_secs(60)).await;
    assert_eq!(
        frames.last().unwrap().data["status"],
        "complete",
        "{frames:#?}"
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    let follow_up = texts(&requests[1].body);
    let pos = |needle: &str| {
        follow_up
            .iter()
            .position(|(_, t)| t.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in the follow-up: {follow_up:#?}"))
    };
    let (ask, question, answer) = (
        pos("build a todo app"),
        pos("Which framework"),
        pos("React, please"),
    );
    assert!(ask < question && question < answer, "{follow_up:#?}");
    assert_eq!(follow_up[ask].0, "user");
    assert_eq!(follow_up[question].0, "assistant");
    assert_eq!(follow_up[answer].0, "user");
    // The tree and the versions come with the request.
    assert!(follow_up.iter().any(|(_, t)| t.contains("Latest versions")));

    // The conversation as the API shows it.
    let (status, page) = s.get_json("/projects/p/branches/b/messages").await;
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    let kinds: Vec<&str> = messages
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["user", "assistant", "user", "assistant"],
        "{page:#}"
    );
    assert_eq!(messages[0]["text"], "build a todo app");
    assert_eq!(messages[1]["messageId"], message_id.as_str());
    assert!(
        messages[1]["text"]
            .as_str()
            .unwrap()
            .contains("Which framework")
    );
    assert_eq!(messages[3]["status"], "complete");
    assert_eq!(messages[3]["versionId"], "2");
    assert_eq!(messages[3]["filesChanged"], json!(["App.jsx"]));
    assert_eq!(messages[3]["toolCalls"][0]["name"], "submit_plan");
    assert_eq!(messages[3]["toolCalls"][1]["target"], "App.jsx");
    // Paging: newest last, `nextBefore` goes back.
    let (_, page) = s.get_json("/projects/p/branches/b/messages?limit=3").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);
    assert_eq!(page["messages"][2]["kind"], "assistant");
    let before = page["nextBefore"].as_u64().unwrap();
    let (_, older) = s
        .get_json(&format!(
            "/projects/p/branches/b/messages?limit=3&before={before}"
        ))
        .await;
    assert_eq!(older["messages"].as_array().unwrap().len(), 1);
    assert!(older["nextBefore"].is_null());
    for bad in ["limit=0", "limit=201", "limit=x", "before=-1"] {
        let (status, body) = s
            .get_json(&format!("/projects/p/branches/b/messages?{bad}"))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // A fork at version 1 (before the second workflow) keeps the thread up to there; a fork
    // at the head keeps all of it.
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({"branchId": "old", "fromBranchId": "b", "fromVersionId": "1"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, page) = s.get_json("/projects/p/branches/old/messages").await;
    let texts: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert!(!texts.iter().any(|t| t.contains("React")), "{page:#}");
    let (status, _) = s
        .post_json(
            "/projects/p/branches",
            json!({"branchId": "new", "fromBranchId": "b"}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, page) = s.get_json("/projects/p/branches/new/messages").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 4, "{page:#}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_instructions_reach_the_system_prompt() {
    let fake = FakeLlm::start(vec![
        Reply::Turn(Turn::text(&["ok"]).usage(10, 1)),
        Reply::Turn(Turn::text(&["ok"]).usage(10, 1)),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&fake, tmp.path()).await;
    let dir = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::write(
        dir.join("AGENTS.md"),
        "Always use tabs. Never touch vendor/.",
    )
    .unwrap();
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = trigger(&s, "hello").await;
    sse.until_end(&wf, Duration::from_secs(60)).await;
    // Re-read at each workflow: a changed file is what the next one sees.
    std::fs::write(dir.join("AGENTS.md"), "Use spaces now.").unwrap();
    let wf = trigger(&s, "again").await;
    sse.until_end(&wf, Duration::from_secs(60)).await;
    let requests = fake.requests();
    let first = system_text(&requests[0].body);
    assert!(first.contains("Always use tabs"), "{first}");
    assert!(first.contains("AGENTS.md"), "{first}");
    let second = system_text(&requests[1].body);
    assert!(
        second.contains("Use spaces now") && !second.contains("tabs"),
        "{second}"
    );
    s.server.shutdown().await;
}

/// Process ids whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(marker)
        {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_kills_a_running_command_and_keeps_the_work_uncommitted() {
    let marker = format!("100.{}", std::process::id());
    let command = json!({"command": format!("sleep {marker}")}).to_string();
    let fake = FakeLlm::start(vec![
        Reply::Turn(plan_turn("p1")),
        Reply::Turn(
            Turn::default()
                .call(
                    "w1",
                    "write_file",
                    &[r#"{"filePath":"draft.txt","content":"half done\n"}"#],
                )
                .call("r1", "run_command", &[&command])
                .usage(100, 10),
        ),
    ])
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&fake, tmp.path()).await;
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let wf = trigger(&s, "do something slow").await;
    // Wait for the command to run.
    let mut frames = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), sse.next())
            .await
            .expect("events")
            .expect("stream open");
        let running = f.event == "tool-call" && f.data["name"] == "run_command";
        frames.push(f);
        if running {
            break;
        }
    }
    for _ in 0..200 {
        if !processes_with(&marker).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!processes_with(&marker).is_empty(), "the command runs");
    let (status, body) = s
        .post_json(&format!("/workflows/{wf}/cancel"), json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let rest = sse.until_end(&wf, Duration::from_secs(60)).await;
    assert_eq!(rest.last().unwrap().data["status"], "cancelled");
    // Nothing of it is left running (the kill is synchronous with the end of the call; the
    // kernel reaps what is left of the sandbox a moment later).
    for _ in 0..200 {
        if processes_with(&marker).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        processes_with(&marker).is_empty(),
        "no process is left behind"
    );
    // The work stays in the tree, not in git; the conversation says so.
    let (_, versions) = s.get_json("/projects/p/branches/b/versions").await;
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions:#}");
    let dir = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("draft.txt")).unwrap(),
        "half done\n"
    );
    let (_, page) = s.get_json("/projects/p/branches/b/messages").await;
    let last = page["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["status"], "cancelled", "{last:#}");
    assert_eq!(last["filesChanged"], json!(["draft.txt"]), "{last:#}");
    assert!(
        last["text"].as_str().unwrap().contains("uncommitted"),
        "{last:#}"
    );
    s.server.shutdown().await;
}

/// 12 follow-ups of 5 turns each (60 turns), 5 tool calls per turn (300 calls), each result a
/// 3 KB file, in a 12,000-token window: the fake refuses, as Anthropic does, any request whose
/// prompt and output limit exceed it, so every workflow completing means every request fitted;
/// and every request still carries every earlier user message, or a summary that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_stays_within_the_budget_and_keeps_every_request() {
    const WINDOW: u64 = 12_000;
    const WORKFLOWS: usize = 12;
    let read = |w: usize, t: usize, c: usize| {
        (
            format!("r{w}_{t}_{c}"),
            json!({"filePath": format!("src/f{}.ts", (w + t + c) % 10)}).to_string(),
        )
    };
    let mut script = Vec::new();
    for w in 0..WORKFLOWS {
        for t in 0..5 {
            let mut turn = Turn::default().usage(0, 20);
            turn.input_tokens = None;
            let reads = if t == 1 || t == 4 { 4 } else { 5 };
            for c in 0..reads {
                let (id, args) = read(w, t, c);
                turn = turn.call(&id, "read_file", &[&args]);
            }
            if t == 1 {
                let plan = json!({"acceptanceCriteria": ["done"], "tasks": [{"id": 1,
                    "summary": "change it", "description": "change it",
                    "acceptanceCriteria": ["ok"], "dependencies": []}]});
                turn = turn.call(&format!("p{w}"), "submit_plan", &[&plan.to_string()]);
            }
            if t == 4 {
                turn = turn.call(&format!("d{w}"), "done", &["{}"]);
            }
            script.push(Reply::Turn(turn));
        }
    }
    let fake = FakeLlm::start(script)
        .await
        .with_context_window(WINDOW)
        .with_auto_summaries();
    let tmp = tempfile::tempdir().unwrap();
    let s = server_with(&fake, tmp.path(), |c| {
        c.providers.context_tokens = Some(WINDOW as u32);
    })
    .await;
    let dir = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::create_dir_all(dir.join("src")).unwrap();
    for f in 0..10 {
        let body: String = (0..60)
            .map(|i| format!("export const value{f}_{i} = compute({i}, \"{f}\"); // line {i}\n"))
            .collect();
        assert!(body.len() > 2_500);
        std::fs::write(dir.join(format!("src/f{f}.ts")), body).unwrap();
    }
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    for w in 0..WORKFLOWS {
        // Long requests: the thread outgrows its share and is summarized.
        let text = format!(
            "request {w}: make marker-{w} happen. {}",
            "Keep the style consistent with the rest of the module. ".repeat(25)
        );
        let wf = trigger(&s, &text).await;
        let frames = sse.until_end(&wf, Duration::from_secs(60)).await;
        let end = frames.last().unwrap();
        assert_eq!(
            end.data["status"],
            "complete",
            "workflow {w}: {:#}",
            s.workflow(&wf).await
        );
    }
    let requests = fake.requests();
    let turns: Vec<_> = requests
        .iter()
        .filter(|r| fake_llm::tool_count(&r.body) > 0)
        .collect();
    assert_eq!(turns.len(), WORKFLOWS * 5);
    let summaries = requests.len() - turns.len();
    assert!(summaries > 0, "the session needed summaries");
    let mut shortened = 0;
    let mut w = 0;
    for (i, r) in turns.iter().enumerate() {
        let limit = r.body["max_tokens"].as_u64().unwrap();
        assert!(
            r.prompt_tokens + limit <= WINDOW,
            "request {i}: {} + {limit} tokens",
            r.prompt_tokens
        );
        let text = r.body.to_string();
        w = i / 5;
        for earlier in 0..=w {
            assert!(
                text.contains(&format!("marker-{earlier}")),
                "request {i} (workflow {w}) lost request {earlier}"
            );
        }
        shortened += usize::from(text.contains("left out to save context"));
    }
    assert_eq!(w, WORKFLOWS - 1);
    assert!(shortened > 0, "old tool results were shortened");
    // The thread's summary is in the conversation.
    let (_, page) = s
        .get_json("/projects/p/branches/b/messages?limit=200")
        .await;
    assert!(
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["kind"] == "summary"),
        "{page:#}"
    );
    // Cache reads, and the workflows' usage records them. (This window is so tight that
    // nearly every call must cut the results of the one before, which changes the prefix;
    // `benches/conversation.rs` measures the share in a roomier one.)
    let read: u64 = turns.iter().map(|r| r.cache_read_tokens).sum();
    assert!(read > 0);
    assert!(
        turns
            .iter()
            .all(|r| r.body.to_string().contains("cache_control"))
    );
    let (_, last) = s.get_json("/projects/p/branches/b/messages?limit=1").await;
    let wf = last["messages"][0]["workflowId"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &s.workflow(&wf).await["usage"];
    assert!(usage["cacheReadTokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(
        usage["inputTokens"].as_u64().unwrap() > usage["cacheReadTokens"].as_u64().unwrap(),
        "{usage}"
    );
    s.server.shutdown().await;
}

/// An image attached to a trigger reaches each provider in its own wire format, in the
/// workflow's first message (the journal and the conversation keep only its id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_image_reaches_each_provider_in_its_format() {
    for (model, needle) in [
        ("anthropic:claude-sonnet-4-5", r#""type":"image""#),
        ("openai:gpt-4.1", r#""type":"input_image""#),
        ("ollama:llava:13b", r#""type":"image_url""#),
        ("gemini:gemini-2.5-pro", r#""inlineData""#),
    ] {
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["a red pixel"]))]).await;
        let tmp = tempfile::tempdir().unwrap();
        let s = server(&fake, tmp.path()).await;
        let mut sse = s.sse("/stream/p/b", Some("0")).await;
        let (status, body) = s
            .post_json(
                "/trigger",
                json!({"projectId": "p", "branchId": "b", "model": model,
                "message": {"content": [
                    {"type": "text", "text": "what is in this picture?"},
                    {"type": "image", "image": fake_llm::PNG_1X1_BASE64, "mediaType": "image/png"}
                ]}}),
            )
            .await;
        assert_eq!(status, 202, "{model}: {body}");
        let wf = body["workflowId"].as_str().unwrap().to_string();
        let frames = sse.until_end(&wf, Duration::from_secs(60)).await;
        assert_eq!(frames.last().unwrap().data["status"], "complete", "{model}");
        let request = fake.requests()[0].body.to_string();
        assert!(request.contains(needle), "{model}: {request}");
        assert!(request.contains(fake_llm::PNG_1X1_BASE64), "{model}");
        // The conversation keeps the reference, not the bytes.
        let (_, page) = s.get_json("/projects/p/branches/b/messages").await;
        let user = &page["messages"][0];
        assert_eq!(user["attachments"][0]["mediaType"], "image/png", "{page:#}");
        assert!(!page.to_string().contains(fake_llm::PNG_1X1_BASE64));
        s.server.shutdown().await;
    }
}
