//! list_dir, read_file, write_file, edit_file, delete_file.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::{ChangeKind, Done, FileChange, ToolError, Workspace};

/// Most entries list_dir returns.
pub const LIST_DIR_MAX_ENTRIES: usize = 500;
/// Largest file read_file and edit_file take.
pub const MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Longest line read_file returns whole.
const MAX_LINE_CHARS: usize = 2000;

/// The input of `list_dir` (its JSON Schema is what the model sees: see [`super::specs`]).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListDirInput {
    /// Directory relative to the project root; default the root.
    pub path: Option<String>,
    /// How many levels deep to list.
    #[schemars(range(min = 1, max = 10), extend("default" = 2))]
    pub level: Option<usize>,
    /// List directories only.
    #[schemars(extend("default" = false))]
    pub directories_only: Option<bool>,
}

/// The input of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadFileInput {
    /// File path relative to the project root.
    pub file_path: String,
    /// First line to read (1-based).
    #[schemars(range(min = 1))]
    pub start_line: Option<usize>,
    /// Last line to read (inclusive).
    #[schemars(range(min = 1))]
    pub end_line: Option<usize>,
    /// Most lines to return.
    #[schemars(range(min = 1), extend("default" = 1500))]
    pub max_lines: Option<usize>,
}

/// The input of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteFileInput {
    /// File path relative to the project root.
    pub file_path: String,
    /// The complete new content of the file.
    pub content: String,
}

/// The input of `edit_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditFileInput {
    /// File path relative to the project root.
    pub file_path: String,
    /// The exact text to replace.
    pub old_text: String,
    /// The text to put in its place.
    pub new_text: String,
    /// Replace every occurrence.
    #[schemars(extend("default" = false))]
    pub replace_all: Option<bool>,
}

/// The input of `delete_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteFileInput {
    /// File path relative to the project root.
    pub file_path: String,
}

/// A walker over `dir` that honours .gitignore (even without a git repository), shows dotfiles,
/// skips `.git` and never follows symlinks.
pub(crate) fn walker(dir: &Path) -> ignore::WalkBuilder {
    let mut b = ignore::WalkBuilder::new(dir);
    b.hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .ignore(true)
        .parents(true)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git");
    b
}

/// The files of the branch at `dir`, sorted, at most `max` (and how many more there are):
/// what `.gitignore` and the snapshot excludes leave out is left out, as is `.git`.
pub fn tree_listing(dir: &Path, max: usize) -> (Vec<String>, usize) {
    let excludes = crate::excludes::Excludes::for_dir(dir);
    let mut files = Vec::new();
    let mut more = 0;
    let mut walk = walker(dir);
    walk.parents(false);
    for entry in walk.build() {
        let Ok(entry) = entry else { continue };
        let Ok(rel) = entry.path().strip_prefix(dir) else {
            continue;
        };
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        if entry.depth() == 0 || is_dir || excludes.is_excluded(rel, false) {
            continue;
        }
        if files.len() < max {
            files.push(rel.to_string_lossy().replace('\\', "/"));
        } else {
            more += 1;
        }
    }
    (files, more)
}

pub fn list_dir(ws: &Workspace, args: ListDirInput) -> Result<Done, ToolError> {
    let rel = args.path.unwrap_or_default();
    let dir = ws.resolve(&rel)?;
    let meta = std::fs::metadata(&dir).map_err(|e| io_err(&rel, e))?;
    if !meta.is_dir() {
        return Err(ToolError::Invalid(format!("{rel} is not a directory")));
    }
    let level = args.level.unwrap_or(2).clamp(1, 10);
    let dirs_only = args.directories_only.unwrap_or(false);
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in walker(&dir).max_depth(Some(level)).build() {
        let Ok(entry) = entry else { continue };
        if entry.depth() == 0 {
            continue;
        }
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        if dirs_only && !is_dir {
            continue;
        }
        if entries.len() >= LIST_DIR_MAX_ENTRIES {
            truncated = true;
            break;
        }
        let mut name = ws.relative(entry.path());
        if is_dir {
            name.push('/');
        }
        entries.push(name);
    }
    Ok(Done::new(json!({
        "path": ws.relative(&dir),
        "entries": entries,
        "truncated": truncated,
    })))
}

