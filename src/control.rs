//! The control socket: how CLI commands reach a running server.
//!
//! redb lets one process hold the store. A CLI command (`branch create`, `events append`, ...)
//! first tries to open the store itself; when the server holds it, the command is sent over a
//! Unix socket in the data directory (mode 0600: only the user that runs the server may use
//! it) and the server runs the very same [`execute`]. JSON lines: one request, one answer.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use weldr_storage::events::{list_streams, read_meta, read_range};

use crate::api::ApiError;
use crate::app::App;
use crate::auth::tokens;
use crate::branches::{self, BranchError, BranchKey, registry};
use crate::ids::{check_id, parse_version_id};

/// Longest request line accepted on the socket.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Store and server status.
    Status,
    CreateProject {
        project_id: String,
        title: Option<String>,
    },
    /// Create or reuse a branch: a git repository (its project registered too when missing),
    /// or a fork of `from` (`branchId` or `branchId@versionId`) in the same, existing project.
    CreateBranch {
        project_id: String,
        branch_id: String,
        from: Option<String>,
    },
    /// Append one event to a branch stream.
    Append {
        project_id: String,
        branch_id: String,
        kind: String,
        data: Value,
    },
    /// Read events after `after`.
    ListEvents {
        project_id: String,
        branch_id: String,
        after: u64,
        limit: usize,
    },
    /// Create a local API token; the answer holds the secret (shown once).
    CreateToken {
        name: String,
    },
    ListTokens,
    RevokeToken {
        which: String,
    },
    /// One disk watermark pass: evict LRU branches (pushed and verified first) while the volume
    /// is at or above `MAX_VOLUME_USAGE_PERCENT`, until it is at `TARGET_VOLUME_USAGE_PERCENT`.
    Cleanup,
}

/// One answer line: what the request did, or why it failed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ControlResponse {
    Ok { result: ControlResult },
    Error { code: String, message: String },
}

/// What a request did: one variant per [`ControlRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlResult {
    Status(StatusReport),
    ProjectCreated {
        project_id: String,
    },
    BranchCreated(BranchCreated),
    Appended {
        id: u64,
    },
    Events {
        events: Vec<EventLine>,
    },
    TokenCreated {
        /// The secret, shown only now.
        token: String,
        name: String,
    },
    Tokens {
        tokens: Vec<TokenLine>,
    },
    TokenRevoked {
        revoked: usize,
    },
    Cleanup(CleanupSummary),
}

/// `weldr-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub mode: String,
    pub store: PathBuf,
    pub workspace_base: PathBuf,
    pub streams: usize,
    pub events: u64,
    pub subscribers: usize,
    pub uptime_seconds: u64,
    pub workers: Vec<WorkerStatus>,
}

/// One background worker, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub name: String,
    /// `busy`, `idle`, `backoff` (after an error) or `done`.
    pub state: String,
    pub last_error: Option<String>,
    pub errors: u64,
    pub consecutive_errors: u32,
    pub detail: Option<String>,
}

impl From<crate::worker::WorkerInfo> for WorkerStatus {
    fn from(w: crate::worker::WorkerInfo) -> Self {
        Self {
            name: w.name.into(),
            state: w.state.into(),
            last_error: w.last_error,
            errors: w.errors,
            consecutive_errors: w.consecutive_errors,
            detail: w.detail,
        }
    }
}

/// Whether `branch create` made the branch or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchCreateStatus {
    Created,
    /// Not on this machine, restored from object storage with its history.
    Restored,
    Reused,
}

impl BranchCreateStatus {
    /// As the original script printed it (`STATUS=created`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Restored => "restored",
            Self::Reused => "reused",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchCreated {
    pub status: BranchCreateStatus,
    pub branch_dir: PathBuf,
}

/// One stored event, as `events list` prints it (a JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLine {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// The event's payload, any JSON.
    pub data: Value,
}

/// A local API token as listed: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenLine {
    /// Enough of the token's hash to name it for `revoke`.
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
}

impl From<tokens::TokenInfo> for TokenLine {
    fn from(t: tokens::TokenInfo) -> Self {
        Self {
            id: t.id,
            name: t.name,
            created_at_ms: t.created_at_ms,
        }
    }
}

