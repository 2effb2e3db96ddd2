//! Anthropic Messages API, streamed (`POST {base}/v1/messages` with `stream: true`).
//!
//! Usage: Anthropic's `input_tokens` leaves out the prompt tokens read from the cache
//! (`cache_read_input_tokens`) and written to it (`cache_creation_input_tokens`); our
//! [`Usage::input_tokens`] is the whole prompt, the sum of the three.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::http::{self, Retry, SseEvent, StreamParser, Transport};
use super::{
    ChatRequest, ChatResponse, Delta, DeltaSink, LlmError, LlmProvider, Message, Part, Role,
    StopReason, Usage,
};
use crate::config::ProviderKeys;

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

pub struct Anthropic {
    base: String,
    key: HeaderValue,
    transport: Transport,
}

impl Anthropic {
    pub fn new(keys: &ProviderKeys) -> Result<Self, LlmError> {
        let key = keys
            .anthropic_api_key
            .as_ref()
            .filter(|k| !k.expose().trim().is_empty())
            .ok_or_else(|| LlmError::Config("ANTHROPIC_API_KEY is not set".into()))?;
        Ok(Self {
            base: http::trim_base(
                keys.anthropic_base_url
                    .as_deref()
                    .unwrap_or(DEFAULT_BASE_URL),
            ),
            key: http::header_value("ANTHROPIC_API_KEY", key.expose().trim())?,
            transport: Transport::new()?,
        })
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.transport.set_retry(retry);
        self
    }

    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.transport.set_idle_timeout(idle);
        self
    }
}

#[async_trait::async_trait]
impl LlmProvider for Anthropic {
    fn name(&self) -> &str {
        "anthropic"
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", self.key.clone());
        headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        let body = request_body(request);
        let url = format!("{}/v1/messages", self.base);
        self.transport
            .stream(&url, headers, &body, Parser::default, on_delta)
            .await
    }
}

/// The Messages API body for `request`.
///
/// Prompt caching: `cache_control` breakpoints (at most four, the API's limit) on the last
/// tool definition, on the system prompt, on the last block of the history the engine will
/// send unchanged next time (`stable_prefix`), and on the last block of the last message, so
/// the next request reads everything up to there from the cache. A breakpoint never sits on
/// a thinking block or an empty text (the API refuses that): the block before it takes it.
pub fn request_body(request: &ChatRequest) -> Value {
    // (index in `request.messages`, wire message); messages without content are left out.
    let mut kept: Vec<(usize, Value)> = request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| (i, message(m)))
        .filter(|(_, m)| m["content"].as_array().is_some_and(|c| !c.is_empty()))
        .collect();
    let last = kept.len();
    mark_last_cacheable(&mut kept, last);
    let stable = request.stable_prefix;
    if stable > 0 && stable < request.messages.len() {
        let upto = kept.iter().take_while(|(i, _)| *i < stable).count();
        mark_last_cacheable(&mut kept, upto);
    }
    let messages: Vec<Value> = kept.into_iter().map(|(_, m)| m).collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens,
        "stream": true,
        "messages": messages,
    });
    if !request.system.is_empty() {
        body["system"] = json!([{
            "type": "text",
            "text": request.system,
            "cache_control": ephemeral(),
        }]);
    }
    if !request.tools.is_empty() {
        let n = request.tools.len();
        body["tools"] = request
            .tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut tool = json!({
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                });
                if i + 1 == n {
                    tool["cache_control"] = ephemeral();
                }
                tool
            })
            .collect();
    }
    body
}

fn ephemeral() -> Value {
    json!({"type": "ephemeral"})
}

/// Can a block carry `cache_control`? Not a thinking block, nor an empty text.
fn cacheable(block: &Value) -> bool {
    match block["type"].as_str() {
        Some("thinking" | "redacted_thinking") | None => false,
        Some("text") => block["text"].as_str().is_some_and(|t| !t.is_empty()),
        Some(_) => true,
    }
}

