//! A fake LLM provider server on 127.0.0.1:0 that speaks the real streaming wire formats of
//! Anthropic Messages, OpenAI Chat Completions, OpenAI Responses and Gemini
//! `streamGenerateContent` (chosen by the request path), plays a script of replies in order,
//! and records every request.
//!
//! Like the real services it refuses, before taking a reply off the script, requests that
//! break their rules (see [`validate`]), and those that do not fit the context window set
//! with [`FakeLlm::with_context_window`]. It counts prompt tokens with one estimate,
//! [`fake_tokens`], and reports usage with it (unless a turn scripts its own).
//!
//! Prompt caching is simulated. Anthropic: at each `cache_control` breakpoint the prefix up
//! to it (tools, system, messages up to that block; canonical JSON without the
//! `cache_control` fields) is remembered; a later request whose prefix, at a breakpoint or up
//! to 20 blocks before one, matches a remembered one reads the longest such prefix from the
//! cache (`cache_read_input_tokens`), writes the rest up to its last breakpoint
//! (`cache_creation_input_tokens`), and `input_tokens` is the remainder, as the real API
//! reports them. OpenAI (both APIs) and Gemini cache by prefix on their own: the longest
//! prefix (at message boundaries) an earlier request of the same wire sent is reported as
//! cached (`cached_tokens`, `cachedContentTokenCount`). Prefixes shorter than
//! [`FakeLlm::with_min_cache_tokens`] (default 0; the real services' minimum is about 1,024)
//! are not cached.
//!
//! Use it from a test with `#[path = "common/fake_llm.rs"] mod fake_llm;` and point providers
//! at it with [`FakeLlm::keys`].
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weldr_agent::config::{ProviderKeys, Secret};

pub const TEST_KEY: &str = "test-key-123";

/// One scripted tool call; the arguments are streamed in these fragments (Gemini, which sends
/// whole calls, gets them joined).
#[derive(Debug, Clone)]
pub struct ScriptCall {
    pub id: String,
    pub name: String,
    pub args_chunks: Vec<String>,
}

/// One scripted assistant turn.
#[derive(Debug, Clone, Default)]
pub struct Turn {
    /// Reasoning deltas, and the signature (Anthropic) / thought signature (Gemini).
    pub reasoning: Vec<String>,
    pub signature: Option<String>,
    pub text: Vec<String>,
    pub calls: Vec<ScriptCall>,
    /// The prompt tokens to report; None: the fake's estimate ([`fake_tokens`]).
    pub input_tokens: Option<u64>,
    pub output_tokens: u64,
    /// `max_tokens` instead of the natural stop reason.
    pub max_tokens: bool,
    /// This wire's stop / finish reason instead of the natural one (`refusal`,
    /// `content_filter`, `SAFETY`, `MALFORMED_FUNCTION_CALL`, ...).
    pub stop: Option<String>,
}

impl Turn {
    /// A text answer streamed in these chunks.
    pub fn text(chunks: &[&str]) -> Self {
        Self {
            text: chunks.iter().map(|s| s.to_string()).collect(),
            output_tokens: 7,
            ..Self::default()
        }
    }

    pub fn reasoning(mut self, chunks: &[&str], signature: Option<&str>) -> Self {
        self.reasoning = chunks.iter().map(|s| s.to_string()).collect();
        self.signature = signature.map(str::to_string);
        self
    }

    /// Adds a tool call whose arguments arrive in `args_chunks`.
    pub fn call(mut self, id: &str, name: &str, args_chunks: &[&str]) -> Self {
        self.calls.push(ScriptCall {
            id: id.into(),
            name: name.into(),
            args_chunks: args_chunks.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// This wire's stop / finish reason instead of the natural one.
    pub fn stop(mut self, reason: &str) -> Self {
        self.stop = Some(reason.into());
        self
    }

    /// Reports `input` prompt tokens (all of them, cached ones included) and `output` tokens.
    pub fn usage(mut self, input: u64, output: u64) -> Self {
        self.input_tokens = Some(input);
        self.output_tokens = output;
        self
    }
}

/// A plan for `submit_plan`: one task that writes hello.txt.
pub fn plan_args() -> String {
    json!({
        "acceptanceCriteria": ["hello.txt says hello"],
        "tasks": [{"id": 1, "summary": "write hello", "description": "create hello.txt",
                   "acceptanceCriteria": ["exists"], "dependencies": []}]
    })
    .to_string()
}

/// A turn that calls one tool with `args`.
pub fn call(id: &str, name: &str, args: Value) -> Reply {
    Reply::Turn(Turn::default().call(id, name, &[&args.to_string()]))
}

#[derive(Debug, Clone)]
pub enum Reply {
    Turn(Turn),
    /// An error status with a provider-style JSON error body.
    Status {
        code: u16,
        message: String,
        retry_after: Option<u32>,
    },
    /// 200 and an event stream whose data is not JSON.
    Malformed,
    /// 200, a first text delta, then the connection closes.
    Truncated,
    /// 200 and these raw event-stream pieces, as given (any wire).
    Raw(Vec<String>),
    /// 200, then nothing until the client gives up.
    Stall,
}

impl Reply {
    pub fn status(code: u16, message: &str) -> Self {
        Reply::Status {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A request the server got.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// The prompt's tokens by the fake's estimate ([`fake_tokens`] of the body).
    pub prompt_tokens: u64,
    /// What the simulated prompt cache served and took in (0 for a refused request).
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    requests: Vec<Recorded>,
    /// Responses API: the reasoning item (id, encrypted content) each function call
    /// (call_id) was made with; the call must come back after it.
    issued: std::collections::HashMap<String, (String, String)>,
    /// Responses API: numbers for item ids.
    next_item: u64,
    /// Requests whose estimated prompt (plus output limit, where the service counts it) is
    /// larger are refused.
    context_window: Option<u64>,
    /// Prefixes shorter than this are not cached.
    min_cache_tokens: u64,
    /// A request that offers no tools (a summary the engine asks for) is answered with a
    /// summary of its text, off the script.
    auto_summaries: bool,
    /// Anthropic: prefixes written at a breakpoint, by hash, with their tokens.
    anthropic_cache: HashMap<u64, u64>,
    /// OpenAI, Responses, Gemini: every prefix sent, by wire and hash.
    prefix_cache: HashSet<(Wire, u64)>,
}

pub struct FakeLlm {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    pub async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, st).await;
                });
            }
        });
        Self { addr, state, task }
    }

    pub fn push(&self, reply: Reply) {
        self.state.lock().unwrap().script.push_back(reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The estimated prompt tokens of every request so far, in order.
    pub fn prompt_tokens(&self) -> Vec<u64> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.prompt_tokens)
            .collect()
    }

    /// Refuses, as the real service does, a request whose estimated prompt tokens (plus its
    /// output limit, for Anthropic and OpenAI) exceed `tokens`.
    pub fn with_context_window(self, tokens: u64) -> Self {
        self.state.lock().unwrap().context_window = Some(tokens);
        self
    }

    /// Answers every request without tools (the engine's summaries of older turns) with an
    /// extractive summary — each `USER:` line of the transcript it was given, and the tool
    /// calls — without taking a reply off the script.
    pub fn with_auto_summaries(self) -> Self {
        self.state.lock().unwrap().auto_summaries = true;
        self
    }

    /// Caches no prefix shorter than `tokens` (the real services' minimum is about 1,024).
    pub fn with_min_cache_tokens(self, tokens: u64) -> Self {
        self.state.lock().unwrap().min_cache_tokens = tokens;
        self
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Keys for every provider (`TEST_KEY`) with every base URL pointing here.
    pub fn keys(&self) -> ProviderKeys {
        keys_for(&self.base())
    }

    /// A base URL where nothing listens (connection refused).
    pub async fn down_base() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        format!("http://{addr}")
    }
}

