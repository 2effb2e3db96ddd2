//! `GET /stream/{projectId}/{branchId}` served straight on the TCP connection, past hyper.
//!
//! An SSE subscriber is a connection that stays open for hours and mostly idles. Through hyper
//! each one keeps two 8 KiB buffers (request read and header write) and a body channel for its
//! whole life; many idle subscribers are mostly those buffers. Here a stream costs its
//! subscription and one small task: the request head is peeked into a buffer that is freed
//! before the first event, and frames are written from the shared ring bytes.
//!
//! The plain-HTTP listener's accept loop peeks at each new connection. A complete, ordinary
//! HTTP/1.1 `GET /stream/{id}/{id}` head without a body is served here; anything else (another
//! route, HTTP/1.0, a body, odd headers, an incomplete head, TLS) goes to salvo untouched,
//! bytes included, and gets salvo's answer. The salvo route stays (documented in the OpenAPI
//! document, and used over TLS and by keep-alive connections). Both run the same checks
//! ([`super::stream::open`]), send the same JSON errors, CORS headers and frames.
//!
//! The accept loop also keeps the connection count bounded ([`ConnectionLimits`]): a
//! connection takes a slot before anything is allocated for it and holds it until it closes,
//! whichever path serves it. Past `MAX_CONNECTIONS`, a few reserve slots serve only `GET
//! /health` (so the machine's health check answers during a flood); beyond those a connection
//! gets a fixed 503 and is closed at once. A connection that has not sent its request head
//! within `REQUEST_HEAD_TIMEOUT_SECONDS` of its accept is closed.

