//! Every setting, read from the environment in one place, with the seed's names and defaults.
//! An invalid value stops startup with a message that names the variable.
//!
//! [`SETTINGS`] is the one table of settings: each names its variable, what it is when unset
//! (written only there), the parser that reads and checks a value, and what it does.
//! [`Config::from_lookup`] reads through it, `weldr-agent config` prints it, and
//! `tests/config_table.rs` checks the README's table against it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
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

/// The continuous backup of the store (`STORE_BACKUP*` settings).
#[derive(Debug, Clone)]
pub struct StoreBackupSettings {
    pub enabled: bool,
    /// Longest wait between a durable commit and shipping it.
    pub interval: Duration,
    /// A new full copy (generation) after this long with changes.
    pub full_every: Duration,
    /// Generations kept (each a full copy and its increments).
    pub keep: usize,
    /// The bucket used when branches have a bucket each (no `S3_BUCKET`).
    pub bucket: String,
}

/// The upstream mirrors (`MIRROR*` settings, `DATABASE_URL`, `REDIS_URL`).
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// Postgres to mirror into (`DATABASE_URL` unless `MIRROR_POSTGRES=off`).
    pub postgres_url: Option<Secret>,
    pub redis_url: Option<Secret>,
    /// The Postgres schema the mirror owns.
    pub schema: String,
    /// Also mirror events into Postgres (Redis always gets them).
    pub events: bool,
    /// Outbox entries kept for a sink that does not keep up; beyond, the oldest are dropped.
    pub max_backlog: u64,
}

impl MirrorSettings {
    pub fn any(&self) -> bool {
        self.postgres_url.is_some() || self.redis_url.is_some()
    }
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
    /// The settings table's defaults.
    fn default() -> Self {
        sandbox_settings(&Env::empty()).expect("the table's sandbox defaults parse (tested)")
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
    /// The settings table's defaults.
    fn default() -> Self {
        auth_tables(&Env::empty()).expect("the table's auth table defaults parse (tested)")
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
    /// The context window a request must fit in, overriding the per-model table
    /// (`WELDR_CONTEXT_TOKENS`).
    pub context_tokens: Option<u32>,
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
    /// PEM roots for `rediss://` instead of the system's.
    pub redis_ca_file: Option<PathBuf>,
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
    pub store_backup: StoreBackupSettings,
    pub mirror: MirrorSettings,
    /// `DATABASE_URL` for the generated app's `.env` (local mode).
    pub integration_database_url: String,
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
    /// Largest attachment; a message's attachments together take at most twice this.
    pub attachment_max_bytes: usize,
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

/// What a setting is when its variable is unset (or empty). Written only in the table below:
/// `from_lookup`, `weldr-agent config` and the README check all read it from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnset {
    /// No value: the feature is off (or, where the code says so, the setting is required).
    Nothing,
    /// This value, read by the setting's parser as if it had been set.
    Value(&'static str),
    /// A value per mode, read by the setting's parser.
    ByMode {
        local: &'static str,
        cloud: &'static str,
    },
    /// `production` when `NODE_ENV=production`, else `otherwise` (how the seed picks the mode).
    NodeEnv {
        production: &'static str,
        otherwise: &'static str,
    },
    /// This directory inside `WORKSPACE_BASE`.
    InWorkspace(&'static str),
    /// No value here: the code that uses the setting chooses (the text says how).
    Elsewhere(&'static str),
}

impl WhenUnset {
    /// As `weldr-agent config` prints it and the README's table shows it (without markup).
    pub fn text(&self) -> String {
        match *self {
            WhenUnset::Nothing => "-".into(),
            WhenUnset::Value(v) => v.into(),
            WhenUnset::ByMode { local, cloud } => format!("{local} local, {cloud} cloud"),
            WhenUnset::NodeEnv {
                production,
                otherwise,
            } => format!("{otherwise} ({production} if NODE_ENV=production)"),
            WhenUnset::InWorkspace(dir) => format!("$WORKSPACE_BASE/{dir}"),
            WhenUnset::Elsewhere(text) => text.into(),
        }
    }

    /// The values it can take that a parser reads.
    fn values(&self) -> Vec<&'static str> {
        match *self {
            WhenUnset::Value(v) => vec![v],
            WhenUnset::ByMode { local, cloud } => vec![local, cloud],
            WhenUnset::NodeEnv {
                production,
                otherwise,
            } => vec![production, otherwise],
            WhenUnset::Nothing | WhenUnset::InWorkspace(_) | WhenUnset::Elsewhere(_) => vec![],
        }
    }
}

/// One setting: its variable, what it is when unset, how a value is read and checked, and
/// what it does.
struct Setting<T> {
    var: &'static str,
    unset: WhenUnset,
    /// Reads a value (trimmed, never empty); the error says what was expected.
    parse: fn(&str) -> Result<T, String>,
    meaning: &'static str,
}

/// A setting of any type, as the table lists it.
pub trait Listed: Sync {
    fn var(&self) -> &'static str;
    fn unset(&self) -> WhenUnset;
    fn meaning(&self) -> &'static str;
    /// Read every value the setting takes when unset as if it had been set (its parser
    /// must accept them all).
    fn check_unset(&self) -> Result<(), String>;
}

impl<T> Listed for Setting<T> {
    fn var(&self) -> &'static str {
        self.var
    }

    fn unset(&self) -> WhenUnset {
        self.unset
    }

    fn meaning(&self) -> &'static str {
        self.meaning
    }

    fn check_unset(&self) -> Result<(), String> {
        for v in self.unset.values() {
            (self.parse)(v).map_err(|e| format!("{}: default {v:?}: {e}", self.var))?;
        }
        Ok(())
    }
}

// The parsers. Each gets the trimmed, non-empty value and says what it expected.

fn text(v: &str) -> Result<String, String> {
    Ok(v.to_string())
}

fn secret(v: &str) -> Result<Secret, String> {
    Ok(Secret(v.to_string()))
}

/// A path; a leading `~` is the home directory.
fn path(v: &str) -> Result<PathBuf, String> {
    Ok(expand_home(v))
}

fn number<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e| format!("expected {what} ({e})"))
}

