//! Integrations: the catalog, a branch's persistent install queue, and the installs.
//!
//! A job is queued `blocked` while a dependency is not installed on the branch, `queued`
//! otherwise; every change of its status is one write together with an `integration` event on
//! the branch stream (`{jobId, key, status, message}`). Jobs of a branch run one at a time, in
//! queue order, under the branch lock, and never while a workflow holds the branch: they wait
//! behind it (the [`Installer`] worker skips a busy branch), except the ones that workflow
//! queued itself (`add_integrations`), which it installs before coding.
//!
//! An install: the branch's uncommitted changes become a checkpoint version; the job becomes
//! `installing` with the commit it starts from; every file is computed in memory
//! ([`render::plan`]) and written ([`render::apply`], undone on failure); the tree is committed
//! as an `integration` version in the same transaction that marks the job `installed` and
//! queues the dependants it unblocks. A failure leaves the tree as it was and the job `failed`
//! with its reason; its dependants stay `blocked` and say why. A job found `installing` at
//! start (the process died mid-install) is rolled back to its starting commit and run again.

pub mod catalog;
pub mod render;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use weldr_storage::integrations::{self as jobs, IntegrationJob, JobStatus};

pub use weldr_storage::integrations::JobStatus as JobStatusView;
use weldr_storage::model::{self, VersionKind};
use weldr_storage::writer::{WriteCtx, now_ms};
use weldr_storage::{StorageError, StreamKey};

use crate::base::Base;
use crate::branches::{BranchError, BranchKey, Branches};
use crate::config::Mode;
use crate::residency::{Residency, ResidencyError};
use crate::worker::{Worker, WorkerState};
use catalog::Catalog;

