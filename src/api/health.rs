//! `GET /health`: liveness for Fly's check; no auth.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use crate::error::ApiError;

#[derive(Serialize, ToSchema)]
#[salvo(schema(name = Health))]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always `ok` while the server answers.
    status: &'static str,
    version: &'static str,
    /// `local` or `cloud`.
    mode: &'static str,
    uptime_seconds: u64,
    /// Open SSE subscribers.
    subscribers: usize,
}

/// Server health.
#[endpoint(tags("health"))]
pub async fn health(depot: &mut Depot) -> Result<Json<Health>, ApiError> {
    let app = super::app(depot)?;
    Ok(Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        mode: app.config.mode.as_str(),
        uptime_seconds: app.started.elapsed().as_secs(),
        subscribers: app.bus.total_subscribers(),
    }))
}
