//! Versions of a branch (git commits), their diffs, checkpoints, and `POST /revert`.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use weldr_storage::model::{self, ChangeKind, VersionKind, VersionRecord};

use super::body::json_body;
use super::schema::{Created, Id, VersionId};
use super::{ApiError, principal, require_branch};
use crate::branches::BranchKey;
use crate::git::FileDiff;
use crate::ids::{check_id, parse_version_id};

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = ChangedFile))]
pub struct ChangedFile {
    pub path: String,
    /// `added`, `modified` or `deleted`.
    pub change: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Version))]
pub struct VersionView {
    pub version_id: String,
    pub sequence: u64,
    pub commit_hash: String,
    pub message: String,
    pub description: Option<String>,
    /// `checkpoint`, `integration` or `revert`.
    pub kind: String,
    pub changed_files: Vec<ChangedFile>,
    pub author: String,
    pub created_at_ms: u64,
    /// For a revert: the version whose tree it restores.
    pub restores_version_id: Option<String>,
    pub workflow_id: Option<String>,
}

impl From<VersionRecord> for VersionView {
    fn from(v: VersionRecord) -> Self {
        Self {
            version_id: v.seq.to_string(),
            sequence: v.seq,
            commit_hash: v.commit_hash,
            message: v.message,
            description: v.description,
            kind: v.kind.as_str().into(),
            changed_files: v
                .changed
                .into_iter()
                .map(|c| ChangedFile {
                    path: c.path,
                    change: match c.kind {
                        ChangeKind::Added => "added",
                        ChangeKind::Modified => "modified",
                        ChangeKind::Deleted => "deleted",
                    }
                    .into(),
                })
                .collect(),
            author: v.author,
            created_at_ms: v.created_at_ms,
            restores_version_id: v.restores.map(|s| s.to_string()),
            workflow_id: v.workflow_id,
        }
    }
}

/// Versions of a branch, oldest first.
#[endpoint(
    tags("versions"),
    parameters(("projectId" = Id, Path, description = "Project id"), ("branchId" = Id, Path, description = "Branch id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503, 507)
)]
pub async fn list_versions(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<Vec<VersionView>>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.ensure_present_from(branch).await?;
    let BranchKey {
        project_id: p,
        branch_id: b,
    } = key;
    let list = app
        .base
        .read(move |rtx| model::list_versions(rtx, &p, &b))
        .await?;
    Ok(Json(list.into_iter().map(Into::into).collect()))
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = VersionDiff))]
pub struct VersionDiff {
    pub version: VersionView,
    #[salvo(schema(value_type = Vec<Object>))]
    pub files: Vec<FileDiff>,
}

/// What a version changed against the commit before it.
#[endpoint(
    tags("versions"),
    parameters(
        ("projectId" = Id, Path, description = "Project id"),
        ("branchId" = Id, Path, description = "Branch id"),
        ("versionId" = VersionId, Path, description = "Version id")
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503, 507)
)]
pub async fn version_diff(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<VersionDiff>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let seq = parse_version_id(req.param::<&str>("versionId").unwrap_or_default())?;
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.ensure_present_from(branch).await?;
    let (version, files) = app.branches.version_diff(&key, seq).await?;
    Ok(Json(VersionDiff {
        version: version.into(),
        files,
    }))
}

/// Longest checkpoint message and description, in characters (the schema says the same).
const MAX_MESSAGE_CHARS: usize = 2000;
const MAX_DESCRIPTION_CHARS: usize = 20_000;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = CreateVersion))]
pub struct CreateVersion {
    /// The commit message: 1-2000 characters, not only white space.
    #[salvo(schema(min_length = 1, max_length = 2000, pattern = r"\S"))]
    pub message: String,
    /// A longer description, kept with the version.
    #[salvo(schema(max_length = 20000))]
    pub description: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = VersionCreated))]
pub struct VersionCreated {
    pub version_id: String,
    pub commit_hash: String,
}

/// Commit the branch's current tree as a checkpoint version (edits made outside a workflow).
/// 409 `no_changes` when nothing changed since the last version.
#[endpoint(
    tags("versions"),
    request_body = CreateVersion,
    parameters(("projectId" = Id, Path, description = "Project id"), ("branchId" = Id, Path, description = "Branch id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(201, 400, 401, 404, 409, 413, 415, 431, 500, 503, 507)
)]
pub async fn create_version(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Created<VersionCreated>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let body: CreateVersion = json_body(req, app.config.max_body_bytes).await?;
    let message = body.message.trim();
    if message.is_empty() || message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(ApiError::bad_request(
            "invalid_message",
            format!("message must be 1-{MAX_MESSAGE_CHARS} characters"),
        ));
    }
    if body
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_CHARS)
    {
        return Err(ApiError::bad_request(
            "invalid_description",
            format!("description must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.ensure_present_from(branch).await?;
    let version = app
        .branches
        .commit_version(
            &key,
            message,
            body.description,
            VersionKind::Checkpoint,
            None,
        )
        .await?
        .ok_or_else(|| {
            ApiError::conflict("no_changes", "nothing changed since the last version")
        })?;
    Ok(Created(VersionCreated {
        version_id: version.seq.to_string(),
        commit_hash: version.commit_hash,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = RevertRequest))]
pub struct RevertRequest {
    #[salvo(schema(value_type = Id))]
    pub project_id: String,
    #[salvo(schema(value_type = Id))]
    pub branch_id: String,
    #[salvo(schema(value_type = VersionId))]
    pub version_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = RevertResponse))]
pub struct RevertResponse {
    pub success: bool,
    pub commit_hash: String,
    /// The new version (kind `revert`).
    pub version_id: String,
}

/// Make the branch's tree exactly that of an earlier (or, after a revert, later) version, as a
/// new `revert` version; announced by a `version` event. 409 while a workflow is active.
#[endpoint(
    tags("versions"),
    request_body = RevertRequest,
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 409, 413, 415, 431, 500, 503, 507)
)]
pub async fn revert(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<RevertResponse>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let body: RevertRequest = json_body(req, app.config.max_body_bytes).await?;
    check_id("projectId", &body.project_id)?;
    check_id("branchId", &body.branch_id)?;
    let seq = parse_version_id(&body.version_id)?;
    let key = BranchKey::new(&body.project_id, &body.branch_id);
    let branch = require_branch(&app, &principal, &key).await?;
    app.residency.ensure_present_from(branch).await?;
    let version = app.branches.revert(&key, seq).await?;
    Ok(Json(RevertResponse {
        success: true,
        commit_hash: version.commit_hash,
        version_id: version.seq.to_string(),
    }))
}
