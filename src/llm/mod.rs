//! LLM providers behind one trait: Anthropic Messages, OpenAI's Responses API (OpenAI itself),
//! OpenAI Chat Completions (every OpenAI-compatible server: Ollama, llama.cpp, vLLM — the
//! offline desktop mode), Gemini, and a replay provider that plays a recorded transcript (tests, demos, benchmarks).
//!
//! The workflow engine speaks only [`LlmProvider`]: it sends a [`ChatRequest`] (system prompt,
//! conversation, tool specs) and gets one assistant turn back as a [`ChatResponse`], while text
//! and reasoning deltas arrive through the `on_delta` callback as the provider streams them.
//! Providers own retries (429/5xx/connection errors, with backoff) and request timeouts; what
//! they give up on comes back as an [`LlmError`] that the engine turns into an `error` event and
//! a `failed` workflow.

pub mod anthropic;
pub mod gemini;
pub mod http;
pub mod limits;
pub mod openai;
pub mod replay;
pub mod responses;
pub mod schema;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ProviderKeys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// One part of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text {
        text: String,
    },
    /// Model reasoning ("thinking"). `signature` is what Anthropic needs to accept the block
    /// back in a later request; other providers leave it empty.
    Reasoning {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// The assistant asks for a tool. `id` is the provider's call id (or one we made up for
    /// providers without ids, e.g. Gemini); tool results refer to it.
    ToolCall {
        id: String,
        name: String,
        input: Value,
    },
    /// An image in a user message: `data` is the base64 of the bytes (no `data:` prefix),
    /// `media_type` one of `image/png`, `image/jpeg`, `image/gif`, `image/webp`. Each provider
    /// sends it in its own wire format; the engine sends one only to a model that takes images
    /// ([`limits::accepts_images`]).
    Image {
        media_type: String,
        data: String,
    },
    /// The result of a tool call, sent back in a user message.
    ToolResult {
        id: String,
        name: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Message {
    pub fn user_text(text: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            parts: vec![Part::Text { text: text.into() }],
        }
    }

    /// The concatenated text parts.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The tool calls, in order.
    pub fn tool_calls(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.parts.iter().filter_map(|p| match p {
            Part::ToolCall { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// A tool the model may call: its name, what it does, and a JSON Schema of its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The model name at the provider (`claude-sonnet-4-5`, `gpt-4.1`, `qwen2.5-coder`, ...).
    pub model: String,
    pub system: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: u32,
    /// How many leading `messages` the engine sends unchanged in its next request (the part
    /// of the history a provider may cache). Anthropic marks its end with a `cache_control`
    /// breakpoint (besides the system prompt, the tools and the last message).
    pub stable_prefix: usize,
    /// The model turns this workflow took before this request (summarized ones included):
    /// a conversation turn. None for a side request (a summary of older turns).
    pub turn: Option<usize>,
}

/// A streamed piece of the assistant's turn, forwarded to the branch stream as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Text(String),
    Reasoning(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Every prompt token, the cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache (Anthropic bills them apart).
    #[serde(default)]
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model finished its turn.
    EndTurn,
    /// The model wants tool results.
    ToolUse,
    /// The output hit `max_tokens`: the turn is cut off (a tool call in it may be missing).
    MaxTokens,
    /// The model refused, or the provider's safety filter blocked the output (the reason, if
    /// the provider gave one, is the message's text).
    Refusal,
    /// The provider says the model produced a malformed or unexpected tool call.
    MalformedCall,
    Other,
}

/// One complete assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// Role is always [`Role::Assistant`].
    pub message: Message,
    pub usage: Usage,
    pub stop: StopReason,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Missing key, unknown provider, malformed `provider:model`: fix the configuration.
    #[error("{0}")]
    Config(String),
    /// The provider refused the key (401/403).
    #[error("the provider refused the credentials: {0}")]
    Auth(String),
    /// Still rate limited (429) after the retries.
    #[error("rate limited by the provider after {attempts} attempts: {message}")]
    RateLimited { attempts: u32, message: String },
    /// Unreachable, 5xx or timed out after the retries.
    #[error("the provider is unavailable after {attempts} attempts: {message}")]
    Unavailable { attempts: u32, message: String },
    /// A 4xx other than auth/rate limit: the request was refused.
    #[error("the provider refused the request: {0}")]
    Refused(String),
    /// The response stream was not what the wire format promises.
    #[error("malformed response from the provider: {0}")]
    Protocol(String),
}

/// Called with every delta as it streams in.
pub type DeltaSink<'a> = &'a (dyn Fn(Delta) + Send + Sync);

#[async_trait::async_trait]
pub trait LlmProvider: Send + Sync {
    /// `anthropic`, `openai`, `ollama`, `gemini` or `replay`.
    fn name(&self) -> &str;

    /// One assistant turn for `request`, streaming deltas into `on_delta` as they arrive.
    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError>;
}

/// A parsed `provider:model` spec (`WELDR_MODEL`, or a request's `model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub provider: String,
    pub model: String,
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self, LlmError> {
        let bad = || {
            LlmError::Config(format!(
                "model {spec:?} must be `provider:model`, e.g. `anthropic:claude-sonnet-4-5` or `ollama:qwen2.5-coder`"
            ))
        };
        let (provider, model) = spec.split_once(':').ok_or_else(bad)?;
        let (provider, model) = (provider.trim(), model.trim());
        if provider.is_empty()
            || model.is_empty()
            || model.len() > 200
            || model.chars().any(char::is_control)
        {
            return Err(bad());
        }
        match provider {
            "anthropic" | "openai" | "ollama" | "gemini" | "replay" => {}
            other => {
                return Err(LlmError::Config(format!(
                    "unknown provider {other:?}; use anthropic, openai, ollama, gemini or replay"
                )));
            }
        }
        Ok(Self {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }
}

/// The provider for `spec`. Fails with [`LlmError::Config`] when its key is missing.
pub fn provider_for(
    keys: &ProviderKeys,
    spec: &ModelSpec,
) -> Result<Arc<dyn LlmProvider>, LlmError> {
    match spec.provider.as_str() {
        "anthropic" => Ok(Arc::new(anthropic::Anthropic::new(keys)?)),
        "openai" if keys.openai_responses => Ok(Arc::new(responses::Responses::new(keys)?)),
        "openai" => Ok(Arc::new(openai::OpenAi::openai(keys)?)),
        "ollama" => Ok(Arc::new(openai::OpenAi::ollama(keys)?)),
        "gemini" => Ok(Arc::new(gemini::Gemini::new(keys)?)),
        "replay" => {
            let path = replay::allowed_path(keys.replay_dir.as_deref(), &spec.model)?;
            Ok(Arc::new(replay::Replay::from_path(&path)?))
        }
        other => Err(LlmError::Config(format!("unknown provider {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs() {
        assert_eq!(
            ModelSpec::parse("anthropic:claude-sonnet-4-5").unwrap(),
            ModelSpec {
                provider: "anthropic".into(),
                model: "claude-sonnet-4-5".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("ollama:qwen2.5-coder:7b").unwrap().model,
            "qwen2.5-coder:7b"
        );
        for bad in ["", "anthropic", "anthropic:", ":x", "nope:x", "openai:a\nb"] {
            assert!(
                matches!(ModelSpec::parse(bad), Err(LlmError::Config(_))),
                "{bad}"
            );
        }
    }
}
