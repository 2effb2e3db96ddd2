//! Restores from a bucket someone else wrote: tampered snapshots (links planted where a restore
//! writes, a link at an excluded path and a directory through it, a `.git/config` that moves
//! git's work tree, colliding paths, a swap that fails half-way) never touch anything outside
//! the branch, and a refused or failed restore leaves the branch byte-identical.
//!
//! The snapshots are written into the fs object store the way `src/sync` writes them (packs,
//! manifest, `latest`). Overlay mounts and tmpfs need root: without it those tests say so and
//! skip, except under `CI=true`, where they fail.

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
use weldr_agent::branches::layers::Layers;
use weldr_agent::config::Config;
use weldr_agent::sync::manifest::{self, Entry, Loc, Manifest};
use weldr_agent::sync::{self, PullReport, Store, SyncError};

/// One entry of a crafted snapshot.
enum Item<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Link(&'a str, &'a str),
}

/// Write a snapshot of `items` (in the given order) into the branch's store and point
/// `latest` at it, as a push would: one pack with every file's content.
async fn publish(config: &Config, p: &str, b: &str, id: &str, items: &[Item<'_>]) {
    let store = Store::open(config, p, b).unwrap();
    store.ensure_bucket().await.unwrap();
    let mut pack = Vec::new();
    let mut entries = Vec::new();
    let mut files = Vec::new();
    for item in items {
        match item {
            Item::Dir(path, mode) => entries.push(Entry::Dir {
                path: path.to_string(),
                mode: *mode,
            }),
            Item::Link(path, target) => entries.push(Entry::Symlink {
                path: path.to_string(),
                target: target.to_string(),
            }),
            Item::File(path, mode, data) => {
                files.push(entries.len());
                entries.push(Entry::File {
                    path: path.to_string(),
                    mode: *mode,
                    size: data.len() as u64,
                    hash: manifest::hash_bytes(data),
                    loc: Loc::Pack {
                        pack: String::new(),
                        offset: pack.len() as u64,
                    },
                });
                pack.extend_from_slice(data);
            }
        }
    }
    let name = manifest::hash_bytes(&pack);
    for i in files {
        if let Entry::File {
            loc: Loc::Pack { pack: p, .. },
            ..
        } = &mut entries[i]
        {
            *p = name.clone();
        }
    }
    store.put(&manifest::pack_path(&name), pack).await.unwrap();
    write_manifest(&store, id, entries).await;
}

async fn write_manifest(store: &Store, id: &str, entries: Vec<Entry>) {
    let m = Manifest {
        version: manifest::MANIFEST_VERSION,
        id: id.to_string(),
        created_at_ms: 0,
        head: None,
        entries,
    };
    store
        .put(
            &manifest::manifest_path(id),
            serde_json::to_vec(&m).unwrap(),
        )
        .await
        .unwrap();
    store.put("latest", id.as_bytes().to_vec()).await.unwrap();
}

/// A directory outside every branch, with a file in it: what an attack would change.
struct Outside {
    dir: PathBuf,
}

impl Outside {
    fn new(base: &Path) -> Self {
        let dir = base.join("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("victim"), "keep me\n").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::set_permissions(dir.join("victim"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        Self { dir }
    }

    /// The whole directory, its own mode included.
    fn state(&self) -> (u32, BTreeMap<String, String>) {
        let mode = std::fs::symlink_metadata(&self.dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        (mode, tree::tree(&self.dir, &[]))
    }
}

/// The branch directory as a listing with hashes (staging directories would show).
fn listing(dir: &Path) -> BTreeMap<String, String> {
    tree::tree(dir, &[])
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test that needs root (mounts) can run; panics under CI=true when it cannot.
fn root_available(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {what} needs root"
    );
    eprintln!("SKIPPED: {what} needs root");
    false
}

async fn checkpoint(s: &TestServer, b: &str, message: &str) -> String {
    let (status, body) = s
        .post_json(
            &format!("/projects/p/branches/{b}/versions"),
            json!({ "message": message }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["versionId"].as_str().unwrap().to_string()
}

async fn project_with_branch(s: &TestServer, b: &str) -> PathBuf {
    let (status, _) = s.post_json("/projects", json!({ "projectId": "p" })).await;
    assert_eq!(status, 201);
    let (status, body) = s
        .post_json("/projects/p/branches", json!({ "branchId": b }))
        .await;
    assert_eq!(status, 201, "{body}");
    s.dir.join("p").join(b)
}

/// Snapshot 1 holds `x.log -> /outside` (x.log is excluded, so a cleanup pass keeps it);
/// snapshot 2 holds a directory `x.log/` with a file and mode 0777. Neither may write through
/// the link: the first restores the link out of the branch as a plain file, and a link the
/// agent itself planted there is replaced, never followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_at_an_excluded_path_is_never_written_through() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let outside = Outside::new(tmp.path());
    let before = outside.state();
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    let out = outside.dir.to_str().unwrap();

    publish(
        &config,
        "p",
        "b",
        "s1",
        &[Item::File("a.txt", 0o644, b"a\n"), Item::Link("x.log", out)],
    )
    .await;
    sync::pull(&config, &BranchKey::new("p", "b"), None)
        .await
        .unwrap();
    let meta = std::fs::symlink_metadata(dir.join("x.log")).unwrap();
    assert!(
        meta.is_file(),
        "a link out of the branch is restored as a plain file"
    );
    assert_eq!(std::fs::read_to_string(dir.join("x.log")).unwrap(), out);
    assert_eq!(outside.state(), before);

    // The agent plants the link itself; the next snapshot has a directory there.
    std::fs::remove_file(dir.join("x.log")).unwrap();
    std::os::unix::fs::symlink(&outside.dir, dir.join("x.log")).unwrap();
    publish(
        &config,
        "p",
        "b",
        "s2",
        &[
            Item::File("a.txt", 0o644, b"a\n"),
            Item::Dir("x.log", 0o777),
            Item::File("x.log/victim", 0o777, b"pwned\n"),
        ],
    )
    .await;
    sync::pull(&config, &BranchKey::new("p", "b"), None)
        .await
        .unwrap();
    assert_eq!(
        outside.state(),
        before,
        "the restore wrote outside the branch"
    );
    let meta = std::fs::symlink_metadata(dir.join("x.log")).unwrap();
    assert!(meta.is_dir() && !meta.file_type().is_symlink());
    assert_eq!(
        std::fs::read_to_string(dir.join("x.log/victim")).unwrap(),
        "pwned\n"
    );
}

/// Into a layered branch (an overlay mount) the old restore's rename failed with EXDEV and its
/// copy fallback wrote to `.NAME.weldr-pull`, where the same snapshot had planted a link out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_at_the_old_copy_fallback_name_in_a_layered_branch_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    std::fs::create_dir_all(&config.workspace_base).unwrap();
    if !Layers::new(&config).available() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: overlayfs cannot be mounted (needs root and overlayfs)"
        );
        eprintln!("SKIPPED: overlayfs cannot be mounted here (needs root)");
        return;
    }
    let outside = Outside::new(tmp.path());
    let before = outside.state();
    let s = start(config.clone()).await;
    let main = project_with_branch(&s, "main").await;
    std::fs::write(main.join("a.txt"), "alpha\n").unwrap();
    checkpoint(&s, "main", "base").await;
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({ "branchId": "feature", "fromBranchId": "main" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let feature = s.dir.join("p/feature");
    assert!(weldr_agent::branches::layers::is_mount_point(&feature).unwrap());

    let victim = outside.dir.join("victim");
    publish(
        &config,
        "p",
        "feature",
        "s1",
        &[
            Item::Link(".a.txt.weldr-pull", victim.to_str().unwrap()),
            Item::File("a.txt", 0o644, b"evil\n"),
            Item::Link("rel", "a.txt"),
        ],
    )
    .await;
    let report = sync::pull(&config, &BranchKey::new("p", "feature"), None)
        .await
        .unwrap();
    assert!(matches!(report, PullReport::Restored { .. }), "{report:?}");
    assert_eq!(
        outside.state(),
        before,
        "the restore wrote outside the branch"
    );
    assert_eq!(
        std::fs::read_to_string(feature.join("a.txt")).unwrap(),
        "evil\n"
    );
    // A link inside the branch stays a link.
    assert_eq!(
        std::fs::read_link(feature.join("rel")).unwrap(),
        Path::new("a.txt")
    );
    assert!(
        std::fs::symlink_metadata(feature.join(".a.txt.weldr-pull"))
            .unwrap()
            .is_file()
    );
    // The parent, under the same frozen layer, did not change either.
    assert_eq!(
        std::fs::read_to_string(main.join("a.txt")).unwrap(),
        "alpha\n"
    );
    s.stop().await;
}

/// A snapshot whose `.git/config` sets `core.worktree` (and an include, and a hook path) is
/// restored without them, and the server's git then commits and reverts only the branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_config_that_moves_the_work_tree_is_stripped_on_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let outside = Outside::new(tmp.path());
    let before = outside.state();
    let s = start(config.clone()).await;
    let dir = project_with_branch(&s, "main").await;
    std::fs::write(dir.join("a.txt"), "alpha\n").unwrap();
    let v1 = checkpoint(&s, "main", "v1").await;
    sync::push(&config, &BranchKey::new("p", "main"))
        .await
        .unwrap();

    // Tamper: the same tree with a `.git/config` that redirects git.
    let m = sync::manifest(&config, &BranchKey::new("p", "main"), None)
        .await
        .unwrap()
        .unwrap();
    let evil = format!(
        "[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tworktree = {}\n\
         \thooksPath = {}\n[include]\n\tpath = /dev/zero\n",
        outside.dir.display(),
        outside.dir.display()
    );
    let store = Store::open(&config, "p", "main").unwrap();
    let pack = manifest::hash_bytes(evil.as_bytes());
    store
        .put(&manifest::pack_path(&pack), evil.clone().into_bytes())
        .await
        .unwrap();
    let entries = m
        .entries
        .into_iter()
        .map(|e| match e {
            Entry::File { path, mode, .. } if path == ".git/config" => Entry::File {
                path,
                mode,
                size: evil.len() as u64,
                hash: manifest::hash_bytes(evil.as_bytes()),
                loc: Loc::Pack {
                    pack: pack.clone(),
                    offset: 0,
                },
            },
            other => other,
        })
        .collect();
    write_manifest(&store, "tampered", entries).await;
    std::fs::write(dir.join("a.txt"), "changed\n").unwrap();
    sync::pull(&config, &BranchKey::new("p", "main"), None)
        .await
        .unwrap();
    let restored = std::fs::read_to_string(dir.join(".git/config")).unwrap();
    for gone in ["worktree", "hooksPath", "/dev/zero", "outside"] {
        assert!(!restored.contains(gone), "{gone} restored: {restored}");
    }
    assert!(restored.contains("bare = false"), "{restored}");
    assert_eq!(
        std::fs::read_to_string(dir.join("a.txt")).unwrap(),
        "alpha\n"
    );

    // The server's git works in the branch only: a version, then a revert.
    std::fs::write(dir.join("b.txt"), "bravo\n").unwrap();
    checkpoint(&s, "main", "v2").await;
    let files = git(&dir, &["ls-tree", "-r", "--name-only", "HEAD"]);
    assert_eq!(files.lines().collect::<Vec<_>>(), ["a.txt", "b.txt"]);
    let (status, body) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": v1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!dir.join("b.txt").exists());
    assert_eq!(
        outside.state(),
        before,
        "git touched files outside the branch"
    );
    s.stop().await;
}

/// The same `core.worktree` written by an agent command (`git config core.worktree ...`):
/// the server's git still commits and reverts the branch directory, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_git_ignores_a_work_tree_set_by_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let outside = Outside::new(tmp.path());
    let before = outside.state();
    let s = start(config).await;
    let dir = project_with_branch(&s, "main").await;
    std::fs::write(dir.join("a.txt"), "alpha\n").unwrap();
    let v1 = checkpoint(&s, "main", "v1").await;
    git(
        &dir,
        &["config", "core.worktree", outside.dir.to_str().unwrap()],
    );
    git(&dir, &["config", "core.fsmonitor", "echo"]);
    std::fs::write(dir.join("b.txt"), "bravo\n").unwrap();
    checkpoint(&s, "main", "v2").await;
    let config_text = std::fs::read_to_string(dir.join(".git/config")).unwrap();
    assert!(
        !config_text.contains("worktree") && !config_text.contains("fsmonitor"),
        "{config_text}"
    );
    let files = git(&dir, &["ls-tree", "-r", "--name-only", "HEAD"]);
    assert_eq!(files.lines().collect::<Vec<_>>(), ["a.txt", "b.txt"]);
    let (status, body) = s
        .post_json(
            "/revert",
            json!({ "projectId": "p", "branchId": "main", "versionId": v1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!dir.join("b.txt").exists() && dir.join("a.txt").exists());
    assert_eq!(
        outside.state(),
        before,
        "git touched files outside the branch"
    );
    s.stop().await;
}

/// Manifests that cannot describe a tree (one path a file and a directory's parent, a path
/// under a link, empty or dot components, a NUL in a link target, a reserved name) are
/// refused before anything changes: the branch stays byte-identical, files not in the
/// snapshot included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_manifests_are_refused_and_the_branch_is_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let outside = Outside::new(tmp.path());
    let before_outside = outside.state();
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("a.txt"), "local\n").unwrap();
    std::fs::write(dir.join("stray.txt"), "not in any snapshot\n").unwrap();
    std::fs::write(dir.join("src/lib.rs"), "fn f() {}\n").unwrap();
    let before = listing(&dir);
    let out = outside.dir.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<Item>)> = vec![
        (
            "a file that is also a directory's parent",
            vec![
                Item::File("a", 0o644, b"x"),
                Item::Dir("a", 0o755),
                Item::File("a/b", 0o644, b"y"),
            ],
        ),
        (
            "a file as a parent",
            vec![Item::File("a", 0o644, b"x"), Item::File("a/b", 0o644, b"y")],
        ),
        (
            "an entry under a link",
            vec![
                Item::Link("l", &out),
                Item::File("l/victim", 0o644, b"pwned"),
            ],
        ),
        (
            "an empty component",
            vec![
                Item::Dir("a", 0o755),
                Item::File("a//b", 0o644, b"y"),
                Item::File("z", 0o644, b"z"),
            ],
        ),
        (
            "a dot component",
            vec![Item::Dir("a", 0o755), Item::File("a/./b", 0o644, b"y")],
        ),
        (
            "a parent component",
            vec![Item::File("../escape", 0o644, b"y")],
        ),
        (
            "an absolute path",
            vec![Item::File("/tmp/escape", 0o644, b"y")],
        ),
        (
            "a NUL in a link target",
            vec![Item::File("a.txt", 0o644, b"x"), Item::Link("z", "a\0b")],
        ),
        (
            "the restore's own staging name",
            vec![Item::File(".weldr-restore-0", 0o644, b"x")],
        ),
    ];
    for (i, (what, items)) in cases.iter().enumerate() {
        publish(&config, "p", "b", &format!("bad{i}"), items).await;
        let err = sync::pull(&config, &BranchKey::new("p", "b"), None)
            .await
            .expect_err(what);
        assert!(matches!(err, SyncError::Corrupt(_)), "{what}: {err}");
        assert_eq!(listing(&dir), before, "{what}: the branch changed");
        assert_eq!(outside.state(), before_outside, "{what}");
    }
}

