//! Process isolation for everything the agent runs: `run_command`, the project build, and every
//! later process it starts.
//!
//! The model reads untrusted text (the repository, dependencies, the web), so its commands are
//! treated as hostile. They run under [bubblewrap](https://github.com/containers/bubblewrap)
//! (Debian's `bubblewrap`), a maintained, setuid-free sandbox built on the kernel's namespaces:
//!
//! - **Who**: when the server is root, the command runs as a dedicated unprivileged uid
//!   (`SANDBOX_UID`) that owns the branch directory's files; otherwise as the server's user. In
//!   both cases it has no capabilities, `no_new_privs` set, and cannot create further user
//!   namespaces.
//! - **What it sees**: a fresh mount namespace holding the branch directory (read-write, at its
//!   real path), a private `/tmp` (a size-capped tmpfs, also `$HOME`), a minimal `/dev`, its own
//!   `/proc`, and the system read-only (`/usr`, `/etc` minus password hashes and private keys,
//!   `/opt`). Nothing else exists there: not the data directory, the control socket, the object
//!   store, other branches, the workspace base or the server's home.
//! - **Which processes**: its own PID namespace, so `/proc` lists only the command's processes;
//!   the server's environment (`/proc/$PPID/environ`) and other branches' processes cannot be
//!   named, let alone signalled.
//! - **How long**: bubblewrap runs with `--die-with-parent` and the server sets the parent-death
//!   signal on bubblewrap itself. Killing bubblewrap (timeout, cancel) or the server (SIGKILL
//!   included) kills the namespace's first process, and the kernel then kills every process in
//!   the PID namespace, however it detached (`setsid`, double fork).
//! - **Limits**: wall time and output size (the caller's), per-process data memory
//!   (`RLIMIT_DATA`, `SANDBOX_MEMORY_MB`), processes (`RLIMIT_NPROC` of the dedicated uid,
//!   `SANDBOX_MAX_PROCESSES`), no core dumps. The network stays on by default (installs need the
//!   registry); `SANDBOX_NETWORK=off` gives the command a network namespace with only loopback.
//!
//! Where bubblewrap cannot run (not installed, a kernel without unprivileged user namespaces),
//! commands fail with a message that says so, unless the operator sets `SANDBOX=off`; `/health`
//! and the startup log show the state either way.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use tokio::process::Command;

/// The sandbox program.
pub const BWRAP: &str = "bwrap";

/// Files under `/etc` that hold secrets of the machine: hidden (an unreadable empty file or an
/// empty directory) inside the sandbox.
const ETC_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/security/opasswd",
    "/etc/machine-id",
];

pub use crate::config::{SandboxMode, SandboxSettings};

/// Why a command could not be sandboxed. The text is what the model and the operator read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "commands cannot run: the sandbox is unavailable ({0}). Install bubblewrap (`apt-get install bubblewrap`) on a kernel with user namespaces, or set SANDBOX=off to run commands unconfined"
    )]
    Unavailable(String),
    #[error(
        "commands cannot run: the sandbox user (uid {uid}) cannot reach {dir}: {reason}. Give the workspace's parent directories the execute bit for others (e.g. `chmod o+x`), or keep WORKSPACE_BASE elsewhere"
    )]
    Unreachable {
        uid: u32,
        dir: String,
        reason: String,
    },
    #[error("could not prepare the branch directory for the sandbox: {0}")]
    Prepare(String),
}

/// What `/health` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxStatus {
    /// `bwrap`, `off` or `unavailable`.
    pub mode: &'static str,
    pub network: bool,
    /// The uid commands run as (None: the server's own).
    pub uid: Option<u32>,
    /// Why commands cannot run (mode `unavailable`).
    pub reason: Option<String>,
}

/// The isolation every agent process goes through.
#[derive(Debug)]
pub struct Sandbox {
    settings: SandboxSettings,
    /// Whether bubblewrap works here, found out once.
    probe: OnceLock<Result<(), String>>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new(SandboxSettings::default())
    }
}

