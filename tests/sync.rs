//! Object storage sync against a real S3 (moto): push, incremental push, pull into an empty
//! directory, no-op push, corruption, an interrupted push, the fs backend and the CLI.
//!
//! The S3 endpoint comes from `WELDR_TEST_S3_ENDPOINT` (scripts/test.sh starts moto). Without
//! it, outside CI, each test starts `python3 -m moto.server` on a free port itself; in CI a
//! missing endpoint fails the test.

#[path = "common/git.rs"]
mod git_cli;
#[path = "common/s3.rs"]
mod s3_server;
#[path = "common/tree.rs"]
mod tree;

use git_cli::git;
use s3_server::s3;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use weldr_agent::branches::BranchKey;
use weldr_agent::config::{Config, Secret};
use weldr_agent::sync::{self, PullReport, PushOptions, SyncError, manifest};

fn s3_config(base: &Path, endpoint: &str) -> Config {
    let mut config = Config::for_workspace(base);
    config.s3.endpoint = endpoint.to_string();
    config.s3.region = "auto".into();
    config.s3.access_key_id = Some(Secret("test-key".into()));
    config.s3.secret_access_key = Some(Secret("test-secret".into()));
    config.s3.bucket = None;
    config
}

/// A fresh lowercase project id, so tests sharing one moto never share a bucket.
fn project_id() -> String {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b).unwrap();
    format!("p{}", hex::encode(b))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    v
}

/// Everything in a tree except `node_modules` (excluded): kind, mode, content or link target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    tree::tree(root, &["node_modules"])
}

fn assert_same_tree(a: &Path, b: &Path) {
    assert_same(&tree(a), &tree(b));
}