/// Provider keys with every base URL under `base` (`/v1` for the OpenAI-style ones).
pub fn keys_for(base: &str) -> ProviderKeys {
    ProviderKeys {
        anthropic_api_key: Some(Secret(TEST_KEY.into())),
        openai_api_key: Some(Secret(TEST_KEY.into())),
        gemini_api_key: Some(Secret(TEST_KEY.into())),
        anthropic_base_url: Some(base.to_string()),
        openai_base_url: Some(format!("{base}/v1")),
        gemini_base_url: Some(base.to_string()),
        ollama_base_url: format!("{base}/v1"),
        default_model: "anthropic:claude-test".into(),
        max_output_tokens: None,
        context_tokens: None,
        openai_responses: true,
        replay_dir: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Anthropic,
    OpenAi,
    Responses,
    Gemini,
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut rl = request_line.split(' ');
    let method = rl.next().unwrap_or_default().to_string();
    let path = rl.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // Gemini names the model in the path.
    let path_model = path
        .split("/models/")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_default()
        .to_string();
    let wire = if path.contains(":streamGenerateContent") {
        Wire::Gemini
    } else if path.ends_with("/responses") {
        Wire::Responses
    } else if path.ends_with("/chat/completions") {
        Wire::OpenAi
    } else {
        Wire::Anthropic
    };
    // The real APIs refuse requests that break their rules before anything is generated, with
    // their own error bodies; so does this fake, without taking a reply off the script.
    let mut refusal = validate(wire, &body, &path_model);
    if wire == Wire::Responses && refusal.is_none() {
        let st = state.lock().unwrap();
        refusal = validate_reasoning_round_trip(&body, &st.issued);
    }
    let item_base;
    let prompt_tokens = fake_tokens(&body);
    let mut prompt = Prompt {
        total: prompt_tokens,
        ..Prompt::default()
    };
    let reply = {
        let mut st = state.lock().unwrap();
        item_base = st.next_item;
        st.next_item += 100;
        if refusal.is_none() {
            refusal = st
                .context_window
                .and_then(|window| context_refusal(wire, &body, prompt_tokens, window));
        }
        if refusal.is_none() {
            (prompt.cache_read, prompt.cache_write) = st.cache(wire, &body);
        }
        st.requests.push(Recorded {
            method,
            path,
            headers,
            body,
            prompt_tokens,
            cache_read_tokens: prompt.cache_read,
            cache_write_tokens: prompt.cache_write,
        });
        let offers_tools = st
            .requests
            .last()
            .map(|r| tool_count(&r.body) > 0)
            .unwrap_or(true);
        match &refusal {
            Some(_) => None,
            None if st.auto_summaries && !offers_tools => {
                let text = st
                    .requests
                    .last()
                    .map(|r| summary_of(&r.body))
                    .unwrap_or_default();
                Some(Reply::Turn(Turn::text(&[&text])))
            }
            None => Some(
                st.script
                    .pop_front()
                    .unwrap_or_else(|| Reply::status(500, "the fake LLM's script is exhausted")),
            ),
        }
    };
    let reply = match (reply, refusal) {
        (Some(Reply::Turn(turn)), _) if wire == Wire::Responses => {
            let prompt = prompt.scripted(turn.input_tokens);
            let (events, issued) = responses(&turn, &prompt, item_base);
            state.lock().unwrap().issued.extend(issued);
            start_stream(&mut sock).await?;
            for e in events {
                chunk(&mut sock, &e).await?;
            }
            chunk(&mut sock, "").await?;
            return Ok(());
        }
        (Some(r), _) => r,
        (None, Some(error)) => {
            let body = error.to_string();
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(body.as_bytes()).await?;
            sock.shutdown().await?;
            return Ok(());
        }
        (None, None) => unreachable!(),
    };
    match reply {
        Reply::Status {
            code,
            message,
            retry_after,
        } => {
            let body = json!({"type": "error", "error": {"type": "test_error", "message": message, "code": code}})
                .to_string();
            let mut head = format!(
                "HTTP/1.1 {code} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            if let Some(s) = retry_after {
                head.push_str(&format!("retry-after: {s}\r\n"));
            }
            head.push_str("\r\n");
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(body.as_bytes()).await?;
            sock.shutdown().await?;
        }
        Reply::Malformed => {
            start_stream(&mut sock).await?;
            chunk(&mut sock, "data: {\"type\": not json\n\n").await?;
            chunk(&mut sock, "").await?;
        }
        Reply::Truncated => {
            start_stream(&mut sock).await?;
            let partial = Turn::text(&["partial"]);
            let events = match wire {
                Wire::Anthropic => anthropic(&partial, &prompt),
                Wire::OpenAi => openai(&partial, &prompt),
                Wire::Responses => responses(&partial, &prompt, 0).0,
                Wire::Gemini => gemini(&partial, &prompt),
            };
            // Up to and including the first text delta.
            let keep = match wire {
                Wire::Anthropic => 4,
                Wire::OpenAi => 2,
                Wire::Responses => 3,
                Wire::Gemini => 1,
            };
            for e in events.iter().take(keep) {
                chunk(&mut sock, e).await?;
            }
            sock.shutdown().await?;
        }
        Reply::Raw(events) => {
            start_stream(&mut sock).await?;
            for e in events {
                chunk(&mut sock, &e).await?;
            }
            chunk(&mut sock, "").await?;
        }
        Reply::Stall => {
            start_stream(&mut sock).await?;
            let mut rest = [0u8; 64];
            // Wait for the client to close the connection.
            while sock.read(&mut rest).await? > 0 {}
        }
        Reply::Turn(turn) => {
            start_stream(&mut sock).await?;
            let prompt = prompt.scripted(turn.input_tokens);
            let events = match wire {
                Wire::Anthropic => anthropic(&turn, &prompt),
                Wire::OpenAi => openai(&turn, &prompt),
                Wire::Responses => responses(&turn, &prompt, item_base).0,
                Wire::Gemini => gemini(&turn, &prompt),
            };
            for e in events {
                chunk(&mut sock, &e).await?;
            }
            chunk(&mut sock, "").await?;
        }
    }
    Ok(())
}

/// The request rules each real API enforces (from the providers' API references), as the
/// error body it answers with; None when the request is valid.
/// How many tools a request offers, in any wire format.
pub fn tool_count(body: &Value) -> usize {
    let direct = body["tools"].as_array().map_or(0, Vec::len);
    let gemini: usize = body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|t| t["functionDeclarations"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    direct.max(gemini)
}

/// An extractive summary of a summary request: its `USER:` lines and calls, as a model would
/// keep them.
fn summary_of(body: &Value) -> String {
    let text = body.to_string();
    let text = text.replace("\\n", "\n");
    let mut out = String::from("Summary:\n");
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("USER:") || line.starts_with("ASSISTANT calls") {
            out.push_str(&line.chars().take(300).collect::<String>());
            out.push('\n');
        }
    }
    out
}

pub fn validate(wire: Wire, body: &Value, path_model: &str) -> Option<Value> {
    match wire {
        Wire::Anthropic => validate_anthropic(body).map(|m| {
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": m}})
        }),
        Wire::OpenAi => validate_openai(body).map(|(m, code)| {
            json!({"error": {"message": m, "type": "invalid_request_error", "param": null, "code": code}})
        }),
        Wire::Responses => validate_responses(body).map(|(m, code)| {
            json!({"error": {"message": m, "type": "invalid_request_error", "param": "input", "code": code}})
        }),
        Wire::Gemini => validate_gemini(body, path_model).map(|m| {
            json!({"error": {"code": 400, "message": m, "status": "INVALID_ARGUMENT"}})
        }),
    }
}

fn tool_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// OpenAI: function names, every array schema has `items`, every assistant tool call is
/// answered by a `tool` message before the next other message, and a `tool` message answers
/// a call. DeepSeek-style thinking servers (model `deepseek-*`) want `reasoning_content` back
/// on assistant messages with tool calls.
fn validate_openai(body: &Value) -> Option<(String, Value)> {
    if !body["model"].is_string() {
        return Some(("you must provide a model parameter".into(), Value::Null));
    }
    for (i, t) in body["tools"].as_array().into_iter().flatten().enumerate() {
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        if t["type"] != "function" || !tool_name_ok(name) {
            return Some((
                format!("Invalid 'tools[{i}].function.name': string does not match pattern."),
                json!("invalid_value"),
            ));
        }
        if let Some(path) = missing_items(&f["parameters"], "") {
            return Some((
                format!(
                    "Invalid schema for function '{name}': In context=({path}), array schema missing items."
                ),
                json!("invalid_function_parameters"),
            ));
        }
    }
    let Some(messages) = body["messages"].as_array() else {
        return Some((
            "Missing required parameter: 'messages'.".into(),
            Value::Null,
        ));
    };
    if let Some(e) = validate_openai_content(messages) {
        return Some(e);
    }
    let thinking_server = body["model"]
        .as_str()
        .is_some_and(|m| m.starts_with("deepseek"));
    let mut pending: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if role == "tool" {
            let id = m["tool_call_id"].as_str().unwrap_or_default();
            match pending.iter().position(|p| p == id) {
                Some(at) => {
                    pending.remove(at);
                }
                None => {
                    return Some((
                        format!(
                            "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'. (messages.[{i}])"
                        ),
                        Value::Null,
                    ));
                }
            }
            continue;
        }
        if !pending.is_empty() {
            return Some((
                format!(
                    "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                    pending.join(", ")
                ),
                Value::Null,
            ));
        }
        if role == "assistant"
            && let Some(calls) = m["tool_calls"].as_array()
        {
            if thinking_server && !m["reasoning_content"].is_string() {
                return Some((
                    format!(
                        "Missing `reasoning_content` field in the assistant message at message index {i}"
                    ),
                    Value::Null,
                ));
            }
            pending = calls
                .iter()
                .map(|c| c["id"].as_str().unwrap_or_default().to_string())
                .collect();
        }
    }
    None
}

