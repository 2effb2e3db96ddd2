//! `GET /mirrors`: how each upstream mirror (Postgres, Redis) is doing.

use salvo::http::StatusCode;
use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use super::{ApiError, principal};
use crate::mirror::MirrorStatus;

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Mirrors))]
pub struct MirrorsView {
    /// One per configured sink (none when neither `DATABASE_URL` nor `REDIS_URL` is set).
    pub mirrors: Vec<MirrorStatus>,
}

/// Each mirror's state, cursor, backlog (entries and seconds), last error and last success.
/// Operator only (it spans every project).
#[endpoint(
    tags("mirrors"),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 401, 403, 431, 500, 503)
)]
pub async fn list_mirrors(depot: &mut Depot) -> Result<Json<MirrorsView>, ApiError> {
    let app = super::app(depot)?;
    if !principal(depot)?.is_operator() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "operator_only",
            "the mirrors' status is for the operator (a local token)",
        ));
    }
    let statuses = match &app.mirrors {
        Some(m) => m.status().await?,
        None => Vec::new(),
    };
    Ok(Json(MirrorsView { mirrors: statuses }))
}
