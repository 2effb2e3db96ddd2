//! `/trigger` and `/workflows/{workflowId}`: start, read and cancel agent workflows.

use salvo::oapi::schema::{AdditionalProperties, OneOf};
use salvo::oapi::{BasicType, Components, Object, RefOr, Schema, ToSchema};
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use weldr_storage::workflow::{self as wfs, WorkflowRecord};

use sha2::{Digest, Sha256};
use weldr_storage::attachments::NewAttachment;
use weldr_storage::conversation::AttachmentRef;

use super::attachments;
use super::body::json_body;
use super::schema::{Accepted, Id};
use super::{ApiError, principal, require_branch};
use crate::auth::Principal;
use crate::branches::BranchKey;
use crate::ids::check_id;
use crate::llm::ModelSpec;
use crate::workflow::Idempotency;

/// Longest request text, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 100_000;

/// Longest idempotency key (`Idempotency-Key`, `clientMessageId`).
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

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
    /// The client's id for this message, as an idempotency key: a trigger retried with the
    /// same id answers the first one's `202` (a different request with it: 422). The
    /// `Idempotency-Key` header wins over it.
    #[salvo(schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-]{1,128}$"))]
    pub client_message_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = TriggerMessage))]
pub struct TriggerMessage {
    /// Text, image and file parts. The text parts are joined with newlines: at most 100,000
    /// bytes in all. A message needs some text (not only white space) or an attachment.
    pub content: Vec<ContentPart>,
    /// Attachments uploaded before (`POST /projects/{projectId}/attachments`) to this
    /// message's project. With the image and file parts, at most 20 attachments, together at
    /// most twice ATTACHMENT_MAX_BYTES.
    #[salvo(schema(value_type = Option<Vec<Id>>))]
    pub attachment_ids: Option<Vec<String>>,
}

/// One part of a message: `{type: "text", text}`, `{type: "image", image, mediaType?}` or
/// `{type: "file", data, mediaType?, filename?}`. Read as one flat object so that a part
/// with a missing or misplaced field gets an error naming it; documented as the three
/// shapes (see the `ToSchema` below).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image: Option<String>,
    pub data: Option<String>,
    pub media_type: Option<String>,
    pub filename: Option<String>,
}