/// What one cleanup pass did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupSummary {
    /// The volume is under the maximum now.
    pub success: bool,
    pub usage_before: f64,
    pub usage_after: f64,
    pub max_usage_percent: u8,
    pub target_usage_percent: u8,
    pub evicted: Vec<BranchName>,
    /// Kept, and why (`active_workflow`, `subscribers`, `recently_used`, ...).
    pub skipped: Vec<(BranchName, String)>,
    /// Kept because evicting failed, and the error.
    pub failed: Vec<(BranchName, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchName {
    pub project_id: String,
    pub branch_id: String,
}

impl std::fmt::Display for BranchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project_id, self.branch_id)
    }
}

impl From<crate::evict::CleanupReport> for CleanupSummary {
    fn from(r: crate::evict::CleanupReport) -> Self {
        let name = |project_id: String, branch_id: String| BranchName {
            project_id,
            branch_id,
        };
        Self {
            success: r.status == crate::evict::PassStatus::Success,
            usage_before: r.usage_before,
            usage_after: r.usage_after,
            max_usage_percent: r.max_usage_percent,
            target_usage_percent: r.target_usage_percent,
            evicted: r
                .evicted
                .into_iter()
                .map(|b| name(b.project_id, b.branch_id))
                .collect(),
            skipped: r
                .skipped
                .into_iter()
                .map(|s| {
                    (
                        name(s.project_id, s.branch_id),
                        s.reason.as_str().to_string(),
                    )
                })
                .collect(),
            failed: r
                .failed
                .into_iter()
                .map(|f| (name(f.project_id, f.branch_id), f.error))
                .collect(),
        }
    }
}

/// Run one control request against an open app (the server's, or the CLI's own).
pub async fn execute(app: &App, request: ControlRequest) -> Result<ControlResult, ApiError> {
    match request {
        ControlRequest::Status => {
            let streams = app.base.read(list_streams).await?;
            let events: u64 = streams.iter().map(|(_, m)| m.next_id - m.first_id).sum();
            Ok(ControlResult::Status(StatusReport {
                mode: app.config.mode.as_str().into(),
                store: app.store.path().to_path_buf(),
                workspace_base: app.config.workspace_base.clone(),
                streams: streams.len(),
                events,
                subscribers: app.bus.total_subscribers(),
                uptime_seconds: app.started.elapsed().as_secs(),
                workers: app.workers.status().into_iter().map(Into::into).collect(),
            }))
        }
        ControlRequest::CreateProject { project_id, title } => {
            check_id("projectId", &project_id)?;
            let project = registry::create_project(&app.store, &project_id, title, None).await?;
            Ok(ControlResult::ProjectCreated {
                project_id: project.project_id,
            })
        }
        ControlRequest::CreateBranch {
            project_id,
            branch_id,
            from,
        } => {
            check_id("projectId", &project_id)?;
            check_id("branchId", &branch_id)?;
            let from = from.as_deref().map(parse_fork_source).transpose()?;
            let key = BranchKey::new(&project_id, &branch_id);
            // A failed command registers nothing. A fork's source is a branch of the same
            // project, so a fork never registers the project. A new repository does, once the
            // checks that can refuse it (this machine's project, disk space) have passed; only
            // an internal failure to initialise the repository leaves an empty project behind.
            if from.is_none() {
                branches::check_machine_project(&app.config, &project_id)?;
                app.residency.ensure_space().await?;
                match registry::create_project(&app.store, &project_id, None, None).await {
                    Ok(_) | Err(BranchError::ProjectExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let created = app.residency.create_branch(&key, from).await?;
            Ok(ControlResult::BranchCreated(BranchCreated {
                status: if created.created {
                    BranchCreateStatus::Created
                } else if created.adopted {
                    BranchCreateStatus::Restored
                } else {
                    BranchCreateStatus::Reused
                },
                branch_dir: created.dir,
            }))
        }
        ControlRequest::Append {
            project_id,
            branch_id,
            kind,
            data,
        } => {
            check_id("projectId", &project_id)?;
            check_id("branchId", &branch_id)?;
            let key = BranchKey::new(&project_id, &branch_id);
            registry::require_branch(&app.store, &key).await?;
            let event = app.base.emit(&key, &kind, data).await?;
            Ok(ControlResult::Appended { id: event.id })
        }
        ControlRequest::ListEvents {
            project_id,
            branch_id,
            after,
            limit,
        } => {
            check_id("projectId", &project_id)?;
            check_id("branchId", &branch_id)?;
            let branch = BranchKey::new(&project_id, &branch_id);
            registry::require_branch(&app.store, &branch).await?;
            let key = branch.stream();
            let limit = limit.clamp(1, 10_000);
            let events = app
                .base
                .read(move |rtx| {
                    let meta = read_meta(rtx, &key)?;
                    read_range(
                        rtx,
                        &key,
                        after.saturating_add(1).max(meta.first_id),
                        meta.last_id(),
                        limit,
                    )
                })
                .await?;
            let events = events
                .into_iter()
                .map(|e| EventLine {
                    data: serde_json::from_str(&e.data).unwrap_or(Value::Null),
                    id: e.id,
                    kind: e.kind.clone(),
                    timestamp: e.at_ms,
                })
                .collect();
            Ok(ControlResult::Events { events })
        }
        ControlRequest::CreateToken { name } => {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "invalid_name",
                    "a token name is 1-64 printable characters",
                ));
            }
            let token = tokens::create(&app.store, &name).await?;
            Ok(ControlResult::TokenCreated { token, name })
        }
        ControlRequest::ListTokens => {
            let list = app.store.read(tokens::list).await?;
            Ok(ControlResult::Tokens {
                tokens: list.into_iter().map(Into::into).collect(),
            })
        }
        ControlRequest::Cleanup => {
            let report = app.evictor.cleanup().await?;
            Ok(ControlResult::Cleanup(report.into()))
        }
        ControlRequest::RevokeToken { which } => {
            let revoked = tokens::revoke(&app.store, &which).await?;
            if revoked == 0 {
                return Err(ApiError::not_found(
                    "token_not_found",
                    format!("no token named or with id {which}"),
                ));
            }
            Ok(ControlResult::TokenRevoked { revoked })
        }
    }
}