#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    #[error("the integration catalog is broken: {0}")]
    Catalog(String),
    #[error("unknown integration {0:?}")]
    Unknown(String),
    #[error("{key}: {message}")]
    InvalidOptions { key: String, message: String },
    #[error("{key}: rendering {path}: {message}")]
    Render {
        key: String,
        path: String,
        message: String,
    },
    #[error("{key}: {message}")]
    Conflict { key: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Branch(#[from] BranchError),
    #[error(transparent)]
    Residency(#[from] ResidencyError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl IntegrationError {
    pub fn io(path: &str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_string(),
            source,
        }
    }
}

impl From<tokio::task::JoinError> for IntegrationError {
    fn from(e: tokio::task::JoinError) -> Self {
        IntegrationError::Branch(e.into())
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub seq: u64,
    pub job: IntegrationJob,
}

/// How one install ended.
enum Installed {
    Yes,
    /// Recorded on the job as `failed`.
    Failed,
    /// Not started: a workflow holds the branch now.
    Deferred,
}

/// What to do once a request's installs have run (`triggerWorkflow`): start a workflow on
/// the branch with `message`. Set by the composition root (workflows stand above this floor).
#[async_trait::async_trait]
pub trait AfterInstall: Send + Sync {
    async fn start_workflow(&self, key: &BranchKey, message: String) -> Result<String, String>;
}

pub struct Integrations {
    base: Base,
    branches: Arc<Branches>,
    residency: Arc<Residency>,
    wake: Notify,
    after: RwLock<Option<Arc<dyn AfterInstall>>>,
}

/// One integration asked for: its key and options.
#[derive(Debug, Clone)]
pub struct Request {
    pub key: String,
    pub options: Option<Value>,
}

impl Integrations {
    pub fn new(base: Base, branches: Arc<Branches>, residency: Arc<Residency>) -> Self {
        Self {
            base,
            branches,
            residency,
            wake: Notify::new(),
            after: RwLock::new(None),
        }
    }

    /// Have the [`Installer`] look at the queue now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn set_after_install(&self, after: Arc<dyn AfterInstall>) {
        *self.after.write().unwrap_or_else(|p| p.into_inner()) = Some(after);
    }

    pub fn catalog(&self) -> Result<&'static Catalog, IntegrationError> {
        Catalog::get()
    }

    /// Queue `requests` on the branch (dependencies first among them). Every key and option is
    /// checked before anything is written. An integration already installed or waiting on the
    /// branch is not queued again: its job is answered (installed: "already installed").
    /// `then_workflow`: start a workflow with this message once the last of them has run.
    /// `workflow_id`: the workflow that queues them (it installs them itself).
    pub async fn queue(
        &self,
        key: &BranchKey,
        requests: Vec<Request>,
        then_workflow: Option<String>,
        workflow_id: Option<String>,
    ) -> Result<Vec<JobView>, IntegrationError> {
        let catalog = Catalog::get()?;
        let mut resolved = Vec::new();
        for r in &requests {
            let integration = catalog
                .find(&r.key)
                .ok_or_else(|| IntegrationError::Unknown(r.key.clone()))?;
            let options =
                catalog::resolve_options(integration, r.options.as_ref()).map_err(|message| {
                    IntegrationError::InvalidOptions {
                        key: r.key.clone(),
                        message,
                    }
                })?;
            if resolved.iter().any(|(k, _): &(String, Value)| *k == r.key) {
                continue;
            }
            resolved.push((r.key.clone(), options));
        }
        let keys: Vec<&str> = resolved.iter().map(|(k, _)| k.as_str()).collect();
        let ordered: Vec<String> = catalog::order(&catalog.integrations, &keys)?
            .into_iter()
            .map(str::to_string)
            .collect();
        let stream = key.stream();
        let views = self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let mut existing = jobs::list_for_update(ctx, &stream)?;
                let mut out = Vec::new();
                let last = ordered.len();
                for (i, k) in ordered.iter().enumerate() {
                    let Some((_, options)) = resolved.iter().find(|(rk, _)| rk == k) else {
                        continue;
                    };
                    let live = existing.iter().find(|(_, j)| {
                        j.key == *k && !matches!(j.status, JobStatus::Failed | JobStatus::Cancelled)
                    });
                    if let Some((seq, job)) = live {
                        let mut job = job.clone();
                        if job.status == JobStatus::Installed {
                            job.message = Some("already installed; nothing to do".into());
                        }
                        out.push(JobView { seq: *seq, job });
                        continue;
                    }
                    let now = now_ms();
                    let mut job = IntegrationJob {
                        job_id: new_job_id(),
                        key: k.clone(),
                        options_json: options.to_string(),
                        status: JobStatus::Queued,
                        message: None,
                        base_commit: None,
                        version: None,
                        then_workflow: if i + 1 == last {
                            then_workflow.clone()
                        } else {
                            None
                        },
                        workflow_id: workflow_id.clone(),
                        created_at_ms: now,
                        updated_at_ms: now,
                    };
                    let (status, message) = readiness(catalog, &existing, k);
                    job.status = status;
                    job.message = message;
                    let seq = jobs::enqueue(ctx, &stream, &job)?;
                    announce(ctx, &stream, &job)?;
                    existing.push((seq, job.clone()));
                    out.push(JobView { seq, job });
                }
                Ok(out)
            })
            .await?;
        self.wake.notify_one();
        Ok(views)
    }

    /// The branch's jobs, in queue order.
    pub async fn list(&self, key: &BranchKey) -> Result<Vec<JobView>, IntegrationError> {
        let stream = key.stream();
        let list = self.base.read(move |rtx| jobs::list(rtx, &stream)).await?;
        Ok(list
            .into_iter()
            .map(|(seq, job)| JobView { seq, job })
            .collect())
    }

    /// Run the branch's runnable jobs, in order, until none is left. `workflow_id`: the
    /// workflow holding the branch runs them (its own and any queued before); None: only when
    /// no workflow holds it. Returns the keys installed.
    pub async fn run_branch(
        &self,
        key: &BranchKey,
        workflow_id: Option<&str>,
    ) -> Result<Vec<String>, IntegrationError> {
        let mut installed = Vec::new();
        loop {
            let (p, b, stream) = (key.project_id.clone(), key.branch_id.clone(), key.stream());
            let (active, list) = self
                .base
                .read(move |rtx| {
                    Ok((
                        model::active_workflow(rtx, &p, &b)?,
                        jobs::list(rtx, &stream)?,
                    ))
                })
                .await?;
            if active.is_some() && active.as_deref() != workflow_id {
                return Ok(installed);
            }
            let Some((seq, job)) = list
                .iter()
                .find(|(_, j)| matches!(j.status, JobStatus::Queued | JobStatus::Installing))
            else {
                return Ok(installed);
            };
            self.residency.ensure_present(key).await?;
            match self.install(key, *seq, job.clone(), workflow_id).await? {
                Installed::Yes => installed.push(job.key.clone()),
                Installed::Failed => {}
                // A workflow claimed the branch meanwhile: the job waits behind it.
                Installed::Deferred => return Ok(installed),
            }
            if let Some(message) = self.then_workflow(key, *seq).await? {
                self.start_after(key, message).await;
            }
        }
    }

    /// The message of the workflow to start after job `seq`, when it carries one and installed
    /// (a failed install starts nothing: its failure is on the job and the stream).
    async fn then_workflow(
        &self,
        key: &BranchKey,
        seq: u64,
    ) -> Result<Option<String>, IntegrationError> {
        let stream = key.stream();
        let list = self.base.read(move |rtx| jobs::list(rtx, &stream)).await?;
        Ok(list
            .into_iter()
            .find(|(s, _)| *s == seq)
            .and_then(|(_, j)| j.then_workflow.filter(|_| j.status == JobStatus::Installed)))
    }

    async fn start_after(&self, key: &BranchKey, message: String) {
        let after = self.after.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(after) = after {
            match after.start_workflow(key, message).await {
                Ok(id) => {
                    tracing::info!(branch = %key, workflow = %id, "workflow started after installs")
                }
                Err(e) => {
                    tracing::warn!(branch = %key, error = %e, "could not start the workflow after installs")
                }
            }
        }
    }

    /// Install job `seq`; `Failed` when it failed (recorded on the job with the reason,
    /// whatever went wrong: a render error, a conflict, a full disk). An error is the store's
    /// failing to record that: the job is left for the next run.
    async fn install(
        &self,
        key: &BranchKey,
        seq: u64,
        job: IntegrationJob,
        workflow_id: Option<&str>,
    ) -> Result<Installed, IntegrationError> {
        match self.try_install(key, seq, job.clone(), workflow_id).await {
            Ok(done) => Ok(done),
            Err(IntegrationError::Storage(e)) => Err(e.into()),
            Err(e) => {
                // Whatever state the job reached, it ends failed with the reason.
                let stream = key.stream();
                let current = self
                    .base
                    .read(move |rtx| jobs::list(rtx, &stream))
                    .await?
                    .into_iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, j)| j)
                    .unwrap_or(job);
                self.fail(key, seq, &current, e.to_string()).await?;
                Ok(Installed::Failed)
            }
        }
    }

    async fn try_install(
        &self,
        key: &BranchKey,
        seq: u64,
        job: IntegrationJob,
        workflow_id: Option<&str>,
    ) -> Result<Installed, IntegrationError> {
        let catalog = Catalog::get()?;
        let stream = key.stream();
        let dir = self.base.dir(key);
        // The whole install holds the branch lock; a trigger claims the branch under it too,
        // so a workflow that started since the queue was read goes first.
        let _guard = self.base.locks.lock(key).await;
        let (p, b) = (key.project_id.clone(), key.branch_id.clone());
        let active = self
            .base
            .read(move |rtx| model::active_workflow(rtx, &p, &b))
            .await?;
        if active.is_some() && active.as_deref() != workflow_id {
            return Ok(Installed::Deferred);
        }
        // A job found installing: the process died during it; back to where it started.
        if job.status == JobStatus::Installing
            && let Some(base) = job.base_commit.clone()
        {
            let (d, b) = (dir.clone(), base.clone());
            tokio::task::spawn_blocking(move || crate::git::reset_hard(&d, &b))
                .await?
                .map_err(BranchError::from)?;
            tracing::info!(branch = %key, job = %job.job_id, commit = %base, "interrupted install rolled back; running it again");
        }
        let Some(integration) = catalog.find(&job.key) else {
            self.fail(key, seq, &job, format!("unknown integration {:?}", job.key))
                .await?;
            return Ok(Installed::Failed);
        };
        // Uncommitted work is kept as a version of its own: the install starts from a commit.
        self.branches
            .commit_locked_with(
                key,
                &format!(
                    "Uncommitted changes before installing {}",
                    integration.manifest.name
                ),
                VersionKind::Checkpoint,
                None,
            )
            .await?;
        let d = dir.clone();
        let head = tokio::task::spawn_blocking(move || crate::git::head(&d))
            .await?
            .map_err(BranchError::from)?;
        let mut running = job.clone();
        running.status = JobStatus::Installing;
        running.message = None;
        running.base_commit = Some(head);
        running.updated_at_ms = now_ms();
        {
            let (s, j) = (stream.clone(), running.clone());
            self.base
                .store
                .writer()
                .write(move |ctx| {
                    jobs::put(ctx, &s, seq, &j)?;
                    announce(ctx, &s, &j)
                })
                .await?;
        }
        let installed_before: Vec<String> = self
            .list(key)
            .await?
            .into_iter()
            .filter(|v| v.job.status == JobStatus::Installed)
            .map(|v| v.job.key)
            .collect();
        let with_base = installed_before.is_empty();
        let mut order = installed_before.clone();
        order.push(job.key.clone());
        let vars = render::Vars::new(
            &key.project_id,
            &key.branch_id,
            &self.base.config.integration_database_url,
            order,
        );
        // Checked again against the catalog of this binary (defaults of options added since
        // the job was queued apply).
        let stored: Value = serde_json::from_str(&job.options_json).unwrap_or(Value::Null);
        let options = match catalog::resolve_options(integration, Some(&stored)) {
            Ok(o) => o,
            Err(e) => {
                self.fail(key, seq, &running, format!("options: {e}"))
                    .await?;
                return Ok(Installed::Failed);
            }
        };
        let local = self.base.config.mode == Mode::Local;
        let (d, integ) = (dir.clone(), integration.clone());
        let written = tokio::task::spawn_blocking(move || {
            let plan = render::plan(&d, catalog, &integ, &options, &vars, with_base, local)?;
            render::apply(&d, &plan)?;
            Ok::<_, IntegrationError>(render::paths(&plan))
        })
        .await?;
        let files = match written {
            Ok(files) => files,
            Err(e) => {
                self.fail(key, seq, &running, e.to_string()).await?;
                return Ok(Installed::Failed);
            }
        };
        let m = &integration.manifest;
        let message = format!("Install {} ({} {})", m.name, m.key, m.version);
        let (s, j) = (stream.clone(), running.clone());
        let said = format!("installed; {} files written", files.len());
        let also: crate::branches::AlsoWrite = Arc::new(move |ctx, version| {
            let mut done = j.clone();
            done.status = JobStatus::Installed;
            done.message = Some(said.clone());
            done.version = version;
            done.updated_at_ms = now_ms();
            jobs::put(ctx, &s, seq, &done)?;
            announce(ctx, &s, &done)?;
            settle_dependants(ctx, &s, catalog)
        });
        let committed = self
            .branches
            .commit_locked_with(key, &message, VersionKind::Integration, Some(also))
            .await;
        if let Err(e) = committed {
            // The files are written but not recorded: back to the start, and say why.
            let (d, base) = (dir.clone(), running.base_commit.clone().unwrap_or_default());
            let _ = tokio::task::spawn_blocking(move || crate::git::reset_hard(&d, &base)).await;
            self.fail(key, seq, &running, format!("committing the install: {e}"))
                .await?;
            return Ok(Installed::Failed);
        }
        tracing::info!(branch = %key, integration = %job.key, files = files.len(), "integration installed");
        Ok(Installed::Yes)
    }

    async fn fail(
        &self,
        key: &BranchKey,
        seq: u64,
        job: &IntegrationJob,
        reason: String,
    ) -> Result<(), IntegrationError> {
        tracing::warn!(branch = %key, integration = %job.key, reason = %reason, "integration install failed");
        let mut failed = job.clone();
        failed.status = JobStatus::Failed;
        failed.message = Some(reason);
        failed.updated_at_ms = now_ms();
        let stream = key.stream();
        let catalog = Catalog::get()?;
        self.base
            .store
            .writer()
            .write(move |ctx| {
                jobs::put(ctx, &stream, seq, &failed)?;
                announce(ctx, &stream, &failed)?;
                settle_dependants(ctx, &stream, catalog)
            })
            .await?;
        Ok(())
    }

    /// Cancel a job that has not started (queued or blocked). None: no such job.
    pub async fn cancel(
        &self,
        key: &BranchKey,
        job_id: &str,
    ) -> Result<Option<JobView>, IntegrationError> {
        let (stream, id) = (key.stream(), job_id.to_string());
        let catalog = Catalog::get()?;
        Ok(self
            .base
            .store
            .writer()
            .write(move |ctx| {
                let list = jobs::list_for_update(ctx, &stream)?;
                let Some((seq, job)) = list.into_iter().find(|(_, j)| j.job_id == id) else {
                    return Ok(None);
                };
                if !matches!(job.status, JobStatus::Queued | JobStatus::Blocked) {
                    return Err(StorageError::Conflict(format!(
                        "job {id} is {}: only a queued or blocked job can be cancelled",
                        job.status.as_str()
                    )));
                }
                let mut job = job;
                job.status = JobStatus::Cancelled;
                job.message = Some("cancelled".into());
                job.updated_at_ms = now_ms();
                jobs::put(ctx, &stream, seq, &job)?;
                announce(ctx, &stream, &job)?;
                settle_dependants(ctx, &stream, catalog)?;
                Ok(Some(JobView { seq, job }))
            })
            .await?)
    }
}

