//! The agent's tools, confined to one branch directory ([`Workspace`]).
//!
//! [`specs`] describes them to the model (name, description, JSON Schema of the input);
//! [`execute`] runs one call and always returns a [`ToolOutcome`]: a tool failure (bad input, a
//! refused path, a missing file, a command that fails) is a value the model reads, never a panic
//! or an error that stops the caller. Outcomes also say which files the call wrote or deleted,
//! so the engine can stream them. The workflow engine adds its own `submit_plan` and `done`.

mod command;
mod files;
mod search;
mod workspace;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::llm::ToolSpec;
use crate::llm::schema::tool_schema;

pub use command::{
    DEFAULT_TIMEOUT_SECS, ENV_ALLOWLIST, MAX_TIMEOUT_SECS, OUTPUT_CAP_BYTES, RunCommandInput,
};
pub use files::{
    DeleteFileInput, EditFileInput, ListDirInput, ReadFileInput, WriteFileInput, tree_listing,
};
pub use search::{FindInput, GrepInput};
pub use workspace::Workspace;

/// Why a tool call failed. Its text is what the model reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolError {
    /// The path (or request) would reach outside the branch directory, or into `.git`.
    #[error("refused: {0}")]
    Refused(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
    #[error("i/o error: {0}")]
    Io(String),
}

/// What a call did to a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Written,
    Deleted,
}

/// A file a call changed, relative to the branch root with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    pub kind: ChangeKind,
}

/// The result of one tool call: content for the model or an error message, plus the files the
/// call changed. `run_command` reports no changes (it cannot know them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub result: Result<String, String>,
    pub changed: Vec<FileChange>,
}

impl ToolOutcome {
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            result: Ok(content.into()),
            changed: Vec::new(),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            result: Err(message.into()),
            changed: Vec::new(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.result.is_err()
    }

    /// The text that goes back to the model (content or error message).
    pub fn content(&self) -> &str {
        match &self.result {
            Ok(s) | Err(s) => s,
        }
    }
}

/// What a tool body returns before it becomes an outcome.
pub(crate) struct Done {
    pub content: Value,
    pub changed: Vec<FileChange>,
}

impl Done {
    pub(crate) fn new(content: Value) -> Self {
        Self {
            content,
            changed: Vec::new(),
        }
    }
}

/// The names of the tools [`execute`] knows.
pub const TOOL_NAMES: &[&str] = &[
    "list_dir",
    "read_file",
    "write_file",
    "edit_file",
    "delete_file",
    "find",
    "grep",
    "run_command",
];

/// Descriptions and input schemas of every tool, for the model. Each schema is derived from
/// the struct [`execute`] deserializes that tool's arguments into.
pub fn specs() -> Vec<ToolSpec> {
    fn spec<T: schemars::JsonSchema>(name: &str, description: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: description.into(),
            input_schema: tool_schema::<T>(),
        }
    }
    vec![
        spec::<ListDirInput>(
            "list_dir",
            "List files and directories under a directory of the project (relative path; the root \
             by default), down to `level` levels. Honours .gitignore and skips .git. Directories \
             end with `/`. Paths are relative to the project root.",
        ),
        spec::<ReadFileInput>(
            "read_file",
            "Read a text file (relative path). Lines are 1-based and inclusive; at most `maxLines` \
             lines come back and `truncated` says when more were left out. Returns JSON \
             {content, totalLines, startLine, endLine, truncated}.",
        ),
        spec::<WriteFileInput>(
            "write_file",
            "Create or overwrite a file with the given content (relative path; parent directories \
             are created). Use edit_file for small changes to an existing file.",
        ),
        spec::<EditFileInput>(
            "edit_file",
            "Replace an exact piece of text in a file. `oldText` must match the file exactly \
             (whitespace and indentation included) and exactly once, unless `replaceAll` is true; \
             include enough surrounding lines to make it unique.",
        ),
        spec::<DeleteFileInput>("delete_file", "Delete a file (relative path)."),
        spec::<FindInput>(
            "find",
            "Find files and directories by name: a case-insensitive substring of the name (or of \
             the path when the query contains `/`), or a glob such as `*.tsx` or `src/**/*.rs`. \
             Honours .gitignore.",
        ),
        spec::<GrepInput>(
            "grep",
            "Search file contents with a regular expression (Rust regex syntax, like ripgrep). \
             Honours .gitignore, skips binary files. Output lines are `path:line:text` for matches \
             and `path-line-text` for context.",
        ),
        spec::<RunCommandInput>(
            "run_command",
            "Run a shell command (`sh -c`) in the project root, e.g. to build, test or install. \
             No secrets are in its environment (CI=true is set). It is killed with all its \
             children after `timeoutSeconds`; output (stdout and stderr together) is capped at \
             64 KiB. Returns JSON {exitCode, output, truncated, timedOut}.",
        ),
    ]
}

/// Run the tool `name` with `input` in `ws`. Never panics the caller and never fails: every
/// failure is an error outcome.
pub async fn execute(ws: &Workspace, name: &str, input: &Value) -> ToolOutcome {
    let result = match name {
        "list_dir" => blocking(ws, input, files::list_dir).await,
        "read_file" => blocking(ws, input, files::read_file).await,
        "write_file" => blocking(ws, input, files::write_file).await,
        "edit_file" => blocking(ws, input, files::edit_file).await,
        "delete_file" => blocking(ws, input, files::delete_file).await,
        "find" => blocking(ws, input, search::find).await,
        "grep" => blocking(ws, input, search::grep).await,
        "run_command" => match parse::<RunCommandInput>(input) {
            Ok(args) => command::run_command(ws, args).await,
            Err(e) => Err(e),
        },
        other => Err(ToolError::Invalid(format!(
            "unknown tool `{other}`; the tools are: {}",
            TOOL_NAMES.join(", ")
        ))),
    };
    match result {
        Ok(done) => ToolOutcome {
            result: Ok(match done.content {
                Value::String(s) => s,
                v => v.to_string(),
            }),
            changed: done.changed,
        },
        Err(e) => ToolOutcome::error(e.to_string()),
    }
}

fn parse<T: DeserializeOwned>(input: &Value) -> Result<T, ToolError> {
    // A model that calls a tool without arguments may send null.
    let input = if input.is_null() {
        json!({})
    } else {
        input.clone()
    };
    serde_json::from_value(input).map_err(|e| ToolError::Invalid(e.to_string()))
}

/// Parse the input, then run the blocking tool body on the blocking pool.
async fn blocking<T, F>(ws: &Workspace, input: &Value, f: F) -> Result<Done, ToolError>
where
    T: DeserializeOwned + Send + 'static,
    F: FnOnce(&Workspace, T) -> Result<Done, ToolError> + Send + 'static,
{
    let args = parse::<T>(input)?;
    let ws = ws.clone();
    match tokio::task::spawn_blocking(move || f(&ws, args)).await {
        Ok(r) => r,
        Err(e) => Err(ToolError::Failed(format!(
            "the tool stopped unexpectedly: {e}"
        ))),
    }
}
