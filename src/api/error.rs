//! Errors as HTTP shows them, in exactly one place: every domain error type is mapped here to
//! a status and a stable code. The domain never names a status code.
//!
//! Every error body is `{"error": {"code": "...", "message": "..."}}`; `code` is stable and
//! machine-readable, `message` says what went wrong and what to do.

use salvo::http::StatusCode;
use salvo::oapi::{self, Components, EndpointOutRegister, Operation, ToSchema};
use salvo::prelude::*;
use serde::Serialize;
use weldr_storage::StorageError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra machine-readable fields (e.g. the active workflow id of a busy branch).
    pub details: Option<serde_json::Value>,
    /// Seconds a client should wait before retrying: sent as `Retry-After`.
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize, ToSchema)]
#[salvo(schema(name = ErrorBody))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
#[salvo(schema(name = ErrorDetail))]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `branch_not_found`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[salvo(schema(value_type = Option<Object>))]
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after_secs: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                details: self.details.clone(),
            },
        }
    }

    /// The error for an HTTP status that the framework produced (no route, body too large, ...).
    pub fn from_status(status: StatusCode, detail: Option<String>) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such route; see /openapi.json".to_string()),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                "this route does not take that method".to_string(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "payload_too_large",
                "the request body is too large".to_string(),
            ),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
                "headers_too_large",
                "the request headers are too large".to_string(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "send the body as application/json".to_string(),
            ),
            StatusCode::UNAUTHORIZED => (
                "unauthorized",
                "sign in or send a valid bearer token".to_string(),
            ),
            StatusCode::TOO_MANY_REQUESTS => {
                ("rate_limited", "too many requests; retry later".to_string())
            }
            s if s.is_client_error() => ("bad_request", "the request is malformed".to_string()),
            _ => ("internal", "internal error; see the server log".to_string()),
        };
        let message = match detail {
            Some(d) if !d.is_empty() && status.is_client_error() => format!("{message}: {d}"),
            _ => message,
        };
        Self::new(status, code, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound(what) => {
                Self::not_found("not_found", format!("{what} not found"))
            }
            StorageError::AlreadyExists(what) => {
                Self::conflict("already_exists", format!("{what} already exists"))
            }
            StorageError::Conflict(msg) => Self::conflict("conflict", msg),
            StorageError::Closed => Self::unavailable("the server is shutting down; retry shortly"),
            StorageError::Unwritable(reason) => Self::unavailable(format!(
                "the store cannot write ({reason}); it retries on its own once writes succeed again (free disk space)"
            ))
            .with_code("store_unwritable"),
            other => {
                tracing::error!(error = %other, "storage failure");
                Self::internal("storage failure; see the server log")
            }
        }
    }
}

impl From<crate::ids::IdError> for ApiError {
    fn from(e: crate::ids::IdError) -> Self {
        Self::bad_request("invalid_id", e.to_string())
    }
}

impl From<crate::ids::VersionIdError> for ApiError {
    fn from(e: crate::ids::VersionIdError) -> Self {
        Self::bad_request("invalid_version_id", e.to_string())
    }
}

impl From<crate::stream::EventError> for ApiError {
    fn from(e: crate::stream::EventError) -> Self {
        use crate::stream::EventError;
        let code = match e {
            EventError::InvalidType => "invalid_event_type",
            EventError::InvalidData => "invalid_event_data",
        };
        Self::bad_request(code, e.to_string())
    }
}

impl From<crate::base::EmitError> for ApiError {
    fn from(e: crate::base::EmitError) -> Self {
        match e {
            crate::base::EmitError::Event(e) => e.into(),
            crate::base::EmitError::Storage(e) => e.into(),
        }
    }
}

