//! The branch event log against Redis Streams, in the same run, interleaved.
//!
//! Run: `cargo bench --bench event_log` (or `scripts/bench.sh`). Needs `redis-server` on PATH.
//! Prints Markdown tables (medians with min–max over the repeats) for the README:
//!
//! 1. Durable appends of 200-byte events, each acknowledged after its commit, with 1, 16, 64
//!    and 256 concurrent producers: ours (redb, one batching writer) against `XADD` on a
//!    loopback redis-server with `appendonly yes` + `appendfsync always` (equal durability) and
//!    with its defaults (no fsync per write).
//! 2. Live fan-out: append → delivery latency to 1, 100 and 1,000 SSE subscribers of one branch,
//!    with the server in this process (sharing the clients' runtime) and as its own process
//!    (appends through its control socket, as `weldr-agent` CLI commands do), and the floor:
//!    a bare tokio server with no weldr code handing each frame to every connection.
//! 3. Catch-up: 1,000 clients resuming from `Last-Event-ID: 0` and from the middle of a 10k
//!    log, against 1,000 clients paging through the same stream with `XRANGE ... COUNT 1000`.
//!    Both servers run as their own processes (`weldr-agent serve`, `redis-server`); the
//!    clients share this process. A third row resumes from the last event: the floor set by
//!    1,000 connections arriving at once, with almost nothing to replay (`BENCH_FROM=<id>`
//!    runs one row only); under it, the same burst against a bare tokio server that answers
//!    each request with one event.
//! 4. The real binary: idle RSS, RSS per idle SSE subscriber, and startup time with 1,000
//!    branches' logs present.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use weldr_agent::app::App;
use weldr_agent::config::Config;

const REPEATS: usize = 5;
const APPEND_WINDOW: Duration = Duration::from_millis(1500);

fn payload() -> String {
    // With the log's own fields the stored event is about 200 bytes.
    "x".repeat(180)
}

async fn open_app(dir: &std::path::Path) -> Arc<App> {
    open_app_with(Config::for_workspace(dir)).await
}

async fn open_app_with(config: Config) -> Arc<App> {
    let app = App::open(config).unwrap();
    weldr_agent::registry::create_project(&app.store, "p", None, None)
        .await
        .unwrap();
    weldr_agent::registry::register_branch(&app.store, "p", "b", None)
        .await
        .unwrap();
    app
}

