//! Branch workspaces over the real API: create, fork, versions, diffs and revert, checked on the
//! files on disk and with the system git (`git fsck --strict`, `git log`).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use serde_json::json;

/// path → (kind, mode, content or link target) for everything but `.git`.
fn snapshot(dir: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".git" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    (
                        'l',
                        0,
                        std::fs::read_link(&path)
                            .unwrap()
                            .to_string_lossy()
                            .as_bytes()
                            .to_vec(),
                    ),
                );
            } else if meta.is_dir() {
                out.insert(rel.clone(), ('d', 0, Vec::new()));
                walk(root, &path, out);
            } else {
                out.insert(rel, ('f', mode & 0o100, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Assert two snapshots are equal, naming only the paths that differ.
fn assert_same_tree(
    got: &BTreeMap<String, (char, u32, Vec<u8>)>,
    want: &BTreeMap<String, (char, u32, Vec<u8>)>,
    what: &str,
) {
    let diff: Vec<String> = got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .map(|k| {
            format!(
                "{k}: got {:?} want {:?}",
                got.get(k).map(|v| (v.0, v.1, v.2.len())),
                want.get(k).map(|v| (v.0, v.1, v.2.len()))
            )
        })
        .collect();
    assert!(diff.is_empty(), "{what}: {diff:#?}");
}

async fn checkpoint(s: &TestServer, p: &str, b: &str, message: &str) -> String {
    let (status, body) = s
        .post_json(
            &format!("/projects/{p}/branches/{b}/versions"),
            json!({ "message": message }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["versionId"].as_str().unwrap().to_string()
}

async fn setup(s: &TestServer) -> std::path::PathBuf {
    let (status, _) = s
        .post_json("/projects", json!({ "projectId": "p", "title": "Demo" }))
        .await;
    assert_eq!(status, 201);
    let (status, body) = s
        .post_json("/projects/p/branches", json!({ "branchId": "main" }))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["headVersionId"], "1");
    s.dir.join("p").join("main")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_keep_files_and_histories_apart() {
    let tmp = tempfile::tempdir().unwrap();
    // The copying fork (without overlayfs); tests/layered_forks.rs has the layered one.
    let mut cfg = config(tmp.path());
    cfg.fork_layers = false;
    let s = start(cfg).await;
    let main = setup(&s).await;
    assert_eq!(
        git(&main, &["rev-parse", "--abbrev-ref", "HEAD"]).trim(),
        "main"
    );
    std::fs::write(main.join("shared.txt"), "base\n").unwrap();
    let v2 = checkpoint(&s, "p", "main", "base file").await;
    // Uncommitted work at the parent's head travels with a fork.
    std::fs::write(main.join("draft.txt"), "wip\n").unwrap();
    std::fs::create_dir_all(main.join("node_modules/x")).unwrap();
    std::fs::write(main.join("node_modules/x/index.js"), "excluded").unwrap();

    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({ "branchId": "feature", "fromBranchId": "main" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (
            body["parentBranchId"].as_str(),
            body["forkVersionId"].as_str()
        ),
        (Some("main"), Some(v2.as_str()))
    );
    let feature = s.dir.join("p/feature");
    assert_eq!(
        std::fs::read_to_string(feature.join("draft.txt")).unwrap(),
        "wip\n"
    );
    assert!(
        !feature.join("node_modules").exists(),
        "sync excludes do not travel"
    );
    git(&feature, &["fsck", "--strict"]);

    std::fs::write(main.join("shared.txt"), "main side\n").unwrap();
    std::fs::write(feature.join("shared.txt"), "feature side\n").unwrap();
    std::fs::remove_file(feature.join("draft.txt")).unwrap();
    checkpoint(&s, "p", "main", "main change").await;
    checkpoint(&s, "p", "feature", "feature change").await;
    assert_eq!(
        std::fs::read_to_string(main.join("shared.txt")).unwrap(),
        "main side\n"
    );
    assert_eq!(
        std::fs::read_to_string(feature.join("shared.txt")).unwrap(),
        "feature side\n"
    );
    assert!(main.join("draft.txt").exists());
    let main_log = git(&main, &["log", "--format=%s"]);
    let feature_log = git(&feature, &["log", "--format=%s"]);
    assert!(main_log.contains("main change") && !main_log.contains("feature change"));
    assert!(feature_log.contains("feature change") && !feature_log.contains("main change"));
    assert!(
        feature_log.contains("base file"),
        "the fork shares the parent's history"
    );
    git(&main, &["fsck", "--strict"]);
    git(&feature, &["fsck", "--strict"]);

    // Each branch records the disk it occupies (measured in the background after a version).
    let mut size = 0;
    for _ in 0..200 {
        let (status, body) = s.get_json("/projects/p/branches/feature").await;
        assert_eq!(status, 200);
        size = body["sizeBytes"].as_u64().unwrap();
        if size > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(size > 0, "the branch size is recorded");

    // A fork at an older version gets that version's tree.
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({ "branchId": "old", "fromBranchId": "main", "fromVersionId": "1" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let old = s.dir.join("p/old");
    assert!(!old.join("shared.txt").exists() && !old.join("draft.txt").exists());
    let (_, versions) = s.get_json("/projects/p/branches/old/versions").await;
    assert_eq!(versions.as_array().unwrap().len(), 1);

    let (_, list) = s.get_json("/projects/p/branches").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["branchId"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["feature", "main", "old"]);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_restores_a_version_tree_exactly_and_redo_works() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let dir = setup(&s).await;
    // v2: text, binary, an executable, a symlink, a nested file.
    std::fs::write(dir.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(dir.join("data.bin"), [0u8, 159, 146, 150, 0, 255, 1, 2]).unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    std::fs::write(dir.join("src/deep/lib.rs"), "pub fn f() {}\n").unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
    let v1 = checkpoint(&s, "p", "main", "v1").await;
    let tree_v1 = snapshot(&dir);

    // v2: modify text and binary, flip the executable bit, retarget the symlink, add files.
    std::fs::write(dir.join("a.txt"), "alpha changed\n").unwrap();
    std::fs::write(dir.join("data.bin"), [9u8; 64]).unwrap();
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(dir.join("link")).unwrap();
    std::os::unix::fs::symlink("src/deep/lib.rs", dir.join("link")).unwrap();
    std::fs::create_dir_all(dir.join("new/dir")).unwrap();
    std::fs::write(dir.join("new/dir/added.txt"), "added\n").unwrap();
    checkpoint(&s, "p", "main", "v2").await;
    // v3: delete files, replace a file by a symlink.
    // (git versions have no empty directories, so the emptied one goes too.)
    std::fs::remove_dir_all(dir.join("src")).unwrap();
    std::fs::remove_file(dir.join("a.txt")).unwrap();
    std::os::unix::fs::symlink("run.sh", dir.join("a.txt")).unwrap();
    std::fs::write(
        dir.join("more.bin"),
        (0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let v3 = checkpoint(&s, "p", "main", "v3").await;
    let tree_v3 = snapshot(&dir);
    assert_ne!(tree_v1, tree_v3);

    let mut events = s.sse("/stream/p/main", None).await;
    let (status, body) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": v1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["commitHash"].as_str().unwrap().len(), 40);
    let revert_id = body["versionId"].as_str().unwrap().to_string();
    assert_same_tree(
        &snapshot(&dir),
        &tree_v1,
        "the tree is byte-identical to v1",
    );
    git(&dir, &["fsck", "--strict"]);
    assert!(
        git(&dir, &["status", "--porcelain"]).is_empty(),
        "index and work tree agree"
    );
    // (`sync` events of the background pushes may come in between.)
    let mut frame = events.next().await.unwrap();
    while frame.event == "sync" {
        frame = events.next().await.unwrap();
    }
    assert_eq!(frame.event, "version");
    assert_eq!(frame.data["versionId"], revert_id.as_str());
    assert_eq!(frame.data["kind"], "revert");

    let (_, versions) = s.get_json("/projects/p/branches/main/versions").await;
    let last = versions.as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].as_str(), last["restoresVersionId"].as_str()),
        (Some("revert"), Some(v1.as_str()))
    );

    // Redo: back to v3.
    let (status, _) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": v3 }),
        )
        .await;
    assert_eq!(status, 200);
    assert_same_tree(&snapshot(&dir), &tree_v3, "redo restores v3 exactly");
    git(&dir, &["fsck", "--strict"]);

    // The diff of v3 names its changes; binary files carry no patch.
    let (status, diff) = s
        .get_json(&format!("/projects/p/branches/main/versions/{v3}/diff"))
        .await;
    assert_eq!(status, 200);
    let files = diff["files"].as_array().unwrap();
    let find = |p: &str| files.iter().find(|f| f["path"] == p).cloned().unwrap();
    assert_eq!(find("src/deep/lib.rs")["kind"], "deleted");
    assert_eq!(find("more.bin")["binary"], true);
    assert_eq!(find("more.bin")["kind"], "added");
    let (_, v) = s
        .get_json(&format!("/projects/p/branches/main/versions/{v1}/diff"))
        .await;
    assert!(
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "a.txt" && f["patch"].as_str().unwrap().contains("+alpha"))
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_work_is_kept_as_a_version_before_a_revert() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let dir = setup(&s).await;
    std::fs::write(dir.join("keep.txt"), "precious\n").unwrap();
    let (status, _) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": "1" }),
        )
        .await;
    assert_eq!(status, 200);
    assert!(!dir.join("keep.txt").exists());
    let (_, versions) = s.get_json("/projects/p/branches/main/versions").await;
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 3);
    assert_eq!(versions[1]["message"], "Uncommitted changes before revert");
    let saved = versions[1]["versionId"].as_str().unwrap();
    let (status, _) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": saved }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "precious\n"
    );
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_foreign_and_malformed_requests_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    let dir = setup(&s).await;
    std::fs::write(dir.join("x.txt"), "x").unwrap();
    checkpoint(&s, "p", "main", "x").await;
    let before = snapshot(&dir);

    // A workflow holds the branch.
    s.app()
        .store
        .writer()
        .write(|ctx| weldr_storage::model::claim_branch(ctx, "p", "main", "wf_1"))
        .await
        .unwrap();
    let (status, body) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": "1" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("branch_busy"))
    );
    assert_eq!(body["error"]["details"]["workflowId"], "wf_1");
    s.app()
        .store
        .writer()
        .write(|ctx| weldr_storage::model::release_branch(ctx, "p", "main", "wf_1"))
        .await
        .unwrap();

    // A version of another branch, unknown ids, malformed ids.
    s.post_json("/projects/p/branches", json!({ "branchId": "other" }))
        .await;
    for (body, status, code) in [
        (
            json!({ "projectId": "p", "branchId": "other", "versionId": "2" }),
            404,
            "version_not_found",
        ),
        (
            json!({ "projectId": "p", "branchId": "main", "versionId": "999" }),
            404,
            "version_not_found",
        ),
        (
            json!({ "projectId": "nope", "branchId": "main", "versionId": "1" }),
            404,
            "project_not_found",
        ),
        (
            json!({ "projectId": "p", "branchId": "nope", "versionId": "1" }),
            404,
            "branch_not_found",
        ),
        (
            json!({ "projectId": "p", "branchId": "main", "versionId": "abc" }),
            400,
            "invalid_version_id",
        ),
        (
            json!({ "projectId": "p", "branchId": "main", "versionId": "0" }),
            400,
            "invalid_version_id",
        ),
        (
            json!({ "projectId": "p", "branchId": "main", "versionId": "-1" }),
            400,
            "invalid_version_id",
        ),
        (
            json!({ "projectId": "..", "branchId": "main", "versionId": "1" }),
            400,
            "invalid_id",
        ),
        (
            json!({ "projectId": "p", "branchId": "../main", "versionId": "1" }),
            400,
            "invalid_id",
        ),
        (
            json!({ "projectId": "p", "branchId": "main" }),
            400,
            "invalid_json",
        ),
        (
            json!({ "projectId": "p", "branchId": "main", "versionId": 1 }),
            400,
            "invalid_json",
        ),
        (json!(["p"]), 400, "invalid_json"),
    ] {
        let (got, res) = s.post_json("/revert", body.clone()).await;
        assert_eq!(
            (got, res["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    for raw in ["{\"projectId\": \"p\", \"branchId\": \"ma", "", "null", "{"] {
        let res = s
            .http
            .post(s.url("/revert"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{raw:?}");
    }
    let res = s
        .http
        .post(s.url("/revert"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let huge = json!({ "projectId": "p", "branchId": "main", "versionId": "1", "pad": "x".repeat(2 << 20) });
    let res = s
        .http
        .post(s.url("/revert"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    // The rest of the body is never read, so the connection must not be offered for reuse: the
    // next request below would otherwise go into a closing connection.
    assert_eq!(
        res.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    for path in [
        "/projects/p/branches/main/versions/abc/diff",
        "/projects/p/branches/main/versions/99/diff",
        "/projects/p/branches/../versions",
        "/projects/%2e%2e/branches",
        "/projects/p/branches/a.b",
    ] {
        let (status, body) = s.get_json(path).await;
        assert!(
            (400..500).contains(&status) && body["error"]["code"].is_string(),
            "{path}: {status} {body}"
        );
    }
    for body in [
        json!({ "branchId": "a/b" }),
        json!({ "branchId": "" }),
        json!({ "branchId": "x", "fromVersionId": "1" }),
        json!({ "branchId": "y", "fromBranchId": "nope" }),
        json!({ "branchId": "main" }),
    ] {
        let (status, _) = s.post_json("/projects/p/branches", body.clone()).await;
        assert!((400..500).contains(&status), "{body}");
    }
    let (status, _) = s.post_json("/projects", json!({ "projectId": "p" })).await;
    assert_eq!(status, 409);
    let (status, _) = s
        .post_json(
            "/projects/p/branches/main/versions",
            json!({ "message": "nothing new" }),
        )
        .await;
    assert_eq!(status, 409);

    // Nothing stored changed.
    assert_same_tree(&snapshot(&dir), &before, "nothing changed");
    git(&dir, &["fsck", "--strict"]);
    let (status, _) = s.get_json("/health").await;
    assert_eq!(status, 200);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_mode_uses_the_flat_layout_and_refuses_other_projects() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.mode = weldr_agent::config::Mode::Cloud;
    cfg.project_id = Some("proj".into());
    let s = start(cfg).await;
    let (status, body) = s
        .post_json("/projects/proj/branches", json!({ "branchId": "main" }))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        tmp.path().join("main/.git").is_dir(),
        "cloud layout is {{base}}/{{branchId}}"
    );
    let (status, body) = s
        .post_json("/projects", json!({ "projectId": "elsewhere" }))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("wrong_machine"))
    );
    s.server.shutdown().await;
}

/// A branch's recorded last use, straight from the store.
fn last_access(s: &TestServer, p: &str, b: &str) -> u64 {
    let rtx = s.app().store.begin_read().unwrap();
    weldr_storage::model::get_branch(&rtx, p, b)
        .unwrap()
        .expect("branch")
        .last_access_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_use_is_recorded_but_uses_at_once_share_one_write() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(config(tmp.path())).await;
    setup(&s).await;
    set_last_access(s.app(), "p", "main", 1).await;

    // A stream opening on a branch not used for long records the use before it answers.
    let before = weldr_storage::writer::now_ms();
    let first = s.sse("/stream/p/main", None).await;
    let recorded = last_access(&s, "p", "main");
    assert!(recorded >= before, "{recorded} < {before}");

    // Many more at once: the use was just recorded, so none of them writes it again (it may
    // only move once the one-second window has passed, on a slow machine).
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(s.sse("/stream/p/main", None));
    }
    let streams = futures_util::future::join_all(streams).await;
    let again = last_access(&s, "p", "main");
    assert!(
        again == recorded || again >= recorded + 1000,
        "the use was written again within its window: {recorded} -> {again}"
    );
    drop((first, streams));
    s.stop().await;
}
