//! OpenAI Chat Completions, streamed (`POST {base}/chat/completions` with `stream: true`), for
//! OpenAI itself and every OpenAI-compatible server (Ollama, llama.cpp, vLLM).

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

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

pub struct OpenAi {
    name: &'static str,
    base: String,
    auth: Option<HeaderValue>,
    transport: Transport,
}

impl OpenAi {
    /// OpenAI (or `OPENAI_BASE_URL`); needs `OPENAI_API_KEY`.
    #[allow(clippy::self_named_constructors)] // `openai` next to `ollama`: the name is the provider
    pub fn openai(keys: &ProviderKeys) -> Result<Self, LlmError> {
        let (base, auth) = openai_endpoint(keys)?;
        Ok(Self {
            name: "openai",
            base,
            auth: Some(auth),
            transport: Transport::new()?,
        })
    }

    /// An OpenAI-compatible local server at `OLLAMA_BASE_URL`; no key.
    pub fn ollama(keys: &ProviderKeys) -> Result<Self, LlmError> {
        Ok(Self {
            name: "ollama",
            base: http::trim_base(&keys.ollama_base_url),
            auth: None,
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

/// OpenAI's base URL (`OPENAI_BASE_URL` or the default) and its `Authorization` header from
/// `OPENAI_API_KEY`, for Chat Completions and the Responses API alike.
pub(super) fn openai_endpoint(keys: &ProviderKeys) -> Result<(String, HeaderValue), LlmError> {
    let key = keys
        .openai_api_key
        .as_ref()
        .filter(|k| !k.expose().trim().is_empty())
        .ok_or_else(|| LlmError::Config("OPENAI_API_KEY is not set".into()))?;
    Ok((
        http::trim_base(keys.openai_base_url.as_deref().unwrap_or(DEFAULT_BASE_URL)),
        http::header_value("OPENAI_API_KEY", &format!("Bearer {}", key.expose().trim()))?,
    ))
}

#[async_trait::async_trait]
impl LlmProvider for OpenAi {
    fn name(&self) -> &str {
        self.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let mut headers = HeaderMap::new();
        if let Some(auth) = &self.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        let body = request_body(request, self.name == "openai");
        let url = format!("{}/chat/completions", self.base);
        // Calls without an id get one numbered after every call already in the conversation.
        let first_id = request.messages.iter().flat_map(|m| m.tool_calls()).count();
        self.transport
            .stream(&url, headers, &body, || Parser::new(first_id), on_delta)
            .await
    }
}

/// The Chat Completions body for `request`. `openai_itself`: OpenAI's own API, which wants
/// `max_completion_tokens` (reasoning models refuse `max_tokens`) and knows no
/// `reasoning_content`; compatible servers know `max_tokens`, and thinking servers
/// (DeepSeek, vLLM's reasoning parsers) want their `reasoning_content` back.
pub fn request_body(request: &ChatRequest, openai_itself: bool) -> Value {
    let max_completion_tokens = openai_itself;
    let mut messages = Vec::new();
    if !request.system.is_empty() {
        messages.push(json!({"role": "system", "content": request.system}));
    }
    for m in &request.messages {
        push_message(&mut messages, m, !openai_itself);
    }
    let mut body = json!({
        "model": request.model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": messages,
    });
    let key = if max_completion_tokens {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    body[key] = json!(request.max_tokens);
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": super::schema::openai(&t.input_schema),
                    },
                })
            })
            .collect();
    }
    body
}

