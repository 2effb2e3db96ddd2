//! HTTP routes (one file per resource) and the OpenAPI document generated from them.

pub mod attachments;
pub mod body;
pub mod branches;
pub mod browser;
pub mod connections;
pub mod disk;
pub mod docs;
pub mod error;
pub mod health;
pub mod integrations;
pub mod messages;
pub mod mirrors;
pub mod projects;
pub mod schema;
pub mod stream;
pub mod versions;
pub mod workflows;

use std::sync::Arc;

use salvo::catcher::Catcher;
use salvo::cors::Cors;
use salvo::http::{HeaderValue, Method};
use salvo::oapi::OpenApi;
use salvo::prelude::*;

use crate::app::App;
use crate::auth::{Credential, Principal};
use crate::branches::BranchKey;
pub use error::ApiError;
use error::JsonCatcher;

/// Puts the [`App`] into every request's depot.
struct InjectApp(Arc<App>);

#[async_trait]
impl Handler for InjectApp {
    async fn handle(
        &self,
        _req: &mut Request,
        depot: &mut Depot,
        _res: &mut Response,
        _ctrl: &mut FlowCtrl,
    ) {
        depot.insert_typed(self.0.clone());
    }
}

/// Largest total size of request header names and values; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses requests whose headers are too large (hyper's own limit is far higher).
struct HeaderLimit;

#[async_trait]
impl Handler for HeaderLimit {
    async fn handle(
        &self,
        req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        let size: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if size > MAX_HEADER_BYTES {
            let err = ApiError::from_status(
                salvo::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                None,
            );
            res.status_code(err.status);
            res.render(Json(err.body()));
            ctrl.skip_rest();
        }
    }
}

/// The app of this request.
pub fn app(depot: &Depot) -> Result<Arc<App>, ApiError> {
    depot
        .get_typed::<Arc<App>>()
        .cloned()
        .map_err(|_| ApiError::internal("application state missing"))
}

/// Hoop: authenticate, put the [`Principal`] and its [`Credential`] in the depot, or answer 401.
pub struct RequireAuth;

#[async_trait]
impl Handler for RequireAuth {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        let result = match app(depot) {
            Ok(app) => match stream_ticket(&app, req) {
                Some(result) => result,
                None => app
                    .auth
                    .authenticate(&app.store, req.headers())
                    .await
                    .map_err(ApiError::from)
                    .and_then(|(principal, credential)| {
                        same_origin(&app, req, &credential)?;
                        Ok((principal, credential))
                    }),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok((principal, credential)) => {
                depot.insert_typed(principal);
                // For streams, which end when it stops holding.
                depot.insert_typed(credential);
            }
            Err(e) => {
                res.status_code(e.status);
                res.render(Json(e.body()));
                ctrl.skip_rest();
            }
        }
    }
}

/// A stream opened with `?ticket=` (a cross-origin page): the ticket is used up here, and
/// only for the stream of the branch it names. None when the request has no ticket.
fn stream_ticket(
    app: &App,
    req: &Request,
) -> Option<Result<(crate::auth::Principal, Credential), ApiError>> {
    let ticket = req.query::<String>("ticket")?;
    let refused = || -> ApiError {
        crate::auth::AuthError::Unauthorized("unknown, used or expired stream ticket").into()
    };
    let mut parts = req.uri().path().trim_start_matches('/').split('/');
    let (Some("stream"), Some(p), Some(b), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Err(ApiError::bad_request(
            "ticket_not_for_this_route",
            "a stream ticket opens only /stream/{projectId}/{branchId}",
        )));
    };
    let key = BranchKey::new(p, b);
    Some(
        app.auth
            .tickets
            .redeem(&ticket, &key)
            .map(|principal| (principal, Credential::Ticket))
            .ok_or_else(refused),
    )
}