/// Puts a breakpoint on the last cacheable block of `messages[..upto]` (searching back
/// through earlier messages when a message has none); nothing when that block has one.
fn mark_last_cacheable(messages: &mut [(usize, Value)], upto: usize) {
    let upto = upto.min(messages.len());
    let blocks = messages[..upto]
        .iter_mut()
        .rev()
        .filter_map(|(_, m)| m["content"].as_array_mut())
        .flat_map(|c| c.iter_mut().rev());
    for block in blocks {
        if cacheable(block) {
            if block.get("cache_control").is_none() {
                block["cache_control"] = ephemeral();
            }
            return;
        }
    }
}

fn message(m: &Message) -> Value {
    let role = match m.role {
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let content: Vec<Value> = m
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } if text.is_empty() => None,
            Part::Text { text } => Some(json!({"type": "text", "text": text})),
            // Thinking goes back only with its signature (the API refuses it otherwise).
            Part::Reasoning {
                text,
                signature: Some(sig),
            } => Some(json!({"type": "thinking", "thinking": text, "signature": sig})),
            Part::Reasoning { .. } => None,
            // Only a user message takes an image (the API refuses one from the assistant).
            Part::Image { .. } if m.role == Role::Assistant => None,
            Part::Image { media_type, data } => Some(json!({
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data},
            })),
            Part::ToolCall { id, name, input } => Some(json!({
                "type": "tool_use", "id": id, "name": name, "input": input,
            })),
            Part::ToolResult {
                id,
                content,
                is_error,
                ..
            } => Some(json!({
                "type": "tool_result", "tool_use_id": id, "content": content, "is_error": is_error,
            })),
        })
        .collect();
    json!({"role": role, "content": content})
}

enum Block {
    Text(String),
    Thinking {
        text: String,
        signature: String,
    },
    Tool {
        id: String,
        name: String,
        json: String,
    },
    Other,
}

/// The prompt's token counts as Anthropic reports them: `input_tokens` counts only the tokens
/// after the last cache breakpoint, apart from those read from and written to the cache.
#[derive(Default)]
struct PromptTokens {
    uncached: u64,
    cache_read: u64,
    cache_write: u64,
}

impl PromptTokens {
    /// Takes the counts a `usage` object carries.
    fn update(&mut self, usage: &Value) {
        let n = |k: &str| usage.get(k).and_then(Value::as_u64);
        if let Some(n) = n("input_tokens") {
            self.uncached = n;
        }
        if let Some(n) = n("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = n("cache_creation_input_tokens") {
            self.cache_write = n;
        }
    }
}

#[derive(Default)]
struct Parser {
    blocks: BTreeMap<u64, Block>,
    /// Output tokens; the prompt's come from `prompt` at the end.
    usage: Usage,
    prompt: PromptTokens,
    stop: Option<String>,
    started: bool,
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a str, LlmError> {
    v.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| LlmError::Protocol(format!("missing string field {name:?}: {v}")))
}

fn index(v: &Value) -> Result<u64, LlmError> {
    v.get("index")
        .and_then(Value::as_u64)
        .ok_or_else(|| LlmError::Protocol(format!("event without an index: {v}")))
}