fn assert_same(ta: &BTreeMap<String, String>, tb: &BTreeMap<String, String>) {
    tree::assert_same(ta, tb, "restore");
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A branch with a real repository, text, binary, big, executable files, a symlink, an empty
/// directory and an excluded `node_modules`.
fn populate(dir: &Path) {
    weldr_agent::git::init_branch(dir, "test").unwrap();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("README.md"), "# hello\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "node_modules/\n").unwrap();
    std::fs::write(dir.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    std::fs::write(dir.join("logo.bin"), random_bytes(5000)).unwrap();
    // Big: its own object, multipart (two 8 MiB-chunk parts).
    std::fs::write(dir.join("big.dat"), random_bytes(9 << 20)).unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    set_mode(&dir.join("run.sh"), 0o644);
    std::os::unix::fs::symlink("README.md", dir.join("readme-link")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::create_dir_all(dir.join("node_modules/pkg")).unwrap();
    std::fs::write(dir.join("node_modules/pkg/index.js"), "x").unwrap();
    for i in 0..50 {
        std::fs::write(dir.join(format!("src/m{i}.rs")), format!("// {i}\n")).unwrap();
    }
    weldr_agent::git::commit_all(dir, "first", "test").unwrap();
}

/// Change, delete and add: text, binary, mode flip, a new symlink, a new empty directory.
fn change(dir: &Path) {
    std::fs::write(dir.join("README.md"), "# hello again\n").unwrap();
    std::fs::remove_file(dir.join("src/lib.rs")).unwrap();
    std::fs::write(dir.join("new.bin"), random_bytes(70_000)).unwrap();
    set_mode(&dir.join("run.sh"), 0o755);
    std::os::unix::fs::symlink("does/not/exist", dir.join("dangling")).unwrap();
    std::fs::create_dir_all(dir.join("empty2/sub")).unwrap();
    // Duplicate content within one push, small and big.
    std::fs::write(dir.join("copy1.txt"), "same\n").unwrap();
    std::fs::write(dir.join("copy2.txt"), "same\n").unwrap();
    std::fs::copy(dir.join("big.dat"), dir.join("big-copy.dat")).unwrap();
    std::fs::remove_dir(dir.join("empty")).unwrap();
    weldr_agent::git::commit_all(dir, "second", "test").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_change_push_pull_noop_and_corruption() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    let config = s3_config(tmp.path(), &s3.endpoint);
    let project = project_id();
    let branch = "main";
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new(&project, branch),
    );

    // Nothing pushed yet: skipped, as the original's bucket_not_found.
    let restore0 = tmp.path().join("restore0");
    match sync::pull_into(&config, &BranchKey::new(&project, branch), None, &restore0)
        .await
        .unwrap()
    {
        PullReport::Skipped { bucket } => {
            assert_eq!(bucket, format!("project-{project}-branch-main"))
        }
        other => panic!("expected skipped, got {other:?}"),
    }

    populate(&dir);
    let first = sync::push(&config, &BranchKey::new(&project, branch))
        .await
        .unwrap();
    assert!(!first.unchanged);
    assert_eq!(first.bucket, format!("project-{project}-branch-main"));
    assert!(first.uploaded_objects >= 2, "{first:?}");

    change(&dir);
    let second = sync::push(&config, &BranchKey::new(&project, branch))
        .await
        .unwrap();
    assert!(!second.unchanged);
    assert_ne!(second.snapshot_id, first.snapshot_id);
    // The 9 MiB file did not change: only a pack with the changed small files (and the
    // git objects) went up.
    assert!(second.uploaded_bytes < 1 << 20, "{second:?}");

    // Pull into an empty directory: byte-identical (modes, links, empty dirs, .git).
    let restore = tmp.path().join("restore");
    let report = sync::pull_into(&config, &BranchKey::new(&project, branch), None, &restore)
        .await
        .unwrap();
    assert!(
        matches!(report, PullReport::Restored { ref snapshot_id, .. } if *snapshot_id == second.snapshot_id)
    );
    assert_same_tree(&restore, &dir);
    let restored = tree(&restore);
    assert!(!restore.join("node_modules").exists());
    assert!(tree(&restore).contains_key("empty2/sub"));
    assert!(tree(&restore).contains_key(".git/HEAD"));
    git(&restore, &["fsck", "--full", "--strict"]);
    assert_eq!(
        git(&restore, &["log", "--format=%s"]).lines().next(),
        Some("second")
    );
    assert!(git(&restore, &["status", "--porcelain"]).trim().is_empty());

    // The first snapshot is still there, by id.
    let restore1 = tmp.path().join("restore1");
    sync::pull_into(
        &config,
        &BranchKey::new(&project, branch),
        Some(&first.snapshot_id),
        &restore1,
    )
    .await
    .unwrap();
    assert!(restore1.join("src/lib.rs").is_file());
    assert!(restore1.join("empty").is_dir());

    // A no-op push uploads nothing and costs at most two requests.
    let third = sync::push(&config, &BranchKey::new(&project, branch))
        .await
        .unwrap();
    assert!(third.unchanged, "{third:?}");
    assert_eq!(third.uploaded_objects, 0);
    assert!(third.requests <= 2, "{third:?}");
    assert_eq!(third.snapshot_id, second.snapshot_id);
    assert!(
        sync::verify(
            &config,
            &BranchKey::new(&project, branch),
            &second.snapshot_id
        )
        .await
        .unwrap()
    );
    std::fs::write(dir.join("README.md"), "drift\n").unwrap();
    assert!(
        !sync::verify(
            &config,
            &BranchKey::new(&project, branch),
            &second.snapshot_id
        )
        .await
        .unwrap()
    );

    // Pulling into the branch directory puts it back and removes files not in the snapshot,
    // but keeps excluded ones.
    std::fs::write(dir.join("stray.txt"), "not in the snapshot").unwrap();
    sync::pull(&config, &BranchKey::new(&project, branch), None)
        .await
        .unwrap();
    // (`git status` above refreshed the restored copy's index, so compare with the tree as
    // restored.)
    assert_same(&tree(&dir), &restored);
    assert!(dir.join("node_modules/pkg/index.js").is_file());

    // Corrupt one pack (same length, different bytes) through the S3 API.
    let m = sync::manifest(&config, &BranchKey::new(&project, branch), None)
        .await
        .unwrap()
        .unwrap();
    let pack = m
        .entries
        .iter()
        .find_map(|e| match e {
            manifest::Entry::File {
                loc: manifest::Loc::Pack { pack, .. },
                path,
                ..
            } if path == "README.md" => Some(pack.clone()),
            _ => None,
        })
        .unwrap();
    let store = sync::Store::open(&config, &project, branch).unwrap();
    let op = store.operator();
    let good = op.read(&manifest::pack_path(&pack)).await.unwrap().to_vec();
    let mut bad = good.clone();
    for b in bad.iter_mut() {
        *b ^= 0x5a;
    }
    op.write(&manifest::pack_path(&pack), bad).await.unwrap();
    let restore2 = tmp.path().join("restore2");
    let err = sync::pull_into(&config, &BranchKey::new(&project, branch), None, &restore2)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Corrupt(_)), "{err}");
    assert!(!restore2.exists() || std::fs::read_dir(&restore2).unwrap().count() == 0);
    // The branch directory is left as it was, not half-restored.
    std::fs::write(dir.join("README.md"), "local edit").unwrap();
    let before = tree(&dir);
    assert!(
        sync::pull(&config, &BranchKey::new(&project, branch), None)
            .await
            .is_err()
    );
    assert_eq!(tree(&dir), before);
    // No staging directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("weldr-pull"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    op.write(&manifest::pack_path(&pack), good).await.unwrap();

    // A missing big object fails loudly too.
    let big = m
        .entries
        .iter()
        .find_map(|e| match e {
            manifest::Entry::File {
                loc: manifest::Loc::Object,
                hash,
                ..
            } => Some(hash.clone()),
            _ => None,
        })
        .unwrap();
    op.delete(&manifest::object_path(&big)).await.unwrap();
    let restore3 = tmp.path().join("restore3");
    let err = sync::pull_into(&config, &BranchKey::new(&project, branch), None, &restore3)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Corrupt(_)), "{err}");
    assert!(!restore3.join("big.dat").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_push_keeps_previous_snapshot_and_next_push_completes() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    let config = s3_config(tmp.path(), &s3.endpoint);
    let project = project_id();
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new(&project, "b1"),
    );
    populate(&dir);
    let first = sync::push(&config, &BranchKey::new(&project, "b1"))
        .await
        .unwrap();
    let first_tree = tree(&dir);

    change(&dir);
    // Enough new content for several uploads: two big files and many small ones.
    std::fs::write(dir.join("big2.dat"), random_bytes(2 << 20)).unwrap();
    std::fs::write(dir.join("big3.dat"), random_bytes(2 << 20)).unwrap();
    let options = PushOptions {
        fail_after_uploads: Some(1),
        ..Default::default()
    };
    let err = sync::push_with(&config, &BranchKey::new(&project, "b1"), &options)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Aborted(_)), "{err}");

    // Content went up, but no manifest: the previous snapshot is still the latest and whole.
    let restore = tmp.path().join("r1");
    match sync::pull_into(&config, &BranchKey::new(&project, "b1"), None, &restore)
        .await
        .unwrap()
    {
        PullReport::Restored { snapshot_id, .. } => assert_eq!(snapshot_id, first.snapshot_id),
        other => panic!("{other:?}"),
    }
    assert_eq!(tree(&restore), first_tree);

    // The next push completes.
    let next = sync::push(&config, &BranchKey::new(&project, "b1"))
        .await
        .unwrap();
    assert!(!next.unchanged);
    let restore2 = tmp.path().join("r2");
    sync::pull_into(&config, &BranchKey::new(&project, "b1"), None, &restore2)
        .await
        .unwrap();
    assert_same_tree(&restore2, &dir);
    git(&restore2, &["fsck", "--full"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bucket_with_prefixes() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = s3_config(tmp.path(), &s3.endpoint);
    let shared = format!("shared-{}", project_id());
    // The shared bucket exists already (created by the operator; moto takes unsigned PUTs).
    let status = reqwest::Client::new()
        .put(format!("{}/{shared}", s3.endpoint))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    config.s3.bucket = Some(shared.clone());
    let project = project_id();
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new(&project, "b"),
    );
    populate(&dir);
    let report = sync::push(&config, &BranchKey::new(&project, "b"))
        .await
        .unwrap();
    assert_eq!(report.bucket, shared);
    let restore = tmp.path().join("r");
    sync::pull_into(&config, &BranchKey::new(&project, "b"), None, &restore)
        .await
        .unwrap();
    assert_same_tree(&restore, &dir);
}

