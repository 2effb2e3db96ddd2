//! `weldr-agent branch create <projectId> <branchId>` and `scripts/create-branch-dir.sh
//! <branchId> <projectId>` as the original script was used: without a server (the CLI opens
//! the store) and with one running (the CLI goes through its control socket), creating,
//! reusing and forking; a failed command registers nothing. And `token list`.

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
    let (status, main) = create(ws, &["demo", "main"]);
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
    let (status, again) = create(ws, &["demo", "main"]);
    assert_eq!(
        (status.as_str(), again.as_path()),
        ("reused", main.as_path())
    );

    // The script is a thin wrapper with the same output, in the original's argument order.
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
    let (status, fork) = create(ws, &["demo", "feature", "--from", "main"]);
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
        vec!["demo", "../x"],
        vec!["de/mo", "ok"],
        vec!["demo", "ok", "--from", "missing"],
        vec!["demo", "ok", "--from", "main@notanumber"],
        vec!["fresh", "ok", "--from", "main"],
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
    assert!(!ws.join("fresh").exists());
    // Nothing was registered either: the project of the failed fork can be created now.
    let out = run_ok(cli(ws).args(["project", "create", "fresh"]));
    assert_eq!(fields(&out)["PROJECT_ID"], "fresh");

    // With the server running the same command goes through its control socket.
    let port = free_port();
    let mut server = serve(ws, port);
    let (status, other) = create(ws, &["demo", "other", "--from", "feature"]);
    assert_eq!(status, "created");
    assert!(other.join("only-in-fork.txt").exists());
    let (status, _) = create(ws, &["demo", "main"]);
    assert_eq!(status, "reused");
    let out = cli(ws)
        .args(["branch", "create", "later", "ok", "--from", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("project_not_found"),
        "{out:?}"
    );
    let out = run_ok(cli(ws).args(["project", "create", "later"]));
    assert_eq!(fields(&out)["PROJECT_ID"], "later");
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

#[test]
fn token_list_shows_utc_times_and_says_when_there_are_none() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let out = run_ok(cli(ws).args(["token", "list"]));
    assert!(out.contains("no tokens"), "{out}");
    run_ok(cli(ws).args(["token", "create", "--name", "laptop"]));
    let out = run_ok(cli(ws).args(["token", "list"]));
    let line = out
        .lines()
        .find(|l| l.ends_with("laptop"))
        .unwrap_or_else(|| panic!("{out}"));
    // `<id>  2026-12-04T20:56:32Z  laptop`
    let created = line.split_whitespace().nth(1).unwrap();
    assert_eq!(created.len(), 20, "{line}");
    assert!(
        created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "{line}"
    );
    let year: u32 = created[..4].parse().unwrap();
    assert!(year >= 2024, "{line}");
}
