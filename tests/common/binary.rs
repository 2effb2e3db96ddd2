//! The real `weldr-agent` binary as a child process: a CLI command, or the server on a port.
//!
//! Use it from a test with `#[path = "common/binary.rs"] mod binary;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_weldr-agent");

/// The binary in local mode over the workspace `ws`, with a clean environment.
pub fn cli(ws: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", ws)
        .env("WELDR_MODE", "local")
        .env("WORKSPACE_BASE", ws)
        .env("LOG_LEVEL", "warn");
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `weldr-agent serve` on `port` with extra environment; returns once it accepts connections
/// and its control socket exists.
pub fn serve_with(ws: &Path, port: u16, env: &[(&str, &str)]) -> Child {
    let mut cmd = cli(ws);
    cmd.arg("serve")
        .env("PORT", port.to_string())
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && ws.join(".weldr-agent/control.sock").exists()
        {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited at startup: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start");
}

pub fn serve(ws: &Path, port: u16) -> Child {
    serve_with(ws, port, &[])
}

/// Run a command that must succeed; its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// SIGKILL the server and reap it.
pub fn sigkill(server: &mut Child) {
    server.kill().unwrap();
    server.wait().unwrap();
}
