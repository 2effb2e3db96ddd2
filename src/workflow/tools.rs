//! The tools the engine offers the model, behind [`Tools`] so that the full tool module
//! (edit, delete, find, grep, run_command) replaces [`FsTools`] without touching the engine.
//! Every path is confined to the branch directory: relative only, no `..`, nothing under
//! `.git`, and no symlink resolving outside.

use std::path::{Component, Path, PathBuf};

use serde_json::{Value, json};

use crate::llm::ToolSpec;

/// Largest file `read_file` returns whole; longer content is truncated and says so.
const MAX_READ_BYTES: usize = 256 * 1024;
/// Largest `write_file` content.
const MAX_WRITE_BYTES: usize = 4 << 20;

#[async_trait::async_trait]
pub trait Tools: Send + Sync {
    fn specs(&self) -> Vec<ToolSpec>;
    /// Run tool `name` in the branch directory `dir`: (content, is_error). Never panics on bad
    /// input: a failure is an error result the model reads.
    async fn execute(&self, dir: &Path, name: &str, input: &Value) -> (String, bool);
}

/// Tools that only read (offered while planning).
pub const READ_ONLY: &[&str] = &["read_file", "list_dir", "find", "grep"];

/// `read_file`, `write_file` and `list_dir` on the real file system.
pub struct FsTools;

fn spec(name: &str, description: &str, schema: Value) -> ToolSpec {
    ToolSpec {
        name: name.into(),
        description: description.into(),
        input_schema: schema,
    }
}

/// `rel` inside `dir`, or why not.
pub fn confine(dir: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = Path::new(rel);
    if path.is_absolute() {
        return Err(format!(
            "{rel:?}: absolute paths are not allowed; use a path relative to the project root"
        ));
    }
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            _ => return Err(format!("{rel:?}: `..` and path prefixes are not allowed")),
        }
    }
    if clean
        .components()
        .next()
        .is_some_and(|c| c.as_os_str() == ".git")
    {
        return Err(format!("{rel:?}: the .git directory is off limits"));
    }
    let root = dir
        .canonicalize()
        .map_err(|e| format!("the branch directory is unavailable: {e}"))?;
    let full = root.join(&clean);
    // The deepest part of the path that exists must resolve inside the root (symlinks too).
    let mut probe = full.clone();
    loop {
        if probe.symlink_metadata().is_ok() {
            let real = probe
                .canonicalize()
                .map_err(|_| format!("{rel:?}: a symlink on this path points nowhere"))?;
            if !real.starts_with(&root) {
                return Err(format!("{rel:?} resolves outside the project"));
            }
            break;
        }
        if !probe.pop() || probe == root {
            break;
        }
    }
    Ok(full)
}

fn str_arg<'a>(input: &'a Value, key: &str) -> Result<&'a str, String> {
    input
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string argument `{key}`"))
}

fn read_file(dir: &Path, input: &Value) -> Result<String, String> {
    let rel = str_arg(input, "path")?;
    let path = confine(dir, rel)?;
    let bytes = std::fs::read(&path).map_err(|e| format!("{rel}: {e}"))?;
    let truncated = bytes.len() > MAX_READ_BYTES;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_READ_BYTES)]).into_owned();
    let total_lines = String::from_utf8_lossy(&bytes).lines().count();
    Ok(
        json!({"path": rel, "content": text, "totalLines": total_lines, "truncated": truncated})
            .to_string(),
    )
}

fn write_file(dir: &Path, input: &Value) -> Result<String, String> {
    let rel = str_arg(input, "path")?;
    let content = str_arg(input, "content")?;
    if content.len() > MAX_WRITE_BYTES {
        return Err(format!("content is larger than {MAX_WRITE_BYTES} bytes"));
    }
    let path = confine(dir, rel)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{rel}: {e}"))?;
        // Created directories are inside; re-check in case a symlink appeared meanwhile.
        confine(dir, rel)?;
    }
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(format!("{rel}: refusing to write through a symlink"));
    }
    std::fs::write(&path, content).map_err(|e| format!("{rel}: {e}"))?;
    Ok(format!("wrote {} bytes to {rel}", content.len()))
}

fn list_dir(dir: &Path, input: &Value) -> Result<String, String> {
    let rel = input.get("path").and_then(Value::as_str).unwrap_or(".");
    let path = confine(dir, rel)?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(|e| format!("{rel}: {e}"))? {
        let entry = entry.map_err(|e| format!("{rel}: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ".git" {
            continue;
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        names.push(if is_dir { format!("{name}/") } else { name });
    }
    names.sort();
    Ok(names.join("\n"))
}

#[async_trait::async_trait]
impl Tools for FsTools {
    fn specs(&self) -> Vec<ToolSpec> {
        vec![
            spec(
                "read_file",
                "Read a file of the project (path relative to the project root).",
                json!({"type":"object","properties":{"path":{"type":"string"}},"required":["path"]}),
            ),
            spec(
                "write_file",
                "Create or replace a file of the project with `content`.",
                json!({"type":"object","properties":{"path":{"type":"string"},"content":{"type":"string"}},"required":["path","content"]}),
            ),
            spec(
                "list_dir",
                "List a directory of the project (default: the root). Directories end with `/`.",
                json!({"type":"object","properties":{"path":{"type":"string"}}}),
            ),
        ]
    }

    async fn execute(&self, dir: &Path, name: &str, input: &Value) -> (String, bool) {
        let (dir, name, input) = (dir.to_path_buf(), name.to_string(), input.clone());
        let result = tokio::task::spawn_blocking(move || match name.as_str() {
            "read_file" => read_file(&dir, &input),
            "write_file" => write_file(&dir, &input),
            "list_dir" => list_dir(&dir, &input),
            other => Err(format!("unknown tool `{other}`")),
        })
        .await
        .unwrap_or_else(|e| Err(format!("the tool failed: {e}")));
        match result {
            Ok(content) => (content, false),
            Err(message) => (message, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn confined_to_the_branch_dir() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("b");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(base.path(), dir.join("escape")).unwrap();
        let t = FsTools;
        for bad in [
            "../x",
            "/etc/passwd",
            "escape/x",
            ".git/config",
            "a/../../x",
        ] {
            let (msg, err) = t
                .execute(&dir, "write_file", &json!({"path": bad, "content": "x"}))
                .await;
            assert!(err, "{bad}: {msg}");
        }
        assert!(!base.path().join("x").exists());
        let (_, err) = t
            .execute(
                &dir,
                "write_file",
                &json!({"path": "src/a.txt", "content": "hi"}),
            )
            .await;
        assert!(!err);
        let (out, err) = t
            .execute(&dir, "read_file", &json!({"path": "src/a.txt"}))
            .await;
        assert!(!err && out.contains("\"content\":\"hi\""), "{out}");
        let (out, _) = t.execute(&dir, "list_dir", &json!({})).await;
        assert!(out.contains("src/"), "{out}");
    }
}
