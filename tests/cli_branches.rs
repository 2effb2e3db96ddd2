//! `weldr-agent branch create` and `scripts/create-branch-dir.sh` as the original script was
//! used: without a server (the CLI opens the store) and with one running (the CLI goes through
//! its control socket), creating, reusing and forking.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/git.rs"]
mod git_cli;

use git_cli::git;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use binary::{BIN, cli, free_port, run_ok, serve, sigkill};

/// `KEY=value` lines of the original script's output.
fn fields(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create(ws: &Path, args: &[&str]) -> (String, PathBuf) {
    let mut cmd = cli(ws);
    cmd.arg("branch").arg("create").args(args);
    let f = fields(&run_ok(&mut cmd));
    (f["STATUS"].clone(), PathBuf::from(&f["BRANCH_DIR"]))
}

#[test]
fn branch_create_without_and_with_a_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    // Forks made by the CLI as root are overlay mounts; they go with the test.
    let _mounts = weldr_agent::branches::layers::DetachOnDrop(ws.to_path_buf());

    // No server: the CLI opens the store itself.
    let (status, main) = create(ws, &["main", "demo"]);
    assert_eq!(status, "created");
    assert_eq!(main, ws.join("demo").join("main"));
    assert_eq!(
        git(&main, &["rev-parse", "--abbrev-ref", "HEAD"]).trim(),
        "main"
    );
    assert_eq!(
        git(&main, &["rev-list", "--count", "HEAD"]).trim(),
        "1",
        "an initial commit"
    );
    let (status, again) = create(ws, &["main", "demo"]);
    assert_eq!(
        (status.as_str(), again.as_path()),
        ("reused", main.as_path())
    );

    // The script is a thin wrapper with the same output.
    let out = Command::new("scripts/create-branch-dir.sh")
        .args(["main", "demo"])
        .env("WELDR_AGENT_BIN", BIN)
        .env("WORKSPACE_BASE", ws)
        .env("WELDR_MODE", "local")
        .env("HOME", ws)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = fields(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(f["STATUS"], "reused");
    assert_eq!(PathBuf::from(&f["BRANCH_DIR"]), main);
    let out = Command::new("scripts/create-branch-dir.sh")
        .arg("only-one")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");

    // A fork carries committed and untracked files; the parent does not see the fork's.
    std::fs::write(main.join("committed.txt"), "c").unwrap();
    git(&main, &["add", "-A"]);
    git(
        &main,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "c",
        ],
    );
    std::fs::write(main.join("untracked.txt"), "u").unwrap();
    let (status, fork) = create(ws, &["feature", "demo", "--from", "main"]);
    assert_eq!(status, "created");
    assert_eq!(
        std::fs::read_to_string(fork.join("committed.txt")).unwrap(),
        "c"
    );
    assert_eq!(
        std::fs::read_to_string(fork.join("untracked.txt")).unwrap(),
        "u"
    );
    std::fs::write(fork.join("only-in-fork.txt"), "f").unwrap();
    assert!(!main.join("only-in-fork.txt").exists());

    // Bad input: a clear error and a non-zero exit, nothing created.
    for args in [
        vec!["../x", "demo"],
        vec!["ok", "de/mo"],
        vec!["ok", "demo", "--from", "missing"],
        vec!["ok", "demo", "--from", "main@notanumber"],
    ] {
        let out = cli(ws)
            .arg("branch")
            .arg("create")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    assert!(!ws.join("demo").join("ok").exists());

    // With the server running the same command goes through its control socket.
    let port = free_port();
    let mut server = serve(ws, port);
    let (status, other) = create(ws, &["other", "demo", "--from", "feature"]);
    assert_eq!(status, "created");
    assert!(other.join("only-in-fork.txt").exists());
    let (status, _) = create(ws, &["main", "demo"]);
    assert_eq!(status, "reused");
    let token = run_ok(cli(ws).args(["token", "create", "--name", "t"]))
        .trim()
        .to_string();
    let listed = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://127.0.0.1:{port}/projects/demo/branches"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for b in ["main", "feature", "other"] {
        assert!(
            listed.contains(&format!("\"{b}\"")),
            "{b} missing: {listed}"
        );
    }
    sigkill(&mut server);
}