use std::io::{self, ErrorKind};
use std::net::SocketAddr as StdSocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use salvo::conn::tcp::TcpCoupler;
use salvo::conn::{Accepted, Acceptor, Holding, StraightStream};
use salvo::fuse::{ArcFusePolicy, FuseAction, FuseInfo, TransProto};
use salvo::http::header::{HeaderName, HeaderValue};
use salvo::http::uri::Scheme;
use salvo::http::{HeaderMap, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::ApiError;
use crate::app::App;
use crate::auth::limits::ConnectionGuard;
use crate::stream::Subscription;

/// Largest request head served here (bigger ones go to salvo, which has the real limits).
const PEEK_LIMIT: usize = 16 * 1024;
/// Most header lines served here.
const MAX_DIRECT_HEADERS: usize = 48;
/// How long a new connection may take to send a complete head before salvo gets it.
const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections accepted but not yet taken by salvo.
const HANDOFF_QUEUE: usize = 1024;
/// Connections beyond the limit that may still ask for `/health`.
pub const HEALTH_RESERVE: usize = 16;
/// How long a reserve connection may take to show that it asks for `/health`.
const RESERVE_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// How many connections are served at once, and how long a request head may take.
#[derive(Clone)]
pub struct ConnectionLimits {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    head_timeout: Duration,
}

impl ConnectionLimits {
    pub fn new(max_connections: usize, head_timeout: Duration) -> Self {
        Self {
            general: Arc::new(Semaphore::new(max_connections.max(1))),
            reserve: Arc::new(Semaphore::new(HEALTH_RESERVE)),
            head_timeout,
        }
    }

    /// A slot for a new connection: a general one, else a reserve one (for `/health`
    /// only), else none.
    fn admit(&self) -> Option<Slot> {
        if let Ok(permit) = self.general.clone().try_acquire_owned() {
            return Some(Slot::General(permit));
        }
        self.reserve
            .clone()
            .try_acquire_owned()
            .ok()
            .map(Slot::Reserve)
    }
}

/// A connection's place under [`ConnectionLimits`], given back when it is dropped.
enum Slot {
    General(#[allow(dead_code)] OwnedSemaphorePermit),
    Reserve(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// The fixed answer to a connection past every limit: written without reading the request
/// (nor allocating), then the connection is closed.
static TOO_BUSY: LazyLock<Box<[u8]>> = LazyLock::new(|| {
    let body = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit (MAX_CONNECTIONS); retry shortly"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: \
         {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into_boxed_slice()
});

/// Answer 503 if the socket takes it at once, and close.
fn refuse(conn: TcpStream) {
    let _ = conn.try_write(&TOO_BUSY);
    drop(conn);
}

/// A connection on its way to salvo, with its slot and when it was accepted.
struct Handoff {
    conn: TcpStream,
    remote: StdSocketAddr,
    slot: Slot,
    accepted_at: Instant,
}

/// A connection served by salvo: the socket with its slot, freed when hyper drops it.
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

/// salvo's acceptor for a plain-HTTP listener whose stream requests are served directly.
pub struct SplitAcceptor {
    holdings: Vec<Holding>,
    rx: mpsc::Receiver<Handoff>,
    head_timeout: Duration,
}

impl SplitAcceptor {
    /// Take over `listener`: its accept loop runs until the app shuts down or salvo drops
    /// this acceptor.
    pub fn new(app: Arc<App>, listener: TcpListener, limits: ConnectionLimits) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
        let head_timeout = limits.head_timeout;
        tokio::spawn(accept_loop(app, listener, tx, limits));
        Ok(Self {
            holdings: vec![Holding {
                local_addr: local.into(),
                http_versions: vec![Version::HTTP_11],
                http_scheme: Scheme::HTTP,
            }],
            rx,
            head_timeout,
        })
    }
}

impl Acceptor for SplitAcceptor {
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
            let Some(Handoff {
                conn,
                remote,
                slot,
                accepted_at,
            }) = self.rx.recv().await
            else {
                // The listener stopped (shutdown): salvo is draining and stops on its own;
                // an error here would only make it log and retry.
                return std::future::pending().await;
            };
            let conn_ctrl = salvo::conn::ConnCtrl::new();
            let (fuse_config, observer) = match &fuse_policy {
                Some(policy) => {
                    let info = FuseInfo {
                        trans_proto: TransProto::Tcp,
                        remote_addr: remote.into(),
                        local_addr: local_addr.clone(),
                    };
                    match policy.decide(&info).await {
                        FuseAction::Accept(config) => {
                            // The head must be complete within the timeout of the accept,
                            // not of this hand-over.
                            let left = self.head_timeout.saturating_sub(accepted_at.elapsed());
                            let config = config.with_http1_header_timeout(left);
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
                remote_addr: remote.into(),
                local_addr,
                http_scheme: Scheme::HTTP,
            });
        }
    }
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    to_salvo: mpsc::Sender<Handoff>,
    limits: ConnectionLimits,
) {
    loop {
        let accepted = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = to_salvo.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (conn, remote) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted_at = Instant::now();
        let Some(slot) = limits.admit() else {
            refuse(conn);
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (app, to_salvo) = (app.clone(), to_salvo.clone());
        let head_timeout = limits.head_timeout;
        tokio::spawn(async move {
            if let Slot::Reserve(_) = slot {
                let peek = RESERVE_PEEK_TIMEOUT.min(head_timeout);
                if asks_for_health(&conn, peek).await {
                    let handoff = Handoff {
                        conn,
                        remote,
                        slot,
                        accepted_at,
                    };
                    let _ = to_salvo.send(handoff).await;
                } else {
                    refuse(conn);
                }
                return;
            }
            // Everything before the first event is boxed and freed once done: an idle
            // subscriber's task holds only the streaming state.
            let deadline = accepted_at + head_timeout.min(CLASSIFY_TIMEOUT);
            let handoff = Handoff {
                conn,
                remote,
                slot,
                accepted_at,
            };
            let Some(mut open) = Box::pin(prepare(app.clone(), handoff, deadline, to_salvo)).await
            else {
                return;
            };
            let lapsed = super::stream::until_lapsed(app, open.credential);
            stream_to(&mut open.conn, open.subscription, &open.cors, lapsed).await;
            drop(open.slot);
            drop(open.conn_slot);
            let _ = open.conn.shutdown().await;
        });
    }
}

/// A stream request this module serves.
struct StreamRequest {
    head_len: usize,
    project_id: String,
    branch_id: String,
    last_event_id: Option<String>,
    headers: HeaderMap,
}

/// Whether the connection's request starts `GET /health` (peeked, never read) within
/// `timeout`.
async fn asks_for_health(conn: &TcpStream, timeout: Duration) -> bool {
    const PREFIXES: [&[u8]; 2] = [b"GET /health ", b"GET /health?"];
    let mut buf = [0u8; 12];
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, conn.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || !PREFIXES.iter().any(|p| p.starts_with(&buf[..n])) {
            return false;
        }
        if n == buf.len() {
            return true;
        }
        if Instant::now() + pause >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Peek (never read) at the connection until its head is complete: Some if it is an ordinary
/// stream request, None for everything that salvo must see.
async fn classify(conn: &TcpStream, deadline: Instant) -> Option<StreamRequest> {
    const PREFIX: &[u8] = b"GET /stream/";
    // Most heads fit the small buffer; a bigger one (long cookies) gets the large one.
    let mut buf = vec![0u8; 2048];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = tokio::time::timeout_at(deadline, conn.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        let seen = &buf[..n];
        let prefix = &PREFIX[..n.min(PREFIX.len())];
        if n == 0 || !seen.starts_with(prefix) {
            return None;
        }
        if seen.windows(4).any(|w| w == b"\r\n\r\n") {
            return parse(seen);
        }
        if n == buf.len() {
            if buf.len() >= PEEK_LIMIT {
                return None;
            }
            buf.resize(PEEK_LIMIT, 0);
            continue;
        }
        // The rest of the head is still on its way: peek again shortly.
        if tokio::time::Instant::now() + pause >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn parse(seen: &[u8]) -> Option<StreamRequest> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_DIRECT_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(seen) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return None;
    }
    let target = req.path?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut parts = path.strip_prefix("/stream/")?.split('/');
    let (project_id, branch_id) = (parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !crate::ids::is_valid_id(project_id)
        || !crate::ids::is_valid_id(branch_id)
    {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A request body, an upgrade or an expectation: salvo's business.
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "upgrade" | "expect"
        ) && !(name == "content-length" && h.value == b"0")
        {
            return None;
        }
        headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let last_event_id = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v.into_owned())
    });
    Some(StreamRequest {
        head_len,
        project_id: project_id.to_string(),
        branch_id: branch_id.to_string(),
        last_event_id,
        headers,
    })
}

/// A stream request that passed every check, ready to stream.
struct OpenStream {
    conn: TcpStream,
    subscription: Subscription,
    slot: Option<ConnectionGuard>,
    cors: String,
    credential: crate::auth::Credential,
    /// The connection's place under [`ConnectionLimits`].
    conn_slot: Slot,
}

/// Classify the connection: hand it to salvo, answer a refused stream request, or return the
/// opened stream.
async fn prepare(
    app: Arc<App>,
    handoff: Handoff,
    deadline: Instant,
    to_salvo: mpsc::Sender<Handoff>,
) -> Option<OpenStream> {
    let Some(request) = classify(&handoff.conn, deadline).await else {
        let _ = to_salvo.send(handoff).await;
        return None;
    };
    let Handoff {
        mut conn,
        slot: conn_slot,
        ..
    } = handoff;
    // Consume the head that was only peeked so far.
    let mut head = vec![0u8; request.head_len];
    conn.read_exact(&mut head).await.ok()?;
    drop(head);
    let cors = cors_headers(&app, &request.headers);
    let opened = async {
        let (principal, credential) = app.auth.authenticate(&app.store, &request.headers).await?;
        let cursor = super::stream::cursor_of(
            request.headers.get("last-event-id"),
            request.last_event_id.as_deref(),
        )?;
        super::stream::open(
            &app,
            &principal,
            &crate::branches::BranchKey::new(&request.project_id, &request.branch_id),
            cursor,
        )
        .await
        .map(|(subscription, slot)| (subscription, slot, credential))
    }
    .await;
    match opened {
        Ok((subscription, slot, credential)) => Some(OpenStream {
            conn,
            subscription,
            slot,
            cors,
            credential,
            conn_slot,
        }),
        Err(e) => {
            let _ = write_error(&mut conn, &e, &cors).await;
            let _ = conn.shutdown().await;
            None
        }
    }
}

/// The CORS headers salvo's `Cors` handler adds to a simple request from an allowed origin.
fn cors_headers(app: &App, headers: &HeaderMap) -> String {
    let origin = headers.get("origin").and_then(|o| o.to_str().ok());
    match origin {
        Some(origin) if app.config.cors_origins.iter().any(|o| o == origin) => format!(
            "access-control-allow-origin: {origin}\r\naccess-control-allow-credentials: \
             true\r\nvary: origin, access-control-request-method, access-control-request-headers\r\n"
        ),
        _ => String::new(),
    }
}

async fn write_error(conn: &mut TcpStream, e: &ApiError, cors: &str) -> io::Result<()> {
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    let retry = e
        .retry_after_secs
        .map(|secs| format!("retry-after: {secs}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: \
         {len}\r\nconnection: close\r\n{retry}{cors}\r\n",
        status = status_line(e.status),
        len = body.len(),
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    conn.write_all(&out).await
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    )
}

/// Write the stream as a chunked body until it ends (shutdown, or `lapsed`: the credential
/// stopped holding) or the client goes away.
async fn stream_to(
    conn: &mut TcpStream,
    mut sub: Subscription,
    cors: &str,
    lapsed: impl Future<Output = ()>,
) {
    let mut first = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: \
         no-cache\r\nx-accel-buffering: no\r\nconnection: close\r\ntransfer-encoding: \
         chunked\r\n{cors}\r\n"
    )
    .into_bytes();
    // The first events of a replay go out with the head, in one write.
    let first_chunk = sub.first_chunk().await;
    if !first_chunk.is_empty() {
        push_chunk(&mut first, &first_chunk);
    }
    drop(first_chunk);
    if conn.write_all(&first).await.is_err() {
        return;
    }
    drop(first);
    let mut lapsed = std::pin::pin!(lapsed);
    loop {
        let chunk = {
            // Kept across wake-ups: a subscription's next chunk must never be dropped
            // half-made while the connection lives.
            let next = sub.next_chunk();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    chunk = &mut next => break chunk,
                    () = &mut lapsed => break None,
                    ready = conn.readable() => {
                        if ready.is_err() {
                            return;
                        }
                        // A GET has no body: bytes or EOF here mean the client is done.
                        match conn.try_read(&mut [0u8; 32]) {
                            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                            _ => return,
                        }
                    }
                }
            }
        };
        let Some(chunk) = chunk else {
            let _ = conn.write_all(b"0\r\n\r\n").await;
            return;
        };
        let mut out = Vec::with_capacity(chunk.len() + 16);
        push_chunk(&mut out, &chunk);
        drop(chunk);
        if conn.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_stream_gets_are_served_directly() {
        let ok = parse(
            b"GET /stream/p1/main?lastEventId=5 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (ok.project_id.as_str(), ok.branch_id.as_str()),
            ("p1", "main")
        );
        assert_eq!(ok.last_event_id.as_deref(), Some("5"));
        assert_eq!(ok.headers["last-event-id"], "7");
        for other in [
            &b"GET /stream/p1/main HTTP/1.0\r\n\r\n"[..],
            b"POST /stream/p1/main HTTP/1.1\r\n\r\n",
            b"GET /stream/p1 HTTP/1.1\r\n\r\n",
            b"GET /stream/p1/main/x HTTP/1.1\r\n\r\n",
            b"GET /stream/../main HTTP/1.1\r\n\r\n",
            b"GET /stream/p%31/main HTTP/1.1\r\n\r\n",
            b"GET /stream/p1/main HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /stream/p1/main HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /stream/p1/main HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /stream/p1/main HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(parse(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }
}
