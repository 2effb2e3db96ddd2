//! The `weldr-agent` command line. Every subcommand works whether or not the server runs: it
//! opens the store itself, or talks to the running server over its control socket.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;
use weldr_agent::app::App;
use weldr_agent::config::{Config, Mode, settings_rows};
use weldr_agent::control::{ControlClient, ControlRequest, ControlResult, execute};
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
    /// Restore the store from its backup in object storage (with the server stopped): the
    /// newest point, or the newest at or before `--at`. The server does this by itself at
    /// start when `state.redb` is missing. Prints RESTORED_GENERATION, RESTORED_TO,
    /// INCREMENTS and OPS.
    RestoreStore {
        /// A point in time (RFC 3339, e.g. 2026-12-05T01:02:03Z, or milliseconds since the
        /// epoch): restore the newest point of the backup at or before it.
        #[arg(long)]
        at: Option<String>,
        /// Replace an existing `state.redb` (it is kept beside as `state.redb.replaced-<ms>`).
        #[arg(long)]
        force: bool,
    },
    /// The integration catalog, and rendering it outside a branch.
    Integrations {
        #[command(subcommand)]
        command: IntegrationsCommand,
    },
    /// Manage local API tokens (sent as `Authorization: Bearer <token>`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum IntegrationsCommand {
    /// Print each integration: key, category, dependencies, template version.
    List,
    /// Render the base monorepo and the given integrations (dependencies first) into a
    /// directory, exactly as installs into a branch write them in local mode (`.env` files
    /// included). Prints each file written.
    Render {
        /// Where to render (made when missing).
        out: std::path::PathBuf,
        /// Integration keys, e.g. orpc tanstack-start postgresql better-auth.
        #[arg(required = true)]
        keys: Vec<String>,
        /// `DATABASE_URL` for the generated `.env`.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        database_url: String,
        /// The project id the templates are rendered for (names the packages).
        #[arg(long, default_value = "app")]
        project: String,
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
        /// A name to recognise the token by in `token list` and to revoke it with.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (id, creation time in UTC, name); never the secrets.
    List,
    /// Revoke a token by id (from `list`, at least 6 characters) or by name.
    Revoke {
        /// The token's id from `token list` (at least its first 6 characters), or its name.
        which: String,
    },
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Snapshot the branch directory into the store; prints SYNC_STATUS=success|failed and
    /// BUCKET_NAME=<bucket>, like the original sync-to-s3.sh.
    Push {
        /// The project, as in `/projects/{projectId}`.
        project_id: String,
        /// The branch of that project.
        branch_id: String,
    },
    /// Restore the latest (or a named) snapshot into the branch directory; prints
    /// SYNC_STATUS=success|skipped|failed, BUCKET_NAME=<bucket> and REASON=bucket_not_found
    /// when there is no snapshot yet.
    Pull {
        /// The project, as in `/projects/{projectId}`.
        project_id: String,
        /// The branch of that project.
        branch_id: String,
        /// Restore this snapshot (a SNAPSHOT_ID printed by `sync push`) instead of the latest.
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Register a project; prints PROJECT_ID=<id>.
    Create {
        /// The new project's id: 1-64 characters of A-Z, a-z, 0-9, `_` or `-`.
        project_id: String,
        /// A human-readable title (at most 200 characters).
        #[arg(long)]
        title: Option<String>,
    },
}

#[derive(Subcommand)]
enum BranchCommand {
    /// Create or reuse a branch directory (a git repository with an initial commit; its
    /// project is registered too when missing; a branch object storage holds is restored with
    /// its history); prints STATUS=created|restored|reused and BRANCH_DIR=<path>.
    Create {
        /// The project, as in `/projects/{projectId}`: 1-64 characters of A-Z, a-z, 0-9, `_`
        /// or `-`.
        project_id: String,
        /// The branch: the same characters.
        branch_id: String,
        /// Fork from `branchId` or `branchId@versionId` of the same (existing) project.
        #[arg(long, value_name = "BRANCH[@VERSION]")]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Append events to a branch stream; prints ID=<n> for each once it is durable.
    Append {
        /// The project, as in `/stream/{projectId}/{branchId}`.
        project_id: String,
        /// The branch of that project.
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
        /// The project, as in `/stream/{projectId}/{branchId}`.
        project_id: String,
        /// The branch of that project.
        branch_id: String,
        /// Print the events after this id (0: from the start of the retained log).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print at most this many events (1-10000).
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

    async fn call(&mut self, request: ControlRequest) -> Result<ControlResult> {
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
    // The file watcher's crate warns when a watched directory it is told to drop is already
    // gone (a restore swapping a branch's directory): noise, unless asked for by name.
    let directives = if config.log_level.contains("notify") {
        config.log_level.clone()
    } else {
        format!("{},notify=error", config.log_level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=error"));
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
            one_call(config, ControlRequest::Status, |result| match result {
                ControlResult::Status(report) => {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(())
                }
                other => Err(unexpected(other)),
            })
            .await
        }
        Command::Project {
            command: ProjectCommand::Create { project_id, title },
        } => {
            let request = ControlRequest::CreateProject { project_id, title };
            one_call(config, request, |result| match result {
                ControlResult::ProjectCreated { project_id } => {
                    println!("PROJECT_ID={project_id}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            })
            .await
        }
        Command::Branch {
            command:
                BranchCommand::Create {
                    project_id,
                    branch_id,
                    from,
                },
        } => {
            let request = ControlRequest::CreateBranch {
                project_id,
                branch_id,
                from,
            };
            one_call(config, request, |result| match result {
                ControlResult::BranchCreated(created) => {
                    println!("STATUS={}", created.status.as_str());
                    println!("BRANCH_DIR={}", created.branch_dir.display());
                    Ok(())
                }
                other => Err(unexpected(other)),
            })
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
                    Ok(ControlResult::Appended { id }) => {
                        writeln!(out, "ID={id}").and_then(|()| out.flush())
                    }
                    Ok(other) => {
                        result = Err(unexpected(other));
                        break;
                    }
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
        Command::RestoreStore { at, force } => restore_store(config, at, force).await,
        Command::Integrations { command } => integrations_command(command),
        Command::Token {
            command: TokenCommand::Create { name },
        } => {
            one_call(
                config,
                ControlRequest::CreateToken { name },
                |result| match result {
                    ControlResult::TokenCreated { token, .. } => {
                        println!("{token}");
                        Ok(())
                    }
                    other => Err(unexpected(other)),
                },
            )
            .await
        }
        Command::Token {
            command: TokenCommand::List,
        } => {
            one_call(config, ControlRequest::ListTokens, |result| match result {
                ControlResult::Tokens { tokens } if tokens.is_empty() => {
                    println!("no tokens; `weldr-agent token create --name <name>` makes one");
                    Ok(())
                }
                ControlResult::Tokens { tokens } => {
                    println!("{:<12}  {:<20}  NAME", "ID", "CREATED (UTC)");
                    for t in tokens {
                        println!(
                            "{:<12}  {:<20}  {}",
                            t.id,
                            utc_time(t.created_at_ms),
                            t.name
                        );
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            })
            .await
        }
        Command::Token {
            command: TokenCommand::Revoke { which },
        } => {
            one_call(
                config,
                ControlRequest::RevokeToken { which },
                |result| match result {
                    ControlResult::TokenRevoked { revoked } => {
                        println!("REVOKED={revoked}");
                        Ok(())
                    }
                    other => Err(unexpected(other)),
                },
            )
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
            let request = ControlRequest::ListEvents {
                project_id,
                branch_id,
                after,
                limit,
            };
            one_call(config, request, |result| match result {
                ControlResult::Events { events } => {
                    for e in events {
                        println!("{}", serde_json::to_string(&e)?);
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            })
            .await
        }
    }
}

/// A server that answers a request with another request's result: not the same version.
fn unexpected(result: ControlResult) -> anyhow::Error {
    anyhow!(
        "the server answered with an unexpected result ({result:?}); is it running another \
         version of weldr-agent?"
    )
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC, to the second.
fn utc_time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

/// `store recover`: on the store file itself; refused while a server holds it.
/// `restore-store`: the store from its backup, with the server stopped.
fn integrations_command(command: IntegrationsCommand) -> Result<()> {
    use weldr_agent::integrations::{self, catalog::Catalog};
    match command {
        IntegrationsCommand::List => {
            let catalog = Catalog::get().map_err(|e| anyhow!("{e}"))?;
            for i in &catalog.integrations {
                let m = &i.manifest;
                println!(
                    "{}\t{}\t{}\tdepends on: {}",
                    m.key,
                    m.category,
                    m.version,
                    if m.depends_on.is_empty() {
                        "-".to_string()
                    } else {
                        m.depends_on.join(", ")
                    }
                );
            }
            Ok(())
        }
        IntegrationsCommand::Render {
            out,
            keys,
            database_url,
            project,
        } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let written = integrations::render_into(&out, &keys, &project, &database_url)
                .map_err(|e| anyhow!("{e}"))?;
            for path in &written {
                println!("{path}");
            }
            println!("RENDERED={}", written.len());
            Ok(())
        }
    }
}

async fn restore_store(config: Config, at: Option<String>, force: bool) -> Result<()> {
    use weldr_agent::backup::{format::rfc3339, restore};
    let at_ms = at
        .as_deref()
        .map(restore::parse_point)
        .transpose()
        .map_err(|e| anyhow!("--at: {e}"))?;
    let path = config.store_path();
    let wal = weldr_storage::wal_path(&path);
    let objects =
        weldr_agent::sync::store::Store::open_store_backup(&config).map_err(|e| anyhow!("{e}"))?;
    let tmp = restore::restoring_path(&path);
    if path.exists() {
        if !force {
            bail!(
                "{} exists; stop the server and pass --force to replace it (the current file is                  kept beside it)",
                path.display()
            );
        }
        // Fails while a server holds the store.
        drop(
            weldr_storage::redb::Database::open(&path)
                .map_err(|e| anyhow!("{}: {e} (is the server running?)", path.display()))?,
        );
    }
    let _ = std::fs::remove_file(&tmp);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Built beside, then moved into place: a failed restore leaves the current store as it was.
    let built = path.with_file_name("state.redb.restored");
    let _ = std::fs::remove_file(&built);
    let restored = restore::restore(&objects, &built, at_ms, Vec::new())
        .await
        .map_err(|e| anyhow!("{e}"))?
        .ok_or_else(|| anyhow!("object storage holds no backup of the store"))?;
    if path.exists() {
        let aside = path.with_file_name(format!(
            "state.redb.replaced-{}",
            weldr_storage::writer::now_ms()
        ));
        std::fs::rename(&path, &aside)?;
        println!("REPLACED={}", aside.display());
    }
    let _ = std::fs::remove_file(&wal);
    std::fs::rename(&built, &path)?;
    for skipped in &restored.skipped {
        eprintln!("skipped: {skipped}");
    }
    println!("RESTORED_GENERATION={}", restored.generation);
    println!("RESTORED_TO={}", rfc3339(restored.at_ms));
    println!("FULL_COPY_AT={}", rfc3339(restored.copy_at_ms));
    println!("INCREMENTS={}", restored.increments);
    println!("OPS={}", restored.ops);
    Ok(())
}

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
        Ok(ControlResult::Cleanup(report)) => report,
        Ok(other) => {
            println!("CLEANUP_STATUS=failed");
            return Err(unexpected(other));
        }
        Err(e) => {
            println!("CLEANUP_STATUS=failed");
            return Err(e);
        }
    };
    let join = |names: Vec<String>| names.join(",");
    let status = if report.success { "success" } else { "failed" };
    println!("CLEANUP_STATUS={status}");
    println!("USAGE_BEFORE={:.1}", report.usage_before);
    println!("USAGE_AFTER={:.1}", report.usage_after);
    println!(
        "EVICTED={}",
        join(report.evicted.iter().map(|b| b.to_string()).collect())
    );
    println!(
        "SKIPPED={}",
        join(
            report
                .skipped
                .iter()
                .map(|(b, reason)| format!("{b}:{reason}"))
                .collect()
        )
    );
    println!(
        "FAILED={}",
        join(report.failed.iter().map(|(b, _)| b.to_string()).collect())
    );
    for (branch, error) in &report.failed {
        eprintln!("weldr-agent: {branch} was kept: {error}");
    }
    if !report.success {
        anyhow::bail!(
            "the volume is still at or above MAX_VOLUME_USAGE_PERCENT ({}%) after cleanup",
            report.max_usage_percent
        );
    }
    Ok(())
}

/// A progress line on stderr for long transfers, only when stderr is a terminal (indicatif
/// redraws it at most 20 times a second).
fn progress_line(label: &'static str) -> Option<weldr_agent::sync::Progress> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        .with_prefix(label)
        .with_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {percent:>3}% {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("## "),
        );
    Some(weldr_agent::sync::Progress(Arc::new(move |done, total| {
        if bar.is_finished() {
            return;
        }
        bar.set_length(total);
        // Uploads report from several threads: a late, smaller count never moves it back.
        bar.set_position(done.max(bar.position()));
        if done >= total {
            bar.finish();
        }
    })))
}

/// `sync push|pull`: works on the branch directory and the object store directly, so it runs
/// the same whether or not the server is up.
async fn sync_command(config: Config, command: SyncCommand) -> Result<()> {
    use weldr_agent::branches::BranchKey;
    use weldr_agent::sync::{self, PullReport};
    let (project_id, branch_id) = match &command {
        SyncCommand::Push {
            project_id,
            branch_id,
        }
        | SyncCommand::Pull {
            project_id,
            branch_id,
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

/// Run one request and print its result with `print`.
async fn one_call(
    config: Config,
    request: ControlRequest,
    print: impl FnOnce(ControlResult) -> Result<()>,
) -> Result<()> {
    let mut target = Target::open(config).await?;
    let result = target.call(request).await;
    target.close().await;
    print(result?)
}

async fn serve(config: Config) -> Result<()> {
    if let Some(p) = &config.project_id {
        tracing::info!(project = %p, "serving one project");
    }
    if let Some(url) = &config.database_url {
        let mode =
            weldr_agent::pgconn::check(url.expose()).map_err(|e| anyhow!("DATABASE_URL: {e}"))?;
        tracing::info!(sslmode = ?mode, "sessions from Postgres");
    }
    match weldr_agent::backup::restore_at_start(&config).await {
        Ok(Some(restored)) => {
            use weldr_agent::backup::format::rfc3339;
            for skipped in &restored.skipped {
                tracing::warn!(skipped, "store backup: passed over");
            }
            tracing::info!(
                generation = %restored.generation,
                restored_to = %rfc3339(restored.at_ms),
                increments = restored.increments,
                ops = restored.ops,
                "the store was missing: restored it from its backup"
            );
            println!(
                "Restored the store from its backup (generation {}, up to {})",
                restored.generation,
                rfc3339(restored.at_ms)
            );
        }
        Ok(None) => {}
        Err(e) => bail!(
            "the store is missing and its backup cannot be restored: {e}\n(start with              STORE_BACKUP=off to begin with an empty store instead)"
        ),
    }
    let app = App::open(config).map_err(|e| anyhow!("{e}"))?;
    if app.config.store_backup.enabled && app.backup.is_none() {
        eprintln!("warning: the store is not backed up (see the log)");
    }
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
