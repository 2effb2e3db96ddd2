//! OpenAI's Responses API, streamed (`POST {base}/responses` with `stream: true`): how OpenAI's
//! own endpoint is spoken (`OPENAI_API=responses`, the default). OpenAI recommends it for
//! reasoning models, which keep their reasoning between tool calls only here: each reasoning
//! item comes back encrypted (`store: false`, `include: ["reasoning.encrypted_content"]`) and
//! is sent back before the calls it led to. Compatible servers keep Chat Completions
//! ([`super::openai`]).
//!
//! A reasoning item is kept as a [`Part::Reasoning`] whose text is its summary and whose
//! `signature` is the item itself (JSON): opaque provider data, returned as it came.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::http::{self, Retry, SseEvent, StreamParser, Transport};
use super::{
    ChatRequest, ChatResponse, Delta, DeltaSink, LlmError, LlmProvider, Message, Part, Role,
    StopReason, Usage,
};
use crate::config::ProviderKeys;

pub struct Responses {
    base: String,
    auth: HeaderValue,
    transport: Transport,
}

impl Responses {
    /// OpenAI (or `OPENAI_BASE_URL`); needs `OPENAI_API_KEY`.
    pub fn new(keys: &ProviderKeys) -> Result<Self, LlmError> {
        let (base, auth) = super::openai::openai_endpoint(keys)?;
        Ok(Self {
            base,
            auth,
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
impl LlmProvider for Responses {
    fn name(&self) -> &str {
        "openai"
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        let body = request_body(request);
        let url = format!("{}/responses", self.base);
        self.transport
            .stream(&url, headers, &body, Parser::default, on_delta)
            .await
    }
}

/// Model families that reason (their reasoning items are asked for and sent back).
pub fn is_reasoning_model(model: &str) -> bool {
    let m = model.to_ascii_lowercase();
    ["o1", "o3", "o4", "gpt-5", "codex"]
        .iter()
        .any(|p| m.starts_with(p))
}

/// The Responses body for `request`.
pub fn request_body(request: &ChatRequest) -> Value {
    let mut input = Vec::new();
    for m in &request.messages {
        push_items(&mut input, m);
    }
    let mut body = json!({
        "model": request.model,
        "input": input,
        "stream": true,
        // Nothing is kept at OpenAI; reasoning travels encrypted in the conversation instead.
        "store": false,
        "max_output_tokens": request.max_tokens,
    });
    if !request.system.is_empty() {
        body["instructions"] = json!(request.system);
    }
    if is_reasoning_model(&request.model) {
        body["include"] = json!(["reasoning.encrypted_content"]);
        body["reasoning"] = json!({"summary": "auto"});
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": super::schema::openai(&t.input_schema),
                    // Strict mode needs every property required; our tools have optional ones.
                    "strict": false,
                })
            })
            .collect();
    }
    body
}

fn push_items(out: &mut Vec<Value>, m: &Message) {
    match m.role {
        Role::User => {
            // Results answer the calls of the turn before; the user's text comes after them.
            for p in &m.parts {
                if let Part::ToolResult {
                    id,
                    content,
                    is_error,
                    ..
                } = p
                {
                    let output = if *is_error {
                        format!("Error: {content}")
                    } else {
                        content.clone()
                    };
                    out.push(
                        json!({"type": "function_call_output", "call_id": id, "output": output}),
                    );
                }
            }
            // Text and images, in the message's order.
            let content: Vec<Value> = m
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text { text } if !text.is_empty() => {
                        Some(json!({"type": "input_text", "text": text}))
                    }
                    Part::Image { media_type, data } => Some(json!({
                        "type": "input_image",
                        "image_url": super::openai::data_url(media_type, data),
                        "detail": "auto",
                    })),
                    _ => None,
                })
                .collect();
            if !content.is_empty() {
                out.push(json!({"role": "user", "content": content}));
            }
        }
        Role::Assistant => {
            for p in &m.parts {
                match p {
                    Part::Reasoning {
                        signature: Some(item),
                        ..
                    } => {
                        // Our own record of a reasoning item; anything else (another
                        // provider's signature) is not sent.
                        if let Ok(item) = serde_json::from_str::<Value>(item)
                            && item["type"] == "reasoning"
                        {
                            out.push(item);
                        }
                    }
                    Part::Reasoning { .. } | Part::ToolResult { .. } | Part::Image { .. } => {}
                    Part::Text { text } if text.is_empty() => {}
                    Part::Text { text } => out.push(json!({
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text}],
                    })),
                    Part::ToolCall { id, name, input } => out.push(json!({
                        "type": "function_call",
                        "call_id": id,
                        "name": name,
                        "arguments": input.to_string(),
                    })),
                }
            }
        }
    }
}

