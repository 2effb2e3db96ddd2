//! The tools the engine offers the model, behind [`Tools`] so that tests can wrap them. The
//! real set is [`crate::tools`]: every path confined to the branch directory (relative only,
//! no `..`, nothing under `.git`, no symlink resolving outside), run_command in the sandbox
//! with a timeout, an output cap and no server secrets in its environment.

use std::path::Path;

use serde_json::Value;

use crate::llm::ToolSpec;

#[async_trait::async_trait]
pub trait Tools: Send + Sync {
    fn specs(&self) -> Vec<ToolSpec>;
    /// Run tool `name` in the branch directory `dir`: (content, is_error). Never panics on bad
    /// input: a failure is an error result the model reads.
    async fn execute(&self, dir: &Path, name: &str, input: &Value) -> (String, bool);
}

/// Tools that only read (offered while planning).
pub const READ_ONLY: &[&str] = &["read_file", "list_dir", "find", "grep"];

/// The agent's tools ([`crate::tools`]) in a branch directory, commands in `sandbox`.
#[derive(Default)]
pub struct BranchTools {
    pub sandbox: std::sync::Arc<crate::sandbox::Sandbox>,
}

#[async_trait::async_trait]
impl Tools for BranchTools {
    fn specs(&self) -> Vec<ToolSpec> {
        crate::tools::specs()
    }

    async fn execute(&self, dir: &Path, name: &str, input: &Value) -> (String, bool) {
        let workspace = match crate::tools::Workspace::with_sandbox(dir, self.sandbox.clone()) {
            Ok(ws) => ws,
            Err(e) => return (format!("the branch directory is not usable: {e}"), true),
        };
        match crate::tools::execute(&workspace, name, input).await.result {
            Ok(content) => (content, false),
            Err(message) => (message, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn confined_to_the_branch_dir() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("b");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(base.path(), dir.join("escape")).unwrap();
        let t = BranchTools::default();
        for bad in [
            "../x",
            "/etc/passwd",
            "escape/x",
            ".git/config",
            "a/../../x",
        ] {
            let (msg, err) = t
                .execute(
                    &dir,
                    "write_file",
                    &json!({"filePath": bad, "content": "x"}),
                )
                .await;
            assert!(err, "{bad}: {msg}");
        }
        assert!(!base.path().join("x").exists());
        let (out, err) = t
            .execute(
                &dir,
                "write_file",
                &json!({"filePath": "src/a.txt", "content": "hi"}),
            )
            .await;
        assert!(!err, "{out}");
        let (out, err) = t
            .execute(&dir, "read_file", &json!({"filePath": "src/a.txt"}))
            .await;
        assert!(!err && out.contains("hi"), "{out}");
        let (out, _) = t.execute(&dir, "list_dir", &json!({})).await;
        assert!(out.contains("src/"), "{out}");
        let (out, err) = t.execute(&dir, "no_such_tool", &json!({})).await;
        assert!(err, "{out}");
    }
}