impl Sandbox {
    pub fn new(settings: SandboxSettings) -> Self {
        Self {
            settings,
            probe: OnceLock::new(),
        }
    }

    /// Whether commands run unconfined (`SANDBOX=off`).
    pub fn is_off(&self) -> bool {
        self.settings.mode == SandboxMode::Off
    }

    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// The uid commands run as when it is not the server's: the dedicated one, when the server
    /// is root and the sandbox is on.
    pub fn dedicated_uid(&self) -> Option<u32> {
        let root = rustix::process::geteuid().is_root();
        (root && self.settings.mode == SandboxMode::Bwrap).then_some(self.settings.uid)
    }

    /// Whether commands can run confined; the first call runs bubblewrap once to find out.
    pub fn check(&self) -> Result<(), SandboxError> {
        if self.settings.mode == SandboxMode::Off {
            return Ok(());
        }
        self.probe
            .get_or_init(|| self.run_probe())
            .clone()
            .map_err(SandboxError::Unavailable)
    }

    /// The state for `/health` and the startup log (probes on first use).
    pub fn status(&self) -> SandboxStatus {
        let (mode, reason) = match self.settings.mode {
            SandboxMode::Off => ("off", None),
            SandboxMode::Bwrap => match self.check() {
                Ok(()) => ("bwrap", None),
                Err(SandboxError::Unavailable(reason)) => ("unavailable", Some(reason)),
                Err(e) => ("unavailable", Some(e.to_string())),
            },
        };
        SandboxStatus {
            mode,
            network: self.settings.network || self.settings.mode == SandboxMode::Off,
            uid: self.dedicated_uid(),
            reason,
        }
    }