/// `branchId` or `branchId@versionId`.
fn parse_fork_source(raw: &str) -> Result<branches::ForkFrom, ApiError> {
    let (branch_id, version) = match raw.split_once('@') {
        Some((b, v)) => (b, Some(parse_version_id(v)?)),
        None => (raw, None),
    };
    check_id("--from branch", branch_id)?;
    Ok(branches::ForkFrom {
        branch_id: branch_id.to_string(),
        version,
    })
}

pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ControlServer {
    pub async fn start(app: Arc<App>) -> std::io::Result<Self> {
        let path = app.config.control_socket_path();
        if path.exists() {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another server answers on {}", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        set_owner_only(&path)?;
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        continue;
                    }
                };
                let app = app.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(app, stream).await {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
        });
        Ok(Self { path, task })
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(unix)]
fn set_owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

async fn serve_connection(app: Arc<App>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::io::AsyncReadExt::take(&mut lines, MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = match serde_json::from_str::<ControlRequest>(&line) {
            Ok(request) => match execute(&app, request).await {
                Ok(result) => ControlResponse::Ok { result },
                Err(e) => ControlResponse::Error {
                    code: e.code.into(),
                    message: e.message,
                },
            },
            Err(e) => ControlResponse::Error {
                code: "bad_request".into(),
                message: e.to_string(),
            },
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}

/// A connection to a running server's control socket.
pub struct ControlClient {
    lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        Ok(Self {
            lines: BufReader::new(read),
            write,
        })
    }

    pub async fn call(&mut self, request: &ControlRequest) -> anyhow::Result<ControlResult> {
        let mut out = serde_json::to_vec(request)?;
        out.push(b'\n');
        self.write.write_all(&out).await?;
        let mut line = String::new();
        if self.lines.read_line(&mut line).await? == 0 {
            anyhow::bail!("the server closed the control connection (is it shutting down?)");
        }
        match serde_json::from_str(&line)? {
            ControlResponse::Ok { result } => Ok(result),
            ControlResponse::Error { code, message } => anyhow::bail!("{message} ({code})"),
        }
    }
}
