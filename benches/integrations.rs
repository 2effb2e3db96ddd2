//! Installing all four integrations into an empty branch, against the floor.
//!
//! Run: `cargo bench --bench integrations`. Needs `git` and `cp` on PATH. `BENCH_REPEATS`
//! (default 10) sets the repeats; `INTEGRATIONS_BENCH_DIR` where the scratch space is made
//! (default: the current directory, so the numbers are for the workspace's filesystem).
//!
//! * ours: on a fresh branch made through the library, `Integrations::queue` of the four and
//!   `run_branch` until they are installed: for each, the checkpoint check, the job's
//!   `installing` write and event, rendering the templates and merging package.json in memory,
//!   writing the files (each beside its place, fsynced, renamed in), the commit and the
//!   `integration` version recorded with the job in one transaction. Package installation is
//!   not part of it (the measure).
//! * floor: the same four steps with none of our code: for each integration, `cp -a` of the
//!   tree as it stands after that install (rendered once beforehand) over a fresh repository,
//!   then `git add -A` and `git commit` (the same four commits).
//!
//! The order alternates every repeat. Prints a Markdown table for the README.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use weldr_agent::app::App;
use weldr_agent::branches::BranchKey;
use weldr_agent::config::Config;
use weldr_agent::integrations::Request;

const ALL: [&str; 4] = ["orpc", "tanstack-start", "postgresql", "better-auth"];

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn git(dir: &Path, args: &[&str]) {
    run(Command::new("git")
        .args(["-c", "user.name=b", "-c", "user.email=b@b"])
        .args(args)
        .current_dir(dir));
}

/// One install of all four on a fresh branch: seconds, and the files the tree has after.
async fn ours(app: &Arc<App>, n: usize) -> (f64, usize) {
    let key = BranchKey::new("p", format!("b{n}"));
    app.residency.create_branch(&key, None).await.unwrap();
    let requests = ALL
        .iter()
        .map(|k| Request {
            key: k.to_string(),
            options: None,
        })
        .collect();
    let t = Instant::now();
    app.integrations
        .queue(&key, requests, None, None)
        .await
        .unwrap();
    let installed = app.integrations.run_branch(&key, None).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(installed.len(), 4, "{installed:?}");
    let files = Command::new("git")
        .args(["ls-files"])
        .current_dir(app.base.dir(&key))
        .output()
        .unwrap()
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    (secs, files)
}

/// The floor: four `cp -a` of the staged trees and four commits, into a fresh repository.
fn floor(stages: &[PathBuf], scratch: &Path, n: usize) -> f64 {
    let repo = scratch.join(format!("floor-{n}"));
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "init"]);
    let t = Instant::now();
    for (i, stage) in stages.iter().enumerate() {
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", stage.display()))
            .arg(&repo));
        git(&repo, &["add", "-A"]);
        git(
            &repo,
            &["commit", "-q", "-m", &format!("install {}", ALL[i])],
        );
    }
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&repo).unwrap();
    secs
}

fn main() {
    let repeats = env_num("BENCH_REPEATS", 10);
    let base: PathBuf = std::env::var_os("INTEGRATIONS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let scratch = tempfile::Builder::new()
        .prefix(".bench-integrations-")
        .tempdir_in(&base)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The trees after each install, for the floor (rendered once, untimed).
    let mut stages = Vec::new();
    for i in 1..=ALL.len() {
        let dir = scratch.path().join(format!("stage-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let keys: Vec<String> = ALL[..i].iter().map(|k| k.to_string()).collect();
        weldr_agent::integrations::render_into(
            &dir,
            &keys,
            "p",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .unwrap();
        stages.push(dir);
    }
    let ws = scratch.path().join("ws");
    let app: Arc<App> = App::open(Config::for_workspace(&ws)).unwrap();
    rt.block_on(async {
        weldr_agent::registry::create_project(&app.store, "p", None, None)
            .await
            .unwrap();
        // One untimed warm-up of each.
        ours(&app, 0).await;
    });
    floor(&stages, scratch.path(), 0);
    let (mut o, mut f) = (Vec::new(), Vec::new());
    let mut files = 0;
    for r in 1..=repeats {
        let mut run_ours = || {
            let (secs, n) = rt.block_on(ours(&app, r));
            files = n;
            o.push(secs);
        };
        if r % 2 == 0 {
            run_ours();
            f.push(floor(&stages, scratch.path(), r));
        } else {
            f.push(floor(&stages, scratch.path(), r));
            run_ours();
        }
    }
    let (om, fm) = (median(&o), median(&f));
    println!(
        "\n## Integrations ({} cores, {repeats} repeats, {files} files in the tree after)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| all four into an empty branch, 4 versions | median s | min–max s | ÷ floor | target < 1 s |"
    );
    println!("|---|---:|---:|---:|---|");
    let (olo, ohi) = range(&o);
    let (flo, fhi) = range(&f);
    println!(
        "| ours (`queue` + `run_branch`) | {om:.3} | {olo:.3}–{ohi:.3} | {:.2}× | {} |",
        om / fm,
        if om < 1.0 { "met" } else { "missed" }
    );
    println!(
        "| floor: `cp -a` + `git add -A` + `git commit`, ×4 | {fm:.3} | {flo:.3}–{fhi:.3} | 1.00× | |"
    );
    drop(app);
}