    fn run_probe(&self) -> Result<(), String> {
        let mut cmd = std::process::Command::new(&self.settings.program);
        cmd.args(self.bwrap_args(None))
            .args(["--", "true"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let confine = self.confinement();
        // SAFETY: see `Confinement::apply`: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || confine.apply());
        }
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err("bubblewrap (`bwrap`) is not installed".into())
            }
            Err(e) => Err(format!("bwrap could not start: {e}")),
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "bwrap failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// A command that runs `sh -c script` in the branch directory `dir`, confined; the caller
    /// sets up its output and spawns it. Blocking work (handing the directory's files to the
    /// sandbox uid) runs on a blocking thread.
    ///
    /// Kill the returned command's process to end everything it started: with the sandbox on,
    /// every descendant lives in its PID namespace and dies with it.
    pub async fn shell(&self, dir: &Path, script: &str) -> Result<Command, SandboxError> {
        if self.settings.mode == SandboxMode::Off {
            return Ok(self.unconfined(dir, script));
        }
        self.check()?;
        let dir = dir.to_path_buf();
        if let Some(uid) = self.dedicated_uid() {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                reachable_by(&d, uid)?;
                hand_over(&d, uid).map_err(|e| SandboxError::Prepare(e.to_string()))
            })
            .await
            .map_err(|e| SandboxError::Prepare(e.to_string()))??;
        }
        let mut cmd = Command::new(&self.settings.program);
        cmd.args(self.bwrap_args(Some(&dir)))
            .arg("--")
            .args(["sh", "-c", script])
            .current_dir("/")
            .env_clear()
            .process_group(0)
            .kill_on_drop(true);
        let confine = self.confinement();
        // SAFETY: see `Confinement::apply`.
        unsafe {
            cmd.pre_exec(move || confine.apply());
        }
        Ok(cmd)
    }

    /// `SANDBOX=off`: the command runs as the server, in its own process group, with only the
    /// scrubbed environment between it and the machine.
    fn unconfined(&self, dir: &Path, script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .current_dir(dir)
            .env_clear()
            .envs(sandbox_env(None))
            .process_group(0)
            .kill_on_drop(true);
        let confine = Confinement {
            uid: None,
            memory_bytes: None,
            max_processes: None,
            server: server_pid(),
        };
        // SAFETY: see `Confinement::apply`.
        unsafe {
            cmd.pre_exec(move || confine.apply());
        }
        cmd
    }

    fn confinement(&self) -> Confinement {
        let uid = self.dedicated_uid();
        Confinement {
            uid,
            memory_bytes: Some(self.settings.memory_mb.saturating_mul(1 << 20)),
            max_processes: uid.map(|_| self.settings.max_processes),
            server: server_pid(),
        }
    }

    /// bubblewrap's arguments up to the command: the namespaces, the file system the command
    /// sees, and its environment. `dir` is the branch directory (None: the start-up probe).
    fn bwrap_args(&self, dir: Option<&Path>) -> Vec<OsString> {
        let mut a = Args::default();
        a.push(["--unshare-all", "--unshare-user", "--disable-userns"]);
        if self.settings.network {
            a.push(["--share-net"]);
        }
        a.push(["--die-with-parent", "--new-session"]);
        a.push(["--hostname", "weldr-sandbox"]);
        // The system, read-only. On merged-/usr systems /bin, /lib, ... are symlinks into /usr.
        a.push(["--ro-bind", "/usr", "/usr"]);
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::read_link(top) {
                Ok(target) => {
                    a.push(["--symlink"]);
                    a.push_path(&target);
                    a.push([top]);
                }
                Err(_) if Path::new(top).is_dir() => a.push(["--ro-bind", top, top]),
                Err(_) => {}
            }
        }
        a.push(["--ro-bind-try", "/opt", "/opt"]);
        a.push(["--ro-bind", "/etc", "/etc"]);
        for secret in ETC_SECRETS {
            match std::fs::symlink_metadata(secret) {
                Ok(m) if m.is_dir() => a.push(["--tmpfs", secret, "--remount-ro", secret]),
                Ok(_) => a.push(["--ro-bind", "/dev/null", secret]),
                Err(_) => {}
            }
        }
        // A resolv.conf that points into /run (systemd-resolved): bind the file it names.
        if let Ok(target) = std::fs::canonicalize("/etc/resolv.conf")
            && !target.starts_with("/etc")
            && target.is_file()
        {
            a.push(["--ro-bind"]);
            a.push_path(&target);
            a.push_path(&target);
        }
        a.push(["--dev", "/dev", "--proc", "/proc"]);
        let tmp_bytes = self.settings.tmp_mb.max(1).saturating_mul(1 << 20);
        a.push(["--size"]);
        a.push([tmp_bytes.to_string().as_str()]);
        a.push([
            "--tmpfs",
            "/tmp",
            "--dir",
            "/var",
            "--symlink",
            "../tmp",
            "/var/tmp",
        ]);
        match dir {
            Some(dir) => {
                a.push(["--bind"]);
                a.push_path(dir);
                a.push_path(dir);
                a.push(["--chdir"]);
                a.push_path(dir);
            }
            None => a.push(["--chdir", "/"]),
        }
        a.push(["--clearenv"]);
        for (k, v) in sandbox_env(Some("/tmp")) {
            a.push(["--setenv"]);
            a.0.push(k);
            a.0.push(v);
        }
        a.0
    }
}

/// Get the workspace ready for sandboxed commands whenever the store is opened. When they run
/// as the dedicated uid: the workspace base lets that uid pass (it must reach the branch
/// directories to bind them; it still cannot list the base), and the server's own libgit2
/// accepts repositories owned by that uid (it never takes a repository's word on where its
/// work tree is or which hooks to run: see [`crate::git`]).
pub fn prepare_workspace(sandbox: &Sandbox, workspace_base: &Path) {
    if sandbox.dedicated_uid().is_some() {
        // SAFETY: a libgit2 option set at start-up, before any repository is opened here.
        let _ = unsafe { git2::opts::set_verify_owner_validation(false) };
        if let Ok(m) = std::fs::metadata(workspace_base)
            && m.mode() & 0o001 == 0
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = (m.mode() & 0o7777) | 0o001;
            if let Err(e) =
                std::fs::set_permissions(workspace_base, std::fs::Permissions::from_mode(mode))
            {
                tracing::warn!(
                    "could not let the sandbox uid pass {}: {e}",
                    workspace_base.display()
                );
            }
        }
    }
}

