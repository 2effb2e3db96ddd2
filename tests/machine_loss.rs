//! Losing the whole machine. Machine A (cloud mode, the real binary, a real S3: moto) creates
//! branches, a version by a workflow, an unfinished workflow and 10,000 events; it is
//! SIGKILLed and its whole workspace volume deleted. Machine B starts on an empty volume
//! against the same bucket: the store comes back from its continuous backup (every branch
//! listed, restored on use with its git history, every event acknowledged before the backup
//! caught up served from 0 and from a middle cursor, ids continuing, A's token working, the
//! unfinished workflow completing). A tampered backup is refused with the newest point that
//! verifies, and `restore-store --at` that point restores it.

#[path = "common/binary.rs"]
mod binary;
mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;
#[path = "common/s3.rs"]
mod s3_server;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use binary::{free_port, run_ok, serve_with, sigkill};
use common::{Frame, SseClient, client_with_token};
use fake_llm::{FakeLlm, Reply, Turn, call, plan_args};
use serde_json::{Value, json};

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}{}", hex::encode(b))
}

struct Machine {
    env: Vec<(String, String)>,
}

impl Machine {
    fn envs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn cli(&self, ws: &Path) -> Command {
        let mut c = binary::cli(ws);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn serve(&self, ws: &Path, port: u16) -> Child {
        serve_with(ws, port, &self.envs())
    }
}

async fn health(http: &reqwest::Client, port: u16) -> Value {
    http.get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Wait until the backup has shipped everything committed so far.
async fn backup_caught_up(http: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(http, port).await;
        let b = &h["storeBackup"];
        if b["generation"].is_string() && b["pendingMs"] == 0 {
            // A commit in flight is noted only as it commits: look twice.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if health(http, port).await["storeBackup"]["pendingMs"] == 0 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the backup never caught up: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn whole_stream(http: &reqwest::Client, url: &str, from: &str, until: u64) -> Vec<Frame> {
    let mut sse = SseClient::connect_with(http, url, Some(from)).await;
    sse.read_until(until).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_machine_gets_the_store_back_from_its_backup() {
    let s3 = s3_server::s3();
    let project = unique("p");
    // The unfinished workflow's model: the second request (from A) stalls; B's asks again.
    let fake = FakeLlm::start(vec![
        // Workflow 1 on `done`: completes on A and makes a version.
        Reply::Turn(Turn::default().call("c1", "submit_plan", &[&plan_args()])),
        call(
            "c2",
            "write_file",
            json!({"filePath": "hello.txt", "content": "hello\n"}),
        ),
        call("c3", "done", json!({"summary": "wrote hello.txt"})),
        // Workflow 2 on `wip`: stalls in planning on A.
        Reply::Stall,
        Reply::Turn(Turn::default().call("c4", "submit_plan", &[&plan_args()])),
        call(
            "c5",
            "write_file",
            json!({"filePath": "hello.txt", "content": "hello again\n"}),
        ),
        call("c6", "done", json!({"summary": "wrote it again"})),
    ])
    .await;
    let machine = Machine {
        env: [
            ("WELDR_MODE", "cloud".to_string()),
            ("PROJECT_ID", project.clone()),
            ("S3_ENDPOINT", s3.endpoint.clone()),
            ("S3_REGION", "auto".into()),
            ("S3_ACCESS_KEY_ID", "test-key".into()),
            ("S3_SECRET_ACCESS_KEY", "test-secret".into()),
            ("STORE_BACKUP_BUCKET", unique("store-")),
            ("STORE_BACKUP_INTERVAL_MS", "200".into()),
            ("SYNC_QUIET_SECONDS", "1".into()),
            ("OLLAMA_BASE_URL", format!("{}/v1", fake.base())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };

    // Machine A.
    let a_tmp = tempfile::tempdir().unwrap();
    let a_ws = a_tmp.path().join("workspace");
    std::fs::create_dir_all(&a_ws).unwrap();
    let a_port = free_port();
    let mut a = machine.serve(&a_ws, a_port);
    let token = run_ok(machine.cli(&a_ws).args(["token", "create", "--name", "a"]))
        .trim()
        .to_string();
    let http = client_with_token(&token);
    let a_url = |path: &str| format!("http://127.0.0.1:{a_port}{path}");
    for b in ["done", "wip", "log"] {
        let res = http
            .post(a_url(&format!("/projects/{project}/branches")))
            .json(&json!({"branchId": b}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{b}: {}", res.text().await.unwrap());
    }
    let trigger = |branch: &'static str| {
        let http = http.clone();
        let url = a_url("/trigger");
        let project = project.clone();
        async move {
            let res = http
                .post(url)
                .json(&json!({"projectId": project, "branchId": branch,
                              "message": {"content": [{"type": "text", "text": "say hello"}]},
                              "model": "ollama:test-model"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202);
            res.json::<Value>().await.unwrap()["workflowId"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let done_wf = trigger("done").await;
    let mut sse =
        SseClient::connect_with(&http, &a_url(&format!("/stream/{project}/done")), Some("0")).await;
    let frames = sse.until_end(&done_wf, Duration::from_secs(60)).await;
    let end = frames.iter().find(|f| f.event == "end").unwrap();
    assert_eq!(end.data["status"], "complete", "{frames:#?}");
    // Every branch's snapshot is in object storage before the loss (the syncer's job).
    for b in ["done", "wip", "log"] {
        let out = run_ok(machine.cli(&a_ws).args(["sync", "push", &project, b]));
        assert!(out.contains("SYNC_STATUS=success"), "{b}: {out}");
    }
    let wip_wf = trigger("wip").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests().len() < 4 {
        assert!(Instant::now() < deadline, "the stalled request never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 10,000 events, each acknowledged (durable) before the next.
    let out = run_ok(machine.cli(&a_ws).args([
        "events",
        "append",
        &project,
        "log",
        "--type",
        "note",
        "--data",
        "{\"n\":1}",
        "--count",
        "10000",
    ]));
    let acked: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("ID=")?.parse().ok())
        .collect();
    assert_eq!(acked.len(), 10_000);
    let last_acked = *acked.last().unwrap();
    backup_caught_up(&http, a_port).await;
    // The loss window: acknowledged, maybe not shipped.
    run_ok(
        machine
            .cli(&a_ws)
            .args(["events", "append", &project, "log", "--count", "5"]),
    );
    sigkill(&mut a);
    std::fs::remove_dir_all(&a_ws).unwrap();

    // Machine B: an empty volume, the same bucket. A token made before the first start is kept.
    let b_tmp = tempfile::tempdir().unwrap();
    let b_ws = b_tmp.path().join("workspace");
    std::fs::create_dir_all(&b_ws).unwrap();
    let b_token = run_ok(machine.cli(&b_ws).args(["token", "create", "--name", "b"]))
        .trim()
        .to_string();
    let b_port = free_port();
    let mut b = machine.serve(&b_ws, b_port);
    let b_url = |path: &str| format!("http://127.0.0.1:{b_port}{path}");
    // A's token works on B, and so does the one made on B.
    for t in [&token, &b_token] {
        let res = client_with_token(t)
            .get(b_url(&format!("/projects/{project}/branches")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let listed: Value = http
        .get(b_url(&format!("/projects/{project}/branches")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = listed.to_string();
    for b in ["done", "wip", "log"] {
        assert!(
            text.contains(&format!("\"{b}\"")),
            "{b} missing: {listed:#}"
        );
    }

    // Every acknowledged event the backup had, from 0 and from the middle; ids continue.
    let log = b_url(&format!("/stream/{project}/log"));
    let from0 = whole_stream(&http, &log, "0", last_acked).await;
    let ids = common::ids(&from0);
    assert_eq!(
        ids,
        (1..=last_acked).collect::<Vec<_>>(),
        "holes or repeats"
    );
    let middle = whole_stream(&http, &log, "5000", last_acked).await;
    assert_eq!(common::ids(&middle)[0], 5001);
    // Of the loss window's five, the backup holds some or none; new ids follow its highest.
    let after = run_ok(machine.cli(&b_ws).args([
        "events",
        "list",
        &project,
        "log",
        "--after",
        &last_acked.to_string(),
    ]));
    let shipped_after = after.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    assert!(shipped_after <= 5, "{after}");
    let out = run_ok(
        machine
            .cli(&b_ws)
            .args(["events", "append", &project, "log"]),
    );
    let next: u64 = out.trim().strip_prefix("ID=").unwrap().parse().unwrap();
    assert_eq!(
        next,
        last_acked + shipped_after + 1,
        "ids continue after the backup's highest"
    );

    // The branch with the version comes back with its git history and versions.
    let versions: Value = http
        .get(b_url(&format!(
            "/projects/{project}/branches/done/versions"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        versions.as_array().is_some_and(|v| v.len() >= 2),
        "{versions:#}"
    );
    let done_dir = b_ws.join("done");
    assert_eq!(
        std::fs::read_to_string(done_dir.join("hello.txt")).unwrap(),
        "hello\n"
    );
    let log_out = Command::new("git")
        .args(["log", "--format=%s"])
        .current_dir(&done_dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&log_out.stdout).lines().count() >= 2);
    // The finished workflow is known; the unfinished one completes on B.
    let wf: Value = http
        .get(b_url(&format!("/workflows/{done_wf}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(wf["status"], "complete");
    // Recovery brings `wip` back from object storage before the run goes on; it completes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let wf = loop {
        let wf: Value = http
            .get(b_url(&format!("/workflows/{wip_wf}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["complete", "failed", "cancelled"].contains(&wf["status"].as_str().unwrap_or("")) {
            break wf;
        }
        assert!(
            Instant::now() < deadline,
            "the recovered workflow never ended: {wf:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(wf["status"], "complete", "{wf:#}");
    assert_eq!(
        std::fs::read_to_string(b_ws.join("wip").join("hello.txt")).unwrap(),
        "hello again\n"
    );
    sigkill(&mut b);
}

/// Local mode over the fs object store: a tampered increment refuses the restore (at start
/// and with `restore-store`) and names the newest point that verifies; `--at` restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_backup_is_refused_with_the_newest_point_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let objects = tmp.path().join("objects");
    let env = [
        ("WELDR_OBJECT_STORE_DIR", objects.to_str().unwrap()),
        ("STORE_BACKUP_INTERVAL_MS", "100"),
    ];
    let machine = Machine {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let ws = tmp.path().join("a");
    std::fs::create_dir_all(&ws).unwrap();
    let port = free_port();
    let mut a = machine.serve(&ws, port);
    let token = run_ok(machine.cli(&ws).args(["token", "create", "--name", "a"]))
        .trim()
        .to_string();
    let http = client_with_token(&token);
    run_ok(machine.cli(&ws).args(["project", "create", "p"]));
    run_ok(machine.cli(&ws).args(["branch", "create", "p", "b"]));
    // Three batches, each shipped as its own increment.
    for _ in 0..3 {
        run_ok(
            machine
                .cli(&ws)
                .args(["events", "append", "p", "b", "--count", "10"]),
        );
        backup_caught_up(&http, port).await;
    }
    sigkill(&mut a);
    let generation_dir = std::fs::read_dir(objects.join("weldr-store/generations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut increments: Vec<_> = std::fs::read_dir(&generation_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("inc-"))
        .collect();
    increments.sort();
    assert!(increments.len() >= 3, "{increments:?}");
    // Flip one byte in the last increment.
    let last = increments.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x40;
    std::fs::write(last, bytes).unwrap();
    std::fs::remove_dir_all(ws.join(".weldr-agent")).unwrap();

    // At start: refused, saying what was found.
    let out = machine
        .cli(&ws)
        .arg("serve")
        .env("PORT", free_port().to_string())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("SHA-256") && err.contains("--at"), "{err}");
    // The command says the same; `--at` the offered point restores up to it.
    let out = machine.cli(&ws).arg("restore-store").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    let offered = err
        .split("restore-store --at ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no point offered: {err}"))
        .to_string();
    let out = run_ok(machine.cli(&ws).args(["restore-store", "--at", &offered]));
    assert!(out.contains(&format!("RESTORED_TO={offered}")), "{out}");
    let listed = run_ok(
        machine
            .cli(&ws)
            .args(["events", "list", "p", "b", "--after", "0", "--limit", "100"]),
    );
    let n = listed.lines().filter(|l| l.contains("\"id\"")).count();
    assert!(
        (20..30).contains(&n),
        "two of the three batches come back: {n}\n{listed}"
    );
}