/// Render the base monorepo and `keys` (dependencies first; each key's dependencies must be
/// among them) into the plain directory `dir`, as installs into a branch in local mode write
/// them (`.env` files included): what `weldr-agent integrations render` and
/// `scripts/verify-templates.sh` use. Returns every file written.
pub fn render_into(
    dir: &std::path::Path,
    keys: &[String],
    project: &str,
    database_url: &str,
) -> Result<Vec<String>, IntegrationError> {
    let catalog = Catalog::get()?;
    let mut resolved = Vec::new();
    for k in keys {
        let integration = catalog
            .find(k)
            .ok_or_else(|| IntegrationError::Unknown(k.clone()))?;
        for dep in &integration.manifest.depends_on {
            if !keys.contains(dep) {
                return Err(IntegrationError::InvalidOptions {
                    key: k.clone(),
                    message: format!("needs {dep}: name it too"),
                });
            }
        }
        resolved.push(integration);
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let ordered = catalog::order(&catalog.integrations, &refs)?;
    let mut installed: Vec<String> = Vec::new();
    let mut written = std::collections::BTreeSet::new();
    for k in ordered {
        let integration = catalog.find(k).expect("checked above");
        let options = catalog::resolve_options(integration, None).map_err(|message| {
            IntegrationError::InvalidOptions {
                key: k.to_string(),
                message,
            }
        })?;
        installed.push(k.to_string());
        let vars = render::Vars::new(project, "main", database_url, installed.clone());
        let plan = render::plan(
            dir,
            catalog,
            integration,
            &options,
            &vars,
            installed.len() == 1,
            true,
        )?;
        render::apply(dir, &plan)?;
        written.extend(render::paths(&plan));
    }
    Ok(written.into_iter().collect())
}

/// A new job id: `job-` and 12 random bytes in hex (an id the API's paths accept).
fn new_job_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS random source");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("job-{hex}")
}