/// Log how commands will run (the server at start-up; this runs bubblewrap once to find out).
pub fn log_status(sandbox: &Sandbox) {
    match sandbox.status() {
        SandboxStatus { mode: "off", .. } => tracing::warn!(
            "SANDBOX=off: the agent's commands run unconfined, as the server's user, and can read its secrets"
        ),
        SandboxStatus {
            reason: Some(reason),
            ..
        } => tracing::error!(
            "the agent's commands cannot run: the sandbox is unavailable ({reason}); install bubblewrap or set SANDBOX=off"
        ),
        status => tracing::info!(
            uid = ?status.uid,
            network = status.network,
            "the agent's commands run in a bubblewrap sandbox"
        ),
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<const N: usize>(&mut self, items: [&str; N]) {
        self.0.extend(items.iter().map(OsString::from));
    }
    fn push_path(&mut self, p: &Path) {
        self.0.push(p.as_os_str().to_owned());
    }
}

/// The only environment a command gets: none of the server's secrets (API keys, database URLs,
/// S3 credentials, the auth secret) can reach it. `home` is its `$HOME` (None: the server's).
fn sandbox_env(home: Option<&str>) -> Vec<(OsString, OsString)> {
    let mut env = Vec::new();
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.push(("PATH".into(), path));
    for key in ["LANG", "TERM"] {
        if let Some(v) = std::env::var_os(key) {
            env.push((key.into(), v));
        }
    }
    match home {
        Some(home) => {
            env.push(("HOME".into(), home.into()));
            env.push(("TMPDIR".into(), "/tmp".into()));
        }
        None => {
            if let Some(v) = std::env::var_os("HOME") {
                env.push(("HOME".into(), v));
            }
        }
    }
    env.push(("CI".into(), "true".into()));
    env
}

/// The variables a command's environment is built from (besides `HOME`, `TMPDIR` and `CI`).
pub const ENV_ALLOWLIST: &[&str] = &["PATH", "LANG", "TERM"];

fn server_pid() -> libc::pid_t {
    libc::pid_t::try_from(std::process::id()).unwrap_or(0)
}

/// What the child does between fork and exec.
#[derive(Debug, Clone, Copy)]
struct Confinement {
    /// Switch to this uid and gid (the server is root).
    uid: Option<u32>,
    memory_bytes: Option<u64>,
    max_processes: Option<u64>,
    /// The server's pid: a child whose parent is already gone does not run.
    server: libc::pid_t,
}

impl Confinement {
    /// Runs in the child between fork and exec, so it only makes async-signal-safe system
    /// calls (no allocation, no locks).
    fn apply(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on values owned by this frame.
        unsafe {
            let limit = |resource, value: u64| {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                check(libc::setrlimit(resource, &lim))
            };
            limit(libc::RLIMIT_CORE, 0)?;
            if let Some(bytes) = self.memory_bytes {
                limit(libc::RLIMIT_DATA, bytes)?;
            }
            if let Some(n) = self.max_processes {
                limit(libc::RLIMIT_NPROC, n)?;
            }
            if let Some(uid) = self.uid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(uid, uid, uid))?;
                check(libc::setresuid(uid, uid, uid))?;
            }
            // After the uid change, which clears it. bubblewrap passes it on with
            // --die-with-parent, so the whole sandbox dies with the server.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != self.server {
                return Err(std::io::Error::other("the server exited"));
            }
        }
        Ok(())
    }
}

