//! The agent's commands are hostile: a prompt-injected model's run_command and a `weldr.json`
//! build that try to read the server's secrets (its environment through /proc, the store, the
//! control socket, other branches, /etc/shadow), write outside the branch, and leave a detached
//! sleeper behind. Nothing is readable, nothing is written, and no process is left after the
//! call, after a timeout, and after the server is killed with SIGKILL.

mod common;
#[path = "common/procs.rs"]
mod procs;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use procs::processes_with;
use serde_json::{Value, json};
use weldr_agent::sandbox::{Sandbox, SandboxMode, SandboxSettings};
use weldr_agent::tools::{self, Workspace};

/// A value only the server's environment holds.
const SECRET: &str = "weldr-server-secret-7f3a9c";

fn set_server_secret() {
    // SAFETY: set before the test spawns anything that reads the environment; the value is
    // the same in every test of this binary.
    unsafe {
        std::env::set_var("BETTER_AUTH_SECRET_FOR_TEST", SECRET);
        std::env::set_var("S3_SECRET_ACCESS_KEY", SECRET);
    }
}

/// Waits (a bounded while) until no process carries `marker`; the survivors otherwise.
async fn until_gone(marker: &str) -> Vec<String> {
    let mut left = processes_with(marker);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_with(marker);
    }
    left
}