/// Whether `key` can run now on a branch with `jobs`: queued when every dependency is
/// installed there, else blocked with what it waits for.
fn readiness(
    catalog: &Catalog,
    jobs: &[(u64, IntegrationJob)],
    key: &str,
) -> (JobStatus, Option<String>) {
    let Some(integration) = catalog.find(key) else {
        return (JobStatus::Queued, None);
    };
    let mut waits = Vec::new();
    for dep in &integration.manifest.depends_on {
        let newest = jobs.iter().rev().find(|(_, j)| j.key == *dep);
        match newest.map(|(_, j)| (j.status, j.message.clone())) {
            Some((JobStatus::Installed, _)) => {}
            Some((JobStatus::Failed, m)) => waits.push(format!(
                "{dep} failed: {}",
                m.unwrap_or_else(|| "no reason recorded".into())
            )),
            Some((JobStatus::Cancelled, _)) => waits.push(format!("{dep} was cancelled")),
            Some((s, _)) => waits.push(format!("{dep} is {}", s.as_str())),
            None => waits.push(format!("{dep} is not queued")),
        }
    }
    if waits.is_empty() {
        (JobStatus::Queued, None)
    } else {
        (
            JobStatus::Blocked,
            Some(format!("waits for {}", waits.join("; "))),
        )
    }
}