/// OpenAI Responses: function tools (name, `items` on every array), and every
/// `function_call_output` answers an earlier `function_call` that gets exactly its output.
fn validate_responses(body: &Value) -> Option<(String, Value)> {
    if !body["model"].is_string() {
        return Some(("Missing required parameter: 'model'.".into(), Value::Null));
    }
    for (i, t) in body["tools"].as_array().into_iter().flatten().enumerate() {
        let name = t["name"].as_str().unwrap_or_default();
        if t["type"] != "function" || !tool_name_ok(name) {
            return Some((
                format!("Invalid 'tools[{i}].name': string does not match pattern."),
                json!("invalid_value"),
            ));
        }
        if let Some(path) = missing_items(&t["parameters"], "") {
            return Some((
                format!(
                    "Invalid schema for function '{name}': In context=({path}), array schema missing items."
                ),
                json!("invalid_function_parameters"),
            ));
        }
    }
    let Some(input) = body["input"].as_array() else {
        return Some(("Missing required parameter: 'input'.".into(), Value::Null));
    };
    if let Some(e) = validate_responses_content(input) {
        return Some(e);
    }
    let mut calls: Vec<&str> = Vec::new();
    let mut answered: Vec<&str> = Vec::new();
    for item in input {
        match item["type"].as_str() {
            Some("function_call") => calls.push(item["call_id"].as_str().unwrap_or_default()),
            Some("function_call_output") => {
                let id = item["call_id"].as_str().unwrap_or_default();
                if !calls.contains(&id) {
                    return Some((
                        format!("No tool call found for function call output with call_id {id}."),
                        Value::Null,
                    ));
                }
                answered.push(id);
            }
            Some("reasoning") if !item["encrypted_content"].is_string() => {
                return Some((
                    "Reasoning items sent back without `store` need their `encrypted_content`."
                        .into(),
                    Value::Null,
                ));
            }
            _ => {}
        }
    }
    if let Some(open) = calls.iter().find(|c| !answered.contains(c)) {
        return Some((
            format!("No tool output found for function call {open}."),
            Value::Null,
        ));
    }
    None
}

/// OpenAI Responses with reasoning models: a function call made after a reasoning item comes
/// back with that item (its encrypted content) before it.
fn validate_reasoning_round_trip(
    body: &Value,
    issued: &std::collections::HashMap<String, (String, String)>,
) -> Option<Value> {
    let input = body["input"].as_array()?;
    for (at, item) in input.iter().enumerate() {
        if item["type"] != "function_call" {
            continue;
        }
        let Some((rs, enc)) = issued.get(item["call_id"].as_str().unwrap_or_default()) else {
            continue;
        };
        let found = input[..at].iter().any(|i| {
            i["type"] == "reasoning"
                && i["id"] == rs.as_str()
                && i["encrypted_content"] == enc.as_str()
        });
        if !found {
            return Some(
                json!({"error": {"message": format!("Item with call_id '{}' of type 'function_call' was provided without its required 'reasoning' item: '{rs}'.", item["call_id"].as_str().unwrap_or_default()), "type": "invalid_request_error", "param": "input", "code": null}}),
            );
        }
    }
    None
}

