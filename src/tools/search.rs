//! find (file names) and grep (contents, with ripgrep's crates). Both walk with `ignore`, so
//! .gitignore is honoured, `.git` is skipped and symlinks are never followed.

use std::fmt::Write as _;

use globset::{Glob, GlobMatcher};
use grep_regex::RegexMatcherBuilder;
use grep_searcher::{
    BinaryDetection, Searcher, SearcherBuilder, Sink, SinkContext, SinkContextKind, SinkMatch,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::files::walker;
use super::{Done, ToolError, Workspace};

/// Most candidates find collects before ranking.
const FIND_SCAN_LIMIT: usize = 10_000;
/// Longest line grep prints whole.
const GREP_MAX_LINE_CHARS: usize = 500;
/// Largest grep output.
const GREP_MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The input of `find` (its JSON Schema is what the model sees: see [`super::specs`]).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FindInput {
    /// Name substring or glob.
    pub query: String,
    /// List matching directories.
    #[schemars(extend("default" = true))]
    pub include_directories: Option<bool>,
    /// List matching files.
    #[schemars(extend("default" = true))]
    pub include_files: Option<bool>,
    /// Most results to return.
    #[schemars(range(min = 1, max = 1000), extend("default" = 20))]
    pub max_results: Option<usize>,
}

/// The input of `grep`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrepInput {
    /// Regular expression.
    pub pattern: String,
    /// Glob the files must match, e.g. `*.ts` or `src/**/*.rs`.
    pub file_pattern: Option<String>,
    /// Match regardless of case.
    #[schemars(extend("default" = false))]
    pub ignore_case: Option<bool>,
    /// Match whole words only.
    #[schemars(extend("default" = false))]
    pub whole_word: Option<bool>,
    /// Most matching lines to return.
    #[schemars(range(min = 1, max = 1000), extend("default" = 50))]
    pub max_results: Option<usize>,
    /// Lines of context around each match.
    #[schemars(range(min = 0, max = 10), extend("default" = 2))]
    pub context_lines: Option<usize>,
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// A name/path filter: a glob (on the path when it has `/`, else on the file name) or a
/// case-insensitive substring.
enum NameFilter {
    Glob { m: GlobMatcher, on_path: bool },
    Substring { needle: String, on_path: bool },
}

impl NameFilter {
    fn new(query: &str, glob_only: bool) -> Result<Self, ToolError> {
        let on_path = query.contains('/');
        if glob_only || is_glob(query) {
            let glob = Glob::new(query)
                .map_err(|e| ToolError::Invalid(format!("bad glob {query:?}: {e}")))?;
            Ok(Self::Glob {
                m: glob.compile_matcher(),
                on_path,
            })
        } else {
            Ok(Self::Substring {
                needle: query.to_lowercase(),
                on_path,
            })
        }
    }

    fn matches(&self, rel_path: &str, name: &str) -> bool {
        match self {
            Self::Glob { m, on_path } => m.is_match(if *on_path { rel_path } else { name }),
            Self::Substring { needle, on_path } => (if *on_path { rel_path } else { name })
                .to_lowercase()
                .contains(needle.as_str()),
        }
    }
}

pub fn find(ws: &Workspace, args: FindInput) -> Result<Done, ToolError> {
    let query = args.query.trim();
    if query.is_empty() {
        return Err(ToolError::Invalid("query is empty".into()));
    }
    let include_dirs = args.include_directories.unwrap_or(true);
    let include_files = args.include_files.unwrap_or(true);
    let max = args.max_results.unwrap_or(20).clamp(1, 1000);
    let filter = NameFilter::new(query, false)?;
    let lower = query.to_lowercase();
    let mut found: Vec<(bool, String)> = Vec::new();
    let mut scan_truncated = false;
    for entry in walker(ws.root()).build() {
        let Ok(entry) = entry else { continue };
        if entry.depth() == 0 {
            continue;
        }
        let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
        if (is_dir && !include_dirs) || (!is_dir && !include_files) {
            continue;
        }
        let rel = ws.relative(entry.path());
        let name = entry.file_name().to_string_lossy();
        if !filter.matches(&rel, &name) {
            continue;
        }
        if found.len() >= FIND_SCAN_LIMIT {
            scan_truncated = true;
            break;
        }
        let exact = name.to_lowercase() == lower;
        found.push((!exact, if is_dir { format!("{rel}/") } else { rel }));
    }
    // Exact name matches first, then shallow paths, then by path.
    found.sort_by(|a, b| {
        (a.0, a.1.matches('/').count(), &a.1).cmp(&(b.0, b.1.matches('/').count(), &b.1))
    });
    let total = found.len();
    let results: Vec<String> = found.into_iter().take(max).map(|(_, p)| p).collect();
    Ok(Done::new(json!({
        "results": results,
        "totalMatches": total,
        "truncated": scan_truncated || total > max,
    })))
}

/// Collects ripgrep-style output lines for one file.
struct Collect<'a> {
    rel: &'a str,
    out: &'a mut String,
    matches: &'a mut usize,
    max: usize,
    last_line: &'a mut Option<(String, u64)>,
}

