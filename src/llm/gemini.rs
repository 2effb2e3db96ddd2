//! Google Gemini, streamed (`POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`).
//!
//! Gemini has no tool-call ids: calls get `call_{n}`, `n` counting the calls of the whole
//! conversation so ids stay unique and stable; results go back as `functionResponse` parts by
//! name, in order. A `thoughtSignature` on a part comes back as an empty
//! [`Part::Reasoning`] carrying the signature just before that part, and is attached again to
//! the part that follows it when the conversation is sent back.

use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::http::{self, Retry, SseEvent, StreamParser, Transport};
use super::{
    ChatRequest, ChatResponse, Delta, DeltaSink, LlmError, LlmProvider, Message, Part, Role,
    StopReason, Usage,
};
use crate::config::ProviderKeys;

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

pub struct Gemini {
    base: String,
    key: HeaderValue,
    transport: Transport,
}

impl Gemini {
    pub fn new(keys: &ProviderKeys) -> Result<Self, LlmError> {
        let key = keys
            .gemini_api_key
            .as_ref()
            .filter(|k| !k.expose().trim().is_empty())
            .ok_or_else(|| LlmError::Config("GEMINI_API_KEY is not set".into()))?;
        Ok(Self {
            base: http::trim_base(keys.gemini_base_url.as_deref().unwrap_or(DEFAULT_BASE_URL)),
            key: http::header_value("GEMINI_API_KEY", key.expose().trim())?,
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
impl LlmProvider for Gemini {
    fn name(&self) -> &str {
        "gemini"
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let mut headers = HeaderMap::new();
        headers.insert("x-goog-api-key", self.key.clone());
        let model = request
            .model
            .strip_prefix("models/")
            .unwrap_or(&request.model);
        let url = format!(
            "{}/v1beta/models/{}:streamGenerateContent?alt=sse",
            self.base,
            utf8_percent_encode(model, MODEL)
        );
        let body = request_body(request);
        let first_id = request.messages.iter().flat_map(|m| m.tool_calls()).count();
        self.transport
            .stream(&url, headers, &body, || Parser::new(first_id), on_delta)
            .await
    }
}

/// Characters escaped in the model name (`.`, `-` and `_` stay).
const MODEL: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// The generateContent body for `request`.
pub fn request_body(request: &ChatRequest) -> Value {
    let contents: Vec<Value> = request
        .messages
        .iter()
        .map(content)
        .filter(|c| c["parts"].as_array().is_some_and(|p| !p.is_empty()))
        .collect();
    let mut body = json!({
        "contents": contents,
        "generationConfig": {"maxOutputTokens": request.max_tokens},
    });
    if !request.system.is_empty() {
        body["systemInstruction"] = json!({"parts": [{"text": request.system}]});
    }
    if !request.tools.is_empty() {
        let decls: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "description": t.description,
                    "parameters": super::schema::gemini(&t.input_schema),
                })
            })
            .collect();
        body["tools"] = json!([{"functionDeclarations": decls}]);
    }
    body
}

fn content(m: &Message) -> Value {
    let role = match m.role {
        Role::User => "user",
        Role::Assistant => "model",
    };
    let mut parts = Vec::new();
    let mut signature: Option<&str> = None;
    for p in &m.parts {
        let mut part = match p {
            Part::Reasoning { signature: s, .. } => {
                // Thought text is not sent back; its signature rides on the next part.
                if let Some(s) = s {
                    signature = Some(s);
                }
                continue;
            }
            Part::Text { text } if text.is_empty() => continue,
            Part::Text { text } => json!({"text": text}),
            // Only a user turn takes an image.
            Part::Image { .. } if m.role == Role::Assistant => continue,
            Part::Image { media_type, data } => {
                json!({"inlineData": {"mimeType": media_type, "data": data}})
            }
            Part::ToolCall { name, input, .. } => {
                json!({"functionCall": {"name": name, "args": input}})
            }
            Part::ToolResult {
                name,
                content,
                is_error,
                ..
            } => {
                let response = if *is_error {
                    json!({"error": content})
                } else {
                    json!({"content": content})
                };
                json!({"functionResponse": {"name": name, "response": response}})
            }
        };
        if let Some(s) = signature.take() {
            part["thoughtSignature"] = json!(s);
        }
        parts.push(part);
    }
    json!({"role": role, "parts": parts})
}

