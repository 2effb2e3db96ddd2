//! Every route in the OpenAPI document, swept with the inputs an attacker or a buggy client
//! sends: no credentials, traversal and malformed ids in every path parameter, oversized and
//! truncated bodies, oversized headers. Each gets a 4xx JSON error, nothing is created on disk
//! outside the workspace, and the server stays healthy. New routes are covered as they are
//! added, because the list comes from the server itself.
//!
//! Then good, unknown, conflicting and wrongly typed input, and the contract: every status a
//! route answered anywhere in the sweep is one the document declares for that route.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{Value, json};

const OPEN_ROUTES: [&str; 5] = [
    "/health",
    "/openapi.json",
    "/reference",
    "/auth/session",
    "/auth/logout",
];

/// The OpenAPI document the server serves.
async fn document(s: &TestServer) -> Value {
    s.http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// (method, path template) of every documented operation.
fn routes(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    assert!(out.len() >= 10, "the document lists every route: {out:?}");
    out
}

/// The template with every `{param}` replaced by `value` (good ids for the others).
fn fill(template: &str, bad_param: Option<&str>, value: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map(|e| start + e)
            .expect("closing brace");
        let name = &rest[start + 1..end];
        let good = match name {
            "projectId" => "p",
            "branchId" => "b",
            "versionId" => "1",
            _ => "x",
        };
        out.push_str(if bad_param == Some(name) || bad_param == Some("*") {
            value
        } else {
            good
        });
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn params(template: &str) -> Vec<&str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(n, _)| n))
        .collect()
}

async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
) -> reqwest::Response {
    let mut req = http.request(method.to_uppercase().parse().unwrap(), url);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    req.send().await.unwrap()
}

/// The statuses each route (method, path template) answered during the sweep.
#[derive(Default)]
struct Answered(BTreeMap<(String, String), BTreeSet<u16>>);

impl Answered {
    fn note(&mut self, method: &str, template: &str, status: u16) -> u16 {
        self.0
            .entry((method.to_string(), template.to_string()))
            .or_default()
            .insert(status);
        status
    }