/// The first array without `items` in a JSON Schema, as OpenAI names its context.
fn missing_items(schema: &Value, context: &str) -> Option<String> {
    let obj = schema.as_object()?;
    let is_array = match &obj.get("type") {
        Some(Value::String(t)) => t == "array",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "array"),
        _ => false,
    };
    if is_array && !obj.contains_key("items") {
        return Some(context.trim_start_matches(", ").to_string());
    }
    if let Some(items) = obj.get("items")
        && let Some(found) = missing_items(items, &format!("{context}, 'items'"))
    {
        return Some(found);
    }
    for (name, sub) in obj.get("properties")?.as_object()? {
        if let Some(found) = missing_items(sub, &format!("{context}, 'properties', '{name}'")) {
            return Some(found);
        }
    }
    None
}

/// Gemini: `parameters` is the protobuf `Schema` (unknown fields refused, one type name,
/// arrays with items); a user turn answers every function call of the model turn before it
/// with exactly as many function responses; Gemini 3 models want the thought signature back
/// on the first function call of each model turn of the current exchange.
fn validate_gemini(body: &Value, model: &str) -> Option<String> {
    for (t, tool) in body["tools"].as_array().into_iter().flatten().enumerate() {
        for (d, decl) in tool["functionDeclarations"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if decl.get("parameters").is_some() && decl.get("parametersJsonSchema").is_some() {
                return Some(format!(
                    "tools[{t}].function_declarations[{d}]: parameters and parameters_json_schema are mutually exclusive"
                ));
            }
            if let Some(p) = decl.get("parameters")
                && let Some(m) = gemini_schema(
                    p,
                    &format!("tools[{t}].function_declarations[{d}].parameters"),
                )
            {
                return Some(m);
            }
        }
    }
    let contents = body["contents"].as_array()?;
    if let Some(m) = validate_gemini_content(contents) {
        return Some(m);
    }
    let mut calls_before = 0usize;
    for (i, c) in contents.iter().enumerate() {
        let parts = c["parts"].as_array().cloned().unwrap_or_default();
        let calls = parts
            .iter()
            .filter(|p| p.get("functionCall").is_some())
            .count();
        let responses = parts
            .iter()
            .filter(|p| p.get("functionResponse").is_some())
            .count();
        if c["role"] == "user" && (responses > 0 || calls_before > 0) && responses != calls_before {
            return Some(format!(
                "Please ensure that the number of function response parts is equal to the number of function call parts of the function call turn. (contents[{i}])"
            ));
        }
        calls_before = if c["role"] == "model" { calls } else { 0 };
    }
    let gemini3 = model.contains("gemini-3");
    if gemini3 {
        // The current exchange: after the last user turn that has text.
        let start = contents
            .iter()
            .rposition(|c| {
                c["role"] == "user"
                    && c["parts"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p.get("text").is_some()))
            })
            .unwrap_or(0);
        for (i, c) in contents.iter().enumerate().skip(start) {
            if c["role"] != "model" {
                continue;
            }
            let first_call = c["parts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p.get("functionCall").is_some());
            if let Some(p) = first_call
                && p.get("thoughtSignature").is_none()
            {
                return Some(format!(
                    "Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance. (contents[{i}])"
                ));
            }
        }
    }
    None
}

const GEMINI_SCHEMA_FIELDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
];

fn gemini_schema(schema: &Value, at: &str) -> Option<String> {
    let Some(obj) = schema.as_object() else {
        return Some(format!("Invalid value at '{at}': not an object"));
    };
    for (k, v) in obj {
        if !GEMINI_SCHEMA_FIELDS.contains(&k.as_str()) {
            return Some(format!(
                "Invalid JSON payload received. Unknown name \"{k}\" at '{at}': Cannot find field."
            ));
        }
        if k == "type" {
            let ok = v.as_str().is_some_and(|t| {
                ["string", "number", "integer", "boolean", "array", "object"]
                    .contains(&t.to_ascii_lowercase().as_str())
            });
            if !ok {
                return Some(format!("Invalid value at '{at}.type': {v}"));
            }
        }
    }
    if obj
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("array"))
        && !obj.contains_key("items")
    {
        return Some(format!(
            "* GenerateContentRequest.{at}.items: missing field."
        ));
    }
    if let Some(items) = obj.get("items")
        && let Some(m) = gemini_schema(items, &format!("{at}.items"))
    {
        return Some(m);
    }
    for (name, sub) in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(m) = gemini_schema(sub, &format!("{at}.properties[{name}]")) {
            return Some(m);
        }
    }
    None
}

/// Anthropic: tool names, `input_schema` of type object, and every `tool_use` answered by a
/// `tool_result` in the next message.
fn validate_anthropic(body: &Value) -> Option<String> {
    for (i, t) in body["tools"].as_array().into_iter().flatten().enumerate() {
        if !tool_name_ok(t["name"].as_str().unwrap_or_default()) {
            return Some(format!(
                "tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            ));
        }
        if t["input_schema"]["type"] != "object" {
            return Some(format!(
                "tools.{i}.input_schema.type: Input should be 'object'"
            ));
        }
    }
    if let Some(m) = validate_anthropic_content(body) {
        return Some(m);
    }
    let messages = body["messages"].as_array()?;
    for (i, m) in messages.iter().enumerate() {
        if m["role"] != "assistant" {
            continue;
        }
        let uses: Vec<&str> = m["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["type"] == "tool_use")
            .filter_map(|b| b["id"].as_str())
            .collect();
        if uses.is_empty() {
            continue;
        }
        let answered: Vec<&str> = messages
            .get(i + 1)
            .and_then(|n| n["content"].as_array())
            .into_iter()
            .flatten()
            .filter(|b| b["type"] == "tool_result")
            .filter_map(|b| b["tool_use_id"].as_str())
            .collect();
        let missing: Vec<&str> = uses.into_iter().filter(|u| !answered.contains(u)).collect();
        if !missing.is_empty() {
            return Some(format!(
                "messages.{}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                i + 1,
                missing.join(", ")
            ));
        }
    }
    None
}

async fn start_stream(sock: &mut TcpStream) -> std::io::Result<()> {
    sock.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    )
    .await
}

/// One HTTP chunk (the empty string ends the body).
async fn chunk(sock: &mut TcpStream, data: &str) -> std::io::Result<()> {
    sock.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    sock.flush().await
}

fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// Anthropic Messages stream events for `turn`, reporting `prompt` as the API does:
/// `input_tokens` without the tokens read from or written to the cache.
pub fn anthropic(turn: &Turn, prompt: &Prompt) -> Vec<String> {
    let mut out = Vec::new();
    let ev = |t: &str, v: Value| sse(Some(t), &v);
    let prompt_usage = json!({
        "input_tokens": prompt.total - prompt.cache_read - prompt.cache_write,
        "cache_creation_input_tokens": prompt.cache_write,
        "cache_read_input_tokens": prompt.cache_read,
    });
    let mut start_usage = prompt_usage.clone();
    start_usage["output_tokens"] = json!(1);
    out.push(ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant", "content": [], "model": "fake", "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    ));
    let mut index = 0;
    if !turn.reasoning.is_empty() {
        out.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": ""}}),
        ));
        for r in &turn.reasoning {
            out.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": r}}),
            ));
        }
        if let Some(s) = &turn.signature {
            out.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": s}}),
            ));
        }
        out.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    if !turn.text.is_empty() {
        out.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        ));
        out.push(ev("ping", json!({"type": "ping"})));
        for t in &turn.text {
            out.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        out.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    for c in &turn.calls {
        out.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}),
        ));
        for a in &c.args_chunks {
            out.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": a}}),
            ));
        }
        out.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    let stop = if let Some(s) = &turn.stop {
        s.as_str()
    } else if turn.max_tokens {
        "max_tokens"
    } else if turn.calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    };
    // The final usage is cumulative: the prompt's counts again, and the output tokens.
    let mut end_usage = prompt_usage;
    end_usage["output_tokens"] = json!(turn.output_tokens);
    out.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": end_usage}),
    ));
    out.push(ev("message_stop", json!({"type": "message_stop"})));
    out
}

