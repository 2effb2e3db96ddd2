//! HTTPS through rustls with one crypto provider: the real binary serves /health over TLS,
//! with HTTP/2 for clients that offer it by ALPN.

#[path = "common/certs.rs"]
mod certs;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serves_https_when_a_certificate_is_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = certs::self_signed(tmp.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_weldr-agent"))
        .arg("serve")
        .env("WELDR_MODE", "local")
        .env("WORKSPACE_BASE", tmp.path())
        .env("PORT", port.to_string())
        .env("TLS_CERT_PATH", &cert)
        .env("TLS_KEY_PATH", &key)
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "2", &url])
            .output()
            .unwrap();
        if out.status.success() && !out.stdout.is_empty() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "no HTTPS answer");
        assert!(server.try_wait().unwrap().is_none(), "server exited");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    // ALPN: a client that offers h2 gets HTTP/2 (tests/http2.rs covers streams over it).
    let features = Command::new("curl").arg("--version").output().unwrap();
    if String::from_utf8_lossy(&features.stdout).contains("HTTP2") {
        let out = Command::new("curl")
            .args(["-sk", "--http2", "--max-time", "2", "-o", "/dev/null"])
            .args(["-w", "%{http_version}", &url])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2");
    }
    // Plain HTTP on the TLS port is not served.
    let plain = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/health"),
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("\"status\":\"ok\""));
    server.kill().unwrap();
    server.wait().unwrap();
}