struct Parser {
    parts: Vec<Part>,
    next_id: usize,
    usage: Usage,
    finish: Option<String>,
    seen: bool,
}

impl Parser {
    fn new(first_id: usize) -> Self {
        Self {
            parts: Vec::new(),
            next_id: first_id,
            usage: Usage::default(),
            finish: None,
            seen: false,
        }
    }

    fn push_text(&mut self, text: &str, thought: bool) {
        match (self.parts.last_mut(), thought) {
            (Some(Part::Text { text: t }), false) => t.push_str(text),
            (
                Some(Part::Reasoning {
                    text: t,
                    signature: None,
                }),
                true,
            ) => t.push_str(text),
            (_, false) => self.parts.push(Part::Text {
                text: text.to_string(),
            }),
            (_, true) => self.parts.push(Part::Reasoning {
                text: text.to_string(),
                signature: None,
            }),
        }
    }
}

impl StreamParser for Parser {
    fn event(&mut self, event: SseEvent, on_delta: DeltaSink<'_>) -> Result<bool, LlmError> {
        let v = http::json(&event.data)?;
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
        self.seen = true;
        if let Some(reason) = v["promptFeedback"]
            .get("blockReason")
            .and_then(Value::as_str)
        {
            return Err(LlmError::Refused(format!(
                "the prompt was blocked: {reason}"
            )));
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            // `promptTokenCount` includes the cached tokens (implicit caching by prefix).
            self.usage = Usage {
                input_tokens: n("promptTokenCount"),
                output_tokens: n("candidatesTokenCount") + n("thoughtsTokenCount"),
                cache_read_tokens: n("cachedContentTokenCount"),
                cache_write_tokens: 0,
            };
        }
        let Some(candidate) = v
            .get("candidates")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(false);
        };
        if let Some(r) = candidate.get("finishReason").and_then(Value::as_str) {
            self.finish = Some(r.to_string());
        }
        let parts = candidate["content"]
            .get("parts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for p in parts {
            if let Some(sig) = p.get("thoughtSignature").and_then(Value::as_str) {
                self.parts.push(Part::Reasoning {
                    text: String::new(),
                    signature: Some(sig.to_string()),
                });
            }
            let thought = p.get("thought").and_then(Value::as_bool).unwrap_or(false);
            if let Some(call) = p.get("functionCall") {
                let name = call
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        LlmError::Protocol(format!("functionCall without a name: {call}"))
                    })?
                    .to_string();
                let input = match call.get("args") {
                    None | Some(Value::Null) => json!({}),
                    Some(a) => a.clone(),
                };
                let id = format!("call_{}", self.next_id);
                self.next_id += 1;
                self.parts.push(Part::ToolCall { id, name, input });
            } else if let Some(text) = p.get("text").and_then(Value::as_str) {
                if text.is_empty() {
                    continue;
                }
                self.push_text(text, thought);
                on_delta(if thought {
                    Delta::Reasoning(text.to_string())
                } else {
                    Delta::Text(text.to_string())
                });
            }
        }
        Ok(false)
    }

    fn finish(self, _complete: bool) -> Result<ChatResponse, LlmError> {
        if !self.seen {
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: "the stream ended without a response".into(),
            });
        }
        if self.finish.is_none() {
            return Err(LlmError::Unavailable {
                attempts: 0,
                message: "the stream ended before a finish reason".into(),
            });
        }
        let has_calls = self
            .parts
            .iter()
            .any(|p| matches!(p, Part::ToolCall { .. }));
        let stop = match self.finish.as_deref() {
            Some("MAX_TOKENS") => StopReason::MaxTokens,
            Some(
                "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII"
                | "IMAGE_SAFETY" | "LANGUAGE",
            ) => StopReason::Refusal,
            Some("MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "TOO_MANY_TOOL_CALLS") => {
                StopReason::MalformedCall
            }
            _ if has_calls => StopReason::ToolUse,
            Some("STOP") => StopReason::EndTurn,
            _ => StopReason::Other,
        };
        let mut parts = self.parts;
        if stop == StopReason::Refusal
            && let Some(reason) = &self.finish
            && !parts.iter().any(|p| matches!(p, Part::Text { .. }))
        {
            parts.push(Part::Text {
                text: format!("blocked by the provider ({reason})"),
            });
        }
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