/// A swap that fails half-way (a directory the snapshot drops is a mount point, which cannot
/// be moved) is undone: files already moved out come back, byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_fails_half_way_is_undone() {
    if !root_available("mounting a tmpfs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::create_dir_all(dir.join("keep/mnt")).unwrap();
    std::fs::create_dir_all(dir.join("gone/deep")).unwrap();
    std::fs::write(dir.join("a.txt"), "local\n").unwrap();
    std::fs::write(dir.join("stray.txt"), "not in the snapshot\n").unwrap();
    std::fs::write(dir.join("gone/deep/f"), "f\n").unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
    std::fs::set_permissions(dir.join("keep"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let mnt = dir.join("keep/mnt");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs at {}", mnt.display());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    std::fs::write(mnt.join("in-mount"), "m\n").unwrap();
    let before = listing(&dir);

    publish(
        &config,
        "p",
        "b",
        "s1",
        &[
            Item::File("a.txt", 0o600, b"from the snapshot\n"),
            Item::Dir("keep", 0o755),
            Item::File("keep/new", 0o644, b"new\n"),
            Item::File("new.txt", 0o644, b"new\n"),
        ],
    )
    .await;
    let err = sync::pull(&config, &BranchKey::new("p", "b"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Io(_)), "{err}");
    assert!(err.to_string().contains("as it was"), "{err}");
    assert_eq!(listing(&dir), before, "a failed swap changed the branch");
}

/// Objects bigger than the agent ever writes are refused with a clear error, before the
/// branch changes: here a `latest` pointer of 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_objects_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config(tmp.path());
    let dir = weldr_agent::branches::branch_dir(
        &config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "local\n").unwrap();
    let before = listing(&dir);
    publish(&config, "p", "b", "s1", &[Item::File("a.txt", 0o644, b"x")]).await;
    let store = Store::open(&config, "p", "b").unwrap();
    store.put("latest", vec![b'a'; 64 << 10]).await.unwrap();
    let err = sync::pull(&config, &BranchKey::new("p", "b"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("bigger than"), "{err}");
    assert_eq!(listing(&dir), before);
}
