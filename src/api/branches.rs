//! `/projects/{projectId}/branches`: create (or fork), list and read branches.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use weldr_storage::model::{self, BranchRecord, SyncStateRecord};

use super::body::json_body;
use super::schema::{Created, Id, VersionId};
use super::{ApiError, principal, require_branch, require_project};
use crate::branches::{BranchKey, ForkFrom};
use crate::ids::{check_id, parse_version_id};

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = CreateBranch))]
pub struct CreateBranch {
    #[salvo(schema(value_type = Id))]
    pub branch_id: String,
    /// Fork from this branch of the same project.
    #[salvo(schema(value_type = Option<Id>))]
    pub from_branch_id: Option<String>,
    /// At this version of `fromBranchId` (default: its head).
    #[salvo(schema(value_type = Option<VersionId>))]
    pub from_version_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Branch))]
pub struct BranchView {
    pub project_id: String,
    pub branch_id: String,
    pub parent_branch_id: Option<String>,
    pub fork_version_id: Option<String>,
    pub created_at_ms: u64,
    pub last_accessed_at_ms: u64,
    pub size_bytes: u64,
    /// `active`, `evicted` or `restoring`.
    pub state: String,
    pub head_version_id: Option<String>,
    /// Object-storage sync state (absent in lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = SyncState))]
pub struct SyncView {
    /// Changed since the last successful push.
    pub dirty: bool,
    /// A push of the branch is running now.
    pub running: bool,
    /// The snapshot of the last successful push (an evicted branch is restored from it).
    pub last_snapshot_id: Option<String>,
    pub last_sync_at_ms: Option<u64>,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_bytes: u64,
    pub duration_ms: u64,
    /// The last push's error; cleared by the next successful push.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
}

impl SyncView {
    pub fn new(state: SyncStateRecord, dirty_in_memory: bool, running: bool) -> Self {
        Self {
            dirty: state.dirty || dirty_in_memory,
            running,
            last_snapshot_id: state.snapshot_id,
            last_sync_at_ms: state.last_sync_ms,
            files: state.files,
            bytes: state.bytes,
            uploaded_bytes: state.uploaded_bytes,
            duration_ms: state.duration_ms,
            last_error: state.last_error,
            last_error_at_ms: state.last_error_ms,
        }
    }
}

impl From<BranchRecord> for BranchView {
    fn from(b: BranchRecord) -> Self {
        Self {
            sync: None,
            project_id: b.project_id,
            branch_id: b.branch_id,
            parent_branch_id: b.parent_branch_id,
            fork_version_id: b.fork_version.map(|v| v.to_string()),
            created_at_ms: b.created_at_ms,
            last_accessed_at_ms: b.last_access_ms,
            size_bytes: b.size_bytes,
            state: b.state.as_str().into(),
            head_version_id: b.head_version.map(|v| v.to_string()),
        }
    }
}

/// What a push did.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = SyncReport))]
pub struct SyncReportView {
    pub bucket: String,
    pub snapshot_id: String,
    /// True when the tree matched the latest snapshot and nothing was written.
    pub unchanged: bool,
    pub files: u64,
    pub bytes: u64,
    pub uploaded_objects: u64,
    pub uploaded_bytes: u64,
    /// Store requests made (a multipart upload counts once per chunk).
    pub requests: u64,
    pub duration_ms: u64,
}

impl From<crate::sync::PushReport> for SyncReportView {
    fn from(r: crate::sync::PushReport) -> Self {
        Self {
            bucket: r.bucket,
            snapshot_id: r.snapshot_id,
            unchanged: r.unchanged,
            files: r.files,
            bytes: r.bytes,
            uploaded_objects: r.uploaded_objects,
            uploaded_bytes: r.uploaded_bytes,
            requests: r.requests,
            duration_ms: r.duration_ms,
        }
    }
}

/// Create a branch (a new git repository with an initial commit on `main`), or fork one.
#[endpoint(
    tags("branches"),
    request_body = CreateBranch,
    parameters(("projectId" = Id, Path, description = "Project id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(201, 400, 401, 404, 409, 413, 415, 431, 500, 503, 507)
)]
pub async fn create_branch(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Created<BranchView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let project_id = check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?
    .to_string();
    let body: CreateBranch = json_body(req, app.config.max_body_bytes).await?;
    check_id("branchId", &body.branch_id)?;
    require_project(&app, &principal, &project_id).await?;
    let from = match (body.from_branch_id, body.from_version_id) {
        (Some(branch_id), version) => {
            check_id("fromBranchId", &branch_id)?;
            Some(ForkFrom {
                branch_id,
                version: version.as_deref().map(parse_version_id).transpose()?,
            })
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_fork",
                "fromVersionId needs fromBranchId",
            ));
        }
        (None, None) => None,
    };
    let created = app
        .residency
        .create_branch(&BranchKey::new(&project_id, &body.branch_id), from)
        .await?;
    // Made here, or restored from object storage (this machine had lost it): 201 either way.
    if !created.created && !created.adopted {
        return Err(ApiError::conflict(
            "branch_exists",
            format!("branch {} already exists", body.branch_id),
        ));
    }
    Ok(Created(created.branch.into()))
}

/// Branches of a project.
#[endpoint(
    tags("branches"),
    parameters(("projectId" = Id, Path, description = "Project id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn list_branches(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<Vec<BranchView>>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let project_id = check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?
    .to_string();
    require_project(&app, &principal, &project_id).await?;
    let list = app
        .base
        .read(move |rtx| model::list_branches(rtx, &project_id))
        .await?;
    Ok(Json(list.into_iter().map(Into::into).collect()))
}

/// One branch.
#[endpoint(
    tags("branches"),
    parameters(("projectId" = Id, Path, description = "Project id"), ("branchId" = Id, Path, description = "Branch id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn get_branch(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<BranchView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.touch(&branch);
    let state = crate::sync::syncer::state(&app.store, &key).await?;
    let mut view = BranchView::from(branch);
    view.sync = Some(SyncView::new(
        state,
        app.syncer.is_dirty(&key),
        app.syncer.is_running(&key),
    ));
    Ok(Json(view))
}

/// Push the branch to object storage now (a new snapshot unless nothing changed). The report
/// is also announced as a `sync` event on the branch stream. 409 `sync_running` while a push of
/// the branch runs, 409 `branch_evicted` when the branch is evicted (its snapshot is stored).
#[endpoint(
    tags("branches"),
    parameters(("projectId" = Id, Path, description = "Project id"), ("branchId" = Id, Path, description = "Branch id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 409, 413, 415, 431, 500, 502, 503)
)]
pub async fn sync_branch(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<SyncReportView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    // No body is needed; a JSON one may be sent, and must then be the empty object `{}`.
    if req.headers().contains_key("content-type") {
        let body: serde_json::Map<String, serde_json::Value> =
            json_body(req, app.config.max_body_bytes).await?;
        if let Some(field) = body.keys().next() {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("unknown field `{field}`; the body is `{{}}` or nothing"),
            ));
        }
    } else {
        match req.payload_with_max_size(app.config.max_body_bytes).await {
            Ok(bytes) if bytes.is_empty() => {}
            Err(salvo::http::ParseError::PayloadTooLarge) => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the request body is larger than {} bytes",
                        app.config.max_body_bytes
                    ),
                ));
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send no body, or `{}` as application/json",
                ));
            }
        }
    }
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.touch(&branch);
    let report = app
        .syncer
        .push_branch(&key, crate::sync::syncer::Trigger::Api, false)
        .await?;
    Ok(Json(report.into()))
}