impl From<crate::branches::BranchError> for ApiError {
    fn from(e: crate::branches::BranchError) -> Self {
        use crate::branches::BranchError as E;
        let message = e.to_string();
        match e {
            E::ProjectNotFound(_) => Self::not_found("project_not_found", message),
            E::BranchNotFound(_) => Self::not_found("branch_not_found", message),
            E::ProjectExists(_) => Self::conflict("project_exists", message),
            E::BranchExists(_) => Self::conflict("branch_exists", message),
            E::VersionNotFound { .. } | E::ObjectNotFound(_) => {
                Self::not_found("version_not_found", message)
            }
            E::EmptyParent => Self::conflict("empty_branch", message),
            E::ForkItself => Self::bad_request("invalid_fork", message),
            E::WrongMachine { .. } => Self::bad_request("wrong_machine", message),
            E::Busy { workflow_id } => Self::conflict("branch_busy", message)
                .with_details(serde_json::json!({ "workflowId": workflow_id })),
            E::InvalidId(e) => e.into(),
            E::Storage(e) => e.into(),
            E::Mount { .. } | E::Fork(_) | E::Git(_) | E::Task(_) => Self::internal(message),
        }
    }
}

impl From<crate::residency::ResidencyError> for ApiError {
    fn from(e: crate::residency::ResidencyError) -> Self {
        use crate::residency::ResidencyError as E;
        let message = e.to_string();
        match e {
            E::Branch(e) => e.into(),
            E::DiskFull { report, .. } => {
                Self::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
                    .with_details(serde_json::to_value(&report).unwrap_or_default())
            }
            E::RestoreFailed { .. } => Self::unavailable(message).with_code("restore_failed"),
            E::Evict(e) => e.into(),
            E::Storage(e) => e.into(),
            E::Discover(e) => e.into(),
        }
    }
}

