//! A private Postgres for a test: `initdb` and `pg_ctl` (as the `postgres` user, which initdb
//! requires) in a temporary directory, on a free port, optionally with TLS; stopped on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PrivatePg {
    pub port: u16,
    dir: tempfile::TempDir,
}

/// TLS for the server: its certificate and key (PEM), and whether plain connections are
/// refused (`hostssl` only).
pub struct ServerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub only_tls: bool,
}

fn as_postgres(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", cmd])
        .args(args)
        .output()
        .expect("runuser (the tests run as root)")
}

impl PrivatePg {
    pub fn start(tls: Option<ServerTls<'_>>) -> PrivatePg {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        chown_postgres(dir.path());
        let out = as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n",
            dir.path().display()
        );
        if let Some(tls) = &tls {
            let (cert, key) = (data.join("server.crt"), data.join("server.key"));
            std::fs::copy(tls.cert, &cert).unwrap();
            std::fs::copy(tls.key, &key).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            chown_postgres(&cert);
            chown_postgres(&key);
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            if tls.only_tls {
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
                )
                .unwrap();
            }
        }
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        let log = dir.path().join("log");
        let out = as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        PrivatePg { port, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stop the server (fast shutdown); [`PrivatePg::resume`] starts it again, data kept.
    pub fn stop(&self) {
        let out = as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn resume(&self) {
        let log = self.dir.path().join("log");
        let out = as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL for database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ],
        );
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a server certificate it signs for `name` (DNS), made with openssl in `dir`:
/// (ca.pem, server.pem, server.key).
pub fn make_certs(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName=DNS:{name}\n")).unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
