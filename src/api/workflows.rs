//! `/trigger` and `/workflows/{workflowId}`: start, read and cancel agent workflows.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use weldr_storage::workflow::{self as wfs, WorkflowRecord};

use super::body::json_body;
use super::schema::{Accepted, Id};
use super::{ApiError, principal, require_branch};
use crate::auth::Principal;
use crate::branches::BranchKey;
use crate::ids::check_id;
use crate::llm::ModelSpec;

/// Longest request text, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 100_000;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = Trigger))]
pub struct TriggerBody {
    #[salvo(schema(value_type = Id))]
    pub project_id: String,
    #[salvo(schema(value_type = Id))]
    pub branch_id: String,
    /// What to do. Required.
    // An `Option` only so that a missing one gets its own error code (`message_required`)
    // instead of serde's `invalid_json`; the schema says required.
    #[salvo(schema(value_type = TriggerMessage, required = true))]
    pub message: Option<TriggerMessage>,
    /// `provider:model` (provider `anthropic`, `openai`, `ollama`, `gemini` or `replay`; the
    /// model at most 200 bytes); default `WELDR_MODEL`. A provider without a key is refused.
    #[salvo(schema(min_length = 3, max_length = 220, pattern = r"^\s*[a-z]+\s*:"))]
    pub model: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = TriggerMessage))]
pub struct TriggerMessage {
    /// The text parts, joined with newlines: at most 100,000 bytes in all, not only white space.
    #[salvo(schema(min_items = 1))]
    pub content: Vec<ContentPart>,
    /// Not supported yet: absent or empty.
    #[salvo(schema(value_type = Option<Vec<Id>>))]
    pub attachment_ids: Option<Vec<String>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = ContentPart))]
pub struct ContentPart {
    /// `text`.
    #[serde(rename = "type")]
    #[salvo(schema(pattern = "^text$"))]
    pub kind: String,
    /// Required for a `text` part.
    #[salvo(schema(max_length = 100000))]
    pub text: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Triggered))]
pub struct Triggered {
    pub workflow_id: String,
    pub stream_url: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Workflow))]
pub struct WorkflowView {
    pub workflow_id: String,
    pub project_id: String,
    pub branch_id: String,
    pub status: String,
    pub model: String,
    pub plan: Option<serde_json::Value>,
    pub tasks: Vec<TaskView>,
    pub version_id: Option<String>,
    pub error: Option<String>,
    pub reply: Option<String>,
    pub cancel_requested: bool,
    pub usage: UsageView,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = WorkflowTask))]
pub struct TaskView {
    pub id: u64,
    pub summary: String,
    pub status: String,
    pub attempts: u32,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Usage))]
pub struct UsageView {
    /// Prompt tokens, the cached ones included, as the providers reported them.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache.
    pub cache_write_tokens: u64,
}

impl From<WorkflowRecord> for WorkflowView {
    fn from(w: WorkflowRecord) -> Self {
        let summary = |id: u64| {
            w.plan
                .as_ref()
                .and_then(|p| p.tasks.iter().find(|t| t.id == id))
                .map(|t| t.summary.clone())
                .unwrap_or_default()
        };
        Self {
            tasks: w
                .tasks
                .iter()
                .map(|t| TaskView {
                    id: t.id,
                    summary: summary(t.id),
                    status: t.status.as_str().into(),
                    attempts: t.attempts,
                })
                .collect(),
            plan: w.plan.as_ref().map(crate::workflow::plan_value),
            workflow_id: w.workflow_id,
            project_id: w.project_id,
            branch_id: w.branch_id,
            status: w.status.as_str().into(),
            model: w.model,
            version_id: w.version.map(|v| v.to_string()),
            error: w.error,
            reply: w.reply,
            cancel_requested: w.cancel_requested,
            usage: UsageView {
                input_tokens: w.input_tokens,
                output_tokens: w.output_tokens,
                cache_read_tokens: w.cache_read_tokens,
                cache_write_tokens: w.cache_write_tokens,
            },
            created_at_ms: w.created_at_ms,
            updated_at_ms: w.updated_at_ms,
        }
    }
}