/// OpenAI Chat Completions stream chunks for `turn`.
pub fn openai(turn: &Turn, prompt: &Prompt) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        sse(
            None,
            &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    let mut out = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for r in &turn.reasoning {
        out.push(chunk(json!({"reasoning_content": r}), Value::Null));
    }
    for t in &turn.text {
        out.push(chunk(json!({"content": t}), Value::Null));
    }
    for (i, c) in turn.calls.iter().enumerate() {
        // Compatible servers (Ollama, vLLM, llama.cpp) may send no id: a script call with an
        // empty id has none.
        let mut call =
            json!({"index": i, "type": "function", "function": {"name": c.name, "arguments": ""}});
        if !c.id.is_empty() {
            call["id"] = json!(c.id);
        }
        out.push(chunk(json!({"tool_calls": [call]}), Value::Null));
        for a in &c.args_chunks {
            out.push(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": a}}]}),
                Value::Null,
            ));
        }
    }
    let finish = if let Some(s) = &turn.stop {
        s.as_str()
    } else if turn.max_tokens {
        "length"
    } else if turn.calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    out.push(chunk(json!({}), json!(finish)));
    out.push(sse(
        None,
        &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake", "choices": [],
            "usage": {"prompt_tokens": prompt.total, "completion_tokens": turn.output_tokens, "total_tokens": prompt.total + turn.output_tokens,
                "prompt_tokens_details": {"cached_tokens": prompt.cache_read, "audio_tokens": 0}}}),
    ));
    out.push("data: [DONE]\n\n".to_string());
    out
}

/// Gemini `streamGenerateContent?alt=sse` chunks for `turn`.
pub fn gemini(turn: &Turn, prompt: &Prompt) -> Vec<String> {
    let chunk = |parts: Value, finish: Option<&str>, usage: Option<Value>| {
        let mut cand = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(f) = finish {
            cand["finishReason"] = json!(f);
        }
        let mut v = json!({"candidates": [cand], "modelVersion": "fake"});
        if let Some(u) = usage {
            v["usageMetadata"] = u;
        }
        sse(None, &v)
    };
    let usage = |out: u64| {
        let mut u = json!({"promptTokenCount": prompt.total, "candidatesTokenCount": out, "totalTokenCount": prompt.total + out});
        // Gemini leaves the field out when nothing came from the cache.
        if prompt.cache_read > 0 {
            u["cachedContentTokenCount"] = json!(prompt.cache_read);
        }
        u
    };
    let mut out = Vec::new();
    for r in &turn.reasoning {
        out.push(chunk(json!([{"text": r, "thought": true}]), None, None));
    }
    for t in &turn.text {
        out.push(chunk(json!([{"text": t}]), None, Some(usage(1))));
    }
    let mut calls = Vec::new();
    for (i, c) in turn.calls.iter().enumerate() {
        let joined = c.args_chunks.concat();
        let parsed = if joined.trim().is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_str::<Value>(&joined)
        };
        let Ok(args) = parsed else {
            // Gemini sends whole calls: one cut off at the limit is not sent at all.
            continue;
        };
        let mut part = json!({"functionCall": {"name": c.name, "args": args}});
        if i == 0
            && let Some(s) = &turn.signature
        {
            part["thoughtSignature"] = json!(s);
        }
        calls.push(part);
    }
    let finish = if let Some(s) = &turn.stop {
        s.as_str()
    } else if turn.max_tokens {
        "MAX_TOKENS"
    } else {
        "STOP"
    };
    out.push(chunk(
        Value::Array(calls),
        Some(finish),
        Some(usage(turn.output_tokens)),
    ));
    out
}

/// OpenAI Responses stream events for `turn` (item ids numbered from `base`), and the calls
/// made after a reasoning item: call_id → (reasoning id, encrypted content).
/// call_id → (reasoning item id, encrypted content).
pub type Issued = Vec<(String, (String, String))>;

pub fn responses(turn: &Turn, prompt: &Prompt, base: u64) -> (Vec<String>, Issued) {
    let ev = |v: Value| sse(v["type"].as_str(), &v);
    let mut out = vec![ev(
        json!({"type": "response.created", "response": {"id": format!("resp_{base}"), "status": "in_progress"}}),
    )];
    let mut index = 0u64;
    let mut next = base;
    let mut id = |prefix: &str| {
        next += 1;
        format!("{prefix}_{next}")
    };
    let mut reasoning = None;
    if !turn.reasoning.is_empty() {
        let rs = id("rs");
        let enc = format!("enc-{rs}");
        out.push(ev(json!({"type": "response.output_item.added", "output_index": index, "item": {"type": "reasoning", "id": rs, "summary": []}})));
        for r in &turn.reasoning {
            out.push(ev(json!({"type": "response.reasoning_summary_text.delta", "output_index": index, "item_id": rs, "summary_index": 0, "delta": r})));
        }
        out.push(ev(json!({"type": "response.reasoning_summary_part.done", "output_index": index, "item_id": rs, "summary_index": 0})));
        out.push(ev(json!({"type": "response.output_item.done", "output_index": index, "item": {"type": "reasoning", "id": rs, "encrypted_content": enc, "summary": [{"type": "summary_text", "text": turn.reasoning.concat()}]}})));
        reasoning = Some((rs, enc));
        index += 1;
    }
    if !turn.text.is_empty() {
        let msg = id("msg");
        out.push(ev(json!({"type": "response.output_item.added", "output_index": index, "item": {"type": "message", "id": msg, "role": "assistant", "content": []}})));
        for t in &turn.text {
            out.push(ev(json!({"type": "response.output_text.delta", "output_index": index, "item_id": msg, "content_index": 0, "delta": t})));
        }
        out.push(ev(json!({"type": "response.output_item.done", "output_index": index, "item": {"type": "message", "id": msg, "role": "assistant", "content": [{"type": "output_text", "text": turn.text.concat()}]}})));
        index += 1;
    }
    let mut issued = Vec::new();
    for c in &turn.calls {
        let fc = id("fc");
        out.push(ev(json!({"type": "response.output_item.added", "output_index": index, "item": {"type": "function_call", "id": fc, "call_id": c.id, "name": c.name, "arguments": ""}})));
        for a in &c.args_chunks {
            out.push(ev(json!({"type": "response.function_call_arguments.delta", "output_index": index, "item_id": fc, "delta": a})));
        }
        if !turn.max_tokens {
            let args = c.args_chunks.concat();
            out.push(ev(json!({"type": "response.function_call_arguments.done", "output_index": index, "item_id": fc, "arguments": args})));
            out.push(ev(json!({"type": "response.output_item.done", "output_index": index, "item": {"type": "function_call", "id": fc, "call_id": c.id, "name": c.name, "arguments": args}})));
        }
        if let Some(r) = &reasoning {
            issued.push((c.id.clone(), r.clone()));
        }
        index += 1;
    }
    let usage = json!({"input_tokens": prompt.total, "input_tokens_details": {"cached_tokens": prompt.cache_read},
        "output_tokens": turn.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt.total + turn.output_tokens});
    let incomplete = if turn.max_tokens {
        Some("max_output_tokens")
    } else {
        turn.stop.as_deref().filter(|s| *s == "content_filter")
    };
    out.push(match incomplete {
        Some(reason) => ev(json!({"type": "response.incomplete", "response": {"status": "incomplete", "incomplete_details": {"reason": reason}, "usage": usage}})),
        None => ev(json!({"type": "response.completed", "response": {"status": "completed", "usage": usage}})),
    });
    (out, issued)
}