/// A per-branch bucket is created by a SigV4-signed `PUT` in the configured region (with the
/// location constraint a region other than us-east-1 needs), and creating it again is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_branch_buckets_are_created_in_their_region() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    for region in ["us-east-1", "eu-west-1", "auto"] {
        let mut config = s3_config(tmp.path(), &s3.endpoint);
        config.s3.region = region.into();
        let store = sync::store::Store::open(&config, &project_id(), "main").unwrap();
        store.ensure_bucket().await.unwrap();
        store.ensure_bucket().await.unwrap();
        store.put("probe", b"x".to_vec()).await.unwrap();
        assert_eq!(
            store.get("probe").await.unwrap().as_deref(),
            Some(&b"x"[..]),
            "{region}"
        );
        let location = reqwest::Client::new()
            .get(format!("{}/{}?location", s3.endpoint, store.bucket))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if region == "eu-west-1" {
            assert!(location.contains("eu-west-1"), "{location}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_backend_round_trip_in_local_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::for_workspace(tmp.path());
    assert!(config.s3.access_key_id.is_none());
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("proj", "b"),
    );
    populate(&dir);
    let first = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(
        config
            .object_store_dir
            .join("project-proj-branch-b/latest")
            .is_file()
    );
    change(&dir);
    let second = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert_ne!(first.snapshot_id, second.snapshot_id);
    let restore = tmp.path().join("restore");
    sync::pull_into(&config, &BranchKey::new("proj", "b"), None, &restore)
        .await
        .unwrap();
    assert_same_tree(&restore, &dir);
    git(&restore, &["fsck", "--full"]);
    let again = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(again.unchanged && again.requests <= 2, "{again:?}");
}

