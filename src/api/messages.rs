//! `GET /projects/{projectId}/branches/{branchId}/messages`: a branch's conversation.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;
use weldr_storage::StreamKey;
use weldr_storage::conversation::{self as convs, ConversationEntry};

use super::schema::Id;
use super::{ApiError, principal, require_branch};

/// Messages per page unless `limit` says otherwise, and the most it may say.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 200;

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = MessagePage))]
pub struct MessagePage {
    /// Oldest first; the newest message is last.
    pub messages: Vec<MessageView>,
    /// Pass as `before` for the page of older messages; absent on the first page.
    pub next_before: Option<u64>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = ConversationMessage))]
pub struct MessageView {
    /// Position in the branch's conversation (from 1).
    pub seq: u64,
    /// The id stream events carry as `messageId` (the user's message: `userMessageId` in the
    /// workflow's first `status` event).
    pub message_id: String,
    /// `user`, `assistant` (a workflow's outcome) or `summary` (stands for the messages up to
    /// `coversThrough` when the thread is given to the model).
    pub kind: String,
    pub workflow_id: Option<String>,
    /// The user's text, the agent's reply or last words, or the summary.
    pub text: String,
    pub attachments: Vec<AttachmentView>,
    #[salvo(schema(value_type = Option<Object>))]
    pub plan: Option<serde_json::Value>,
    /// The workflow's final status: `complete`, `failed` or `cancelled`.
    pub status: Option<String>,
    pub version_id: Option<String>,
    /// Files the version changed; for a workflow that did not complete, the files it left
    /// changed and uncommitted in the working tree.
    pub files_changed: Vec<String>,
    pub error: Option<String>,
    pub tool_calls: Vec<ToolCallView>,
    pub covers_through: Option<u64>,
    pub created_at_ms: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = MessageAttachment))]
pub struct AttachmentView {
    pub attachment_id: String,
    pub media_type: String,
    pub filename: Option<String>,
    pub size: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = ToolCallNote))]
pub struct ToolCallView {
    pub name: String,
    /// The path, pattern or command it was called with (shortened).
    pub target: String,
    pub is_error: bool,
}

impl MessageView {
    fn new(seq: u64, e: ConversationEntry) -> Self {
        Self {
            seq,
            message_id: e.message_id,
            kind: e.kind.as_str().into(),
            workflow_id: e.workflow_id,
            text: e.text,
            attachments: e
                .attachments
                .into_iter()
                .map(|a| AttachmentView {
                    attachment_id: a.id,
                    media_type: a.media_type,
                    filename: a.filename,
                    size: a.size,
                })
                .collect(),
            plan: e.plan_json.and_then(|p| serde_json::from_str(&p).ok()),
            status: e.status,
            version_id: e.version.map(|v| v.to_string()),
            files_changed: e.files_changed,
            error: e.error,
            tool_calls: e
                .tool_calls
                .into_iter()
                .map(|c| ToolCallView {
                    name: c.name,
                    target: c.target,
                    is_error: c.is_error,
                })
                .collect(),
            covers_through: e.covers_through,
            created_at_ms: e.created_at_ms,
        }
    }
}

/// A number query parameter in `range`, or a 400 that names it.
fn query_number(
    req: &Request,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ApiError> {
    let Some(raw) = req.queries().get(name) else {
        return Ok(None);
    };
    raw.parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "`{name}` must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// A branch's conversation, a page at a time, newest last: the user's messages, each
/// workflow's outcome (reply, plan, version, files changed, failure, tool calls) and the
/// summaries that stand for older messages. `before` pages back.
#[endpoint(
    tags("workflows"),
    parameters(
        ("projectId" = Id, Path, description = "Project id"),
        ("branchId" = Id, Path, description = "Branch id"),
        ("limit" = Option<u64>, Query, minimum = 1, maximum = 200, description = "Messages per page (default 50)"),
        ("before" = Option<u64>, Query, minimum = 1, description = "Only messages before this seq (from `nextBefore`)")
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503, 507)
)]
pub async fn list_messages(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<MessagePage>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let limit =
        query_number(req, "limit", 1..=MAX_PAGE as u64)?.map_or(DEFAULT_PAGE, |n| n as usize);
    let before = query_number(req, "before", 1..=u64::MAX)?;
    require_branch(&app, &principal, &key).await?;
    let stream = StreamKey::new(&key.project_id, &key.branch_id);
    let (page, more) = app
        .base
        .read(move |rtx| convs::page(rtx, &stream, before, limit))
        .await?;
    let next_before = if more {
        page.first().map(|(seq, _)| *seq)
    } else {
        None
    };
    Ok(Json(MessagePage {
        messages: page
            .into_iter()
            .map(|(seq, e)| MessageView::new(seq, e))
            .collect(),
        next_before,
    }))
}
