//! Every setting, read from the environment in one place, with the seed's names and defaults.
//! An invalid value stops startup with a message that names the variable.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Desktop / local development: `~/.weldr/{projectId}/{branchId}`, many projects.
    Local,
    /// A Fly machine: `/workspace/{branchId}`, one project (`PROJECT_ID`).
    Cloud,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Cloud => "cloud",
        }
    }
}

/// A secret value: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// How commands are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// bubblewrap; commands fail when it cannot run.
    Bwrap,
    /// No isolation at all (`SANDBOX=off`, an explicit operator choice).
    Off,
}

/// The sandbox's settings (`SANDBOX*` settings).
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub mode: SandboxMode,
    /// Whether commands reach the network (`SANDBOX_NETWORK`).
    pub network: bool,
    /// The uid (and gid) commands run as when the server is root.
    pub uid: u32,
    /// Most data memory one process may map (`RLIMIT_DATA`), in MiB.
    pub memory_mb: u64,
    /// Most processes of the sandbox uid at once (`RLIMIT_NPROC`; only with the dedicated uid,
    /// where the count is the sandboxes' own).
    pub max_processes: u64,
    /// Size of the private `/tmp`, in MiB.
    pub tmp_mb: u64,
    /// The bubblewrap program (found on `PATH` by default).
    pub program: PathBuf,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Bwrap,
            network: true,
            uid: 61000,
            memory_mb: 4096,
            max_processes: 1024,
            tmp_mb: 512,
            program: PathBuf::from("bwrap"),
        }
    }
}

/// Is `name` a safe SQL identifier (optionally schema-qualified)?
pub fn is_sql_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.split('.').count() <= 2
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !part.as_bytes()[0].is_ascii_digit()
        })
}

/// Table names of the Better Auth schema (plural, as the original app configured it).
#[derive(Debug, Clone)]
pub struct AuthTables {
    pub sessions: String,
    pub users: String,
    pub projects: String,
}

