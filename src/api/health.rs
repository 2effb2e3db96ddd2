//! `GET /health`: liveness for Fly's check; no auth. 503 while the store cannot write (a full
//! disk): the machine answers, but every change would fail.

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use super::ApiError;

#[derive(Serialize, ToSchema)]
#[salvo(schema(name = Health))]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok`, or `degraded` (answered with 503) while the store cannot write.
    status: &'static str,
    /// `ok`, or `cannot write: <reason>` (a full disk, an I/O error); the store writes again on
    /// its own once it can.
    store: String,
    version: &'static str,
    /// `local` or `cloud`.
    mode: &'static str,
    uptime_seconds: u64,
    /// Open SSE subscribers.
    subscribers: usize,
    /// How the agent's commands are isolated.
    sandbox: HealthSandbox,
    /// The background workers (syncer, evictor, recovery, ...).
    workers: Vec<HealthWorker>,
    /// The store's continuous backup; absent when it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    store_backup: Option<HealthBackup>,
}

/// The store's continuous backup (see the README, "Losing the machine").
#[derive(Serialize, ToSchema)]
#[salvo(schema(name = HealthBackup))]
#[serde(rename_all = "camelCase")]
pub struct HealthBackup {
    /// The current generation (its full copy's time and a random suffix), none before the first.
    generation: Option<String>,
    /// Increments shipped in the current generation.
    increments: u64,
    full_copies: u64,
    bytes_shipped: u64,
    /// Requests made to object storage.
    requests: u64,
    /// When something was last shipped (ms since the epoch).
    last_shipped_at_ms: Option<u64>,
    /// From the oldest commit the last increment carried to its upload's end.
    last_lag_ms: Option<u64>,
    /// How long the oldest change not yet shipped has waited; 0 when everything is shipped.
    pending_ms: u64,
}

impl From<crate::backup::BackupStats> for HealthBackup {
    fn from(s: crate::backup::BackupStats) -> Self {
        Self {
            generation: s.generation,
            increments: s.increments,
            full_copies: s.full_copies,
            bytes_shipped: s.bytes_shipped,
            requests: s.requests,
            last_shipped_at_ms: s.last_shipped_at_ms,
            last_lag_ms: s.last_lag_ms,
            pending_ms: s.pending_ms,
        }
    }
}

/// One background worker.
#[derive(Serialize, ToSchema)]
#[salvo(schema(name = HealthWorker))]
#[serde(rename_all = "camelCase")]
pub struct HealthWorker {
    name: &'static str,
    /// `busy`, `idle`, `backoff` (after an error) or `done`.
    state: &'static str,
    /// The last error, kept after the worker recovers.
    last_error: Option<String>,
    /// Failed units since the start.
    errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl From<crate::worker::WorkerInfo> for HealthWorker {
    fn from(w: crate::worker::WorkerInfo) -> Self {
        Self {
            name: w.name,
            state: w.state,
            last_error: w.last_error,
            errors: w.errors,
            detail: w.detail,
        }
    }
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

/// Server health: 200, or 503 while the store cannot write.
#[endpoint(
    tags("health"),
    responses(
        (status_code = 200, description = "Healthy", body = Health),
        (status_code = 503, description = "The store cannot write (see `store`)", body = Health),
    ),
    status_codes(200, 431, 500, 503)
)]
pub async fn health(depot: &mut Depot, res: &mut Response) -> Result<Json<Health>, ApiError> {
    let app = super::app(depot)?;
    let problem = app.store.write_problem();
    if problem.is_some() {
        res.status_code(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok(Json(Health {
        status: if problem.is_some() { "degraded" } else { "ok" },
        store: problem.unwrap_or_else(|| "ok".into()),
        version: env!("CARGO_PKG_VERSION"),
        mode: app.config.mode.as_str(),
        uptime_seconds: app.started.elapsed().as_secs(),
        subscribers: app.bus.total_subscribers(),
        sandbox: app.sandbox.status().into(),
        workers: app.workers.status().into_iter().map(Into::into).collect(),
        store_backup: app.backup.as_ref().map(|b| b.stats().into()),
    }))
}