/// Start a workflow on a branch. Answers 202 at once; progress is on the branch stream.
#[endpoint(
    tags("workflows"),
    request_body = TriggerBody,
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(202, 400, 401, 404, 409, 413, 415, 429, 431, 500, 503, 507)
)]
pub async fn trigger(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Accepted<Triggered>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let body: TriggerBody = json_body(req, app.config.max_body_bytes).await?;
    check_id("projectId", &body.project_id)?;
    check_id("branchId", &body.branch_id)?;
    let message = body.message.ok_or_else(|| {
        ApiError::bad_request(
            "message_required",
            "message.content with a text part is required",
        )
    })?;
    let mut text = String::new();
    for part in &message.content {
        match (part.kind.as_str(), &part.text) {
            ("text", Some(t)) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            ("text", None) => {
                return Err(ApiError::bad_request(
                    "invalid_message",
                    "a text part needs `text`",
                ));
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    "invalid_message",
                    format!("unsupported content part type {other:?}; use `text`"),
                ));
            }
        }
    }
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "empty_message",
            "the message text is empty",
        ));
    }
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::bad_request(
            "message_too_large",
            format!("the message text is longer than {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    if let Some(ids) = &message.attachment_ids {
        for id in ids {
            check_id("attachmentIds[]", id)?;
        }
        if !ids.is_empty() {
            return Err(ApiError::bad_request(
                "attachments_unsupported",
                "attachments are not supported yet",
            ));
        }
    }
    let model = body
        .model
        .unwrap_or_else(|| app.config.providers.default_model.clone());
    let spec = ModelSpec::parse(&model)
        .map_err(|e| ApiError::bad_request("invalid_model", e.to_string()))?;
    // A provider without a key (or a recorded transcript outside REPLAY_DIR: a caller names no
    // other file) is refused now, not reported later by a failed workflow.
    crate::llm::provider_for(&app.config.providers, &spec)
        .map_err(|e| ApiError::bad_request("invalid_model", e.to_string()))?;
    let key = BranchKey::new(&body.project_id, &body.branch_id);
    let branch = require_branch(&app, &principal, &key).await?;
    app.trigger_limiter.check(&principal.user_id)?;
    app.residency.ensure_present_from(branch).await?;
    let input = crate::workflow::UserInput {
        text,
        attachments: Vec::new(),
    };
    let wf = crate::workflow::trigger(
        &app.workflows,
        &key.project_id,
        &key.branch_id,
        input,
        model,
        None,
    )
    .await?
    .workflow;
    Ok(Accepted(Triggered {
        stream_url: format!("/stream/{}/{}", wf.project_id, wf.branch_id),
        workflow_id: wf.workflow_id,
    }))
}

async fn visible(
    app: &crate::App,
    principal: &Principal,
    id: &str,
) -> Result<WorkflowRecord, ApiError> {
    check_id("workflowId", id)?;
    let id2 = id.to_string();
    let wf = app
        .base
        .read(move |rtx| wfs::get_workflow(rtx, &id2))
        .await?;
    let not_found =
        || ApiError::not_found("workflow_not_found", format!("workflow {id} not found"));
    let wf = wf.ok_or_else(not_found)?;
    require_branch(
        app,
        principal,
        &BranchKey::new(&wf.project_id, &wf.branch_id),
    )
    .await
    .map_err(|_| not_found())?;
    Ok(wf)
}

/// A workflow: status, plan, tasks, version, error and token usage.
#[endpoint(
    tags("workflows"),
    parameters(("workflowId" = Id, Path, description = "Workflow id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn get_workflow(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<WorkflowView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let id = req.param::<String>("workflowId").unwrap_or_default();
    Ok(Json(visible(&app, &principal, &id).await?.into()))
}

/// Ask a workflow to stop at its next safe point; it ends `cancelled`.
#[endpoint(
    tags("workflows"),
    parameters(("workflowId" = Id, Path, description = "Workflow id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(202, 400, 401, 404, 409, 413, 431, 500, 503)
)]
pub async fn cancel_workflow(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Accepted<WorkflowView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let id = req.param::<String>("workflowId").unwrap_or_default();
    // No body is needed; one that is sent anyway is held to the body limit.
    if let Err(salvo::http::ParseError::PayloadTooLarge) =
        req.payload_with_max_size(app.config.max_body_bytes).await
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body is larger than {} bytes",
                app.config.max_body_bytes
            ),
        ));
    }
    let wf = visible(&app, &principal, &id).await?;
    if wf.status.is_terminal() {
        return Err(ApiError::conflict(
            "workflow_finished",
            format!("workflow {id} is already {}", wf.status.as_str()),
        ));
    }
    let wf = crate::workflow::request_cancel(&app.workflows, &id).await?;
    Ok(Accepted(wf.into()))
}