/// Read a text file whole, refusing directories, huge files and binary content.
fn read_text(ws: &Workspace, rel: &str) -> Result<(std::path::PathBuf, String), ToolError> {
    let path = ws.resolve(rel)?;
    let meta = std::fs::metadata(&path).map_err(|e| io_err(rel, e))?;
    if meta.is_dir() {
        return Err(ToolError::Invalid(format!("{rel} is a directory")));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ToolError::Invalid(format!(
            "{rel} is {} bytes, larger than the {MAX_FILE_BYTES}-byte limit",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The resolved path has no symlinks left; O_NOFOLLOW refuses one swapped in since.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|f| f.take(MAX_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|e| io_err(rel, e))?;
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return Err(ToolError::Invalid(format!("{rel} is a binary file")));
    }
    let text = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    Ok((path, text))
}

pub fn read_file(ws: &Workspace, args: ReadFileInput) -> Result<Done, ToolError> {
    let rel = args.file_path.as_str();
    let (_, text) = read_text(ws, rel)?;
    let lines: Vec<&str> = text.lines().collect();
    let total = lines.len();
    let max_lines = args.max_lines.unwrap_or(1500).max(1);
    let start = args.start_line.unwrap_or(1).max(1);
    if total == 0 {
        return Ok(Done::new(json!({
            "content": "", "totalLines": 0, "startLine": 0, "endLine": 0, "truncated": false,
        })));
    }
    if start > total {
        return Err(ToolError::Invalid(format!(
            "startLine {start} is past the end of {rel} ({total} lines)"
        )));
    }
    let requested_end = args.end_line.unwrap_or(total).min(total);
    if requested_end < start {
        return Err(ToolError::Invalid(format!(
            "endLine {requested_end} is before startLine {start}"
        )));
    }
    let mut end = requested_end;
    let mut truncated = false;
    if end - start + 1 > max_lines {
        end = start + max_lines - 1;
        truncated = true;
    }
    let mut content = String::new();
    for (i, line) in lines[start - 1..end].iter().enumerate() {
        if i > 0 {
            content.push('\n');
        }
        if line.chars().count() > MAX_LINE_CHARS {
            content.extend(line.chars().take(MAX_LINE_CHARS));
            content.push_str(" [line truncated]");
            truncated = true;
        } else {
            content.push_str(line);
        }
    }
    Ok(Done::new(json!({
        "content": content,
        "totalLines": total,
        "startLine": start,
        "endLine": end,
        "truncated": truncated,
    })))
}

/// Write `content` to `path` atomically: a temporary file in the same directory, renamed over
/// the target. An existing file keeps its mode; a new file gets 0644.
fn atomic_write(path: &Path, content: &[u8]) -> std::io::Result<bool> {
    let parent = path
        .parent()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "no parent directory"))?;
    std::fs::create_dir_all(parent)?;
    let existing = match std::fs::metadata(path) {
        Ok(m) => Some(m.permissions().mode()),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".weldr-tmp-")
        .tempfile_in(parent)?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    let mode = existing.unwrap_or(0o644) & 0o7777;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(existing.is_none())
}

pub fn write_file(ws: &Workspace, args: WriteFileInput) -> Result<Done, ToolError> {
    let rel = args.file_path.as_str();
    let path = ws.resolve_for_write(rel)?;
    let created = atomic_write(&path, args.content.as_bytes()).map_err(|e| io_err(rel, e))?;
    let path_rel = ws.relative(&path);
    Ok(Done {
        content: json!({
            "filePath": path_rel,
            "bytesWritten": args.content.len(),
            "created": created,
        }),
        changed: vec![FileChange {
            path: path_rel,
            kind: ChangeKind::Written,
        }],
    })
}

pub fn edit_file(ws: &Workspace, args: EditFileInput) -> Result<Done, ToolError> {
    let rel = args.file_path.as_str();
    if args.old_text.is_empty() {
        return Err(ToolError::Invalid(
            "oldText is empty; use write_file to create a file".into(),
        ));
    }
    if args.old_text == args.new_text {
        return Err(ToolError::Invalid(
            "oldText and newText are the same; nothing to change".into(),
        ));
    }
    // Check the write first so a refused path is refused before reading.
    let path = ws.resolve_for_write(rel)?;
    let (_, text) = read_text(ws, rel)?;
    let count = text.matches(args.old_text.as_str()).count();
    let replace_all = args.replace_all.unwrap_or(false);
    if count == 0 {
        let hint = if text.contains("\r\n") && !args.old_text.contains("\r\n") {
            " (the file uses CRLF line endings)"
        } else {
            ""
        };
        return Err(ToolError::Failed(format!(
            "oldText was not found in {rel}{hint}; read the file and copy the text exactly, \
             whitespace included"
        )));
    }
    if count > 1 && !replace_all {
        return Err(ToolError::Failed(format!(
            "oldText matches {count} times in {rel}; include more surrounding lines so it \
             matches exactly once, or set replaceAll"
        )));
    }
    let new = if replace_all {
        text.replace(args.old_text.as_str(), &args.new_text)
    } else {
        text.replacen(args.old_text.as_str(), &args.new_text, 1)
    };
    atomic_write(&path, new.as_bytes()).map_err(|e| io_err(rel, e))?;
    let path_rel = ws.relative(&path);
    Ok(Done {
        content: json!({ "filePath": path_rel, "replacements": count }),
        changed: vec![FileChange {
            path: path_rel,
            kind: ChangeKind::Written,
        }],
    })
}

pub fn delete_file(ws: &Workspace, args: DeleteFileInput) -> Result<Done, ToolError> {
    let rel = args.file_path.as_str();
    // The final component is not followed: deleting a symlink removes the link, which lies
    // inside the root, never its target.
    let (_, path) = ws.resolve_parent(rel)?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err(rel, e))?;
    if meta.is_dir() {
        return Err(ToolError::Invalid(format!(
            "{rel} is a directory; delete_file deletes files"
        )));
    }
    std::fs::remove_file(&path).map_err(|e| io_err(rel, e))?;
    let path_rel = ws.relative(&path);
    Ok(Done {
        content: json!({ "filePath": path_rel, "deleted": true }),
        changed: vec![FileChange {
            path: path_rel,
            kind: ChangeKind::Deleted,
        }],
    })
}

pub(crate) fn io_err(rel: &str, e: std::io::Error) -> ToolError {
    match e.kind() {
        ErrorKind::NotFound => ToolError::NotFound(format!("{rel} does not exist")),
        _ => ToolError::Io(format!("{rel}: {e}")),
    }
}