impl ToSchema for ContentPart {
    fn to_schema(components: &mut Components) -> RefOr<Schema> {
        let string = || Object::with_type(BasicType::String);
        let tag = |name: &str| string().enum_values([name]);
        let closed = |o: Object| o.additional_properties(AdditionalProperties::FreeForm(false));
        let media_type = || {
            string().max_length(255).description(
                "`type/subtype`: an image (image/png, image/jpeg, image/gif, image/webp) or a \
                 text type (text/*, application/json, application/xml, application/yaml, \
                 application/x-yaml, application/javascript, application/typescript). Required \
                 with bare base64; must agree with a data URL's.",
            )
        };
        let text = closed(
            Object::new()
                .property("type", tag("text"))
                .property("text", string().max_length(MAX_MESSAGE_BYTES))
                .required("type")
                .required("text")
                .description("Text; a message's text parts are joined with newlines."),
        );
        let image = closed(
            Object::new()
                .property("type", tag("image"))
                .property(
                    "image",
                    string().description(
                        "A data URL (`data:image/png;base64,...`) or bare base64 of an image",
                    ),
                )
                .property("mediaType", media_type())
                .required("type")
                .required("image")
                .description(
                    "An image, stored as a project attachment (its bytes must be what its type \
                     says). Refused (400 `images_unsupported`) for a model without image input.",
                ),
        );
        let file = closed(
            Object::new()
                .property("type", tag("file"))
                .property(
                    "data",
                    string().description("The file's bytes: base64, or a base64 data URL"),
                )
                .property("mediaType", media_type())
                .property("filename", string().min_length(1).max_length(255))
                .required("type")
                .required("data")
                .description(
                    "A file (an image, or UTF-8 text), stored as a project attachment; at most \
                     ATTACHMENT_MAX_BYTES.",
                ),
        );
        let schema = OneOf::new().item(text).item(image).item(file);
        components
            .schemas
            .insert("ContentPart".to_string(), Schema::OneOf(schema));
        RefOr::Ref(salvo::oapi::Ref::new("#/components/schemas/ContentPart"))
    }
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

/// The largest `/trigger` body: MAX_BODY_BYTES for the message, plus the base64 of as much
/// as a message's attachments may hold (inline image and file parts).
pub fn trigger_body_limit(config: &crate::Config) -> usize {
    let attachments = config.attachment_max_bytes.saturating_mul(2);
    config
        .max_body_bytes
        .saturating_add(attachments.div_ceil(3).saturating_mul(4))
}

/// Start a workflow on a branch. Answers 202 at once; progress is on the branch stream.
///
/// With an idempotency key (the `Idempotency-Key` header, or `clientMessageId`), a retried
/// trigger answers the first one's `202` (whatever that workflow's state, without counting
/// against the rate limit or meeting the busy branch), and the same key with another
/// request answers 422 `idempotency_key_reused`.
#[endpoint(
    tags("workflows"),
    request_body = TriggerBody,
    parameters(
        ("Idempotency-Key" = Option<String>, Header, max_length = 128, pattern = "^[ -~]{1,128}$", description = "Makes a retried trigger answer the first one's workflow (wins over `clientMessageId`): at most 128 printable ASCII characters"),
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(202, 400, 401, 404, 409, 413, 415, 422, 429, 431, 500, 503, 507)
)]
pub async fn trigger(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Accepted<Triggered>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let header_key = idempotency_header(req)?;
    let body: TriggerBody = json_body(req, trigger_body_limit(&app.config)).await?;
    check_id("projectId", &body.project_id)?;
    check_id("branchId", &body.branch_id)?;
    let client_key = body
        .client_message_id
        .as_deref()
        .map(check_client_message_id)
        .transpose()?;
    let message = body.message.ok_or_else(|| {
        ApiError::bad_request(
            "message_required",
            "message.content with a text part (or an attachment) is required",
        )
    })?;
    let max = app.config.attachment_max_bytes;
    let ids = message.attachment_ids.unwrap_or_default();
    let inline_count = message
        .content
        .iter()
        .filter(|p| p.kind == "image" || p.kind == "file")
        .count();
    if inline_count + ids.len() > attachments::MAX_PER_MESSAGE {
        return Err(ApiError::bad_request(
            "too_many_attachments",
            format!(
                "a message carries at most {} attachments (image and file parts and \
                 attachmentIds together)",
                attachments::MAX_PER_MESSAGE
            ),
        ));
    }
    let (text, inline) = read_parts(message.content, max)?;
    if text.trim().is_empty() && inline.is_empty() && ids.is_empty() {
        return Err(ApiError::bad_request(
            "empty_message",
            "the message text is empty and it has no attachment",
        ));
    }
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::bad_request(
            "message_too_large",
            format!("the message text is longer than {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    for id in &ids {
        attachments::check_attachment_id("attachmentIds[]", id)?;
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
    let uploaded = attachments::resolve(&app, &key.project_id, ids).await?;

    // Every attachment of the message, in order, once: (id, media type, size).
    let mut all: Vec<(String, String, u64)> = Vec::new();
    for (id, media, size) in inline
        .iter()
        .map(|a| {
            (
                weldr_storage::attachments::content_id(&a.bytes),
                a.media_type.clone(),
                a.bytes.len() as u64,
            )
        })
        .chain(
            uploaded
                .iter()
                .map(|r| (r.id.clone(), r.media_type.clone(), r.size)),
        )
    {
        if !all.iter().any(|(seen, _, _)| *seen == id) {
            all.push((id, media, size));
        }
    }
    if all.iter().any(|(_, media, _)| attachments::is_image(media))
        && !crate::llm::limits::accepts_images(&spec.provider, &spec.model)
    {
        return Err(ApiError::bad_request(
            "images_unsupported",
            format!(
                "the model {model} does not take images; pick a model that does (a Claude, \
                 GPT-4o or Gemini model, or a vision model such as ollama:llava) or send the \
                 message without images"
            ),
        ));
    }
    if let Some((_, media, _)) = all.iter().find(|(_, media, _)| {
        attachments::is_image(media)
            && !crate::llm::limits::accepts_image_type(&spec.provider, media)
    }) {
        return Err(ApiError::bad_request(
            "images_unsupported",
            format!(
                "{} does not take {media} images; convert the image to PNG or JPEG",
                spec.provider
            ),
        ));
    }
    let total: u64 = all.iter().map(|(_, _, size)| size).sum();
    if total > 2 * max as u64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "attachments_too_large",
            format!(
                "a message's attachments may hold at most {} bytes together (twice \
                 ATTACHMENT_MAX_BYTES); these hold {total}",
                2 * max
            ),
        ));
    }

    let idempotency = header_key.or(client_key).map(|k| Idempotency {
        fingerprint: fingerprint(
            &key,
            &text,
            all.iter().map(|(id, _, _)| id.as_str()),
            &model,
        ),
        key: k,
    });
    if let Some(idem) = &idempotency
        && let Some(first) = first_trigger(&app, &key, idem).await?
    {
        return Ok(Accepted(Triggered {
            stream_url: stream_url(&key),
            workflow_id: first,
        }));
    }
    app.trigger_limiter.check(&principal.user_id)?;
    app.residency.ensure_present_from(branch).await?;
    // Stored before the workflow exists, so that it carries only their ids; a trigger that
    // fails from here leaves them stored, where a retry finds them.
    let mut stored = Vec::new();
    for new in inline {
        let new = NewAttachment {
            project_id: key.project_id.clone(),
            ..new
        };
        stored.push(attachments::store(&app, new).await?.0);
    }
    let mut refs: Vec<AttachmentRef> = Vec::new();
    for record in stored.iter().chain(uploaded.iter()) {
        if !refs.iter().any(|r| r.id == record.id) {
            refs.push(attachments::to_ref(record));
        }
    }
    let input = crate::workflow::UserInput {
        text,
        attachments: refs,
    };
    let wf = crate::workflow::trigger(
        &app.workflows,
        &key.project_id,
        &key.branch_id,
        input,
        model,
        idempotency,
    )
    .await?
    .workflow;
    Ok(Accepted(Triggered {
        stream_url: stream_url(&key),
        workflow_id: wf.workflow_id,
    }))
}