impl Default for AuthTables {
    fn default() -> Self {
        Self {
            sessions: "sessions".into(),
            users: "users".into(),
            projects: "projects".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    /// One shared bucket with `{projectId}/{branchId}/` prefixes; None = bucket per branch.
    pub bucket: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ProviderKeys {
    pub anthropic_api_key: Option<Secret>,
    pub openai_api_key: Option<Secret>,
    pub gemini_api_key: Option<Secret>,
    pub anthropic_base_url: Option<String>,
    pub openai_base_url: Option<String>,
    pub gemini_base_url: Option<String>,
    pub ollama_base_url: String,
    /// `provider:model`, e.g. `anthropic:claude-sonnet-4-5`.
    pub default_model: String,
    /// Most output tokens of one model turn, overriding the per-model table
    /// (`WELDR_MAX_OUTPUT_TOKENS`).
    pub max_output_tokens: Option<u32>,
    /// `openai:` models go through the Responses API (`OPENAI_API=responses`), else Chat
    /// Completions (`chat`, for gateways without `/responses`).
    pub openai_responses: bool,
    /// `replay:<path>` models are played only from transcripts inside this directory
    /// (`REPLAY_DIR`); None: the replay provider is refused, so no request can make the server
    /// read a file of its choosing.
    pub replay_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub host: IpAddr,
    pub port: u16,
    pub cors_origins: Vec<String>,
    pub workspace_base: PathBuf,
    /// Where the redb store and the control socket live.
    pub data_dir: PathBuf,
    pub project_id: Option<String>,
    pub object_store_dir: PathBuf,
    pub s3: S3Config,
    pub database_url: Option<Secret>,
    pub redis_url: Option<Secret>,
    pub better_auth_secret: Option<Secret>,
    pub providers: ProviderKeys,
    pub max_volume_usage_percent: u8,
    pub target_volume_usage_percent: u8,
    pub eviction_grace: Duration,
    /// How often the disk watermark loop looks at the volume; zero turns the loop off.
    pub eviction_interval: Duration,
    /// A dirty branch is pushed once no change was seen for this long.
    pub sync_quiet: Duration,
    pub log_level: String,
    /// Events kept per branch stream.
    pub event_retention: u64,
    /// Bytes of encoded event frames kept in memory for subscribers that catch up (0: none).
    pub event_cache_bytes: usize,
    /// Batches that only append events are made durable by the store's append log (one
    /// sequential write); false: every batch is a durable redb commit.
    pub append_log: bool,
    /// How long shutdown may take before open work is abandoned (below Fly's kill timeout).
    pub shutdown_timeout: Duration,
    pub sse_heartbeat: Duration,
    /// Better Auth cookie prefix (`<prefix>.session_token`).
    pub auth_cookie_prefix: String,
    pub auth_tables: AuthTables,
    /// Open SSE streams allowed per user.
    pub sse_max_per_user: usize,
    /// `/trigger` calls allowed per user per minute.
    pub trigger_rate_per_minute: u32,
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    /// Workflows running at once across branches; more queue.
    pub workflow_concurrency: usize,
    /// TLS certificate chain and key (PEM); both or neither.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Fork at a parent's head as copy-on-write layers (overlayfs) where the system can mount
    /// them; false: always copy.
    pub fork_layers: bool,
    /// How the agent's commands are isolated.
    pub sandbox: SandboxSettings,
    /// Open HTTP connections served at once (`MAX_CONNECTIONS`); more are refused at accept,
    /// with a few more kept for `/health`. None: derived from the file descriptor limit.
    pub max_connections: Option<usize>,
    /// A connection that has not sent a complete request head within this is closed
    /// (`REQUEST_HEAD_TIMEOUT_SECONDS`).
    pub request_head_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub message: String,
}

/// The table printed in the README: (variable, default, meaning).
pub const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "WELDR_MODE",
        "local (cloud if NODE_ENV=production)",
        "`local` or `cloud`",
    ),
    (
        "HOST",
        "127.0.0.1 local, 0.0.0.0 cloud",
        "address to listen on",
    ),
    ("PORT", "8080", "HTTP port"),
    (
        "CORS_ORIGIN",
        "http://localhost:3000",
        "allowed origins, comma-separated",
    ),
    (
        "WORKSPACE_BASE",
        "~/.weldr local, /workspace cloud",
        "branch directories live here",
    ),
    (
        "WELDR_DATA_DIR",
        "$WORKSPACE_BASE/.weldr-agent",
        "redb store and control socket",
    ),
    (
        "PROJECT_ID",
        "-",
        "the machine's project (required in cloud mode)",
    ),
    (
        "WELDR_OBJECT_STORE_DIR",
        "$WORKSPACE_BASE/.weldr-objects",
        "fs object store (local mode, no S3_*)",
    ),
    (
        "S3_ENDPOINT",
        "https://t3.storage.dev local, https://fly.storage.tigris.dev cloud",
        "S3 endpoint",
    ),
    ("S3_REGION", "auto", "S3 region"),
    (
        "S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY",
        "-",
        "S3 credentials (never read from ~/.aws)",
    ),
    (
        "S3_BUCKET",
        "-",
        "one shared bucket; default is a bucket per branch",
    ),
    (
        "DATABASE_URL",
        "-",
        "Postgres mirror and Better Auth sessions (optional)",
    ),
    ("REDIS_URL", "-", "Redis mirror (optional)"),
    (
        "BETTER_AUTH_SECRET",
        "-",
        "verifies Better Auth session cookies",
    ),
    (
        "WELDR_MODEL",
        "anthropic:claude-sonnet-4-5",
        "default model, `provider:model`",
    ),
    (
        "ANTHROPIC_API_KEY / OPENAI_API_KEY / GEMINI_API_KEY",
        "-",
        "provider keys",
    ),
    (
        "ANTHROPIC_BASE_URL / OPENAI_BASE_URL / GEMINI_BASE_URL",
        "provider default",
        "provider endpoints",
    ),
    (
        "OLLAMA_BASE_URL",
        "http://127.0.0.1:11434/v1",
        "OpenAI-compatible local server",
    ),
    (
        "MAX_VOLUME_USAGE_PERCENT",
        "85",
        "eviction starts at this disk usage",
    ),
    (
        "TARGET_VOLUME_USAGE_PERCENT",
        "70",
        "eviction stops at this disk usage",
    ),
    (
        "EVICTION_GRACE_SECONDS",
        "300",
        "recently used branches are never evicted",
    ),
    (
        "EVICTION_INTERVAL_SECONDS",
        "30",
        "how often the disk watermark loop runs (0: never; `weldr-agent cleanup` still works)",
    ),
    (
        "SYNC_QUIET_SECONDS",
        "30",
        "a changed branch is pushed after this long without further changes (and after each version)",
    ),
    ("EVENT_RETENTION", "50000", "events kept per branch stream"),
    (
        "EVENT_CACHE_MB",
        "32",
        "memory for encoded blocks of older events that resuming clients share (0: off)",
    ),
    (
        "APPEND_LOG",
        "on",
        "`on`: event appends are made durable by one sequential synced write to `state.redb.wal`, redb catches up at checkpoints; `off`: every write is a durable redb commit",
    ),
    (
        "SHUTDOWN_TIMEOUT_SECONDS",
        "20",
        "graceful shutdown budget (Fly kill timeout is 30)",
    ),
    (
        "LOG_LEVEL",
        "info",
        "tracing filter, e.g. `debug` or `weldr_agent=debug`",
    ),
    ("AUTH_COOKIE_PREFIX", "weldr", "Better Auth cookie prefix"),
    (
        "AUTH_SESSIONS_TABLE / AUTH_USERS_TABLE / AUTH_PROJECTS_TABLE",
        "sessions / users / projects",
        "Better Auth tables in Postgres",
    ),
    ("SSE_MAX_PER_USER", "32", "open SSE streams per user"),
    (
        "MAX_CONNECTIONS",
        "3/4 of the file descriptor limit",
        "open HTTP connections at once; more are refused at accept (a few more are kept for /health)",
    ),
    (
        "REQUEST_HEAD_TIMEOUT_SECONDS",
        "10",
        "a connection that has not sent a complete request head within this is closed",
    ),
    (
        "REPLAY_DIR",
        "-",
        "`replay:<path>` models play transcripts only from inside this directory; unset: refused",
    ),
    (
        "TRIGGER_RATE_PER_MINUTE",
        "20",
        "`/trigger` calls per user per minute",
    ),
    ("MAX_BODY_BYTES", "1048576", "largest JSON request body"),
    (
        "FORK_MODE",
        "layers",
        "`layers`: forks at a head are copy-on-write overlayfs layers where the kernel lets us mount (root), else copies; `copy`: always copy",
    ),
    (
        "WORKFLOW_CONCURRENCY",
        "4",
        "workflows running at once across branches (more queue)",
    ),
    (
        "TLS_CERT_PATH / TLS_KEY_PATH",
        "-",
        "serve HTTPS with this PEM certificate chain and key",
    ),
    (
        "OPENAI_API",
        "responses",
        "how `openai:` models are spoken to: `responses` (OpenAI's Responses API, reasoning kept between tool calls) or `chat` (Chat Completions, for gateways without `/responses`)",
    ),
    (
        "WELDR_MAX_OUTPUT_TOKENS",
        "per model",
        "most output tokens of one model turn; a turn cut off at its limit is asked again with twice the limit up to this (default: the model's documented maximum, 8192 for unknown and local models)",
    ),
    (
        "SANDBOX",
        "bwrap",
        "`bwrap`: the agent's commands (run_command, the build) run in a bubblewrap sandbox and fail with a clear message where it cannot run; `off`: unconfined, as the server (shown in `/health` and the startup log)",
    ),
    (
        "SANDBOX_NETWORK",
        "on",
        "`on`: sandboxed commands reach the network (package registries); `off`: only their own loopback",
    ),
    (
        "SANDBOX_UID",
        "61000",
        "uid and gid sandboxed commands run as when the server is root (the branch directories' files are handed to it)",
    ),
    (
        "SANDBOX_MEMORY_MB",
        "4096",
        "most data memory one sandboxed process may map (RLIMIT_DATA)",
    ),
    (
        "SANDBOX_MAX_PROCESSES",
        "1024",
        "most processes of the sandbox uid at once (RLIMIT_NPROC; when the server is root)",
    ),
    (
        "SANDBOX_TMP_MB",
        "512",
        "size of a sandboxed command's private /tmp (memory)",
    ),
];

struct Env<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// The variable's value; empty counts as unset.
    fn var(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        self.var(name).map(Secret)
    }

