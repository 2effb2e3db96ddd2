//! The application: configuration, the store, the event bus and the shutdown signal, shared by
//! the HTTP API, the control socket and the background workers.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use weldr_storage::{Event, NewEvent, StorageError, Store, StoreOptions, StreamKey};

use crate::auth::Authenticator;
use crate::auth::limits::{ConnectionLimiter, RateLimiter};
use crate::auth::sessions::{PostgresSource, SessionSource};
use crate::config::Config;
use crate::error::ApiError;
use crate::stream::{Cursor, EventBus, Subscription, is_valid_event_type};

pub struct App {
    pub config: Config,
    pub branch_locks: crate::branches::BranchLocks,
    pub auth: Authenticator,
    pub stream_limiter: ConnectionLimiter,
    pub trigger_limiter: RateLimiter,
    pub store: Store,
    pub bus: Arc<EventBus>,
    /// Cancelled when the server starts shutting down: SSE streams and workers end.
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// The workflow engine (concurrency permits, tools).
    pub workflows: crate::workflow::Workflows,
    /// Dirty marks and pushes of branch directories.
    pub syncer: crate::sync::syncer::Syncer,
    /// Disk usage and the cleanup pass.
    pub evictor: crate::evict::Evictor,
    /// Where the agent's commands run.
    pub sandbox: Arc<crate::sandbox::Sandbox>,
}

impl App {
    /// Open the store under `config.data_dir`. Fails with `AlreadyOpen` when a server holds it.
    pub fn open(config: Config) -> Result<Arc<Self>, StorageError> {
        let bus = Arc::new(EventBus::new(config.event_cache_bytes));
        let defaults = StoreOptions::default();
        let options = StoreOptions {
            event_retention: config.event_retention,
            wal_bytes: if config.append_log {
                defaults.wal_bytes
            } else {
                0
            },
            ..defaults
        };
        let store = Store::open(&config.store_path(), options, bus.clone())?;
        // Layered branches' mounts do not survive a reboot: back before anything reads a branch.
        crate::branches::layers::mount_all(&config);
        let source: Option<Arc<dyn SessionSource>> = config.database_url.as_ref().map(|url| {
            Arc::new(PostgresSource::new(
                url.expose().to_string(),
                config.auth_tables.clone(),
            )) as _
        });
        let auth = Authenticator {
            cookie_prefix: config.auth_cookie_prefix.clone(),
            secret: config
                .better_auth_secret
                .as_ref()
                .map(|s| s.expose().as_bytes().to_vec()),
            source,
        };
        let sandbox = Arc::new(crate::sandbox::Sandbox::new(config.sandbox.clone()));
        crate::sandbox::prepare_workspace(&sandbox, &config.workspace_base);
        Ok(Arc::new(Self {
            branch_locks: Default::default(),
            auth,
            stream_limiter: ConnectionLimiter::new(config.sse_max_per_user),
            trigger_limiter: RateLimiter::new(config.trigger_rate_per_minute),
            workflows: crate::workflow::Workflows::new(
                config.workflow_concurrency,
                sandbox.clone(),
            ),
            sandbox,
            syncer: Default::default(),
            evictor: Default::default(),
            config,
            store,
            bus,
            shutdown: CancellationToken::new(),
            started: Instant::now(),
        }))
    }

    /// Append one event to a branch stream; answers after it is durable. `fields` must be a
    /// JSON object; `id`, `type` and `timestamp` are set by the log.
    pub async fn emit(
        &self,
        project_id: &str,
        branch_id: &str,
        kind: &str,
        fields: serde_json::Value,
    ) -> Result<Arc<Event>, ApiError> {
        let event = new_event(kind, fields)?;
        let mut events = self
            .store
            .writer()
            .append(StreamKey::new(project_id, branch_id), vec![event])
            .await?;
        events
            .pop()
            .ok_or_else(|| ApiError::internal("append returned no event"))
    }

    /// Subscribe to a branch stream from `cursor`.
    pub async fn subscribe(
        &self,
        project_id: &str,
        branch_id: &str,
        cursor: Cursor,
    ) -> Result<Subscription, ApiError> {
        let key = StreamKey::new(project_id, branch_id);
        let rx = self.bus.subscribe(&key);
        Ok(Subscription::start(
            self.store.clone(),
            self.bus.frames.clone(),
            key,
            rx,
            cursor,
            self.shutdown.child_token(),
            self.config.sse_heartbeat,
        )
        .await?)
    }
}

/// Validate and normalise an event for the log.
pub fn new_event(kind: &str, fields: serde_json::Value) -> Result<NewEvent, ApiError> {
    if !is_valid_event_type(kind) {
        return Err(ApiError::bad_request(
            "invalid_event_type",
            "event type must be 1-32 characters of a-z, 0-9, '-' or '_'",
        ));
    }
    let mut map = match fields {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => serde_json::Map::new(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_event_data",
                "event data must be a JSON object",
            ));
        }
    };
    for reserved in ["id", "type", "timestamp"] {
        map.remove(reserved);
    }
    let data = serde_json::to_string(&map).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(NewEvent {
        kind: kind.to_string(),
        data,
    })
}

/// Startup work before serving: in cloud mode the machine's project exists in the registry.
pub async fn prepare(app: &App) -> Result<(), ApiError> {
    crate::sandbox::log_status(&app.sandbox);
    if app.config.mode == crate::config::Mode::Cloud
        && let Some(project_id) = &app.config.project_id
    {
        match crate::registry::create_project(&app.store, project_id, None, None).await {
            Ok(_) => tracing::info!(project = %project_id, "registered the machine's project"),
            Err(e) if e.code == "project_exists" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
