//! run_command: `sh -c` in the branch directory, in its own process group, with a timeout that
//! kills the whole group, an output cap, and an environment built from an allowlist (the
//! server's secrets — API keys, database URLs, S3 credentials — never reach it).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{Done, ToolError, Workspace};

pub const DEFAULT_TIMEOUT_SECS: u64 = 120;
pub const MAX_TIMEOUT_SECS: u64 = 600;
/// Most bytes of combined stdout and stderr returned.
pub const OUTPUT_CAP_BYTES: usize = 64 * 1024;
/// The only variables taken from the server's environment.
pub const ENV_ALLOWLIST: &[&str] = &["PATH", "HOME", "LANG", "TERM"];
/// How long to wait for the output pipes after the process group was killed (a process that
/// left the group may still hold them).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommandInput {
    pub command: String,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// Combined output, capped; counts what was dropped.
#[derive(Default)]
struct Output {
    buf: Vec<u8>,
    dropped: usize,
}

async fn pump(mut r: impl AsyncRead + Unpin, out: Arc<Mutex<Output>>) {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                let room = OUTPUT_CAP_BYTES.saturating_sub(o.buf.len());
                let take = room.min(n);
                o.buf.extend_from_slice(&chunk[..take]);
                o.dropped += n - take;
            }
        }
    }
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid
        && let Ok(pid) = libc::pid_t::try_from(pid)
        && pid > 0
    {
        // SAFETY: killpg has no memory-safety preconditions; a stale group gives ESRCH.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
}

pub async fn run_command(ws: &Workspace, args: RunCommandInput) -> Result<Done, ToolError> {
    if args.command.trim().is_empty() {
        return Err(ToolError::Invalid("command is empty".into()));
    }
    if args.command.contains('\0') {
        return Err(ToolError::Invalid("command contains a NUL byte".into()));
    }
    let timeout = Duration::from_secs(
        args.timeout_seconds
            .unwrap_or(DEFAULT_TIMEOUT_SECS)
            .clamp(1, MAX_TIMEOUT_SECS),
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&args.command)
        .current_dir(ws.root())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe. The shell dies with the server (SIGKILL included), so a command
    // interrupted by a crash cannot finish behind the recovered workflow's back; the tokio
    // worker thread that spawns it lives as long as the runtime.
    let server = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The server died before the prctl: do not run orphaned.
            if libc::getppid() != server {
                return Err(std::io::Error::other("the server exited"));
            }
            Ok(())
        });
    }
    for key in ENV_ALLOWLIST {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    cmd.env("CI", "true");
    let mut child = cmd
        .spawn()
        .map_err(|e| ToolError::Failed(format!("could not start the command: {e}")))?;
    let pgid = child.id();
    let out = Arc::new(Mutex::new(Output::default()));
    let mut readers = Vec::new();
    if let Some(so) = child.stdout.take() {
        readers.push(tokio::spawn(pump(so, out.clone())));
    }
    if let Some(se) = child.stderr.take() {
        readers.push(tokio::spawn(pump(se, out.clone())));
    }

    let deadline = tokio::time::Instant::now() + timeout;
    let (status, mut timed_out) = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => (status.ok(), false),
        Err(_) => {
            kill_group(pgid);
            (child.wait().await.ok(), true)
        }
    };
    // The shell is gone; what it left running in its group must not outlive the call (and
    // would hold the pipes open). Wait for the pipes until the deadline, then kill the group.
    let drain = async {
        for r in readers.iter_mut() {
            let _ = r.await;
        }
    };
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        timed_out = true;
    }
    kill_group(pgid);
    let drain = async {
        for r in readers.iter_mut() {
            if !r.is_finished() {
                let _ = r.await;
            }
        }
    };
    if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
        for r in &readers {
            r.abort();
        }
    }

    let (mut text, dropped) = {
        let o = out.lock().unwrap_or_else(|e| e.into_inner());
        (String::from_utf8_lossy(&o.buf).into_owned(), o.dropped)
    };
    let truncated = dropped > 0;
    if truncated {
        text.push_str(&format!("\n[output truncated: {dropped} more bytes]"));
    }
    if timed_out {
        text.push_str(&format!(
            "\n[timed out after {} s; the command and its children were killed]",
            timeout.as_secs()
        ));
    }
    let exit_code = status.and_then(|s| s.code());
    Ok(Done::new(json!({
        "exitCode": exit_code,
        "output": text,
        "truncated": truncated,
        "timedOut": timed_out,
    })))
}
