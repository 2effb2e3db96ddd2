//! The composition root: builds every service once, wires them to what they use, and hands the
//! result to the HTTP API, the control socket and the server's workers. Domain code never sees
//! [`App`]; it takes the services it needs (see the README's architecture section).

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use weldr_storage::{StorageError, Store, StoreOptions};

use crate::auth::Authenticator;
use crate::auth::limits::{ConnectionLimiter, RateLimiter};
use crate::auth::sessions::{PostgresSource, SessionSource};
use crate::base::Base;
use crate::branches::{BranchError, Branches};
use crate::config::Config;
use crate::evict::Evictor;
use crate::residency::Residency;
use crate::stream::EventBus;
use crate::sync::syncer::Syncer;
use crate::worker::Workers;
use crate::workflow::Workflows;

pub struct App {
    pub config: Arc<Config>,
    pub store: Store,
    pub bus: Arc<EventBus>,
    /// Cancelled when the server starts shutting down: SSE streams and workers end.
    pub shutdown: CancellationToken,
    /// What every service shares (the fields above, and the branch locks).
    pub base: Base,
    pub auth: Authenticator,
    pub stream_limiter: ConnectionLimiter,
    pub trigger_limiter: RateLimiter,
    pub started: Instant,
    /// Creating branches and their versions.
    pub branches: Arc<Branches>,
    /// Making branches present (restore), making room (eviction).
    pub residency: Arc<Residency>,
    /// Dirty marks and pushes of branch directories.
    pub syncer: Arc<Syncer>,
    /// Disk usage and the cleanup pass.
    pub evictor: Arc<Evictor>,
    /// The workflow engine.
    pub workflows: Arc<Workflows>,
    /// The integration catalog and install queue.
    pub integrations: Arc<crate::integrations::Integrations>,
    /// Where the agent's commands run.
    pub sandbox: Arc<crate::sandbox::Sandbox>,
    /// The background workers (started by the server).
    pub workers: Workers,
    /// The store's continuous backup (None when `STORE_BACKUP=off` or object storage is not
    /// configured).
    pub backup: Option<Arc<crate::backup::StoreBackup>>,
    /// The upstream mirrors (Postgres, Redis), when configured.
    pub mirrors: Option<Arc<crate::mirror::Mirrors>>,
}

impl App {
    /// Open the store under `config.data_dir`. Fails with `AlreadyOpen` when a server holds it.
    pub fn open(config: Config) -> Result<Arc<Self>, StorageError> {
        let config = Arc::new(config);
        let bus = Arc::new(EventBus::new(config.event_cache_bytes));
        let defaults = StoreOptions::default();
        let options = StoreOptions {
            event_retention: config.event_retention,
            wal_bytes: if config.append_log {
                defaults.wal_bytes
            } else {
                0
            },
            track_changes: config.store_backup.enabled,
            outbox: config.mirror.any(),
            ..defaults
        };
        let store = Store::open(&config.store_path(), options, bus.clone())?;
        let backup = match crate::backup::StoreBackup::new(&config, store.clone()) {
            Ok(backup) => backup,
            Err(e) => {
                tracing::error!(error = %e, "the store's backup cannot start: the store is not backed up");
                None
            }
        };
        let mirrors = crate::mirror::Mirrors::new(&config, store.clone())
            .map_err(|e| StorageError::Refused(format!("mirrors: {e}")))?;
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
            tickets: Default::default(),
        };
        let sandbox = Arc::new(crate::sandbox::Sandbox::new(config.sandbox.clone()));
        crate::sandbox::prepare_workspace(&sandbox, &config.workspace_base);
        let shutdown = CancellationToken::new();
        let base = Base {
            config: config.clone(),
            store: store.clone(),
            bus: bus.clone(),
            locks: Default::default(),
            shutdown: shutdown.clone(),
        };
        let syncer = Arc::new(Syncer::new(base.clone()));
        let evictor = Arc::new(Evictor::new(base.clone(), syncer.clone()));
        let branches = Arc::new(Branches::new(base.clone(), syncer.clone()));
        let residency = Arc::new(Residency::new(
            base.clone(),
            branches.clone(),
            evictor.clone(),
        ));
        let integrations = Arc::new(crate::integrations::Integrations::new(
            base.clone(),
            branches.clone(),
            residency.clone(),
        ));
        let workflows = Arc::new(Workflows::new(
            base.clone(),
            branches.clone(),
            syncer.clone(),
            residency.clone(),
            integrations.clone(),
            sandbox.clone(),
        ));
        integrations.set_after_install(Arc::new(StartAfterInstall {
            workflows: Arc::downgrade(&workflows),
            model: config.providers.default_model.clone(),
        }));
        Ok(Arc::new(Self {
            stream_limiter: ConnectionLimiter::new(config.sse_max_per_user),
            trigger_limiter: RateLimiter::new(config.trigger_rate_per_minute),
            workers: Workers::new(shutdown.clone()),
            config,
            store,
            bus,
            shutdown,
            base,
            auth,
            started: Instant::now(),
            branches,
            residency,
            syncer,
            evictor,
            workflows,
            integrations,
            sandbox,
            backup,
            mirrors,
        }))
    }
}

/// Startup work before serving: in cloud mode the machine's project exists in the registry.
pub async fn prepare(app: &App) -> Result<(), BranchError> {
    crate::sandbox::log_status(&app.sandbox);
    match app.residency.settle_missing().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            branches = n,
            "branches without a directory will be restored on first use"
        ),
        Err(e) => tracing::warn!(error = %e, "could not check the branches' directories"),
    }
    if app.config.mode == crate::config::Mode::Cloud
        && let Some(project_id) = &app.config.project_id
    {
        match crate::branches::registry::create_project(&app.store, project_id, None, None).await {
            Ok(_) => tracing::info!(project = %project_id, "registered the machine's project"),
            Err(BranchError::ProjectExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `triggerWorkflow` of an install request: once its installs have run, a workflow starts on
/// the branch with a message naming them (integrations stand below workflows, so the
/// composition root connects the two).
struct StartAfterInstall {
    workflows: std::sync::Weak<Workflows>,
    model: String,
}

#[async_trait::async_trait]
impl crate::integrations::AfterInstall for StartAfterInstall {
    async fn start_workflow(
        &self,
        key: &crate::branches::BranchKey,
        message: String,
    ) -> Result<String, String> {
        let engine = self.workflows.upgrade().ok_or("the server is stopping")?;
        let input = crate::workflow::UserInput {
            text: message,
            attachments: Vec::new(),
        };
        crate::workflow::trigger(
            &engine,
            &key.project_id,
            &key.branch_id,
            input,
            self.model.clone(),
            None,
        )
        .await
        .map(|t| t.workflow.workflow_id)
        .map_err(|e| e.to_string())
    }
}
