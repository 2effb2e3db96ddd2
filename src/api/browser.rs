//! Browsers: `POST /auth/session` (a local token for an HttpOnly cookie), `POST /auth/logout`,
//! and `POST /stream-tickets` (a single-use ticket for a cross-origin page's `EventSource`).

use salvo::http::StatusCode;
use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::{Deserialize, Serialize};

use super::body::json_body;
use super::{ApiError, principal, require_branch};
use crate::auth::browser::{self, COOKIE, SESSION_TTL_MS};
use crate::branches::BranchKey;
use crate::ids::check_id;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = SessionRequest))]
pub struct SessionRequest {
    /// A local API token (`wa_…`).
    pub token: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = BrowserSession))]
pub struct SessionOut {
    /// When the cookie's session ends (ms since the epoch).
    pub expires_at_ms: u64,
}

fn cookie(app: &crate::app::App, value: &str, max_age_secs: u64) -> String {
    let secure = if app.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_secs}{secure}")
}

/// Exchange a local API token for a browser session: an HttpOnly, `SameSite=Lax` cookie
/// (`Secure` over TLS) that every route accepts like the token. Requests with it that change
/// something must carry a same-origin `Origin` (or one in `CORS_ORIGIN`).
#[endpoint(tags("auth"), status_codes(200, 400, 401, 413, 415, 431, 500, 503))]
pub async fn open_session(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<Json<SessionOut>, ApiError> {
    let app = super::app(depot)?;
    let body: SessionRequest = json_body(req, 4096).await?;
    let Some((value, expires_at_ms)) = browser::open(&app.store, &body.token).await? else {
        return Err(crate::auth::AuthError::Unauthorized("unknown or revoked API token").into());
    };
    res.add_header(
        "set-cookie",
        cookie(&app, &value, SESSION_TTL_MS / 1000),
        true,
    )
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(SessionOut { expires_at_ms }))
}

/// End the browser session of the cookie sent (if any) and clear the cookie.
#[endpoint(tags("auth"), status_codes(204, 431, 500, 503))]
pub async fn logout(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<StatusCode, ApiError> {
    let app = super::app(depot)?;
    let cookies = crate::auth::cookie::cookie_header(req.headers());
    if let Some(value) = browser::cookie_value(&cookies) {
        browser::close(&app.store, value).await?;
    }
    res.add_header("set-cookie", cookie(&app, "", 0), true)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[salvo(schema(name = StreamTicketRequest))]
pub struct TicketRequest {
    pub project_id: String,
    pub branch_id: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = StreamTicket))]
pub struct TicketOut {
    /// Use as `/stream/{projectId}/{branchId}?ticket=…`, once, before `expiresAtMs`.
    pub ticket: String,
    pub expires_at_ms: u64,
}

/// A short-lived (60 s), single-use ticket that opens one branch's stream without a header or
/// cookie: for pages on another origin, whose `EventSource` cannot send `Authorization`. Long-
/// lived tokens never go in URLs.
#[endpoint(
    tags("stream"),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 403, 404, 413, 415, 431, 500, 503)
)]
pub async fn stream_ticket(
    req: &mut Request,
    depot: &mut Depot,
) -> Result<Json<TicketOut>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let body: TicketRequest = json_body(req, 4096).await?;
    let p = check_id("projectId", &body.project_id)?;
    let b = check_id("branchId", &body.branch_id)?;
    let key = BranchKey::new(p, b);
    require_branch(&app, &principal, &key).await?;
    let (ticket, expires_at_ms) = app.auth.tickets.issue(principal, key)?;
    Ok(Json(TicketOut {
        ticket,
        expires_at_ms,
    }))
}