struct AppendRun {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn summarize(count: usize, elapsed: Duration, mut lat: Vec<Duration>) -> AppendRun {
    lat.sort();
    AppendRun {
        per_sec: count as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(percentile(&lat, 0.5)),
        p99_ms: ms(percentile(&lat, 0.99)),
        max_ms: ms(lat.last().copied().unwrap_or_default()),
    }
}

async fn appends_ours(app: &Arc<App>, producers: usize) -> AppendRun {
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let body = serde_json::json!({ "payload": payload() });
                while start.elapsed() < APPEND_WINDOW {
                    let t = Instant::now();
                    app.base
                        .emit(
                            &weldr_agent::branches::BranchKey::new("p", "b"),
                            "bench",
                            body.clone(),
                        )
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    summarize(lat.len(), start.elapsed(), lat)
}

async fn appends_redis(port: u16, producers: usize) -> AppendRun {
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = Resp::connect(port).await;
                let mut lat = Vec::new();
                let body = payload();
                while start.elapsed() < APPEND_WINDOW {
                    let t = Instant::now();
                    match conn
                        .call(&[
                            b"XADD",
                            b"p/b",
                            b"*",
                            b"type",
                            b"bench",
                            b"payload",
                            body.as_bytes(),
                        ])
                        .await
                    {
                        Value::Bulk(Some(_)) => {}
                        other => panic!("XADD failed: {other:?}"),
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    summarize(lat.len(), start.elapsed(), lat)
}

async fn bench_appends() {
    println!(
        "\n### Durable appends (200-byte events, ack after commit), {REPEATS} interleaved runs of {:.1} s\n",
        APPEND_WINDOW.as_secs_f64()
    );
    println!(
        "| producers | weldr events/s | weldr, `APPEND_LOG=off` | Redis always events/s | Redis default events/s | weldr ÷ always | log off ÷ always | weldr ack p50 / p99 / max ms | log off p50 / p99 / max ms | always p50 / p99 / max ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for producers in [1usize, 16, 64, 256] {
        let (mut ours, mut off, mut always, mut default) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            for (append_log, runs) in [(true, &mut ours), (false, &mut off)] {
                let dir = tempfile::tempdir().unwrap();
                let mut config = Config::for_workspace(dir.path());
                config.append_log = append_log;
                let app = open_app_with(config).await;
                runs.push(appends_ours(&app, producers).await);
                let store = app.store.clone();
                tokio::task::spawn_blocking(move || store.close())
                    .await
                    .unwrap();
            }
            let r = Redis::start(true);
            always.push(appends_redis(r.port, producers).await);
            drop(r);
            let r = Redis::start(false);
            default.push(appends_redis(r.port, producers).await);
        }
        let rate = |v: &[AppendRun]| v.iter().map(|r| r.per_sec).collect::<Vec<_>>();
        let ratio = |a: &[AppendRun], b: &[AppendRun]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.per_sec / y.per_sec)
                .collect::<Vec<_>>()
        };
        let lat = |v: &[AppendRun]| {
            format!(
                "{:.2} / {:.2} / {:.1}",
                median(&v.iter().map(|r| r.p50_ms).collect::<Vec<_>>()),
                median(&v.iter().map(|r| r.p99_ms).collect::<Vec<_>>()),
                median(&v.iter().map(|r| r.max_ms).collect::<Vec<_>>())
            )
        };
        println!(
            "| {producers} | {} | {} | {} | {} | {}× | {}× | {} | {} | {} |",
            fmt(&rate(&ours), 0),
            fmt(&rate(&off), 0),
            fmt(&rate(&always), 0),
            fmt(&rate(&default), 0),
            fmt(&ratio(&ours, &always), 2),
            fmt(&ratio(&off, &always), 2),
            lat(&ours),
            lat(&off),
            lat(&always),
        );
    }
}

async fn start_server(app: Arc<App>) -> (weldr_agent::server::RunningServer, String) {
    let token = weldr_agent::auth::tokens::create(&app.store, "bench")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (weldr_agent::server::start_on(app, listener).unwrap(), token)
}

/// Where the fan-out benchmark's server runs.
#[derive(Clone, Copy, PartialEq)]
enum Placement {
    /// In this process, sharing the runtime with the 1,000 reading clients.
    InProcess,
    /// `weldr-agent serve` as its own process; appends go through its control socket.
    OwnProcess,
    /// No weldr at all: the floor. A bare tokio server in this process writes each frame,
    /// handed to it through a `tokio::sync::broadcast` channel, to every connection as an
    /// HTTP chunk (frames that queued up meanwhile in the same write, as ours does); no
    /// storage, no checks. What loopback TCP and the runtime cost by themselves.
    Bare,
}

/// A fan-out benchmark server and a way to append to branch p/b.
enum FanoutServer {
    InProcess(weldr_agent::server::RunningServer, Arc<App>),
    OwnProcess(std::process::Child, weldr_agent::control::ControlClient),
    Bare(BareServer),
}

impl FanoutServer {
    async fn start(
        dir: &std::path::Path,
        placement: Placement,
    ) -> (Self, std::net::SocketAddr, String) {
        if placement == Placement::Bare {
            let bare = BareServer::start(None).await;
            let addr = bare.addr;
            return (FanoutServer::Bare(bare), addr, String::new());
        }
        let app = open_app(dir).await;
        if placement == Placement::InProcess {
            let (server, token) = start_server(app.clone()).await;
            let addr = server.addr;
            return (FanoutServer::InProcess(server, app), addr, token);
        }
        let token = token_then_close(&app).await;
        let socket = app.config.control_socket_path();
        drop(app);
        let port = free_port();
        let child = spawn_server_process(dir, port);
        wait_healthy(port, Duration::from_secs(60)).expect("server up");
        let control = weldr_agent::control::ControlClient::connect(&socket)
            .await
            .expect("control socket");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        (FanoutServer::OwnProcess(child, control), addr, token)
    }

