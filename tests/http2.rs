//! HTTP/2 with real clients: h2c with prior knowledge on the plain listener (what Fly's proxy
//! speaks to a machine), and h2 chosen by ALPN over TLS next to HTTP/1.1. Several SSE streams
//! share one connection (a browser's six connections per host no longer limit a page to six
//! streams) and each receives its own branch's events. curl checks the same when installed.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use reqwest::Version;
use weldr_agent::app::App;

/// A client that sends `token` and speaks HTTP/2 with prior knowledge (h2c).
fn h2c_client(token: &str) -> reqwest::Client {
    weldr_agent::install_crypto_provider();
    reqwest::Client::builder()
        .default_headers(auth_headers(token))
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// A client for the test certificate: ALPN offers h2 and http/1.1 unless `http1_only`.
fn tls_client(token: &str, http1_only: bool) -> reqwest::Client {
    weldr_agent::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .default_headers(auth_headers(token))
        // The certificate is made by this test and signs itself.
        .tls_danger_accept_invalid_certs(true);
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().unwrap()
}

fn auth_headers(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    headers
}

/// An open SSE response body and the bytes read from it so far.
struct Stream {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    text: String,
}

impl Stream {
    /// `GET url` (resuming after `last_event_id`), which must answer 200 over HTTP/2.
    async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Stream {
        let mut req = client.get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200, "{url}");
        assert_eq!(res.version(), Version::HTTP_2, "{url}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Stream {
            body: Box::pin(res.bytes_stream()),
            text: String::new(),
        }
    }

    /// Read until the event with `id` arrived; the ids of the events read, in order.
    async fn until_id(&mut self, id: u64) -> Vec<u64> {
        let wanted = format!("id: {id}\n");
        while !self.text.contains(&wanted) {
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("no event within 30 s")
                .expect("the stream ended early")
                .unwrap();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        self.text
            .split("\n\n")
            .filter_map(|frame| frame.strip_prefix("id: ")?.split('\n').next()?.parse().ok())
            .collect()
    }
}

/// Three streams opened at once on one connection, two of branch b (one live, one replaying
/// from the start) and one of branch c; each gets exactly its branch's events.
async fn three_streams_on_one_connection(app: &App, client: &reqwest::Client, base: &str) {
    emit_n(app, "p", "b", 3).await;
    let (b, c) = (format!("{base}/stream/p/b"), format!("{base}/stream/p/c"));
    let (mut live_b, mut all_b, mut live_c) = tokio::join!(
        Stream::open(client, &b, None),
        Stream::open(client, &b, Some("0")),
        Stream::open(client, &c, None),
    );
    emit_n(app, "p", "b", 2).await;
    emit_n(app, "p", "c", 4).await;
    let (live_b, all_b, live_c) =
        tokio::join!(live_b.until_id(5), all_b.until_id(5), live_c.until_id(4));
    assert_eq!(live_b, vec![4, 5]);
    assert_eq!(all_b, vec![1, 2, 3, 4, 5]);
    assert_eq!(live_c, vec![1, 2, 3, 4]);
}

/// Whether curl is installed with HTTP/2 support.
fn curl_with_http2() -> bool {
    let Ok(out) = Command::new("curl").arg("--version").output() else {
        eprintln!("curl is not installed: its part of the test is skipped");
        return false;
    };
    let has = String::from_utf8_lossy(&out.stdout).contains("HTTP2");
    if !has {
        eprintln!("curl has no HTTP/2 support: its part of the test is skipped");
    }
    has
}

/// curl with `args` until its standard output passes `done` (the server allows one
/// connection, and the previous client's may still be closing: meanwhile the answer is 503);
/// the last output. curl exits non-zero at `--max-time` on a stream: that ends the stream
/// checks.
async fn curl_until(args: &[String], done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let args = args.to_vec();
        last = tokio::task::spawn_blocking(move || {
            let out = Command::new("curl")
                .args(&args)
                .stderr(Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .await
        .unwrap();
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_serves_several_streams_over_one_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    // One connection only: a stream request on a second connection would get 503 (the
    // health reserve serves /health alone), so the streams below share the first one.
    cfg.max_connections = Some(1);
    let s = start(cfg).await;
    branch(s.app(), "p", "b").await;
    branch(s.app(), "p", "c").await;
    let client = h2c_client(&s.token);
    let res = client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    // A response kept holds its connection open (the one connection allowed).
    drop(res);
    three_streams_on_one_connection(s.app(), &client, &s.server.url()).await;
    // Errors are the same JSON over HTTP/2.
    let res = client.get(s.url("/stream/p/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "branch_not_found");
    // Request bodies larger than the flow-control window arrive whole (JSON padded with
    // whitespace); the body limit holds.
    for (pad, status) in [(700 * 1024, 201), (2 << 20, 413)] {
        let body = format!(r#"{{"projectId": "big{pad}"{}}}"#, " ".repeat(pad));
        let res = client
            .post(s.url("/projects"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{pad} bytes");
        assert_eq!(res.version(), Version::HTTP_2);
    }
    drop(client);

    if curl_with_http2() {
        let health = s.url("/health");
        let version = curl_until(
            &strings(&[
                "-s",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &health,
            ]),
            |out| out == "2 200",
        )
        .await;
        assert_eq!(version, "2 200", "curl --http2-prior-knowledge /health");
        let auth = format!("Authorization: Bearer {}", s.token);
        let stream = s.url("/stream/p/c");
        let out = curl_until(
            &strings(&[
                "-sN",
                "--http2-prior-knowledge",
                "--max-time",
                "3",
                "-H",
                &auth,
                "-H",
                "Last-Event-ID: 0",
                &stream,
            ]),
            |out| out.starts_with("retry: "),
        )
        .await;
        assert!(out.starts_with("retry: "), "{out}");
        assert!(out.contains("id: 4\nevent: text\n"), "{out}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_h2_by_alpn_and_still_serves_http1() {
    let tmp = tempfile::tempdir().unwrap();
    let cert_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.host = "127.0.0.1".parse().unwrap();
    cfg.port = 0;
    cfg.tls = Some(certs::self_signed(cert_dir.path()));
    cfg.max_connections = Some(1);
    weldr_agent::install_crypto_provider();
    let app = App::open(cfg).expect("open store");
    weldr_agent::app::prepare(&app).await.unwrap();
    let token = weldr_agent::auth::tokens::create(&app.store, "test")
        .await
        .unwrap();
    branch(&app, "p", "b").await;
    branch(&app, "p", "c").await;
    let server = weldr_agent::server::start(app.clone()).await.unwrap();
    let base = server.url();
    assert!(base.starts_with("https://"), "{base}");

    let client = tls_client(&token, false);
    let res = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    drop(res);
    three_streams_on_one_connection(&app, &client, &base).await;
    drop(client);

    // A client that offers only http/1.1 gets it, on a connection of its own.
    let http1 = tls_client(&token, true);
    let mut res = None;
    for _ in 0..100 {
        let r = http1
            .get(format!("{base}/stream/p/c"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            res = Some(r);
            break;
        }
        // The HTTP/2 connection above may not have closed yet (reserve answers 503).
        assert_eq!(r.status(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = res.expect("an HTTP/1.1 stream over TLS");
    assert_eq!(res.version(), Version::HTTP_11);
    drop(res);
    drop(http1);

    if curl_with_http2() {
        let health = format!("{base}/health");
        let version = curl_until(
            &strings(&[
                "-sk",
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &health,
            ]),
            |out| out == "2 200",
        )
        .await;
        assert_eq!(version, "2 200", "curl --http2 over TLS");
        let auth = format!("Authorization: Bearer {token}");
        let stream = format!("{base}/stream/p/b?lastEventId=2");
        let out = curl_until(
            &strings(&["-skN", "--http2", "--max-time", "3", "-H", &auth, &stream]),
            |out| out.starts_with("retry: "),
        )
        .await;
        assert!(out.starts_with("retry: "), "{out}");
        assert!(out.contains("id: 5\nevent: text\n"), "{out}");
        assert!(!out.contains("id: 2\n"), "{out}");
    }
    server.shutdown().await;
}