/// After a job changed: every blocked job whose dependencies are now installed is queued; the
/// others say what they wait for now.
fn settle_dependants(
    ctx: &mut WriteCtx<'_>,
    stream: &StreamKey,
    catalog: &Catalog,
) -> Result<(), StorageError> {
    let list = jobs::list_for_update(ctx, stream)?;
    for (seq, job) in &list {
        if job.status != JobStatus::Blocked {
            continue;
        }
        let (status, message) = readiness(catalog, &list, &job.key);
        if status != job.status || message != job.message {
            let mut j = job.clone();
            j.status = status;
            j.message = message;
            j.updated_at_ms = now_ms();
            jobs::put(ctx, stream, *seq, &j)?;
            announce(ctx, stream, &j)?;
        }
    }
    Ok(())
}

/// The `integration` event of a job's status, in the caller's transaction.
fn announce(
    ctx: &mut WriteCtx<'_>,
    stream: &StreamKey,
    job: &IntegrationJob,
) -> Result<(), StorageError> {
    let event = crate::stream::new_event(
        "integration",
        json!({
            "jobId": job.job_id,
            "key": job.key,
            "status": job.status.as_str(),
            "message": job.message,
        }),
    )
    .map_err(|e| StorageError::Conflict(e.to_string()))?;
    ctx.append(stream, event)?;
    Ok(())
}

/// The install queue as a [`Worker`]: runs the jobs of every branch no workflow holds; wakes
/// when a job is queued, and every few seconds for branches a workflow has let go of.
pub struct Installer {
    integrations: Arc<Integrations>,
}

impl Installer {
    pub fn new(integrations: Arc<Integrations>) -> Self {
        Self { integrations }
    }
}

#[async_trait::async_trait]
impl Worker for Installer {
    fn name(&self) -> &'static str {
        "integrations"
    }

    async fn work(
        &mut self,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<WorkerState, String> {
        let branches = self
            .integrations
            .base
            .read(jobs::branches_with_work)
            .await
            .map_err(|e| e.to_string())?;
        for stream in branches {
            let Some((p, b)) = stream.split_once('/') else {
                continue;
            };
            let key = BranchKey::new(p, b);
            if let Err(e) = self.integrations.run_branch(&key, None).await {
                tracing::warn!(branch = %key, error = %e, "integration installs could not run");
            }
        }
        Ok(WorkerState::Idle)
    }

    async fn wait_for_work(&mut self) {
        tokio::select! {
            _ = self.integrations.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
