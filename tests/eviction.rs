//! Dirty tracking, the background syncer, the disk watermark loop and transparent restore, on
//! the real server: a tmpfs of 40 MiB filled past the maximum with branches of different last
//! access times, one `weldr-agent cleanup` pass (through the running server's control socket),
//! and every evicted branch restored byte-identical on its next use.
//!
//! The tmpfs needs root (`mount -t tmpfs`). Without it the eviction test says so and skips,
//! except under `CI=true`, where it fails.

mod common;
#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use weldr_agent::branches::BranchKey;
use weldr_storage::model;
use weldr_storage::writer::now_ms;

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Mount a tmpfs of `mib` MiB, or None (with a message) when this machine cannot.
fn tmpfs(mib: u32) -> Option<Tmpfs> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "tmpfs",
        ])
        .arg(dir.path())
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Tmpfs { dir }),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            let message = format!(
                "cannot mount a tmpfs for the disk watermark test (needs root): {}",
                why.trim()
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
            eprintln!("SKIPPED: {message}");
            None
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    v
}

/// Everything in a branch directory.
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree::tree(root, &[])
}

/// A branch's content: a committed text file, an executable, a symlink, an empty directory, and
/// `mib`-ish of random (incompressible) untracked data.
fn fill_branch(dir: &Path, bytes: usize) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/main.rs", dir.join("main-link")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    weldr_agent::git::commit_all(dir, "content", "test").unwrap();
    std::fs::write(dir.join("data.bin"), random_bytes(bytes)).unwrap();
}

