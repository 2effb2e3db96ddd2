//! The agent's tools on real temporary directories: every tool's happy path, read ranges,
//! edit errors, confinement (`..`, absolute paths, symlinks out, `.git`), .gitignore, and
//! run_command's timeout, output cap and scrubbed environment.

#[path = "common/procs.rs"]
mod procs;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use procs::processes_with;
use serde_json::{Value, json};
use weldr_agent::tools::{self, ChangeKind, ToolOutcome, Workspace};

struct Fixture {
    _root: tempfile::TempDir,
    outside: tempfile::TempDir,
    ws: Workspace,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let ws = Workspace::new(root.path()).unwrap();
    Fixture {
        _root: root,
        outside,
        ws,
    }
}

impl Fixture {
    fn root(&self) -> &Path {
        self.ws.root()
    }

    fn put(&self, rel: &str, content: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    async fn call(&self, name: &str, input: Value) -> ToolOutcome {
        tools::execute(&self.ws, name, &input).await
    }

    async fn ok(&self, name: &str, input: Value) -> Value {
        let out = self.call(name, input.clone()).await;
        let content = match &out.result {
            Ok(c) => c.clone(),
            Err(e) => panic!("{name} {input} failed: {e}"),
        };
        serde_json::from_str(&content).unwrap_or(Value::String(content))
    }

    async fn err(&self, name: &str, input: Value) -> String {
        let out = self.call(name, input.clone()).await;
        match out.result {
            Ok(c) => panic!("{name} {input} should fail, got {c}"),
            Err(e) => {
                assert!(out.changed.is_empty());
                e
            }
        }
    }

    fn outside_is_empty(&self) -> bool {
        std::fs::read_dir(self.outside.path()).unwrap().count() == 0
    }
}

#[test]
fn specs_describe_every_tool() {
    let specs = tools::specs();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, tools::TOOL_NAMES);
    for s in &specs {
        assert_eq!(s.input_schema["type"], "object", "{}", s.name);
        assert!(!s.description.is_empty());
    }
}

/// A value of every property the schema describes: the default, else the minimum, else the
/// property's name (distinct strings, so that edit_file's old and new texts differ).
fn sample_input(schema: &Value) -> Value {
    let props = schema["properties"].as_object().expect("properties");
    let sample = |name: &String, p: &Value| match p["type"].as_str() {
        _ if p.get("default").is_some() => p["default"].clone(),
        Some("integer") => p.get("minimum").cloned().unwrap_or(json!(1)),
        Some("boolean") => json!(false),
        Some("string") => json!(name),
        other => panic!("{name}: no sample for {other:?}"),
    };
    Value::Object(
        props
            .iter()
            .map(|(n, p)| (n.clone(), sample(n, p)))
            .collect(),
    )
}

#[tokio::test]
async fn every_tool_takes_what_its_schema_describes_and_nothing_else() {
    let f = fixture();
    for spec in tools::specs() {
        let mut input = sample_input(&spec.input_schema);
        if spec.name == "run_command" {
            input["command"] = json!("true");
        }
        let out = f.call(&spec.name, input.clone()).await;
        assert!(
            !out.content().contains("invalid input"),
            "{} refused the input its schema describes: {input} -> {}",
            spec.name,
            out.content()
        );
        input["notInTheSchema"] = json!(1);
        assert!(
            f.err(&spec.name, input).await.contains("invalid input"),
            "{} took a property its schema does not have",
            spec.name
        );
    }
}

#[tokio::test]
async fn unknown_tool_and_bad_input_are_error_values() {
    let f = fixture();
    assert!(f.err("rm_rf", json!({})).await.contains("unknown tool"));
    assert!(
        f.err("read_file", json!({"path": "x"}))
            .await
            .contains("invalid input")
    );
    assert!(
        f.err("write_file", json!({"filePath": 3, "content": "x"}))
            .await
            .contains("invalid input")
    );
}