/// The local index (last snapshot, tree digest, stat cache, cached manifest) only ever saves
/// work: a corrupt or missing index, a stale manifest cache or another machine's push must
/// never turn a changed tree into a "no-op" or lose content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_index_is_only_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::for_workspace(tmp.path());
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("proj", "b"),
    );
    populate(&dir);
    let first = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    let noop = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(noop.unchanged && noop.requests == 1, "{noop:?}");
    assert_eq!(noop.snapshot_id, first.snapshot_id);

    // A corrupt index: the store's manifest is read again, nothing is uploaded, and the index
    // is whole afterwards.
    let index_dir = config.data_dir.join("sync/proj");
    std::fs::write(index_dir.join("b.idx"), b"\xa7\x01garbage").unwrap();
    let relearn = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(
        relearn.unchanged && relearn.uploaded_objects == 0,
        "{relearn:?}"
    );
    assert_eq!(relearn.snapshot_id, first.snapshot_id);
    let noop = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(noop.unchanged && noop.requests == 1, "{noop:?}");

    // A missing manifest cache and a change: the push reads the manifest from the store and
    // still uploads only what changed (the 9 MiB file is not sent again).
    std::fs::remove_file(index_dir.join("b.manifest.json")).unwrap();
    std::fs::write(dir.join("README.md"), "# changed\n").unwrap();
    let changed = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(!changed.unchanged, "{changed:?}");
    assert!(changed.uploaded_bytes < 1 << 20, "{changed:?}");

    // Another machine (its own workspace and index, the same store) pulls, changes and pushes.
    let other_base = tempfile::tempdir().unwrap();
    let mut other = Config::for_workspace(other_base.path());
    other.object_store_dir = config.object_store_dir.clone();
    let other_dir = weldr_agent::branches::branch_dir(
        &other,
        &weldr_agent::branches::BranchKey::new("proj", "b"),
    );
    sync::pull_into(&other, &BranchKey::new("proj", "b"), None, &other_dir)
        .await
        .unwrap();
    let noop = sync::push(&other, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(
        noop.unchanged && noop.requests == 1,
        "a pull leaves a usable index: {noop:?}"
    );
    std::fs::write(other_dir.join("src/other.rs"), "// other\n").unwrap();
    let theirs = sync::push(&other, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(!theirs.unchanged);

    // This machine's tree did not change since its own push, but the store moved on: pushing
    // makes the store hold this tree again.
    let ours = sync::push(&config, &BranchKey::new("proj", "b"))
        .await
        .unwrap();
    assert!(!ours.unchanged, "{ours:?}");
    assert_ne!(ours.snapshot_id, theirs.snapshot_id);
    let restore = tmp.path().join("restore");
    sync::pull_into(&config, &BranchKey::new("proj", "b"), None, &restore)
        .await
        .unwrap();
    assert_same_tree(&restore, &dir);
    assert!(!restore.join("src/other.rs").exists());
}

fn cli(config_base: &Path, envs: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weldr-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WELDR_MODE", "local")
        .env("WORKSPACE_BASE", config_base)
        .env("LOG_LEVEL", "warn")
        .envs(envs.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_push_and_pull_print_the_original_lines() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("ws");
    let project = project_id();
    let envs = [
        ("S3_ENDPOINT", s3.endpoint.as_str()),
        ("S3_ACCESS_KEY_ID", "k"),
        ("S3_SECRET_ACCESS_KEY", "s"),
    ];
    let bucket = format!("BUCKET_NAME=project-{project}-branch-cli");

    let (ok, out) = cli(&base, &envs, &["sync", "pull", &project, "cli"]);
    assert!(ok, "{out}");
    assert!(out.contains("SYNC_STATUS=skipped"), "{out}");
    assert!(out.contains("REASON=bucket_not_found"), "{out}");
    assert!(out.contains(&bucket), "{out}");

    // No branch directory: failed, non-zero.
    let (ok, out) = cli(&base, &envs, &["sync", "push", &project, "cli"]);
    assert!(!ok, "{out}");
    assert!(out.contains("SYNC_STATUS=failed"), "{out}");

    let dir = base.join(&project).join("cli");
    populate(&dir);
    let (ok, out) = cli(&base, &envs, &["sync", "push", &project, "cli"]);
    assert!(ok, "{out}");
    assert!(out.contains("SYNC_STATUS=success"), "{out}");
    assert!(out.contains(&bucket), "{out}");
    let want = tree(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let (ok, out) = cli(&base, &envs, &["sync", "pull", &project, "cli"]);
    assert!(ok, "{out}");
    assert!(out.contains("SYNC_STATUS=success"), "{out}");
    assert_eq!(tree(&dir), want);

    // The original scripts' names, as thin wrappers over the binary.
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    for (script, status) in [
        ("sync-to-s3.sh", "SYNC_STATUS=success"),
        ("sync-from-s3.sh", "SYNC_STATUS=success"),
    ] {
        let out = Command::new(scripts.join(script))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WELDR_AGENT_BIN", env!("CARGO_BIN_EXE_weldr-agent"))
            .env("WELDR_MODE", "local")
            .env("WORKSPACE_BASE", &base)
            .env("LOG_LEVEL", "warn")
            .envs(envs.iter().copied())
            .args(["cli", &project])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{script}: {text}");
        assert!(
            text.contains(status) && text.contains(&bucket),
            "{script}: {text}"
        );
    }
    assert_eq!(tree(&dir), want);

    let (ok, out) = cli(
        &base,
        &envs,
        &["sync", "pull", &project, "cli", "--snapshot", "nope"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("SYNC_STATUS=failed"), "{out}");
}

/// A real `weldr-agent sync push` killed with SIGKILL once some content is stored (but before
/// its manifest): the previous snapshot still restores, and the next push completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_cli_push_leaves_previous_snapshot_whole() {
    let s3 = s3();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("ws");
    let project = project_id();
    let config = s3_config(&base, &s3.endpoint);
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new(&project, "k"),
    );
    populate(&dir);
    let mut first = sync::push(&config, &BranchKey::new(&project, "k"))
        .await
        .unwrap()
        .snapshot_id;
    let mut first_tree = tree(&dir);
    let store = sync::Store::open(&config, &project, "k").unwrap();
    let op = store.operator();
    let mut objects_before = op.list("objects/").await.unwrap().len();

    let mut killed_midway = false;
    for attempt in 0..3 {
        // Plenty of new content: several uploads that take a while against moto.
        for i in 0..12 {
            std::fs::write(
                dir.join(format!("blob-{attempt}-{i}.dat")),
                random_bytes(3 << 20),
            )
            .unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_weldr-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WELDR_MODE", "local")
            .env("WORKSPACE_BASE", &base)
            .env("LOG_LEVEL", "warn")
            .env("S3_ENDPOINT", &s3.endpoint)
            .env("S3_ACCESS_KEY_ID", "test-key")
            .env("S3_SECRET_ACCESS_KEY", "test-secret")
            .args(["sync", "push", &project, "k"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until some new content is stored, then kill.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while op.list("objects/").await.unwrap().len() <= objects_before
            && std::time::Instant::now() < deadline
            && child.try_wait().unwrap().is_none()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let latest = String::from_utf8(op.read("latest").await.unwrap().to_vec()).unwrap();
        if latest.trim() == first {
            killed_midway = true;
            break;
        }
        // The push finished before the kill: take it as the baseline and try again.
        first = latest.trim().to_string();
        first_tree = tree(&dir);
        objects_before = op.list("objects/").await.unwrap().len();
    }
    assert!(killed_midway, "every push completed before SIGKILL");
    assert!(op.list("objects/").await.unwrap().len() > objects_before);

    let restore = tmp.path().join("r1");
    sync::pull_into(&config, &BranchKey::new(&project, "k"), None, &restore)
        .await
        .unwrap();
    assert_same(&tree(&restore), &first_tree);

    let next = sync::push(&config, &BranchKey::new(&project, "k"))
        .await
        .unwrap();
    assert!(!next.unchanged);
    let restore2 = tmp.path().join("r2");
    sync::pull_into(&config, &BranchKey::new(&project, "k"), None, &restore2)
        .await
        .unwrap();
    assert_same_tree(&restore2, &dir);
}

/// A push never moves `latest` to a tree whose history does not contain the snapshot it would
/// replace: a fresh machine's empty branch of the same id (or a stale copy) is refused, with
/// nothing written, and both stay; a tree restored from the snapshot, or one that built on it,
/// pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_never_hides_work_its_history_does_not_contain() {
    let s3 = s3();
    let project = project_id();
    let key = BranchKey::new(&project, "main");
    let (a_base, b_base) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        s3_config(a_base.path(), &s3.endpoint),
        s3_config(b_base.path(), &s3.endpoint),
    );
    let a_dir = weldr_agent::branches::branch_dir(&a, &key);
    populate(&a_dir);
    let first = sync::push(&a, &key).await.unwrap();

    // Machine B lost everything and started the branch again, empty.
    let b_dir = weldr_agent::branches::branch_dir(&b, &key);
    weldr_agent::git::init_branch(&b_dir, "test").unwrap();
    std::fs::write(b_dir.join("fresh.txt"), "fresh start\n").unwrap();
    weldr_agent::git::commit_all(&b_dir, "fresh", "test").unwrap();
    let refused = sync::push(&b, &key).await.unwrap_err();
    assert!(matches!(refused, SyncError::Diverged(_)), "{refused}");
    assert!(
        refused.to_string().contains(&first.snapshot_id),
        "{refused}"
    );
    // Nothing moved: A's snapshot is still the latest, and A's next push is a no-op.
    let again = sync::push(&a, &key).await.unwrap();
    assert!(again.unchanged, "{again:?}");
    assert_eq!(again.snapshot_id, first.snapshot_id);

    // B restores from the snapshot, builds on it and pushes: that descends, so it goes.
    std::fs::remove_dir_all(&b_dir).unwrap();
    sync::pull_into(&b, &key, None, &b_dir).await.unwrap();
    std::fs::write(b_dir.join("from-b.txt"), "b's work\n").unwrap();
    weldr_agent::git::commit_all(&b_dir, "b's work", "test").unwrap();
    let theirs = sync::push(&b, &key).await.unwrap();
    assert!(!theirs.unchanged);

    // A has not seen B's commit; its own new commit does not contain it: refused, B's work
    // stays the latest.
    std::fs::write(a_dir.join("from-a.txt"), "a's work\n").unwrap();
    weldr_agent::git::commit_all(&a_dir, "a's work", "test").unwrap();
    let refused = sync::push(&a, &key).await.unwrap_err();
    assert!(matches!(refused, SyncError::Diverged(_)), "{refused}");
    let restore = a_base.path().join("check");
    sync::pull_into(&a, &key, None, &restore).await.unwrap();
    assert!(restore.join("from-b.txt").exists());
    assert!(!restore.join("from-a.txt").exists());
    let log = git(&restore, &["log", "--format=%s"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["b's work", "first", "Initial commit"]
    );
}

/// A machine whose store does not know a branch that object storage holds (it lost its
/// volume) restores it on `branch create` instead of starting it empty: the files, the whole
/// git history, and versions rebuilt from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_machine_restores_a_branch_object_storage_holds() {
    use weldr_storage::model::{self, VersionKind};
    let s3 = s3();
    let project = project_id();
    let key = BranchKey::new(&project, "feat");
    let (a_base, b_base) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let a = weldr_agent::App::open(s3_config(a_base.path(), &s3.endpoint)).unwrap();
    weldr_agent::branches::registry::create_project(&a.store, &project, None, None)
        .await
        .unwrap();
    let made = a.residency.create_branch(&key, None).await.unwrap();
    assert!(made.created);
    for (file, message) in [("a.txt", "add a"), ("b.txt", "add b")] {
        std::fs::write(made.dir.join(file), file).unwrap();
        a.branches
            .commit_version(&key, message, None, VersionKind::Checkpoint, None)
            .await
            .unwrap()
            .unwrap();
    }
    sync::push(&a.config, &key).await.unwrap();
    a.store.close();

    // Machine B: an empty volume, the same bucket.
    let b = weldr_agent::App::open(s3_config(b_base.path(), &s3.endpoint)).unwrap();
    weldr_agent::branches::registry::create_project(&b.store, &project, None, None)
        .await
        .unwrap();
    let back = b.residency.create_branch(&key, None).await.unwrap();
    assert!(!back.created && back.adopted);
    assert_eq!(
        std::fs::read_to_string(back.dir.join("b.txt")).unwrap(),
        "b.txt"
    );
    let log = git(&back.dir, &["log", "--format=%s"]);
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["add b", "add a", "Initial commit"]
    );
    let (p, br) = (project.clone(), "feat".to_string());
    let (branch, versions) = b
        .base
        .read(move |rtx| {
            Ok((
                model::get_branch(rtx, &p, &br)?.unwrap(),
                model::list_versions(rtx, &p, &br)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(branch.state, model::BranchState::Active);
    assert_eq!(branch.head_version, Some(3));
    let messages: Vec<&str> = versions.iter().map(|v| v.message.as_str()).collect();
    assert_eq!(messages, ["Initial commit", "add a", "add b"]);
    assert_eq!(versions[2].changed[0].path, "b.txt");
    // A second create finds it here.
    let again = b.residency.create_branch(&key, None).await.unwrap();
    assert!(!again.created && !again.adopted);
    // A branch object storage does not hold starts empty, as before.
    let new = b
        .residency
        .create_branch(&BranchKey::new(&project, "other"), None)
        .await
        .unwrap();
    assert!(new.created);
}

/// A fresh machine finds the branches object storage holds: recorded as evicted (listed, the
/// project registered), restored with their history and versions on first use. Per-branch
/// buckets on S3, and the fs store of local mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_machine_finds_every_branch_in_object_storage() {
    use weldr_storage::model::{self, BranchState, VersionKind};
    let s3 = s3();
    let fs_objects = tempfile::tempdir().unwrap();
    for on_s3 in [true, false] {
        let project = project_id();
        let (a_base, b_base) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = |base: &Path| {
            if on_s3 {
                s3_config(base, &s3.endpoint)
            } else {
                let mut c = Config::for_workspace(base);
                c.object_store_dir = fs_objects.path().to_path_buf();
                c
            }
        };
        let a = weldr_agent::App::open(config(a_base.path())).unwrap();
        weldr_agent::branches::registry::create_project(&a.store, &project, None, None)
            .await
            .unwrap();
        for b in ["d1", "d2"] {
            let key = BranchKey::new(&project, b);
            let made = a.residency.create_branch(&key, None).await.unwrap();
            std::fs::write(made.dir.join("f.txt"), b).unwrap();
            a.branches
                .commit_version(
                    &key,
                    &format!("work on {b}"),
                    None,
                    VersionKind::Checkpoint,
                    None,
                )
                .await
                .unwrap();
            sync::push(&a.config, &key).await.unwrap();
        }
        a.store.close();

        let b = weldr_agent::App::open(config(b_base.path())).unwrap();
        let added = b.residency.adopt_discovered().await.unwrap();
        assert!(added >= 2, "s3 {on_s3}: {added}");
        let p = project.clone();
        let listed = b
            .base
            .read(move |rtx| model::list_branches(rtx, &p))
            .await
            .unwrap();
        let names: Vec<(&str, BranchState)> = listed
            .iter()
            .map(|r| (r.branch_id.as_str(), r.state))
            .collect();
        assert_eq!(
            names,
            [("d1", BranchState::Evicted), ("d2", BranchState::Evicted)],
            "s3 {on_s3}"
        );
        let back = b
            .residency
            .ensure_present(&BranchKey::new(&project, "d2"))
            .await
            .unwrap();
        assert_eq!(back.state, BranchState::Active);
        assert_eq!(back.head_version, Some(2));
        let dir = weldr_agent::branches::branch_dir(&b.config, &BranchKey::new(&project, "d2"));
        assert_eq!(std::fs::read_to_string(dir.join("f.txt")).unwrap(), "d2");
        let (p, br) = (project.clone(), "d2".to_string());
        let versions = b
            .base
            .read(move |rtx| model::list_versions(rtx, &p, &br))
            .await
            .unwrap();
        let messages: Vec<&str> = versions.iter().map(|v| v.message.as_str()).collect();
        assert_eq!(messages, ["Initial commit", "work on d2"]);
        // Nothing new the second time.
        let p = project.clone();
        let before = b
            .base
            .read(move |rtx| model::list_branches(rtx, &p))
            .await
            .unwrap()
            .len();
        b.residency.adopt_discovered().await.unwrap();
        let p = project.clone();
        let after = b
            .base
            .read(move |rtx| model::list_branches(rtx, &p))
            .await
            .unwrap()
            .len();
        assert_eq!(before, after);
    }
}