fn stream_url(key: &BranchKey) -> String {
    format!("/stream/{}/{}", key.project_id, key.branch_id)
}

/// The text of a message's parts (joined with newlines) and its inline attachments, decoded
/// and checked as an upload is (their project is set when they are stored).
fn read_parts(
    parts: Vec<ContentPart>,
    max: usize,
) -> Result<(String, Vec<NewAttachment>), ApiError> {
    let invalid = |message: String| ApiError::bad_request("invalid_message", message);
    let mut text = String::new();
    let mut inline = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        let at = format!("message.content[{i}]");
        let misplaced = |fields: &[(&str, bool)]| match fields.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(invalid(format!(
                "{at}: a {} part has no `{name}`",
                part.kind
            ))),
            None => Ok(()),
        };
        match part.kind.as_str() {
            "text" => {
                misplaced(&[
                    ("image", part.image.is_some()),
                    ("data", part.data.is_some()),
                    ("mediaType", part.media_type.is_some()),
                    ("filename", part.filename.is_some()),
                ])?;
                let t = part
                    .text
                    .as_deref()
                    .ok_or_else(|| invalid(format!("{at}: a text part needs `text`")))?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            "image" => {
                misplaced(&[
                    ("text", part.text.is_some()),
                    ("data", part.data.is_some()),
                    ("filename", part.filename.is_some()),
                ])?;
                let value = part
                    .image
                    .as_deref()
                    .ok_or_else(|| invalid(format!("{at}: an image part needs `image`")))?;
                let (media_type, bytes) = attachments::decode_inline(
                    &format!("{at}.image"),
                    value,
                    part.media_type.as_deref(),
                    max,
                )?;
                if !attachments::is_image(&media_type) {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        format!(
                            "{at}: an image part is one of {}, not {media_type}",
                            attachments::IMAGE_TYPES.join(", ")
                        ),
                    ));
                }
                attachments::check_content(&media_type, &bytes, max)?;
                inline.push(NewAttachment {
                    project_id: String::new(),
                    media_type,
                    filename: None,
                    bytes,
                });
            }
            "file" => {
                misplaced(&[
                    ("text", part.text.is_some()),
                    ("image", part.image.is_some()),
                ])?;
                let value = part
                    .data
                    .as_deref()
                    .ok_or_else(|| invalid(format!("{at}: a file part needs `data`")))?;
                let (media_type, bytes) = attachments::decode_inline(
                    &format!("{at}.data"),
                    value,
                    part.media_type.as_deref(),
                    max,
                )?;
                attachments::check_content(&media_type, &bytes, max)?;
                let filename = part
                    .filename
                    .as_deref()
                    .map(attachments::check_filename)
                    .transpose()?;
                inline.push(NewAttachment {
                    project_id: String::new(),
                    media_type,
                    filename,
                    bytes,
                });
            }
            other => {
                return Err(invalid(format!(
                    "{at}: unsupported content part type {other:?}; use `text`, `image` or `file`"
                )));
            }
        }
    }
    Ok((text, inline))
}