// ---------------------------------------------------------------------------------------
// Token estimate, prompt caching, context window
// ---------------------------------------------------------------------------------------

/// A 1×1 PNG, base64: an image every fake accepts.
pub const PNG_1X1_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// What one image counts in [`fake_tokens`].
pub const FAKE_IMAGE_TOKENS: u64 = 1_600;

/// The prompt tokens a fake reports: its total (cached ones included) and what the simulated
/// cache served and took in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prompt {
    pub total: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Prompt {
    /// With a turn's scripted total instead of the estimate (the cache counts cut to fit).
    fn scripted(self, total: Option<u64>) -> Self {
        let Some(total) = total else {
            return self;
        };
        let cache_read = self.cache_read.min(total);
        Self {
            total,
            cache_read,
            cache_write: self.cache_write.min(total - cache_read),
        }
    }
}

/// Keys whose values are not prompt text: the model name, roles, block types, cache marks.
const NOT_TEXT: &[&str] = &["model", "role", "type", "cache_control"];

/// The fakes' token estimate for a request body or any part of one: a quarter of the
/// characters of its strings (rounded up; not the values of `model`, `role`, `type`,
/// `cache_control`), and [`FAKE_IMAGE_TOKENS`] per image (an Anthropic `image` block, an
/// OpenAI `image_url` or `input_image` part, a Gemini `inlineData` part).
pub fn fake_tokens(v: &Value) -> u64 {
    let (chars, images) = text_size(v);
    tokens_of(chars, images)
}

fn tokens_of(chars: u64, images: u64) -> u64 {
    chars.div_ceil(4) + images * FAKE_IMAGE_TOKENS
}

