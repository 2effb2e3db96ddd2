//! Forking a branch workspace against the usual ways of getting a second copy of a repository.
//!
//! Run: `cargo bench --bench fork`. Needs `git`, `cp` and `du` on PATH.
//!
//! Builds one real branch through the library (project `p`, branch `main`): 20,000 files,
//! about 300 MB (mostly small text files in nested directories, a few medium ones, a handful of
//! incompressible binaries), committed as a version. `FORK_BENCH_FILES` and `FORK_BENCH_MB`
//! make it smaller for quick runs; `BENCH_REPEATS` (default 5) sets the repeats;
//! `FORK_BENCH_DIR` the directory the scratch space is made in (default: the current
//! directory, so the numbers are for the workspace's filesystem, not a tmpfs).
//!
//! Then, interleaved (the order rotates every repeat), each repeat makes a new tree with:
//!
//! * ours: `Residency::create_branch(.., Some(ForkFrom { branch_id: "main", version: None }))`,
//!   timed until it returns (a usable, isolated tree with its index, `git status` clean). As
//!   root with overlayfs this is a layered fork (`main` frozen into a layer, both mounted over
//!   it; one untimed fork before the repeats does the first freeze, so that every timed fork
//!   finds the same `main`); otherwise the copying fork;
//! * the other tools work on `peer-src`, a plain `cp -a` of the same tree made once beforehand
//!   (`git clone --local` cannot hard-link out of an overlay mount);
//! * `cp -a src dst`;
//! * `git worktree add -b <new> dst` run in the source repository;
//! * `git clone --local src dst`.
//!
//! For each: time (median, min–max) and the extra disk the new tree takes, from
//! `du -s --block-size=1 src dst` (du counts a hard-linked inode once, so the second line is
//! what `dst` does not share with `src`; for a layered fork, du of its own upper and work
//! directories), and from the filesystem's free space (statvfs, after
//! `sync`) as a cross-check that also sees reflinks. Forks are deleted between repeats.
//! Prints Markdown tables for the README, a breakdown of where our fork's time goes, and
//! whether the filesystem supports reflinks.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use weldr_agent::app::App;
use weldr_agent::branches::{self, BranchKey, ForkFrom};
use weldr_agent::config::Config;
use weldr_storage::model::VersionKind;