/// One output item as it streams in.
enum Item {
    Reasoning {
        summary: String,
        /// The finished item (`response.output_item.done`), sent back as it is.
        done: Option<Value>,
    },
    Message {
        text: String,
        refusal: String,
    },
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
    Other,
}

#[derive(Default)]
struct Parser {
    items: BTreeMap<u64, Item>,
    usage: Usage,
    /// `completed`, or the reason of `incomplete`.
    end: Option<String>,
}

fn index(v: &Value) -> Result<u64, LlmError> {
    v["output_index"]
        .as_u64()
        .ok_or_else(|| LlmError::Protocol(format!("event without output_index: {v}")))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// An error reported in the stream (`error`, `response.failed`).
fn stream_error(e: &Value) -> LlmError {
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_string();
    match e.get("code").and_then(Value::as_str) {
        Some("rate_limit_exceeded") => LlmError::RateLimited {
            attempts: 0,
            message,
        },
        Some("server_error" | "server_is_overloaded" | "slow_down") => LlmError::Unavailable {
            attempts: 0,
            message,
        },
        _ => LlmError::Refused(message),
    }
}

impl Parser {
    fn item(&mut self, v: &Value) -> Result<&mut Item, LlmError> {
        let i = index(v)?;
        self.items
            .get_mut(&i)
            .ok_or_else(|| LlmError::Protocol(format!("event for output item {i}, never added")))
    }

    fn usage(&mut self, response: &Value) {
        if let Some(u) = response.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            // Output tokens include the reasoning tokens; input tokens the cached ones
            // (OpenAI caches by prefix on its own and bills no cache writes).
            self.usage = Usage {
                input_tokens: n("input_tokens"),
                output_tokens: n("output_tokens"),
                cache_read_tokens: u["input_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
                cache_write_tokens: 0,
            };
        }
    }
}

impl StreamParser for Parser {
    fn event(&mut self, event: SseEvent, on_delta: DeltaSink<'_>) -> Result<bool, LlmError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(self.end.is_some());
        }
        let v = http::json(data)?;
        let kind = v["type"]
            .as_str()
            .or(event.event.as_deref())
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "response.output_item.added" => {
                let item = &v["item"];
                let new = match str_of(item, "type") {
                    "reasoning" => Item::Reasoning {
                        summary: String::new(),
                        done: None,
                    },
                    "message" => Item::Message {
                        text: String::new(),
                        refusal: String::new(),
                    },
                    "function_call" => Item::Call {
                        call_id: str_of(item, "call_id").to_string(),
                        name: str_of(item, "name").to_string(),
                        arguments: str_of(item, "arguments").to_string(),
                    },
                    _ => Item::Other,
                };
                self.items.insert(index(&v)?, new);
            }
            "response.output_text.delta" => {
                let d = str_of(&v, "delta").to_string();
                if let Item::Message { text, .. } = self.item(&v)? {
                    text.push_str(&d);
                    on_delta(Delta::Text(d));
                }
            }
            "response.refusal.delta" => {
                let d = str_of(&v, "delta").to_string();
                if let Item::Message { refusal, .. } = self.item(&v)? {
                    refusal.push_str(&d);
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                let d = str_of(&v, "delta").to_string();
                if let Item::Reasoning { summary, .. } = self.item(&v)? {
                    summary.push_str(&d);
                    on_delta(Delta::Reasoning(d));
                }
            }
            "response.reasoning_summary_part.done" => {
                // Summary parts are paragraphs.
                if let Item::Reasoning { summary, .. } = self.item(&v)?
                    && !summary.is_empty()
                    && !summary.ends_with("\n\n")
                {
                    summary.push_str("\n\n");
                }
            }
            "response.function_call_arguments.delta" => {
                let d = str_of(&v, "delta").to_string();
                if let Item::Call { arguments, .. } = self.item(&v)? {
                    arguments.push_str(&d);
                }
            }
            "response.function_call_arguments.done" => {
                let all = str_of(&v, "arguments").to_string();
                if let Item::Call { arguments, .. } = self.item(&v)? {
                    *arguments = all;
                }
            }
            "response.output_item.done" => {
                let item = v["item"].clone();
                match self.item(&v)? {
                    Item::Reasoning { done, .. } => *done = Some(item),
                    Item::Call {
                        call_id,
                        name,
                        arguments,
                    } => {
                        if let Some(c) = item.get("call_id").and_then(Value::as_str) {
                            *call_id = c.to_string();
                        }
                        if let Some(n) = item.get("name").and_then(Value::as_str) {
                            *name = n.to_string();
                        }
                        if let Some(a) = item.get("arguments").and_then(Value::as_str) {
                            *arguments = a.to_string();
                        }
                    }
                    _ => {}
                }
            }
            "response.completed" => {
                self.usage(&v["response"]);
                self.end = Some("completed".into());
                return Ok(true);
            }
            "response.incomplete" => {
                self.usage(&v["response"]);
                let reason = v["response"]["incomplete_details"]["reason"]
                    .as_str()
                    .unwrap_or("incomplete");
                self.end = Some(reason.to_string());
                return Ok(true);
            }
            "response.failed" => return Err(stream_error(&v["response"]["error"])),
            "error" => return Err(stream_error(v.get("error").unwrap_or(&v))),
            _ => {}
        }
        Ok(false)
    }

    fn finish(self, complete: bool) -> Result<ChatResponse, LlmError> {
        let Some(end) = self.end.filter(|_| complete) else {
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: "the stream ended before the response completed".into(),
            });
        };
        let cut = end == "max_output_tokens";
        let mut parts = Vec::new();
        let mut refused = String::new();
        let mut has_calls = false;
        for item in self.items.into_values() {
            match item {
                Item::Reasoning { summary, done } => {
                    // Without its encrypted content an item cannot go back.
                    let signature = done
                        .filter(|d| d.get("encrypted_content").is_some_and(Value::is_string))
                        .map(|d| d.to_string());
                    if !summary.is_empty() || signature.is_some() {
                        parts.push(Part::Reasoning {
                            text: summary,
                            signature,
                        });
                    }
                }
                Item::Message { text, refusal } => {
                    if !text.is_empty() {
                        parts.push(Part::Text { text });
                    }
                    refused.push_str(&refusal);
                }
                Item::Call {
                    call_id,
                    name,
                    arguments,
                } => {
                    if name.is_empty() || call_id.is_empty() {
                        return Err(LlmError::Protocol(
                            "a function call without a name or call_id".into(),
                        ));
                    }
                    let Some(input) = http::call_input(&name, &arguments, cut)? else {
                        continue;
                    };
                    has_calls = true;
                    parts.push(Part::ToolCall {
                        id: call_id,
                        name,
                        input,
                    });
                }
                Item::Other => {}
            }
        }
        if !refused.is_empty() {
            parts.push(Part::Text {
                text: refused.clone(),
            });
        }
        let stop = match end.as_str() {
            "max_output_tokens" => StopReason::MaxTokens,
            "content_filter" => StopReason::Refusal,
            _ if !refused.is_empty() => StopReason::Refusal,
            _ if has_calls => StopReason::ToolUse,
            "completed" => StopReason::EndTurn,
            _ => StopReason::Other,
        };
        Ok(ChatResponse {
            message: Message {
                role: Role::Assistant,
                parts,
            },
            usage: self.usage,
            stop,
        })
    }
}
