//! Eviction under pressure: 100 branches on a small real filesystem (a tmpfs mounted for the
//! run; needs root) pushed past `MAX_VOLUME_USAGE_PERCENT` while 16 producers append events to
//! a branch stream. One cleanup pass brings usage back under the target; we time it and
//! compare the appends' latency during the pass with the same producers just before it.
//!
//! The redb store and the object store live on the machine's disk (real fsyncs), the branch
//! directories on the tmpfs. The branches were pushed once before the pressure (as the
//! background syncer does), so a pass is: push (nothing new), verify against the store,
//! delete.
//!
//! Run: `cargo bench --bench eviction` (or `scripts/bench.sh eviction`). Prints Markdown.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use weldr_agent::app::App;
use weldr_agent::branches::BranchKey;
use weldr_agent::config::Config;

const BRANCHES: usize = 100;
const FS_MIB: u64 = 512;
/// Each branch: a git repository plus this many files of this size.
const FILES_PER_BRANCH: usize = 40;
const FILE_BYTES: usize = 80 * 1024;
const PRODUCERS: usize = 16;
const BASELINE: Duration = Duration::from_secs(3);
const RUNS: usize = 3;

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(dir: &Path) -> Option<Mount> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_MIB}m"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Deterministic, incompressible-looking bytes.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Run {
    baseline_p50: f64,
    baseline_p99: f64,
    during_p50: f64,
    during_p99: f64,
    pass_secs: f64,
    before: f64,
    after: f64,
    evicted: usize,
}

async fn producers(
    app: &Arc<App>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Duration>>> {
    (0..PRODUCERS)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let body = serde_json::json!({"payload": "x".repeat(180)});
                while !stop.load(Ordering::Relaxed) {
                    let event = weldr_agent::stream::new_event("text", body.clone()).unwrap();
                    let t = Instant::now();
                    app.store
                        .writer()
                        .append(weldr_storage::StreamKey::new("p", "hot"), vec![event])
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect()
}

async fn measure(app: &Arc<App>, during: impl std::future::Future<Output = ()>) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = producers(app, stop.clone()).await;
    during.await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort();
    lat
}

async fn one_run(mnt: &Path, outside: &Path) -> Run {
    let mut config = Config::for_workspace(mnt);
    config.data_dir = outside.join("data");
    config.object_store_dir = outside.join("objects");
    config.eviction_grace = Duration::ZERO;
    config.eviction_interval = Duration::ZERO;
    let app = Arc::new(App::open(config).unwrap());
    weldr_agent::registry::create_project(&app.store, "p", None, None)
        .await
        .unwrap();
    weldr_agent::registry::register_branch(&app.store, "p", "hot", None)
        .await
        .unwrap();
    for b in 0..BRANCHES {
        let branch = format!("b{b:03}");
        let created = app
            .residency
            .create_branch(&weldr_agent::branches::BranchKey::new("p", &branch), None)
            .await
            .unwrap();
        for f in 0..FILES_PER_BRANCH {
            std::fs::write(
                created.dir.join(format!("f{f}.bin")),
                content((b * 1000 + f) as u64, FILE_BYTES),
            )
            .unwrap();
        }
        weldr_agent::sync::push(&app.config, &BranchKey::new("p", &branch))
            .await
            .unwrap();
    }
    // Past the maximum with a file that is not a branch (logs, caches, a build).
    let usage = app.evictor.usage().unwrap();
    let max = app.config.max_volume_usage_percent as f64 + 2.0;
    let want = (usage.used_bytes + usage.available_bytes) as f64 * max / 100.0;
    let fill = (want - usage.used_bytes as f64).max(0.0) as usize;
    std::fs::write(mnt.join("filler.bin"), content(7, fill)).unwrap();
    let before = app.evictor.usage().unwrap().percent();

    let baseline = measure(&app, tokio::time::sleep(BASELINE)).await;
    let mut pass = None;
    let during = measure(&app, async {
        let t = Instant::now();
        let report = app.evictor.cleanup().await.unwrap();
        pass = Some((t.elapsed(), report));
    })
    .await;
    let (elapsed, report) = pass.unwrap();
    assert_eq!(
        report.status,
        weldr_agent::evict::PassStatus::Success,
        "{:?}",
        report.failed.len()
    );
    let after = app.evictor.usage().unwrap().percent();
    assert!(after <= app.config.target_volume_usage_percent as f64);
    let store = app.store.clone();
    drop(app);
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
    Run {
        baseline_p50: ms(percentile(&baseline, 0.5)),
        baseline_p99: ms(percentile(&baseline, 0.99)),
        during_p50: ms(percentile(&during, 0.5)),
        during_p99: ms(percentile(&during, 0.99)),
        pass_secs: elapsed.as_secs_f64(),
        before,
        after,
        evicted: report.evicted.len(),
    }
}

fn main() {
    weldr_agent::install_crypto_provider();
    let mnt = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(mnt.path()) else {
        println!("\n### Eviction under pressure: skipped (mounting a tmpfs needs root)\n");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let outside = tempfile::tempdir().unwrap();
        // A fresh filesystem per run.
        for entry in std::fs::read_dir(mnt.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
        runs.push(rt.block_on(one_run(mnt.path(), outside.path())));
    }
    let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let ratio: Vec<f64> = runs.iter().map(|r| r.during_p99 / r.baseline_p99).collect();
    println!(
        "\n### Eviction under pressure ({BRANCHES} branches of {:.1} MiB on a {FS_MIB} MiB tmpfs, \
         {PRODUCERS} producers appending; {RUNS} runs)\n\n\
         | | median (min–max) |\n|---|---|\n\
         | usage before the pass (%) | {} |\n\
         | usage after the pass (%) | {} |\n\
         | branches evicted | {} |\n\
         | pass: back under the target (s) | {} |\n\
         | append p50 / p99 before the pass (ms) | {} / {} |\n\
         | append p50 / p99 during the pass (ms) | {} / {} |\n\
         | **append p99 during ÷ before** | **{}** |",
        (FILES_PER_BRANCH * FILE_BYTES) as f64 / (1 << 20) as f64,
        fmt(&col(|r| r.before), 1),
        fmt(&col(|r| r.after), 1),
        fmt(&col(|r| r.evicted as f64), 0),
        fmt(&col(|r| r.pass_secs), 2),
        fmt(&col(|r| r.baseline_p50), 2),
        fmt(&col(|r| r.baseline_p99), 2),
        fmt(&col(|r| r.during_p50), 2),
        fmt(&col(|r| r.during_p99), 2),
        fmt(&ratio, 2),
    );
}
