//! Every route in the OpenAPI document, swept with the inputs an attacker or a buggy client
//! sends: no credentials, traversal and malformed ids in every path parameter, oversized and
//! truncated bodies, oversized headers. Each gets a 4xx JSON error, nothing is created on disk
//! outside the workspace, and the server stays healthy. New routes are covered as they are
//! added, because the list comes from the server itself.

mod common;

use common::*;
use serde_json::Value;

const OPEN_ROUTES: [&str; 3] = ["/health", "/openapi.json", "/reference"];

/// (method, path template) of every documented operation.
async fn routes(s: &TestServer) -> Vec<(String, String)> {
    let doc: Value = s
        .http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    assert!(
        (400..500).contains(&status),
        "{what}: expected 4xx, got {status}"
    );
    let body: Value = res
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: JSON error body: {e}"));
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
    status
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_bad_input_with_a_json_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let created = s
        .http
        .post(s.url("/projects"))
        .json(&serde_json::json!({ "projectId": "p" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created = s
        .http
        .post(s.url("/projects/p/branches"))
        .json(&serde_json::json!({ "branchId": "b" }))
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
    let routes = routes(&s).await;

    for (method, template) in &routes {
        let open = OPEN_ROUTES.contains(&template.as_str());
        let url = s.url(&fill(template, None, ""));
        let takes_body = method == "post" || method == "put" || method == "patch";

        // No credentials, or a garbage bearer: 401 everywhere but the open routes.
        if !open {
            for client in [&anonymous, &client_with_token("not-a-token")] {
                let body = takes_body.then(|| b"{}".to_vec());
                let status = assert_json_4xx(
                    send(client, method, &url, body).await,
                    &format!("{method} {template} unauthenticated"),
                )
                .await;
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
                let status = raw_status(&s, method, &path).await;
                assert!(
                    (400..500).contains(&status),
                    "{method} {path} (raw): {status}"
                );
            }
            for bad in ["a%2fb", "a.b", "%00", "x%0ay", &"y".repeat(65), "%C3%A9"] {
                let path = fill(template, Some(param), bad);
                let body = takes_body.then(|| b"{}".to_vec());
                let res = send(&http, method, &s.url(&path), body).await;
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
                let status = assert_json_4xx(res, &format!("{method} {template} huge")).await;
                assert_eq!(status, 413, "{method} {template} huge body");
            }
            for body in [
                &b"{\"projectId\": \"p\", \"bran"[..],
                b"",
                b"[]",
                b"null",
                b"{\"projectId\": 7, \"branchId\": [], \"versionId\": {}}",
                b"{\"projectId\":\"..\",\"branchId\":\"../../etc\",\"versionId\":\"1\",\"message\":\"m\"}",
                b"\xff\xfe",
            ] {
                let res = send(&http, method, &url, Some(body.to_vec())).await;
                assert_json_4xx(res, &format!("{method} {template} body {:?}", String::from_utf8_lossy(body))).await;
            }
        }

        // Oversized headers.
        let res = http
            .request(method.to_uppercase().parse().unwrap(), &url)
            .header("x-big", "z".repeat(48 * 1024))
            .send()
            .await;
        if let Ok(res) = res {
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
}
