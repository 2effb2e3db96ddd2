//! `/projects`: register, list and read projects.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use weldr_storage::model::{self, ProjectRecord};

use super::body::json_body;
use super::schema::{Created, Id};
use super::{ApiError, principal, require_project};
use crate::branches::registry;
use crate::ids::check_id;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = CreateProject))]
pub struct CreateProject {
    #[salvo(schema(value_type = Id))]
    pub project_id: String,
    /// At most 200 printable characters.
    #[salvo(schema(max_length = 200))]
    pub title: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Project))]
pub struct ProjectView {
    pub project_id: String,
    pub title: Option<String>,
    pub created_at_ms: u64,
}

impl From<ProjectRecord> for ProjectView {
    fn from(p: ProjectRecord) -> Self {
        Self {
            project_id: p.project_id,
            title: p.title,
            created_at_ms: p.created_at_ms,
        }
    }
}

/// Register a project (owned by the caller).
#[endpoint(
    tags("projects"),
    request_body = CreateProject,
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(201, 400, 401, 409, 413, 415, 431, 500, 503)
)]
pub async fn create_project(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Created<ProjectView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let body: CreateProject = json_body(req, app.config.max_body_bytes).await?;
    check_id("projectId", &body.project_id)?;
    if let Some(title) = &body.title
        && (title.chars().count() > 200 || title.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_title",
            "title must be at most 200 printable characters",
        ));
    }
    crate::branches::check_machine_project(&app.config, &body.project_id)?;
    let project =
        registry::create_project(&app.store, &body.project_id, body.title, principal.owner())
            .await?;
    Ok(Created(project.into()))
}

/// Projects the caller may use.
#[endpoint(
    tags("projects"),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 401, 431, 500, 503)
)]
pub async fn list_projects(depot: &mut Depot) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let all = app.base.read(model::list_projects).await?;
    let mut out = Vec::new();
    for project in all {
        if require_project(&app, &principal, &project.project_id)
            .await
            .is_ok()
        {
            out.push(project.into());
        }
    }
    Ok(Json(out))
}

/// One project.
#[endpoint(
    tags("projects"),
    parameters(("projectId" = Id, Path, description = "Project id")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn get_project(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<ProjectView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let project_id = check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?;
    Ok(Json(
        require_project(&app, &principal, project_id).await?.into(),
    ))
}