impl StreamParser for Parser {
    fn event(&mut self, event: SseEvent, on_delta: DeltaSink<'_>) -> Result<bool, LlmError> {
        let v = http::json(&event.data)?;
        let kind = match v.get("type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => event.event.clone().unwrap_or_default(),
        };
        match kind.as_str() {
            "message_start" => {
                self.started = true;
                self.prompt.update(&v["message"]["usage"]);
                if let Some(n) = v["message"]["usage"]["output_tokens"].as_u64() {
                    self.usage.output_tokens = n;
                }
            }
            "content_block_start" => {
                let i = index(&v)?;
                let b = v
                    .get("content_block")
                    .ok_or_else(|| LlmError::Protocol(format!("block start without block: {v}")))?;
                let block = match b.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = b.get("text").and_then(Value::as_str).unwrap_or("");
                        if !t.is_empty() {
                            on_delta(Delta::Text(t.to_string()));
                        }
                        Block::Text(t.to_string())
                    }
                    Some("thinking") => Block::Thinking {
                        text: b
                            .get("thinking")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        signature: b
                            .get("signature")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    },
                    Some("tool_use") => Block::Tool {
                        id: field(b, "id")?.to_string(),
                        name: field(b, "name")?.to_string(),
                        json: String::new(),
                    },
                    _ => Block::Other,
                };
                self.blocks.insert(i, block);
            }
            "content_block_delta" => {
                let i = index(&v)?;
                let d = v
                    .get("delta")
                    .ok_or_else(|| LlmError::Protocol(format!("block delta without delta: {v}")))?;
                let block = self.blocks.get_mut(&i).ok_or_else(|| {
                    LlmError::Protocol(format!("delta for block {i}, which never started"))
                })?;
                match (d.get("type").and_then(Value::as_str), block) {
                    (Some("text_delta"), Block::Text(t)) => {
                        let s = field(d, "text")?;
                        t.push_str(s);
                        on_delta(Delta::Text(s.to_string()));
                    }
                    (Some("thinking_delta"), Block::Thinking { text, .. }) => {
                        let s = field(d, "thinking")?;
                        text.push_str(s);
                        on_delta(Delta::Reasoning(s.to_string()));
                    }
                    (Some("signature_delta"), Block::Thinking { signature, .. }) => {
                        signature.push_str(field(d, "signature")?);
                    }
                    (Some("input_json_delta"), Block::Tool { json, .. }) => {
                        json.push_str(field(d, "partial_json")?);
                    }
                    (_, Block::Other) => {}
                    (Some("citations_delta"), _) => {}
                    (t, _) => {
                        return Err(LlmError::Protocol(format!(
                            "delta {t:?} does not fit block {i}"
                        )));
                    }
                }
            }
            "content_block_stop" | "ping" => {}
            "message_delta" => {
                if let Some(r) = v["delta"].get("stop_reason").and_then(Value::as_str) {
                    self.stop = Some(r.to_string());
                }
                if let Some(n) = v["usage"].get("output_tokens").and_then(Value::as_u64) {
                    self.usage.output_tokens = n;
                }
                // Newer API versions repeat the (cumulative) prompt counts here.
                self.prompt.update(&v["usage"]);
            }
            "message_stop" => return Ok(true),
            "error" => {
                let e = &v["error"];
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string();
                return Err(match e.get("type").and_then(Value::as_str) {
                    Some("overloaded_error" | "api_error") => LlmError::Unavailable {
                        attempts: 0,
                        message,
                    },
                    Some("rate_limit_error") => LlmError::RateLimited {
                        attempts: 0,
                        message,
                    },
                    Some("authentication_error" | "permission_error") => LlmError::Auth(message),
                    _ => LlmError::Refused(message),
                });
            }
            other => {
                if !self.started {
                    return Err(LlmError::Protocol(format!(
                        "unexpected event {other:?} before message_start"
                    )));
                }
            }
        }
        Ok(false)
    }

    fn finish(self, complete: bool) -> Result<ChatResponse, LlmError> {
        if !complete {
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: "the stream ended before message_stop".into(),
            });
        }
        let cut = self.stop.as_deref() == Some("max_tokens");
        let mut parts = Vec::new();
        for block in self.blocks.into_values() {
            match block {
                Block::Text(text) => {
                    if !text.is_empty() {
                        parts.push(Part::Text { text });
                    }
                }
                Block::Thinking { text, signature } => parts.push(Part::Reasoning {
                    text,
                    signature: (!signature.is_empty()).then_some(signature),
                }),
                Block::Tool { id, name, json } => {
                    let Some(input) = http::call_input(&name, &json, cut)? else {
                        continue;
                    };
                    parts.push(Part::ToolCall { id, name, input });
                }
                Block::Other => {}
            }
        }
        let stop = match self.stop.as_deref() {
            Some("end_turn" | "stop_sequence") => StopReason::EndTurn,
            Some("tool_use") => StopReason::ToolUse,
            Some("max_tokens") => StopReason::MaxTokens,
            Some("refusal") => StopReason::Refusal,
            _ => StopReason::Other,
        };
        Ok(ChatResponse {
            message: Message {
                role: Role::Assistant,
                parts,
            },
            // Our `input_tokens` is the whole prompt: Anthropic's `input_tokens` (the part
            // after the last breakpoint) plus the tokens read from and written to the cache.
            usage: Usage {
                input_tokens: self.prompt.uncached
                    + self.prompt.cache_read
                    + self.prompt.cache_write,
                cache_read_tokens: self.prompt.cache_read,
                cache_write_tokens: self.prompt.cache_write,
                ..self.usage
            },
            stop,
        })
    }
}