    async fn append(&mut self) -> u64 {
        let data = serde_json::json!({ "text": "hello" });
        match self {
            FanoutServer::InProcess(_, app) => {
                app.base
                    .emit(
                        &weldr_agent::branches::BranchKey::new("p", "b"),
                        "text",
                        data,
                    )
                    .await
                    .unwrap()
                    .id
            }
            FanoutServer::OwnProcess(_, control) => {
                let request = weldr_agent::control::ControlRequest::Append {
                    project_id: "p".into(),
                    branch_id: "b".into(),
                    kind: "text".into(),
                    data,
                };
                match control.call(&request).await.unwrap() {
                    weldr_agent::control::ControlResult::Appended { id } => id,
                    other => panic!("append answered {other:?}"),
                }
            }
            FanoutServer::Bare(bare) => bare.send(),
        }
    }

    async fn stop(self) {
        match self {
            FanoutServer::InProcess(server, _) => server.shutdown().await,
            FanoutServer::OwnProcess(mut child, _) => stop(&mut child),
            FanoutServer::Bare(bare) => bare.accept.abort(),
        }
    }
}

/// The fan-out floor (see [`Placement::Bare`]).
struct BareServer {
    addr: std::net::SocketAddr,
    frames: tokio::sync::broadcast::Sender<bytes::Bytes>,
    last_id: u64,
    accept: tokio::task::JoinHandle<()>,
}

impl BareServer {
    /// `greeting`: a frame every connection gets right after the response head.
    async fn start(greeting: Option<bytes::Bytes>) -> BareServer {
        // The same listen backlog as ours: tokio's default of 1,024 drops SYNs in a burst.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8192).unwrap();
        let addr = listener.local_addr().unwrap();
        let (frames, _) = tokio::sync::broadcast::channel::<bytes::Bytes>(256);
        let tx = frames.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut rx = tx.subscribe();
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut head = [0u8; 4096];
                    let _ = conn.read(&mut head).await;
                    let mut ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                   transfer-encoding: chunked\r\n\r\n"
                        .to_vec();
                    if let Some(frame) = greeting {
                        ok.extend_from_slice(format!("{:x}\r\n", frame.len()).as_bytes());
                        ok.extend_from_slice(&frame);
                        ok.extend_from_slice(b"\r\n");
                    }
                    if conn.write_all(&ok).await.is_err() {
                        return;
                    }
                    let mut body = Vec::new();
                    while let Ok(frame) = rx.recv().await {
                        // Frames that arrived meanwhile go out in the same write.
                        body.clear();
                        body.extend_from_slice(&frame);
                        while let Ok(frame) = rx.try_recv() {
                            body.extend_from_slice(&frame);
                        }
                        let mut out = format!("{:x}\r\n", body.len()).into_bytes();
                        out.extend_from_slice(&body);
                        out.extend_from_slice(b"\r\n");
                        if conn.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        BareServer {
            addr,
            frames,
            last_id: 0,
            accept,
        }
    }

    /// Send the next frame (the size of the stored event's frame); answers its id.
    fn send(&mut self) -> u64 {
        self.last_id += 1;
        let _ = self.frames.send(Self::frame(self.last_id));
        self.last_id
    }

    /// A frame the size of a stored event's.
    fn frame(id: u64) -> bytes::Bytes {
        bytes::Bytes::from(format!(
            "id: {id}\nevent: text\ndata: {{\"id\":{id},\"type\":\"text\",\"timestamp\":0,\"text\":\"hello\"}}\n\n"
        ))
    }
}

/// When each event was appended, by id (set by the producer, read by every subscriber).
fn send_times(events: u64) -> Arc<Vec<std::sync::OnceLock<Instant>>> {
    Arc::new(
        (0..=events + 1)
            .map(|_| std::sync::OnceLock::new())
            .collect(),
    )
}

/// A fan-out table row: delivery latency percentiles per repeat, printed as medians (ranges).
#[derive(Default)]
struct FanoutRow {
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
}

impl FanoutRow {
    fn head() {
        println!("| subscribers | p50 ms | p99 ms | max ms |");
        println!("|---:|---:|---:|---:|");
    }

