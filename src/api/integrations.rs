//! Integrations: the catalog, a branch's install queue, and the seed's install route.
//!
//! Queued jobs run in the background (one at a time per branch, in dependency order, under
//! the branch lock); a branch a workflow holds keeps its jobs queued behind the workflow.
//! Every change of a job's status is an `integration` event on the branch's stream.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::body::json_body;
use super::schema::{Accepted, Id};
use super::{ApiError, principal, require_branch};
use crate::branches::BranchKey;
use crate::ids::check_id;
use crate::integrations::{IntegrationError, JobView, Request as InstallRequest};

/// The most integrations one request may name.
const MAX_PER_REQUEST: usize = 16;

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Integration))]
pub struct IntegrationView {
    pub key: String,
    /// `backend`, `frontend`, `database` or `authentication`.
    pub category: String,
    pub name: String,
    pub description: String,
    /// Keys that must be installed on the branch first.
    pub depends_on: Vec<String>,
    /// The options' JSON Schema (defaults included).
    #[salvo(schema(value_type = Object))]
    pub options: Value,
    /// The template version.
    pub version: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = IntegrationCatalog))]
pub struct CatalogView {
    pub integrations: Vec<IntegrationView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = IntegrationJob))]
pub struct JobOut {
    pub job_id: String,
    pub key: String,
    /// `queued`, `blocked`, `installing`, `installed`, `cancelled` or `failed`.
    pub status: String,
    /// Why it is blocked or failed; what the install did.
    pub message: Option<String>,
    /// The options it was queued with (defaults applied).
    #[salvo(schema(value_type = Object))]
    pub options: Value,
    /// The `integration` version the install made.
    pub version_id: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl From<JobView> for JobOut {
    fn from(v: JobView) -> Self {
        let j = v.job;
        Self {
            job_id: j.job_id,
            key: j.key,
            status: j.status.as_str().to_string(),
            message: j.message,
            options: serde_json::from_str(&j.options_json).unwrap_or(Value::Null),
            version_id: j.version.map(|v| v.to_string()),
            created_at_ms: j.created_at_ms,
            updated_at_ms: j.updated_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = IntegrationJobs))]
pub struct JobsOut {
    pub jobs: Vec<JobOut>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = IntegrationRequest))]
pub struct QueueOne {
    pub key: String,
    /// Options, checked against the integration's schema.
    #[salvo(schema(value_type = Option<Object>))]
    pub options: Option<Value>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = InstallIntegrationsRequest))]
pub struct InstallBody {
    #[salvo(schema(value_type = Id))]
    pub project_id: String,
    #[salvo(schema(value_type = Id))]
    pub branch_id: String,
    /// What to queue (dependencies first among them); absent: run what is queued.
    pub integrations: Option<Vec<QueueOne>>,
    /// Start a workflow once these installs have run, with a message naming them.
    pub trigger_workflow: Option<bool>,
}

fn api_error(e: IntegrationError) -> ApiError {
    let message = e.to_string();
    match e {
        IntegrationError::Unknown(_) => ApiError::bad_request("unknown_integration", message),
        IntegrationError::InvalidOptions { .. } => {
            ApiError::bad_request("invalid_options", message)
        }
        IntegrationError::Storage(weldr_storage::StorageError::Conflict(m)) => {
            ApiError::conflict("job_not_cancellable", m)
        }
        IntegrationError::Storage(e) => e.into(),
        IntegrationError::Branch(e) => e.into(),
        IntegrationError::Residency(e) => e.into(),
        other => ApiError::internal(other.to_string()),
    }
}

fn check_requests(list: &[QueueOne]) -> Result<(), ApiError> {
    if list.len() > MAX_PER_REQUEST {
        return Err(ApiError::bad_request(
            "too_many_integrations",
            format!("at most {MAX_PER_REQUEST} integrations per request"),
        ));
    }
    for q in list {
        if q.key.is_empty() || q.key.len() > 64 {
            return Err(ApiError::bad_request(
                "unknown_integration",
                "an integration key is 1-64 characters; see GET /integrations",
            ));
        }
    }
    Ok(())
}

/// Every integration this server can install: key, category, name, description,
/// dependencies, options (JSON Schema) and template version.
#[endpoint(
    tags("integrations"),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 401, 431, 500)
)]
pub async fn list_catalog(depot: &mut Depot) -> Result<Json<CatalogView>, ApiError> {
    let app = super::app(depot)?;
    principal(depot)?;
    let catalog = app.integrations.catalog().map_err(api_error)?;
    Ok(Json(CatalogView {
        integrations: catalog
            .integrations
            .iter()
            .map(|i| {
                let m = &i.manifest;
                IntegrationView {
                    key: m.key.clone(),
                    category: m.category.clone(),
                    name: m.name.clone(),
                    description: m.description.clone(),
                    depends_on: m.depends_on.clone(),
                    options: m.options.clone(),
                    version: m.version.clone(),
                }
            })
            .collect(),
    }))
}