/// Whether `uid` can walk down to `dir` (bubblewrap binds the directory by its path, as that
/// uid): every ancestor must let it pass.
fn reachable_by(dir: &Path, uid: u32) -> Result<(), SandboxError> {
    let unreachable = |reason: String| SandboxError::Unreachable {
        uid,
        dir: dir.display().to_string(),
        reason,
    };
    let mut cur = PathBuf::new();
    let ancestors: Vec<_> = dir.components().collect();
    for c in &ancestors[..ancestors.len().saturating_sub(1)] {
        cur.push(c);
        let m =
            std::fs::metadata(&cur).map_err(|e| unreachable(format!("{}: {e}", cur.display())))?;
        let mode = m.mode();
        let passes = if m.uid() == uid {
            mode & 0o100 != 0
        } else if m.gid() == uid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !passes {
            return Err(unreachable(format!(
                "{} (mode {:o}) does not let others pass",
                cur.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Give every file of the branch directory to `uid` (the server is root and commands run as
/// `uid`): what the server wrote since the last command (tool writes, checkouts, restores,
/// git's objects) becomes writable for the command. The walk goes by directory descriptors
/// opened without following links, and changes each name itself (`fchownat` without
/// following), so a command that swaps a directory for a symlink meanwhile cannot make it
/// touch anything outside the branch; other file systems mounted below are not entered.
/// Files already owned are only looked at, so an overlay branch's shared layers are not
/// copied up.
pub fn hand_over(dir: &Path, uid: u32) -> std::io::Result<()> {
    use crate::fsx::Dir;
    let root = Dir::open(dir)?;
    let top = root.stat_self()?;
    if top.uid != uid || top.gid != uid {
        root.chown(uid, uid)?;
    }
    hand_over_below(&root, top.dev, uid, 0)
}

/// Deeper than this, a tree is left as it is (no real project nests so deep).
const HAND_OVER_DEPTH: usize = 256;

fn hand_over_below(dir: &crate::fsx::Dir, dev: u64, uid: u32, depth: usize) -> std::io::Result<()> {
    use crate::fsx::Kind;
    use std::io::ErrorKind;
    // Gone or swapped meanwhile: nothing of ours to hand over there.
    let vanished = |e: &std::io::Error| {
        e.kind() == ErrorKind::NotFound
            || matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
    };
    for name in dir.names()? {
        let Some(st) = dir.stat(&name)? else {
            continue;
        };
        if (st.uid != uid || st.gid != uid)
            && let Err(e) = dir.chown_name(&name, uid, uid)
            && !vanished(&e)
        {
            return Err(e);
        }
        if st.kind == Kind::Dir && st.dev == dev && depth < HAND_OVER_DEPTH {
            match dir.dir(&name) {
                Ok(sub) => hand_over_below(&sub, dev, uid, depth + 1)?,
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_holds_no_server_variable() {
        let env = sandbox_env(Some("/tmp"));
        let keys: Vec<_> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for k in &keys {
            assert!(
                ENV_ALLOWLIST.contains(&k.as_str())
                    || ["HOME", "TMPDIR", "CI"].contains(&k.as_str()),
                "{k}"
            );
        }
    }

    #[test]
    fn hand_over_never_follows_a_link_out() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let branch = tempfile::tempdir().unwrap();
        std::fs::create_dir(branch.path().join("src")).unwrap();
        std::fs::write(branch.path().join("src/a.rs"), "a").unwrap();
        std::os::unix::fs::symlink(outside.path(), branch.path().join("out")).unwrap();
        hand_over(branch.path(), 61000).unwrap();
        use std::os::unix::fs::MetadataExt;
        let owner = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
        assert_eq!(owner(&branch.path().join("src/a.rs")), 61000);
        assert_eq!(owner(&branch.path().join("out")), 61000, "the link itself");
        assert_eq!(owner(outside.path()), 0);
        assert_eq!(owner(&outside.path().join("secret")), 0);
    }

    #[test]
    fn secrets_under_etc_are_hidden() {
        let sb = Sandbox::default();
        let args: Vec<String> = sb
            .bwrap_args(None)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if Path::new("/etc/shadow").exists() {
            let i = args.iter().position(|a| a == "/etc/shadow").unwrap();
            assert_eq!(args[i - 1], "/dev/null");
        }
        assert!(args.contains(&"--unshare-all".to_string()));
        assert!(args.contains(&"--die-with-parent".to_string()));
    }
}