/// (characters of text, images) in `v`.
fn text_size(v: &Value) -> (u64, u64) {
    match v {
        Value::String(s) => (s.chars().count() as u64, 0),
        Value::Array(a) => a.iter().map(text_size).fold((0, 0), add),
        Value::Object(o) => {
            let image = matches!(
                o.get("type").and_then(Value::as_str),
                Some("image" | "image_url" | "input_image")
            ) || o.contains_key("inlineData")
                || o.contains_key("inline_data");
            if image {
                return (0, 1);
            }
            o.iter()
                .filter(|(k, _)| !NOT_TEXT.contains(&k.as_str()))
                .map(|(_, v)| text_size(v))
                .fold((0, 0), add)
        }
        _ => (0, 0),
    }
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

/// `v` as JSON with sorted keys and without `cache_control` fields.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().filter(|k| *k != "cache_control").collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&o[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// One unit of a prompt prefix: a tool, a system block, a message block (Anthropic) or a
/// whole message (the others).
struct Item {
    canonical: String,
    chars: u64,
    images: u64,
    breakpoint: bool,
}

fn item(v: Value, breakpoint: bool) -> Item {
    let (chars, images) = text_size(&v);
    Item {
        canonical: canonical(&v),
        chars,
        images,
        breakpoint,
    }
}

/// The prompt of `body` as the cache sees it, in the order the service reads it.
fn items(wire: Wire, body: &Value) -> Vec<Item> {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    match wire {
        Wire::Anthropic => {
            for t in list(&body["tools"]) {
                let bp = t.get("cache_control").is_some();
                out.push(item(t, bp));
            }
            match &body["system"] {
                Value::String(s) => out.push(item(json!({"text": s}), false)),
                Value::Array(blocks) => {
                    for b in blocks {
                        out.push(item(b.clone(), b.get("cache_control").is_some()));
                    }
                }
                _ => {}
            }
            for (i, m) in list(&body["messages"]).into_iter().enumerate() {
                let blocks = match &m["content"] {
                    Value::String(s) => vec![json!({"type": "text", "text": s})],
                    other => list(other),
                };
                for b in blocks {
                    let bp = b.get("cache_control").is_some();
                    out.push(item(
                        json!({"message": i, "role": m["role"], "block": b}),
                        bp,
                    ));
                }
            }
        }
        Wire::OpenAi => {
            for t in list(&body["tools"]) {
                out.push(item(t, false));
            }
            for m in list(&body["messages"]) {
                out.push(item(m, false));
            }
        }
        Wire::Responses => {
            out.push(item(json!({"instructions": body["instructions"]}), false));
            for t in list(&body["tools"]) {
                out.push(item(t, false));
            }
            for m in list(&body["input"]) {
                out.push(item(m, false));
            }
        }
        Wire::Gemini => {
            out.push(item(json!({"system": body["systemInstruction"]}), false));
            out.push(item(json!({"tools": body["tools"]}), false));
            for c in list(&body["contents"]) {
                out.push(item(c, false));
            }
        }
    }
    out
}

/// The hash and the tokens of every prefix of `items` (prefix `p` ends with item `p`).
fn prefixes(items: &[Item]) -> (Vec<u64>, Vec<u64>) {
    let mut hashes = Vec::with_capacity(items.len());
    let mut tokens = Vec::with_capacity(items.len());
    let (mut hash, mut chars, mut images) = (0u64, 0u64, 0u64);
    for it in items {
        let mut h = DefaultHasher::new();
        hash.hash(&mut h);
        it.canonical.hash(&mut h);
        hash = h.finish();
        chars += it.chars;
        images += it.images;
        hashes.push(hash);
        tokens.push(tokens_of(chars, images));
    }
    (hashes, tokens)
}

/// How many blocks before a breakpoint Anthropic looks for an earlier cache entry.
const LOOKBACK_BLOCKS: usize = 20;

impl State {
    /// (tokens read from the cache, tokens written to it) for an accepted request.
    fn cache(&mut self, wire: Wire, body: &Value) -> (u64, u64) {
        let items = items(wire, body);
        let (hashes, tokens) = prefixes(&items);
        let min = self.min_cache_tokens;
        if wire == Wire::Anthropic {
            let breakpoints: Vec<usize> =
                (0..items.len()).filter(|&p| items[p].breakpoint).collect();
            let Some(&last) = breakpoints.last() else {
                return (0, 0);
            };
            let read = breakpoints
                .iter()
                .flat_map(|&b| b.saturating_sub(LOOKBACK_BLOCKS - 1)..=b)
                .filter_map(|p| self.anthropic_cache.get(&hashes[p]).copied())
                .max()
                .unwrap_or(0);
            let write = if tokens[last] >= min {
                tokens[last] - read
            } else {
                0
            };
            for &b in &breakpoints {
                if tokens[b] >= min {
                    self.anthropic_cache.insert(hashes[b], tokens[b]);
                }
            }
            return (read, write);
        }
        let read = (0..items.len())
            .rev()
            .find(|&p| self.prefix_cache.contains(&(wire, hashes[p])))
            .map(|p| tokens[p])
            .filter(|&t| t >= min)
            .unwrap_or(0);
        self.prefix_cache.extend(hashes.iter().map(|&h| (wire, h)));
        (read.min(fake_tokens(body)), 0)
    }
}

/// The output limit a request asks for, in its wire's field.
fn max_output(wire: Wire, body: &Value) -> u64 {
    let n = match wire {
        Wire::Anthropic => &body["max_tokens"],
        Wire::OpenAi if body.get("max_completion_tokens").is_some() => {
            &body["max_completion_tokens"]
        }
        Wire::OpenAi => &body["max_tokens"],
        Wire::Responses => &body["max_output_tokens"],
        Wire::Gemini => &body["generationConfig"]["maxOutputTokens"],
    };
    n.as_u64().unwrap_or(0)
}

/// The service's refusal of a prompt of `prompt` tokens that does not fit `window`: Anthropic
/// and OpenAI count the output limit in, Gemini only the input.
pub fn context_refusal(wire: Wire, body: &Value, prompt: u64, window: u64) -> Option<Value> {
    let out = max_output(wire, body);
    match wire {
        Wire::Anthropic if prompt > window => Some(format!(
            "prompt is too long: {prompt} tokens > {window} maximum"
        )),
        Wire::Anthropic if prompt + out > window => Some(format!(
            "input length and `max_tokens` exceed context limit: {prompt} + {out} > {window}, decrease input length or `max_tokens` and try again"
        )),
        Wire::OpenAi | Wire::Responses if prompt + out > window => Some(format!(
            "This model's maximum context length is {window} tokens. However, you requested {} tokens ({prompt} in the messages, {out} in the completion). Please reduce the length of the messages or completion.",
            prompt + out
        )),
        Wire::Gemini if prompt > window => Some(format!(
            "The input token count ({prompt}) exceeds the maximum number of tokens allowed ({window})."
        )),
        _ => None,
    }
    .map(|m| match wire {
        Wire::Anthropic => {
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": m}})
        }
        Wire::OpenAi => {
            json!({"error": {"message": m, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
        }
        Wire::Responses => {
            json!({"error": {"message": m, "type": "invalid_request_error", "param": "input", "code": "context_length_exceeded"}})
        }
        Wire::Gemini => json!({"error": {"code": 400, "message": m, "status": "INVALID_ARGUMENT"}}),
    })
}

// ---------------------------------------------------------------------------------------
// Images and cache marks
// ---------------------------------------------------------------------------------------

/// The image format the bytes start with.
fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

fn decode_base64(data: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(data).ok()
}

/// The formats Anthropic and OpenAI take.
const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Anthropic: at most four `cache_control` marks, each `{"type": "ephemeral"}` (with an
/// optional `ttl` of `5m` or `1h`), never on a thinking block or an empty text; no empty
/// text blocks; images only in user messages, from a base64 source of a supported type whose
/// bytes are that type (at most 5 MB) or from an https URL.
fn validate_anthropic_content(body: &Value) -> Option<String> {
    let mut marks = 0;
    let mut check_mark = |v: &Value, at: &str| -> Option<String> {
        let cc = v.get("cache_control")?;
        marks += 1;
        if cc["type"] != "ephemeral" {
            return Some(format!(
                "{at}.cache_control.type: Input should be 'ephemeral'"
            ));
        }
        if let Some(ttl) = cc.get("ttl")
            && ttl != "5m"
            && ttl != "1h"
        {
            return Some(format!(
                "{at}.cache_control.ttl: Input should be '5m' or '1h'"
            ));
        }
        None
    };
    for (i, t) in body["tools"].as_array().into_iter().flatten().enumerate() {
        if let Some(m) = check_mark(t, &format!("tools.{i}")) {
            return Some(m);
        }
    }
    if let Some(blocks) = body["system"].as_array() {
        for (i, b) in blocks.iter().enumerate() {
            if b["type"] != "text" {
                return Some(format!("system.{i}.type: Input should be 'text'"));
            }
            if b["text"].as_str().is_none_or(str::is_empty) {
                if b.get("cache_control").is_some() {
                    return Some(format!(
                        "system.{i}.text: cache_control cannot be set for empty text blocks"
                    ));
                }
                return Some("system: text content blocks must be non-empty".into());
            }
            if let Some(m) = check_mark(b, &format!("system.{i}")) {
                return Some(m);
            }
        }
    }
    for (i, m) in body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let role = m["role"].as_str().unwrap_or_default();
        for (k, b) in m["content"].as_array().into_iter().flatten().enumerate() {
            let at = format!("messages.{i}.content.{k}");
            let kind = b["type"].as_str().unwrap_or_default();
            match kind {
                "text" if b["text"].as_str().is_none_or(str::is_empty) => {
                    if b.get("cache_control").is_some() {
                        return Some(format!(
                            "{at}.text: cache_control cannot be set for empty text blocks"
                        ));
                    }
                    return Some("messages: text content blocks must be non-empty".into());
                }
                "thinking" | "redacted_thinking" if b.get("cache_control").is_some() => {
                    return Some(format!(
                        "{at}.{kind}.cache_control: Extra inputs are not permitted"
                    ));
                }
                "image" => {
                    if role != "user" {
                        return Some(format!(
                            "{at}: image content blocks are only allowed in user messages"
                        ));
                    }
                    if let Some(e) = anthropic_image(&b["source"], &format!("{at}.image.source")) {
                        return Some(e);
                    }
                }
                _ => {}
            }
            if let Some(e) = check_mark(b, &format!("{at}.{kind}")) {
                return Some(e);
            }
        }
    }
    if marks > 4 {
        return Some(format!(
            "A maximum of 4 blocks with cache_control may be provided. Found {marks}."
        ));
    }
    None
}

fn anthropic_image(source: &Value, at: &str) -> Option<String> {
    match source["type"].as_str() {
        Some("base64") => {
            let media_type = source["media_type"].as_str().unwrap_or_default();
            if !IMAGE_TYPES.contains(&media_type) {
                return Some(format!(
                    "{at}.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                ));
            }
            let Some(bytes) = source["data"].as_str().and_then(decode_base64) else {
                return Some(format!("{at}.base64.data: invalid base64 data"));
            };
            if bytes.len() > 5 * 1024 * 1024 {
                return Some(format!(
                    "{at}.base64.data: image exceeds 5 MB maximum: {} bytes > 5242880 bytes",
                    bytes.len()
                ));
            }
            match sniff_image(&bytes) {
                Some(actual) if actual == media_type => None,
                Some(actual) => Some(format!(
                    "{at}.base64.data: The image was specified using the {media_type} media type, but the image appears to be a {actual} image"
                )),
                None => Some(format!("{at}.base64.data: Could not process image")),
            }
        }
        Some("url")
            if source["url"]
                .as_str()
                .is_some_and(|u| u.starts_with("https://")) =>
        {
            None
        }
        Some("url") => Some(format!("{at}.url.url: the URL must be an https URL")),
        other => Some(format!(
            "{at}: Input tag '{}' found using 'type' does not match any of the expected tags: 'base64', 'file', 'url'",
            other.unwrap_or_default()
        )),
    }
}

/// OpenAI (both APIs): an image URL is an https URL or a `data:` URL of a supported image
/// type with base64 bytes of that type. Returns (message, code).
fn openai_image_url(url: &str, at: &str) -> Option<(String, Value)> {
    if url.starts_with("https://") {
        return None;
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Some((
            format!(
                "Invalid '{at}'. Expected a base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got a value without the 'data:' prefix."
            ),
            json!("invalid_value"),
        ));
    };
    let Some((media_type, data)) = rest.split_once(";base64,") else {
        return Some((
            format!("Invalid '{at}'. Expected a base64-encoded data URL."),
            json!("invalid_value"),
        ));
    };
    if !IMAGE_TYPES.contains(&media_type) {
        return Some((
            format!(
                "Invalid '{at}'. Expected a base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got unsupported MIME type '{media_type}'."
            ),
            json!("invalid_value"),
        ));
    }
    match decode_base64(data).as_deref().and_then(sniff_image) {
        Some(_) => None,
        None => Some((
            "You uploaded an unsupported image. Please make sure your image is valid.".into(),
            json!("invalid_image"),
        )),
    }
}

/// OpenAI Chat Completions: content parts (`text`, `image_url`), images only from the user.
fn validate_openai_content(messages: &[Value]) -> Option<(String, Value)> {
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        let Some(parts) = m["content"].as_array() else {
            continue;
        };
        for (k, p) in parts.iter().enumerate() {
            match p["type"].as_str() {
                Some("text") if p["text"].is_string() => {}
                Some("image_url") => {
                    if role != "user" {
                        return Some((
                            format!(
                                "Invalid 'messages[{i}]'. Image URLs are only allowed for messages with role 'user', but this message with role '{role}' contains an image URL."
                            ),
                            json!("invalid_value"),
                        ));
                    }
                    let url = p["image_url"]["url"].as_str().unwrap_or_default();
                    let at = format!("messages[{i}].content[{k}].image_url.url");
                    if let Some(e) = openai_image_url(url, &at) {
                        return Some(e);
                    }
                }
                _ => {
                    return Some((
                        format!("Invalid value: 'messages[{i}].content[{k}]'."),
                        json!("invalid_value"),
                    ));
                }
            }
        }
    }
    None
}

/// OpenAI Responses: user content parts (`input_text`, `input_image` with a valid
/// `image_url` and `detail`), assistant content of `output_text`.
fn validate_responses_content(input: &[Value]) -> Option<(String, Value)> {
    for (i, item) in input.iter().enumerate() {
        let Some(parts) = item["content"].as_array() else {
            continue;
        };
        let role = item["role"].as_str().unwrap_or_default();
        for (k, p) in parts.iter().enumerate() {
            let at = format!("input[{i}].content[{k}]");
            match (role, p["type"].as_str().unwrap_or_default()) {
                ("user" | "system" | "developer", "input_text") if p["text"].is_string() => {}
                ("user" | "system" | "developer", "input_image") => {
                    if let Some(d) = p.get("detail")
                        && !["low", "high", "auto"].iter().any(|x| d == x)
                    {
                        return Some((
                            format!(
                                "Invalid value: '{d}'. Supported values are: 'low', 'high', and 'auto'."
                            ),
                            json!("invalid_value"),
                        ));
                    }
                    let url = p["image_url"].as_str().unwrap_or_default();
                    if let Some(e) = openai_image_url(url, &format!("{at}.image_url")) {
                        return Some(e);
                    }
                }
                ("assistant", "output_text" | "refusal") => {}
                (_, kind) => {
                    return Some((
                        format!(
                            "Invalid value: '{kind}'. Supported values for role '{role}' differ ('{at}')."
                        ),
                        json!("invalid_value"),
                    ));
                }
            }
        }
    }
    None
}

/// Gemini: an `inlineData` part has a supported `mimeType` (images: png, jpeg, webp, heic,
/// heif; no gif) and base64 `data`; image bytes must be an image.
fn validate_gemini_content(contents: &[Value]) -> Option<String> {
    const TYPES: &[&str] = &[
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/heic",
        "image/heif",
        "application/pdf",
        "text/plain",
    ];
    for (i, c) in contents.iter().enumerate() {
        for (k, p) in c["parts"].as_array().into_iter().flatten().enumerate() {
            let Some(inline) = p.get("inlineData").or_else(|| p.get("inline_data")) else {
                continue;
            };
            let Some(mime) = inline
                .get("mimeType")
                .or_else(|| inline.get("mime_type"))
                .and_then(Value::as_str)
            else {
                return Some(format!(
                    "* GenerateContentRequest.contents[{i}].parts[{k}].inline_data.mime_type: mime_type is required"
                ));
            };
            let known =
                TYPES.contains(&mime) || mime.starts_with("audio/") || mime.starts_with("video/");
            if !known {
                return Some(format!("Unsupported MIME type: {mime}"));
            }
            let data = inline["data"].as_str().unwrap_or_default();
            let bytes = decode_base64(data).or_else(|| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE.decode(data).ok()
            });
            let Some(bytes) = bytes else {
                let start: String = data.chars().take(20).collect();
                return Some(format!(
                    "Invalid value at 'contents[{i}].parts[{k}].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"{start}\""
                ));
            };
            if ["image/png", "image/jpeg", "image/webp"].contains(&mime)
                && sniff_image(&bytes).is_none()
            {
                return Some(
                    "Unable to process input image. Please retry or report in https://developers.generativeai.google/guide/troubleshooting".into(),
                );
            }
        }
    }
    None
}
