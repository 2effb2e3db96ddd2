//! run_command: `sh -c` in the branch directory inside the [sandbox](crate::sandbox), with a
//! timeout that kills everything the command started, an output cap, and an environment built
//! from an allowlist (the server's secrets — API keys, database URLs, S3 credentials — never
//! reach it).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

use super::{Done, ToolError, Workspace};

pub const DEFAULT_TIMEOUT_SECS: u64 = 120;
pub const MAX_TIMEOUT_SECS: u64 = 600;
/// Most bytes of combined stdout and stderr returned.
pub const OUTPUT_CAP_BYTES: usize = 64 * 1024;
pub use crate::sandbox::ENV_ALLOWLIST;
/// How long to wait for the output pipes after the process group was killed (a process that
/// left the group may still hold them).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The input of `run_command` (its JSON Schema is what the model sees: see [`super::specs`]).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommandInput {
    /// The shell command.
    pub command: String,
    /// Seconds before the command and all its children are killed.
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECS), extend("default" = DEFAULT_TIMEOUT_SECS))]
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

/// Kill what is left of a finished or timed-out command. With the sandbox on, the child is
/// bubblewrap: once it is gone, so is its PID namespace and every process in it. With
/// `SANDBOX=off` the shell led process group `group`, the best there is.
async fn end_sandbox(child: &mut Child, group: Option<u32>) {
    if let Some(pid) = group {
        kill_group(pid);
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Kills its process group when dropped (a finished group is gone: ESRCH, ignored).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill_group(pid);
        }
    }
}

/// SIGKILL to process group `pid` (ours, not reaped: a stale group gives ESRCH, ignored).
fn kill_group(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
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
    let mut cmd = ws
        .sandbox()
        .shell(ws.root(), &args.command)
        .await
        .map_err(|e| ToolError::Failed(e.to_string()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| ToolError::Failed(format!("could not start the command: {e}")))?;
    // Unconfined, the shell leads its own process group, the only handle on what it started.
    let pgid = ws.sandbox().is_off().then(|| child.id()).flatten();
    // A call dropped before it ends (its workflow cancelled) kills what it started: the
    // sandbox through `kill_on_drop`, an unconfined command's process group here.
    let _group = GroupGuard(pgid);
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
            if let Some(pid) = pgid {
                kill_group(pid);
            }
            let _ = child.start_kill();
            (child.wait().await.ok(), true)
        }
    };
    // The shell is gone; what it left running must not outlive the call (and would hold the
    // pipes open). Wait for the pipes until the deadline, then end the sandbox: everything in
    // it dies with it.
    let drain = async {
        for r in readers.iter_mut() {
            let _ = r.await;
        }
    };
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        timed_out = true;
    }
    end_sandbox(&mut child, pgid).await;
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
