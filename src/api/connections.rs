//! How many connections the HTTP server keeps at once, in front of salvo.
//!
//! [`CappedListener`] is the server's listener (plain, or under salvo's rustls listener). Its
//! acceptor takes a slot for every new connection before anything is allocated for it; the
//! connection holds the slot until hyper drops it, whatever it serves (HTTP/1.1, h2c, or h2
//! and HTTP/1.1 over TLS). Past `MAX_CONNECTIONS`, [`HEALTH_RESERVE`] more connections are let
//! in with a short head timeout, and [`ReserveGate`] answers every request on them but `GET
//! /health` with 503, so the machine's health check answers during a flood. Beyond those, a
//! plain connection gets a fixed 503 written without reading anything, and is closed (a TLS
//! one is closed at once: it cannot read an answer before its handshake).
//!
//! The request head timeout (`REQUEST_HEAD_TIMEOUT_SECONDS`) is salvo's fuse timeout, which
//! bounds the protocol-detection read and hyper's own head read together, and an idle
//! keep-alive connection's wait for its next head.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use salvo::conn::tcp::TcpCoupler;
use salvo::conn::{Accepted, Acceptor, Holding, Listener, StraightStream};
use salvo::fuse::{ArcFusePolicy, FuseAction, FuseInfo, TransProto};
use salvo::http::header::{CONNECTION, RETRY_AFTER};
use salvo::http::uri::Scheme;
use salvo::http::{HeaderValue, StatusCode, Version};
use salvo::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections beyond `MAX_CONNECTIONS` that may still ask for `/health`.
pub const HEALTH_RESERVE: usize = 16;
/// How long a reserve connection may take to send its request head: it holds one of few
/// slots, and an idle one must not keep the health check out.
const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// The answer to everything but `/health` on a reserve connection.
const TOO_BUSY_BODY: &str = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit (MAX_CONNECTIONS); retry shortly"}}"#;

/// How many connections are served at once, and how long a request head may take.
#[derive(Clone)]
pub struct ConnectionLimits {
    inner: Arc<Limits>,
}

struct Limits {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    head_timeout: Duration,
    /// The peers of the open reserve connections (a count per address, in case a closing
    /// connection's address is reused before its slot is given back).
    reserved: Mutex<HashMap<SocketAddr, usize>>,
    /// How many entries `reserved` holds: requests skip the lock while it is 0.
    reserved_count: AtomicUsize,
}

impl ConnectionLimits {
    pub fn new(max_connections: usize, head_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Limits {
                general: Arc::new(Semaphore::new(max_connections.max(1))),
                reserve: Arc::new(Semaphore::new(HEALTH_RESERVE)),
                head_timeout,
                reserved: Mutex::new(HashMap::new()),
                reserved_count: AtomicUsize::new(0),
            }),
        }
    }

    /// A slot for a new connection from `peer`: a general one, else a reserve one (for
    /// `/health` only), else none.
    fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        if let Ok(permit) = self.inner.general.clone().try_acquire_owned() {
            return Some(Slot::General(permit));
        }
        let permit = self.inner.reserve.clone().try_acquire_owned().ok()?;
        *self.reserved().entry(peer).or_default() += 1;
        self.inner.reserved_count.fetch_add(1, Ordering::AcqRel);
        Some(Slot::Reserve {
            _permit: permit,
            limits: self.inner.clone(),
            peer,
        })
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, usize>> {
        self.inner.reserved()
    }

    /// Whether the connection from `peer` holds a reserve slot.
    fn is_reserve(&self, peer: Option<SocketAddr>) -> bool {
        if self.inner.reserved_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        peer.is_some_and(|peer| self.reserved().contains_key(&peer))
    }

    /// The hoop that keeps reserve connections to `/health`.
    pub fn reserve_gate(&self) -> ReserveGate {
        ReserveGate(self.clone())
    }
}

