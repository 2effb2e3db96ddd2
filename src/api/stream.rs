//! `GET /stream/{projectId}/{branchId}`: the branch's events over Server-Sent Events.
//!
//! Served by salvo like every route, over HTTP/1.1, h2c or h2. The response head and the
//! subscription's first chunk (the `retry:` hint and, when resuming, the first page of the
//! replay) are ready before the handler returns, so the first poll of the body yields that
//! chunk and hyper writes head and chunk together: a stream opens with one write.

use salvo::http::HeaderValue;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use salvo::prelude::*;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::ApiError;
use crate::app::App;
use crate::auth::{self, limits::ConnectionGuard};
use crate::branches::BranchKey;
use crate::stream::{Cursor, Subscription};

/// How often an open stream checks that its local API token was not revoked.
const TOKEN_RECHECK: Duration = Duration::from_secs(3);

/// Resolves once `credential` no longer holds: a local token revoked (checked every
/// [`TOKEN_RECHECK`]), a session at its expiry or revoked upstream (checked as often as
/// sessions are re-validated anyway). A stream ends then: it was only ever authorized once, at
/// its start.
async fn until_lapsed(app: Arc<App>, mut credential: auth::Credential) {
    loop {
        let wait = match &credential {
            auth::Credential::Local(_)
            | auth::Credential::Browser { .. }
            | auth::Credential::Ticket => TOKEN_RECHECK,
            auth::Credential::Session { expires_at_ms, .. } => {
                let left = expires_at_ms.saturating_sub(weldr_storage::writer::now_ms());
                Duration::from_millis(left.min(auth::sessions::RECHECK_AFTER_MS))
            }
        };
        tokio::time::sleep(wait).await;
        // Boxed: an idle stream holds only the sleep, not the check's state.
        if !Box::pin(app.auth.still_valid(&app.store, &mut credential)).await {
            return;
        }
    }
}

/// Parse a resume cursor: decimal u64.
pub fn parse_cursor(raw: &str) -> Result<u64, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            "Last-Event-ID / lastEventId must be a decimal event id (0 replays everything)",
        ));
    }
    raw.parse()
        .map_err(|_| ApiError::bad_request("invalid_cursor", "event id out of range"))
}

/// The cursor of a request: the `Last-Event-ID` header wins over the `lastEventId` query.
pub fn request_cursor(req: &Request) -> Result<Cursor, ApiError> {
    if let Some(header) = req.headers().get("last-event-id") {
        let value = header
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid_cursor", "Last-Event-ID is not ASCII"))?;
        return Ok(Cursor::After(parse_cursor(value)?));
    }
    match req.queries().get("lastEventId") {
        Some(value) => Ok(Cursor::After(parse_cursor(value)?)),
        None => Ok(Cursor::Live),
    }
}

/// Everything a stream request does before its first byte: check access, take the user's
/// stream slot (the operator's local token is not capped), bring an evicted branch back and
/// subscribe. The slot is held until the stream ends.
async fn open(
    app: &App,
    principal: &auth::Principal,
    key: &BranchKey,
    cursor: Cursor,
) -> Result<(Subscription, Option<ConnectionGuard>), ApiError> {
    let branch = super::require_branch(app, principal, key).await?;
    let slot = if principal.is_operator() {
        None
    } else {
        Some(app.stream_limiter.acquire(&principal.user_id)?)
    };
    app.residency.ensure_present_from(branch).await?;
    let subscription = app.base.subscribe(key, cursor).await?;
    Ok((subscription, slot))
}

/// Subscribe to a branch's events.
///
/// Frames are `id:`/`event:`/`data:` (JSON with `id`, `type`, `timestamp`), after a `retry:`
/// hint; a comment heartbeat comes every 15 s. Resume with `Last-Event-ID` (header) or
/// `lastEventId` (query): every event with a greater id follows exactly once, in order, then
/// live events. `0` replays the whole log; no cursor means live events only. A cursor older
/// than the retained log gets a `reset` event first.
#[endpoint(
    tags("stream"),
    parameters(
        ("projectId" = crate::api::schema::Id, Path, description = "Project id"),
        ("branchId" = crate::api::schema::Id, Path, description = "Branch id"),
        ("lastEventId" = Option<String>, Query, pattern = "^[0-9]{1,20}$", description = "Resume after this event id"),
        ("Last-Event-ID" = Option<String>, Header, pattern = "^[0-9]{1,20}$", description = "Resume after this event id (wins over the query)"),
    ),
    responses((status_code = 200, description = "Server-Sent Events", content_type = "text/event-stream")),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 400, 401, 404, 429, 431, 500, 503, 507)
)]
pub async fn stream(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
) -> Result<(), ApiError> {
    let app = super::app(depot)?;
    let key = super::path_key(req)?;
    let cursor = request_cursor(req)?;
    let principal = super::principal(depot)?;
    let credential = super::credential(depot)?;
    let (mut subscription, slot) = open(&app, &principal, &key, cursor).await?;
    // Ready before the head goes out, so that hyper can send both in one write.
    let first = subscription.first_chunk().await;
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // The stream holds the user's connection slot until it ends, and ends when the
    // credential it was opened with stops holding.
    let body = futures_util::stream::once(std::future::ready(Ok(first)))
        .chain(subscription.into_stream())
        .take_until(Box::pin(until_lapsed(app.clone(), credential)));
    res.stream(body.map(move |chunk| {
        let _slot = &slot;
        chunk
    }));
    Ok(())
}