/// The `Idempotency-Key` header, if sent: 1-128 printable ASCII characters, once.
fn idempotency_header(req: &Request) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be sent once, 1-{MAX_IDEMPOTENCY_KEY} printable ASCII \
                 characters"
            ),
        )
    };
    let bytes = value.as_bytes();
    if values.next().is_some()
        || bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY
        || !bytes.iter().all(|b| (0x20..0x7f).contains(b))
        || bytes.iter().all(|b| *b == b' ')
    {
        return Err(bad());
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// `clientMessageId`: 1-128 of the id characters.
fn check_client_message_id(id: &str) -> Result<String, ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_IDEMPOTENCY_KEY
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(ApiError::bad_request(
            "invalid_client_message_id",
            format!(
                "clientMessageId must be 1-{MAX_IDEMPOTENCY_KEY} characters of A-Z, a-z, 0-9, \
                 `_` or `-`"
            ),
        ));
    }
    Ok(id.to_string())
}

/// A digest of what a trigger asks for (its branch, text, attachments and model): a retry
/// has the same, another request under the same key does not. Each field is
/// length-prefixed, so no two requests share an encoding.
fn fingerprint<'a>(
    key: &BranchKey,
    text: &str,
    attachment_ids: impl Iterator<Item = &'a str>,
    model: &str,
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"weldr-trigger-v1");
    field(key.project_id.as_bytes());
    field(key.branch_id.as_bytes());
    field(text.as_bytes());
    field(model.as_bytes());
    for id in attachment_ids {
        field(id.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The workflow an earlier trigger with this key started (same request), read without
/// writing anything; 422 when the key came with another request. The engine checks again
/// in the transaction that creates a workflow, for two first triggers racing.
async fn first_trigger(
    app: &crate::App,
    key: &BranchKey,
    idem: &Idempotency,
) -> Result<Option<String>, ApiError> {
    let stream = weldr_storage::StreamKey::new(&key.project_id, &key.branch_id);
    let k = idem.key.clone();
    let first = app
        .base
        .read(move |rtx| weldr_storage::conversation::get_idempotency(rtx, &stream, &k))
        .await?;
    match first {
        None => Ok(None),
        Some(first) if first.fingerprint == idem.fingerprint => Ok(Some(first.workflow_id)),
        Some(_) => Err(crate::workflow::WorkflowError::IdempotencyReused(format!(
            "the idempotency key {:?} was sent before with a different request",
            idem.key
        ))
        .into()),
    }
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
    super::body::no_body(req, app.config.max_body_bytes).await?;
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
