//! Attachments over the real API: uploads (raw and multipart) stored once by content, read
//! back byte for byte, refused when too large, of a type no model reads, or not what their
//! type says; `/trigger` with inline image and file parts and uploaded ids (the workflow
//! carries their ids, the bytes are project attachments); images refused for a model without
//! image input; and idempotent triggers (`Idempotency-Key`, `clientMessageId`) answering the
//! first workflow, even while the branch is busy and past the rate limit. Another user's
//! project is checked against a real Postgres (database `test`), as tests/auth.rs does.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use weldr_storage::StreamKey;
use weldr_storage::conversation::{self, EntryKind};

/// A 1x1 PNG.
const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn png() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(PNG_B64)
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A server with REPLAY_DIR at `dir`, 64 KiB attachments, and project `p` with branch `b`.
async fn setup(dir: &Path, adjust: impl FnOnce(&mut weldr_agent::Config)) -> TestServer {
    let mut cfg = config(dir);
    cfg.providers.replay_dir = Some(dir.to_path_buf());
    cfg.attachment_max_bytes = 64 * 1024;
    adjust(&mut cfg);
    let s = start(cfg).await;
    let (status, _) = s.post_json("/projects", json!({"projectId": "p"})).await;
    assert_eq!(status, 201);
    let (status, _) = s
        .post_json("/projects/p/branches", json!({"branchId": "b"}))
        .await;
    assert_eq!(status, 201);
    s
}

/// A replay transcript whose workflow replies once, without a plan; its model name.
fn reply_model(dir: &Path) -> String {
    let path = dir.join("reply.json");
    let turns = json!([[{ "type": "text", "text": "Looks good." }]]);
    std::fs::write(&path, serde_json::to_vec(&turns).unwrap()).unwrap();
    format!("replay:{}", path.display())
}

