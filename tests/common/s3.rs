//! A real S3 for tests: moto, at `WELDR_TEST_S3_ENDPOINT` (scripts/test.sh starts it) or,
//! outside CI, started here on a free port. In CI a missing endpoint fails the test.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct S3 {
    pub endpoint: String,
    child: Option<Child>,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn s3() -> S3 {
    weldr_agent::install_crypto_provider();
    if let Ok(endpoint) = std::env::var("WELDR_TEST_S3_ENDPOINT")
        && !endpoint.is_empty()
    {
        return S3 {
            endpoint,
            child: None,
        };
    }
    assert!(
        std::env::var("CI").is_err(),
        "WELDR_TEST_S3_ENDPOINT is not set in CI: run the tests through scripts/test.sh"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto (pip install 'moto[server]') or set WELDR_TEST_S3_ENDPOINT");
    let s3 = S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        child: Some(child),
    };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return s3;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("moto did not start on port {port}");
}
