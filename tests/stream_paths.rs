//! Stream requests over raw HTTP/1.1 connections: on a fresh connection and on a keep-alive
//! connection that already served a request, a stream must be indistinguishable to a client
//! (same status, headers that matter, errors and bytes), open with one write, notice a client
//! that hangs up, and get heartbeats only while idle. Raw TCP, so what goes over the wire is
//! certain.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 connection with a read buffer.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let addr = url.trim_start_matches("http://");
        Conn {
            tcp: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
            .await
            .expect("the server answers")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn send(&mut self, request: &str) {
        self.tcp.write_all(request.as_bytes()).await.unwrap();
    }

    async fn head(&mut self) -> Head {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8(self.buf.drain(..end + 4).collect()).unwrap();
                let mut lines = text.split("\r\n");
                let status = lines.next().unwrap().split(' ').nth(1).unwrap();
                let headers = lines
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once(':').unwrap();
                        (k.trim().to_ascii_lowercase(), v.trim().to_string())
                    })
                    .collect();
                return Head {
                    status: status.parse().unwrap(),
                    headers,
                };
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        }
    }

    /// A whole response body (content-length or chunked to its end).
    async fn body(&mut self, head: &Head) -> Vec<u8> {
        if let Some(len) = head.get("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await);
            }
            return self.buf.drain(..len).collect();
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await {
            body.extend(chunk);
        }
        body
    }

    /// The next chunk of a chunked body; None at its end.
    async fn chunk(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let size = std::str::from_utf8(&self.buf[..eol]).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                if self.buf.len() >= eol + 2 + size + 2 {
                    let chunk = self.buf[eol + 2..eol + 2 + size].to_vec();
                    assert_eq!(&self.buf[eol + 2 + size..eol + 4 + size], b"\r\n");
                    self.buf.drain(..eol + 4 + size);
                    return (size > 0).then_some(chunk);
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Body bytes until they hold `needle` (the stream stays open).
    async fn body_until(&mut self, body: &mut Vec<u8>, needle: &str) {
        let needle = needle.as_bytes();
        let mut searched = 0;
        while !body[searched..].windows(needle.len()).any(|w| w == needle) {
            searched = body.len().saturating_sub(needle.len() - 1);
            body.extend(self.chunk().await.expect("the stream ended early"));
        }
    }
}

fn stream_request(path: &str, token: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    )
}

