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
    /// How the agent's commands are isolated.
    sandbox: HealthSandbox,
}

/// The agent's command sandbox.
#[derive(Serialize, ToSchema)]
#[salvo(schema(name = HealthSandbox))]
#[serde(rename_all = "camelCase")]
pub struct HealthSandbox {
    /// `bwrap` (commands confined), `off` (`SANDBOX=off`: unconfined, as the server) or
    /// `unavailable` (commands fail; see `reason`).
    mode: &'static str,
    /// Whether commands reach the network.
    network: bool,
    /// The uid commands run as, when it is not the server's.
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl From<crate::sandbox::SandboxStatus> for HealthSandbox {
    fn from(s: crate::sandbox::SandboxStatus) -> Self {
        Self {
            mode: s.mode,
            network: s.network,
            uid: s.uid,
            reason: s.reason,
        }
    }
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
        sandbox: app.sandbox.status().into(),
    }))
}
