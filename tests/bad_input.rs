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
