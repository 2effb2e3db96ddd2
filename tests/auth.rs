//! Authentication against a real Postgres (database `test`): Better Auth cookies signed as
//! Better Auth signs them, bearer tokens, expiry, access to other users' projects, and the
//! redb session cache surviving a Postgres outage. Each test uses its own schema.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;

const SECRET: &str = "better-auth-secret-123";
const TOKEN: &str = "YpZ3kTq8Lm2Nv5Rx7Wb9Cd1Ef4Gh6Jk0";
/// base64(HMAC-SHA256(SECRET, TOKEN)), computed with Python's hmac module, not with our code.
const SIGNATURE: &str = include_str!("vectors/better_auth_signature.txt");

fn database_url() -> String {
    std::env::var("WELDR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema with Better Auth's tables; returns its name.
async fn schema(tag: &str) -> (String, tokio_postgres::Client) {
    let (client, conn) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("Postgres must be reachable on 127.0.0.1:5432 (database test) for these tests");
    tokio::spawn(conn);
    let name = format!("auth_{tag}_{}", std::process::id());
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};
             CREATE TABLE {name}.users (id text PRIMARY KEY, name text, email text);
             CREATE TABLE {name}.sessions (id text PRIMARY KEY, token text UNIQUE NOT NULL,
                 expires_at timestamptz NOT NULL, user_id text NOT NULL REFERENCES {name}.users(id));
             CREATE TABLE {name}.projects (id text PRIMARY KEY, user_id text NOT NULL);
             INSERT INTO {name}.users VALUES ('u1', 'Ada', 'ada@example.com'), ('u2', 'Bob', 'bob@example.com');
             INSERT INTO {name}.sessions VALUES
               ('s1', '{TOKEN}', now() + interval '1 day', 'u1'),
               ('s2', 'expired-token', now() - interval '1 minute', 'u1'),
               ('s3', 'bob-token', now() + interval '1 day', 'u2');"
        ))
        .await
        .unwrap();
    (name, client)
}

fn signed_cookie(token: &str, signature: &str) -> String {
    let value = format!("{token}.{signature}");
    let encoded = percent_encoding::utf8_percent_encode(&value, percent_encoding::NON_ALPHANUMERIC);
    format!("weldr.session_token={encoded}")
}

async fn server_with_postgres(
    schema: &str,
    database_url: String,
) -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.database_url = Some(weldr_agent::config::Secret(database_url));
    cfg.better_auth_secret = Some(weldr_agent::config::Secret(SECRET.into()));
    cfg.auth_tables.sessions = format!("{schema}.sessions");
    cfg.auth_tables.users = format!("{schema}.users");
    cfg.auth_tables.projects = format!("{schema}.projects");
    let s = start(cfg).await;
    // u1 owns p1, u2 owns p2.
    weldr_agent::registry::create_project(&s.app().store, "p1", None, Some("u1".into()))
        .await
        .unwrap();
    weldr_agent::registry::create_project(&s.app().store, "p2", None, Some("u2".into()))
        .await
        .unwrap();
    weldr_agent::registry::register_branch(&s.app().store, "p1", "b", None)
        .await
        .unwrap();
    weldr_agent::registry::register_branch(&s.app().store, "p2", "b", None)
        .await
        .unwrap();
    (tmp, s)
}