/// Write the tree: `files` files totalling about `total` bytes. Returns (files, bytes, dirs).
fn generate(root: &Path, files: usize, total: u64) -> (usize, u64, usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // A handful of incompressible binaries take 25% of the bytes.
    let binaries = 6.min(files / 10).max(1);
    let binary_bytes = total / 4;
    // The rest: log-uniform sizes from 100 B to 256 KiB, scaled to the remaining budget.
    let texts = files - binaries;
    let raw: Vec<f64> = (0..texts)
        .map(|_| {
            let u = rng.below(1_000_000) as f64 / 1_000_000.0;
            (100f64.ln() + u * ((256.0 * 1024.0f64).ln() - 100f64.ln())).exp()
        })
        .collect();
    let raw_sum: f64 = raw.iter().sum();
    let scale = (total - binary_bytes) as f64 / raw_sum;
    let mut dirs = std::collections::BTreeSet::new();
    let mut written = 0u64;
    let dir_for = |i: usize| -> PathBuf {
        // About 20 files per directory, 1 to 4 levels deep.
        let leaf = i / 20;
        let mut p = PathBuf::from(["src", "lib", "web", "docs", "tests"][leaf % 5]);
        let depth = 1 + (leaf / 5) % 4;
        let mut n = leaf;
        for level in 0..depth {
            p.push(format!("m{}_{}", level, n % 7));
            n /= 7;
        }
        p.push(format!("d{leaf}"));
        p
    };
    for (i, r) in raw.iter().enumerate() {
        let size = ((r * scale) as usize).max(16);
        let dir = dir_for(i);
        let ext = ["rs", "ts", "md", "json", "txt"][i % 5];
        let path = root.join(&dir).join(format!("f{i}.{ext}"));
        if dirs.insert(dir.clone()) {
            std::fs::create_dir_all(root.join(&dir)).unwrap();
        }
        let data = text(&mut rng, size, i);
        written += data.len() as u64;
        std::fs::write(&path, data).unwrap();
    }
    let bin_dir = root.join("assets");
    std::fs::create_dir_all(&bin_dir).unwrap();
    dirs.insert(PathBuf::from("assets"));
    let each = binary_bytes / binaries as u64;
    let mut buf = vec![0u8; each as usize];
    for b in 0..binaries {
        rng.fill(&mut buf);
        std::fs::write(bin_dir.join(format!("blob{b}.bin")), &buf).unwrap();
        written += each;
    }
    (files, written, dirs.len())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn git(dir: &Path, args: &[&str]) -> String {
    // Our branches' files belong to the sandbox uid when the bench runs as root.
    let out = Command::new("git")
        .args(["-c", "safe.directory=*"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git must be installed");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes of `dst` not shared by hard link with `src`.
fn extra_du(src: &Path, dst: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(src)
        .arg(dst)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Free bytes on the filesystem holding `path`, after flushing dirty data.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs");
    st.f_bavail as u64 * st.f_frsize as u64
}

fn reflink_supported(dir: &Path) -> bool {
    let a = dir.join("reflink-probe-a");
    let b = dir.join("reflink-probe-b");
    std::fs::write(&a, vec![7u8; 64 * 1024]).unwrap();
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(&a)
        .arg(&b)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

fn fs_type(dir: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Ours,
    CpA,
    Worktree,
    Clone,
}

const METHODS: [Method; 4] = [Method::Ours, Method::Worktree, Method::CpA, Method::Clone];

fn name(m: Method) -> &'static str {
    match m {
        Method::Ours => "**weldr fork** (`create_branch` from `main`)",
        Method::CpA => "`cp -a src dst`",
        Method::Worktree => "`git worktree add -b new dst`",
        Method::Clone => "`git clone --local src dst`",
    }
}

#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    du: Vec<f64>,
    df: Vec<f64>,
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

fn main() {
    let files = env_num("FORK_BENCH_FILES", 20_000).max(20);
    let total_mb = env_num("FORK_BENCH_MB", 300).max(1);
    let repeats = env_num("BENCH_REPEATS", 5).max(1);
    let base = std::env::var_os("FORK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap());
    let scratch = tempfile::Builder::new()
        .prefix(".bench-fork-")
        .tempdir_in(&base)
        .unwrap();
    let root = scratch.path().to_path_buf();
    let _mounts = weldr_agent::branches::layers::DetachOnDrop(root.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let fs = fs_type(&root);
    let reflink = reflink_supported(&root);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "scratch {} ({fs}, reflink {}), {cpus} CPUs",
        root.display(),
        if reflink { "yes" } else { "no" }
    );

    let ws = root.join("ws");
    let others = root.join("others");
    std::fs::create_dir_all(&others).unwrap();
    let app: Arc<App> = App::open(Config::for_workspace(&ws)).unwrap();
    let (src, gen_s, commit_s, n_dirs, bytes) = rt.block_on(async {
        weldr_agent::registry::create_project(&app.store, "p", None, None)
            .await
            .unwrap();
        let main = app
            .residency
            .create_branch(&BranchKey::new("p", "main"), None)
            .await
            .unwrap();
        let t = Instant::now();
        let (_, bytes, n_dirs) = generate(&main.dir, files, total_mb as u64 * 1_000_000);
        let gen_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        app.branches
            .commit_version(
                &BranchKey::new("p", "main"),
                "bench tree",
                None,
                VersionKind::Checkpoint,
                None,
            )
            .await
            .unwrap()
            .expect("a version");
        (main.dir, gen_s, t.elapsed().as_secs_f64(), n_dirs, bytes)
    });
    let src_du = dir_size(&src);
    let git_du = dir_size(&src.join(".git"));
    eprintln!(
        "source: {files} files in {n_dirs} directories, {:.1} MB of content, {:.1} MB on disk \
         ({:.1} MB of it .git); written in {gen_s:.1} s, committed in {commit_s:.1} s",
        mb(bytes as f64),
        mb(src_du as f64),
        mb(git_du as f64)
    );
    // The other tools get a plain copy of the same tree (made once, untimed): a layered branch
    // is an overlay mount, and `git clone --local` cannot hard-link out of one (EXDEV).
    let peer_src = root.join("peer-src");
    run(Command::new("cp").arg("-a").arg(&src).arg(&peer_src));
    // One fork before the timed ones: with layers it freezes `main` into a layer, so that every
    // timed fork finds `main` as it will be from then on.
    let config = app.config.clone();
    let warm = rt
        .block_on(app.residency.create_branch(
            &BranchKey::new("p", "warm"),
            Some(ForkFrom {
                branch_id: "main".into(),
                version: None,
            }),
        ))
        .unwrap();
    let layered = weldr_agent::branches::layers::is_mount_point(&warm.dir).unwrap();
    branches::layers::remove_branch_dir(&config, &BranchKey::new("p", "warm"), &warm.dir).unwrap();
    eprintln!(
        "fork mode: {}",
        if layered {
            "layers (overlayfs)"
        } else {
            "copy"
        }
    );
    // Warm the page cache for everyone alike.
    for dir in [&src, &peer_src] {
        run(Command::new("git")
            .args(["-c", "safe.directory=*"])
            .arg("-C")
            .arg(dir)
            .args(["status", "--porcelain"]));
    }

    let mut samples: Vec<Samples> = METHODS.iter().map(|_| Samples::default()).collect();
    let mut checked = false;
    for rep in 0..repeats {
        for k in 0..METHODS.len() {
            let idx = (k + rep) % METHODS.len();
            let method = METHODS[idx];
            let dst = others.join(format!("t{rep}-{idx}"));
            let free_before = free_bytes(&root);
            let t = Instant::now();
            let dst = match method {
                Method::Ours => {
                    let created = rt
                        .block_on(app.residency.create_branch(
                            &BranchKey::new("p", format!("fork{rep}")),
                            Some(ForkFrom {
                                branch_id: "main".into(),
                                version: None,
                            }),
                        ))
                        .unwrap();
                    created.dir
                }
                Method::CpA => {
                    run(Command::new("cp").arg("-a").arg(&peer_src).arg(&dst));
                    dst
                }
                Method::Worktree => {
                    run(Command::new("git")
                        .arg("-C")
                        .arg(&peer_src)
                        .args(["worktree", "add", "-q", "-b", &format!("wt{rep}")])
                        .arg(&dst));
                    dst
                }
                Method::Clone => {
                    run(Command::new("git")
                        .args(["clone", "-q", "--local"])
                        .arg(&peer_src)
                        .arg(&dst));
                    dst
                }
            };
            let elapsed = t.elapsed();
            let free_after = free_bytes(&root);
            let s = &mut samples[idx];
            s.ms.push(ms(elapsed));
            // A layered fork's own disk is its state directory (upper, work, stack); du of the
            // mount would count the shared layers under another device id.
            let own = ws
                .join(".weldr-layers/branches/p")
                .join(format!("fork{rep}"));
            s.du.push(if method == Method::Ours && own.exists() {
                dir_size(&own) as f64
            } else {
                extra_du(&peer_src, &dst) as f64
            });
            s.df.push(free_before.saturating_sub(free_after) as f64);

            if method == Method::Ours && !checked {
                checked = true;
                check_isolated(&src, &dst);
            }
            // Clean up before the next one so the disk does not fill.
            if method == Method::Ours {
                branches::layers::remove_branch_dir(
                    &config,
                    &BranchKey::new("p", format!("fork{rep}")),
                    &dst,
                )
                .unwrap();
            } else {
                std::fs::remove_dir_all(&dst).unwrap();
            }
            if method == Method::Worktree {
                git(&peer_src, &["worktree", "prune"]);
                git(&peer_src, &["branch", "-q", "-D", &format!("wt{rep}")]);
            }
            eprintln!(
                "repeat {}/{repeats}: {:<40} {:>9.1} ms",
                rep + 1,
                name(method),
                ms(elapsed)
            );
        }
    }

    let breakdown = breakdown(&src, &root, repeats);

    let ours = median(&samples[0].ms);
    println!(
        "### Forking a branch: {files} files, {:.0} MB ({n_dirs} directories, {:.0} MB on disk with .git)\n",
        mb(bytes as f64),
        mb(src_du as f64)
    );
    println!(
        "Filesystem: {fs}, reflink (`cp --reflink=always`): {}. Fork mode: {}. {cpus} CPUs. \
         {repeats} repeats, interleaved; median (min–max).\n",
        if reflink {
            "supported"
        } else {
            "not supported"
        },
        if layered {
            "copy-on-write layers (overlayfs)"
        } else {
            "copy"
        }
    );
    println!(
        "| Method | Time, ms | ÷ ours | Extra disk (du, hard links counted once), MB | Extra disk (free-space Δ), MB |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (i, m) in METHODS.iter().enumerate() {
        let s = &samples[i];
        let ratio = median(&s.ms) / ours;
        let du: Vec<f64> = s.du.iter().map(|b| mb(*b)).collect();
        let df: Vec<f64> = s.df.iter().map(|b| mb(*b)).collect();
        println!(
            "| {} | {} | {} | {} | {} |",
            name(*m),
            fmt(&s.ms, 0),
            if *m == Method::Ours {
                "1.0×".to_string()
            } else {
                format!("{ratio:.1}×")
            },
            fmt(&du, 1),
            fmt(&df, 1),
        );
    }
    println!(
        "\nThe free-space column is noisy on a shared disk (other writers); du is exact for hard \
         links but counts reflinked files in full."
    );
    println!(
        "\n#### The copying fork's steps (`FORK_MODE=copy`, or where overlayfs cannot be mounted; same tree, {repeats} repeats)\n"
    );
    println!("| Step | Time, ms |");
    println!("|---|---:|");
    for (label, v) in &breakdown {
        println!("| {label} | {} |", fmt(v, 0));
    }
    drop(app);
}

/// Write, modify and delete in the fork; the source must not see any of it, and its git state
/// must be clean at the start.
fn check_isolated(src: &Path, fork: &Path) {
    assert_eq!(
        git(fork, &["status", "--porcelain"]),
        "",
        "a fresh fork is clean"
    );
    let victim = find_file(fork).expect("a file");
    let rel = victim.strip_prefix(fork).unwrap().to_path_buf();
    let before = std::fs::read(src.join(&rel)).unwrap();
    std::fs::write(fork.join("new-in-fork.txt"), b"only here").unwrap();
    std::fs::write(&victim, b"changed in the fork").unwrap();
    assert!(!src.join("new-in-fork.txt").exists(), "new file leaked");
    assert_eq!(
        std::fs::read(src.join(&rel)).unwrap(),
        before,
        "modification leaked"
    );
    assert_eq!(git(src, &["status", "--porcelain"]), "", "source touched");
    eprintln!("isolation: ok (new file and in-place modification stay in the fork)");
}

fn find_file(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        if e.file_name() == ".git" {
            continue;
        }
        let p = e.path();
        if p.is_file() {
            return Some(p);
        }
        if p.is_dir()
            && let Some(f) = find_file(&p)
        {
            return Some(f);
        }
    }
    None
}

/// Our fork's steps on their own: hard-linking the objects, copying the work tree, copying the
/// index, and (for comparison) checking the tree out from git instead of copying it.
fn breakdown(src: &Path, root: &Path, repeats: usize) -> Vec<(&'static str, Vec<f64>)> {
    use weldr_agent::git::copy;
    let excludes = weldr_agent::excludes::Excludes::for_dir(src);
    let mut link = Vec::new();
    let mut wt = Vec::new();
    let mut index = Vec::new();
    for rep in 0..repeats {
        let dst = root.join(format!("breakdown{rep}"));
        let t = Instant::now();
        copy::link_tree(&src.join(".git/objects"), &dst.join(".git/objects")).unwrap();
        link.push(ms(t.elapsed()));
        let t = Instant::now();
        copy::copy_worktree(src, &dst, &excludes).unwrap();
        wt.push(ms(t.elapsed()));
        let t = Instant::now();
        std::fs::copy(src.join(".git/index"), dst.join(".git/index")).unwrap();
        index.push(ms(t.elapsed()));
        std::fs::remove_dir_all(&dst).unwrap();
    }
    vec![
        ("hard-link `.git/objects`", link),
        ("copy the work tree (reflink or parallel copy)", wt),
        ("copy `.git/index`", index),
    ]
}