async fn upload_raw(
    http: &reqwest::Client,
    s: &TestServer,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut req = http.post(s.url(path)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// A multipart/form-data body with the given file parts (field, filename, type, bytes).
fn multipart(files: &[(&str, &str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----weldr-test-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n")
            .as_bytes(),
    );
    for (field, filename, content_type, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                 filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn trigger_with(s: &TestServer, body: Value, idempotency_key: Option<&str>) -> (u16, Value) {
    let mut req = s.http.post(s.url("/trigger")).json(&body);
    if let Some(key) = idempotency_key {
        req = req.header("idempotency-key", key);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn message(model: &str, content: Value) -> Value {
    json!({"projectId": "p", "branchId": "b", "model": model, "message": {"content": content}})
}

fn text(model: &str, t: &str) -> Value {
    message(model, json!([{"type": "text", "text": t}]))
}

/// The user messages of branch p/b's conversation.
fn user_messages(s: &TestServer) -> Vec<conversation::ConversationEntry> {
    let rtx = s.app().store.begin_read().unwrap();
    conversation::all(&rtx, &StreamKey::new("p", "b"))
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.kind == EntryKind::User)
        .collect()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_stored_once_by_content_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), |_| {}).await;
    let http = s.http.clone();
    let png = png();
    let png_id = sha256_hex(&png);

    // Raw body: the id is the bytes' sha-256; the same bytes again are the same attachment.
    let (status, body) = upload_raw(
        &http,
        &s,
        "/projects/p/attachments?filename=dot.png",
        Some("image/png"),
        png.clone(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body,
        json!({"attachmentId": png_id, "mediaType": "image/png", "size": png.len(), "filename": "dot.png"})
    );
    let (status, again) = upload_raw(
        &http,
        &s,
        "/projects/p/attachments?filename=other.png",
        Some("image/png"),
        png.clone(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again, body, "the first upload's record answers");

    // Multipart: the file part's name and type.
    let notes = "# Notes\nThe button should be blue. ✓\n".as_bytes();
    let (ct, form) = multipart(&[("file", "notes.md", "text/markdown", notes)]);
    let (status, body) = upload_raw(&http, &s, "/projects/p/attachments", Some(&ct), form).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["attachmentId"], sha256_hex(notes));
    assert_eq!(body["mediaType"], "text/markdown");
    assert_eq!(body["filename"], "notes.md");
    assert_eq!(body["size"], notes.len());

    // Read back: the bytes, their type, nosniff; a download unless an image.
    let res = http
        .get(s.url(&format!("/projects/p/attachments/{png_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("inline")
    );
    assert_eq!(res.bytes().await.unwrap().as_ref(), png.as_slice());
    let res = http
        .get(s.url(&format!("/projects/p/attachments/{}", sha256_hex(notes))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "text/markdown; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let disposition = h["content-disposition"].to_str().unwrap();
    assert!(
        disposition.starts_with("attachment; filename=\"notes.md\""),
        "{disposition}"
    );
    assert_eq!(res.bytes().await.unwrap().as_ref(), notes);

    // Refusals, each with its code.
    let big = vec![b'a'; 64 * 1024 + 1];
    let (ct, big_form) = multipart(&[("file", "big.txt", "text/plain", &big)]);
    let (two_ct, two_form) = multipart(&[
        ("a", "a.txt", "text/plain", b"a"),
        ("b", "b.txt", "text/plain", b"b"),
    ]);
    let (none_ct, none_form) = multipart(&[]);
    let path = "/projects/p/attachments";
    for (content_type, bytes, want, want_code) in [
        (Some("text/plain"), big.clone(), 413, "attachment_too_large"),
        (Some(ct.as_str()), big_form, 413, "attachment_too_large"),
        (
            Some("application/pdf"),
            b"%PDF-1.7".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Some("application/octet-stream"),
            png.clone(),
            415,
            "unsupported_media_type",
        ),
        (None, b"x".to_vec(), 415, "unsupported_media_type"),
        (
            Some("image/png"),
            b"GIF89a not a png".to_vec(),
            400,
            "attachment_type_mismatch",
        ),
        (
            Some("image/jpeg"),
            png.clone(),
            400,
            "attachment_type_mismatch",
        ),
        (
            Some("text/plain"),
            b"\xff\xfe\x00".to_vec(),
            400,
            "attachment_not_utf8",
        ),
        (Some("text/plain"), Vec::new(), 400, "empty_attachment"),
        (Some(two_ct.as_str()), two_form, 400, "invalid_multipart"),
        (Some(none_ct.as_str()), none_form, 400, "invalid_multipart"),
    ] {
        let (status, body) = upload_raw(&http, &s, path, content_type, bytes).await;
        assert_eq!(
            (status, code(&body)),
            (want, want_code),
            "{content_type:?}: {body}"
        );
    }
    let (status, body) = upload_raw(
        &http,
        &s,
        "/projects/p/attachments?filename=a%2Fb.txt",
        Some("text/plain"),
        b"x".to_vec(),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_filename"));
    let (status, body) = upload_raw(
        &http,
        &s,
        "/projects/nope/attachments",
        Some("text/plain"),
        b"x".to_vec(),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "project_not_found"));

    // Reading: unknown ids 404, malformed ones 400, another project's 404.
    for (id, want, want_code) in [
        ("0".repeat(64), 404, "attachment_not_found"),
        ("xyz".to_string(), 400, "invalid_attachment_id"),
        (png_id.to_uppercase(), 400, "invalid_attachment_id"),
        ("a.b".to_string(), 400, "invalid_id"),
    ] {
        let (status, body) = s.get_json(&format!("/projects/p/attachments/{id}")).await;
        assert_eq!((status, code(&body)), (want, want_code), "{id}");
    }
    let (status, _) = s.post_json("/projects", json!({"projectId": "q"})).await;
    assert_eq!(status, 201);
    let (status, body) = s
        .get_json(&format!("/projects/q/attachments/{png_id}"))
        .await;
    assert_eq!((status, code(&body)), (404, "attachment_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_stores_its_inline_parts_and_the_workflow_carries_their_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), |_| {}).await;
    let model = reply_model(tmp.path());
    let spec = b"openapi: 3.1.0\n".to_vec();
    let (status, uploaded) = upload_raw(
        &s.http,
        &s,
        "/projects/p/attachments?filename=api.yaml",
        Some("application/yaml"),
        spec.clone(),
    )
    .await;
    assert_eq!(status, 201);
    let png = png();
    let log = "error: the button is red\n";
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let body = json!({
        "projectId": "p",
        "branchId": "b",
        "model": model,
        "message": {
            "content": [
                {"type": "text", "text": "Make the button blue, like this:"},
                {"type": "image", "image": format!("data:image/png;base64,{PNG_B64}")},
                {"type": "file", "data": b64.encode(log), "mediaType": "text/plain", "filename": "build.log"},
                // The same image again is the same attachment.
                {"type": "image", "image": PNG_B64, "mediaType": "image/png"},
            ],
            "attachmentIds": [uploaded["attachmentId"]],
        },
    });
    let (status, answer) = trigger_with(&s, body, None).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["streamUrl"], "/stream/p/b");
    let wf = answer["workflowId"].as_str().unwrap().to_string();
    let frames = sse.until_end(&wf, Duration::from_secs(30)).await;
    assert!(frames.iter().any(|f| f.event == "end"));
    assert_eq!(s.workflow(&wf).await["status"], "complete");

    // The inline parts are project attachments now, byte for byte.
    for (bytes, media) in [
        (png.as_slice(), "image/png"),
        (log.as_bytes(), "text/plain"),
    ] {
        let res = s
            .http
            .get(s.url(&format!("/projects/p/attachments/{}", sha256_hex(bytes))))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(media)
        );
        assert_eq!(res.bytes().await.unwrap().as_ref(), bytes);
    }
    // The conversation holds the message with their ids, in order, once each.
    let users = user_messages(&s);
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].workflow_id.as_deref(), Some(wf.as_str()));
    assert_eq!(users[0].text, "Make the button blue, like this:");
    let refs: Vec<(String, String, Option<String>, u64)> = users[0]
        .attachments
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                a.media_type.clone(),
                a.filename.clone(),
                a.size,
            )
        })
        .collect();
    assert_eq!(
        refs,
        [
            (sha256_hex(&png), "image/png".into(), None, png.len() as u64),
            (
                sha256_hex(log.as_bytes()),
                "text/plain".into(),
                Some("build.log".into()),
                log.len() as u64
            ),
            (
                sha256_hex(&spec),
                "application/yaml".into(),
                Some("api.yaml".into()),
                spec.len() as u64
            ),
        ]
    );

    // An attachment and no text is a message too.
    let only_image = json!({
        "projectId": "p", "branchId": "b", "model": model,
        "message": {"content": [], "attachmentIds": [sha256_hex(&png)]},
    });
    let (status, answer) = trigger_with(&s, only_image, None).await;
    assert_eq!(status, 202, "{answer}");
    let wf = answer["workflowId"].as_str().unwrap().to_string();
    sse.until_end(&wf, Duration::from_secs(30)).await;
    let users = user_messages(&s);
    assert_eq!(users.len(), 2);
    assert_eq!(users[1].text, "");
    assert_eq!(users[1].attachments.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_with_bad_attachments_are_refused_and_start_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), |_| {}).await;
    let model = reply_model(tmp.path());
    let b64 = base64::engine::general_purpose::STANDARD;
    // Three uploads of 60 KiB: each fits, together they are more than twice 64 KiB.
    let mut big_ids = Vec::new();
    for fill in [b'a', b'b', b'c'] {
        let (status, body) = upload_raw(
            &s.http,
            &s,
            "/projects/p/attachments",
            Some("text/plain"),
            vec![fill; 60 * 1024],
        )
        .await;
        assert_eq!(status, 201);
        big_ids.push(body["attachmentId"].clone());
    }
    let image = json!({"type": "image", "image": format!("data:image/png;base64,{PNG_B64}")});
    let hi = json!({"type": "text", "text": "hi"});
    let with_ids = |ids: Value| {
        json!({"projectId": "p", "branchId": "b", "model": model,
               "message": {"content": [hi.clone()], "attachmentIds": ids}})
    };
    let many: Vec<Value> = (0..21).map(|_| image.clone()).collect();
    let cases = [
        (
            with_ids(json!(["0".repeat(64)])),
            400,
            "attachment_not_found",
        ),
        (with_ids(json!(["not-hex"])), 400, "invalid_attachment_id"),
        (with_ids(json!(["../x"])), 400, "invalid_id"),
        (with_ids(json!(big_ids)), 413, "attachments_too_large"),
        (
            message("ollama:qwen2.5-coder", json!([hi, image])),
            400,
            "images_unsupported",
        ),
        (message(&model, json!(many)), 400, "too_many_attachments"),
        (
            message(&model, json!([{"type": "image", "image": PNG_B64}])),
            400,
            "invalid_message",
        ),
        (
            message(
                &model,
                json!([{"type": "image", "image": b64.encode("hello"), "mediaType": "text/plain"}]),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            message(
                &model,
                json!([{"type": "image", "image": b64.encode("hello"), "mediaType": "image/gif"}]),
            ),
            400,
            "attachment_type_mismatch",
        ),
        (
            message(
                &model,
                json!([{"type": "file", "data": b64.encode(vec![b'x'; 64 * 1024 + 1]), "mediaType": "text/plain"}]),
            ),
            413,
            "attachment_too_large",
        ),
        (
            message(
                &model,
                json!([{"type": "file", "data": "aGk=", "mediaType": "application/zip"}]),
            ),
            415,
            "unsupported_media_type",
        ),
        (
            message(
                &model,
                json!([{"type": "text", "text": "x", "image": PNG_B64}]),
            ),
            400,
            "invalid_message",
        ),
        (
            message(&model, json!([{"type": "video"}])),
            400,
            "invalid_message",
        ),
        (
            message(&model, json!([{"type": "text", "text": " "}])),
            400,
            "empty_message",
        ),
        (message(&model, json!([])), 400, "empty_message"),
        (
            json!({"projectId": "p", "branchId": "b", "model": model, "clientMessageId": "a b",
                   "message": {"content": [hi]}}),
            400,
            "invalid_client_message_id",
        ),
        (
            json!({"projectId": "p", "branchId": "b", "model": model,
                   "clientMessageId": "x".repeat(129), "message": {"content": [hi]}}),
            400,
            "invalid_client_message_id",
        ),
    ];
    for (body, want, want_code) in cases {
        let (status, answer) = trigger_with(&s, body.clone(), None).await;
        assert_eq!((status, code(&answer)), (want, want_code), "{body}");
    }
    let (status, answer) =
        trigger_with(&s, message("ollama:qwen2.5-coder", json!([image])), None).await;
    assert_eq!(status, 400);
    let said = answer["error"]["message"].as_str().unwrap();
    assert!(said.contains("ollama:qwen2.5-coder"), "{said}");
    for key in ["x".repeat(129), "tab\there".into(), "é".into()] {
        let res = s
            .http
            .post(s.url("/trigger"))
            .header("idempotency-key", key.as_bytes())
            .json(&text(&model, "hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{key:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(code(&body), "invalid_idempotency_key");
    }
    assert!(
        user_messages(&s).is_empty(),
        "a refused trigger started a workflow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_answers_the_first_workflow() {
    let tmp = tempfile::tempdir().unwrap();
    // Two triggers a minute: replays must not count.
    let s = setup(tmp.path(), |c| c.trigger_rate_per_minute = 2).await;
    let model = reply_model(tmp.path());
    let mut sse = s.sse("/stream/p/b", Some("0")).await;

    let (status, first) = trigger_with(&s, text(&model, "build it"), Some("key-1")).await;
    assert_eq!(status, 202, "{first}");
    let wf = first["workflowId"].as_str().unwrap().to_string();
    sse.until_end(&wf, Duration::from_secs(30)).await;
    for _ in 0..3 {
        let (status, again) = trigger_with(&s, text(&model, "build it"), Some("key-1")).await;
        assert_eq!((status, &again), (202, &first));
    }
    let (status, reused) =
        trigger_with(&s, text(&model, "build something else"), Some("key-1")).await;
    assert_eq!(
        (status, code(&reused)),
        (422, "idempotency_key_reused"),
        "{reused}"
    );

    // clientMessageId does the same.
    let by_id = |t: &str| {
        json!({"projectId": "p", "branchId": "b", "model": model, "clientMessageId": "msg_1",
               "message": {"content": [{"type": "text", "text": t}]}})
    };
    let (status, second) = trigger_with(&s, by_id("and test it"), None).await;
    assert_eq!(status, 202, "{second}");
    let wf2 = second["workflowId"].as_str().unwrap().to_string();
    assert_ne!(wf2, wf);
    sse.until_end(&wf2, Duration::from_secs(30)).await;
    let (status, again) = trigger_with(&s, by_id("and test it"), None).await;
    assert_eq!((status, &again), (202, &second));
    let (status, reused) = trigger_with(&s, by_id("and ship it"), None).await;
    assert_eq!((status, code(&reused)), (422, "idempotency_key_reused"));
    // The header wins over clientMessageId.
    let (status, again) = trigger_with(&s, by_id("build it"), Some("key-1")).await;
    assert_eq!((status, &again), (202, &first));

    // Two workflows, two user messages; and the rate limit was spent by the two alone.
    let users = user_messages(&s);
    let started: Vec<_> = users
        .iter()
        .map(|u| u.workflow_id.clone().unwrap())
        .collect();
    assert_eq!(started, [wf, wf2]);
    let (status, limited) = trigger_with(&s, text(&model, "one more"), None).await;
    assert_eq!((status, code(&limited)), (429, "rate_limited"), "{limited}");
    // A replay still answers past the limit.
    let (status, again) = trigger_with(&s, text(&model, "build it"), Some("key-1")).await;
    assert_eq!((status, &again), (202, &first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_trigger_answers_202_while_the_branch_is_busy() {
    let tmp = tempfile::tempdir().unwrap();
    // The model answers nothing: the first workflow holds the branch.
    let stalling = fake_llm::FakeLlm::start(vec![fake_llm::Reply::Stall]).await;
    let keys = stalling.keys();
    let s = setup(tmp.path(), |c| {
        c.providers.anthropic_api_key = keys.anthropic_api_key;
        c.providers.anthropic_base_url = keys.anthropic_base_url;
    })
    .await;
    let model = "anthropic:claude-sonnet-4-5";
    let body = message(
        model,
        json!([
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image", "image": format!("data:image/png;base64,{PNG_B64}")},
        ]),
    );
    let (status, first) = trigger_with(&s, body.clone(), Some("retry-me")).await;
    assert_eq!(status, 202, "{first}");
    for _ in 0..2 {
        let (status, again) = trigger_with(&s, body.clone(), Some("retry-me")).await;
        assert_eq!((status, &again), (202, &first));
    }
    let (status, busy) = trigger_with(&s, body.clone(), None).await;
    assert_eq!((status, code(&busy)), (409, "branch_busy"));
    assert_eq!(busy["error"]["details"]["workflowId"], first["workflowId"]);
    assert_eq!(user_messages(&s).len(), 1);
}

/// A fresh Postgres schema with Better Auth's tables and users u1 (token `ada-token`) and u2
/// (`bob-token`); its name.
async fn auth_schema() -> String {
    let url = std::env::var("WELDR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("Postgres must be reachable on 127.0.0.1:5432 (database test) for this test");
    tokio::spawn(conn);
    let name = format!("attachments_{}", std::process::id());
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};
             CREATE TABLE {name}.users (id text PRIMARY KEY, name text, email text);
             CREATE TABLE {name}.sessions (id text PRIMARY KEY, token text UNIQUE NOT NULL,
                 expires_at timestamptz NOT NULL, user_id text NOT NULL REFERENCES {name}.users(id));
             CREATE TABLE {name}.projects (id text PRIMARY KEY, user_id text NOT NULL);
             INSERT INTO {name}.users VALUES ('u1', 'Ada', 'ada@example.com'), ('u2', 'Bob', 'bob@example.com');
             INSERT INTO {name}.sessions VALUES
               ('s1', 'ada-token', now() + interval '1 day', 'u1'),
               ('s2', 'bob-token', now() + interval '1 day', 'u2');"
        ))
        .await
        .unwrap();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_attachments_are_not_found() {
    let schema = auth_schema().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.database_url = Some(weldr_agent::config::Secret(
        std::env::var("WELDR_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    ));
    cfg.better_auth_secret = Some(weldr_agent::config::Secret("secret-for-tests".into()));
    cfg.auth_tables.sessions = format!("{schema}.sessions");
    cfg.auth_tables.users = format!("{schema}.users");
    cfg.auth_tables.projects = format!("{schema}.projects");
    let s = start(cfg).await;
    for (p, owner) in [("p1", "u1"), ("p2", "u2")] {
        weldr_agent::registry::create_project(&s.app().store, p, None, Some(owner.into()))
            .await
            .unwrap();
        weldr_agent::registry::register_branch(&s.app().store, p, "b", None)
            .await
            .unwrap();
    }
    let ada = client_with_token("ada-token");
    let bob = client_with_token("bob-token");
    let (status, body) = upload_raw(
        &ada,
        &s,
        "/projects/p1/attachments",
        Some("text/plain"),
        b"ada's notes".to_vec(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["attachmentId"].as_str().unwrap().to_string();

    let res = bob
        .get(s.url(&format!("/projects/p1/attachments/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "project_not_found");
    let (status, body) = upload_raw(
        &bob,
        &s,
        "/projects/p1/attachments",
        Some("text/plain"),
        b"bob's".to_vec(),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "project_not_found"));
    // Bob cannot attach Ada's file to a message in his own project either.
    let res = bob
        .post(s.url("/trigger"))
        .json(&json!({"projectId": "p2", "branchId": "b", "model": "ollama:qwen2.5-coder",
                      "message": {"content": [{"type": "text", "text": "hi"}], "attachmentIds": [id]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(code(&body), "attachment_not_found");
    // Ada reads her own.
    let res = ada
        .get(s.url(&format!("/projects/p1/attachments/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().as_ref(), b"ada's notes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_the_parts_and_the_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), |_| {}).await;
    let (_, doc) = s.get_json("/openapi.json").await;
    let part = &doc["components"]["schemas"]["ContentPart"]["oneOf"];
    let kinds: Vec<&Value> = part
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["properties"]["type"]["enum"][0])
        .collect();
    assert_eq!(kinds, ["text", "image", "file"]);
    let upload = &doc["paths"]["/projects/{projectId}/attachments"]["post"];
    let body = upload["requestBody"]["content"].as_object().unwrap();
    for media in [
        "multipart/form-data",
        "image/png",
        "text/*",
        "application/json",
    ] {
        assert!(body.contains_key(media), "{media}: {body:?}");
    }
    for status in ["200", "201", "413", "415"] {
        assert!(upload["responses"].get(status).is_some(), "{status}");
    }
    let trigger = &doc["paths"]["/trigger"]["post"];
    assert!(trigger["responses"].get("422").is_some());
    assert!(
        trigger["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
    );
}