#[tokio::test]
async fn write_read_edit_delete() {
    let f = fixture();
    let out = f
        .call(
            "write_file",
            json!({"filePath": "src/deep/a.txt", "content": "one\ntwo\nthree\n"}),
        )
        .await;
    assert!(!out.is_error(), "{}", out.content());
    assert_eq!(out.changed.len(), 1);
    assert_eq!(out.changed[0].path, "src/deep/a.txt");
    assert_eq!(out.changed[0].kind, ChangeKind::Written);
    assert_eq!(
        std::fs::read_to_string(f.root().join("src/deep/a.txt")).unwrap(),
        "one\ntwo\nthree\n"
    );
    // No temp files are left behind.
    let names: Vec<_> = std::fs::read_dir(f.root().join("src/deep"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1);

    let r = f
        .ok("read_file", json!({"filePath": "src/deep/a.txt"}))
        .await;
    assert_eq!(r["content"], "one\ntwo\nthree");
    assert_eq!(r["totalLines"], 3);
    assert_eq!(r["startLine"], 1);
    assert_eq!(r["endLine"], 3);
    assert_eq!(r["truncated"], false);

    // An existing file keeps its mode across writes and edits.
    let p = f.root().join("src/deep/a.txt");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = f
        .ok(
            "edit_file",
            json!({"filePath": "src/deep/a.txt", "oldText": "two\n", "newText": "TWO\n"}),
        )
        .await;
    assert_eq!(e["replacements"], 1);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\nTWO\nthree\n");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o755
    );

    let d = f
        .call("delete_file", json!({"filePath": "src/deep/a.txt"}))
        .await;
    assert!(!d.is_error(), "{}", d.content());
    assert_eq!(d.changed[0].kind, ChangeKind::Deleted);
    assert!(!p.exists());
    assert!(
        f.err("delete_file", json!({"filePath": "src/deep/a.txt"}))
            .await
            .contains("does not exist")
    );
    assert!(
        f.err("read_file", json!({"filePath": "nope.txt"}))
            .await
            .contains("does not exist")
    );
}