/// A connection already used for one request.
async fn keep_alive_conn(url: &str) -> Conn {
    let mut c = Conn::open(url).await;
    c.send("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let head = c.head().await;
    assert_eq!(head.status, 200);
    c.body(&head).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_and_keep_alive_streams_are_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 50).await;
    let url = s.server.url();
    let request = stream_request(
        "/stream/p/b?lastEventId=999",
        &s.token,
        "Last-Event-ID: 0\r\nOrigin: http://localhost:3000\r\n",
    );

    let mut fresh = Conn::open(&url).await;
    fresh.send(&request).await;
    let mut kept = keep_alive_conn(&url).await;
    kept.send(&request).await;

    let (dh, sh) = (fresh.head().await, kept.head().await);
    for h in [&dh, &sh] {
        assert_eq!(h.status, 200);
        assert_eq!(h.get("content-type"), Some("text/event-stream"));
        assert_eq!(h.get("cache-control"), Some("no-cache"));
        assert_eq!(h.get("transfer-encoding"), Some("chunked"));
        assert_eq!(
            h.get("access-control-allow-origin"),
            Some("http://localhost:3000")
        );
        assert_eq!(h.get("access-control-allow-credentials"), Some("true"));
    }

    // The header wins over the query on both; replay, then live events.
    let (mut db, mut sb) = (Vec::new(), Vec::new());
    fresh.body_until(&mut db, "\"id\":50,").await;
    kept.body_until(&mut sb, "\"id\":50,").await;
    assert_eq!(db, sb);
    let text = String::from_utf8(db.clone()).unwrap();
    assert!(text.starts_with("retry: 2000\n"), "{text}");
    assert!(text.contains("id: 1\nevent: text\n"));
    emit_n(s.app(), "p", "b", 5).await;
    fresh.body_until(&mut db, "\"id\":55,").await;
    kept.body_until(&mut sb, "\"id\":55,").await;
    assert_eq!(db, sb);
    assert_eq!(s.app().bus.total_subscribers(), 2);

    // Shutdown ends both streams: the last chunk, then the connection closes.
    s.server.shutdown().await;
    for c in [&mut fresh, &mut kept] {
        while c.chunk().await.is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_and_keep_alive_refuse_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    let url = s.server.url();
    let no_auth = "GET /stream/p/b HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string();
    let cases = [
        (no_auth, 401, "unauthorized"),
        (
            stream_request("/stream/p/nope", &s.token, ""),
            404,
            "branch_not_found",
        ),
        (
            stream_request("/stream/nope/b", &s.token, ""),
            404,
            "project_not_found",
        ),
        (
            stream_request("/stream/p/b", &s.token, "Last-Event-ID: x1\r\n"),
            400,
            "invalid_cursor",
        ),
        (
            stream_request("/stream/p/b?lastEventId=-1", &s.token, ""),
            400,
            "invalid_cursor",
        ),
        (
            stream_request(
                "/stream/p/b?lastEventId=99999999999999999999999",
                &s.token,
                "",
            ),
            400,
            "invalid_cursor",
        ),
    ];
    for (request, status, code) in cases {
        let mut answers = Vec::new();
        for mut c in [Conn::open(&url).await, keep_alive_conn(&url).await] {
            c.send(&request).await;
            let head = c.head().await;
            let body: serde_json::Value = serde_json::from_slice(&c.body(&head).await).unwrap();
            assert_eq!(head.status, status, "{request}: {body}");
            assert!(
                head.get("content-type")
                    .is_some_and(|t| t.starts_with("application/json")),
                "{request}"
            );
            assert_eq!(body["error"]["code"], code, "{request}: {body}");
            answers.push(body);
        }
        assert_eq!(answers[0], answers[1], "{request}");
    }
    assert_eq!(s.app().bus.total_subscribers(), 0);
    // Odd requests get the answers of the route table.
    for (request, status) in [
        ("GET /stream/p/b HTTP/1.0\r\n\r\n", 401),
        ("GET /stream/p/b/extra HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (
            "GET /stream/p/b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            401,
        ),
    ] {
        let mut c = Conn::open(&url).await;
        c.send(request).await;
        assert_eq!(c.head().await.status, status, "{request}");
    }
    let health = s.http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_releases_its_subscription() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    let url = s.server.url();
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut c = Conn::open(&url).await;
        c.send(&stream_request("/stream/p/b", &s.token, "")).await;
        assert_eq!(c.head().await.status, 200);
        conns.push(c);
    }
    assert_eq!(s.app().bus.total_subscribers(), 10);
    conns.truncate(3);
    // No event is sent, so only noticing the hang-up frees them (not a failed write).
    let mut waited = 0;
    while s.app().bus.total_subscribers() != 3 {
        assert!(
            waited < 200,
            "{} subscribers left",
            s.app().bus.total_subscribers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    // The rest still stream.
    emit_n(s.app(), "p", "b", 1).await;
    for c in &mut conns {
        let mut body = Vec::new();
        c.body_until(&mut body, "\"id\":1,").await;
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_arrive_in_pieces_or_are_large_are_still_served() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 3).await;
    let url = s.server.url();
    let request = stream_request("/stream/p/b", &s.token, "Last-Event-ID: 0\r\n");

    // The head in three pieces, with pauses: the peek waits for the rest.
    let mut c = Conn::open(&url).await;
    let (a, rest) = request.split_at(9);
    let (b, tail) = rest.split_at(20);
    for piece in [a, b, tail] {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    replays_three(&mut c).await;

    // A 6 KiB header (a long cookie) and a 20 KiB one (under the 32 KiB header limit).
    for size in [6 * 1024, 20 * 1024] {
        let cookie = format!("Cookie: other={}\r\nLast-Event-ID: 0\r\n", "x".repeat(size));
        let mut c = Conn::open(&url).await;
        c.send(&stream_request("/stream/p/b", &s.token, &cookie))
            .await;
        replays_three(&mut c).await;
    }

    // A connection that sends nothing for a while (within the head timeout) is still served
    // when the request comes.
    let mut c = Conn::open(&url).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send(&request).await;
    replays_three(&mut c).await;
    s.server.shutdown().await;
}

/// The stream answers 200 and replays events 1 to 3.
async fn replays_three(c: &mut Conn) {
    assert_eq!(c.head().await.status, 200);
    let mut body = Vec::new();
    c.body_until(&mut body, "\"id\":3,").await;
}

/// A stream opens with one write: the response head and the first chunk (the retry hint and
/// the first page of the replay) go out together, so the client's first read holds both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opens_with_one_write() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 3).await;
    let url = s.server.url();
    let request = stream_request("/stream/p/b", &s.token, "Last-Event-ID: 0\r\n");
    for mut c in [Conn::open(&url).await, keep_alive_conn(&url).await] {
        assert!(c.buf.is_empty());
        c.send(&request).await;
        let mut first = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), c.tcp.read(&mut first))
            .await
            .expect("the server answers")
            .unwrap();
        let text = String::from_utf8_lossy(&first[..n]);
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
        assert!(text.contains("retry: 2000\n"), "{text}");
        assert!(text.contains("id: 3\nevent: text\n"), "{text}");
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_get_heartbeats_and_busy_ones_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.sse_heartbeat = Duration::from_millis(500);
    let s = start(cfg).await;
    branch(s.app(), "p", "b").await;
    let url = s.server.url();
    let request = stream_request("/stream/p/b", &s.token, "");
    let mut fresh = Conn::open(&url).await;
    fresh.send(&request).await;
    let mut kept = keep_alive_conn(&url).await;
    kept.send(&request).await;
    let (mut db, mut sb) = (Vec::new(), Vec::new());
    for (c, body) in [(&mut fresh, &mut db), (&mut kept, &mut sb)] {
        assert_eq!(c.head().await.status, 200);
        c.body_until(body, ": connected\n\n").await;
        body.clear();
    }

    // Idle: a keep-alive comment every interval, on both connections.
    for (c, body) in [(&mut fresh, &mut db), (&mut kept, &mut sb)] {
        c.body_until(body, ": keep-alive\n\n: keep-alive\n\n").await;
        body.clear();
    }

    // Busy (an event every 50 ms for 1.2 s): events keep the connection alive, no comment
    // between the first event and the last.
    let app = s.app().clone();
    let producer = tokio::spawn(async move {
        for _ in 0..24 {
            emit_n(&app, "p", "b", 1).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for (c, body) in [(&mut fresh, &mut db), (&mut kept, &mut sb)] {
        c.body_until(body, "\"id\":24,").await;
        let text = String::from_utf8_lossy(body);
        let busy = &text[text.find("id: 1\n").unwrap()..];
        assert!(!busy.contains("keep-alive"), "{text}");
    }
    producer.await.unwrap();
    s.server.shutdown().await;
}

/// The ids of the event frames in an SSE body, in order.
fn frame_ids(body: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|frame| frame.strip_prefix("id: ")?.split('\n').next()?.parse().ok())
        .collect()
}

/// The scale the fan-out benchmark runs at, as a correctness check: a thousand
/// subscribers (live and resuming) while two producers append, each gets every event once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_see_every_event_once_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 20).await;
    let url = s.server.url();
    let mut conns = Vec::new();
    for i in 0..1000 {
        let extra = match i % 3 {
            0 => "",
            1 => "Last-Event-ID: 0\r\n",
            _ => "Last-Event-ID: 10\r\n",
        };
        let mut c = Conn::open(&url).await;
        c.send(&stream_request("/stream/p/b", &s.token, extra))
            .await;
        assert_eq!(c.head().await.status, 200);
        conns.push(c);
    }
    // Every subscription is open (the live-only ones start at 20).
    assert_eq!(s.app().bus.total_subscribers(), 1000);
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let app = s.app().clone();
            tokio::spawn(async move { emit_n(&app, "p", "b", 100).await })
        })
        .collect();
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut body = Vec::new();
                c.body_until(&mut body, "\"id\":220,").await;
                (i, frame_ids(&body))
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    for r in readers {
        let (i, got) = r.await.unwrap();
        let from = [21, 1, 11][i % 3];
        assert_eq!(got, (from..=220).collect::<Vec<_>>(), "subscriber {i}");
    }
    s.server.shutdown().await;
}
