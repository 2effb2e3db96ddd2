//! The context budget over a replayed session: 12 follow-ups of 5 model turns each (60 turns)
//! with 5 tool calls per turn (300 tool calls), each result a few kilobytes as `read_file` and
//! `grep` give.
//!
//! 1. Request building, in process: for every model call of the session, the engine's own
//!    work to build the request — the thread of earlier workflows, the workflow's messages,
//!    tool results shortened to the budget — timed (median, p99 and max; the target is under
//!    1 ms p99 at turn 60), with prompt tokens per call (median, max) with the budget
//!    (`WELDR_CONTEXT_TOKENS`, default here 16,384, a local model's usual window) and without (every result whole: what the
//!    requests would be with no budget).
//! 2. The whole session through the server against the fake Anthropic server (which counts
//!    tokens and simulates Anthropic's prompt cache from the `cache_control` breakpoints): the
//!    prompt tokens it received per call (median, max) and the share served from the cache.
//!
//! Run: `cargo bench --bench conversation` (or `scripts/bench.sh conversation`). Prints
//! Markdown.

mod common;
#[path = "../tests/common/fake_llm.rs"]
mod fake_llm;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use weldr_agent::llm::{Message, Part, Role};
use weldr_agent::workflow::context::{self, Budget};
use weldr_storage::conversation::{ConversationEntry, EntryKind, ToolCallNote};

const WORKFLOWS: usize = 12;
const TURNS: usize = 5;
const CALLS: usize = 5;
const RESULT_BYTES: usize = 3_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tool result like a source file: numbered lines of code.
fn result_text(seed: usize) -> String {
    let mut out = String::new();
    let mut i = 0;
    while out.len() < RESULT_BYTES {
        out.push_str(&format!(
            "{:>4}: export function handler{seed}_{i}(req: Request) {{ return respond(req, {i}); }}\n",
            i + 1
        ));
        i += 1;
    }
    out
}

fn turn(w: usize, t: usize) -> Message {
    Message {
        role: Role::Assistant,
        parts: (0..CALLS)
            .map(|c| Part::ToolCall {
                id: format!("w{w}t{t}c{c}"),
                name: "read_file".into(),
                input: json!({"filePath": format!("src/module{w}_{t}_{c}.ts")}),
            })
            .collect(),
    }
}

fn results(w: usize, t: usize) -> Message {
    Message {
        role: Role::User,
        parts: (0..CALLS)
            .map(|c| Part::ToolResult {
                id: format!("w{w}t{t}c{c}"),
                name: "read_file".into(),
                content: result_text(w * 100 + t * 10 + c),
                is_error: false,
            })
            .collect(),
    }
}

/// The conversation entries of workflows `0..w` (a user message and an outcome each).
fn thread_entries(w: usize) -> Vec<ConversationEntry> {
    let mut out = Vec::new();
    for i in 0..w {
        out.push(ConversationEntry::new(
            format!("u{i}"),
            EntryKind::User,
            format!("Follow-up {i}: change the handlers in module {i} to validate their input"),
            0,
        ));
        let mut a = ConversationEntry::new(format!("a{i}"), EntryKind::Assistant, String::new(), 0);
        a.status = Some("complete".into());
        a.version = Some(i as u64 + 2);
        a.files_changed = vec![format!("src/module{i}_0_0.ts")];
        a.tool_calls = (0..TURNS * CALLS)
            .map(|c| ToolCallNote {
                name: "read_file".into(),
                target: format!("src/module{i}_{}_{}.ts", c / CALLS, c % CALLS),
                is_error: false,
            })
            .collect();
        out.push(a);
    }
    out
}

/// The thread as the engine gives it: when it takes more than its share of the budget, the
/// older entries are summarized (here by the summary the engine falls back to).
fn thread_within_share(entries: &[ConversationEntry], limit: u64) -> Vec<Message> {
    let whole = context::thread_messages(None, entries);
    let size: u64 = whole.iter().map(context::message_tokens).sum();
    if (size as f64) <= limit as f64 * context::THREAD_SHARE {
        return whole;
    }
    let cut = context::thread_cut(entries.iter(), limit as f64 * context::THREAD_KEEP_SHARE);
    let old = context::thread_messages(None, &entries[..cut]);
    let summary = ConversationEntry::new(
        "s".into(),
        EntryKind::Summary,
        context::extractive_summary(&old),
        0,
    );
    context::thread_messages(Some(&summary), &entries[cut..])
}