    /// One repeat's latencies, every delivery to every subscriber.
    fn add(&mut self, mut lat: Vec<Duration>) {
        lat.sort();
        self.p50.push(ms(percentile(&lat, 0.5)));
        self.p99.push(ms(percentile(&lat, 0.99)));
        self.max.push(ms(*lat.last().unwrap()));
    }

    fn print(&self, subscribers: usize) {
        println!(
            "| {subscribers} | {} | {} | {} |",
            fmt(&self.p50, 2),
            fmt(&self.p99, 2),
            fmt(&self.max, 2)
        );
    }
}

async fn bench_fanout() {
    for placement in [Placement::InProcess, Placement::OwnProcess, Placement::Bare] {
        bench_fanout_with(placement).await;
    }
    bench_fanout_redis().await;
}

/// The same fan-out through Redis Streams, the peer: every subscriber loops on
/// `XREAD BLOCK 0 STREAMS key <last id>` on its own connection; the producer `XADD`s (redis
/// defaults, no fsync per write, where ours commits each event before it is sent).
async fn bench_fanout_redis() {
    const EVENTS: u64 = 200;
    println!(
        "\n### Live fan-out through Redis Streams (`XADD` → `XREAD BLOCK` on every subscriber's connection; {EVENTS} events at 500/s, {REPEATS} runs; redis-server as its own process, defaults)\n"
    );
    FanoutRow::head();
    let redis = Redis::start(false);
    for subscribers in [1usize, 100, 1000] {
        let mut row = FanoutRow::default();
        for rep in 0..REPEATS {
            let key = format!("p/b/{subscribers}/{rep}");
            let sent = send_times(EVENTS);
            let mut readers = Vec::new();
            for _ in 0..subscribers {
                let (sent, key) = (sent.clone(), key.clone());
                let mut conn = Resp::connect(redis.port).await;
                readers.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(EVENTS as usize);
                    let mut last = "0-0".to_string();
                    while !last.starts_with(&format!("{EVENTS}-")) {
                        let reply = conn
                            .call(&[
                                b"XREAD",
                                b"BLOCK",
                                b"0",
                                b"STREAMS",
                                key.as_bytes(),
                                last.as_bytes(),
                            ])
                            .await;
                        let now = Instant::now();
                        for id in xread_ids(reply) {
                            let seq: u64 = id.split('-').next().unwrap().parse().unwrap();
                            if let Some(t) = sent.get(seq as usize).and_then(|s| s.get()) {
                                lat.push(now.duration_since(*t));
                            }
                            last = id;
                        }
                    }
                    lat
                }));
            }
            // Let every reader block before the first append.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut producer = Resp::connect(redis.port).await;
            for id in 1..=EVENTS {
                let entry = format!("{id}-0");
                let _ = sent[id as usize].set(Instant::now());
                producer
                    .call(&[b"XADD", key.as_bytes(), entry.as_bytes(), b"text", b"hello"])
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut lat = Vec::new();
            for r in readers {
                lat.extend(r.await.unwrap());
            }
            row.add(lat);
        }
        row.print(subscribers);
    }
}

/// The entry ids in an `XREAD` reply for one stream.
fn xread_ids(reply: Value) -> Vec<String> {
    let Value::Array(streams) = reply else {
        panic!("XREAD failed")
    };
    let mut ids = Vec::new();
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            panic!("bad XREAD stream")
        };
        let Some(Value::Array(entries)) = pair.pop() else {
            panic!("bad XREAD entries")
        };
        for entry in entries {
            let Value::Array(fields) = entry else {
                panic!("bad XREAD entry")
            };
            let Some(Value::Bulk(Some(id))) = fields.into_iter().next() else {
                panic!("bad XREAD id")
            };
            ids.push(String::from_utf8(id).unwrap());
        }
    }
    ids
}