#[tokio::test]
async fn new_files_are_world_readable() {
    let f = fixture();
    f.ok("write_file", json!({"filePath": "n.txt", "content": "x"}))
        .await;
    let mode = std::fs::metadata(f.root().join("n.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[tokio::test]
async fn read_file_ranges_and_truncation() {
    let f = fixture();
    let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    f.put("big.txt", &text);

    let r = f
        .ok(
            "read_file",
            json!({"filePath": "big.txt", "startLine": 10, "endLine": 12}),
        )
        .await;
    assert_eq!(r["content"], "line 10\nline 11\nline 12");
    assert_eq!(
        (r["startLine"].as_u64(), r["endLine"].as_u64()),
        (Some(10), Some(12))
    );
    assert_eq!(r["totalLines"], 100);
    assert_eq!(r["truncated"], false);

    let r = f
        .ok("read_file", json!({"filePath": "big.txt", "maxLines": 5}))
        .await;
    assert_eq!(r["content"], "line 1\nline 2\nline 3\nline 4\nline 5");
    assert_eq!(r["endLine"], 5);
    assert_eq!(r["truncated"], true);

    let r = f
        .ok(
            "read_file",
            json!({"filePath": "big.txt", "startLine": 98, "endLine": 500}),
        )
        .await;
    assert_eq!(r["content"], "line 98\nline 99\nline 100");
    assert_eq!(r["endLine"], 100);

    assert!(
        f.err(
            "read_file",
            json!({"filePath": "big.txt", "startLine": 101})
        )
        .await
        .contains("past the end")
    );

    f.put("empty.txt", "");
    let r = f.ok("read_file", json!({"filePath": "empty.txt"})).await;
    assert_eq!(r["totalLines"], 0);
    assert_eq!(r["content"], "");

    std::fs::write(f.root().join("bin.dat"), [1u8, 0, 2, 3]).unwrap();
    assert!(
        f.err("read_file", json!({"filePath": "bin.dat"}))
            .await
            .contains("binary")
    );
}

#[tokio::test]
async fn edit_file_missing_and_not_unique() {
    let f = fixture();
    f.put("a.rs", "let x = 1;\nlet x = 1;\nlet y = 2;\n");
    let e = f
        .err(
            "edit_file",
            json!({"filePath": "a.rs", "oldText": "let z", "newText": "q"}),
        )
        .await;
    assert!(e.contains("not found"), "{e}");
    let e = f
        .err(
            "edit_file",
            json!({"filePath": "a.rs", "oldText": "let x = 1;", "newText": "q"}),
        )
        .await;
    assert!(e.contains("matches 2 times"), "{e}");
    // The file is untouched by failed edits.
    assert_eq!(
        std::fs::read_to_string(f.root().join("a.rs")).unwrap(),
        "let x = 1;\nlet x = 1;\nlet y = 2;\n"
    );
    let r = f
        .ok(
            "edit_file",
            json!({"filePath": "a.rs", "oldText": "let x = 1;", "newText": "let x = 3;", "replaceAll": true}),
        )
        .await;
    assert_eq!(r["replacements"], 2);
    assert_eq!(
        std::fs::read_to_string(f.root().join("a.rs")).unwrap(),
        "let x = 3;\nlet x = 3;\nlet y = 2;\n"
    );
    assert!(
        f.err(
            "edit_file",
            json!({"filePath": "missing.rs", "oldText": "a", "newText": "b"})
        )
        .await
        .contains("does not exist")
    );
}

#[tokio::test]
async fn list_dir_levels_gitignore_and_dirs_only() {
    let f = fixture();
    f.put(".gitignore", "ignored/\n*.log\n");
    f.put("src/main.rs", "fn main() {}\n");
    f.put("src/lib/deep/x.rs", "");
    f.put("ignored/a.txt", "");
    f.put("debug.log", "");
    f.put(".git/config", "[core]\n");
    f.put(".env.example", "A=1\n");

    let r = f.ok("list_dir", json!({})).await;
    let entries: Vec<&str> = r["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(entries.contains(&"src/"), "{entries:?}");
    assert!(entries.contains(&"src/main.rs"));
    assert!(entries.contains(&"src/lib/"));
    assert!(entries.contains(&".gitignore"));
    assert!(entries.contains(&".env.example"));
    assert!(!entries.contains(&"src/lib/deep/"), "level 2 by default");
    assert!(!entries.iter().any(|e| e.starts_with("ignored")));
    assert!(!entries.contains(&"debug.log"));
    assert!(
        !entries
            .iter()
            .any(|e| e.starts_with(".git/") || *e == ".git/")
    );

    let r = f
        .ok(
            "list_dir",
            json!({"path": "src", "level": 5, "directoriesOnly": true}),
        )
        .await;
    assert_eq!(r["entries"], json!(["src/lib/", "src/lib/deep/"]));

    assert!(
        f.err("list_dir", json!({"path": "src/main.rs"}))
            .await
            .contains("not a directory")
    );
}

#[tokio::test]
async fn find_by_substring_and_glob() {
    let f = fixture();
    f.put(".gitignore", "node_modules/\n");
    f.put("src/components/Button.tsx", "");
    f.put("src/components/button.test.tsx", "");
    f.put("src/app.ts", "");
    f.put("node_modules/button/index.js", "");

    let r = f.ok("find", json!({"query": "button"})).await;
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{r}");
    assert!(
        !results
            .iter()
            .any(|p| p.as_str().unwrap().contains("node_modules"))
    );

    let r = f.ok("find", json!({"query": "*.tsx"})).await;
    assert_eq!(r["results"].as_array().unwrap().len(), 2);

    let r = f
        .ok(
            "find",
            json!({"query": "components", "includeFiles": false}),
        )
        .await;
    assert_eq!(r["results"], json!(["src/components/"]));

    let r = f
        .ok("find", json!({"query": "src/**/*.ts*", "maxResults": 1}))
        .await;
    assert_eq!(r["results"].as_array().unwrap().len(), 1);
    assert_eq!(r["truncated"], true);
}

#[tokio::test]
async fn grep_honours_gitignore_and_options() {
    let f = fixture();
    f.put(".gitignore", "dist/\n");
    f.put(
        "src/a.ts",
        "one\ntwo\nconst needle = 1;\nthree\nfour\nfive\n",
    );
    f.put("src/b.rs", "// Needle here\nneedles plural\n");
    f.put("dist/bundle.js", "needle in the build output\n");

    let r = f.ok("grep", json!({"pattern": "needle"})).await;
    let out = r["output"].as_str().unwrap();
    assert!(out.contains("src/a.ts:3:const needle = 1;"), "{out}");
    assert!(out.contains("src/a.ts-2-two"), "context lines: {out}");
    assert!(out.contains("src/a.ts-5-four"), "context lines: {out}");
    assert!(
        !out.contains("src/a.ts-6-five"),
        "only 2 lines of context: {out}"
    );
    assert!(!out.contains("dist/"), "gitignored: {out}");
    assert!(out.contains("src/b.rs:2:needles plural"));
    assert!(
        !out.contains("src/b.rs:1:"),
        "case-sensitive by default: {out}"
    );

    let r = f
        .ok(
            "grep",
            json!({"pattern": "needle", "ignoreCase": true, "wholeWord": true, "contextLines": 0}),
        )
        .await;
    let out = r["output"].as_str().unwrap();
    assert!(out.contains("src/b.rs:1:// Needle here"), "{out}");
    assert!(!out.contains("needles plural"), "{out}");
    assert_eq!(r["matches"], 2);

    let r = f
        .ok("grep", json!({"pattern": "needle", "filePattern": "*.rs"}))
        .await;
    assert_eq!(r["matches"], 1);

    let r = f.ok("grep", json!({"pattern": "e", "maxResults": 3})).await;
    assert_eq!(r["matches"], 3);
    assert_eq!(r["truncated"], true);

    assert!(
        f.err("grep", json!({"pattern": "("}))
            .await
            .contains("regular expression")
    );
}

#[tokio::test]
async fn lexical_escapes_are_refused() {
    let f = fixture();
    for path in ["../../outside", "/etc/passwd", "a/../../x", "..", "a\0b"] {
        for (tool, input) in [
            ("read_file", json!({"filePath": path})),
            ("write_file", json!({"filePath": path, "content": "x"})),
            ("delete_file", json!({"filePath": path})),
            ("list_dir", json!({"path": path})),
            (
                "edit_file",
                json!({"filePath": path, "oldText": "a", "newText": "b"}),
            ),
        ] {
            let e = f.err(tool, input).await;
            assert!(e.contains("refused"), "{tool} {path:?}: {e}");
        }
    }
}

#[tokio::test]
async fn symlinks_out_of_the_root_are_refused() {
    let f = fixture();
    let outside = f.outside.path().to_path_buf();
    // A file link and a directory link, both pointing outside (to the still-empty dir).
    symlink(outside.join("secret.txt"), f.root().join("link.txt")).unwrap();
    symlink(&outside, f.root().join("outdir")).unwrap();

    for (tool, input) in [
        (
            "write_file",
            json!({"filePath": "link.txt", "content": "x"}),
        ),
        (
            "write_file",
            json!({"filePath": "outdir/new.txt", "content": "x"}),
        ),
        (
            "write_file",
            json!({"filePath": "outdir/sub/new.txt", "content": "x"}),
        ),
        (
            "edit_file",
            json!({"filePath": "outdir/f.txt", "oldText": "a", "newText": "b"}),
        ),
        ("delete_file", json!({"filePath": "outdir/f.txt"})),
        ("list_dir", json!({"path": "outdir"})),
    ] {
        let e = f.err(tool, input.clone()).await;
        assert!(e.contains("refused"), "{tool} {input}: {e}");
    }
    assert!(f.outside_is_empty(), "nothing may be written outside");

    // Now with real content outside: reading through either link is refused.
    std::fs::write(outside.join("secret.txt"), "top secret\n").unwrap();
    std::fs::write(outside.join("f.txt"), "a\n").unwrap();
    for input in [
        json!({"filePath": "link.txt"}),
        json!({"filePath": "outdir/secret.txt"}),
    ] {
        let e = f.err("read_file", input.clone()).await;
        assert!(e.contains("refused"), "{input}: {e}");
    }
    let e = f
        .err(
            "edit_file",
            json!({"filePath": "outdir/f.txt", "oldText": "a", "newText": "b"}),
        )
        .await;
    assert!(e.contains("refused"), "{e}");
    assert_eq!(
        std::fs::read_to_string(outside.join("f.txt")).unwrap(),
        "a\n"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "top secret\n"
    );

    // Search never follows the links out.
    let r = f.ok("grep", json!({"pattern": "secret"})).await;
    assert_eq!(r["matches"], 0, "{r}");
    let r = f.ok("find", json!({"query": "secret"})).await;
    assert_eq!(r["results"], json!([]));

    // Deleting the link removes the link itself, never its target.
    let d = f.call("delete_file", json!({"filePath": "link.txt"})).await;
    assert!(!d.is_error(), "{}", d.content());
    assert!(outside.join("secret.txt").exists());
    assert!(std::fs::symlink_metadata(f.root().join("link.txt")).is_err());
}

#[tokio::test]
async fn dangling_symlink_is_not_written_through() {
    let f = fixture();
    symlink(
        f.outside.path().join("created.txt"),
        f.root().join("dangling"),
    )
    .unwrap();
    let e = f
        .err(
            "write_file",
            json!({"filePath": "dangling", "content": "x"}),
        )
        .await;
    assert!(e.contains("refused"), "{e}");
    assert!(f.outside_is_empty());
}

#[tokio::test]
async fn symlinks_inside_the_root_work() {
    let f = fixture();
    f.put("real/a.txt", "hello\n");
    symlink(f.root().join("real"), f.root().join("alias")).unwrap();
    let r = f.ok("read_file", json!({"filePath": "alias/a.txt"})).await;
    assert_eq!(r["content"], "hello");
    let out = f
        .call(
            "write_file",
            json!({"filePath": "alias/b.txt", "content": "b"}),
        )
        .await;
    assert_eq!(out.changed[0].path, "real/b.txt");
    assert!(f.root().join("real/b.txt").is_file());
}

#[tokio::test]
async fn git_directory_is_not_writable() {
    let f = fixture();
    f.put(".git/config", "[core]\n");
    for (tool, input) in [
        (
            "write_file",
            json!({"filePath": ".git/config", "content": "x"}),
        ),
        (
            "write_file",
            json!({"filePath": ".git/hooks/pre-commit", "content": "x"}),
        ),
        (
            "write_file",
            json!({"filePath": "./.git/config", "content": "x"}),
        ),
        ("delete_file", json!({"filePath": ".git/config"})),
        (
            "edit_file",
            json!({"filePath": ".git/config", "oldText": "core", "newText": "x"}),
        ),
    ] {
        let e = f.err(tool, input.clone()).await;
        assert!(e.contains("refused"), "{tool} {input}: {e}");
    }
    // Nor through a symlink to it.
    symlink(f.root().join(".git"), f.root().join("g")).unwrap();
    let e = f
        .err(
            "write_file",
            json!({"filePath": "g/config", "content": "x"}),
        )
        .await;
    assert!(e.contains("refused"), "{e}");
    assert_eq!(
        std::fs::read_to_string(f.root().join(".git/config")).unwrap(),
        "[core]\n"
    );
}

#[tokio::test]
async fn run_command_happy_path_in_the_branch_dir() {
    let f = fixture();
    f.put("hello.txt", "hi\n");
    let r = f
        .ok(
            "run_command",
            json!({"command": "cat hello.txt; pwd; echo err >&2; exit 3"}),
        )
        .await;
    assert_eq!(r["exitCode"], 3);
    assert_eq!(r["timedOut"], false);
    assert_eq!(r["truncated"], false);
    let out = r["output"].as_str().unwrap();
    assert!(out.contains("hi"), "{out}");
    assert!(out.contains(f.root().to_str().unwrap()), "{out}");
    assert!(out.contains("err"), "{out}");
}

#[tokio::test]
async fn run_command_environment_has_no_secrets() {
    // SAFETY: set once, before this test spawns anything; other tests never read it.
    unsafe {
        std::env::set_var("ANTHROPIC_API_KEY", "sk-ant-test-secret-value");
        std::env::set_var("DATABASE_URL", "postgres://u:pw-secret@db/x");
    }
    let f = fixture();
    let r = f.ok("run_command", json!({"command": "env"})).await;
    let out = r["output"].as_str().unwrap();
    assert!(!out.contains("ANTHROPIC_API_KEY"), "{out}");
    assert!(!out.contains("sk-ant-test-secret-value"), "{out}");
    assert!(!out.contains("DATABASE_URL"), "{out}");
    assert!(!out.contains("pw-secret"), "{out}");
    assert!(out.contains("CI=true"), "{out}");
    assert!(out.contains("PATH="), "{out}");
}

#[tokio::test]
async fn run_command_output_is_capped() {
    let f = fixture();
    let r = f
        .ok(
            "run_command",
            json!({"command": "head -c 200000 /dev/zero | tr '\\0' 'a'"}),
        )
        .await;
    assert_eq!(r["truncated"], true);
    assert_eq!(r["exitCode"], 0);
    let out = r["output"].as_str().unwrap();
    assert!(out.len() < tools::OUTPUT_CAP_BYTES + 200, "{}", out.len());
    assert!(out.contains("[output truncated"));
}

#[tokio::test]
async fn run_command_timeout_kills_everything_it_started() {
    let f = fixture();
    let marker = format!("weldr-timeout-{}", std::process::id());
    let r = f
        .ok(
            "run_command",
            json!({"command": format!("sh -c 'sleep 300; : {marker}' & echo started; wait"), "timeoutSeconds": 1}),
        )
        .await;
    assert_eq!(r["timedOut"], true, "{r}");
    assert!(r["output"].as_str().unwrap().contains("started"));
    // The kill is sent before the tool returns; give the kernel a moment to tear it down.
    let mut left = processes_with(&marker);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = processes_with(&marker);
    }
    assert!(
        left.is_empty(),
        "the background child survived the timeout: {left:?}"
    );
}

#[tokio::test]
async fn run_command_rejects_empty_and_unknown_fields() {
    let f = fixture();
    assert!(
        f.err("run_command", json!({"command": "  "}))
            .await
            .contains("empty")
    );
    assert!(
        f.err("run_command", json!({"command": "ls", "cwd": "/"}))
            .await
            .contains("invalid input")
    );
}