struct Series {
    summaries: usize,
    build: Vec<Duration>,
    build_last: Vec<Duration>,
    tokens: Vec<f64>,
}

/// Every model call of the session built as the engine builds it, within `window`.
fn session(window: u32, system: &str) -> Series {
    let budget = Budget::new(window);
    let max_tokens = 16_384.min(budget.output_cap());
    let limit = budget.prompt_limit(max_tokens);
    let fixed = context::fixed_tokens(system, &weldr_agent::tools::specs());
    let mut series = Series {
        summaries: 0,
        build: Vec::new(),
        build_last: Vec::new(),
        tokens: Vec::new(),
    };
    for w in 0..WORKFLOWS {
        let entries = thread_entries(w);
        let thread = thread_within_share(&entries, limit);
        let mut messages = vec![Message::user_text(format!(
            "The project's files now:\nsrc/index.ts\n\nFollow-up {w}: change the handlers"
        ))];
        let mut watermark = 0;
        let mut summary: Option<(usize, String)> = None;
        for t in 0..TURNS {
            let started = Instant::now();
            let mut elapsed = Duration::ZERO;
            let fitted = loop {
                let own = context::own_messages(&messages, summary.as_ref(), None, &[]);
                let fitted = context::fit(&thread, own, fixed, limit, &budget, &mut watermark);
                elapsed += started.elapsed();
                if let Some(f) = fitted {
                    break f;
                }
                // Over even with older results shortened: the engine has the model summarize
                // the older turns (once; its latency is the model's, not counted here). The
                // summary that stands in is the one it writes when the model cannot.
                let (cut, old) = context::to_summarize(&messages, summary.as_ref(), limit)
                    .expect("something to summarize");
                summary = Some((cut, context::extractive_summary(&old)));
                watermark = 0;
                series.summaries += 1;
            };
            let tokens = fixed
                + fitted
                    .messages
                    .iter()
                    .map(context::message_tokens)
                    .sum::<u64>();
            series.build.push(elapsed);
            if w == WORKFLOWS - 1 {
                series.build_last.push(elapsed);
            }
            series.tokens.push(tokens as f64);
            messages.push(turn(w, t));
            messages.push(results(w, t));
        }
    }
    series
}

/// What the fake Anthropic server received over the whole session.
struct Served {
    prompt: Vec<f64>,
    cache_read: u64,
    total: u64,
    summaries: usize,
}