async fn bench_fanout_with(placement: Placement) {
    const EVENTS: u64 = 200;
    let where_ = match placement {
        Placement::InProcess => "server and clients in this process",
        Placement::OwnProcess => "server as its own process, appends over its control socket",
        Placement::Bare => {
            "the floor: a bare tokio broadcast → TCP server in this process, no weldr code"
        }
    };
    println!(
        "\n### Live fan-out: append → delivery to every subscriber of one branch ({EVENTS} events at 500/s, {REPEATS} runs; {where_})\n"
    );
    FanoutRow::head();
    for subscribers in [1usize, 100, 1000] {
        let mut row = FanoutRow::default();
        for rep in 0..REPEATS {
            let step = |what: &str| {
                if std::env::var_os("BENCH_TRACE").is_some() {
                    eprintln!("fanout {subscribers} #{rep}: {what}");
                }
            };
            let dir = tempfile::tempdir().unwrap();
            let (mut server, addr, token) = FanoutServer::start(dir.path(), placement).await;
            step("server started");
            let sent = send_times(EVENTS);
            let mut clients = Vec::new();
            for _ in 0..subscribers {
                clients.push(RawSse::connect(addr, "/stream/p/b", &token, None).await);
            }
            step("connected");
            // Let every subscription reach the live ring before the first append.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let readers: Vec<_> = clients
                .into_iter()
                .map(|mut c| {
                    let sent = sent.clone();
                    tokio::spawn(async move {
                        let mut lat = Vec::with_capacity(EVENTS as usize);
                        c.read_ids_until(EVENTS, |id| {
                            let now = Instant::now();
                            if let Some(t) = sent.get(id as usize).and_then(|s| s.get()) {
                                lat.push(now.duration_since(*t));
                            }
                        })
                        .await;
                        lat
                    })
                })
                .collect();
            for id in 1..=EVENTS {
                let _ = sent[id as usize].set(Instant::now());
                assert_eq!(server.append().await, id);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            step("emitted");
            let mut lat = Vec::new();
            for r in readers {
                lat.extend(r.await.unwrap());
            }
            step("read");
            row.add(lat);
            server.stop().await;
            step("stopped");
        }
        row.print(subscribers);
    }
}

async fn bench_catchup() {
    const LOG: u64 = 10_000;
    const CLIENTS: usize = 1000;
    println!(
        "\n### Catch-up: {CLIENTS} clients read a {LOG}-event log ({REPEATS} interleaved runs)\n"
    );
    println!(
        "| start | weldr events/s | XRANGE events/s | weldr ÷ XRANGE | weldr first event p50 / p99 ms | XRANGE first page p50 / p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let dir = tempfile::tempdir().unwrap();
    let app = open_app(dir.path()).await;
    let body = serde_json::json!({ "payload": payload() });
    let mut batch = Vec::new();
    for _ in 0..LOG {
        batch.push(weldr_agent::stream::new_event("text", body.clone()).unwrap());
    }
    for chunk in batch.chunks(1000) {
        app.store
            .writer()
            .append(weldr_storage::StreamKey::new("p", "b"), chunk.to_vec())
            .await
            .unwrap();
    }
    // The server runs as its own process, as redis-server does: the 1,000 clients in this
    // process then compete with neither server for the same scheduler.
    let token = token_then_close(&app).await;
    drop(app);
    let port = free_port();
    let mut child = spawn_server_process(dir.path(), port);
    wait_healthy(port, Duration::from_secs(60)).expect("server up");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let redis = Redis::start(false);
    {
        let mut conn = Resp::connect(redis.port).await;
        for i in 1..=LOG {
            let id = format!("{i}-0");
            conn.call(&[
                b"XADD",
                b"p/b",
                id.as_bytes(),
                b"type",
                b"text",
                b"payload",
                payload().as_bytes(),
            ])
            .await;
        }
    }
    let only = std::env::var("BENCH_FROM").ok();
    let mut late = Vec::new();
    for (label, from) in [
        ("Last-Event-ID: 0", 0u64),
        ("middle (5000)", LOG / 2),
        ("last event only (9999)", LOG - 1),
    ]
    .into_iter()
    .filter(|(_, from)| only.as_deref().is_none_or(|f| f == from.to_string()))
    {
        let (mut ours, mut theirs, mut ratio, mut our_ttfe, mut their_ttfe) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let probing = from < LOG - 1;
        let (mut late_ours, mut late_theirs) = (Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            // Ours.
            let probes = probing.then(|| probe_ours(addr, token.clone(), LOG));
            let start = Instant::now();
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let token = token.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let mut c = RawSse::connect(addr, "/stream/p/b", &token, Some(from)).await;
                        let mut first = None;
                        c.read_ids_until(LOG, |_| {
                            first.get_or_insert_with(|| t.elapsed());
                        })
                        .await;
                        let _ = c.conn.shutdown().await;
                        first.unwrap()
                    })
                })
                .collect();
            let mut ttfe = Vec::new();
            for t in tasks {
                ttfe.push(t.await.unwrap());
            }
            let ours_rate = (LOG - from) as f64 * CLIENTS as f64 / start.elapsed().as_secs_f64();
            ttfe.sort();
            our_ttfe.push((ms(percentile(&ttfe, 0.5)), ms(percentile(&ttfe, 0.99))));
            if let Some(probes) = probes {
                late_ours.extend(probes.await.unwrap());
            }
            // Redis.
            let probes = probing.then(|| probe_redis(redis.port, LOG));
            let start = Instant::now();
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let port = redis.port;
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let mut conn = Resp::connect(port).await;
                        let mut cursor = format!("({from}-0");
                        if from == 0 {
                            cursor = "-".into();
                        }
                        let mut first = None;
                        let mut got = 0u64;
                        loop {
                            let Value::Array(items) = xrange_page(&mut conn, &cursor).await else {
                                panic!("XRANGE failed")
                            };
                            first.get_or_insert_with(|| t.elapsed());
                            if items.is_empty() {
                                break;
                            }
                            got += items.len() as u64;
                            let Some(Value::Array(last)) = items.last() else {
                                panic!("bad entry")
                            };
                            let Value::Bulk(Some(id)) = &last[0] else {
                                panic!("bad id")
                            };
                            cursor = format!("({}", String::from_utf8_lossy(id));
                            if got >= LOG - from {
                                break;
                            }
                        }
                        assert_eq!(got, LOG - from);
                        first.unwrap()
                    })
                })
                .collect();
            let mut ttfe = Vec::new();
            for t in tasks {
                ttfe.push(t.await.unwrap());
            }
            let redis_rate = (LOG - from) as f64 * CLIENTS as f64 / start.elapsed().as_secs_f64();
            ttfe.sort();
            their_ttfe.push((ms(percentile(&ttfe, 0.5)), ms(percentile(&ttfe, 0.99))));
            if let Some(probes) = probes {
                late_theirs.extend(probes.await.unwrap());
            }
            ours.push(ours_rate);
            theirs.push(redis_rate);
            ratio.push(ours_rate / redis_rate);
        }
        let pair = |v: &[(f64, f64)]| {
            format!(
                "{:.1} / {:.1}",
                median(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
                median(&v.iter().map(|x| x.1).collect::<Vec<_>>())
            )
        };
        println!(
            "| {label} | {} | {} | {}× | {} | {} |",
            fmt(&ours, 0),
            fmt(&theirs, 0),
            fmt(&ratio, 2),
            pair(&our_ttfe),
            pair(&their_ttfe)
        );
        if probing {
            late.push((label, late_ours, late_theirs));
        }
    }
    println!(
        "\nOne client at a time arriving while the {CLIENTS} catch up, from {} ms after they connected ({PROBES} per run, {REPEATS} runs), resuming from the last event:\n",
        PROBE_AFTER.as_millis()
    );
    println!(
        "| the {CLIENTS} started from | weldr first event p50 / p99 ms | XRANGE first page p50 / p99 ms |"
    );
    println!("|---|---:|---:|");
    for (label, mut ours, mut theirs) in late {
        ours.sort();
        theirs.sort();
        let pair = |v: &[Duration]| {
            format!(
                "{:.1} / {:.1}",
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99))
            )
        };
        println!("| {label} | {} | {} |", pair(&ours), pair(&theirs));
    }
    stop(&mut child);
    if only.as_deref().is_none_or(|f| f == (LOG - 1).to_string()) {
        burst_floor(CLIENTS).await;
    }
}