    /// A setting that is one of two words: true for `yes`, false for `no`, `default` unset.
    fn switch(
        &self,
        name: &'static str,
        yes: &str,
        no: &str,
        default: bool,
    ) -> Result<bool, ConfigError> {
        match self.var(name) {
            None => Ok(default),
            Some(v) if v == yes => Ok(true),
            Some(v) if v == no => Ok(false),
            Some(other) => Err(ConfigError {
                var: name,
                value: other,
                message: format!("expected `{yes}` or `{no}`"),
            }),
        }
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.var(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| ConfigError {
                var: name,
                value: v.clone(),
                message: format!("expected {what} ({e})"),
            }),
        }
    }
}

fn percent(env: &Env, name: &'static str, default: u8) -> Result<u8, ConfigError> {
    let v: u8 = env.parse(name, default, "a whole percentage 1-100")?;
    if !(1..=100).contains(&v) {
        return Err(ConfigError {
            var: name,
            value: v.to_string(),
            message: "expected 1-100".into(),
        });
    }
    Ok(v)
}

fn sandbox_settings(env: &Env) -> Result<SandboxSettings, ConfigError> {
    let d = SandboxSettings::default();
    let uid: u32 = env.parse("SANDBOX_UID", d.uid, "a uid")?;
    if uid == 0 {
        return Err(ConfigError {
            var: "SANDBOX_UID",
            value: "0".into(),
            message: "the sandbox must not run as root".into(),
        });
    }
    Ok(SandboxSettings {
        mode: if env.switch("SANDBOX", "bwrap", "off", true)? {
            SandboxMode::Bwrap
        } else {
            SandboxMode::Off
        },
        network: env.switch("SANDBOX_NETWORK", "on", "off", d.network)?,
        uid,
        memory_mb: env
            .parse("SANDBOX_MEMORY_MB", d.memory_mb, "a number of MiB")?
            .max(64),
        max_processes: env
            .parse(
                "SANDBOX_MAX_PROCESSES",
                d.max_processes,
                "a number of processes",
            )?
            .max(16),
        tmp_mb: env
            .parse("SANDBOX_TMP_MB", d.tmp_mb, "a number of MiB")?
            .max(1),
        program: d.program,
    })
}