/// The session through the server (in process) against the fake Anthropic server, with the
/// context window `window` (None: the model's, 200,000 for Claude).
async fn served_session(window: Option<u32>) -> Served {
    use fake_llm::{FakeLlm, Reply, Turn};
    let mut script = Vec::new();
    for w in 0..WORKFLOWS {
        for t in 0..TURNS {
            let mut turn = Turn::default().usage(0, 20);
            turn.input_tokens = None;
            let reads = if t == 1 || t == TURNS - 1 {
                CALLS - 1
            } else {
                CALLS
            };
            for c in 0..reads {
                turn = turn.call(
                    &format!("r{w}_{t}_{c}"),
                    "read_file",
                    &[&json!({"filePath": format!("src/f{}.ts", (w + t + c) % 10)}).to_string()],
                );
            }
            if t == 1 {
                let plan = json!({"acceptanceCriteria": ["done"], "tasks": [{"id": 1,
                    "summary": "change it", "description": "change it",
                    "acceptanceCriteria": ["ok"], "dependencies": []}]});
                turn = turn.call(&format!("p{w}"), "submit_plan", &[&plan.to_string()]);
            }
            if t == TURNS - 1 {
                turn = turn.call(&format!("d{w}"), "done", &["{}"]);
            }
            script.push(Reply::Turn(turn));
        }
    }
    let mut fake = FakeLlm::start(script).await.with_auto_summaries();
    if let Some(w) = window {
        fake = fake.with_context_window(u64::from(w));
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut config = weldr_agent::config::Config::for_workspace(tmp.path());
    config.providers = fake.keys();
    config.providers.context_tokens = window;
    weldr_agent::install_crypto_provider();
    let app = weldr_agent::App::open(config).unwrap();
    weldr_agent::app::prepare(&app).await.unwrap();
    let token = weldr_agent::auth::tokens::create(&app.store, "bench")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = weldr_agent::server::start_on(app, listener).unwrap();
    let base = server.url();
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    post("/projects", json!({"projectId": "p"})).await.unwrap();
    post("/projects/p/branches", json!({"branchId": "b"}))
        .await
        .unwrap();
    let dir = weldr_agent::branches::branch_dir(
        &server.app.config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::create_dir_all(dir.join("src")).unwrap();
    for f in 0..10 {
        let body: String = (0..60)
            .map(|i| format!("export const value{f}_{i} = compute({i}, \"{f}\"); // line {i}\n"))
            .collect();
        std::fs::write(dir.join(format!("src/f{f}.ts")), body).unwrap();
    }
    for w in 0..WORKFLOWS {
        let res: serde_json::Value = post(
            "/trigger",
            json!({"projectId": "p", "branchId": "b", "model": "anthropic:claude-sonnet-4-5",
                   "message": {"content": [{"type": "text", "text": format!("request {w}")}]}}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let wf = res["workflowId"].as_str().expect("triggered").to_string();
        loop {
            let w: serde_json::Value = http
                .get(format!("{base}/workflows/{wf}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match w["status"].as_str() {
                Some("complete") => break,
                Some("failed" | "cancelled") => panic!("workflow failed: {w}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    server.shutdown().await;
    let requests = fake.requests();
    let turns: Vec<_> = requests
        .iter()
        .filter(|r| fake_llm::tool_count(&r.body) > 0)
        .collect();
    Served {
        prompt: turns.iter().map(|r| r.prompt_tokens as f64).collect(),
        cache_read: turns.iter().map(|r| r.cache_read_tokens).sum(),
        total: turns.iter().map(|r| r.prompt_tokens).sum(),
        summaries: requests.len() - turns.len(),
    }
}

fn main() {
    let window = env_num("WELDR_CONTEXT_TOKENS", 16_384) as u32;
    let repeats = env_num("BENCH_REPEATS", 20).max(1) as usize;
    let system = "You are a coding agent working in a project directory. Carry out the task \
                  with the tools, then call `done`.";
    // Warm up, then repeat the whole session: the build times of every repeat together.
    let _ = session(window, system);
    let mut with = Vec::new();
    let mut last = Vec::new();
    let mut tokens_with = Vec::new();
    let mut summaries = 0;
    for _ in 0..repeats {
        let s = session(window, system);
        with.extend(s.build);
        last.extend(s.build_last);
        tokens_with = s.tokens;
        summaries = s.summaries;
    }
    let without = session(u32::MAX / 2, system);
    with.sort();
    last.sort();
    let calls = WORKFLOWS * TURNS;
    println!(
        "### Context budget: a {calls}-turn session, {} tool calls ({} runs)\n",
        calls * CALLS,
        repeats
    );
    println!("| | prompt tokens per call, median | max |");
    println!("|---|---:|---:|");
    println!(
        "| with the budget ({window} tokens) | {:.0} | {:.0} |",
        median(&tokens_with),
        tokens_with.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| without (every result whole) | {:.0} | {:.0} |",
        median(&without.tokens),
        without.tokens.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "\nOlder turns summarized {} times in the session (a summary is written once and kept).\n",
        summaries
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "Through the server, against the fake Anthropic server (its token counts; its cache \
         simulates Anthropic's breakpoints and 20-block lookback):\n"
    );
    println!(
        "| window | prompt tokens per call, median | max | served from the cache | summaries |"
    );
    println!("|---|---:|---:|---:|---:|");
    for window in [Some(window), Some(65_536), None] {
        let s = rt.block_on(served_session(window));
        println!(
            "| {} | {:.0} | {:.0} | {:.0}% | {} |",
            window.map_or("200,000 (the model's; no cut needed)".to_string(), |w| w
                .to_string()),
            median(&s.prompt),
            s.prompt.iter().cloned().fold(0.0, f64::max),
            100.0 * s.cache_read as f64 / s.total.max(1) as f64,
            s.summaries
        );
    }
    println!();
    println!("| request building | median | p99 | max |");
    println!("|---|---:|---:|---:|");
    println!(
        "| every call | {:.3} ms | {:.3} ms | {:.3} ms |",
        ms(percentile(&with, 0.5)),
        ms(percentile(&with, 0.99)),
        ms(*with.last().unwrap())
    );
    println!(
        "| the last workflow (turns 56–60) | {:.3} ms | {:.3} ms | {:.3} ms |",
        ms(percentile(&last, 0.5)),
        ms(percentile(&last, 0.99)),
        ms(*last.last().unwrap())
    );
}