fn seconds(v: &str) -> Result<Duration, String> {
    number(v, "seconds").map(Duration::from_secs)
}

/// One of two words: true for `yes`, false for `no`.
fn switch(v: &str, yes: &str, no: &str) -> Result<bool, String> {
    match v {
        _ if v == yes => Ok(true),
        _ if v == no => Ok(false),
        _ => Err(format!("expected `{yes}` or `{no}`")),
    }
}

fn percent(v: &str) -> Result<u8, String> {
    let p: u8 = number(v, "a whole percentage 1-100")?;
    if !(1..=100).contains(&p) {
        return Err("expected 1-100".into());
    }
    Ok(p)
}

fn sql_table(v: &str) -> Result<String, String> {
    if !is_sql_identifier(v) {
        return Err("expected a table name like `sessions` or `auth.sessions`".into());
    }
    Ok(v.to_string())
}

const WELDR_MODE: Setting<Mode> = Setting {
    var: "WELDR_MODE",
    unset: WhenUnset::NodeEnv {
        production: "cloud",
        otherwise: "local",
    },
    parse: |v| match v {
        "local" => Ok(Mode::Local),
        "cloud" => Ok(Mode::Cloud),
        _ => Err("expected `local` or `cloud`".into()),
    },
    meaning: "`local` or `cloud`",
};
const HOST: Setting<IpAddr> = Setting {
    var: "HOST",
    unset: WhenUnset::ByMode {
        local: "127.0.0.1",
        cloud: "0.0.0.0",
    },
    parse: |v| number(v, "an IP address"),
    meaning: "address to listen on",
};
const PORT: Setting<u16> = Setting {
    var: "PORT",
    unset: WhenUnset::Value("8080"),
    parse: |v| number(v, "a TCP port 0-65535"),
    meaning: "HTTP port",
};
const CORS_ORIGIN: Setting<Vec<String>> = Setting {
    var: "CORS_ORIGIN",
    unset: WhenUnset::Value("http://localhost:3000"),
    parse: |v| {
        Ok(v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    },
    meaning: "allowed origins, comma-separated",
};
const WORKSPACE_BASE: Setting<PathBuf> = Setting {
    var: "WORKSPACE_BASE",
    unset: WhenUnset::ByMode {
        local: "~/.weldr",
        cloud: "/workspace",
    },
    parse: |v| {
        let p = expand_home(v);
        if !p.is_absolute() {
            return Err("expected an absolute path".into());
        }
        Ok(p)
    },
    meaning: "branch directories live here",
};
const WELDR_DATA_DIR: Setting<PathBuf> = Setting {
    var: "WELDR_DATA_DIR",
    unset: WhenUnset::InWorkspace(".weldr-agent"),
    parse: path,
    meaning: "redb store and control socket",
};
const PROJECT_ID: Setting<String> = Setting {
    var: "PROJECT_ID",
    unset: WhenUnset::Nothing,
    parse: |v| {
        if !crate::ids::is_valid_id(v) {
            return Err("expected 1-64 characters of A-Z, a-z, 0-9, '_' or '-'".into());
        }
        Ok(v.to_string())
    },
    meaning: "the machine's project (required in cloud mode)",
};
const WELDR_OBJECT_STORE_DIR: Setting<PathBuf> = Setting {
    var: "WELDR_OBJECT_STORE_DIR",
    unset: WhenUnset::InWorkspace(".weldr-objects"),
    parse: path,
    meaning: "fs object store (local mode, no S3_*)",
};
const S3_ENDPOINT: Setting<String> = Setting {
    var: "S3_ENDPOINT",
    unset: WhenUnset::ByMode {
        local: "https://t3.storage.dev",
        cloud: "https://fly.storage.tigris.dev",
    },
    parse: text,
    meaning: "S3 endpoint",
};
const S3_REGION: Setting<String> = Setting {
    var: "S3_REGION",
    unset: WhenUnset::Value("auto"),
    parse: text,
    meaning: "S3 region",
};
const S3_CREDENTIALS: &str = "S3 credentials (never read from ~/.aws)";
const S3_ACCESS_KEY_ID: Setting<Secret> = Setting {
    var: "S3_ACCESS_KEY_ID",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: S3_CREDENTIALS,
};
const S3_SECRET_ACCESS_KEY: Setting<Secret> = Setting {
    var: "S3_SECRET_ACCESS_KEY",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: S3_CREDENTIALS,
};
const S3_BUCKET: Setting<String> = Setting {
    var: "S3_BUCKET",
    unset: WhenUnset::Nothing,
    parse: text,
    meaning: "one shared bucket; default is a bucket per branch",
};
const DATABASE_URL: Setting<Secret> = Setting {
    var: "DATABASE_URL",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: "Better Auth sessions and the Postgres mirror (optional); `sslmode=disable|prefer|require|verify-ca|verify-full` and `sslrootcert=` as in libpq (TLS through rustls; checked at start)",
};
const REDIS_URL: Setting<Secret> = Setting {
    var: "REDIS_URL",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: "Redis mirror (optional): events as streams `weldr:events:{projectId}:{branchId}`, live `PUBLISH`, workflow hashes; `rediss://` for TLS (rustls, system roots)",
};
const REDIS_CA_FILE: Setting<PathBuf> = Setting {
    var: "REDIS_CA_FILE",
    unset: WhenUnset::Nothing,
    parse: path,
    meaning: "PEM file of the certificate authorities a `rediss://` server is checked against (default: the system's roots)",
};
const MIRROR_POSTGRES: Setting<bool> = Setting {
    var: "MIRROR_POSTGRES",
    unset: WhenUnset::Value("on"),
    parse: |v| switch(v, "on", "off"),
    meaning: "mirror projects, branches, versions, workflows and integration jobs into `DATABASE_URL` (its own schema, migrated at start)",
};
const MIRROR_SCHEMA: Setting<String> = Setting {
    var: "MIRROR_SCHEMA",
    unset: WhenUnset::Value("weldr_agent"),
    parse: |v| {
        if is_sql_identifier(v) {
            Ok(v.to_string())
        } else {
            Err("expected a SQL identifier".into())
        }
    },
    meaning: "the Postgres schema the mirror owns",
};
const MIRROR_EVENTS: Setting<bool> = Setting {
    var: "MIRROR_EVENTS",
    unset: WhenUnset::Value("off"),
    parse: |v| switch(v, "on", "off"),
    meaning: "also mirror every event into Postgres (`events` table); Redis always gets them",
};
const MIRROR_MAX_BACKLOG: Setting<u64> = Setting {
    var: "MIRROR_MAX_BACKLOG",
    unset: WhenUnset::Value("1000000"),
    parse: |v| match number::<u64>(v, "a number of outbox entries")? {
        0 => Err("expected at least 1".into()),
        n => Ok(n),
    },
    meaning: "outbox entries (one per commit) kept for a mirror that is down; beyond, the oldest are dropped, the mirror records a gap upstream and resyncs its records",
};
const BETTER_AUTH_SECRET: Setting<Secret> = Setting {
    var: "BETTER_AUTH_SECRET",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: "verifies Better Auth session cookies",
};
const WELDR_MODEL: Setting<String> = Setting {
    var: "WELDR_MODEL",
    unset: WhenUnset::Value("anthropic:claude-sonnet-4-5"),
    parse: |v| {
        if !v.contains(':') {
            return Err("expected `provider:model`, e.g. `openai:gpt-4.1`".into());
        }
        Ok(v.to_string())
    },
    meaning: "default model, `provider:model`",
};
const PROVIDER_KEYS: &str = "provider keys";
const ANTHROPIC_API_KEY: Setting<Secret> = Setting {
    var: "ANTHROPIC_API_KEY",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: PROVIDER_KEYS,
};
const OPENAI_API_KEY: Setting<Secret> = Setting {
    var: "OPENAI_API_KEY",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: PROVIDER_KEYS,
};
const GEMINI_API_KEY: Setting<Secret> = Setting {
    var: "GEMINI_API_KEY",
    unset: WhenUnset::Nothing,
    parse: secret,
    meaning: PROVIDER_KEYS,
};
const PROVIDER_ENDPOINTS: &str = "provider endpoints";
const PROVIDER_DEFAULT: WhenUnset = WhenUnset::Elsewhere("provider default");
const ANTHROPIC_BASE_URL: Setting<String> = Setting {
    var: "ANTHROPIC_BASE_URL",
    unset: PROVIDER_DEFAULT,
    parse: text,
    meaning: PROVIDER_ENDPOINTS,
};
const OPENAI_BASE_URL: Setting<String> = Setting {
    var: "OPENAI_BASE_URL",
    unset: PROVIDER_DEFAULT,
    parse: text,
    meaning: PROVIDER_ENDPOINTS,
};
const GEMINI_BASE_URL: Setting<String> = Setting {
    var: "GEMINI_BASE_URL",
    unset: PROVIDER_DEFAULT,
    parse: text,
    meaning: PROVIDER_ENDPOINTS,
};
const OLLAMA_BASE_URL: Setting<String> = Setting {
    var: "OLLAMA_BASE_URL",
    unset: WhenUnset::Value("http://127.0.0.1:11434/v1"),
    parse: text,
    meaning: "OpenAI-compatible local server",
};
const MAX_VOLUME_USAGE_PERCENT: Setting<u8> = Setting {
    var: "MAX_VOLUME_USAGE_PERCENT",
    unset: WhenUnset::Value("85"),
    parse: percent,
    meaning: "eviction starts at this disk usage",
};
const TARGET_VOLUME_USAGE_PERCENT: Setting<u8> = Setting {
    var: "TARGET_VOLUME_USAGE_PERCENT",
    unset: WhenUnset::Value("70"),
    parse: percent,
    meaning: "eviction stops at this disk usage",
};
const EVICTION_GRACE_SECONDS: Setting<Duration> = Setting {
    var: "EVICTION_GRACE_SECONDS",
    unset: WhenUnset::Value("300"),
    parse: seconds,
    meaning: "recently used branches are never evicted",
};
const EVICTION_INTERVAL_SECONDS: Setting<Duration> = Setting {
    var: "EVICTION_INTERVAL_SECONDS",
    unset: WhenUnset::Value("30"),
    parse: seconds,
    meaning: "how often the disk watermark loop runs (0: never; `weldr-agent cleanup` still works)",
};
const SYNC_QUIET_SECONDS: Setting<Duration> = Setting {
    var: "SYNC_QUIET_SECONDS",
    unset: WhenUnset::Value("30"),
    parse: |v| Ok(seconds(v)?.max(Duration::from_secs(1))),
    meaning: "a changed branch is pushed after this long without further changes (and after each version)",
};
const EVENT_RETENTION: Setting<u64> = Setting {
    var: "EVENT_RETENTION",
    unset: WhenUnset::Value("50000"),
    parse: |v| match number(v, "a positive number of events")? {
        0 => Err("expected at least 1".into()),
        n => Ok(n),
    },
    meaning: "events kept per branch stream",
};
const EVENT_CACHE_MB: Setting<usize> = Setting {
    var: "EVENT_CACHE_MB",
    unset: WhenUnset::Value("32"),
    parse: |v| Ok((number::<u32>(v, "a number of MiB")? as usize).saturating_mul(1 << 20)),
    meaning: "memory for encoded blocks of older events that resuming clients share (0: off)",
};
const APPEND_LOG: Setting<bool> = Setting {
    var: "APPEND_LOG",
    unset: WhenUnset::Value("on"),
    parse: |v| switch(v, "on", "off"),
    meaning: "`on`: event appends are made durable by one sequential synced write to `state.redb.wal`, redb catches up at checkpoints; `off`: every write is a durable redb commit",
};
const STORE_BACKUP: Setting<bool> = Setting {
    var: "STORE_BACKUP",
    unset: WhenUnset::Value("on"),
    parse: |v| switch(v, "on", "off"),
    meaning: "continuous backup of `state.redb` to the object store (full copies plus increments); a fresh machine restores it at start",
};
const STORE_BACKUP_INTERVAL_MS: Setting<Duration> = Setting {
    var: "STORE_BACKUP_INTERVAL_MS",
    unset: WhenUnset::Value("1000"),
    parse: |v| {
        Ok(Duration::from_millis(
            number::<u64>(v, "milliseconds")?.max(20),
        ))
    },
    meaning: "longest time between a durable write and shipping it (the backup's loss window)",
};
const STORE_BACKUP_FULL_SECONDS: Setting<Duration> = Setting {
    var: "STORE_BACKUP_FULL_SECONDS",
    unset: WhenUnset::Value("3600"),
    parse: |v| Ok(seconds(v)?.max(Duration::from_secs(1))),
    meaning: "a new full copy of the store after this long with changes (or 64 MiB of increments)",
};
const STORE_BACKUP_KEEP: Setting<usize> = Setting {
    var: "STORE_BACKUP_KEEP",
    unset: WhenUnset::Value("4"),
    parse: |v| match number::<usize>(v, "a number of full copies")? {
        0 => Err("expected at least 1".into()),
        n => Ok(n),
    },
    meaning: "full copies (generations) of the store kept, each with its increments: how far back `restore-store --at` reaches",
};
const STORE_BACKUP_BUCKET: Setting<String> = Setting {
    var: "STORE_BACKUP_BUCKET",
    unset: WhenUnset::Value("weldr-agent-store"),
    parse: |v| Ok(v.to_string()),
    meaning: "bucket of the store's backup when branches have a bucket each (with `S3_BUCKET` it goes under `.weldr-store/` there; fs: `WELDR_OBJECT_STORE_DIR/weldr-store`)",
};
const INTEGRATION_DATABASE_URL: Setting<String> = Setting {
    var: "INTEGRATION_DATABASE_URL",
    unset: WhenUnset::Value("postgres://postgres@127.0.0.1:5432/postgres"),
    parse: |v| {
        if v.starts_with("postgres://") || v.starts_with("postgresql://") {
            Ok(v.to_string())
        } else {
            Err("expected a postgres:// URL".into())
        }
    },
    meaning: "the `DATABASE_URL` local-mode integrations write into the generated app's `.env` (git-ignored)",
};
const SHUTDOWN_TIMEOUT_SECONDS: Setting<Duration> = Setting {
    var: "SHUTDOWN_TIMEOUT_SECONDS",
    unset: WhenUnset::Value("20"),
    parse: seconds,
    meaning: "graceful shutdown budget (Fly kill timeout is 30)",
};
const LOG_LEVEL: Setting<String> = Setting {
    var: "LOG_LEVEL",
    unset: WhenUnset::Value("info"),
    parse: text,
    meaning: "tracing filter, e.g. `debug` or `weldr_agent=debug`",
};
const AUTH_COOKIE_PREFIX: Setting<String> = Setting {
    var: "AUTH_COOKIE_PREFIX",
    unset: WhenUnset::Value("weldr"),
    parse: text,
    meaning: "Better Auth cookie prefix (`weldr`: the original app's; `better-auth`: Better Auth's default)",
};
const AUTH_TABLES: &str = "Better Auth tables in Postgres";
const AUTH_SESSIONS_TABLE: Setting<String> = Setting {
    var: "AUTH_SESSIONS_TABLE",
    unset: WhenUnset::Value("sessions"),
    parse: sql_table,
    meaning: AUTH_TABLES,
};
const AUTH_USERS_TABLE: Setting<String> = Setting {
    var: "AUTH_USERS_TABLE",
    unset: WhenUnset::Value("users"),
    parse: sql_table,
    meaning: AUTH_TABLES,
};
const AUTH_PROJECTS_TABLE: Setting<String> = Setting {
    var: "AUTH_PROJECTS_TABLE",
    unset: WhenUnset::Value("projects"),
    parse: sql_table,
    meaning: AUTH_TABLES,
};
const SSE_MAX_PER_USER: Setting<usize> = Setting {
    var: "SSE_MAX_PER_USER",
    unset: WhenUnset::Value("32"),
    parse: |v| Ok(number::<usize>(v, "a number of streams")?.max(1)),
    meaning: "open SSE streams per user",
};
const MAX_CONNECTIONS: Setting<usize> = Setting {
    var: "MAX_CONNECTIONS",
    unset: WhenUnset::Elsewhere("3/4 of the file descriptor limit"),
    parse: |v| Ok(number::<usize>(v, "a number of connections")?.max(1)),
    meaning: "open HTTP connections at once; more are refused at accept (a few more are kept for /health)",
};
const REQUEST_HEAD_TIMEOUT_SECONDS: Setting<Duration> = Setting {
    var: "REQUEST_HEAD_TIMEOUT_SECONDS",
    unset: WhenUnset::Value("10"),
    parse: |v| Ok(seconds(v)?.max(Duration::from_secs(1))),
    meaning: "a connection that has not sent a complete request head within this is closed",
};
const REPLAY_DIR: Setting<PathBuf> = Setting {
    var: "REPLAY_DIR",
    unset: WhenUnset::Nothing,
    parse: path,
    meaning: "`replay:<path>` models play transcripts only from inside this directory; unset: refused",
};
const TRIGGER_RATE_PER_MINUTE: Setting<u32> = Setting {
    var: "TRIGGER_RATE_PER_MINUTE",
    unset: WhenUnset::Value("20"),
    parse: |v| Ok(number::<u32>(v, "a number per minute")?.max(1)),
    meaning: "`/trigger` calls per user per minute",
};
const MAX_BODY_BYTES: Setting<usize> = Setting {
    var: "MAX_BODY_BYTES",
    unset: WhenUnset::Value("1048576"),
    parse: |v| Ok(number::<usize>(v, "a number of bytes")?.max(1024)),
    meaning: "largest JSON request body",
};
const ATTACHMENT_MAX_BYTES: Setting<usize> = Setting {
    var: "ATTACHMENT_MAX_BYTES",
    unset: WhenUnset::Value("20971520"),
    parse: |v| Ok(number::<usize>(v, "a number of bytes")?.max(1024)),
    meaning: "largest attachment (uploaded, or inline in a `/trigger` message); a message's attachments together at most twice this",
};
const FORK_MODE: Setting<bool> = Setting {
    var: "FORK_MODE",
    unset: WhenUnset::Value("layers"),
    parse: |v| switch(v, "layers", "copy"),
    meaning: "`layers`: forks at a head are copy-on-write overlayfs layers where the kernel lets us mount (root), else copies; `copy`: always copy",
};
const WORKFLOW_CONCURRENCY: Setting<usize> = Setting {
    var: "WORKFLOW_CONCURRENCY",
    unset: WhenUnset::Value("4"),
    parse: |v| Ok(number::<usize>(v, "a number of workflows")?.max(1)),
    meaning: "workflows running at once across branches (more queue)",
};
const TLS_FILES: &str = "serve HTTPS with this PEM certificate chain and key";
const TLS_CERT_PATH: Setting<PathBuf> = Setting {
    var: "TLS_CERT_PATH",
    unset: WhenUnset::Nothing,
    parse: |v| Ok(PathBuf::from(v)),
    meaning: TLS_FILES,
};
const TLS_KEY_PATH: Setting<PathBuf> = Setting {
    var: "TLS_KEY_PATH",
    unset: WhenUnset::Nothing,
    parse: |v| Ok(PathBuf::from(v)),
    meaning: TLS_FILES,
};
const OPENAI_API: Setting<bool> = Setting {
    var: "OPENAI_API",
    unset: WhenUnset::Value("responses"),
    parse: |v| switch(v, "responses", "chat"),
    meaning: "how `openai:` models are spoken to: `responses` (OpenAI's Responses API, reasoning kept between tool calls) or `chat` (Chat Completions, for gateways without `/responses`)",
};
const WELDR_MAX_OUTPUT_TOKENS: Setting<u32> = Setting {
    var: "WELDR_MAX_OUTPUT_TOKENS",
    unset: WhenUnset::Elsewhere("per model"),
    parse: |v| Ok(number::<u32>(v, "a number of tokens")?.max(256)),
    meaning: "most output tokens of one model turn; a turn cut off at its limit is asked again with twice the limit up to this (default: the model's documented maximum, 8192 for unknown and local models)",
};
const WELDR_CONTEXT_TOKENS: Setting<u32> = Setting {
    var: "WELDR_CONTEXT_TOKENS",
    unset: WhenUnset::Elsewhere("per model"),
    parse: |v| Ok(number::<u32>(v, "a number of tokens")?.max(2048)),
    meaning: "the context window every model request is kept within: old tool results are shortened, then older turns summarized (default: the model's documented window, 32768 for unknown and local models)",
};
const SANDBOX: Setting<SandboxMode> = Setting {
    var: "SANDBOX",
    unset: WhenUnset::Value("bwrap"),
    parse: |v| match switch(v, "bwrap", "off")? {
        true => Ok(SandboxMode::Bwrap),
        false => Ok(SandboxMode::Off),
    },
    meaning: "`bwrap`: the agent's commands (run_command, the build) run in a bubblewrap sandbox and fail with a clear message where it cannot run; `off`: unconfined, as the server (shown in `/health` and the startup log)",
};
const SANDBOX_NETWORK: Setting<bool> = Setting {
    var: "SANDBOX_NETWORK",
    unset: WhenUnset::Value("on"),
    parse: |v| switch(v, "on", "off"),
    meaning: "`on`: sandboxed commands reach the network (package registries); `off`: only their own loopback",
};
const SANDBOX_UID: Setting<u32> = Setting {
    var: "SANDBOX_UID",
    unset: WhenUnset::Value("61000"),
    parse: |v| match number(v, "a uid")? {
        0 => Err("the sandbox must not run as root".into()),
        uid => Ok(uid),
    },
    meaning: "uid and gid sandboxed commands run as when the server is root (the branch directories' files are handed to it)",
};
const SANDBOX_MEMORY_MB: Setting<u64> = Setting {
    var: "SANDBOX_MEMORY_MB",
    unset: WhenUnset::Value("4096"),
    parse: |v| Ok(number::<u64>(v, "a number of MiB")?.max(64)),
    meaning: "most data memory one sandboxed process may map (RLIMIT_DATA)",
};
const SANDBOX_MAX_PROCESSES: Setting<u64> = Setting {
    var: "SANDBOX_MAX_PROCESSES",
    unset: WhenUnset::Value("1024"),
    parse: |v| Ok(number::<u64>(v, "a number of processes")?.max(16)),
    meaning: "most processes of the sandbox uid at once (RLIMIT_NPROC; when the server is root)",
};
const SANDBOX_TMP_MB: Setting<u64> = Setting {
    var: "SANDBOX_TMP_MB",
    unset: WhenUnset::Value("512"),
    parse: |v| Ok(number::<u64>(v, "a number of MiB")?.max(1)),
    meaning: "size of a sandboxed command's private /tmp (memory)",
};

/// Every setting, in the order `weldr-agent config` prints them. The README's configuration
/// table must name the same variables with the same defaults (`tests/config_table.rs`).
pub const SETTINGS: &[&dyn Listed] = &[
    &WELDR_MODE,
    &HOST,
    &PORT,
    &CORS_ORIGIN,
    &WORKSPACE_BASE,
    &WELDR_DATA_DIR,
    &PROJECT_ID,
    &WELDR_OBJECT_STORE_DIR,
    &S3_ENDPOINT,
    &S3_REGION,
    &S3_ACCESS_KEY_ID,
    &S3_SECRET_ACCESS_KEY,
    &S3_BUCKET,
    &DATABASE_URL,
    &REDIS_URL,
    &REDIS_CA_FILE,
    &MIRROR_POSTGRES,
    &MIRROR_SCHEMA,
    &MIRROR_EVENTS,
    &MIRROR_MAX_BACKLOG,
    &BETTER_AUTH_SECRET,
    &WELDR_MODEL,
    &ANTHROPIC_API_KEY,
    &OPENAI_API_KEY,
    &GEMINI_API_KEY,
    &ANTHROPIC_BASE_URL,
    &OPENAI_BASE_URL,
    &GEMINI_BASE_URL,
    &OLLAMA_BASE_URL,
    &MAX_VOLUME_USAGE_PERCENT,
    &TARGET_VOLUME_USAGE_PERCENT,
    &EVICTION_GRACE_SECONDS,
    &EVICTION_INTERVAL_SECONDS,
    &SYNC_QUIET_SECONDS,
    &EVENT_RETENTION,
    &EVENT_CACHE_MB,
    &APPEND_LOG,
    &STORE_BACKUP,
    &STORE_BACKUP_INTERVAL_MS,
    &STORE_BACKUP_FULL_SECONDS,
    &STORE_BACKUP_KEEP,
    &STORE_BACKUP_BUCKET,
    &INTEGRATION_DATABASE_URL,
    &SHUTDOWN_TIMEOUT_SECONDS,
    &LOG_LEVEL,
    &AUTH_COOKIE_PREFIX,
    &AUTH_SESSIONS_TABLE,
    &AUTH_USERS_TABLE,
    &AUTH_PROJECTS_TABLE,
    &SSE_MAX_PER_USER,
    &MAX_CONNECTIONS,
    &REQUEST_HEAD_TIMEOUT_SECONDS,
    &REPLAY_DIR,
    &TRIGGER_RATE_PER_MINUTE,
    &MAX_BODY_BYTES,
    &ATTACHMENT_MAX_BYTES,
    &FORK_MODE,
    &WORKFLOW_CONCURRENCY,
    &TLS_CERT_PATH,
    &TLS_KEY_PATH,
    &OPENAI_API,
    &WELDR_MAX_OUTPUT_TOKENS,
    &WELDR_CONTEXT_TOKENS,
    &SANDBOX,
    &SANDBOX_NETWORK,
    &SANDBOX_UID,
    &SANDBOX_MEMORY_MB,
    &SANDBOX_MAX_PROCESSES,
    &SANDBOX_TMP_MB,
];

/// The table as `weldr-agent config` prints it: (variables, default, meaning). Settings that
/// follow each other with the same meaning share a row (`A / B`); their defaults are joined
/// the same way unless they are all the same.
pub fn settings_rows() -> Vec<(String, String, &'static str)> {
    let mut rows: Vec<(Vec<&'static str>, Vec<String>, &'static str)> = Vec::new();
    for s in SETTINGS {
        match rows.last_mut() {
            Some((vars, defaults, meaning)) if *meaning == s.meaning() => {
                vars.push(s.var());
                defaults.push(s.unset().text());
            }
            _ => rows.push((vec![s.var()], vec![s.unset().text()], s.meaning())),
        }
    }
    rows.into_iter()
        .map(|(vars, mut defaults, meaning)| {
            defaults.dedup();
            (vars.join(" / "), defaults.join(" / "), meaning)
        })
        .collect()
}

/// The environment as settings read it.
struct Env<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
    /// Picks [`WhenUnset::ByMode`] defaults.
    mode: Mode,
}

