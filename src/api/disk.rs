//! `GET /disk`: the workspace volume, its watermarks and the branches in eviction order.

use std::collections::HashMap;

use salvo::oapi::ToSchema;
use salvo::prelude::*;
use serde::Serialize;

use super::{ApiError, principal, require_project};

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = Disk))]
pub struct DiskView {
    /// The volume holding `WORKSPACE_BASE`.
    pub path: String,
    /// `used / (used + available)`, as `df` prints it.
    pub usage_percent: f64,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    /// Eviction starts at this usage ...
    pub max_usage_percent: u8,
    /// ... and stops at this one.
    pub target_usage_percent: u8,
    /// Branches used more recently than this are never evicted.
    pub grace_seconds: u64,
    /// Branches the caller may see, least recently used first (the eviction order).
    pub branches: Vec<LruEntry>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[salvo(schema(name = LruEntry))]
pub struct LruEntry {
    pub project_id: String,
    pub branch_id: String,
    pub last_accessed_at_ms: u64,
    pub size_bytes: u64,
    /// `active`, `evicted` or `restoring`.
    pub state: String,
    /// May be evicted now.
    pub evictable: bool,
    /// Why not: `evicted`, `restoring`, `active_workflow`, `subscribers`, `recently_used`,
    /// `busy` or `no_directory`.
    pub reason: Option<String>,
}

/// Disk usage of the workspace volume, the watermarks, and the LRU order of branches with what
/// keeps each from eviction. The operator sees every branch; a user sees their projects'.
#[endpoint(
    tags("disk"),
    security(("bearer" = []), ("sessionCookie" = [])),
    status_codes(200, 401, 431, 500, 503)
)]
pub async fn disk(depot: &mut Depot) -> Result<Json<DiskView>, ApiError> {
    let app = super::app(depot)?;
    let principal = principal(depot)?;
    let usage = app.evictor.usage()?;
    let mut allowed: HashMap<String, bool> = HashMap::new();
    let mut branches = Vec::new();
    for c in app.evictor.lru().await? {
        let visible = match allowed.get(&c.project_id) {
            Some(v) => *v,
            None => {
                let v = principal.is_operator()
                    || require_project(&app, &principal, &c.project_id)
                        .await
                        .is_ok();
                allowed.insert(c.project_id.clone(), v);
                v
            }
        };
        if visible {
            branches.push(LruEntry {
                project_id: c.project_id,
                branch_id: c.branch_id,
                last_accessed_at_ms: c.last_accessed_at_ms,
                size_bytes: c.size_bytes,
                state: c.state.as_str().into(),
                evictable: c.evictable,
                reason: c.reason.map(|r| r.as_str().into()),
            });
        }
    }
    Ok(Json(DiskView {
        path: app.config.workspace_base.display().to_string(),
        usage_percent: (usage.percent() * 10.0).round() / 10.0,
        total_bytes: usage.total_bytes,
        used_bytes: usage.used_bytes,
        available_bytes: usage.available_bytes,
        max_usage_percent: app.config.max_volume_usage_percent,
        target_usage_percent: app.config.target_volume_usage_percent,
        grace_seconds: app.config.eviction_grace.as_secs(),
        branches,
    }))
}
