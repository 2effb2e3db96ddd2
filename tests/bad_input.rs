//! Bad input of every kind gets a clear 4xx JSON error, and the server stays healthy.

mod common;

use common::*;

async fn error_of(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.expect("JSON error body");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_cursors_unknown_ids_and_traversal_are_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    branch(s.app(), "p", "b").await;
    emit_n(s.app(), "p", "b", 3).await;
    let http = s.http.clone();

    for bad in [
        "abc",
        "-1",
        "1.5",
        "0x10",
        "99999999999999999999999",
        " ",
        "1 2",
    ] {
        let res = http
            .get(s.url("/stream/p/b"))
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(res).await,
            (400, "invalid_cursor".into()),
            "header {bad:?}"
        );
    }
    for bad in ["abc", "-1", "", "1e3"] {
        let res = http
            .get(s.url(&format!("/stream/p/b?lastEventId={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(res).await,
            (400, "invalid_cursor".into()),
            "query {bad:?}"
        );
    }
    let res = http.get(s.url("/stream/nope/b")).send().await.unwrap();
    assert_eq!(error_of(res).await, (404, "project_not_found".into()));
    let res = http.get(s.url("/stream/p/nope")).send().await.unwrap();
    assert_eq!(error_of(res).await, (404, "branch_not_found".into()));
    for path in [
        "/stream/p/..",
        "/stream/../b",
        "/stream/p/%2e%2e",
        "/stream/p/b%2fc",
        "/stream/p/a.b",
        "/stream/p%00/b",
    ] {
        let res = http.get(s.url(path)).send().await.unwrap();
        let (status, code) = error_of(res).await;
        assert!(status == 400 || status == 404, "{path}: {status} {code}");
    }
    let long = "x".repeat(65);
    let res = http
        .get(s.url(&format!("/stream/p/{long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await, (400, "invalid_id".into()));
    let res = http.get(s.url("/stream/p/b/extra")).send().await.unwrap();
    assert_eq!(error_of(res).await.0, 404);
    let res = http.get(s.url("/no/such/route")).send().await.unwrap();
    assert_eq!(error_of(res).await, (404, "not_found".into()));
    let res = http.post(s.url("/health")).send().await.unwrap();
    assert!(res.status().is_client_error());

    // Oversized headers: refused, not a crash.
    let res = http
        .get(s.url("/health"))
        .header("x-big", "y".repeat(100 * 1024))
        .send()
        .await;
    if let Ok(res) = res {
        assert_eq!(res.status().as_u16(), 431);
    }
    let many = (0..200).fold(http.get(s.url("/health")), |r, i| {
        r.header(format!("x-h{i}"), "v")
    });
    if let Ok(res) = many.send().await {
        assert!(res.status().is_client_error());
    }

    // Still healthy, and nothing stored changed.
    let health: serde_json::Value = http
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let mut all = s.sse("/stream/p/b", Some("0")).await;
    assert_eq!(ids(&all.read_until(3).await), vec![1, 2, 3]);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_reference_describe_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let http = s.http.clone();
    let doc: serde_json::Value = http
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in ["/health", "/stream/{projectId}/{branchId}"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} documented");
    }
    let params = doc["paths"]["/stream/{projectId}/{branchId}"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = params.iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(names.contains(&"Last-Event-ID") && names.contains(&"lastEventId"));
    document_is_a_contract(&doc);
    let page = http.get(s.url("/reference")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/openapi.json"));
    let health: serde_json::Value = http
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (health["status"].as_str(), health["mode"].as_str()),
        (Some("ok"), Some("local"))
    );
    assert!(health["version"].is_string() && health["uptimeSeconds"].is_u64());
    s.server.shutdown().await;
}

/// A schema with `$ref`s into `components/schemas` followed (one level of `allOf`/`oneOf` too).
fn resolve<'a>(
    doc: &'a serde_json::Value,
    schema: &'a serde_json::Value,
) -> Vec<&'a serde_json::Value> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return resolve(doc, &doc["components"]["schemas"][name]);
    }
    for key in ["allOf", "oneOf"] {
        if let Some(items) = schema[key].as_array() {
            return items.iter().flat_map(|i| resolve(doc, i)).collect();
        }
    }
    vec![schema]
}

/// The id pattern and limits, wherever the schema allows a string.
fn assert_is_id(doc: &serde_json::Value, schema: &serde_json::Value, what: &str) {
    let strings: Vec<_> = resolve(doc, schema)
        .into_iter()
        // Not `null` (an optional field), nor the `allOf` item that only carries a description.
        .filter(|s| s["type"] != "null" && s.get("type").is_some())
        .collect();
    assert!(!strings.is_empty(), "{what}: no schema");
    for s in strings {
        let digits = s["pattern"] == "^0*[1-9][0-9]*$" && s["maxLength"] == 19;
        let id = s["pattern"] == "^[A-Za-z0-9_-]{1,64}$" && s["maxLength"] == 64;
        assert!(
            (id || digits) && s["minLength"] == 1,
            "{what}: {s} is not an id schema"
        );
    }
}

/// What the document promises beyond its paths: how to authenticate, what errors look like,
/// what an id is.
fn document_is_a_contract(doc: &serde_json::Value) {
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["sessionCookie"]["type"], "apiKey");
    assert_eq!(schemes["sessionCookie"]["in"], "cookie");
    assert_eq!(schemes["sessionCookie"]["name"], "weldr.session_token");
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let what = format!("{method} {path}");
            let security: Vec<String> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r.as_object().unwrap().keys().cloned())
                .collect();
            if ["/health", "/auth/session", "/auth/logout"].contains(&path.as_str()) {
                assert!(security.is_empty(), "{what} is open");
            } else {
                assert_eq!(security, ["bearer", "sessionCookie"], "{what}");
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                if status.starts_with('4') || (status.starts_with('5') && path != "/health") {
                    assert_eq!(schema, "#/components/schemas/ErrorBody", "{what} {status}");
                }
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                if p["in"] == "path" {
                    assert_is_id(doc, &p["schema"], &format!("{what} {name}"));
                }
            }
        }
    }
    for (body, fields) in [
        ("CreateProject", &["projectId"][..]),
        (
            "CreateBranch",
            &["branchId", "fromBranchId", "fromVersionId"],
        ),
        ("RevertRequest", &["projectId", "branchId", "versionId"]),
        ("Trigger", &["projectId", "branchId"]),
    ] {
        for field in fields {
            let schema = &doc["components"]["schemas"][body]["properties"][field];
            assert_is_id(doc, schema, &format!("{body}.{field}"));
        }
    }
    let required = &doc["components"]["schemas"]["Trigger"]["required"];
    assert!(
        required.as_array().unwrap().iter().any(|r| r == "message"),
        "/trigger's message is required: {required}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_the_configured_origin_with_credentials_and_last_event_id() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let http = s.http.clone();
    let res = http
        .request(reqwest::Method::OPTIONS, s.url("/stream/p/b"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("last-event-id")
    );
    s.server.shutdown().await;
}
