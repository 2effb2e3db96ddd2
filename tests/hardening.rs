//! The security review's findings, each shown closed against a real server: a flood of idle
//! connections, a stream that outlives its credential, JSON bodies without a JSON content type,
//! replay transcripts read from anywhere, and `weldr-agent events append | head -1`.

#[path = "common/binary.rs"]
mod binary;
mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use weldr_agent::control::{ControlRequest, ControlResult, execute};

/// Create project `p` and branch `b` over the API.
async fn project_and_branch(s: &TestServer) {
    let (status, body) = s.post_json("/projects", json!({"projectId": "p"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s
        .post_json("/projects/p/branches", json!({"branchId": "b"}))
        .await;
    assert_eq!(status, 201, "{body}");
}

/// A client that sends `token`, over HTTP/1.1 or (`h2c`) HTTP/2 with prior knowledge.
fn stream_client(token: &str, h2c: bool) -> reqwest::Client {
    weldr_agent::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let builder = reqwest::Client::builder().default_headers(headers);
    let builder = if h2c {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_local_token_is_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    project_and_branch(&s).await;
    for (name, h2c) in [("http1", false), ("h2c", true)] {
        let token = weldr_agent::auth::tokens::create(&s.app().store, name)
            .await
            .unwrap();
        let client = stream_client(&token, h2c);
        let mut sse = SseClient::connect_with(&client, &s.url("/stream/p/b"), Some("0")).await;
        let id = emit_n(s.app(), "p", "b", 1).await[0];
        sse.read_until(id).await;

        // What `weldr-agent token revoke` asks the server over its control socket.
        let revoked = execute(
            s.app(),
            ControlRequest::RevokeToken {
                which: name.to_string(),
            },
        )
        .await
        .unwrap();
        assert!(
            matches!(revoked, ControlResult::TokenRevoked { revoked: 1 }),
            "{revoked:?}"
        );

        // The stream ends on its own (well within this bound), with no further events.
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match sse.next().await {
                    None => return,
                    Some(frame) => assert!(frame.id.is_none(), "{name}: event after revoke"),
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "{name}: the stream outlived its revoked token"
        );
        // And the token opens nothing any more.
        let res = client.get(s.url("/stream/p/b")).send().await.unwrap();
        assert_eq!(res.status(), 401, "{name}");
    }
    // The operator's own stream (another token) is untouched.
    let mut sse = s.sse("/stream/p/b", None).await;
    let id = emit_n(s.app(), "p", "b", 1).await[0];
    assert_eq!(sse.read_until(id).await.last().unwrap().id, Some(id));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_a_json_content_type_is_415() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let body = r#"{"projectId":"p"}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = s.http.post(s.url("/projects")).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 415, "{content_type:?}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unsupported_media_type");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Nothing was created by those.
    let (status, _) = s.get_json("/projects/p").await;
    assert_eq!(status, 404);
    let res = s
        .http
        .post(s.url("/projects"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_models_read_nothing_outside_replay_dir() {
    let tmp = tempfile::tempdir().unwrap();
    // A valid transcript that must not be played: it lies outside any REPLAY_DIR.
    let transcript = tmp.path().join("t.json");
    std::fs::write(
        &transcript,
        r#"[[{"type":"tool_call","id":"d","name":"done","input":{}}]]"#,
    )
    .unwrap();
    let s = start(config(tmp.path())).await;
    project_and_branch(&s).await;
    for model in [
        format!("replay:{}", transcript.display()),
        "replay:/etc/passwd".into(),
    ] {
        let (status, body) = s
            .post_json(
                "/trigger",
                json!({"projectId": "p", "branchId": "b", "model": model,
                       "message": {"content": [{"type": "text", "text": "hi"}]}}),
            )
            .await;
        assert_eq!(status, 400, "POST /trigger with {model}: {body}");
        assert_eq!(body["error"]["code"], "invalid_model");
        let message = body["error"]["message"].to_string();
        assert!(message.contains("REPLAY_DIR"), "{message}");
        assert!(!message.contains("root:"), "{message}");
    }
    s.stop().await;
}

#[test]
fn events_append_into_a_closed_pipe_exits_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    binary::run_ok(binary::cli(ws).args(["project", "create", "p"]));
    binary::run_ok(binary::cli(ws).args(["branch", "create", "p", "b"]));
    // `weldr-agent events append ... | head -1`
    let mut child = binary::cli(ws)
        .args(["events", "append", "p", "b", "--count", "5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("ID="), "{first}");
    // The reader is gone now (its end of the pipe dropped above).
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{status:?}: {stderr}"
        );
    }
    #[cfg(not(unix))]
    assert!(status.success(), "{status:?}: {stderr}");
}

/// One request on a fresh connection (`Connection: close`); the status, or None when the
/// connection was refused, reset or closed without an answer.
fn status_of(port: u16, request: &str) -> Option<u16> {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let head = String::from_utf8_lossy(&answer);
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn health(port: u16) -> Option<u16> {
    status_of(
        port,
        "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
}

/// The server answers nothing more on `conn` and closes it (EOF or reset) within `bound`.
fn closed_within(conn: &mut std::net::TcpStream, bound: Duration) -> bool {
    conn.set_read_timeout(Some(bound)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_flood_of_idle_connections_is_capped_and_health_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let port = binary::free_port();
    // Idle connections keep their slots for the whole test (a long head timeout).
    let mut server = binary::serve_with(
        tmp.path(),
        port,
        &[
            ("MAX_CONNECTIONS", "64"),
            ("REQUEST_HEAD_TIMEOUT_SECONDS", "600"),
        ],
    );
    // This process holds the client ends: stay well inside its own descriptor limit.
    let fds = weldr_agent::server::raise_fd_limit();
    let flood = 2000.min(fds.saturating_sub(256) as usize);
    assert!(flood > 200, "too few file descriptors for the test ({fds})");
    let mut idle = Vec::with_capacity(flood);
    for _ in 0..flood {
        if let Ok(conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            idle.push(conn);
        }
    }
    assert!(idle.len() > 200, "only {} connections opened", idle.len());

    // /health answers (from the reserve past the cap) while the flood is held open: once the
    // burst's reserve connections have been turned away, and every time after.
    let mut first = None;
    for _ in 0..300 {
        first = health(port);
        if first == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(first, Some(200), "/health during the flood");
    for _ in 0..20 {
        assert_eq!(health(port), Some(200), "/health during the flood");
    }
    // Every other route is refused past the cap, cheaply: a 503 or a closed connection.
    let other = status_of(
        port,
        "GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(matches!(other, None | Some(503)), "{other:?}");

    // The flood goes away; the server serves everything again.
    drop(idle);
    let mut after = None;
    for _ in 0..300 {
        after = status_of(
            port,
            "GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        if after == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(after, Some(200), "a route after the flood");
    binary::sigkill(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_a_reserve_connection_serves_health_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.max_connections = Some(1);
    let s = start(cfg).await;
    let addr = s.server.addr;
    // The one connection: half a head, so it stays open.
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    // What a reserve connection answers to `request`: the whole answer (it closes).
    let answer = |request: &'static str| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut out))
            .await
            .expect("the reserve connection is closed after its answer")
            .unwrap();
        String::from_utf8(out).unwrap()
    };
    let other = answer("GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 503 "), "{other}");
    assert!(other.contains("too_many_connections"), "{other}");
    let health = answer("GET /health HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200 "), "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    // The slot is free once the held connection goes.
    drop(held);
    let mut status = 0;
    for _ in 0..300 {
        status = s
            .http
            .get(s.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    s.stop().await;
}

#[test]
fn a_connection_without_a_complete_head_is_closed_after_the_head_timeout() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let port = binary::free_port();
    let mut server = binary::serve_with(tmp.path(), port, &[("REQUEST_HEAD_TIMEOUT_SECONDS", "1")]);
    // Half a head of an ordinary route, of a stream request, nothing at all, and an idle
    // keep-alive connection after one full request.
    let mut half_route = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    half_route
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let mut half_stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    half_stream
        .write_all(b"GET /stream/p/b HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut keep_alive = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    keep_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    for (name, conn) in [
        ("half a route head", &mut half_route),
        ("half a stream head", &mut half_stream),
        ("no head", &mut silent),
        ("idle keep-alive", &mut keep_alive),
    ] {
        assert!(
            closed_within(conn, Duration::from_secs(60)),
            "{name}: still open"
        );
    }
    // Whole requests are served as before.
    assert_eq!(health(port), Some(200));
    binary::sigkill(&mut server);
}