fn sql_table(env: &Env, name: &'static str, default: &str) -> Result<String, ConfigError> {
    let value = env.var(name).unwrap_or_else(|| default.to_string());
    if !is_sql_identifier(&value) {
        return Err(ConfigError {
            var: name,
            value,
            message: "expected a table name like `sessions` or `auth.sessions`".into(),
        });
    }
    Ok(value)
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Read from a map (tests).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| map.get(k).cloned())
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { get };
        let mode = match env.var("WELDR_MODE").as_deref() {
            Some("local") => Mode::Local,
            Some("cloud") => Mode::Cloud,
            Some(other) => {
                return Err(ConfigError {
                    var: "WELDR_MODE",
                    value: other.into(),
                    message: "expected `local` or `cloud`".into(),
                });
            }
            None => match env.var("NODE_ENV").as_deref() {
                Some("production") => Mode::Cloud,
                _ => Mode::Local,
            },
        };
        let default_host: IpAddr = match mode {
            Mode::Local => [127, 0, 0, 1].into(),
            Mode::Cloud => [0, 0, 0, 0].into(),
        };
        let host = env.parse("HOST", default_host, "an IP address")?;
        let port = env.parse("PORT", 8080u16, "a TCP port 0-65535")?;
        let cors_origins = env
            .var("CORS_ORIGIN")
            .unwrap_or_else(|| "http://localhost:3000".into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let workspace_base = match env.var("WORKSPACE_BASE") {
            Some(p) => expand_home(&p),
            None => match mode {
                Mode::Local => home_dir().join(".weldr"),
                Mode::Cloud => PathBuf::from("/workspace"),
            },
        };
        if !workspace_base.is_absolute() {
            return Err(ConfigError {
                var: "WORKSPACE_BASE",
                value: workspace_base.display().to_string(),
                message: "expected an absolute path".into(),
            });
        }
        let data_dir = env
            .var("WELDR_DATA_DIR")
            .map(|p| expand_home(&p))
            .unwrap_or_else(|| workspace_base.join(".weldr-agent"));
        let object_store_dir = env
            .var("WELDR_OBJECT_STORE_DIR")
            .map(|p| expand_home(&p))
            .unwrap_or_else(|| workspace_base.join(".weldr-objects"));
        let project_id = env.var("PROJECT_ID");
        if let Some(p) = &project_id
            && !crate::ids::is_valid_id(p)
        {
            return Err(ConfigError {
                var: "PROJECT_ID",
                value: p.clone(),
                message: "expected 1-64 characters of A-Z, a-z, 0-9, '_' or '-'".into(),
            });
        }
        if mode == Mode::Cloud && project_id.is_none() {
            return Err(ConfigError {
                var: "PROJECT_ID",
                value: String::new(),
                message: "required in cloud mode (one project per machine)".into(),
            });
        }
        let s3 = S3Config {
            endpoint: env.var("S3_ENDPOINT").unwrap_or_else(|| match mode {
                Mode::Local => "https://t3.storage.dev".into(),
                Mode::Cloud => "https://fly.storage.tigris.dev".into(),
            }),
            region: env.var("S3_REGION").unwrap_or_else(|| "auto".into()),
            access_key_id: env.secret("S3_ACCESS_KEY_ID"),
            secret_access_key: env.secret("S3_SECRET_ACCESS_KEY"),
            bucket: env.var("S3_BUCKET"),
        };
        let max = percent(&env, "MAX_VOLUME_USAGE_PERCENT", 85)?;
        let target = percent(&env, "TARGET_VOLUME_USAGE_PERCENT", 70)?;
        if target >= max {
            return Err(ConfigError {
                var: "TARGET_VOLUME_USAGE_PERCENT",
                value: target.to_string(),
                message: format!("must be below MAX_VOLUME_USAGE_PERCENT ({max})"),
            });
        }
        let event_retention: u64 =
            env.parse("EVENT_RETENTION", 50_000, "a positive number of events")?;
        if event_retention == 0 {
            return Err(ConfigError {
                var: "EVENT_RETENTION",
                value: "0".into(),
                message: "expected at least 1".into(),
            });
        }
        let default_model = env
            .var("WELDR_MODEL")
            .unwrap_or_else(|| "anthropic:claude-sonnet-4-5".into());
        if !default_model.contains(':') {
            return Err(ConfigError {
                var: "WELDR_MODEL",
                value: default_model,
                message: "expected `provider:model`, e.g. `openai:gpt-4.1`".into(),
            });
        }
        Ok(Config {
            mode,
            host,
            port,
            cors_origins,
            workspace_base,
            data_dir,
            project_id,
            object_store_dir,
            s3,
            database_url: env.secret("DATABASE_URL"),
            redis_url: env.secret("REDIS_URL"),
            better_auth_secret: env.secret("BETTER_AUTH_SECRET"),
            providers: ProviderKeys {
                anthropic_api_key: env.secret("ANTHROPIC_API_KEY"),
                openai_api_key: env.secret("OPENAI_API_KEY"),
                gemini_api_key: env.secret("GEMINI_API_KEY"),
                anthropic_base_url: env.var("ANTHROPIC_BASE_URL"),
                openai_base_url: env.var("OPENAI_BASE_URL"),
                gemini_base_url: env.var("GEMINI_BASE_URL"),
                ollama_base_url: env
                    .var("OLLAMA_BASE_URL")
                    .unwrap_or_else(|| "http://127.0.0.1:11434/v1".into()),
                default_model,
                openai_responses: env.switch("OPENAI_API", "responses", "chat", true)?,
                replay_dir: env.var("REPLAY_DIR").map(|p| expand_home(&p)),
                max_output_tokens: match env.var("WELDR_MAX_OUTPUT_TOKENS") {
                    None => None,
                    Some(_) => Some(
                        env.parse("WELDR_MAX_OUTPUT_TOKENS", 0u32, "a number of tokens")?
                            .max(256),
                    ),
                },
            },
            max_volume_usage_percent: max,
            target_volume_usage_percent: target,
            eviction_grace: Duration::from_secs(env.parse(
                "EVICTION_GRACE_SECONDS",
                300u64,
                "seconds",
            )?),
            eviction_interval: Duration::from_secs(env.parse(
                "EVICTION_INTERVAL_SECONDS",
                30u64,
                "seconds",
            )?),
            sync_quiet: Duration::from_secs(
                env.parse("SYNC_QUIET_SECONDS", 30u64, "seconds")?.max(1),
            ),
            log_level: env.var("LOG_LEVEL").unwrap_or_else(|| "info".into()),
            event_retention,
            event_cache_bytes: (env.parse::<u32>("EVENT_CACHE_MB", 32, "a number of MiB")?
                as usize)
                .saturating_mul(1 << 20),
            append_log: env.switch("APPEND_LOG", "on", "off", true)?,
            shutdown_timeout: Duration::from_secs(env.parse(
                "SHUTDOWN_TIMEOUT_SECONDS",
                20u64,
                "seconds",
            )?),
            sse_heartbeat: Duration::from_secs(15),
            auth_cookie_prefix: env
                .var("AUTH_COOKIE_PREFIX")
                .unwrap_or_else(|| "weldr".into()),
            auth_tables: AuthTables {
                sessions: sql_table(&env, "AUTH_SESSIONS_TABLE", "sessions")?,
                users: sql_table(&env, "AUTH_USERS_TABLE", "users")?,
                projects: sql_table(&env, "AUTH_PROJECTS_TABLE", "projects")?,
            },
            sse_max_per_user: env
                .parse("SSE_MAX_PER_USER", 32usize, "a number of streams")?
                .max(1),
            trigger_rate_per_minute: env
                .parse("TRIGGER_RATE_PER_MINUTE", 20u32, "a number per minute")?
                .max(1),
            max_body_bytes: env
                .parse("MAX_BODY_BYTES", 1usize << 20, "a number of bytes")?
                .max(1024),
            workflow_concurrency: env
                .parse("WORKFLOW_CONCURRENCY", 4usize, "a number of workflows")?
                .max(1),
            fork_layers: env.switch("FORK_MODE", "layers", "copy", true)?,
            sandbox: sandbox_settings(&env)?,
            max_connections: match env.var("MAX_CONNECTIONS") {
                None => None,
                Some(_) => Some(
                    env.parse("MAX_CONNECTIONS", 0usize, "a number of connections")?
                        .max(1),
                ),
            },
            request_head_timeout: Duration::from_secs(
                env.parse("REQUEST_HEAD_TIMEOUT_SECONDS", 10u64, "seconds")?
                    .max(1),
            ),
            tls: match (env.var("TLS_CERT_PATH"), env.var("TLS_KEY_PATH")) {
                (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(ConfigError {
                        var: "TLS_KEY_PATH",
                        value: String::new(),
                        message: "required with TLS_CERT_PATH".into(),
                    });
                }
                (None, Some(_)) => {
                    return Err(ConfigError {
                        var: "TLS_CERT_PATH",
                        value: String::new(),
                        message: "required with TLS_KEY_PATH".into(),
                    });
                }
            },
        })
    }

    /// A config for tests and embedding: local mode rooted at `base`.
    pub fn for_workspace(base: &std::path::Path) -> Self {
        let base = base.to_string_lossy().into_owned();
        Self::from_lookup(&|k| match k {
            "WELDR_MODE" => Some("local".into()),
            "WORKSPACE_BASE" => Some(base.clone()),
            "PORT" => Some("0".into()),
            _ => None,
        })
        .expect("the test configuration is valid")
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("state.redb")
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }
}