impl Limits {
    fn reserved(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, usize>> {
        // The map stays consistent whatever panicked while holding it.
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place under [`ConnectionLimits`], given back when it is dropped.
enum Slot {
    General(#[allow(dead_code)] OwnedSemaphorePermit),
    Reserve {
        _permit: OwnedSemaphorePermit,
        limits: Arc<Limits>,
        peer: SocketAddr,
    },
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Slot::Reserve { limits, peer, .. } = self {
            let mut reserved = limits.reserved();
            if let Some(n) = reserved.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    reserved.remove(peer);
                }
                limits.reserved_count.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Whether the listener speaks plain HTTP or sits under TLS (which decides how a connection
/// past every limit is turned away).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
}

/// A bound TCP listener whose connections are counted against [`ConnectionLimits`].
pub struct CappedListener {
    listener: TcpListener,
    limits: ConnectionLimits,
    transport: Transport,
}

impl CappedListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits, transport: Transport) -> Self {
        Self {
            listener,
            limits,
            transport,
        }
    }
}

impl Listener for CappedListener {
    type Acceptor = CappedAcceptor;

    async fn try_bind(self) -> salvo::Result<Self::Acceptor> {
        Ok(CappedAcceptor::new(
            self.listener,
            self.limits,
            self.transport,
        )?)
    }
}

/// salvo's acceptor for a [`CappedListener`].
pub struct CappedAcceptor {
    holdings: Vec<Holding>,
    listener: TcpListener,
    limits: ConnectionLimits,
    transport: Transport,
}

impl CappedAcceptor {
    /// The acceptor of an already bound `listener` (for TLS, put a [`CappedListener`] under
    /// salvo's rustls listener instead).
    pub fn new(
        listener: TcpListener,
        limits: ConnectionLimits,
        transport: Transport,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            holdings: vec![Holding {
                local_addr: local.into(),
                // h2c with prior knowledge is told apart from HTTP/1.1 by its preface.
                http_versions: vec![Version::HTTP_11, Version::HTTP_2],
                http_scheme: Scheme::HTTP,
            }],
            listener,
            limits,
            transport,
        })
    }
}

/// The fixed answer to a plain connection past every limit.
fn too_busy_response() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: \
         {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{TOO_BUSY_BODY}",
        TOO_BUSY_BODY.len()
    )
}

impl Acceptor for CappedAcceptor {
    type Coupler = TcpCoupler<Self::Stream>;
    type Stream = StraightStream<SlottedStream>;

    fn holdings(&self) -> &[Holding] {
        &self.holdings
    }

    async fn accept(
        &mut self,
        fuse_policy: Option<ArcFusePolicy>,
    ) -> io::Result<Accepted<Self::Coupler, Self::Stream>> {
        let local_addr = self.holdings[0].local_addr.clone();
        loop {
            let (conn, peer) = match self.listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.limits.admit(peer) else {
                if self.transport == Transport::Plain {
                    // Only if the socket takes it at once: nothing is queued for this peer.
                    let _ = conn.try_write(too_busy_response().as_bytes());
                }
                continue;
            };
            let _ = conn.set_nodelay(true);
            let conn_ctrl = salvo::conn::ConnCtrl::new();
            let (fuse_config, observer) = match &fuse_policy {
                Some(policy) => {
                    let info = FuseInfo {
                        trans_proto: TransProto::Tcp,
                        remote_addr: peer.into(),
                        local_addr: local_addr.clone(),
                    };
                    match policy.decide(&info).await {
                        FuseAction::Accept(mut config) => {
                            if matches!(slot, Slot::Reserve { .. }) {
                                let head = config
                                    .http1_header_timeout
                                    .unwrap_or(self.limits.inner.head_timeout)
                                    .min(RESERVE_HEAD_TIMEOUT);
                                config = config
                                    .with_http1_header_timeout(head)
                                    .with_tls_handshake_timeout(RESERVE_HEAD_TIMEOUT);
                            }
                            (Some(config), policy.observe(&info, &conn_ctrl))
                        }
                        FuseAction::Reject => continue,
                    }
                }
                None => (None, None),
            };
            return Ok(Accepted {
                coupler: TcpCoupler::new(),
                stream: StraightStream::new(
                    SlottedStream { conn, _slot: slot },
                    fuse_config,
                    conn_ctrl.clone(),
                    observer,
                ),
                fuse_config,
                conn_ctrl,
                remote_addr: peer.into(),
                local_addr,
                http_scheme: Scheme::HTTP,
            });
        }
    }
}

/// A connection with its slot, given back when hyper drops it.
pub struct SlottedStream {
    conn: TcpStream,
    _slot: Slot,
}

impl AsyncRead for SlottedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlottedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

/// Keeps reserve connections to `GET /health`: anything else on them gets 503, and every
/// answer on them closes the connection so that the slot is free for the next check.
pub struct ReserveGate(ConnectionLimits);

#[async_trait]
impl Handler for ReserveGate {
    async fn handle(
        &self,
        req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        if !self.0.is_reserve(req.remote_addr().clone().into_std()) {
            return;
        }
        if req.version() < Version::HTTP_2 {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if req.method() == salvo::http::Method::GET && req.uri().path() == "/health" {
            return;
        }
        res.status_code(StatusCode::SERVICE_UNAVAILABLE);
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        res.render(Text::Json(TOO_BUSY_BODY));
        ctrl.skip_rest();
    }
}