/// The floor under the burst rows: the same clients connect at once to a bare tokio server
/// (its own runtime with two workers, no weldr code) that answers every request with one
/// event. What connecting a thousand clients at once costs on this machine by itself.
async fn burst_floor(clients: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bare = rt
        .spawn(BareServer::start(Some(BareServer::frame(1))))
        .await
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..REPEATS {
        let addr = bare.addr;
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                tokio::spawn(async move {
                    let t = Instant::now();
                    let mut c = RawSse::connect(addr, "/stream/p/b", "", None).await;
                    let mut first = None;
                    c.read_ids_until(1, |_| {
                        first.get_or_insert_with(|| t.elapsed());
                    })
                    .await;
                    first.unwrap()
                })
            })
            .collect();
        let mut ttfe = Vec::new();
        for t in tasks {
            ttfe.push(t.await.unwrap());
        }
        ttfe.sort();
        runs.push((ms(percentile(&ttfe, 0.5)), ms(percentile(&ttfe, 0.99))));
    }
    bare.accept.abort();
    rt.shutdown_background();
    let (p50, p99): (Vec<f64>, Vec<f64>) = runs.into_iter().unzip();
    println!(
        "\nThe floor: {clients} clients connecting at once to a bare tokio server (own runtime, two workers, no weldr code) that answers each with one event ({REPEATS} runs): first event p50 {} ms, p99 {} ms.",
        fmt(&p50, 1),
        fmt(&p99, 1)
    );
}

