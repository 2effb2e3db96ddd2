//! Shared benchmark helpers: statistics, deterministic file content, a loopback redis-server, a
//! minimal RESP client, a raw SSE client, and process memory readings.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Median and range of repeated measurements.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "median (min–max)".
pub fn fmt(values: &[f64], digits: usize) -> String {
    let (lo, hi) = range(values);
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits,
        median(values),
        digits,
        lo,
        digits,
        hi
    )
}

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic content without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub const WORDS: &[&str] = &[
    "fn", "let", "mut", "impl", "struct", "return", "match", "Some", "None", "Ok", "Err", "self",
    "pub", "use", "async", "await", "const", "value", "index", "branch", "version", "commit",
    "tree", "file", "path", "error", "result", "config", "state", "event", "stream", "workflow",
    "{", "}", "(", ")", ";", "=", "=>", "->", "::", ".", ",", "&", "<", ">", "+", "*",
];

/// Source-like text of exactly `size` bytes, unique per file.
pub fn text(rng: &mut Rng, size: usize, id: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(format!("// file {id}\n").as_bytes());
    let mut col = 0;
    while out.len() < size {
        let w = if rng.below(16) == 0 {
            format!("v{}", rng.below(100_000))
        } else {
            WORDS[rng.below(WORDS.len() as u64) as usize].to_string()
        };
        out.extend_from_slice(w.as_bytes());
        col += w.len() + 1;
        if col > 80 {
            out.push(b'\n');
            let indent = rng.below(4) as usize * 4;
            out.resize(out.len() + indent, b' ');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(size);
    out
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server on loopback in its own directory; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start(always_fsync: bool) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path());
        if always_fsync {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One RESP connection (what any Redis client does on the wire): replies are parsed from one
/// read buffer, as the usual clients do, so the client's own cost stays small beside the
/// server's.
pub struct Resp {
    conn: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub enum Value {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Int(i64),
    Array(Vec<Value>),
    Error(String),
}

impl Resp {
    pub async fn connect(port: u16) -> Resp {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        Resp {
            conn: s,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    pub async fn call(&mut self, args: &[&[u8]]) -> Value {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.conn.write_all(&out).await.unwrap();
        loop {
            if let Some((value, used)) = parse_resp(&self.buf) {
                self.buf.drain(..used);
                return value;
            }
            let n = read_more(&mut self.conn, &mut self.buf).await.unwrap();
            assert!(n > 0, "redis closed the connection");
        }
    }
}

/// Append what the socket has to `buf`, with room for at least 16 KiB (one read-buffer policy
/// for both benchmark clients).
async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    conn.read_buf(buf).await
}

/// One complete RESP value at the start of `buf` and the bytes it takes; None if incomplete.
fn parse_resp(buf: &[u8]) -> Option<(Value, usize)> {
    let eol = memchr::memmem::find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..eol]).unwrap();
    let after = eol + 2;
    match buf[0] {
        b'+' => Some((Value::Simple(line.into()), after)),
        b'-' => Some((Value::Error(line.into()), after)),
        b':' => Some((Value::Int(line.parse().unwrap()), after)),
        b'$' => {
            let n: i64 = line.parse().unwrap();
            if n < 0 {
                return Some((Value::Bulk(None), after));
            }
            let end = after + n as usize;
            (buf.len() >= end + 2).then(|| (Value::Bulk(Some(buf[after..end].to_vec())), end + 2))
        }
        b'*' => {
            let n: i64 = line.parse().unwrap();
            let mut items = Vec::with_capacity(n.max(0) as usize);
            let mut at = after;
            for _ in 0..n.max(0) {
                let (item, used) = parse_resp(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Value::Array(items), at))
        }
        other => panic!("unexpected RESP {other}"),
    }
}

/// A raw SSE subscriber over one TCP connection.
pub struct RawSse {
    pub conn: TcpStream,
    buf: Vec<u8>,
}

impl RawSse {
    pub async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        token: &str,
        last_event_id: Option<u64>,
    ) -> RawSse {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let cursor = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n{cursor}\r\n"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        RawSse {
            conn,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Read until the body has delivered `id: <last>`; calls `on_id` for every id seen, in order.
    pub async fn read_ids_until(&mut self, last: u64, mut on_id: impl FnMut(u64)) {
        let mut scanned = 0;
        loop {
            while let Some(pos) = memchr::memmem::find(&self.buf[scanned..], b"\nid: ")
                .or_else(|| (scanned == 0 && self.buf.starts_with(b"id: ")).then_some(0))
            {
                let start = scanned
                    + pos
                    + if self.buf[scanned + pos] == b'\n' {
                        5
                    } else {
                        4
                    };
                let Some(end) = memchr::memchr(b'\n', &self.buf[start..]) else {
                    break;
                };
                let id: u64 = std::str::from_utf8(&self.buf[start..start + end])
                    .unwrap()
                    .parse()
                    .unwrap();
                on_id(id);
                scanned = start + end;
                if id >= last {
                    self.buf.drain(..scanned);
                    return;
                }
            }
            if scanned > 32 * 1024 {
                self.buf.drain(..scanned);
                scanned = 0;
            }
            let n = tokio::time::timeout(
                Duration::from_secs(30),
                read_more(&mut self.conn, &mut self.buf),
            )
            .await
            .unwrap_or_else(|_| {
                let tail = String::from_utf8_lossy(&self.buf[self.buf.len().saturating_sub(300)..]);
                panic!("no bytes for 30 s while waiting for id {last}; buffer ends with {tail:?}")
            })
            .unwrap();
            assert!(n > 0, "stream ended");
        }
    }
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until `GET /health` answers 200 on `port`.
pub fn wait_healthy(port: u16, timeout: Duration) -> Option<Duration> {
    use std::io::{Read, Write};
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 200" {
                return Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

pub fn dir_size(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Create a local API token in `app`'s store and close the store, so that a `weldr-agent
/// serve` process can open it next.
pub async fn token_then_close(app: &weldr_agent::App) -> String {
    let token = weldr_agent::auth::tokens::create(&app.store, "bench")
        .await
        .unwrap();
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
    token
}

/// An open-loop append load: `producers` tasks, each appending one `data` event to its own
/// stream `p/b{i}` every `period` (staggered) for `window`; every tick starts an append and its
/// latency is measured from the tick's scheduled instant, so a stalled writer is not hidden by
/// producers that wait (no coordinated omission). Answers the latencies (sorted) and the
/// seconds the load took.
pub async fn open_loop_appends(
    store: &weldr_storage::Store,
    window: Duration,
    producers: usize,
    period: Duration,
    data: &str,
) -> (Vec<Duration>, f64) {
    use weldr_storage::{NewEvent, StreamKey};
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = start + window;
    let tasks: Vec<_> = (0..producers)
        .map(|i| {
            let (store, data) = (store.clone(), data.to_string());
            tokio::spawn(async move {
                let stream = StreamKey::new("p", &format!("b{i}"));
                let offset = period * i as u32 / producers as u32;
                let mut tick = tokio::time::interval_at(start + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut inflight = tokio::task::JoinSet::new();
                let mut lat =
                    Vec::with_capacity((window.as_nanos() / period.as_nanos()) as usize + 16);
                loop {
                    let due = tick.tick().await;
                    if due >= end {
                        break;
                    }
                    let (store, stream, data) = (store.clone(), stream.clone(), data.clone());
                    inflight.spawn(async move {
                        let kind = "bench".to_string();
                        store
                            .writer()
                            .append(stream, vec![NewEvent { kind, data }])
                            .await
                            .expect("append");
                        due.elapsed()
                    });
                    while let Some(done) = inflight.try_join_next() {
                        lat.push(done.unwrap());
                    }
                }
                while let Some(done) = inflight.join_next().await {
                    lat.push(done.unwrap());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    (lat, secs)
}