async fn create_branch(s: &TestServer, p: &str, b: &str) -> (u16, Value) {
    let res = s
        .http
        .post(s.url(&format!("/projects/{p}/branches")))
        .json(&json!({ "branchId": b }))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn usage(path: &Path) -> f64 {
    use weldr_agent::evict::DiskUsage;
    weldr_agent::evict::Statvfs.usage(path).unwrap().percent()
}

fn cli_env(cmd: &mut Command, config: &weldr_agent::Config) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WELDR_AGENT_BIN", env!("CARGO_BIN_EXE_weldr-agent"))
        .env("WELDR_MODE", "local")
        .env("WORKSPACE_BASE", &config.workspace_base)
        .env("WELDR_DATA_DIR", &config.data_dir)
        .env("WELDR_OBJECT_STORE_DIR", &config.object_store_dir)
        .env("LOG_LEVEL", "warn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_evicts_lru_branches_and_they_restore_byte_identical() {
    let Some(mount) = tmpfs(40) else { return };
    let outside = tempfile::tempdir().unwrap();
    let mut config = config(mount.path());
    // The store and the object store live off the small volume: only branches fill it.
    config.data_dir = outside.path().join("data");
    config.object_store_dir = outside.path().join("objects");
    config.eviction_interval = Duration::ZERO;
    config.sync_quiet = Duration::from_secs(3600);
    let s = start(config.clone()).await;
    let control = weldr_agent::control::ControlServer::start(s.app().clone())
        .await
        .unwrap();
    let app = s.app().clone();
    let p = "proj";
    let res = s
        .http
        .post(s.url("/projects"))
        .json(&json!({ "projectId": p }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    // Oldest first. `bfail` cannot be pushed (its bucket path is a file), `b1` has an active
    // workflow, `b2` an open stream, `b5` was just used.
    let names = ["bfail", "b0", "b1", "b2", "b3", "b4", "b5"];
    for b in names {
        assert_eq!(create_branch(&s, p, b).await.0, 201, "create {b}");
        fill_branch(
            &weldr_agent::branches::branch_dir(
                &config,
                &weldr_agent::branches::BranchKey::new(p, b),
            ),
            5 << 20,
        );
    }
    std::fs::create_dir_all(&config.object_store_dir).unwrap();
    std::fs::write(
        config.object_store_dir.join("project-proj-branch-bfail"),
        "not a directory",
    )
    .unwrap();
    let subscriber = s.sse("/stream/proj/b2", None).await;
    app.store
        .writer()
        .write(|ctx| model::claim_branch(ctx, "proj", "b1", "wf-test"))
        .await
        .unwrap();
    let now = now_ms();
    for (i, b) in names.iter().enumerate() {
        let age_s = if *b == "b5" {
            0
        } else {
            7000 - 1000 * i as u64
        };
        set_last_access(&app, p, b, now - age_s * 1000).await;
    }
    let trees: BTreeMap<&str, BTreeMap<String, String>> = names
        .iter()
        .map(|b| {
            (
                *b,
                tree(&weldr_agent::branches::branch_dir(
                    &config,
                    &weldr_agent::branches::BranchKey::new(p, *b),
                )),
            )
        })
        .collect();
    let before = usage(mount.path());
    assert!(before >= 85.0, "the volume is only {before:.1}% full");

    // GET /disk: usage, watermarks, LRU order and what keeps each branch.
    let (status, disk) = s.get_json("/disk").await;
    assert_eq!(status, 200, "{disk}");
    assert!(disk["usagePercent"].as_f64().unwrap() >= 85.0, "{disk}");
    assert_eq!(disk["maxUsagePercent"], 85);
    assert_eq!(disk["targetUsagePercent"], 70);
    assert!(disk["totalBytes"].as_u64().unwrap() >= 39 << 20, "{disk}");
    let order: Vec<&str> = disk["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["branchId"].as_str().unwrap())
        .collect();
    assert_eq!(order, names);
    let reason = |b: &str| -> Value {
        disk["branches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["branchId"] == b)
            .unwrap()["reason"]
            .clone()
    };
    assert_eq!(reason("b1"), "active_workflow");
    assert_eq!(reason("b2"), "subscribers");
    assert_eq!(reason("b5"), "recently_used");
    assert_eq!(reason("b0"), Value::Null);

    // One pass through the original script's name, which goes through the server.
    let mut cmd =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cleanup-lru.sh"));
    cli_env(&mut cmd, &config);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}{err}");
    assert!(text.contains("CLEANUP_STATUS=success"), "{text}");
    assert!(text.contains("EVICTED=proj/b0,proj/b3\n"), "{text}");
    assert!(text.contains("FAILED=proj/bfail\n"), "{text}");
    assert!(
        text.contains("proj/b1:active_workflow") && text.contains("proj/b2:subscribers"),
        "{text}"
    );
    assert!(err.contains("bfail"), "{err}");
    let after = usage(mount.path());
    assert!(after <= 70.0, "still {after:.1}% after cleanup:\n{text}");
    assert!(text.contains(&format!("USAGE_AFTER={after:.1}")), "{text}");

    for b in ["b0", "b3"] {
        assert!(
            !weldr_agent::branches::branch_dir(
                &config,
                &weldr_agent::branches::BranchKey::new(p, b)
            )
            .exists()
        );
        let (_, view) = s.get_json(&format!("/projects/proj/branches/{b}")).await;
        assert_eq!(view["state"], "evicted", "{view}");
        assert!(view["sync"]["lastSnapshotId"].is_string(), "{view}");
    }
    // Kept: the failed push, the busy ones, the recent one, and the one not needed.
    for b in ["bfail", "b1", "b2", "b4", "b5"] {
        let dir = weldr_agent::branches::branch_dir(
            &config,
            &weldr_agent::branches::BranchKey::new(p, b),
        );
        tree::assert_same(&tree(&dir), &trees[b], b);
    }
    let (_, view) = s.get_json("/projects/proj/branches/bfail").await;
    assert_eq!(view["state"], "active");
    assert!(view["sync"]["lastError"].is_string(), "{view}");
    assert_eq!(view["sync"]["dirty"], true, "{view}");

    // Next use restores: `branch create` reusing it (the original script's name, through the
    // server's control socket) ...
    let mut cmd =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/create-branch-dir.sh"));
    cli_env(&mut cmd, &config);
    cmd.args(["b0", "proj"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("STATUS=reused"), "{text}");
    let (status, versions) = s.get_json("/projects/proj/branches/b0/versions").await;
    assert_eq!(status, 200, "{versions}");
    let b0 =
        weldr_agent::branches::branch_dir(&config, &weldr_agent::branches::BranchKey::new(p, "b0"));
    tree::assert_same(&tree(&b0), &trees["b0"], "b0 restored");
    git(&b0, &["fsck", "--full", "--strict"]);
    assert_eq!(
        git(&b0, &["log", "--format=%s"]).lines().next(),
        Some("content")
    );
    let (_, view) = s.get_json("/projects/proj/branches/b0").await;
    assert_eq!(view["state"], "active");
    // ... and a stream connect, which sees the `sync` events of the push and the restore.
    let mut stream = s.sse("/stream/proj/b3", Some("0")).await;
    let b3 =
        weldr_agent::branches::branch_dir(&config, &weldr_agent::branches::BranchKey::new(p, "b3"));
    tree::assert_same(&tree(&b3), &trees["b3"], "b3 restored");
    git(&b3, &["fsck", "--full", "--strict"]);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let f = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("events")
            .expect("stream open");
        seen.push((f.event.clone(), f.data.clone()));
    }
    assert_eq!(seen[0].0, "sync");
    assert_eq!(seen[0].1["trigger"], "eviction");
    assert_eq!(seen[0].1["status"], "success");
    assert_eq!(seen[1].0, "eviction");
    assert_eq!(seen[1].1["status"], "evicted");
    assert_eq!(seen[2].0, "sync");
    assert_eq!(seen[2].1["action"], "restore");
    assert_eq!(seen[2].1["status"], "success");
    drop(stream);
    drop(subscriber);

    // Full and nothing evictable: creating a branch fails with 507 disk_full.
    for b in names {
        set_last_access(&app, p, b, now_ms()).await;
    }
    let free = {
        use weldr_agent::evict::DiskUsage;
        weldr_agent::evict::Statvfs
            .usage(mount.path())
            .unwrap()
            .available_bytes as usize
    };
    let filler = mount.path().join("filler.bin");
    std::fs::write(&filler, random_bytes(free.saturating_sub(2 << 20))).unwrap();
    assert!(usage(mount.path()) >= 85.0);
    let (status, body) = create_branch(&s, p, "another").await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    std::fs::remove_file(&filler).unwrap();

    control.stop().await;
    s.server.shutdown().await;
    drop(mount);
}

/// A config with a one-second quiet period and no watermark loop, over `dir`.
fn quick_config(dir: &Path) -> weldr_agent::Config {
    let mut config = config(dir);
    config.sync_quiet = Duration::from_secs(1);
    config.eviction_interval = Duration::ZERO;
    config
}

async fn wait_for(mut check: impl AsyncFnMut() -> bool, what: &str) {
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within a minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_write_marks_the_branch_dirty_and_the_syncer_pushes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = quick_config(tmp.path());
    let s = start(config.clone()).await;
    let res = s
        .http
        .post(s.url("/projects"))
        .json(&json!({ "projectId": "p" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(create_branch(&s, "p", "main").await.0, 201);
    let dir: PathBuf = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "main"),
    );

    // The new branch is pushed once it is quiet.
    wait_for(
        async || {
            let (_, v) = s.get_json("/projects/p/branches/main").await;
            v["sync"]["lastSnapshotId"].is_string() && v["sync"]["dirty"] == false
        },
        "the first push",
    )
    .await;

    // A write in a subdirectory created after the watch began marks it dirty; the syncer pushes
    // it after the quiet period.
    std::fs::create_dir_all(dir.join("deep/er")).unwrap();
    std::fs::write(dir.join("deep/er/new.txt"), "hello").unwrap();
    wait_for(
        async || {
            let m = weldr_agent::sync::manifest(&config, &BranchKey::new("p", "main"), None).await;
            m.ok()
                .flatten()
                .is_some_and(|m| m.entries.iter().any(|e| e.path() == "deep/er/new.txt"))
        },
        "the push of deep/er/new.txt",
    )
    .await;
    // Excluded paths do not make a branch dirty.
    wait_for(
        async || {
            let (_, v) = s.get_json("/projects/p/branches/main").await;
            v["sync"]["dirty"] == false && v["sync"]["running"] == false
        },
        "a clean branch",
    )
    .await;
    std::fs::create_dir_all(dir.join("node_modules/x")).unwrap();
    std::fs::write(dir.join("node_modules/x/index.js"), "x").unwrap();
    std::fs::write(dir.join("debug.log"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, v) = s.get_json("/projects/p/branches/main").await;
    assert_eq!(v["sync"]["dirty"], false, "{v}");

    // POST .../sync pushes now: nothing changed.
    let res = s
        .http
        .post(s.url("/projects/p/branches/main/sync"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["unchanged"], true, "{report}");
    assert!(report["snapshotId"].is_string());
    let res = s
        .http
        .post(s.url("/projects/p/branches/nope/sync"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    // Each push is a `sync` event on the branch stream.
    let mut stream = s.sse("/stream/p/main", Some("0")).await;
    let mut syncs: Vec<Value> = Vec::new();
    while syncs.last().is_none_or(|e| e["trigger"] != "api") {
        let f = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("events")
            .expect("stream open");
        if f.event == "sync" {
            syncs.push(f.data);
        }
    }
    assert!(syncs.len() >= 3, "{syncs:?}");
    assert!(syncs.iter().all(|e| e["status"] == "success"), "{syncs:?}");
    assert!(syncs.iter().all(|e| e["action"] == "push"), "{syncs:?}");
    assert_eq!(syncs[0]["trigger"], "background");
    assert_eq!(syncs[1]["unchanged"], false);

    // GET /disk answers and lists the branch.
    let (status, disk) = s.get_json("/disk").await;
    assert_eq!(status, 200);
    assert!(disk["usagePercent"].as_f64().is_some());
    assert_eq!(disk["branches"][0]["branchId"], "main");
    // Watched (the stream above) and just used: not evictable.
    assert_eq!(disk["branches"][0]["evictable"], false);
    assert_eq!(disk["branches"][0]["reason"], "subscribers");
    let anonymous = reqwest::Client::new();
    let res = anonymous.get(s.url("/disk")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    drop(stream);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_pushes_dirty_branches_before_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = quick_config(tmp.path());
    config.sync_quiet = Duration::from_secs(3600);
    let s = start(config.clone()).await;
    common::branch(s.app(), "p", "b").await;
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    weldr_agent::git::init_branch(&dir, "test").unwrap();
    std::fs::write(dir.join("unsaved.txt"), "work in progress").unwrap();
    wait_for(
        async || {
            let (_, v) = s.get_json("/projects/p/branches/b").await;
            v["sync"]["dirty"] == true
        },
        "the dirty mark",
    )
    .await;
    assert!(
        weldr_agent::sync::manifest(&config, &BranchKey::new("p", "b"), None)
            .await
            .unwrap()
            .is_none()
    );
    s.server.shutdown().await;
    let m = weldr_agent::sync::manifest(&config, &BranchKey::new("p", "b"), None)
        .await
        .unwrap()
        .expect("pushed on shutdown");
    assert!(m.entries.iter().any(|e| e.path() == "unsaved.txt"));
}
