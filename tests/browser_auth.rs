//! Browsers as clients: a local token exchanged for an HttpOnly cookie session (CSRF by
//! `Origin`), logout, revocation, and single-use stream tickets for cross-origin pages.

mod common;

use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use serde_json::json;

fn plain() -> reqwest::Client {
    weldr_agent::install_crypto_provider();
    reqwest::Client::new()
}

/// The `weldr_session=…` pair of a `Set-Cookie` header, and the header itself.
fn session_cookie(res: &reqwest::Response) -> (String, String) {
    let header = res
        .headers()
        .get(SET_COOKIE)
        .expect("a Set-Cookie header")
        .to_str()
        .unwrap()
        .to_string();
    let pair = header.split(';').next().unwrap().trim().to_string();
    (pair, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_becomes_an_http_only_cookie_that_every_route_accepts_and_csrf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::start(common::config(dir.path())).await;
    let http = plain();
    let origin = s.url("").trim_end_matches('/').to_string();

    // A wrong token: 401, no cookie.
    let res = http
        .post(s.url("/auth/session"))
        .json(&json!({"token": "wa_nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get(SET_COOKIE).is_none());
    // Not JSON / unknown fields: 4xx.
    let res = http
        .post(s.url("/auth/session"))
        .json(&json!({"token": s.token, "extra": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    let res = http
        .post(s.url("/auth/session"))
        .json(&json!({"token": s.token}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (cookie, header) = session_cookie(&res);
    assert!(cookie.starts_with("weldr_session=ws_"), "{header}");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(header.contains(attribute), "{header}");
    }
    assert!(
        !header.contains("Secure"),
        "plain HTTP: no Secure flag: {header}"
    );
    assert!(
        !header.contains(&s.token),
        "the token never goes in the cookie"
    );

    // Reads with the cookie alone.
    let res = http
        .get(s.url("/projects"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A change with the cookie: refused without Origin and from another site, accepted from
    // this server's own origin.
    let create = |origin: Option<&str>, id: &str| {
        let mut r = http
            .post(s.url("/projects"))
            .header(COOKIE, &cookie)
            .json(&json!({"projectId": id}));
        if let Some(o) = origin {
            r = r.header(ORIGIN, o);
        }
        r.send()
    };
    let res = create(None, "p1").await.unwrap();
    assert_eq!(res.status(), 403);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cross_site_request");
    let res = create(Some("https://evil.example"), "p1").await.unwrap();
    assert_eq!(res.status(), 403);
    let res = create(Some(&origin), "p1").await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    // A bearer is no cookie: no Origin needed.
    let (status, _) = s.post_json("/projects", json!({"projectId": "p2"})).await;
    assert!((200..300).contains(&status), "{status}");

    // Logout ends it and clears the cookie.
    let res = http
        .post(s.url("/auth/logout"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let (cleared, _) = session_cookie(&res);
    assert_eq!(cleared, "weldr_session=");
    let res = http
        .get(s.url("/projects"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_token_ends_its_browser_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::start(common::config(dir.path())).await;
    let http = plain();
    let token = weldr_agent::auth::tokens::create(&s.app().store, "browser")
        .await
        .unwrap();
    let res = http
        .post(s.url("/auth/session"))
        .json(&json!({ "token": token }))
        .send()
        .await
        .unwrap();
    let (cookie, _) = session_cookie(&res);
    let get = || http.get(s.url("/projects")).header(COOKIE, &cookie).send();
    assert_eq!(get().await.unwrap().status(), 200);
    weldr_agent::auth::tokens::revoke(&s.app().store, "browser")
        .await
        .unwrap();
    assert_eq!(get().await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ticket_opens_one_branch_stream_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = common::start(common::config(dir.path())).await;
    common::branch(s.app(), "p", "b").await;
    common::branch(s.app(), "p", "c").await;
    let http = plain();
    let ticket = |branch: &'static str| {
        let s = &s;
        async move {
            let (status, body) = s
                .post_json(
                    "/stream-tickets",
                    json!({"projectId": "p", "branchId": branch}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            assert!(body["expiresAtMs"].as_u64().unwrap() > 0);
            body["ticket"].as_str().unwrap().to_string()
        }
    };
    let open = |branch: &str, ticket: &str| {
        http.get(s.url(&format!("/stream/p/{branch}?ticket={ticket}")))
            .send()
    };

    let t = ticket("b").await;
    let res = open("b", &t).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    drop(res);
    // Used up.
    assert_eq!(open("b", &t).await.unwrap().status(), 401);
    // For another branch: refused (and gone).
    let t = ticket("b").await;
    assert_eq!(open("c", &t).await.unwrap().status(), 401);
    assert_eq!(open("b", &t).await.unwrap().status(), 401);
    // Only for streams.
    let t = ticket("b").await;
    let res = http
        .get(s.url(&format!("/projects?ticket={t}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // Unknown branch: no ticket.
    let (status, _) = s
        .post_json(
            "/stream-tickets",
            json!({"projectId": "p", "branchId": "zz"}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = s
        .post_json(
            "/stream-tickets",
            json!({"projectId": "p/../x", "branchId": "b"}),
        )
        .await;
    assert_eq!(status, 400);
}