fn expand_home(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if p == "~" => home_dir(),
        None => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration table names every setting (it is the user's reference).
    #[test]
    fn the_readme_table_names_every_setting() {
        let readme = include_str!("../README.md");
        let table = &readme[readme.find("## Configuration").unwrap()..];
        let table = &table[..table.find("\n## ").unwrap_or(table.len())];
        for (vars, _, _) in SETTINGS {
            for var in vars.split(" / ") {
                assert!(
                    table.contains(&format!("`{var}`")),
                    "README's configuration table lacks {var}"
                );
            }
        }
    }

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_map(&map)
    }

    #[test]
    fn defaults_follow_the_seed() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.mode, Mode::Local);
        assert_eq!(c.port, 8080);
        assert_eq!(c.cors_origins, vec!["http://localhost:3000"]);
        assert!(c.workspace_base.ends_with(".weldr"));
        assert_eq!(
            (c.max_volume_usage_percent, c.target_volume_usage_percent),
            (85, 70)
        );
        assert_eq!(c.s3.region, "auto");
        assert!(c.append_log);
        assert!(!cfg(&[("APPEND_LOG", "off")]).unwrap().append_log);
        let cloud = cfg(&[("WELDR_MODE", "cloud"), ("PROJECT_ID", "p1")]).unwrap();
        assert_eq!(cloud.workspace_base, PathBuf::from("/workspace"));
        assert_eq!(cloud.s3.endpoint, "https://fly.storage.tigris.dev");
        assert_eq!(
            cfg(&[("NODE_ENV", "development")]).unwrap().mode,
            Mode::Local
        );
    }

    #[test]
    fn invalid_values_name_the_variable() {
        for (pairs, var) in [
            (vec![("PORT", "eighty")], "PORT"),
            (vec![("WELDR_MODE", "space")], "WELDR_MODE"),
            (vec![("WELDR_MODE", "cloud")], "PROJECT_ID"),
            (
                vec![("MAX_VOLUME_USAGE_PERCENT", "150")],
                "MAX_VOLUME_USAGE_PERCENT",
            ),
            (
                vec![("TARGET_VOLUME_USAGE_PERCENT", "90")],
                "TARGET_VOLUME_USAGE_PERCENT",
            ),
            (vec![("WORKSPACE_BASE", "relative/path")], "WORKSPACE_BASE"),
            (vec![("PROJECT_ID", "../etc")], "PROJECT_ID"),
            (vec![("EVENT_RETENTION", "0")], "EVENT_RETENTION"),
            (vec![("FORK_MODE", "overlay")], "FORK_MODE"),
            (vec![("APPEND_LOG", "yes")], "APPEND_LOG"),
        ] {
            let err = cfg(&pairs).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let c = cfg(&[
            ("BETTER_AUTH_SECRET", "hunter2"),
            ("ANTHROPIC_API_KEY", "sk-x"),
        ])
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("sk-x"));
    }
}
