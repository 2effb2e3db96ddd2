//! The `weldr-agent` command line. Every subcommand works whether or not the server runs: it
//! opens the store itself, or talks to the running server over its control socket.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use serde_json::Value;
use weldr_agent::app::App;
use weldr_agent::config::{Config, Mode, settings_rows};
use weldr_agent::control::{ControlClient, ControlRequest, execute};
use weldr_storage::StorageError;

#[derive(Parser)]
#[command(
    name = "weldr-agent",
    version,
    about = "The machine an AI coding agent works in."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (settings come from the environment; see `weldr-agent config`).
    Serve,
    /// Print the effective settings and the table of environment variables.
    Config,
    /// Show store status (streams, events, subscribers).
    Status,
    /// Manage projects.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Manage branches.
    Branch {
        #[command(subcommand)]
        command: BranchCommand,
    },
    /// Read or append branch events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Push or pull a branch snapshot to or from object storage (S3 or the local fs store).
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// Evict least-recently-used branches (pushed and verified first) while the workspace volume
    /// is at or above MAX_VOLUME_USAGE_PERCENT, until TARGET_VOLUME_USAGE_PERCENT; prints
    /// CLEANUP_STATUS=success|failed, USAGE_BEFORE, USAGE_AFTER, EVICTED, SKIPPED and FAILED.
    Cleanup,
    /// Repair the store (with the server stopped).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Manage local API tokens (sent as `Authorization: Bearer <token>`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Recover a store whose append log is damaged in the middle (the server refuses to start
    /// and says so): keeps every readable event, marks the ids of unreadable ones with `lost`
    /// events, and continues ids after the highest one ever handed out. Stop the server and
    /// copy the data directory first.
    Recover,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (only this once) on stdout.
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (id, name, creation time); never the secrets.
    List,
    /// Revoke a token by id (from `list`, at least 6 characters) or by name.
    Revoke { which: String },
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Snapshot the branch directory into the store; prints SYNC_STATUS=success|failed and
    /// BUCKET_NAME=<bucket>, like the original sync-to-s3.sh.
    Push {
        branch_id: String,
        project_id: String,
    },
    /// Restore the latest (or a named) snapshot into the branch directory; prints
    /// SYNC_STATUS=success|skipped|failed, BUCKET_NAME=<bucket> and REASON=bucket_not_found
    /// when there is no snapshot yet.
    Pull {
        branch_id: String,
        project_id: String,
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Register a project.
    Create {
        project_id: String,
        #[arg(long)]
        title: Option<String>,
    },
}

