//! The system `git`, for checking what the server made (`git fsck`, logs, revisions).
//!
//! Test files with `mod common;` get it from there; others use
//! `#[path = "common/git.rs"] mod git_cli;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Run `git -C dir args...`; its standard output. Panics with git's message when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    // The branch's files belong to the sandbox uid once a command ran there; git refuses such
    // a repository for root unless told it is safe.
    let out = Command::new("git")
        .args(["-c", "safe.directory=*"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("the tests need the system git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
