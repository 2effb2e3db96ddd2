//! Layered forks: a fork at the parent's head is two overlayfs mounts over the parent's frozen
//! tree. Both sides see the whole tree at once, write apart, survive a restart (mounts do not),
//! finish a freeze a crash interrupted, evict and restore like any branch, and a parent that a
//! process is using is copied instead of frozen.
//!
//! Mounting needs root. Without it these tests say so and skip, except under `CI=true`, where
//! they fail.

mod common;
#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;
use weldr_agent::branches::BranchKey;
use weldr_agent::branches::layers::{Layers, is_mount_point};
use weldr_agent::config::Config;

/// Whether overlays can be mounted here; panics under CI=true when they cannot.
fn layers_available(cfg: &Config) -> bool {
    std::fs::create_dir_all(&cfg.workspace_base).unwrap();
    if Layers::new(cfg).available() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: overlayfs cannot be mounted (needs root and overlayfs)"
    );
    eprintln!("SKIPPED: overlayfs cannot be mounted here (needs root)");
    false
}

async fn checkpoint(s: &TestServer, b: &str, message: &str) {
    let (status, body) = s
        .post_json(
            &format!("/projects/p/branches/{b}/versions"),
            json!({ "message": message }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn fork(s: &TestServer, child: &str, parent: &str) {
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({ "branchId": child, "fromBranchId": parent }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Project `p` with branch `main` holding text, binary, executable, symlink, nested and
/// dependency files, one version of them, and uncommitted work on top.
async fn setup(s: &TestServer) -> PathBuf {
    let (status, _) = s.post_json("/projects", json!({ "projectId": "p" })).await;
    assert_eq!(status, 201);
    let (status, _) = s
        .post_json("/projects/p/branches", json!({ "branchId": "main" }))
        .await;
    assert_eq!(status, 201);
    let main = s.dir.join("p/main");
    std::fs::write(main.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(main.join("data.bin"), [0u8, 159, 146, 150, 0, 255]).unwrap();
    std::fs::write(main.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(main.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(main.join("src/deep")).unwrap();
    std::fs::write(main.join("src/deep/lib.rs"), "pub fn f() {}\n").unwrap();
    std::os::unix::fs::symlink("a.txt", main.join("link")).unwrap();
    std::fs::create_dir_all(main.join("node_modules/x")).unwrap();
    std::fs::write(main.join("node_modules/x/index.js"), "dep").unwrap();
    checkpoint(s, "main", "base").await;
    std::fs::write(main.join("draft.txt"), "wip\n").unwrap();
    main
}

fn work_tree(dir: &Path) -> BTreeMap<String, String> {
    tree::tree(dir, &[".git"])
}

fn layer_root(s: &TestServer) -> PathBuf {
    s.dir.join(".weldr-layers")
}

fn upper_is_empty(s: &TestServer, b: &str) -> bool {
    let upper = layer_root(s).join("branches/p").join(b).join("upper");
    std::fs::read_dir(upper).unwrap().next().is_none()
}

fn layers_on_disk(s: &TestServer) -> usize {
    std::fs::read_dir(layer_root(s).join("layers"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_fork_shares_the_tree_and_keeps_both_sides_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    if !layers_available(&cfg) {
        return;
    }
    let s = start(cfg).await;
    let main = setup(&s).await;
    let before = work_tree(&main);
    let head = git(&main, &["rev-parse", "HEAD"]);

    fork(&s, "feature", "main").await;
    let feature = s.dir.join("p/feature");
    assert!(is_mount_point(&main).unwrap() && is_mount_point(&feature).unwrap());
    // Everything travels (uncommitted work and dependencies too), and nothing was copied.
    tree::assert_same(&work_tree(&feature), &before, "the fork");
    tree::assert_same(&work_tree(&main), &before, "the parent after the fork");
    assert!(upper_is_empty(&s, "feature") && upper_is_empty(&s, "main"));
    assert_eq!(git(&feature, &["rev-parse", "HEAD"]), head);
    git(&feature, &["fsck", "--strict"]);

    // The dirty watcher follows the new mounts: a push clears the mark, and a write deep in
    // the fork (in a directory that came from the frozen layer) sets it again.
    let (status, body) = s
        .post_json("/projects/p/branches/feature/sync", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let dirty = || async {
        let (_, body) = s.get_json("/projects/p/branches/feature").await;
        body["sync"]["dirty"].as_bool()
    };
    assert_eq!(dirty().await, Some(false));
    std::fs::write(feature.join("src/deep/new.rs"), "// new\n").unwrap();
    let mut seen = false;
    for _ in 0..200 {
        if dirty().await == Some(true) {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(seen, "a write in the layered fork marks it dirty");
    std::fs::remove_file(feature.join("src/deep/new.rs")).unwrap();

    // Both sides change; neither sees the other's changes.
    std::fs::write(main.join("a.txt"), "main side\n").unwrap();
    std::fs::remove_file(main.join("data.bin")).unwrap();
    std::fs::write(main.join("m.txt"), "only main\n").unwrap();
    std::fs::write(feature.join("a.txt"), "feature side\n").unwrap();
    std::fs::set_permissions(
        feature.join("run.sh"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::remove_file(feature.join("link")).unwrap();
    std::os::unix::fs::symlink("run.sh", feature.join("link")).unwrap();
    std::fs::remove_dir_all(feature.join("node_modules")).unwrap();
    // Directory renames work inside a layer (tools rename directories).
    std::fs::rename(feature.join("src"), feature.join("lib")).unwrap();
    checkpoint(&s, "main", "main change").await;
    checkpoint(&s, "feature", "feature change").await;

    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(read(&main, "a.txt"), "main side\n");
    assert_eq!(read(&feature, "a.txt"), "feature side\n");
    assert!(!main.join("data.bin").exists() && feature.join("data.bin").exists());
    assert!(main.join("m.txt").exists() && !feature.join("m.txt").exists());
    assert_eq!(
        std::fs::symlink_metadata(main.join("run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(main.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert_eq!(
        std::fs::read_link(feature.join("link")).unwrap(),
        Path::new("run.sh")
    );
    assert!(main.join("node_modules/x/index.js").exists());
    assert!(main.join("src/deep/lib.rs").exists() && !main.join("lib").exists());
    assert!(feature.join("lib/deep/lib.rs").exists() && !feature.join("src").exists());
    let main_log = git(&main, &["log", "--format=%s"]);
    let feature_log = git(&feature, &["log", "--format=%s"]);
    assert!(main_log.contains("main change") && !main_log.contains("feature change"));
    assert!(feature_log.contains("feature change") && !feature_log.contains("main change"));
    assert!(
        feature_log.contains("base"),
        "the fork shares the parent's history"
    );

    // A fork of the fork, and a second fork of the parent (whose changes freeze into a new layer).
    let (feature_now, main_now) = (work_tree(&feature), work_tree(&main));
    fork(&s, "deeper", "feature").await;
    fork(&s, "second", "main").await;
    tree::assert_same(
        &work_tree(&s.dir.join("p/deeper")),
        &feature_now,
        "fork of the fork",
    );
    tree::assert_same(
        &work_tree(&s.dir.join("p/second")),
        &main_now,
        "second fork",
    );
    tree::assert_same(&work_tree(&feature), &feature_now, "feature after its fork");
    tree::assert_same(&work_tree(&main), &main_now, "main after its second fork");
    assert_eq!(
        layers_on_disk(&s),
        3,
        "main's tree, then main's and feature's changes"
    );
    std::fs::write(s.dir.join("p/second/s.txt"), "s").unwrap();
    checkpoint(&s, "second", "second change").await;
    assert!(!main.join("s.txt").exists());
    for b in ["main", "feature", "deeper", "second"] {
        git(&s.dir.join("p").join(b), &["fsck", "--strict"]);
    }

    // A fork at an older version is a checkout, not a layer.
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({ "branchId": "old", "fromBranchId": "main", "fromVersionId": "1" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let old = s.dir.join("p/old");
    assert!(!is_mount_point(&old).unwrap() && !old.join("a.txt").exists());
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_branches_come_back_after_a_restart_and_evict_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    if !layers_available(&cfg) {
        return;
    }
    let s = start(cfg.clone()).await;
    let main = setup(&s).await;
    fork(&s, "feature", "main").await;
    let feature = s.dir.join("p/feature");
    std::fs::write(feature.join("f.txt"), "fork work\n").unwrap();
    checkpoint(&s, "feature", "fork work").await;
    let (main_tree, feature_tree) = (work_tree(&main), work_tree(&feature));
    s.stop().await; // unmounts, as a reboot would
    assert!(!is_mount_point(&main).unwrap());
    let left: Vec<_> = std::fs::read_dir(&main)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // `weldr-agent sync push` before any server ran again mounts the branch first: it never
    // pushes the bare mount point as the branch.
    let pushed = weldr_agent::sync::push(&cfg, &BranchKey::new("p", "feature"))
        .await
        .unwrap();
    assert!(is_mount_point(&feature).unwrap());
    assert!(pushed.files > 10, "{pushed:?}");
    tree::assert_same(&work_tree(&feature), &feature_tree, "feature as pushed");

    // The store's next open mounts them again before anything reads them.
    let s = start(cfg.clone()).await;
    assert!(is_mount_point(&main).unwrap() && is_mount_point(&feature).unwrap());
    tree::assert_same(&work_tree(&main), &main_tree, "main after restart");
    tree::assert_same(&work_tree(&feature), &feature_tree, "feature after restart");
    std::fs::write(main.join("after.txt"), "after restart\n").unwrap();
    checkpoint(&s, "main", "after restart").await;
    // Sync keeps everything but its excludes (node_modules here).
    let full = (
        tree::tree(&main, &["node_modules"]),
        tree::tree(&feature, &["node_modules"]),
    );
    s.stop().await;

    // One cleanup pass with the watermarks at the floor evicts both: pushed, verified,
    // unmounted, their own changes and the now unused layers deleted.
    let mut pressed = cfg.clone();
    pressed.max_volume_usage_percent = 1;
    pressed.target_volume_usage_percent = 0;
    pressed.eviction_grace = std::time::Duration::ZERO;
    pressed.eviction_interval = std::time::Duration::ZERO;
    let s = start(pressed).await;
    let report = s.app().evictor.cleanup().await.unwrap();
    let report = serde_json::to_value(&report).unwrap();
    assert!(
        report.to_string().contains("feature") && report.to_string().contains("main"),
        "{report}"
    );
    assert!(!main.exists() && !feature.exists());
    assert_eq!(
        layers_on_disk(&s),
        0,
        "no layer is left once no branch uses it"
    );
    s.stop().await;

    // Their next use restores them, byte for byte (.git included), as plain directories.
    let s = start(cfg).await;
    for (b, want) in [("main", &full.0), ("feature", &full.1)] {
        let (status, body) = s
            .get_json(&format!("/projects/p/branches/{b}/versions"))
            .await;
        assert_eq!(status, 200, "{body}");
        let (_, body) = s.get_json(&format!("/projects/p/branches/{b}")).await;
        assert_eq!(body["state"], "active", "{body}");
        let dir = s.dir.join("p").join(b);
        assert!(!is_mount_point(&dir).unwrap());
        tree::assert_same(&tree::tree(&dir, &["node_modules"]), want, b);
        git(&dir, &["fsck", "--strict"]);
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_freeze_is_finished_on_the_next_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    if !layers_available(&cfg) {
        return;
    }
    let s = start(cfg.clone()).await;
    let main = setup(&s).await;
    fork(&s, "feature", "main").await;
    std::fs::write(main.join("new.txt"), "written after the fork\n").unwrap();
    let (status, _) = s
        .post_json("/projects/p/branches", json!({ "branchId": "solo" }))
        .await;
    assert_eq!(status, 201);
    let solo = s.dir.join("p/solo");
    std::fs::write(solo.join("s.txt"), "solo\n").unwrap();
    let (main_tree, feature_tree, solo_tree) = (
        work_tree(&main),
        work_tree(&s.dir.join("p/feature")),
        work_tree(&solo),
    );
    let root = layer_root(&s);
    s.stop().await;

    // A crash right after a freeze was decided (the stack names a layer that does not exist
    // yet): for main, a layered branch with changes of its own, and for solo, a plain one.
    let main_stack = root.join("branches/p/main/stack");
    let stack = std::fs::read_to_string(&main_stack).unwrap();
    std::fs::write(&main_stack, format!("00000000000000aa\n{stack}")).unwrap();
    std::fs::create_dir_all(root.join("branches/p/solo")).unwrap();
    std::fs::write(root.join("branches/p/solo/stack"), "00000000000000bb\n").unwrap();

    let s = start(cfg).await;
    assert!(root.join("layers/00000000000000aa/new.txt").exists());
    assert!(root.join("layers/00000000000000bb/s.txt").exists());
    assert!(upper_is_empty(&s, "main") && upper_is_empty(&s, "solo"));
    assert!(is_mount_point(&solo).unwrap());
    tree::assert_same(&work_tree(&main), &main_tree, "main");
    tree::assert_same(
        &work_tree(&s.dir.join("p/feature")),
        &feature_tree,
        "feature",
    );
    tree::assert_same(&work_tree(&solo), &solo_tree, "solo");
    checkpoint(&s, "solo", "still a branch").await;
    git(&solo, &["fsck", "--strict"]);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_in_use_is_copied_not_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    if !layers_available(&cfg) {
        return;
    }
    let s = start(cfg).await;
    let main = setup(&s).await;
    std::fs::remove_dir_all(main.join("node_modules")).unwrap();
    let sleeper = |dir: &Path| {
        Command::new("sleep")
            .arg("60")
            .current_dir(dir)
            .spawn()
            .unwrap()
    };

    // A plain parent that a process works in is not renamed under it.
    let mut busy = sleeper(&main);
    fork(&s, "copied", "main").await;
    assert!(!is_mount_point(&main).unwrap() && !is_mount_point(&s.dir.join("p/copied")).unwrap());
    tree::assert_same(
        &work_tree(&s.dir.join("p/copied")),
        &work_tree(&main),
        "copied",
    );
    busy.kill().unwrap();
    busy.wait().unwrap();

    // Free again: layered.
    fork(&s, "layered", "main").await;
    assert!(is_mount_point(&main).unwrap());

    // A layered parent with changes of its own that a process works in cannot be unmounted,
    // so it is not frozen either.
    std::fs::write(main.join("more.txt"), "more\n").unwrap();
    let mut busy = sleeper(&main);
    fork(&s, "copied2", "main").await;
    assert!(!is_mount_point(&s.dir.join("p/copied2")).unwrap());
    assert!(is_mount_point(&main).unwrap() && !upper_is_empty(&s, "main"));
    tree::assert_same(
        &work_tree(&s.dir.join("p/copied2")),
        &work_tree(&main),
        "copied2",
    );
    busy.kill().unwrap();
    busy.wait().unwrap();
    s.server.shutdown().await;
}