/// Clients arriving one after another while the burst's catch-up is being served, from
/// [`PROBE_AFTER`] on (its 1,000 connections have been answered by then: see the burst floor row).
/// Each resumes from the event before `last` and is timed to its first event. A probe runs on
/// a thread and runtime of its own: on the benchmark's runtime it would wait behind the 1,000
/// busy clients' tasks, and measure them instead of the server.
const PROBES: usize = 20;
const PROBE_AFTER: Duration = Duration::from_millis(300);

/// `XRANGE p/b <cursor> + COUNT 1000`: one page of the peer's replay.
async fn xrange_page(conn: &mut Resp, cursor: &str) -> Value {
    conn.call(&[
        b"XRANGE",
        b"p/b",
        cursor.as_bytes(),
        b"+",
        b"COUNT",
        b"1000",
    ])
    .await
}

fn on_own_runtime<F, Fut>(probe: F) -> tokio::task::JoinHandle<Vec<Duration>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Vec<Duration>>,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(probe())
    })
}

fn probe_ours(
    addr: std::net::SocketAddr,
    token: String,
    last: u64,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    on_own_runtime(move || async move {
        tokio::time::sleep(PROBE_AFTER).await;
        let mut took = Vec::new();
        for _ in 0..PROBES {
            let t = Instant::now();
            let mut c = RawSse::connect(addr, "/stream/p/b", &token, Some(last - 1)).await;
            c.read_ids_until(last, |_| {}).await;
            took.push(t.elapsed());
            let _ = c.conn.shutdown().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if std::env::var("BENCH_TRACE").is_ok() {
            eprintln!(
                "probes: {:?}",
                took.iter().map(|d| ms(*d) as u64).collect::<Vec<_>>()
            );
        }
        took
    })
}

fn probe_redis(port: u16, last: u64) -> tokio::task::JoinHandle<Vec<Duration>> {
    on_own_runtime(move || async move {
        tokio::time::sleep(PROBE_AFTER).await;
        let mut took = Vec::new();
        let cursor = format!("({}-0", last - 1);
        for _ in 0..PROBES {
            let t = Instant::now();
            let mut conn = Resp::connect(port).await;
            let reply = xrange_page(&mut conn, &cursor).await;
            assert!(matches!(reply, Value::Array(ref items) if items.len() == 1));
            took.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        took
    })
}

/// `weldr-agent serve` (the release binary) on workspace `ws`.
fn spawn_server_process(ws: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_weldr-agent"))
        .arg("serve")
        .env("WELDR_MODE", "local")
        .env("WORKSPACE_BASE", ws)
        .env("PORT", port.to_string())
        .env("LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The release binary as a user runs it.
/// Stop the server as Fly does (SIGTERM) so the next start opens a cleanly closed store.
fn stop(child: &mut std::process::Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn bench_binary() {
    let bin = env!("CARGO_BIN_EXE_weldr-agent");
    println!("\n### The binary: memory and startup ({REPEATS} runs)\n");
    // A workspace with 1,000 branches, 100 events each.
    let big = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = App::open(Config::for_workspace(big.path())).unwrap();
        weldr_agent::registry::create_project(&app.store, "p", None, None)
            .await
            .unwrap();
        let body = serde_json::json!({ "payload": payload() });
        for b in 0..1000 {
            let branch = format!("b{b}");
            weldr_agent::registry::register_branch(&app.store, "p", &branch, None)
                .await
                .unwrap();
            let events: Vec<_> = (0..100)
                .map(|_| weldr_agent::stream::new_event("text", body.clone()).unwrap())
                .collect();
            app.store
                .writer()
                .append(weldr_storage::StreamKey::new("p", &branch), events)
                .await
                .unwrap();
        }
        token_then_close(&app).await;
    });
    let (
        mut idle,
        mut startup_empty,
        mut startup_big,
        mut idle_big,
        mut per_sub,
        mut per_sub_spread,
    ) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..REPEATS {
        let empty = tempfile::tempdir().unwrap();
        let port = free_port();
        let t = Instant::now();
        let mut child = spawn_server_process(empty.path(), port);
        wait_healthy(port, Duration::from_secs(30)).expect("server up");
        startup_empty.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(300));
        idle.push(rss_kib(child.id()) as f64 / 1024.0);
        stop(&mut child);

        let port = free_port();
        let t = Instant::now();
        let mut child = spawn_server_process(big.path(), port);
        wait_healthy(port, Duration::from_secs(60)).expect("server up");
        startup_big.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(300));
        let before = rss_kib(child.id());
        idle_big.push(before as f64 / 1024.0);
        // 1,000 idle subscribers spread over the branches (live only).
        let token = {
            let out = std::process::Command::new(bin)
                .args(["token", "create", "--name", "bench-idle"])
                .env("WELDR_MODE", "local")
                .env("WORKSPACE_BASE", big.path())
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        // 1,000 idle subscribers on one branch, then 1,000 more spread over 1,000 branches
        // (each watched branch also costs its live ring).
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let open = |paths: Vec<String>| {
            rt.block_on(async {
                let mut conns = Vec::new();
                for path in paths {
                    conns.push(RawSse::connect(addr, &path, &token, None).await);
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                conns
            })
        };
        let one = open((0..1000).map(|_| "/stream/p/b0".to_string()).collect());
        let after_one = rss_kib(child.id());
        per_sub.push(after_one.saturating_sub(before) as f64 / 1000.0);
        let spread = open((0..1000).map(|i| format!("/stream/p/b{i}")).collect());
        let after_spread = rss_kib(child.id());
        per_sub_spread.push(after_spread.saturating_sub(after_one) as f64 / 1000.0);
        drop(one);
        drop(spread);
        stop(&mut child);
    }
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| idle RSS, empty store | {} MiB |", fmt(&idle, 1));
    println!(
        "| startup to first /health 200, empty store | {} ms |",
        fmt(&startup_empty, 1)
    );
    println!(
        "| startup to first /health 200, 1,000 branches × 100 events | {} ms |",
        fmt(&startup_big, 1)
    );
    println!(
        "| idle RSS, 1,000 branches' logs present | {} MiB |",
        fmt(&idle_big, 1)
    );
    println!(
        "| RSS per idle SSE subscriber (server process, 1,000 open) | {} KiB |",
        fmt(&per_sub, 1)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    weldr_agent::install_crypto_provider();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "## Event log benchmarks ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if only.is_empty() || only == "appends" {
        rt.block_on(bench_appends());
    }
    if only.is_empty() || only == "fanout" {
        rt.block_on(bench_fanout());
    }
    if only.is_empty() || only == "catchup" {
        rt.block_on(bench_catchup());
    }
    drop(rt);
    if only.is_empty() || only == "binary" {
        bench_binary();
    }
}
