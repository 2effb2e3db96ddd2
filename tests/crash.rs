//! The real binary: SIGKILL during an append burst loses nothing acknowledged; SIGTERM stops
//! cleanly with streams open; CLI commands reach a running server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/binary.rs"]
mod binary;

use binary::{cli, free_port, run_ok, serve};

#[test]
fn sigkill_during_an_append_burst_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let port = free_port();
    let mut server = serve(ws, port);
    let out = run_ok(cli(ws).args(["branch", "create", "p1", "b1"]));
    assert!(out.contains("STATUS=created"), "{out}");

    // Four producers append through the running server's control socket.
    let mut producers: Vec<Child> = (0..4)
        .map(|_| {
            cli(ws)
                .args([
                    "events", "append", "p1", "b1", "--type", "tick", "--count", "1000000",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let readers: Vec<_> = producers
        .iter_mut()
        .map(|p| {
            let stdout = p.stdout.take().unwrap();
            std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.strip_prefix("ID=").and_then(|v| v.parse::<u64>().ok()))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    for p in &mut producers {
        let _ = p.wait();
    }
    let mut acked: Vec<u64> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    acked.sort();
    assert!(
        acked.len() > 50,
        "the burst was acknowledged before the kill ({} acks)",
        acked.len()
    );
    assert!(
        acked.windows(2).all(|w| w[0] != w[1]),
        "no id acknowledged twice"
    );

    // Open the store again (no server): every acknowledged id is there, with no holes.
    let listed = run_ok(cli(ws).args(["events", "list", "p1", "b1", "--limit", "10000"]));
    let mut stored = Vec::new();
    let mut after = 0;
    let mut chunk = listed;
    loop {
        let ids: Vec<u64> = chunk
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        if ids.is_empty() {
            break;
        }
        after = *ids.last().unwrap();
        stored.extend(ids);
        chunk = run_ok(cli(ws).args([
            "events",
            "list",
            "p1",
            "b1",
            "--limit",
            "10000",
            "--after",
            &after.to_string(),
        ]));
    }
    assert_eq!(stored, (1..=after).collect::<Vec<_>>(), "ids have no holes");
    let max_acked = *acked.last().unwrap();
    assert!(max_acked <= after);
    for id in &acked {
        assert!(*id <= after, "acknowledged {id} is missing");
    }

    // And the server starts again on it and continues the ids.
    let mut server = serve(ws, port);
    let out = run_ok(cli(ws).args(["events", "append", "p1", "b1", "--type", "tick"]));
    assert_eq!(out.trim(), format!("ID={}", after + 1));
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn sigterm_stops_cleanly_with_open_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path();
    let port = free_port();
    let mut server = serve(ws, port);
    run_ok(cli(ws).args(["branch", "create", "p", "b"]));
    run_ok(cli(ws).args(["events", "append", "p", "b", "--count", "3"]));
    let token = run_ok(cli(ws).args(["token", "create", "--name", "t"]))
        .trim()
        .to_string();
    assert!(token.starts_with("wa_"));
    // Open streams that would keep a naive graceful stop waiting forever.
    let streams: Vec<_> = (0..5)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            use std::io::Write;
            write!(s, "GET /stream/p/b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nLast-Event-ID: 0\r\n\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for s in &streams {
        let mut head = [0u8; 12];
        use std::io::Read;
        (&*s).read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "the stream is open");
    }
    let started = Instant::now();
    unsafe_sigterm(server.id());
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "server hung on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit: {status:?}");
    drop(streams);
    assert!(
        !ws.join(".weldr-agent/control.sock").exists(),
        "control socket removed"
    );
    // The store opens cleanly and kept everything.
    let listed = run_ok(cli(ws).args(["events", "list", "p", "b"]));
    // The three appended events, plus the `sync` event of the push the stop made of the dirty
    // branch.
    let (syncs, others): (Vec<&str>, Vec<&str>) = listed
        .lines()
        .partition(|l| l.contains("\"type\":\"sync\""));
    assert_eq!(others.len(), 3, "{listed}");
    assert!(
        syncs.iter().any(|l| l.contains("\"trigger\":\"shutdown\"")),
        "{listed}"
    );
}

fn unsafe_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn bad_configuration_names_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = cli(tmp.path())
        .arg("serve")
        .env("PORT", "http")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORT"));
    let out = cli(tmp.path())
        .arg("serve")
        .env("WELDR_MODE", "cloud")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("PROJECT_ID"));
}
