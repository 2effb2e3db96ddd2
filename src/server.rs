//! Running the HTTP server and the control socket, and stopping them within a budget.
//!
//! Shutdown order: cancel the app token (SSE streams end, workers stop), stop accepting and let
//! in-flight requests finish while dirty branches are pushed to object storage, both within the
//! budget; stop the control socket, then flush and close the redb writer. Never waits on open
//! streams: they end with the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use salvo::conn::rustls::{Keycert, RustlsConfig, RustlsListener};
use salvo::conn::{Acceptor, Listener};
use salvo::fuse::FuseConfig;
use salvo::prelude::*;
use salvo::server::ServerHandle;
use tokio::task::JoinHandle;

use crate::api::connections::{
    CappedAcceptor, CappedListener, ConnectionLimits, HEALTH_RESERVE, Transport,
};
use crate::app::App;
use crate::control::ControlServer;
use crate::sync::dirty::DirtyWatcher;
use crate::sync::syncer::SyncWorker;

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 64;
/// HTTP/2 flow-control window for request data, per connection and per stream.
const H2_RECEIVE_WINDOW: u32 = 256 * 1024;

pub struct RunningServer {
    pub addr: SocketAddr,
    pub scheme: &'static str,
    pub app: Arc<App>,
    handle: ServerHandle,
    task: JoinHandle<()>,
    control: Option<ControlServer>,
    watcher: Option<DirtyWatcher>,
}

