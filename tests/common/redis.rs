//! A private `redis-server` for a test, on a free port in a temporary directory (append-only
//! file on, so a restart keeps what it had), optionally with a password or TLS only; killed on
//! drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

/// TLS for the server: its certificate, key and the CA (PEM); plain connections are off.
pub struct RedisTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateRedis {
    pub fn start(password: Option<&str>, tls: Option<RedisTls<'_>>) -> PrivateRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "yes".into(),
            "--appendfsync".into(),
            "always".into(),
        ];
        match &tls {
            Some(t) => args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                t.cert.display().to_string(),
                "--tls-key-file".into(),
                t.key.display().to_string(),
                "--tls-ca-cert-file".into(),
                t.ca.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]),
            None => args.extend(["--port".into(), port.to_string()]),
        }
        if let Some(p) = password {
            args.extend(["--requirepass".into(), p.into()]);
        }
        let mut r = PrivateRedis {
            port,
            dir,
            args,
            child: None,
        };
        r.resume();
        r
    }

    /// Start it (again, on the same port and data).
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it (SIGKILL: the append-only file, synced on every write, keeps the data).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Run `redis-cli` with `args` against it (plain connections only); its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
