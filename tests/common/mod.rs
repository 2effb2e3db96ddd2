//! Test helpers: a real server on 127.0.0.1:0 and a real SSE client.
#![allow(dead_code)]

pub mod certs;
mod git;
#[allow(unused_imports)]
pub use git::git;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use weldr_agent::app::App;
pub use weldr_agent::branches::layers::DetachOnDrop;
use weldr_agent::config::Config;
use weldr_agent::registry;
use weldr_agent::server::{RunningServer, start_on};

pub struct TestServer {
    pub server: RunningServer,
    pub dir: PathBuf,
    /// A local API token (operator).
    pub token: String,
    /// A client that sends the token.
    pub http: reqwest::Client,
    /// Layered branches' mounts, detached with the server (as a reboot would).
    pub mounts: DetachOnDrop,
}

/// A reqwest client that sends `Authorization: Bearer <token>` on every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    // reqwest is built without a bundled rustls provider: the process installs ring, once.
    weldr_agent::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

impl TestServer {
    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect_with(&self.http, &self.url(path), last_event_id).await
    }

    /// `GET /workflows/{wf}` as JSON.
    pub async fn workflow(&self, wf: &str) -> serde_json::Value {
        self.http
            .get(self.url(&format!("/workflows/{wf}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST a JSON body; the status and the JSON answer (null when there is none).
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let res = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// GET; the status and the JSON answer (null when there is none).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let res = self.http.get(self.url(path)).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Shut the server down and detach the workspace's mounts, as a reboot would.
    pub async fn stop(self) {
        self.server.shutdown().await;
        drop(self.mounts);
    }

    pub fn app(&self) -> &Arc<App> {
        &self.server.app
    }
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.server.url(), path)
    }
}

pub fn config(dir: &Path) -> Config {
    Config::for_workspace(dir)
}

/// Start a server on a fresh listener over the workspace `dir`.
pub async fn start(config: Config) -> TestServer {
    weldr_agent::install_crypto_provider();
    let dir = config.workspace_base.clone();
    let app = App::open(config).expect("open store");
    weldr_agent::app::prepare(&app).await.unwrap();
    let token = weldr_agent::auth::tokens::create(&app.store, "test")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = client_with_token(&token);
    TestServer {
        server: start_on(app, listener).unwrap(),
        mounts: DetachOnDrop(dir.clone()),
        dir,
        token,
        http,
    }
}

/// Register project `p` and branch `b`.
pub async fn branch(app: &App, p: &str, b: &str) {
    match registry::create_project(&app.store, p, None, None).await {
        Ok(_) => {}
        Err(weldr_agent::branches::BranchError::ProjectExists(_)) => {}
        Err(e) => panic!("{e}"),
    }
    registry::register_branch(&app.store, p, b, None)
        .await
        .unwrap();
    // A registered branch has a directory: at start, one without is settled as evicted.
    let key = weldr_agent::branches::BranchKey::new(p, b);
    std::fs::create_dir_all(weldr_agent::branches::branch_dir(&app.config, &key)).unwrap();
}

/// Set branch p/b's recorded last use (for the eviction loop's LRU order).
pub async fn set_last_access(app: &App, p: &str, b: &str, at_ms: u64) {
    let (p, b) = (p.to_string(), b.to_string());
    app.store
        .writer()
        .write(move |ctx| {
            let mut branch =
                weldr_storage::model::get_branch_for_update(ctx, &p, &b)?.expect("branch");
            branch.last_access_ms = at_ms;
            weldr_storage::model::put_branch(ctx, &branch)
        })
        .await
        .unwrap();
}

pub async fn emit_n(app: &App, p: &str, b: &str, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let key = weldr_agent::branches::BranchKey::new(p, b);
    for i in 0..n {
        ids.push(
            app.base
                .emit(&key, "text", serde_json::json!({ "n": i }))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub id: Option<u64>,
    pub event: String,
    pub data: serde_json::Value,
}

/// A streaming SSE client that parses frames as they arrive.
pub struct SseClient {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    pub retry_seen: bool,
}

impl SseClient {
    pub async fn connect_with(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut req = client.get(url);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("connect");
        assert_eq!(res.status(), 200, "stream status");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        SseClient {
            body: Box::pin(res.bytes_stream()),
            buf: Vec::new(),
            retry_seen: false,
        }
    }

    /// The next event frame (comments and retry hints are skipped); None when the stream ends.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(pos) = find(&self.buf, b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8(raw).expect("utf8 frame");
                let mut frame = Frame {
                    id: None,
                    event: String::new(),
                    data: serde_json::Value::Null,
                };
                let mut has_data = false;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        frame.id = Some(v.parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        frame.event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        frame.data = serde_json::from_str(v).expect("JSON data");
                        has_data = true;
                    } else if line.starts_with("retry: ") {
                        self.retry_seen = true;
                    }
                }
                if has_data {
                    return Some(frame);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Every frame up to and including workflow `wf`'s `end`; panics when no event comes
    /// within `per_event`, or when the stream ends first.
    pub async fn until_end(&mut self, wf: &str, per_event: Duration) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let frame = tokio::time::timeout(per_event, self.next())
                .await
                .unwrap_or_else(|_| panic!("no event within {per_event:?} after {out:#?}"))
                .expect("stream ended");
            let end = frame.event == "end" && frame.data["workflowId"] == wf;
            out.push(frame);
            if end {
                return out;
            }
        }
    }

    /// Read frames until one with `id >= last`; panics after `limit` without progress.
    pub async fn read_until(&mut self, last: u64) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.next())
                .await
                .expect("no frame within 30 s (hang)")
                .expect("stream ended early");
            let id = frame.id;
            out.push(frame);
            if id.is_some_and(|id| id >= last) {
                return out;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn ids(frames: &[Frame]) -> Vec<u64> {
    frames.iter().filter_map(|f| f.id).collect()
}