/// Bind `HOST:PORT` from the config (HTTPS when `TLS_CERT_PATH`/`TLS_KEY_PATH` are set) and
/// serve, with the control socket.
pub async fn start(app: Arc<App>) -> std::io::Result<RunningServer> {
    let addr = SocketAddr::new(app.config.host, app.config.port);
    let control = ControlServer::start(app.clone()).await?;
    let listener = listen(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e} (is PORT taken?)"),
        )
    })?;
    let mut server = match app.config.tls.clone() {
        Some((cert, key)) => {
            // ALPN offers h2 and http/1.1.
            let keycert = Keycert::new().cert_from_path(&cert)?.key_from_path(&key)?;
            let limits = connection_limits(&app);
            let capped = CappedListener::new(listener, limits.clone(), Transport::Tls);
            let acceptor = RustlsListener::new(RustlsConfig::new(keycert), capped)
                .try_bind()
                .await
                .map_err(|e| {
                    std::io::Error::other(format!("cannot listen with TLS on {addr}: {e}"))
                })?;
            let bound = acceptor
                .holdings()
                .first()
                .and_then(|h| h.local_addr.clone().into_std())
                .unwrap_or(addr);
            spawn_server(app, acceptor, bound, "https", limits)
        }
        None => start_on(app, listener)?,
    };
    server.control = Some(control);
    Ok(server)
}

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`).
/// When every client of a restarted machine reconnects at once, a full queue drops their SYNs
/// and each dropped one waits a whole second for its retransmission: tokio's default of 1,024
/// is too small for that.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serve plain HTTP (HTTP/1.1, and h2c with prior knowledge) on an already bound listener
/// (tests bind 127.0.0.1:0).
pub fn start_on(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let limits = connection_limits(&app);
    let acceptor = CappedAcceptor::new(listener, limits.clone(), Transport::Plain)?;
    Ok(spawn_server(app, acceptor, addr, "http", limits))
}

/// The connection caps of the listener: `MAX_CONNECTIONS` and the request head timeout.
fn connection_limits(app: &App) -> ConnectionLimits {
    ConnectionLimits::new(max_connections(app), app.config.request_head_timeout)
}

/// Raise the soft limit of open files to the hard limit (a flood of connections otherwise
/// runs the server out of descriptors long before memory); the limit in force after.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), max) = (limit.current, limit.maximum) else {
        // Unlimited.
        return u64::MAX;
    };
    if max.is_none_or(|max| current < max) {
        let mut raised = limit;
        raised.current = max;
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return max.unwrap_or(u64::MAX);
        }
    }
    current
}

/// `MAX_CONNECTIONS`, or three quarters of the file descriptor limit (raised first): the rest
/// is for the store, branch files, git, the agent's commands and upstream connections.
fn max_connections(app: &App) -> usize {
    let fds = raise_fd_limit();
    let derived = usize::try_from(fds / 4 * 3).unwrap_or(usize::MAX).max(64);
    // An unlimited descriptor limit (or a huge setting) must not size a semaphore past what
    // it can hold: a million connections is far beyond one machine anyway.
    let max = app.config.max_connections.unwrap_or(derived).min(1 << 20);
    let wanted = (max + HEALTH_RESERVE) as u64;
    if wanted.saturating_add(64) > fds {
        tracing::warn!(
            max_connections = max,
            fd_limit = fds,
            "MAX_CONNECTIONS is close to the open-file limit: a flood can run the server out of descriptors"
        );
    }
    max
}

/// salvo's per-connection protection: the request head timeout (Slowloris), besides salvo's
/// defaults.
fn fuse_config(app: &App) -> FuseConfig {
    FuseConfig::default().with_http1_header_timeout(app.config.request_head_timeout)
}

fn spawn_server<A: Acceptor + Send + 'static>(
    app: Arc<App>,
    acceptor: A,
    addr: SocketAddr,
    scheme: &'static str,
    limits: ConnectionLimits,
) -> RunningServer {
    let mut server = Server::new(acceptor).fuse_config(fuse_config(&app));
    server
        .http1_mut()
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    // HTTP/2: the same head limit as HTTP/1.1, and receive windows that bound what one
    // connection can make the server buffer before its handlers read it (hyper's default is
    // 1 MiB per connection; request bodies are small JSON).
    server
        .http2_mut()
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .initial_connection_window_size(H2_RECEIVE_WINDOW)
        .initial_stream_window_size(H2_RECEIVE_WINDOW);
    let handle = server.handle();
    let watcher = start_workers(&app);
    let service = crate::api::service(app.clone()).hoop(limits.reserve_gate());
    let task = tokio::spawn(async move { server.serve(service).await });
    tracing::info!(%addr, scheme, mode = app.config.mode.as_str(), "listening");
    RunningServer {
        addr,
        scheme,
        app,
        handle,
        task,
        control: None,
        watcher: Some(watcher),
    }
}

/// The background workers: workflow recovery, a full rescan (changes made while the server
/// was down count), the syncer, the disk watermark pass and the shared directory watcher (a
/// thread of its own, or periodic rescans where inotify is not to be had). They stop with the
/// app's shutdown token and are joined in [`RunningServer::shutdown`].
fn start_workers(app: &Arc<App>) -> DirtyWatcher {
    let workers = &app.workers;
    workers.spawn(crate::workflow::Recovery::new(app.workflows.clone()));
    workers.spawn(crate::residency::Discover::new(app.residency.clone()));
    workers.spawn(crate::integrations::Installer::new(
        app.integrations.clone(),
    ));
    let syncer = app.syncer.clone();
    tokio::task::spawn_blocking(move || syncer.mark_all_dirty());
    workers.spawn(SyncWorker::new(app.syncer.clone()));
    if let Some(mirrors) = &app.mirrors {
        for worker in mirrors.take_workers() {
            workers.spawn(worker);
        }
    }
    if let Some(backup) = &app.backup {
        workers.spawn(crate::backup::BackupWorker::new(backup.clone()));
    }
    if let Some(evict) = crate::evict::EvictWorker::new(app.evictor.clone()) {
        workers.spawn(evict);
    }
    let (watcher, rescan) = DirtyWatcher::start(app.base.clone(), app.syncer.clone());
    if let Some(rescan) = rescan {
        workers.spawn(rescan);
    }
    watcher
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stop within the configured budget; the store is flushed and closed when this returns.
    pub async fn shutdown(self) {
        let budget = self.app.config.shutdown_timeout;
        tracing::info!(budget_secs = budget.as_secs(), "shutting down");
        self.app.shutdown.cancel();
        self.handle.stop_graceful(Some(budget));
        let http = async {
            if tokio::time::timeout(budget + Duration::from_secs(1), self.task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "HTTP connections still open after the shutdown budget; closing anyway"
                );
            }
        };
        let push = async {
            if tokio::time::timeout(budget, self.app.syncer.flush())
                .await
                .is_err()
            {
                tracing::warn!(
                    branches = ?self.app.syncer.dirty_branches(),
                    "shutdown budget spent before every dirty branch was pushed; they are pushed after the next start"
                );
            }
        };
        tokio::join!(http, push, self.app.workers.join(budget));
        if let Some(watcher) = self.watcher {
            let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
        }
        if let Some(control) = self.control {
            control.stop().await;
        }
        if let Some(backup) = &self.app.backup
            && let Err(e) = tokio::time::timeout(budget, backup.flush())
                .await
                .unwrap_or_else(|_| Err(crate::backup::BackupError::Refused("timed out".into())))
        {
            tracing::warn!(error = %e, "the store's last changes were not shipped to its backup; the next start makes a full copy");
        }
        let store = self.app.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("stopped");
    }

    /// Serve until SIGTERM or SIGINT, then shut down.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        self.shutdown().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