async fn status_with(s: &TestServer, path: &str, header: (&str, String)) -> u16 {
    let res = reqwest::Client::new()
        .get(s.url(path))
        .header(header.0, header.1)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    if status != 200 {
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "JSON error body");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn better_auth_cookies_and_bearers() {
    let (schema, _db) = schema("cookies").await;
    let (_tmp, s) = server_with_postgres(&schema, database_url()).await;
    let sig = SIGNATURE.trim();

    assert_eq!(
        status_with(
            &s,
            "/stream/p1/b?lastEventId=0",
            ("cookie", signed_cookie(TOKEN, sig))
        )
        .await,
        200
    );
    let secure = signed_cookie(TOKEN, sig).replace("weldr.", "__Secure-weldr.");
    assert_eq!(
        status_with(&s, "/stream/p1/b?lastEventId=0", ("cookie", secure)).await,
        200
    );
    assert_eq!(
        status_with(
            &s,
            "/stream/p1/b?lastEventId=0",
            ("authorization", format!("Bearer {TOKEN}.{sig}"))
        )
        .await,
        200
    );
    assert_eq!(
        status_with(
            &s,
            "/stream/p1/b?lastEventId=0",
            ("authorization", format!("Bearer {TOKEN}"))
        )
        .await,
        200
    );

    // Signed with another secret, tampered, unsigned, expired, unknown: 401.
    let other = base64_hmac(b"another-secret", TOKEN);
    let mut tampered = sig.to_string();
    tampered.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
    let expired_sig = base64_hmac(SECRET.as_bytes(), "expired-token");
    let unknown_sig = base64_hmac(SECRET.as_bytes(), "no-such-token");
    for cookie in [
        signed_cookie(TOKEN, &other),
        signed_cookie(TOKEN, &tampered),
        format!("weldr.session_token={TOKEN}"),
        signed_cookie("expired-token", &expired_sig),
        signed_cookie("no-such-token", &unknown_sig),
        "weldr.session_token=".to_string(),
        "weldr.session_token=%ZZ%".to_string(),
    ] {
        assert_eq!(
            status_with(&s, "/stream/p1/b", ("cookie", cookie.clone())).await,
            401,
            "{cookie}"
        );
    }
    for bearer in [
        "Bearer expired-token",
        "Bearer nope",
        "Bearer wa_revoked",
        "Basic dXNlcjpwYXNz",
        "Bearer",
    ] {
        assert_eq!(
            status_with(&s, "/stream/p1/b", ("authorization", bearer.to_string())).await,
            401,
            "{bearer}"
        );
    }
    let res = reqwest::Client::new()
        .get(s.url("/stream/p1/b"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Another user's project looks exactly like a missing one.
    let res = reqwest::Client::new()
        .get(s.url("/stream/p2/b"))
        .header("cookie", signed_cookie(TOKEN, sig))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "project_not_found");
    assert_eq!(
        status_with(
            &s,
            "/stream/p2/b?lastEventId=0",
            ("authorization", "Bearer bob-token".into())
        )
        .await,
        200
    );
    // The operator token reaches both.
    assert_eq!(
        status_with(
            &s,
            "/stream/p2/b?lastEventId=0",
            ("authorization", format!("Bearer {}", s.token))
        )
        .await,
        200
    );
    // Open routes stay open.
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    assert_eq!(
        reqwest::get(s.url("/openapi.json")).await.unwrap().status(),
        200
    );
    s.server.shutdown().await;
}

fn base64_hmac(secret: &[u8], token: &str) -> String {
    weldr_agent::auth::cookie::sign(secret, token)
}

/// Forwards 127.0.0.1:<port> to Postgres until dropped, so a test can cut Postgres off.
struct Proxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    let _ = inbound.shutdown().await;
                });
            }
        });
        Proxy { port, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_session_survives_a_postgres_outage() {
    let (schema, _db) = schema("outage").await;
    let proxy = Proxy::start().await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let (_tmp, s) = server_with_postgres(&schema, url).await;
    let cookie = signed_cookie(TOKEN, SIGNATURE.trim());
    assert_eq!(
        status_with(&s, "/stream/p1/b?lastEventId=0", ("cookie", cookie.clone())).await,
        200
    );

    // Postgres goes away (the proxy and every connection through it).
    proxy.task.abort();
    let _ = proxy.task.await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(
        status_with(&s, "/stream/p1/b?lastEventId=0", ("cookie", cookie)).await,
        200,
        "cached session still works"
    );
    // A session never seen before cannot be verified now: 503, not a wrong 401 or 200.
    assert_eq!(
        status_with(
            &s,
            "/stream/p2/b",
            ("authorization", "Bearer bob-token".into())
        )
        .await,
        503
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_mode_reads_the_project_owner_upstream() {
    let (schema, db) = schema("cloud").await;
    db.batch_execute(&format!(
        "INSERT INTO {schema}.projects VALUES ('proj1', 'u1')"
    ))
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.mode = weldr_agent::config::Mode::Cloud;
    cfg.project_id = Some("proj1".into());
    cfg.database_url = Some(weldr_agent::config::Secret(database_url()));
    cfg.better_auth_secret = Some(weldr_agent::config::Secret(SECRET.into()));
    cfg.auth_tables.sessions = format!("{schema}.sessions");
    cfg.auth_tables.users = format!("{schema}.users");
    cfg.auth_tables.projects = format!("{schema}.projects");
    let s = start(cfg).await;
    weldr_agent::registry::register_branch(&s.app().store, "proj1", "main", None)
        .await
        .unwrap();
    let cookie = signed_cookie(TOKEN, SIGNATURE.trim());
    assert_eq!(
        status_with(&s, "/stream/proj1/main?lastEventId=0", ("cookie", cookie)).await,
        200
    );
    assert_eq!(
        status_with(
            &s,
            "/stream/proj1/main",
            ("authorization", "Bearer bob-token".into())
        )
        .await,
        404
    );
    s.server.shutdown().await;
}

/// Better Auth as people deploy it: its stock tables (`session`/`user`, camelCase columns)
/// are found by themselves (information_schema), with the settings left at their defaults
/// apart from the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn better_auth_stock_tables_are_found() {
    let (client, conn) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("Postgres must be reachable on 127.0.0.1:5432 (database test) for these tests");
    tokio::spawn(conn);
    let name = format!("auth_stock_{}", std::process::id());
    client
        .batch_execute(&format!(
            r#"DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};
             CREATE TABLE {name}."user" (id text PRIMARY KEY, name text NOT NULL, email text NOT NULL,
                 "emailVerified" boolean NOT NULL DEFAULT false, "createdAt" timestamp NOT NULL DEFAULT now(),
                 "updatedAt" timestamp NOT NULL DEFAULT now());
             CREATE TABLE {name}."session" (id text PRIMARY KEY, "expiresAt" timestamp NOT NULL,
                 token text NOT NULL UNIQUE, "createdAt" timestamp NOT NULL DEFAULT now(),
                 "updatedAt" timestamp NOT NULL DEFAULT now(), "ipAddress" text, "userAgent" text,
                 "userId" text NOT NULL REFERENCES {name}."user"(id));
             CREATE TABLE {name}.projects (id text PRIMARY KEY, user_id text NOT NULL);
             INSERT INTO {name}."user" (id, name, email) VALUES ('u1', 'Ada', 'ada@example.com');
             INSERT INTO {name}."session" (id, "expiresAt", token, "userId") VALUES
               ('s1', now() + interval '1 day', '{TOKEN}', 'u1'),
               ('s2', now() - interval '1 minute', 'expired-token', 'u1');"#
        ))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.database_url = Some(weldr_agent::config::Secret(database_url()));
    cfg.better_auth_secret = Some(weldr_agent::config::Secret(SECRET.into()));
    // The configured names are the original's (`sessions`, `users`) in that schema: absent
    // there, so the stock ones are used.
    cfg.auth_tables.sessions = format!("{name}.sessions");
    cfg.auth_tables.users = format!("{name}.users");
    cfg.auth_tables.projects = format!("{name}.projects");
    let s = start(cfg).await;
    weldr_agent::registry::create_project(&s.app().store, "p1", None, Some("u1".into()))
        .await
        .unwrap();
    weldr_agent::registry::register_branch(&s.app().store, "p1", "b", None)
        .await
        .unwrap();
    let sig = SIGNATURE.trim();
    assert_eq!(
        status_with(
            &s,
            "/stream/p1/b?lastEventId=0",
            ("cookie", signed_cookie(TOKEN, sig))
        )
        .await,
        200
    );
    assert_eq!(
        status_with(
            &s,
            "/stream/p1/b?lastEventId=0",
            ("authorization", "Bearer expired-token".to_string())
        )
        .await,
        401
    );
    client
        .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
        .await
        .unwrap();
}