fn push_message(out: &mut Vec<Value>, m: &Message, reasoning_back: bool) {
    match m.role {
        Role::Assistant => {
            let text = m.text();
            let reasoning: String = m
                .parts
                .iter()
                .filter_map(|p| match p {
                    Part::Reasoning { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let calls: Vec<Value> = m
                .tool_calls()
                .map(|(id, name, input)| {
                    json!({
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": input.to_string()},
                    })
                })
                .collect();
            let mut msg = json!({"role": "assistant"});
            msg["content"] = if text.is_empty() {
                Value::Null
            } else {
                json!(text)
            };
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            if text.is_empty() && msg.get("tool_calls").is_none() {
                msg["content"] = json!("");
            }
            if reasoning_back && !reasoning.is_empty() {
                msg["reasoning_content"] = json!(reasoning);
            }
            out.push(msg);
        }
        Role::User => {
            // Tool results are `tool` messages, which must follow the assistant's calls
            // directly; the user's text comes after them.
            for p in &m.parts {
                if let Part::ToolResult {
                    id,
                    content,
                    is_error,
                    ..
                } = p
                {
                    let content = if *is_error {
                        format!("Error: {content}")
                    } else {
                        content.clone()
                    };
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
            }
            let has_image = m.parts.iter().any(|p| matches!(p, Part::Image { .. }));
            if has_image {
                // Text and images as content parts, in the message's order.
                let content: Vec<Value> = m
                    .parts
                    .iter()
                    .filter_map(|p| match p {
                        Part::Text { text } if !text.is_empty() => {
                            Some(json!({"type": "text", "text": text}))
                        }
                        Part::Image { media_type, data } => Some(json!({
                            "type": "image_url",
                            "image_url": {"url": data_url(media_type, data)},
                        })),
                        _ => None,
                    })
                    .collect();
                out.push(json!({"role": "user", "content": content}));
            } else {
                let text = m.text();
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
        }
    }
}

/// An image as a `data:` URL, how OpenAI's APIs take inline images.
pub(super) fn data_url(media_type: &str, data: &str) -> String {
    format!("data:{media_type};base64,{data}")
}

#[derive(Default)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct Parser {
    text: String,
    reasoning: String,
    calls: BTreeMap<u64, Call>,
    usage: Usage,
    finish: Option<String>,
    /// The model's refusal message, if it refused.
    refusal: String,
    /// The number of the first call this turn names when the server sends no id.
    first_id: usize,
}

impl Parser {
    fn new(first_id: usize) -> Self {
        Self {
            first_id,
            ..Self::default()
        }
    }
}

impl StreamParser for Parser {
    fn event(&mut self, event: SseEvent, on_delta: DeltaSink<'_>) -> Result<bool, LlmError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        let v = http::json(data)?;
        if let Some(e) = v.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: format!("error in the stream: {message}"),
            });
        }
        if !v.is_object() {
            return Err(LlmError::Protocol(format!("chunk is not an object: {v}")));
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            // `prompt_tokens` includes the cached ones; OpenAI caches by prefix on its own and
            // bills no cache writes.
            self.usage = Usage {
                input_tokens: n("prompt_tokens"),
                output_tokens: n("completion_tokens"),
                cache_read_tokens: u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
                cache_write_tokens: 0,
            };
        }
        let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(false);
        };
        if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(r.to_string());
        }
        let Some(delta) = choice.get("delta") else {
            return Ok(false);
        };
        if let Some(s) = delta.get("content").and_then(Value::as_str)
            && !s.is_empty()
        {
            self.text.push_str(s);
            on_delta(Delta::Text(s.to_string()));
        }
        if let Some(s) = delta.get("refusal").and_then(Value::as_str) {
            self.refusal.push_str(s);
        }
        for key in ["reasoning_content", "reasoning"] {
            if let Some(s) = delta.get(key).and_then(Value::as_str)
                && !s.is_empty()
            {
                self.reasoning.push_str(s);
                on_delta(Delta::Reasoning(s.to_string()));
            }
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (pos, c) in calls.iter().enumerate() {
                let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
                let call = self.calls.entry(index).or_default();
                if let Some(id) = c.get("id").and_then(Value::as_str)
                    && !id.is_empty()
                {
                    call.id = id.to_string();
                }
                if let Some(f) = c.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        call.name.push_str(n);
                    }
                    match f.get("arguments") {
                        Some(Value::String(a)) => call.arguments.push_str(a),
                        // Some compatible servers send the arguments as an object.
                        Some(a @ Value::Object(_)) => call.arguments.push_str(&a.to_string()),
                        _ => {}
                    }
                }
            }
        }
        Ok(false)
    }

    fn finish(self, complete: bool) -> Result<ChatResponse, LlmError> {
        if !complete && self.finish.is_none() {
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: "the stream ended before a finish reason or [DONE]".into(),
            });
        }
        let mut parts = Vec::new();
        if !self.reasoning.is_empty() {
            parts.push(Part::Reasoning {
                text: self.reasoning,
                signature: None,
            });
        }
        if !self.text.is_empty() {
            parts.push(Part::Text { text: self.text });
        }
        if !self.refusal.is_empty() {
            parts.push(Part::Text {
                text: self.refusal.clone(),
            });
        }
        let cut = self.finish.as_deref() == Some("length");
        let has_calls = !self.calls.is_empty();
        for (n, (index, call)) in self.calls.into_iter().enumerate() {
            if call.name.is_empty() {
                return Err(LlmError::Protocol(format!(
                    "tool call {index} has no function name"
                )));
            }
            let Some(input) = http::call_input(&call.name, &call.arguments, cut)? else {
                continue;
            };
            let id = if call.id.is_empty() {
                format!("call_{}", self.first_id + n)
            } else {
                call.id
            };
            parts.push(Part::ToolCall {
                id,
                name: call.name,
                input,
            });
        }
        let stop = match self.finish.as_deref() {
            Some("length") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::Refusal,
            _ if !self.refusal.is_empty() => StopReason::Refusal,
            _ if has_calls => StopReason::ToolUse,
            Some("stop") | None => StopReason::EndTurn,
            Some("tool_calls" | "function_call") => StopReason::ToolUse,
            Some(_) => StopReason::Other,
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
