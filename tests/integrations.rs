//! Integrations over the real API: all four into an empty branch (exact files, merged
//! package.json, `.env` ignored by git, one `integration` version each, the events), blocking
//! and unblocking by dependencies, a reinstall that does nothing, failures that leave the tree
//! byte-identical (a conflicting package.json, a full tmpfs), an install interrupted by a
//! crash that is rolled back and run again, `add_integrations` from a planning turn, and bad
//! input.

mod common;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use weldr_agent::branches::BranchKey;
use weldr_agent::integrations::catalog::Catalog;

const ALL: [&str; 4] = ["orpc", "tanstack-start", "postgresql", "better-auth"];

async fn create_branch(s: &TestServer) {
    let (status, body) = s.post_json("/projects", json!({"projectId": "p"})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s
        .post_json("/projects/p/branches", json!({"branchId": "b"}))
        .await;
    assert_eq!(status, 201, "{body}");
}

fn branch_dir(s: &TestServer) -> PathBuf {
    s.app().base.dir(&BranchKey::new("p", "b"))
}

/// The branch's jobs by key, once none of them is queued or installing any more.
async fn settled(s: &TestServer) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = s.get_json("/projects/p/branches/b/integrations").await;
        assert_eq!(status, 200, "{body}");
        let jobs = body["jobs"].as_array().unwrap().clone();
        let busy = jobs
            .iter()
            .any(|j| matches!(j["status"].as_str(), Some("queued" | "installing")));
        if !busy {
            return jobs
                .into_iter()
                .map(|j| (j["key"].as_str().unwrap().to_string(), j))
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "installs never settled: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file under `dir` but `.git`, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel == ".git" {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn versions(s: &TestServer) -> Vec<Value> {
    let (status, body) = s.get_json("/projects/p/branches/b/versions").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

fn of_kind(versions: &[Value], kind: &str) -> Vec<Value> {
    versions
        .iter()
        .filter(|v| v["kind"] == kind)
        .cloned()
        .collect()
}

/// What installing `keys` (in order) into an empty branch writes, from the catalog itself:
/// the base and generated files, each one's files and package.json paths, and the `.env` files.
fn expected_files(keys: &[&str]) -> BTreeSet<String> {
    let c = Catalog::get().unwrap();
    let mut out: BTreeSet<String> = c.base.iter().map(|f| f.path.clone()).collect();
    out.extend(c.generated.iter().map(|f| f.path.clone()));
    for k in keys {
        let i = c.find(k).unwrap();
        out.extend(i.files.iter().map(|f| f.path.clone()));
        out.extend(i.packages.keys().cloned());
        out.extend(i.manifest.env.iter().map(|e| e.file.clone()));
    }
    out
}

/// Frames of the branch stream from the start until `done` holds for them (or 30 s).
async fn frames_until(s: &TestServer, done: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&frames) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sse.next()).await {
            Ok(Some(f)) => frames.push(f),
            _ => panic!("the stream ended or timed out: {frames:#?}"),
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_install_into_an_empty_branch_each_as_a_version() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let dir = branch_dir(&s);
    let before = tree(&dir);

    let (status, body) = s.get_json("/integrations").await;
    assert_eq!(status, 200, "{body}");
    let listed: Vec<&str> = body["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ALL);
    let auth = &body["integrations"][3];
    assert_eq!(auth["category"], "authentication");
    assert_eq!(auth["dependsOn"], json!(["orpc", "postgresql"]));
    assert_eq!(auth["options"]["type"], "object");
    assert!(auth["version"].is_string());

    // Named in the wrong order: dependencies go first.
    let (status, body) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "p", "branchId": "b", "integrations": [
                {"key": "better-auth"}, {"key": "postgresql"}, {"key": "tanstack-start"}, {"key": "orpc"}
            ]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let queued: Vec<&str> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        queued,
        ["orpc", "tanstack-start", "postgresql", "better-auth"]
    );
    assert_eq!(body["jobs"][0]["status"], "queued");
    assert_eq!(body["jobs"][3]["status"], "blocked", "{body:#}");

    let jobs = settled(&s).await;
    for k in ALL {
        assert_eq!(jobs[k]["status"], "installed", "{k}: {:#}", jobs[k]);
        assert!(jobs[k]["versionId"].is_string(), "{k}: {:#}", jobs[k]);
    }

    // Exactly the files of the base and the four, nothing else (directories aside).
    let after = tree(&dir);
    let new_files: BTreeSet<String> = after
        .keys()
        .filter(|p| !p.ends_with('/') && !before.contains_key(*p))
        .cloned()
        .collect();
    assert_eq!(new_files, expected_files(&ALL));
    // Every package.json is valid and holds every fragment's dependencies.
    let c = Catalog::get().unwrap();
    for k in ALL {
        for (path, fragment) in &c.find(k).unwrap().packages {
            let doc: Value = serde_json::from_slice(&after[path]).unwrap();
            let fragment: Value = serde_json::to_value(fragment).unwrap();
            for section in ["dependencies", "devDependencies", "scripts"] {
                for (name, v) in fragment[section].as_object().into_iter().flatten() {
                    assert_eq!(&doc[section][name], v, "{path}: {section}.{name} of {k}");
                }
            }
        }
    }
    // `.env` is there (local mode), with a fresh secret, and git ignores it.
    let env = String::from_utf8(after["apps/server/.env"].clone()).unwrap();
    assert!(env.contains("DATABASE_URL=postgres://"), "{env}");
    let secret = env
        .lines()
        .find_map(|l| l.strip_prefix("BETTER_AUTH_SECRET="))
        .expect("a secret");
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(secret)
            .unwrap()
            .len(),
        32
    );
    assert_eq!(git(&dir, &["status", "--porcelain"]), "");
    assert!(!git(&dir, &["ls-files"]).contains(".env"));
    // The pieces are wired together: the generated composition names the database check and
    // the auth routes, the server serves oRPC and /health, the web app calls it typed.
    let text = |p: &str| String::from_utf8(after[p].clone()).unwrap();
    let wiring = text("apps/server/src/integrations.ts");
    assert!(wiring.contains("database: checkDatabase"), "{wiring}");
    assert!(
        wiring.contains(r#"["/api/auth/", authHandler]"#),
        "{wiring}"
    );
    assert!(wiring.contains(r#"["orpc","tanstack-start","postgresql","better-auth"]"#));
    let index = text("apps/server/src/index.ts");
    assert!(index.contains("new RPCHandler(router") && index.contains("\"/health\""));
    assert!(
        index.contains("process.env.PORT ?? 3000"),
        "the option's default is rendered"
    );
    assert!(text("apps/web/src/lib/orpc.ts").contains("RouterClient<Router>"));
    assert!(
        env.contains("BETTER_AUTH_URL=http://localhost:3000"),
        "{env}"
    );
    let server: Value = serde_json::from_slice(&after["apps/server/package.json"]).unwrap();
    assert_eq!(server["scripts"]["db:push"], "drizzle-kit push --force");
    assert!(server["dependencies"]["better-auth"].is_string());

    // One `integration` version each, naming it.
    let v = versions(&s).await;
    let installs = of_kind(&v, "integration");
    assert_eq!(installs.len(), 4, "{v:#?}");
    for k in ALL {
        assert!(
            installs
                .iter()
                .any(|v| v["message"].as_str().unwrap().contains(&format!("({k} "))),
            "{k}: {installs:#?}"
        );
    }

    // The stream told it: each job queued or blocked, installing, installed.
    let frames = frames_until(&s, |f| {
        f.iter()
            .filter(|f| f.event == "integration" && f.data["status"] == "installed")
            .count()
            == 4
    })
    .await;
    let auth: Vec<&str> = frames
        .iter()
        .filter(|f| f.event == "integration" && f.data["key"] == "better-auth")
        .map(|f| f.data["status"].as_str().unwrap())
        .collect();
    assert_eq!(auth.first(), Some(&"blocked"));
    assert_eq!(
        &auth[auth.len() - 3..],
        ["queued", "installing", "installed"]
    );

    // A reinstall does nothing and says so.
    let (status, body) = s
        .post_json(
            "/projects/p/branches/b/integrations",
            json!({"key": "orpc"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "installed");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already installed"),
        "{body}"
    );
    assert_eq!(versions(&s).await.len(), v.len());
    assert_eq!(tree(&dir), after);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_block_and_unblock() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let (status, body) = s
        .post_json(
            "/projects/p/branches/b/integrations",
            json!({"key": "better-auth"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "blocked");
    let why = body["message"].as_str().unwrap();
    assert!(
        why.contains("orpc is not queued") && why.contains("postgresql is not queued"),
        "{why}"
    );

    s.post_json(
        "/projects/p/branches/b/integrations",
        json!({"key": "orpc"}),
    )
    .await;
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "installed");
    assert_eq!(jobs["better-auth"]["status"], "blocked");
    let why = jobs["better-auth"]["message"].as_str().unwrap();
    assert!(
        !why.contains("orpc") && why.contains("postgresql is not queued"),
        "{why}"
    );

    s.post_json(
        "/projects/p/branches/b/integrations",
        json!({"key": "postgresql"}),
    )
    .await;
    let jobs = settled(&s).await;
    for k in ["orpc", "postgresql", "better-auth"] {
        assert_eq!(jobs[k]["status"], "installed", "{k}: {:#}", jobs[k]);
    }
    assert_eq!(of_kind(&versions(&s).await, "integration").len(), 3);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_package_json_fails_the_install_and_leaves_the_tree_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let dir = branch_dir(&s);
    // The branch already pins a dependency of orpc's at another version.
    let c = Catalog::get().unwrap();
    let (path, fragment) = c.find("orpc").unwrap().packages.iter().next().unwrap();
    let fragment: Value = serde_json::to_value(fragment).unwrap();
    let (dep, _) = fragment["dependencies"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let mine = json!({"name": "mine", "dependencies": {dep.clone(): "0.0.1-mine"}});
    std::fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
    std::fs::write(dir.join(path), serde_json::to_vec_pretty(&mine).unwrap()).unwrap();
    let before = tree(&dir);

    // Two in one request: postgresql needs orpc.
    let (status, body) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "p", "branchId": "b",
                   "integrations": [{"key": "orpc"}, {"key": "postgresql"}]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "failed", "{:#}", jobs["orpc"]);
    let why = jobs["orpc"]["message"].as_str().unwrap();
    assert!(
        why.contains("0.0.1-mine") && why.contains(dep.as_str()),
        "names both versions: {why}"
    );
    assert_eq!(jobs["postgresql"]["status"], "blocked");
    assert!(
        jobs["postgresql"]["message"]
            .as_str()
            .unwrap()
            .contains("orpc failed"),
        "{:#}",
        jobs["postgresql"]
    );
    assert_eq!(tree(&dir), before, "the tree is byte-identical");
    assert!(of_kind(&versions(&s).await, "integration").is_empty());
    let frames = frames_until(&s, |f| {
        f.iter()
            .any(|f| f.event == "integration" && f.data["status"] == "failed")
    })
    .await;
    let failed = frames
        .iter()
        .find(|f| f.event == "integration" && f.data["status"] == "failed")
        .unwrap();
    assert_eq!(failed.data["key"], "orpc");
    assert_eq!(failed.data["message"].as_str().unwrap(), why);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_install_and_leaves_the_tree_as_it_was() {
    let disk = tmpfs::Tmpfs::mount("4m");
    let data = tempfile::tempdir().unwrap();
    let mut config = config(disk.path());
    config.data_dir = data.path().to_path_buf();
    let s = start(config).await;
    create_branch(&s).await;
    let dir = branch_dir(&s);
    // Fill the disk, outside the branch, leaving less than the install writes.
    let filler = disk.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    use std::io::Write;
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .map(|mut f| while f.write_all(&[0u8; 512]).is_ok() {});
    let before = tree(&dir);

    let (status, body) = s
        .post_json(
            "/projects/p/branches/b/integrations",
            json!({"key": "orpc"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "failed", "{:#}", jobs["orpc"]);
    let why = jobs["orpc"]["message"].as_str().unwrap();
    assert!(why.to_lowercase().contains("space"), "{why}");
    assert_eq!(tree(&dir), before, "the tree is byte-identical");

    // Space again: queued anew, it installs.
    std::fs::remove_file(&filler).unwrap();
    s.post_json(
        "/projects/p/branches/b/integrations",
        json!({"key": "orpc"}),
    )
    .await;
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "installed", "{:#}", jobs["orpc"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_interrupted_by_a_crash_is_rolled_back_and_run_again() {
    use weldr_storage::integrations::{self as jobs, IntegrationJob, JobStatus};
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let dir = branch_dir(&s);
    let head = git(&dir, &["rev-parse", "HEAD"]).trim().to_string();
    let key = BranchKey::new("p", "b");
    // The state a kill -9 in the middle of writing the files leaves: the job `installing`
    // from HEAD, some of its files written (one half-written), stray temp files, and a
    // commit of the files made but not recorded.
    let stream = key.stream();
    let job = IntegrationJob {
        job_id: "p-b-1".into(),
        key: "orpc".into(),
        options_json: "{}".into(),
        status: JobStatus::Installing,
        message: None,
        base_commit: Some(head.clone()),
        version: None,
        then_workflow: None,
        workflow_id: None,
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    s.app()
        .store
        .writer()
        .write(move |ctx| {
            jobs::enqueue(ctx, &stream, &job)?;
            Ok(())
        })
        .await
        .unwrap();
    s.stop().await;
    std::fs::create_dir_all(dir.join("apps/server")).unwrap();
    std::fs::write(dir.join("apps/server/package.json"), b"{\"half\": ").unwrap();
    std::fs::write(dir.join("apps/server/.package.json.weldr-install"), b"x").unwrap();
    std::fs::write(dir.join("stray.txt"), b"written by the dead install").unwrap();
    git(&dir, &["add", "-A"]);
    git(
        &dir,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "unrecorded",
        ],
    );
    assert_ne!(git(&dir, &["rev-parse", "HEAD"]).trim(), head);

    let s = start(config(tmp.path())).await;
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "installed", "{:#}", jobs["orpc"]);
    let after = tree(&dir);
    assert!(!after.contains_key("stray.txt"), "rolled back first");
    assert!(!after.contains_key("apps/server/.package.json.weldr-install"));
    let pkg: Value = serde_json::from_slice(&after["apps/server/package.json"]).unwrap();
    assert!(pkg.get("half").is_none(), "{pkg}");
    let expected = expected_files(&["orpc"]);
    let files: BTreeSet<String> = after
        .keys()
        .filter(|p| !p.ends_with('/'))
        .cloned()
        .collect();
    assert_eq!(files, expected);
    // The unrecorded commit is gone from the branch: the install's version follows HEAD.
    let log = git(&dir, &["log", "--format=%s"]);
    assert!(!log.contains("unrecorded"), "{log}");
    assert_eq!(of_kind(&versions(&s).await, "integration").len(), 1);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_options_and_bodies_are_400_and_queue_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let cases = [
        (json!({"key": "nope"}), "unknown_integration"),
        (json!({"key": ""}), "unknown_integration"),
        (json!({"key": "orpc", "options": "x"}), "invalid_options"),
        (
            json!({"key": "orpc", "options": {"nope": 1}}),
            "invalid_options",
        ),
        (json!({"key": "orpc", "extra": 1}), "invalid_json"),
        (json!({"options": {}}), "invalid_json"),
    ];
    for (body, code) in cases {
        let (status, answer) = s
            .post_json("/projects/p/branches/b/integrations", body.clone())
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    // A typed option of the wrong type, for whichever option orpc has.
    let c = Catalog::get().unwrap();
    let schema = &c.find("orpc").unwrap().manifest.options;
    if let Some((name, prop)) = schema["properties"]
        .as_object()
        .and_then(|p| p.iter().next())
    {
        let wrong = if prop["type"] == "string" {
            json!(12)
        } else {
            json!("not-a-number")
        };
        let (status, answer) = s
            .post_json(
                "/projects/p/branches/b/integrations",
                json!({"key": "orpc", "options": {name.clone(): wrong}}),
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_options");
    }
    let (status, answer) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "p", "branchId": "b", "integrations": [{"key": "orpc"}, {"key": "nope"}]}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "../x", "branchId": "b"}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "p", "branchId": "nope", "integrations": [{"key": "orpc"}]}),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    // Nothing was queued by any of them.
    let (_, body) = s.get_json("/projects/p/branches/b/integrations").await;
    assert_eq!(body["jobs"], json!([]), "{body}");
    s.server.shutdown().await;
}

#[test]
fn a_write_that_runs_out_of_space_is_undone_file_by_file() {
    use weldr_agent::integrations::render::{Plan, apply};
    let disk = tmpfs::Tmpfs::mount("1m");
    let dir = disk.path().join("branch");
    std::fs::create_dir_all(dir.join("apps/server")).unwrap();
    std::fs::write(
        dir.join("apps/server/package.json"),
        b"{\"name\": \"mine\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), b"mine\n").unwrap();
    let before = tree(&dir);
    let mut plan = Plan::default();
    plan.writes.insert(
        "apps/server/package.json".into(),
        b"{\"name\": \"theirs\"}\n".to_vec(),
    );
    plan.writes.insert(
        "apps/server/src/deep/new.ts".into(),
        b"export {};\n".to_vec(),
    );
    plan.writes.insert("big.bin".into(), vec![7u8; 2 << 20]);
    plan.writes
        .insert("after.txt".into(), b"never written\n".to_vec());
    let err = apply(&dir, &plan).unwrap_err().to_string();
    assert!(
        err.contains("big.bin") && err.to_lowercase().contains("space"),
        "{err}"
    );
    assert_eq!(
        tree(&dir),
        before,
        "every change undone, the new directories too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_integrations_while_planning_installs_them_before_coding() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config(tmp.path());
    config.providers.replay_dir = Some(tmp.path().to_path_buf());
    let s = start(config).await;
    create_branch(&s).await;
    let path = tmp.path().join("integrations.json");
    let turns = json!([
        [{"type": "tool_call", "id": "c1", "name": "add_integrations",
          "input": {"keys": ["postgresql", "orpc"]}}],
        [{"type": "tool_call", "id": "c2", "name": "submit_plan", "input": {
            "acceptanceCriteria": ["the server has a database"],
            "tasks": [{"id": 1, "summary": "use the database", "description": "read the server",
                       "acceptanceCriteria": ["read"], "dependencies": []}]
        }}],
        // The coder reads a file the install wrote: it is there when coding starts.
        [{"type": "tool_call", "id": "c3", "name": "read_file",
          "input": {"filePath": "apps/server/package.json"}}],
        [{"type": "tool_call", "id": "c4", "name": "done", "input": {"summary": "read it"}}]
    ]);
    std::fs::write(&path, serde_json::to_vec(&turns).unwrap()).unwrap();
    let (status, body) = s
        .post_json(
            "/trigger",
            json!({"projectId": "p", "branchId": "b",
                   "message": {"content": [{"type": "text", "text": "add a database"}]},
                   "model": format!("replay:{}", path.display())}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let wf = body["workflowId"].as_str().unwrap().to_string();
    let frames = frames_until(&s, |f| f.iter().any(|f| f.event == "end")).await;
    let end = frames.iter().find(|f| f.event == "end").unwrap();
    assert_eq!(end.data["status"], "complete", "{frames:#?}");
    // Both installed, as versions, before the first task started.
    let jobs = settled(&s).await;
    for k in ["orpc", "postgresql"] {
        assert_eq!(jobs[k]["status"], "installed", "{k}: {:#}", jobs[k]);
    }
    let installed_at = frames
        .iter()
        .rposition(|f| f.event == "integration" && f.data["status"] == "installed")
        .unwrap();
    let task_started = frames
        .iter()
        .position(|f| f.event == "task")
        .expect("a task event");
    assert!(installed_at < task_started, "{frames:#?}");
    assert_eq!(of_kind(&versions(&s).await, "integration").len(), 2);
    // The read in the task succeeded: the file was in the tree.
    let (_, messages) = s.get_json("/projects/p/branches/b/messages").await;
    let outcome = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["workflowId"] == wf.as_str() && m["kind"] == "assistant")
        .unwrap()
        .clone();
    let read = outcome["toolCalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "read_file")
        .unwrap();
    assert_eq!(read["isError"], false, "{outcome:#}");
    let add = outcome["toolCalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "add_integrations")
        .unwrap();
    assert_eq!(add["isError"], false, "{outcome:#}");
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_workflow_starts_one_after_the_installs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("after.json");
    // The workflow answers without a plan: it ends `complete` with the reply.
    let turns = json!([[{"type": "text", "text": "The server now has oRPC."}]]);
    std::fs::write(&path, serde_json::to_vec(&turns).unwrap()).unwrap();
    let mut config = config(tmp.path());
    config.providers.replay_dir = Some(tmp.path().to_path_buf());
    config.providers.default_model = format!("replay:{}", path.display());
    let s = start(config).await;
    create_branch(&s).await;
    let (status, body) = s
        .post_json(
            "/integrations/install",
            json!({"projectId": "p", "branchId": "b", "triggerWorkflow": true,
                   "integrations": [{"key": "orpc", "options": {}}]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let frames = frames_until(&s, |f| f.iter().any(|f| f.event == "end")).await;
    let installed = frames
        .iter()
        .position(|f| f.event == "integration" && f.data["status"] == "installed")
        .expect("installed first");
    let started = frames
        .iter()
        .position(|f| f.event == "status" && f.data["status"] == "pending")
        .expect("a workflow started");
    assert!(installed < started, "{frames:#?}");
    let (_, messages) = s.get_json("/projects/p/branches/b/messages").await;
    let first = &messages["messages"][0];
    assert_eq!(first["kind"], "user");
    assert!(
        first["text"].as_str().unwrap().contains("orpc"),
        "the message names what was installed: {first:#}"
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_in_the_branch_never_redirects_an_install() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    create_branch(&s).await;
    let dir = branch_dir(&s);
    // The agent made `apps` a link to a directory outside the branch.
    std::os::unix::fs::symlink(outside.path(), dir.join("apps")).unwrap();
    let (status, body) = s
        .post_json(
            "/projects/p/branches/b/integrations",
            json!({"key": "orpc"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let jobs = settled(&s).await;
    assert_eq!(jobs["orpc"]["status"], "failed", "{:#}", jobs["orpc"]);
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing was written outside the branch"
    );
    assert!(
        std::fs::symlink_metadata(dir.join("apps"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    s.server.shutdown().await;
}