/// A shell script that tries every way out it knows and prints what it got. `marker` names
/// the detached sleeper it leaves behind; `late` is where the sleeper would write.
fn attack(s: &TestServer, other_branch: &Path, outside: &Path, marker: &str) -> String {
    let data = &s.app().config.data_dir;
    let sock = s.app().config.control_socket_path();
    let store = s.app().config.store_path();
    format!(
        r#"echo "uid=$(id -u)"
cat /proc/$PPID/environ; cat /proc/1/environ; cat /proc/*/environ
cat {store} | head -c 64 | od -c | head -3
ls -la {data}
test -e {sock} && echo CONTROL_SOCKET_VISIBLE
cat {other}/secret.txt
cat /etc/shadow
ls /root
echo pwned > {outside}/pwned.txt
mkdir -p {base}/x && echo pwned > {base}/x/pwned.txt
kill -9 {server} && echo SIGNALLED_THE_SERVER
(setsid sh -c 'sleep 2; echo late > late.txt; : {marker}' > /dev/null 2>&1 &)
(sh -c 'sleep 300; : {marker}' > /dev/null 2>&1 &)
echo done
"#,
        store = store.display(),
        data = data.display(),
        sock = sock.display(),
        other = other_branch.display(),
        outside = outside.display(),
        base = s.app().config.workspace_base.display(),
        server = std::process::id(),
    )
}

fn assert_nothing_leaked(output: &str, what: &str) {
    assert!(
        output.contains("done"),
        "{what}: the script ran to its end: {output}"
    );
    for leak in [
        SECRET,
        "CONTROL_SOCKET_VISIBLE",
        "other branch's secret",
        "root:",
        "SIGNALLED_THE_SERVER",
    ] {
        assert!(!output.contains(leak), "{what} got {leak:?}: {output}");
    }
    assert!(
        output.contains("state.redb: No such file or directory"),
        "{what} saw the store: {output}"
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            output.contains("uid=61000"),
            "{what} ran as the sandbox uid: {output}"
        );
    }
}

#[tokio::test]
async fn a_hostile_run_command_and_build_reach_nothing_and_leave_nothing() {
    set_server_secret();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.providers.replay_dir = Some(dir.path().to_path_buf());
    let s = start(cfg).await;
    branch(s.app(), "p", "other").await;
    let other = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "other"),
    );
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret.txt"), "the other branch's secret").unwrap();
    let res = s
        .http
        .post(s.url("/projects/p/branches"))
        .json(&json!({"branchId": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let wd = weldr_agent::branches::branch_dir(
        &s.app().config,
        &weldr_agent::branches::BranchKey::new("p", "b"),
    );
    let outside = tempfile::tempdir().unwrap();
    let marker = format!("weldr-sbx-{}", std::process::id());
    let script = attack(&s, &other, outside.path(), &format!("{marker}-cmd"));
    let build = attack(&s, &other, outside.path(), &format!("{marker}-build"));
    std::fs::write(
        wd.join("weldr.json"),
        json!({"buildCommand": build}).to_string(),
    )
    .unwrap();

    let (status, health) = s.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["sandbox"]["mode"], "bwrap", "{health}");

    let turns = json!([
        [{"type": "tool_call", "id": "p1", "name": "submit_plan", "input": {
            "acceptanceCriteria": ["it ran"],
            "tasks": [{"id": 1, "summary": "run", "description": "run it",
                       "acceptanceCriteria": ["ran"], "dependencies": []}]}}],
        [{"type": "tool_call", "id": "r1", "name": "run_command", "input": {"command": script}}],
        [{"type": "tool_call", "id": "d1", "name": "done", "input": {}}]
    ]);
    let transcript = dir.path().join("t.json");
    std::fs::write(&transcript, serde_json::to_vec(&turns).unwrap()).unwrap();
    let mut sse = s.sse("/stream/p/b", Some("0")).await;
    let res = s
        .http
        .post(s.url("/trigger"))
        .json(&json!({"projectId": "p", "branchId": "b",
                      "message": {"content": [{"type": "text", "text": "run it"}]},
                      "model": format!("replay:{}", transcript.display())}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    let mut frames = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(60), sse.next())
            .await
            .expect("an event within 60 s")
            .expect("the stream goes on");
        let end = f.event == "end";
        frames.push(f);
        if end {
            break;
        }
    }
    let result = frames
        .iter()
        .find(|f| f.event == "tool-result" && f.data["callId"] == "r1")
        .expect("run_command's result");
    assert_eq!(result.data["truncated"], false, "{:?}", result.data);
    assert_nothing_leaked(&result.data.to_string(), "run_command");
    let build = frames
        .iter()
        .find(|f| f.event == "build")
        .expect("a build event");
    assert_nothing_leaked(build.data["output"].as_str().unwrap(), "the build");

    // Nothing written outside the branch, and the server lives.
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert!(!dir.path().join("x").exists());
    assert_eq!(
        std::fs::read_to_string(other.join("secret.txt")).unwrap(),
        "the other branch's secret"
    );
    // No sleeper outlived its call, and none writes later.
    let left = until_gone(&marker).await;
    assert!(left.is_empty(), "processes outlived their call: {left:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !wd.join("late.txt").exists(),
        "a detached child wrote later"
    );
    let (status, _) = s.get_json("/health").await;
    assert_eq!(status, 200);
    s.stop().await;
}

fn sandbox(settings: SandboxSettings) -> Arc<Sandbox> {
    Arc::new(Sandbox::new(settings))
}

async fn run(ws: &Workspace, command: &str) -> Value {
    let out = tools::execute(ws, "run_command", &json!({"command": command})).await;
    match out.result {
        Ok(c) => serde_json::from_str(&c).unwrap(),
        Err(e) => Value::String(e),
    }
}

#[tokio::test]
async fn the_network_can_be_cut() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let probe =
        format!("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo CONNECTED || echo REFUSED");
    let on = Workspace::with_sandbox(dir.path(), sandbox(SandboxSettings::default())).unwrap();
    let r = run(&on, &probe).await;
    assert!(r["output"].as_str().unwrap().contains("CONNECTED"), "{r}");
    let off = Workspace::with_sandbox(
        dir.path(),
        sandbox(SandboxSettings {
            network: false,
            ..Default::default()
        }),
    )
    .unwrap();
    let r = run(&off, &probe).await;
    assert!(r["output"].as_str().unwrap().contains("REFUSED"), "{r}");
}

#[tokio::test]
async fn memory_and_processes_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::with_sandbox(
        dir.path(),
        sandbox(SandboxSettings {
            memory_mb: 128,
            ..Default::default()
        }),
    )
    .unwrap();
    let r = run(
        &ws,
        "python3 -c 'b = bytearray(512 * 1024 * 1024); print(\"ALLOCATED\")' 2>&1; echo exit=$?",
    )
    .await;
    let out = r["output"].as_str().unwrap();
    assert!(!out.contains("ALLOCATED"), "{out}");
    assert!(out.contains("MemoryError"), "{out}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The process limit binds the dedicated uid (a user's own processes would count
        // otherwise), shared by every sandbox of that uid.
        let ws = Workspace::with_sandbox(
            dir.path(),
            sandbox(SandboxSettings {
                max_processes: 16,
                ..Default::default()
            }),
        )
        .unwrap();
        let r = run(
            &ws,
            "for i in $(seq 40); do sleep 5 & done 2>&1; echo spawned; kill $(jobs -p) 2>/dev/null",
        )
        .await;
        // The shell cannot fork its 40 sleepers; with other sandboxes of the uid running,
        // the sandbox itself may not even start.
        let out = match &r {
            Value::String(error) => error.as_str(),
            _ => r["output"].as_str().unwrap(),
        };
        assert!(
            out.contains("fork") || out.contains("Resource temporarily unavailable"),
            "{out}"
        );
    }
}

#[tokio::test]
async fn without_bubblewrap_commands_fail_clearly_unless_the_sandbox_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let missing = sandbox(SandboxSettings {
        program: "/nonexistent/bwrap".into(),
        ..Default::default()
    });
    assert_eq!(missing.status().mode, "unavailable");
    let ws = Workspace::with_sandbox(dir.path(), missing).unwrap();
    let out = tools::execute(
        &ws,
        "run_command",
        &json!({"command": "echo ran > ran.txt"}),
    )
    .await;
    let message = out.result.unwrap_err();
    assert!(message.contains("sandbox is unavailable"), "{message}");
    assert!(message.contains("SANDBOX=off"), "{message}");
    assert!(!dir.path().join("ran.txt").exists());

    let off = sandbox(SandboxSettings {
        mode: SandboxMode::Off,
        ..Default::default()
    });
    assert_eq!(off.status().mode, "off");
    let ws = Workspace::with_sandbox(dir.path(), off).unwrap();
    let r = run(&ws, "echo ran > ran.txt; echo ok").await;
    assert_eq!(r["exitCode"], 0, "{r}");
    assert!(dir.path().join("ran.txt").exists());
}

/// The child half of [`a_server_sigkill_ends_every_sandboxed_process`]: a "server" (this test
/// binary, run again) whose command leaves detached sleepers; the parent kills it with SIGKILL.
#[tokio::test]
async fn sigkill_child() {
    let Ok(marker) = std::env::var("WELDR_SANDBOX_CHILD_MARKER") else {
        return;
    };
    let dir = std::env::var("WELDR_SANDBOX_CHILD_DIR").unwrap();
    let ws = Workspace::new(&dir).unwrap();
    let command = format!(
        "(setsid sh -c 'sleep 300; : {marker}' > /dev/null 2>&1 &); sh -c 'sleep 300; : {marker}'"
    );
    let _ = tools::execute(&ws, "run_command", &json!({"command": command})).await;
}

#[tokio::test]
async fn a_server_sigkill_ends_every_sandboxed_process() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("weldr-sigkill-{}", std::process::id());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigkill_child", "--nocapture"])
        .env("WELDR_SANDBOX_CHILD_MARKER", &marker)
        .env("WELDR_SANDBOX_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = processes_with(&marker);
        if seen.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 2, "both sleepers started: {seen:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let left = until_gone(&marker).await;
    assert!(left.is_empty(), "sleepers outlived the server: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_in_a_layered_fork_changes_only_the_fork() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(config(dir.path())).await;
    let (status, _) = s.post_json("/projects", json!({"projectId": "p"})).await;
    assert_eq!(status, 201);
    let (status, _) = s
        .post_json("/projects/p/branches", json!({"branchId": "main"}))
        .await;
    assert_eq!(status, 201);
    let main = s.dir.join("p/main");
    // Files of 64 KiB, so that a data copy shows in the blocks a file takes.
    let content = |i: usize| format!("file {i}\n").repeat(64 * 1024 / 7);
    for i in 0..50 {
        std::fs::write(main.join(format!("f{i}.txt")), content(i)).unwrap();
    }
    let (status, body) = s
        .post_json(
            "/projects/p/branches/main/versions",
            json!({"message": "base"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = s
        .post_json(
            "/projects/p/branches",
            json!({"branchId": "feature", "fromBranchId": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let feature = s.dir.join("p/feature");
    let layered = weldr_agent::branches::layers::is_mount_point(&feature).unwrap_or(false);
    let ws = Workspace::with_sandbox(&feature, s.app().sandbox.clone()).unwrap();
    let r = run(
        &ws,
        "echo changed > f0.txt && echo new > new.txt && git -c safe.directory='*' status --short",
    )
    .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    assert_eq!(
        std::fs::read_to_string(feature.join("f0.txt")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(main.join("f0.txt")).unwrap(),
        content(0)
    );
    assert_eq!(
        std::fs::read_to_string(feature.join("f1.txt")).unwrap(),
        content(1)
    );
    assert!(!main.join("new.txt").exists());
    if layered {
        // Only what the command changed was copied up with its data; the shared files stayed
        // in the layer (at most their inodes came up, to change their owner: metacopy).
        use std::os::unix::fs::MetadataExt;
        let upper = s.dir.join(".weldr-layers/branches/p/feature/upper");
        let copied: Vec<String> = std::fs::read_dir(&upper)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('f'))
            .filter(|e| e.metadata().unwrap().blocks() * 512 >= 32 * 1024)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(copied.is_empty(), "data copied up: {copied:?}");
        assert!(upper.join("f0.txt").exists() && upper.join("new.txt").exists());
    }
    s.stop().await;
}