impl From<crate::evict::EvictError> for ApiError {
    fn from(e: crate::evict::EvictError) -> Self {
        match e {
            crate::evict::EvictError::Storage(e) => e.into(),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<crate::sync::SyncError> for ApiError {
    fn from(e: crate::sync::SyncError) -> Self {
        use crate::sync::SyncError as E;
        if let E::Diverged(_) = &e {
            return Self::conflict("snapshot_diverged", e.to_string());
        }
        let status = match &e {
            E::NotFound(_) => StatusCode::CONFLICT,
            E::Config(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, "sync_failed", e.to_string())
    }
}

impl From<crate::sync::syncer::PushError> for ApiError {
    fn from(e: crate::sync::syncer::PushError) -> Self {
        use crate::sync::syncer::PushError as E;
        let message = e.to_string();
        match e {
            E::Running(_) => Self::conflict("sync_running", message),
            E::Evicted(_) => Self::conflict("branch_evicted", message),
            E::BranchNotFound(_) => Self::not_found("branch_not_found", message),
            E::Sync(e) => e.into(),
            E::Storage(e) => e.into(),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError as E;
        let message = e.to_string();
        match e {
            E::Unauthorized(_) => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message),
            E::Unavailable(_) => Self::unavailable(message),
            E::ProjectNotFound(_) => Self::not_found("project_not_found", message),
            E::BranchNotFound(_) => Self::not_found("branch_not_found", message),
            E::TooManyStreams { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_streams", message)
            }
            E::RateLimited { retry_after_secs } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                    .with_retry_after(retry_after_secs)
            }
            E::Storage(e) => e.into(),
        }
    }
}

impl From<crate::workflow::WorkflowError> for ApiError {
    fn from(e: crate::workflow::WorkflowError) -> Self {
        use crate::workflow::WorkflowError as E;
        let message = e.to_string();
        match e {
            E::Busy { holder, .. } => Self::conflict("branch_busy", message)
                .with_details(serde_json::json!({ "workflowId": holder })),
            E::NotFound(_) => Self::not_found("workflow_not_found", message),
            E::IdempotencyReused(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            E::Event(e) => e.into(),
            E::Storage(e) => e.into(),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "background task failed");
        Self::internal("a background task failed; see the server log")
    }
}

#[async_trait]
impl Writer for ApiError {
    async fn write(self, _req: &mut Request, _depot: &mut Depot, res: &mut Response) {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        res.status_code(self.status);
        close_if_body_unread(self.status, res);
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut()
                .insert(salvo::http::header::RETRY_AFTER, secs.into());
        }
        res.render(Json(self.body()));
    }
}

/// Every error status an [`ApiError`] can take, with what it means. Each endpoint keeps the
/// ones it can really answer (`status_codes(...)` in its `#[endpoint]`).
pub const ERROR_STATUSES: [(&str, &str); 13] = [
    (
        "400",
        "Invalid input; `error.code` says which: `invalid_id`, `invalid_version_id`, \
         `invalid_json`, `invalid_body`, `invalid_cursor`, `invalid_fork`, `invalid_message`, \
         `invalid_model`, `wrong_machine`, `attachment_not_found`, `attachment_type_mismatch`, \
         `attachment_not_utf8`, `images_unsupported`, `too_many_attachments`, \
         `invalid_idempotency_key`, ...",
    ),
    (
        "401",
        "`unauthorized`: no credential, or one that does not hold (send a bearer token or the \
         session cookie)",
    ),
    (
        "404",
        "`project_not_found`, `branch_not_found`, `version_not_found`, `workflow_not_found`, \
         `attachment_not_found` (also for another user's), or `not_found` for a path that is \
         no route",
    ),
    (
        "409",
        "Conflict with the current state: `project_exists`, `branch_exists`, `branch_busy` \
         (`details.workflowId` holds the branch), `sync_running`, `branch_evicted`, \
         `no_changes`, `workflow_finished`, `empty_branch`, `sync_failed`",
    ),
    (
        "413",
        "`payload_too_large`: the body is larger than MAX_BODY_BYTES; `attachment_too_large`: \
         an attachment is larger than ATTACHMENT_MAX_BYTES; `attachments_too_large`: a \
         message's attachments together are larger than twice that",
    ),
    (
        "415",
        "`unsupported_media_type`: send the body as `Content-Type: application/json` (an \
         attachment: an image or a UTF-8 text type)",
    ),
    (
        "422",
        "`idempotency_key_reused`: the idempotency key (`Idempotency-Key`, `clientMessageId`) \
         was sent before with a different request",
    ),
    (
        "429",
        "`rate_limited` (retry after `Retry-After` seconds) or `too_many_streams`",
    ),
    (
        "431",
        "`headers_too_large`: the request headers are larger than 32 KiB",
    ),
    ("500", "`internal`: see the server log"),
    (
        "502",
        "`sync_failed`: the object store failed or answered wrongly",
    ),
    (
        "503",
        "Retry shortly: `unavailable` (shutting down, or sessions cannot be verified now), \
         `store_unwritable` (free disk space), `restore_failed`",
    ),
    (
        "507",
        "`disk_full`: not enough space on the workspace volume even after eviction \
         (`details` holds the disk report)",
    ),
];

impl EndpointOutRegister for ApiError {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = ErrorBody::to_schema(components);
        for (status, text) in ERROR_STATUSES {
            operation.responses.insert(
                status,
                oapi::Response::new(text).add_content("application/json", schema.clone()),
            );
        }
    }
}

/// Catcher goal: any error response without a body gets the JSON error body.
pub struct JsonCatcher;

#[async_trait]
impl Handler for JsonCatcher {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        _ctrl: &mut FlowCtrl,
    ) {
        let status = res.status_code.unwrap_or(StatusCode::NOT_FOUND);
        if !(status.is_client_error() || status.is_server_error()) {
            return;
        }
        let detail = match &res.body {
            salvo::http::ResBody::None => None,
            salvo::http::ResBody::Error(e) => e.detail.as_ref().map(|d| d.to_string()),
            _ => return,
        };
        let err = ApiError::from_status(status, detail);
        res.status_code(status);
        close_if_body_unread(status, res);
        res.render(Json(err.body()));
    }
}

/// A 413 leaves the rest of the body unread, so the server will not reuse the connection. Say so
/// (`Connection: close`): a client that pooled it would otherwise send its next request into a
/// connection that is closing and see it fail.
fn close_if_body_unread(status: StatusCode, res: &mut Response) {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        res.headers_mut().insert(
            salvo::http::header::CONNECTION,
            salvo::http::HeaderValue::from_static("close"),
        );
    }
}