    /// Send, and note the answer's status.
    async fn send(
        &mut self,
        http: &reqwest::Client,
        method: &str,
        template: &str,
        url: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let res = send(http, method, url, body).await;
        let status = self.note(method, template, res.status().as_u16());
        // An event stream does not end: its head is the answer.
        let json = res
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
        if !json {
            return (status, Value::Null);
        }
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Every answered status that the document does not declare for its route.
    fn undeclared(&self, doc: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for ((method, template), statuses) in &self.0 {
            let responses = &doc["paths"][template][method]["responses"];
            let declared: Vec<&String> = responses
                .as_object()
                .map(|r| r.keys().collect())
                .unwrap_or_default();
            for status in statuses {
                if responses.get(status.to_string()).is_none() {
                    out.push(format!(
                        "{} {template} answered {status}, which the document does not declare \
                         for it (it declares {declared:?})",
                        method.to_uppercase()
                    ));
                }
            }
        }
        out
    }
}

/// Status of a request sent byte for byte, without any client-side path normalisation.
async fn raw_status(s: &TestServer, method: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(s.server.addr).await.unwrap();
    let body = if method == "get" { "" } else { "{}" };
    let request = format!(
        "{} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        method.to_uppercase(),
        s.token,
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    conn.read_exact(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

async fn assert_json_4xx(res: reqwest::Response, what: &str) -> u16 {
    let status = res.status().as_u16();
    assert_json_error(res, what).await;
    assert!(
        (400..500).contains(&status),
        "{what}: expected 4xx, got {status}"
    );
    status
}

async fn assert_json_error(res: reqwest::Response, what: &str) {
    let status = res.status().as_u16();
    let body: Value = res
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: {status}: JSON error body: {e}"));
    assert!(
        body["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{what}: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// Everything under the workspace, to prove bad requests wrote nothing.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.starts_with(".weldr-agent") || rel.starts_with(".weldr-objects") {
                continue; // the store itself, and the fs object store the syncer pushes to
            }
            out.push(rel);
            if entry.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A replay transcript in `dir` whose workflow replies once, without a plan; its model name.
fn reply_model(dir: &std::path::Path) -> String {
    let path = dir.join("reply.json");
    let turns = json!([[{ "type": "text", "text": "Nothing to change." }]]);
    std::fs::write(&path, serde_json::to_vec(&turns).unwrap()).unwrap();
    format!("replay:{}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_bad_input_and_answers_only_documented_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let replays = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.providers.replay_dir = Some(replays.path().to_path_buf());
    // Anthropic answers and then stalls: its workflow is still running when the sweep cancels
    // it (a replay workflow may already be over, and its cancel would only ever be 409).
    let stalling = fake_llm::FakeLlm::start(vec![fake_llm::Reply::Stall]).await;
    let fake_keys = stalling.keys();
    cfg.providers.anthropic_api_key = fake_keys.anthropic_api_key;
    cfg.providers.anthropic_base_url = fake_keys.anthropic_base_url;
    // Low enough that the good-input phase runs into it (429).
    cfg.trigger_rate_per_minute = 2;
    // Small enough that the sweep's 2 MiB body is too large for the upload route and for
    // /trigger (whose limit grows with it).
    cfg.attachment_max_bytes = 256 * 1024;
    let s = start(cfg).await;
    let created = s
        .http
        .post(s.url("/projects"))
        .json(&json!({ "projectId": "p" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created = s
        .http
        .post(s.url("/projects/p/branches"))
        .json(&json!({ "branchId": "b" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let before = tree(tmp.path());
    // A fresh connection per request: the server closes the connection after an oversized
    // body or header, and a pooled connection it is closing would fail the next request.
    let http = {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {}", s.token).parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let anonymous = reqwest::Client::new();
    let doc = document(&s).await;
    let routes = routes(&doc);
    let mut answered = Answered::default();

    for (method, template) in &routes {
        let open = OPEN_ROUTES.contains(&template.as_str());
        let url = s.url(&fill(template, None, ""));
        let takes_body = method == "post" || method == "put" || method == "patch";
        // A body of any type (an upload), not a JSON one.
        let raw_body = takes_body && template.ends_with("/attachments");

        // No credentials, or a garbage bearer: 401 everywhere but the open routes.
        if !open {
            for client in [&anonymous, &client_with_token("not-a-token")] {
                let body = takes_body.then(|| b"{}".to_vec());
                let res = send(client, method, &url, body).await;
                answered.note(method, template, res.status().as_u16());
                let status =
                    assert_json_4xx(res, &format!("{method} {template} unauthenticated")).await;
                assert_eq!(status, 401, "{method} {template} unauthenticated");
            }
        }

        // Traversal and malformed ids in each path parameter.
        let names = params(template);
        let sweep = if names.is_empty() {
            Vec::new()
        } else {
            names.into_iter().chain(std::iter::once("*")).collect()
        };
        for param in sweep {
            // `..` goes raw over TCP: an HTTP client would resolve it before sending.
            for bad in ["..", "%2e%2e", "."] {
                let path = fill(template, Some(param), bad);
                let status = answered.note(method, template, raw_status(&s, method, &path).await);
                assert!(
                    (400..500).contains(&status),
                    "{method} {path} (raw): {status}"
                );
            }
            for bad in ["a%2fb", "a.b", "%00", "x%0ay", &"y".repeat(65), "%C3%A9"] {
                let path = fill(template, Some(param), bad);
                let body = takes_body.then(|| b"{}".to_vec());
                let res = send(&http, method, &s.url(&path), body).await;
                answered.note(method, template, res.status().as_u16());
                assert_json_4xx(res, &format!("{method} {path}")).await;
            }
        }

        if takes_body && !open {
            // Oversized, truncated, empty, wrong-typed and traversal-carrying bodies.
            let huge = format!("{{\"projectId\":\"{}\"}}", "a".repeat(2 << 20)).into_bytes();
            // The server answers 413 as soon as the limit is passed and closes the connection;
            // a client still sending may see the close before the answer, which is fine too.
            let req = http
                .request(method.to_uppercase().parse().unwrap(), &url)
                .header("content-type", "application/json");
            if let Ok(res) = req.body(huge).send().await {
                answered.note(method, template, res.status().as_u16());
                let status = assert_json_4xx(res, &format!("{method} {template} huge")).await;
                assert_eq!(status, 413, "{method} {template} huge body");
            }
            if raw_body {
                // Routes that take any bytes (uploads): bodies that are no acceptable file.
                for (content_type, body) in [
                    ("text/plain", &b""[..]),
                    ("text/plain", b"\xff\xfe"),
                    ("application/octet-stream", b"{}"),
                    ("image/png", b"not a png"),
                    (
                        "multipart/form-data; boundary=x",
                        b"--x\r\n\r\nno file\r\n--x--\r\n",
                    ),
                ] {
                    let res = http
                        .request(method.to_uppercase().parse().unwrap(), &url)
                        .header("content-type", content_type)
                        .body(body.to_vec())
                        .send()
                        .await
                        .unwrap();
                    answered.note(method, template, res.status().as_u16());
                    let what = format!("{method} {template} {content_type} {body:?}");
                    assert_json_4xx(res, &what).await;
                }
            }
            for body in [
                &b"{\"projectId\": \"p\", \"bran"[..],
                b"",
                b"[]",
                b"null",
                b"{\"projectId\": 7, \"branchId\": [], \"versionId\": {}}",
                b"{\"projectId\":\"..\",\"branchId\":\"../../etc\",\"versionId\":\"1\",\"message\":\"m\"}",
                b"\xff\xfe",
            ]
            .into_iter()
            .filter(|_| !raw_body)
            {
                let res = send(&http, method, &url, Some(body.to_vec())).await;
                answered.note(method, template, res.status().as_u16());
                assert_json_4xx(res, &format!("{method} {template} body {:?}", String::from_utf8_lossy(body))).await;
            }
            // A body that is not JSON by its type (what a cross-site form sends; an upload
            // takes it).
            let res = http
                .request(method.to_uppercase().parse().unwrap(), &url)
                .header("content-type", "text/plain")
                .body("{}")
                .send()
                .await
                .unwrap();
            answered.note(method, template, res.status().as_u16());
            if !raw_body {
                assert_json_error(res, &format!("{method} {template} text/plain")).await;
            }
        }

        // Oversized headers.
        let res = http
            .request(method.to_uppercase().parse().unwrap(), &url)
            .header("x-big", "z".repeat(48 * 1024))
            .send()
            .await;
        if let Ok(res) = res {
            answered.note(method, template, res.status().as_u16());
            assert_eq!(res.status().as_u16(), 431, "{method} {template} big header");
        }
    }

    assert_eq!(
        tree(tmp.path()),
        before,
        "bad requests changed the workspace"
    );
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    let health = s.http.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Stored data is intact: the project and branch are still there.
    let res = s
        .http
        .get(s.url("/projects/p/branches/b"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Well-formed ids of things that do not exist: 404 (a good body where one is needed).
    for (method, template) in &routes {
        for param in params(template) {
            let path = fill(template, Some(param), "nope");
            let body = (method == "post").then(|| {
                if template.ends_with("/versions") {
                    json!({ "message": "m" })
                } else if template.ends_with("/branches") {
                    json!({ "branchId": "x" })
                } else {
                    json!({})
                }
            });
            let (status, _) = answered
                .send(&http, method, template, &s.url(&path), body)
                .await;
            assert!((400..500).contains(&status), "{method} {path}: {status}");
        }
    }

    // Good input, then the same again (conflicts), route by route.
    let model = reply_model(replays.path());
    let mut call = async |method: &str, template: &str, path: &str, body: Option<Value>| {
        answered
            .send(&http, method, template, &s.url(path), body)
            .await
    };
    call("get", "/health", "/health", None).await;
    call("get", "/disk", "/disk", None).await;
    call("get", "/mirrors", "/mirrors", None).await;
    let token = json!({ "token": s.token });
    call("post", "/auth/session", "/auth/session", Some(token)).await;
    call("post", "/auth/logout", "/auth/logout", None).await;
    call("get", "/projects", "/projects", None).await;
    for _ in 0..2 {
        call(
            "post",
            "/projects",
            "/projects",
            Some(json!({ "projectId": "q", "title": "Q" })),
        )
        .await;
    }
    call("get", "/projects/{projectId}", "/projects/p", None).await;
    call(
        "get",
        "/projects/{projectId}/branches",
        "/projects/p/branches",
        None,
    )
    .await;
    let create = "/projects/{projectId}/branches";
    for body in [
        json!({ "branchId": "c" }),
        json!({ "branchId": "c" }),
        json!({ "branchId": "d", "fromBranchId": "b" }),
        json!({ "branchId": "e", "fromBranchId": "b", "fromVersionId": "99" }),
        json!({ "branchId": "f", "fromVersionId": "1" }),
    ] {
        call("post", create, "/projects/p/branches", Some(body)).await;
    }
    let branch = "/projects/{projectId}/branches/{branchId}";
    call("get", branch, "/projects/p/branches/b", None).await;
    let versions = "/projects/{projectId}/branches/{branchId}/versions";
    call("get", versions, "/projects/p/branches/b/versions", None).await;
    let checkpoint = json!({ "message": "add a file" });
    call(
        "post",
        versions,
        "/projects/p/branches/b/versions",
        Some(checkpoint.clone()),
    )
    .await;
    std::fs::write(tmp.path().join("p/b/added.txt"), "added\n").unwrap();
    for _ in 0..2 {
        call(
            "post",
            versions,
            "/projects/p/branches/b/versions",
            Some(checkpoint.clone()),
        )
        .await;
    }
    let messages = "/projects/{projectId}/branches/{branchId}/messages";
    call("get", messages, "/projects/p/branches/b/messages", None).await;
    call(
        "get",
        messages,
        "/projects/p/branches/b/messages?limit=2&before=9",
        None,
    )
    .await;
    call(
        "get",
        messages,
        "/projects/p/branches/b/messages?limit=0",
        None,
    )
    .await;
    let diff = "/projects/{projectId}/branches/{branchId}/versions/{versionId}/diff";
    for v in ["1", "2", "99"] {
        call(
            "get",
            diff,
            &format!("/projects/p/branches/b/versions/{v}/diff"),
            None,
        )
        .await;
    }
    for v in ["1", "99"] {
        let body = json!({ "projectId": "p", "branchId": "b", "versionId": v });
        call("post", "/revert", "/revert", Some(body)).await;
    }
    let sync = "/projects/{projectId}/branches/{branchId}/sync";
    call("post", sync, "/projects/p/branches/b/sync", None).await;
    call("post", sync, "/projects/p/branches/b/sync", Some(json!({}))).await;
    // A JSON body is a JSON attachment; the same bytes again are the same attachment (200).
    let upload = "/projects/{projectId}/attachments";
    let mut uploaded = Value::Null;
    for _ in 0..2 {
        let body = Some(json!({ "notes": "n" }));
        (_, uploaded) = call("post", upload, "/projects/p/attachments", body).await;
    }
    let attachment = uploaded["attachmentId"].as_str().unwrap_or_default();
    let read = "/projects/{projectId}/attachments/{attachmentId}";
    for id in [attachment, &"0".repeat(64)] {
        call("get", read, &format!("/projects/p/attachments/{id}"), None).await;
    }
    // Integrations: the catalog; one that waits for its dependencies (it never runs here),
    // listed, cancelled (then 409), and queued again through the seed's route.
    call("get", "/integrations", "/integrations", None).await;
    let queue = "/projects/{projectId}/branches/{branchId}/integrations";
    let (_, job) = call(
        "post",
        queue,
        "/projects/p/branches/b/integrations",
        Some(json!({ "key": "better-auth" })),
    )
    .await;
    call("get", queue, "/projects/p/branches/b/integrations", None).await;
    let ticket = json!({ "projectId": "p", "branchId": "b" });
    call("post", "/stream-tickets", "/stream-tickets", Some(ticket)).await;
    let job_id = job["jobId"].as_str().unwrap_or("job-0");
    let cancel = "/projects/{projectId}/branches/{branchId}/integrations/{jobId}/cancel";
    for _ in 0..2 {
        let path = format!("/projects/p/branches/b/integrations/{job_id}/cancel");
        call("post", cancel, &path, None).await;
    }
    let install = json!({ "projectId": "p", "branchId": "b",
                          "integrations": [{ "key": "better-auth" }] });
    call(
        "post",
        "/integrations/install",
        "/integrations/install",
        Some(install),
    )
    .await;
    // The stream answers its head at once; dropping the answer closes it.
    call("get", "/stream/{projectId}/{branchId}", "/stream/p/b", None).await;
    let mut workflows = Vec::new();
    let stalled = "anthropic:claude-sonnet-4-5";
    for (text, model) in [("hello", stalled), ("again", &model), ("once more", &model)] {
        let body = json!({
            "projectId": "p",
            "branchId": "b",
            "model": model,
            "message": { "content": [{ "type": "text", "text": text }] },
        });
        let (status, answer) = call("post", "/trigger", "/trigger", Some(body)).await;
        if status == 202 {
            workflows.push(answer["workflowId"].as_str().unwrap().to_string());
        }
    }
    let no_key = json!({
        "projectId": "p",
        "branchId": "b",
        "model": "gemini:gemini-2.5-flash",
        "message": { "content": [{ "type": "text", "text": "hi" }] },
    });
    call("post", "/trigger", "/trigger", Some(no_key)).await;
    assert!(!workflows.is_empty(), "no workflow was started");
    for wf in &workflows {
        let path = format!("/workflows/{wf}");
        call("get", "/workflows/{workflowId}", &path, None).await;
        for _ in 0..2 {
            let path = format!("/workflows/{wf}/cancel");
            call("post", "/workflows/{workflowId}/cancel", &path, None).await;
        }
    }

    // Every route answered a success somewhere above (a new route needs a good request here),
    // and the sweep reached the statuses the contract is about.
    for (method, template) in &routes {
        let statuses = &answered.0[&(method.clone(), template.clone())];
        assert!(
            statuses.iter().any(|s| (200..300).contains(s)),
            "{method} {template} never succeeded in the sweep ({statuses:?}): add a good request"
        );
    }
    let all: BTreeSet<u16> = answered.0.values().flatten().copied().collect();
    for status in [200, 201, 202, 400, 401, 404, 409, 413, 415, 429, 431] {
        assert!(
            all.contains(&status),
            "the sweep never saw {status}: {all:?}"
        );
    }

    let undeclared = answered.undeclared(&doc);
    assert!(undeclared.is_empty(), "{}", undeclared.join("\n"));
}