#[derive(Subcommand)]
enum BranchCommand {
    /// Create or reuse a branch directory; prints STATUS=created|reused and BRANCH_DIR=<path>.
    Create {
        branch_id: String,
        project_id: String,
        /// Fork from `branchId` or `branchId@versionId` of the same project.
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Append events to a branch stream; prints ID=<n> for each once it is durable.
    Append {
        project_id: String,
        branch_id: String,
        /// Event type, e.g. `status`.
        #[arg(long = "type", default_value = "note")]
        kind: String,
        /// JSON object payload.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Append this many events (a burst), one at a time.
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Print events after an id as JSON lines.
    List {
        project_id: String,
        branch_id: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Where CLI commands run: on the store directly, or through the running server.
enum Target {
    Local(Arc<App>),
    Remote(ControlClient),
}

impl Target {
    async fn open(config: Config) -> Result<Self> {
        let socket = config.control_socket_path();
        match App::open(config) {
            Ok(app) => Ok(Target::Local(app)),
            Err(StorageError::AlreadyOpen(path)) => {
                let client = ControlClient::connect(&socket).await.with_context(|| {
                    format!(
                        "the store {} is held by another process, but no server answers on {}; \
                         stop the other process and retry",
                        path.display(),
                        socket.display()
                    )
                })?;
                Ok(Target::Remote(client))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn call(&mut self, request: ControlRequest) -> Result<Value> {
        match self {
            Target::Local(app) => execute(app, request)
                .await
                .map_err(|e| anyhow!("{} ({})", e.message, e.code)),
            Target::Remote(client) => client.call(&request).await,
        }
    }

    async fn close(self) {
        if let Target::Local(app) = self {
            let store = app.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.mode == Mode::Cloud {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() {
    weldr_agent::install_crypto_provider();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weldr-agent: configuration error: {e}");
            std::process::exit(2);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Look for socket events every 4 task polls instead of tokio's 61: while a thousand
        // replays keep both workers busy with 256 KiB writes, a new client's connection and
        // request otherwise wait behind dozens of them (a client arriving during such a
        // catch-up: first event p50/p99 23.8/69.3 ms with 61, 8.1/27.5 with 7, 5.4/17.4 with
        // 4, 5.0/20.9 with 2; catch-up throughput and fan-out unchanged within noise).
        .event_interval(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weldr-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli, config)) {
        eprintln!("weldr-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli, config: Config) -> Result<()> {
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Config => {
            println!(
                "mode={} workspace={} data={} port={}",
                config.mode.as_str(),
                config.workspace_base.display(),
                config.data_dir.display(),
                config.port
            );
            for (var, default, meaning) in settings_rows() {
                println!("{var:<60} {default:<45} {meaning}");
            }
            Ok(())
        }
        Command::Status => {
            one_call(config, ControlRequest::Status, |v| {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            })
            .await
        }
        Command::Project {
            command: ProjectCommand::Create { project_id, title },
        } => {
            one_call(
                config,
                ControlRequest::CreateProject { project_id, title },
                |v| println!("PROJECT_ID={}", v["projectId"].as_str().unwrap_or_default()),
            )
            .await
        }
        Command::Branch {
            command:
                BranchCommand::Create {
                    branch_id,
                    project_id,
                    from,
                },
        } => {
            one_call(
                config,
                ControlRequest::CreateBranch {
                    project_id,
                    branch_id,
                    from,
                },
                |v| {
                    println!("STATUS={}", v["status"].as_str().unwrap_or_default());
                    println!("BRANCH_DIR={}", v["branchDir"].as_str().unwrap_or_default());
                },
            )
            .await
        }
        Command::Events {
            command:
                EventsCommand::Append {
                    project_id,
                    branch_id,
                    kind,
                    data,
                    count,
                },
        } => {
            let data: Value =
                serde_json::from_str(&data).context("--data must be a JSON object")?;
            let mut target = Target::open(config).await?;
            let mut result = Ok(());
            use std::io::Write as _;
            let mut out = std::io::stdout();
            for _ in 0..count {
                let request = ControlRequest::Append {
                    project_id: project_id.clone(),
                    branch_id: branch_id.clone(),
                    kind: kind.clone(),
                    data: data.clone(),
                };
                let printed = match target.call(request).await {
                    Ok(v) => writeln!(out, "ID={}", v["id"]).and_then(|()| out.flush()),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                // The reader went away (`| head -1`): the events so far are durable, nobody
                // wants the rest of the ids, so stop quietly instead of panicking in println!.
                match printed {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(e) => {
                        result = Err(anyhow::Error::new(e).context("writing to stdout"));
                        break;
                    }
                }
            }
            target.close().await;
            result
        }
        Command::Sync { command } => sync_command(config, command).await,
        Command::Cleanup => cleanup_command(config).await,
        Command::Store {
            command: StoreCommand::Recover,
        } => store_recover(config).await,
        Command::Token {
            command: TokenCommand::Create { name },
        } => {
            one_call(config, ControlRequest::CreateToken { name }, |v| {
                println!("{}", v["token"].as_str().unwrap_or_default())
            })
            .await
        }
        Command::Token {
            command: TokenCommand::List,
        } => {
            one_call(config, ControlRequest::ListTokens, |v| {
                for t in v.as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  {}",
                        t["id"].as_str().unwrap_or_default(),
                        t["name"].as_str().unwrap_or_default(),
                        t["createdAtMs"]
                    );
                }
            })
            .await
        }
        Command::Token {
            command: TokenCommand::Revoke { which },
        } => {
            one_call(config, ControlRequest::RevokeToken { which }, |v| {
                println!("REVOKED={}", v["revoked"])
            })
            .await
        }
        Command::Events {
            command:
                EventsCommand::List {
                    project_id,
                    branch_id,
                    after,
                    limit,
                },
        } => {
            one_call(
                config,
                ControlRequest::ListEvents {
                    project_id,
                    branch_id,
                    after,
                    limit,
                },
                |v| {
                    for e in v.as_array().into_iter().flatten() {
                        println!("{e}");
                    }
                },
            )
            .await
        }
    }
}

/// `store recover`: on the store file itself; refused while a server holds it.
async fn store_recover(config: Config) -> Result<()> {
    let path = config.store_path();
    let options = weldr_storage::StoreOptions {
        event_retention: config.event_retention,
        ..Default::default()
    };
    let report = tokio::task::spawn_blocking(move || weldr_storage::recover(&path, options))
        .await?
        .map_err(|e| anyhow!("{e}"))?;
    println!("RESTORED={}", report.restored);
    println!("MARKED_LOST={}", report.marked_lost);
    println!("DAMAGED_BYTES={}", report.damaged_bytes);
    println!("NEW_STREAMS_START_AT={}", report.id_floor);
    Ok(())
}

/// `cleanup`: one disk watermark pass, here or in the running server.
async fn cleanup_command(config: Config) -> Result<()> {
    let mut target = Target::open(config).await?;
    let result = target.call(ControlRequest::Cleanup).await;
    target.close().await;
    let report = match result {
        Ok(v) => v,
        Err(e) => {
            println!("CLEANUP_STATUS=failed");
            return Err(e);
        }
    };
    let list = |key: &str, extra: &str| -> String {
        report[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let name = format!(
                    "{}/{}",
                    b["projectId"].as_str().unwrap_or_default(),
                    b["branchId"].as_str().unwrap_or_default()
                );
                match b[extra].as_str() {
                    Some(x) if !extra.is_empty() => format!("{name}:{x}"),
                    _ => name,
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let status = report["status"].as_str().unwrap_or("failed");
    println!("CLEANUP_STATUS={status}");
    println!(
        "USAGE_BEFORE={:.1}",
        report["usageBefore"].as_f64().unwrap_or(0.0)
    );
    println!(
        "USAGE_AFTER={:.1}",
        report["usageAfter"].as_f64().unwrap_or(0.0)
    );
    println!("EVICTED={}", list("evicted", ""));
    println!("SKIPPED={}", list("skipped", "reason"));
    println!("FAILED={}", list("failed", ""));
    for f in report["failed"].as_array().into_iter().flatten() {
        eprintln!(
            "weldr-agent: {}/{} was kept: {}",
            f["projectId"].as_str().unwrap_or_default(),
            f["branchId"].as_str().unwrap_or_default(),
            f["error"].as_str().unwrap_or_default()
        );
    }
    if status != "success" {
        anyhow::bail!(
            "the volume is still at or above MAX_VOLUME_USAGE_PERCENT ({}%) after cleanup",
            report["maxUsagePercent"]
        );
    }
    Ok(())
}

/// A progress line on stderr for long transfers, only when stderr is a terminal.
fn progress_line(label: &'static str) -> Option<weldr_agent::sync::Progress> {
    use std::io::{IsTerminal, Write};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let last: Mutex<Option<Instant>> = Mutex::new(None);
    Some(weldr_agent::sync::Progress(Arc::new(move |done, total| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let finished = done >= total;
        if !finished && last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        *last = Some(Instant::now());
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let width = 30usize;
        let filled = ((pct / 100.0) * width as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{label} [{}{}] {:>5.1}% {:.1}/{:.1} MiB",
            "#".repeat(filled.min(width)),
            " ".repeat(width - filled.min(width)),
            pct,
            mib(done),
            mib(total)
        );
        if finished {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    })))
}

/// `sync push|pull`: works on the branch directory and the object store directly, so it runs
/// the same whether or not the server is up.
async fn sync_command(config: Config, command: SyncCommand) -> Result<()> {
    use weldr_agent::branches::BranchKey;
    use weldr_agent::sync::{self, PullReport};
    let (project_id, branch_id) = match &command {
        SyncCommand::Push {
            branch_id,
            project_id,
        }
        | SyncCommand::Pull {
            branch_id,
            project_id,
            ..
        } => (project_id.clone(), branch_id.clone()),
    };
    let bucket = config
        .s3
        .bucket
        .clone()
        .unwrap_or_else(|| sync::bucket_name(&project_id, &branch_id));
    let ids_ok =
        weldr_agent::ids::is_valid_id(&project_id) && weldr_agent::ids::is_valid_id(&branch_id);
    let result = if !ids_ok {
        Err(anyhow!(
            "projectId and branchId must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
        ))
    } else {
        match command {
            SyncCommand::Push { .. } => sync::push_with(
                &config,
                &BranchKey::new(&project_id, &branch_id),
                &sync::PushOptions {
                    progress: progress_line("push"),
                    ..Default::default()
                },
            )
            .await
            .map(|r| {
                println!("SYNC_STATUS=success");
                println!("BUCKET_NAME={}", r.bucket);
                println!("SNAPSHOT_ID={}", r.snapshot_id);
                println!("UNCHANGED={}", r.unchanged);
                println!("FILES={}", r.files);
                println!("BYTES={}", r.bytes);
                println!("UPLOADED_BYTES={}", r.uploaded_bytes);
            })
            .map_err(anyhow::Error::from),
            SyncCommand::Pull { snapshot, .. } => sync::pull_with(
                &config,
                &BranchKey::new(&project_id, &branch_id),
                snapshot.as_deref(),
                &sync::PullOptions {
                    progress: progress_line("pull"),
                },
            )
            .await
            .map(|r| match r {
                PullReport::Restored {
                    bucket,
                    snapshot_id,
                    files,
                    bytes,
                    ..
                } => {
                    println!("SYNC_STATUS=success");
                    println!("BUCKET_NAME={bucket}");
                    println!("SNAPSHOT_ID={snapshot_id}");
                    println!("FILES={files}");
                    println!("BYTES={bytes}");
                }
                PullReport::Skipped { bucket } => {
                    println!("SYNC_STATUS=skipped");
                    println!("BUCKET_NAME={bucket}");
                    println!("REASON=bucket_not_found");
                }
            })
            .map_err(anyhow::Error::from),
        }
    };
    if result.is_err() {
        println!("SYNC_STATUS=failed");
        println!("BUCKET_NAME={bucket}");
    }
    result
}

async fn one_call(
    config: Config,
    request: ControlRequest,
    print: impl FnOnce(Value),
) -> Result<()> {
    let mut target = Target::open(config).await?;
    let result = target.call(request).await;
    target.close().await;
    print(result?);
    Ok(())
}

async fn serve(config: Config) -> Result<()> {
    if let Some(p) = &config.project_id {
        tracing::info!(project = %p, "serving one project");
    }
    let app = App::open(config).map_err(|e| anyhow!("{e}"))?;
    weldr_agent::app::prepare(&app)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let server = weldr_agent::server::start(app.clone()).await?;
    println!("weldr-agent listening on {}", server.url());
    if app.config.mode == Mode::Local
        && let Some(token) = weldr_agent::auth::tokens::ensure_initial(&app.store)
            .await
            .map_err(|e| anyhow!("{e}"))?
    {
        println!("Local API token (shown only now): {token}");
        println!(
            "Send it as `Authorization: Bearer <token>`; `weldr-agent token create` makes more."
        );
    }
    server.run_until_signal().await;
    Ok(())
}