impl Collect<'_> {
    fn line(&mut self, sep: char, number: u64, bytes: &[u8]) {
        if let Some((file, last)) = self.last_line.as_ref()
            && (file != self.rel || number > last + 1)
            && !self.out.is_empty()
        {
            self.out.push_str("--\n");
        }
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches(['\n', '\r']);
        let _ = write!(self.out, "{}{sep}{number}{sep}", self.rel);
        if text.chars().count() > GREP_MAX_LINE_CHARS {
            self.out.extend(text.chars().take(GREP_MAX_LINE_CHARS));
            self.out.push_str(" [line truncated]");
        } else {
            self.out.push_str(text);
        }
        self.out.push('\n');
        *self.last_line = Some((self.rel.to_string(), number));
    }
}

impl Sink for Collect<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _: &Searcher, mat: &SinkMatch<'_>) -> Result<bool, Self::Error> {
        let first = mat.line_number().unwrap_or(0);
        for (i, line) in mat.lines().enumerate() {
            if *self.matches >= self.max || self.out.len() >= GREP_MAX_OUTPUT_BYTES {
                return Ok(false);
            }
            *self.matches += 1;
            self.line(':', first + i as u64, line);
        }
        Ok(*self.matches < self.max && self.out.len() < GREP_MAX_OUTPUT_BYTES)
    }

    fn context(&mut self, _: &Searcher, ctx: &SinkContext<'_>) -> Result<bool, Self::Error> {
        if matches!(ctx.kind(), SinkContextKind::Before | SinkContextKind::After) {
            let n = ctx.line_number().unwrap_or(0);
            self.line('-', n, ctx.bytes());
        }
        Ok(self.out.len() < GREP_MAX_OUTPUT_BYTES)
    }
}

pub fn grep(ws: &Workspace, args: GrepInput) -> Result<Done, ToolError> {
    if args.pattern.is_empty() {
        return Err(ToolError::Invalid("pattern is empty".into()));
    }
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(args.ignore_case.unwrap_or(false))
        .word(args.whole_word.unwrap_or(false))
        .build(&args.pattern)
        .map_err(|e| ToolError::Invalid(format!("bad regular expression: {e}")))?;
    let files = match args.file_pattern.as_deref().map(str::trim) {
        Some(p) if !p.is_empty() => Some(NameFilter::new(p, true)?),
        _ => None,
    };
    let max = args.max_results.unwrap_or(50).clamp(1, 1000);
    let context = args.context_lines.unwrap_or(2).min(10);
    let mut searcher = SearcherBuilder::new()
        .line_number(true)
        .before_context(context)
        .after_context(context)
        .binary_detection(BinaryDetection::quit(0))
        .build();
    let mut out = String::new();
    let mut matches = 0usize;
    let mut files_matched = 0usize;
    let mut last_line = None;
    for entry in walker(ws.root()).build() {
        if matches >= max || out.len() >= GREP_MAX_OUTPUT_BYTES {
            break;
        }
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = ws.relative(entry.path());
        if let Some(f) = &files
            && !f.matches(&rel, &entry.file_name().to_string_lossy())
        {
            continue;
        }
        let before = matches;
        let sink = Collect {
            rel: &rel,
            out: &mut out,
            matches: &mut matches,
            max,
            last_line: &mut last_line,
        };
        // Unreadable files are skipped, as ripgrep does.
        let _ = searcher.search_path(&matcher, entry.path(), sink);
        if matches > before {
            files_matched += 1;
        }
    }
    let truncated = matches >= max || out.len() >= GREP_MAX_OUTPUT_BYTES;
    if matches == 0 {
        out = "no matches".into();
    }
    Ok(Done::new(json!({
        "matches": matches,
        "files": files_matched,
        "truncated": truncated,
        "output": out,
    })))
}