fn nothing_set(_: &str) -> Option<String> {
    None
}

impl Env<'_> {
    /// An environment where nothing is set: every setting at its default.
    fn empty() -> Env<'static> {
        Env {
            get: &nothing_set,
            mode: Mode::Local,
        }
    }

    /// The variable's value; empty counts as unset.
    fn var(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The setting as set, else what it is when unset, read by its parser; None when it has
    /// no value.
    fn optional<T>(&self, s: &Setting<T>) -> Result<Option<T>, ConfigError> {
        let value = self
            .var(s.var)
            .or_else(|| self.when_unset(s.unset).map(str::to_string));
        let Some(value) = value else {
            return Ok(None);
        };
        match (s.parse)(&value) {
            Ok(v) => Ok(Some(v)),
            Err(message) => Err(ConfigError {
                var: s.var,
                value,
                message,
            }),
        }
    }

    /// The value a setting takes when unset, if it is one a parser reads.
    fn when_unset(&self, unset: WhenUnset) -> Option<&'static str> {
        match unset {
            WhenUnset::Value(v) => Some(v),
            WhenUnset::ByMode { local, cloud } => Some(match self.mode {
                Mode::Local => local,
                Mode::Cloud => cloud,
            }),
            WhenUnset::NodeEnv {
                production,
                otherwise,
            } => match self.var("NODE_ENV").as_deref() {
                Some("production") => Some(production),
                _ => Some(otherwise),
            },
            WhenUnset::Nothing | WhenUnset::InWorkspace(_) | WhenUnset::Elsewhere(_) => None,
        }
    }

    /// A setting that always has a value (its default is one).
    fn value<T>(&self, s: &Setting<T>) -> Result<T, ConfigError> {
        self.optional(s)?.ok_or_else(|| ConfigError {
            var: s.var,
            value: String::new(),
            message: "required".into(),
        })
    }

    /// A directory setting whose default is inside the workspace.
    fn dir(&self, s: &Setting<PathBuf>, workspace_base: &Path) -> Result<PathBuf, ConfigError> {
        match (self.optional(s)?, s.unset) {
            (Some(dir), _) => Ok(dir),
            (None, WhenUnset::InWorkspace(name)) => Ok(workspace_base.join(name)),
            (None, _) => self.value(s),
        }
    }
}

