//! Placeholder: being written (see the workflow issue). Refuses to run.

use super::{ChatRequest, ChatResponse, DeltaSink, LlmError, LlmProvider};

pub struct Replay;

impl Replay {
    pub fn from_path(_path: &std::path::Path) -> Result<Self, LlmError> {
        Err(LlmError::Config(
            "the replay provider is not built yet".into(),
        ))
    }
}

#[async_trait::async_trait]
impl LlmProvider for Replay {
    fn name(&self) -> &str {
        "replay"
    }
    async fn chat(
        &self,
        _request: &ChatRequest,
        _on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        Err(LlmError::Config(
            "the replay provider is not built yet".into(),
        ))
    }
}