/// CSRF: a request that only a cookie authenticates and that changes state must come from this
/// server's own origin (or one in `CORS_ORIGIN`), as the browser's `Origin` header says.
fn same_origin(app: &App, req: &Request, credential: &Credential) -> Result<(), ApiError> {
    if !credential.is_cookie()
        || matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
    {
        return Ok(());
    }
    let refuse = |why: String| {
        Err(ApiError::new(
            salvo::http::StatusCode::FORBIDDEN,
            "cross_site_request",
            why,
        ))
    };
    let Some(origin) = req.headers().get("origin").and_then(|v| v.to_str().ok()) else {
        return refuse(
            "a request with the session cookie that changes something needs an Origin header \
             (browsers send it)"
                .into(),
        );
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let scheme = if app.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if origin == format!("{scheme}://{host}") || app.config.cors_origins.iter().any(|o| o == origin)
    {
        return Ok(());
    }
    refuse(format!(
        "Origin {origin} is neither this server nor in CORS_ORIGIN: refused (CSRF)"
    ))
}

fn not_authenticated() -> ApiError {
    crate::auth::AuthError::Unauthorized("not authenticated").into()
}

/// The credential this request was authenticated with.
pub fn credential(depot: &Depot) -> Result<Credential, ApiError> {
    depot
        .get_typed::<Credential>()
        .cloned()
        .map_err(|_| not_authenticated())
}

/// The authenticated caller of this request.
pub fn principal(depot: &Depot) -> Result<Principal, ApiError> {
    depot
        .get_typed::<Principal>()
        .cloned()
        .map_err(|_| not_authenticated())
}

/// The project, if the caller may use it; 404 otherwise (no existence leak).
pub async fn require_project(
    app: &App,
    principal: &Principal,
    project_id: &str,
) -> Result<weldr_storage::model::ProjectRecord, ApiError> {
    Ok(app
        .auth
        .require_project(&app.store, &app.config, principal, project_id)
        .await?)
}

/// The branch, if the caller may use its project; 404 otherwise.
pub async fn require_branch(
    app: &App,
    principal: &Principal,
    key: &BranchKey,
) -> Result<weldr_storage::model::BranchRecord, ApiError> {
    Ok(app
        .auth
        .require_branch(&app.store, &app.config, principal, key)
        .await?)
}

/// The API routes, without documentation routes.
pub fn api_routes() -> Router {
    Router::new()
        .push(Router::with_path("health").get(health::health))
        .push(Router::with_path("auth/session").post(browser::open_session))
        .push(Router::with_path("auth/logout").post(browser::logout))
        .push(
            Router::new()
                .hoop(RequireAuth)
                .push(Router::with_path("stream/{projectId}/{branchId}").get(stream::stream))
                .push(Router::with_path("revert").post(versions::revert))
                .push(Router::with_path("disk").get(disk::disk))
                .push(Router::with_path("mirrors").get(mirrors::list_mirrors))
                .push(Router::with_path("stream-tickets").post(browser::stream_ticket))
                .push(Router::with_path("trigger").post(workflows::trigger))
                .push(
                    Router::with_path("integrations")
                        .get(integrations::list_catalog)
                        .push(Router::with_path("install").post(integrations::install)),
                )
                .push(
                    Router::with_path("workflows/{workflowId}")
                        .get(workflows::get_workflow)
                        .push(Router::with_path("cancel").post(workflows::cancel_workflow)),
                )
                .push(
                    Router::with_path("projects")
                        .get(projects::list_projects)
                        .post(projects::create_project)
                        .push(
                            Router::with_path("{projectId}")
                                .get(projects::get_project)
                                .push(
                                    Router::with_path("attachments")
                                        .post(attachments::upload)
                                        .push(
                                            Router::with_path("{attachmentId}")
                                                .get(attachments::get_attachment),
                                        ),
                                )
                                .push(
                                    Router::with_path("branches")
                                        .get(branches::list_branches)
                                        .post(branches::create_branch)
                                        .push(
                                            Router::with_path("{branchId}")
                                                .get(branches::get_branch)
                                                .push(
                                                    Router::with_path("sync")
                                                        .post(branches::sync_branch),
                                                )
                                                .push(
                                                    Router::with_path("messages")
                                                        .get(messages::list_messages),
                                                )
                                                .push(
                                                    Router::with_path("integrations")
                                                        .get(integrations::list_jobs)
                                                        .post(integrations::queue_one)
                                                        .push(
                                                            Router::with_path("{jobId}/cancel")
                                                                .post(integrations::cancel_job),
                                                        ),
                                                )
                                                .push(
                                                    Router::with_path("versions")
                                                        .get(versions::list_versions)
                                                        .post(versions::create_version)
                                                        .push(
                                                            Router::with_path("{versionId}/diff")
                                                                .get(versions::version_diff),
                                                        ),
                                                ),
                                        ),
                                ),
                        ),
                ),
        )
}

/// The OpenAPI 3.1 document of every route; the session cookie is named after
/// `cookie_prefix` (`AUTH_COOKIE_PREFIX`).
pub fn openapi(cookie_prefix: &str) -> OpenApi {
    let doc = OpenApi::new("weldr-agent", env!("CARGO_PKG_VERSION")).merge_router(&api_routes());
    schema::with_security_schemes(doc, cookie_prefix)
}

pub fn router(app: Arc<App>) -> Router {
    let doc = openapi(&app.config.auth_cookie_prefix);
    Router::new()
        .hoop(InjectApp(app))
        .push(api_routes())
        .push(doc.into_router("/openapi.json"))
        .push(Router::with_path("reference").get(docs::reference))
}

pub fn service(app: Arc<App>) -> Service {
    let origins: Vec<HeaderValue> = app
        .config
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let cors = Cors::new()
        .allow_origin(origins)
        .allow_credentials(true)
        .allow_methods(vec![
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(vec![
            "content-type",
            "authorization",
            "last-event-id",
            "idempotency-key",
        ])
        .max_age(600)
        .into_handler();
    Service::new(router(app))
        .hoop(HeaderLimit)
        .hoop(cors)
        .catcher(Catcher::new(JsonCatcher))
}

/// The `projectId` and `branchId` path parameters of a branch route, validated.
fn path_key(req: &salvo::Request) -> Result<BranchKey, ApiError> {
    let p = crate::ids::check_id(
        "projectId",
        req.param::<&str>("projectId").unwrap_or_default(),
    )?;
    let b = crate::ids::check_id(
        "branchId",
        req.param::<&str>("branchId").unwrap_or_default(),
    )?;
    Ok(BranchKey::new(p, b))
}