/// The branch's integration jobs, in queue order.
#[endpoint(
    tags("integrations"),
    parameters(
        ("projectId" = Id, Path, description = "Project id"),
        ("branchId" = Id, Path, description = "Branch id")
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 431, 500, 503)
)]
pub async fn list_jobs(req: &mut Request, depot: &mut Depot) -> Result<Json<JobsOut>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    require_branch(&app, &principal, &key).await?;
    let jobs = app.integrations.list(&key).await.map_err(api_error)?;
    Ok(Json(JobsOut {
        jobs: jobs.into_iter().map(JobOut::from).collect(),
    }))
}

/// Queue one integration on the branch: `blocked` until its dependencies are installed, then
/// `queued`; installed in the background (behind a workflow that holds the branch). One
/// already installed or waiting is not queued again: its job is answered.
#[endpoint(
    tags("integrations"),
    parameters(
        ("projectId" = Id, Path, description = "Project id"),
        ("branchId" = Id, Path, description = "Branch id")
    ),
    request_body = QueueOne,
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(202, 400, 401, 404, 413, 415, 431, 500, 503)
)]
pub async fn queue_one(req: &mut Request, depot: &mut Depot) -> Result<Accepted<JobOut>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let body: QueueOne = json_body(req, app.config.max_body_bytes).await?;
    check_requests(std::slice::from_ref(&body))?;
    require_branch(&app, &principal, &key).await?;
    let mut jobs = app
        .integrations
        .queue(
            &key,
            vec![InstallRequest {
                key: body.key,
                options: body.options,
            }],
            None,
            None,
        )
        .await
        .map_err(api_error)?;
    let job = jobs
        .pop()
        .ok_or_else(|| ApiError::internal("the job was not queued"))?;
    Ok(Accepted(job.into()))
}

/// Cancel a job that has not started (`queued` or `blocked`); 409 otherwise.
#[endpoint(
    tags("integrations"),
    parameters(
        ("projectId" = Id, Path, description = "Project id"),
        ("branchId" = Id, Path, description = "Branch id"),
        ("jobId" = Id, Path, description = "Job id")
    ),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 409, 413, 431, 500, 503)
)]
pub async fn cancel_job(req: &mut Request, depot: &mut Depot) -> Result<Json<JobOut>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let key = super::path_key(req)?;
    let job_id = req.param::<String>("jobId").unwrap_or_default();
    check_id("jobId", &job_id)?;
    super::body::no_body(req, app.config.max_body_bytes).await?;
    require_branch(&app, &principal, &key).await?;
    let job = app
        .integrations
        .cancel(&key, &job_id)
        .await
        .map_err(api_error)?
        .ok_or_else(|| {
            ApiError::not_found("job_not_found", format!("no integration job {job_id:?}"))
        })?;
    Ok(Json(job.into()))
}

/// The seed's route: queue the given integrations on the branch (dependencies first), or,
/// without `integrations`, run what is queued. Answers at once with the jobs; with
/// `triggerWorkflow`, a workflow starts on the branch once they have run.
#[endpoint(
    tags("integrations"),
    request_body = InstallBody,
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(202, 400, 401, 404, 413, 415, 431, 500, 503)
)]
pub async fn install(req: &mut Request, depot: &mut Depot) -> Result<Accepted<JobsOut>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let body: InstallBody = json_body(req, app.config.max_body_bytes).await?;
    check_id("projectId", &body.project_id)?;
    check_id("branchId", &body.branch_id)?;
    let list = body.integrations.unwrap_or_default();
    check_requests(&list)?;
    let key = BranchKey::new(&body.project_id, &body.branch_id);
    require_branch(&app, &principal, &key).await?;
    let names: Vec<String> = list.iter().map(|q| q.key.clone()).collect();
    // `triggerWorkflow` applies to the integrations the request names.
    let then = (body.trigger_workflow.unwrap_or(false) && !names.is_empty()).then(|| {
        format!(
            "Installed integrations: {}. Look at what they added and tell me how to use them.",
            names.join(", ")
        )
    });
    let requests: Vec<InstallRequest> = list
        .into_iter()
        .map(|q| InstallRequest {
            key: q.key,
            options: q.options,
        })
        .collect();
    let jobs = if requests.is_empty() {
        app.integrations
            .list(&key)
            .await
            .map_err(api_error)?
            .into_iter()
            .filter(|j| !j.job.status.is_terminal())
            .collect()
    } else {
        app.integrations
            .queue(&key, requests, then, None)
            .await
            .map_err(api_error)?
    };
    app.integrations.wake();
    Ok(Accepted(JobsOut {
        jobs: jobs.into_iter().map(JobOut::from).collect(),
    }))
}
