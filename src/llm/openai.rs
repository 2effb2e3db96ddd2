//! Placeholder: being written (see the workflow issue). Refuses to run.

use super::{ChatRequest, ChatResponse, DeltaSink, LlmError, LlmProvider};
use crate::config::ProviderKeys;

pub struct OpenAi;

impl OpenAi {
    pub fn openai(_keys: &ProviderKeys) -> Result<Self, LlmError> {
        Err(LlmError::Config(
            "the openai provider is not built yet".into(),
        ))
    }
    pub fn ollama(_keys: &ProviderKeys) -> Result<Self, LlmError> {
        Err(LlmError::Config(
            "the ollama provider is not built yet".into(),
        ))
    }
}

#[async_trait::async_trait]
impl LlmProvider for OpenAi {
    fn name(&self) -> &str {
        "openai"
    }
    async fn chat(
        &self,
        _request: &ChatRequest,
        _on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        Err(LlmError::Config(
            "the openai provider is not built yet".into(),
        ))
    }
}
