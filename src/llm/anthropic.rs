//! Placeholder: being written (see the workflow issue). Refuses to run.

use super::{ChatRequest, ChatResponse, DeltaSink, LlmError, LlmProvider};
use crate::config::ProviderKeys;

pub struct Anthropic;

impl Anthropic {
    pub fn new(_keys: &ProviderKeys) -> Result<Self, LlmError> {
        Err(LlmError::Config(
            "the anthropic provider is not built yet".into(),
        ))
    }
}

#[async_trait::async_trait]
impl LlmProvider for Anthropic {
    fn name(&self) -> &str {
        "anthropic"
    }
    async fn chat(
        &self,
        _request: &ChatRequest,
        _on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        Err(LlmError::Config(
            "the anthropic provider is not built yet".into(),
        ))
    }
}