fn sandbox_settings(env: &Env) -> Result<SandboxSettings, ConfigError> {
    Ok(SandboxSettings {
        uid: env.value(&SANDBOX_UID)?,
        mode: env.value(&SANDBOX)?,
        network: env.value(&SANDBOX_NETWORK)?,
        memory_mb: env.value(&SANDBOX_MEMORY_MB)?,
        max_processes: env.value(&SANDBOX_MAX_PROCESSES)?,
        tmp_mb: env.value(&SANDBOX_TMP_MB)?,
        program: PathBuf::from("bwrap"),
    })
}

fn auth_tables(env: &Env) -> Result<AuthTables, ConfigError> {
    Ok(AuthTables {
        sessions: env.value(&AUTH_SESSIONS_TABLE)?,
        users: env.value(&AUTH_USERS_TABLE)?,
        projects: env.value(&AUTH_PROJECTS_TABLE)?,
    })
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

    /// Every setting of [`SETTINGS`], then the rules between settings. The first invalid
    /// value (in the order below) is the error.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut env = Env {
            get,
            mode: Mode::Local,
        };
        let mode = env.value(&WELDR_MODE)?;
        env.mode = mode;
        let host = env.value(&HOST)?;
        let port = env.value(&PORT)?;
        let cors_origins = env.value(&CORS_ORIGIN)?;
        let workspace_base = env.value(&WORKSPACE_BASE)?;
        let data_dir = env.dir(&WELDR_DATA_DIR, &workspace_base)?;
        let object_store_dir = env.dir(&WELDR_OBJECT_STORE_DIR, &workspace_base)?;
        let project_id = env.optional(&PROJECT_ID)?;
        if mode == Mode::Cloud && project_id.is_none() {
            return Err(ConfigError {
                var: "PROJECT_ID",
                value: String::new(),
                message: "required in cloud mode (one project per machine)".into(),
            });
        }
        let s3 = S3Config {
            endpoint: env.value(&S3_ENDPOINT)?,
            region: env.value(&S3_REGION)?,
            access_key_id: env.optional(&S3_ACCESS_KEY_ID)?,
            secret_access_key: env.optional(&S3_SECRET_ACCESS_KEY)?,
            bucket: env.optional(&S3_BUCKET)?,
        };
        let max = env.value(&MAX_VOLUME_USAGE_PERCENT)?;
        let target = env.value(&TARGET_VOLUME_USAGE_PERCENT)?;
        if target >= max {
            return Err(ConfigError {
                var: "TARGET_VOLUME_USAGE_PERCENT",
                value: target.to_string(),
                message: format!("must be below MAX_VOLUME_USAGE_PERCENT ({max})"),
            });
        }
        let event_retention = env.value(&EVENT_RETENTION)?;
        let default_model = env.value(&WELDR_MODEL)?;
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
            mirror: MirrorSettings {
                postgres_url: match env.value(&MIRROR_POSTGRES)? {
                    true => env.optional(&DATABASE_URL)?,
                    false => None,
                },
                redis_url: env.optional(&REDIS_URL)?,
                schema: env.value(&MIRROR_SCHEMA)?,
                events: env.value(&MIRROR_EVENTS)?,
                max_backlog: env.value(&MIRROR_MAX_BACKLOG)?,
            },
            database_url: env.optional(&DATABASE_URL)?,
            redis_url: env.optional(&REDIS_URL)?,
            redis_ca_file: env.optional(&REDIS_CA_FILE)?,
            better_auth_secret: env.optional(&BETTER_AUTH_SECRET)?,
            providers: ProviderKeys {
                anthropic_api_key: env.optional(&ANTHROPIC_API_KEY)?,
                openai_api_key: env.optional(&OPENAI_API_KEY)?,
                gemini_api_key: env.optional(&GEMINI_API_KEY)?,
                anthropic_base_url: env.optional(&ANTHROPIC_BASE_URL)?,
                openai_base_url: env.optional(&OPENAI_BASE_URL)?,
                gemini_base_url: env.optional(&GEMINI_BASE_URL)?,
                ollama_base_url: env.value(&OLLAMA_BASE_URL)?,
                default_model,
                openai_responses: env.value(&OPENAI_API)?,
                replay_dir: env.optional(&REPLAY_DIR)?,
                max_output_tokens: env.optional(&WELDR_MAX_OUTPUT_TOKENS)?,
                context_tokens: env.optional(&WELDR_CONTEXT_TOKENS)?,
            },
            max_volume_usage_percent: max,
            target_volume_usage_percent: target,
            eviction_grace: env.value(&EVICTION_GRACE_SECONDS)?,
            eviction_interval: env.value(&EVICTION_INTERVAL_SECONDS)?,
            sync_quiet: env.value(&SYNC_QUIET_SECONDS)?,
            log_level: env.value(&LOG_LEVEL)?,
            event_retention,
            event_cache_bytes: env.value(&EVENT_CACHE_MB)?,
            append_log: env.value(&APPEND_LOG)?,
            store_backup: StoreBackupSettings {
                enabled: env.value(&STORE_BACKUP)?,
                interval: env.value(&STORE_BACKUP_INTERVAL_MS)?,
                full_every: env.value(&STORE_BACKUP_FULL_SECONDS)?,
                keep: env.value(&STORE_BACKUP_KEEP)?,
                bucket: env.value(&STORE_BACKUP_BUCKET)?,
            },
            integration_database_url: env.value(&INTEGRATION_DATABASE_URL)?,
            shutdown_timeout: env.value(&SHUTDOWN_TIMEOUT_SECONDS)?,
            sse_heartbeat: Duration::from_secs(15),
            auth_cookie_prefix: env.value(&AUTH_COOKIE_PREFIX)?,
            auth_tables: auth_tables(&env)?,
            sse_max_per_user: env.value(&SSE_MAX_PER_USER)?,
            trigger_rate_per_minute: env.value(&TRIGGER_RATE_PER_MINUTE)?,
            max_body_bytes: env.value(&MAX_BODY_BYTES)?,
            attachment_max_bytes: env.value(&ATTACHMENT_MAX_BYTES)?,
            workflow_concurrency: env.value(&WORKFLOW_CONCURRENCY)?,
            fork_layers: env.value(&FORK_MODE)?,
            sandbox: sandbox_settings(&env)?,
            max_connections: env.optional(&MAX_CONNECTIONS)?,
            request_head_timeout: env.value(&REQUEST_HEAD_TIMEOUT_SECONDS)?,
            tls: match (env.optional(&TLS_CERT_PATH)?, env.optional(&TLS_KEY_PATH)?) {
                (Some(cert), Some(key)) => Some((cert, key)),
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

    /// What a setting is when unset is read by its own parser: a default the parser refuses
    /// would only show when a user leaves the variable unset.
    #[test]
    fn every_default_is_a_value_its_parser_accepts() {
        for s in SETTINGS {
            s.check_unset().unwrap();
        }
        for mode in ["local", "cloud"] {
            let c = cfg(&[("WELDR_MODE", mode), ("PROJECT_ID", "p")]).unwrap();
            assert_eq!(c.sandbox.uid, SandboxSettings::default().uid);
            assert_eq!(c.auth_tables.users, AuthTables::default().users);
        }
    }

    /// `from_lookup` reads the table's variables and no others (NODE_ENV aside, which picks
    /// the mode's default): a setting read but not listed would be missing from `weldr-agent
    /// config` and the README.
    #[test]
    fn the_table_lists_exactly_what_is_read() {
        let read = std::sync::Mutex::new(std::collections::BTreeSet::new());
        Config::from_lookup(&|k| {
            read.lock().unwrap().insert(k.to_string());
            None
        })
        .unwrap();
        let mut read = read.into_inner().unwrap();
        assert!(read.remove("NODE_ENV"));
        let listed: std::collections::BTreeSet<String> =
            SETTINGS.iter().map(|s| s.var().to_string()).collect();
        assert_eq!(read, listed);
        assert_eq!(listed.len(), SETTINGS.len(), "a variable is listed twice");
    }

    #[test]
    fn settings_with_one_meaning_share_a_row() {
        let rows = settings_rows();
        let row = |var: &str| rows.iter().find(|(v, _, _)| v == var).cloned();
        assert_eq!(
            row("AUTH_SESSIONS_TABLE / AUTH_USERS_TABLE / AUTH_PROJECTS_TABLE").map(|r| r.1),
            Some("sessions / users / projects".to_string())
        );
        assert_eq!(
            row("S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY").map(|r| r.1),
            Some("-".to_string())
        );
        assert_eq!(
            row("HOST").map(|r| r.1),
            Some("127.0.0.1 local, 0.0.0.0 cloud".to_string())
        );
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
