//! What a workflow's model sees besides its own turns: the branch's conversation so far (the
//! thread), the project's instructions (`AGENTS.md`), and the state of the tree (its files and
//! latest versions). And the context budget: every request is kept within the model's context
//! window, first by shortening old tool results, then by replacing older turns with a summary
//! the model writes once (see [`Budget`]).
//!
//! Everything here is a pure function of its inputs, so that a request built after a restart
//! is the request that would have been built before it, and a stable prefix stays byte-equal
//! from one call to the next (the providers' prompt caches depend on it).

use std::path::Path;

use weldr_storage::conversation::{ConversationEntry, EntryKind};
use weldr_storage::model::VersionRecord;

use crate::llm::{Message, Part, Role, ToolSpec};

/// Files whose text goes into the system prompt as the project's instructions, first found
/// wins: the convention Codex, OpenCode and others follow, then the fallbacks.
pub const INSTRUCTION_FILES: &[&str] = &["AGENTS.md", "CLAUDE.md", ".cursorrules"];
/// Most bytes of project instructions kept.
pub const MAX_INSTRUCTION_BYTES: usize = 16 * 1024;
/// Most files named in the tree listing.
pub const TREE_FILES: usize = 300;
/// Versions listed in the context.
pub const CONTEXT_VERSIONS: usize = 5;
/// Tokens an image is counted for (Anthropic bills about (w×h)/750, ~1,600 for a 1,200 px
/// square; OpenAI and Gemini a few hundred to ~1,100).
pub const IMAGE_TOKENS: u64 = 1_600;

/// The project's instructions in the branch at `dir`: the first of [`INSTRUCTION_FILES`] that
/// is a regular file (never followed through a symlink), cut at [`MAX_INSTRUCTION_BYTES`].
pub fn read_instructions(dir: &Path) -> Option<(String, String)> {
    for name in INSTRUCTION_FILES {
        let path = dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let Some(bytes) = read_no_follow(dir, name, MAX_INSTRUCTION_BYTES as u64 + 1) else {
            continue;
        };
        let cut = bytes.len() > MAX_INSTRUCTION_BYTES;
        let mut text =
            String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_INSTRUCTION_BYTES)]).into_owned();
        if text.ends_with('\u{FFFD}') {
            // A character cut in two at the limit.
            text.pop();
        }
        if cut {
            text.push_str(&format!(
                "\n[{name} is longer than {MAX_INSTRUCTION_BYTES} bytes; the rest is left out]"
            ));
        }
        if text.trim().is_empty() {
            continue;
        }
        return Some((name.to_string(), text));
    }
    None
}

/// At most `limit` bytes of the regular file `name` in `dir`, opened without following a
/// symlink.
fn read_no_follow(dir: &Path, name: &str, limit: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = crate::fsx::Dir::open(dir).ok()?.read(name).ok()?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The system prompt: the phase's instructions, then the project's.
pub fn system_prompt(base: &str, instructions: Option<&(String, String)>) -> String {
    match instructions {
        None => base.to_string(),
        Some((name, text)) => format!(
            "{base}\n\nThe project's instructions (from {name}; follow them unless the user's \
             request says otherwise):\n<project-instructions>\n{text}\n</project-instructions>"
        ),
    }
}

/// What the model is told about the branch before the request: its files (at most
/// [`TREE_FILES`], what snapshots and `.gitignore` leave out omitted) and its latest versions.
pub fn tree_context(dir: &Path, versions: &[VersionRecord]) -> String {
    let (files, more) = crate::tools::tree_listing(dir, TREE_FILES);
    let mut out = String::from("The project's files now:\n");
    if files.is_empty() {
        out.push_str("(none yet)\n");
    }
    for f in &files {
        out.push_str(f);
        out.push('\n');
    }
    if more > 0 {
        out.push_str(&format!("… and {more} more files\n"));
    }
    if !versions.is_empty() {
        out.push_str("\nLatest versions (newest last):\n");
        let from = versions.len().saturating_sub(CONTEXT_VERSIONS);
        for v in &versions[from..] {
            let files: Vec<&str> = v.changed.iter().take(8).map(|c| c.path.as_str()).collect();
            out.push_str(&format!(
                "v{}: {}{}\n",
                v.seq,
                one_line(&v.message, 160),
                if files.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}{})",
                        files.join(", "),
                        if v.changed.len() > files.len() {
                            format!(", +{}", v.changed.len() - files.len())
                        } else {
                            String::new()
                        }
                    )
                }
            ));
        }
    }
    out
}

/// The first line of `s`, at most `n` characters.
pub fn one_line(s: &str, n: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(n).collect();
    if line.chars().count() > n || s.lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

/// The thread as the model reads it: the summary (if any) then each entry, user messages as
/// user turns and each workflow's outcome as the assistant's turn, consecutive same-role
/// entries merged (the APIs want roles to alternate). Attachments of earlier messages are
/// named, not sent again.
pub fn thread_messages(
    summary: Option<&ConversationEntry>,
    entries: &[ConversationEntry],
) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    let mut push = |role: Role, text: String| {
        if text.trim().is_empty() {
            return;
        }
        match out.last_mut() {
            Some(m) if m.role == role => m.parts.push(Part::Text { text }),
            _ => out.push(Message {
                role,
                parts: vec![Part::Text { text }],
            }),
        }
    };
    if let Some(s) = summary {
        push(
            Role::User,
            format!("[Summary of the earlier conversation]\n{}", s.text),
        );
    }
    for e in entries {
        match e.kind {
            EntryKind::Summary => {}
            EntryKind::User => push(Role::User, user_text(e)),
            EntryKind::Assistant => push(Role::Assistant, outcome_text(e)),
        }
    }
    // A thread ends with the assistant (the next message is the new request); one that ends
    // with a user message (its workflow left no outcome) is closed so.
    if out.last().is_some_and(|m| m.role == Role::User) {
        out.push(Message {
            role: Role::Assistant,
            parts: vec![Part::Text {
                text: "[no answer was recorded for this message]".into(),
            }],
        });
    }
    // A thread that starts with the assistant cannot be sent as it is.
    if out.first().is_some_and(|m| m.role == Role::Assistant) {
        out.insert(0, Message::user_text("[the conversation so far]"));
    }
    out
}

/// A user entry as text: its text and the names of its attachments.
pub fn user_text(e: &ConversationEntry) -> String {
    let mut text = e.text.clone();
    for a in &e.attachments {
        text.push_str(&format!(
            "\n[attached: {} ({}, {} bytes)]",
            a.filename.as_deref().unwrap_or(&a.id[..a.id.len().min(12)]),
            a.media_type,
            a.size
        ));
    }
    text
}

/// An outcome entry as the assistant's compact account of the workflow.
pub fn outcome_text(e: &ConversationEntry) -> String {
    let mut out = String::new();
    if let Some(plan) = &e.plan_json
        && let Ok(plan) = serde_json::from_str::<serde_json::Value>(plan)
        && let Some(tasks) = plan["tasks"].as_array()
    {
        out.push_str("Plan:\n");
        for t in tasks {
            out.push_str(&format!(
                "{}. {}\n",
                t["id"],
                one_line(t["summary"].as_str().unwrap_or(""), 200)
            ));
        }
    }
    if !e.tool_calls.is_empty() {
        // Per tool: how many calls, the first few targets.
        let mut tools: Vec<(&str, usize, Vec<&str>, usize)> = Vec::new();
        for c in &e.tool_calls {
            let i = match tools.iter().position(|t| t.0 == c.name) {
                Some(i) => i,
                None => {
                    tools.push((c.name.as_str(), 0, Vec::new(), 0));
                    tools.len() - 1
                }
            };
            let t = &mut tools[i];
            t.1 += 1;
            t.3 += usize::from(c.is_error);
            if t.2.len() < 4 && !c.target.is_empty() {
                t.2.push(c.target.as_str());
            }
        }
        let shown: Vec<String> = tools
            .iter()
            .map(|(name, n, targets, failed)| {
                let mut s = format!("{name} ×{n}");
                if !targets.is_empty() {
                    s.push_str(&format!(
                        " ({}{})",
                        targets.join(", "),
                        if *n > targets.len() { ", …" } else { "" }
                    ));
                }
                if *failed > 0 {
                    s.push_str(&format!(", {failed} failed"));
                }
                s
            })
            .collect();
        out.push_str(&format!("Tool calls: {}\n", shown.join("; ")));
    }
    match e.status.as_deref() {
        Some("complete") => match e.version {
            Some(v) => out.push_str(&format!(
                "Done: version v{v}{}.\n",
                if e.files_changed.is_empty() {
                    String::new()
                } else {
                    format!(" changed {}", e.files_changed.join(", "))
                }
            )),
            None if e.plan_json.is_some() => out.push_str("Done: nothing to commit.\n"),
            None => {}
        },
        Some("cancelled") => out.push_str(&format!(
            "Cancelled by the user.{}\n",
            if e.files_changed.is_empty() {
                String::new()
            } else {
                format!(
                    " Uncommitted changes left in the working tree: {}.",
                    e.files_changed.join(", ")
                )
            }
        )),
        Some("failed") => out.push_str(&format!(
            "Failed: {}\n",
            one_line(e.error.as_deref().unwrap_or("unknown error"), 500)
        )),
        _ => {}
    }
    if !e.text.trim().is_empty() {
        out.push_str(&e.text);
    }
    out
}

/// Where to cut a thread that takes more than its share: how many of `entries` (oldest
/// first) to summarize so that the newer ones, kept whole, take at most `keep` tokens.
pub fn thread_cut<'a>(
    entries: impl IntoIterator<Item = &'a ConversationEntry>,
    keep: f64,
) -> usize {
    let entries: Vec<&ConversationEntry> = entries.into_iter().collect();
    let mut tail = 0.0;
    let mut cut = entries.len();
    while cut > 0 {
        let e = entries[cut - 1];
        let t = text_tokens(&match e.kind {
            EntryKind::User => user_text(e),
            _ => outcome_text(e),
        }) as f64;
        if tail + t > keep {
            break;
        }
        tail += t;
        cut -= 1;
    }
    cut
}

/// Estimated tokens of a text: about four characters per token for English and code (the
/// engine scales this by what the provider reports, see [`Budget::calibrate`]).
pub fn text_tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4)
}

/// Estimated tokens of a message (a few for its framing).
pub fn message_tokens(m: &Message) -> u64 {
    4 + m
        .parts
        .iter()
        .map(|p| match p {
            Part::Text { text } | Part::Reasoning { text, .. } => text_tokens(text),
            Part::Image { .. } => IMAGE_TOKENS,
            Part::ToolCall { name, input, .. } => {
                8 + text_tokens(name) + text_tokens(&input.to_string())
            }
            Part::ToolResult { content, name, .. } => 8 + text_tokens(name) + text_tokens(content),
        })
        .sum::<u64>()
}

/// Estimated tokens of the system prompt and the tool specs.
pub fn fixed_tokens(system: &str, tools: &[ToolSpec]) -> u64 {
    text_tokens(system)
        + tools
            .iter()
            .map(|t| {
                8 + text_tokens(&t.name)
                    + text_tokens(&t.description)
                    + text_tokens(&t.input_schema.to_string())
            })
            .sum::<u64>()
}

/// Characters of a shortened tool result's head and of its tail.
const KEEP_HEAD: usize = 600;
const KEEP_TAIL: usize = 400;

/// A tool result cut to its head and tail (what the call returned first and last is usually
/// what matters: the start of a file, the end of a command's output).
pub fn shorten(content: &str) -> String {
    let count = content.chars().count();
    if count <= KEEP_HEAD + KEEP_TAIL + 100 {
        return content.to_string();
    }
    let head: String = content.chars().take(KEEP_HEAD).collect();
    let tail: String = content.chars().skip(count - KEEP_TAIL).collect();
    format!(
        "{head}\n[… {} characters of this old result left out to save context …]\n{tail}",
        count - KEEP_HEAD - KEEP_TAIL
    )
}

/// The context budget of one conversation: the window and the output reserved, and the
/// engine's scale from its estimates to the provider's counts.
#[derive(Debug, Clone)]
pub struct Budget {
    /// The model's context window (or `WELDR_CONTEXT_TOKENS`).
    pub window: u64,
    /// Provider tokens per estimated token, learned from usage reports (at least 1).
    scale: f64,
}

/// Of the prompt budget, the share the thread of earlier workflows may take before its older
/// part is summarized, and what it is summarized down to.
pub const THREAD_SHARE: f64 = 0.30;
pub const THREAD_KEEP_SHARE: f64 = 0.15;
/// When results are shortened, they are shortened until the request is under this share of
/// the budget: so that the next calls append to an unchanged prefix for a while.
pub const SHORTEN_TARGET: f64 = 0.70;
/// When older turns are summarized, the turns kept whole take at most this share.
pub const SUMMARY_KEEP_SHARE: f64 = 0.40;

impl Budget {
    pub fn new(window: u32) -> Self {
        Self {
            window: u64::from(window),
            scale: 1.0,
        }
    }

    /// Prompt tokens a request may take when `max_tokens` are asked for its output (5% of
    /// the window is kept back for the estimate's error).
    pub fn prompt_limit(&self, max_tokens: u32) -> u64 {
        let margin = (self.window / 20).max(256);
        self.window
            .saturating_sub(u64::from(max_tokens))
            .saturating_sub(margin)
    }

    /// The output tokens a request of `prompt` estimated tokens leaves room for (at least
    /// 256: a request that leaves less is refused by the provider with a clear message).
    pub fn output_room(&self, prompt: u64) -> u32 {
        let margin = (self.window / 20).max(256);
        let room = self
            .window
            .saturating_sub(margin)
            .saturating_sub(self.scaled(prompt));
        u32::try_from(room).unwrap_or(u32::MAX).max(256)
    }

    /// The output tokens a request's prompt is planned with: a quarter of the window.
    pub fn output_cap(&self) -> u32 {
        u32::try_from(self.window / 4).unwrap_or(u32::MAX).max(256)
    }

    /// Estimated provider tokens of an estimate.
    pub fn scaled(&self, estimate: u64) -> u64 {
        (estimate as f64 * self.scale).ceil() as u64
    }

    /// Count a quarter more per token: the provider found a request longer than estimated.
    pub fn grow(&mut self) {
        self.scale = (self.scale * 1.25).min(4.0);
    }

    /// Learn from a provider's report: the request estimated at `estimate` took `reported`
    /// prompt tokens. The scale only grows (an overestimate is safe) and is capped.
    pub fn calibrate(&mut self, estimate: u64, reported: u64) {
        if estimate > 0 && reported > 0 {
            let ratio = reported as f64 / estimate as f64;
            if ratio > self.scale {
                self.scale = ratio.min(4.0);
            }
        }
    }
}

/// Shorten the tool results of `messages[..upto]`; returns how many changed.
pub fn shorten_results(messages: &mut [Message], upto: usize) -> usize {
    let mut changed = 0;
    for m in messages.iter_mut().take(upto) {
        for p in m.parts.iter_mut() {
            if let Part::ToolResult { content, .. } = p {
                let short = shorten(content);
                if short.len() < content.len() {
                    *content = short;
                    changed += 1;
                }
            }
        }
    }
    changed
}

/// The watermark to shorten tool results to: the smallest index `w >= current` (never past
/// the last message, whose results the model needs whole) such that shortening the results
/// of `messages[..w]` brings the total under `target` tokens; the most it may be when even
/// that is not enough.
pub fn shorten_watermark(
    messages: &[Message],
    current: usize,
    fixed: u64,
    target: u64,
    scale: impl Fn(u64) -> u64,
) -> usize {
    let last = messages.len().saturating_sub(1);
    let mut sizes: Vec<u64> = messages.iter().map(message_tokens).collect();
    let short_size = |m: &Message| {
        let mut m = m.clone();
        shorten_results(std::slice::from_mut(&mut m), 1);
        message_tokens(&m)
    };
    for (i, m) in messages.iter().enumerate().take(current.min(last)) {
        sizes[i] = short_size(m);
    }
    let mut total: u64 = sizes.iter().sum();
    let mut w = current.min(last);
    while scale(fixed + total) > target && w < last {
        let short = short_size(&messages[w]);
        total = total - sizes[w] + short;
        w += 1;
    }
    w
}

/// Where to cut a conversation for a summary: the index `k` of an assistant message (so the
/// kept part starts with the assistant and keeps each tool call with its result) such that
/// `messages[k..]` takes at most `keep` tokens; None when no cut leaves at least one turn
/// to summarize (`k > first`).
pub fn summary_cut(messages: &[Message], first: usize, keep: u64) -> Option<usize> {
    let mut tail = 0u64;
    let mut best = None;
    for k in (first + 1..messages.len()).rev() {
        tail += message_tokens(&messages[k]);
        if tail > keep {
            break;
        }
        if messages[k].role == Role::Assistant {
            best = Some(k);
        }
    }
    // The newest turn stays whole even when it alone is over `keep`.
    best.or_else(|| {
        (first + 1..messages.len())
            .rev()
            .find(|&k| messages[k].role == Role::Assistant && k > first + 1)
    })
}

/// A workflow's own messages as sent: the opening with the attachments (and the summary of
/// older turns, if any), then the messages the summary does not stand for.
pub fn own_messages(
    messages: &[Message],
    summary: Option<&(usize, String)>,
    phase_opening: Option<&(usize, Vec<Part>)>,
    attachments: &[Part],
) -> Vec<Message> {
    let Some(first) = messages.first() else {
        return Vec::new();
    };
    let mut opening = first.clone();
    opening.parts.extend(attachments.iter().cloned());
    let mut out = vec![opening];
    let from = match summary {
        Some((upto, text)) if *upto > 1 && *upto < messages.len() => {
            out[0].parts.push(Part::Text {
                text: format!("[Summary of the steps taken so far]\n{text}"),
            });
            // The current phase's instructions stay whole.
            if let Some((index, parts)) = phase_opening
                && *index > 0
                && *index < *upto
            {
                out[0].parts.extend(parts.iter().cloned());
            }
            *upto
        }
        _ => 1,
    };
    out.extend(messages[from..].iter().cloned());
    out
}

/// A request's messages within the budget, and how many the next request sends unchanged.
pub struct Fitted {
    pub messages: Vec<Message>,
    pub stable_prefix: usize,
    /// The request's estimated prompt tokens (system prompt and tools included), unscaled.
    pub tokens: u64,
}

/// The thread then `own` (the workflow's messages), within `limit` prompt tokens (with
/// `fixed` for the system prompt and tools): tool results before `watermark` are shortened,
/// and when the request is over the limit the watermark moves on (see
/// [`shorten_watermark`]). None when even that is not enough: older turns must be
/// summarized.
pub fn fit(
    thread: &[Message],
    mut own: Vec<Message>,
    fixed: u64,
    limit: u64,
    budget: &Budget,
    watermark: &mut usize,
) -> Option<Fitted> {
    let thread_tokens: u64 = thread.iter().map(message_tokens).sum();
    let before = *watermark;
    let total = fixed + thread_tokens + own.iter().map(message_tokens).sum::<u64>();
    if budget.scaled(total) > limit {
        let target = (limit as f64 * SHORTEN_TARGET) as u64;
        *watermark = shorten_watermark(&own, before, fixed + thread_tokens, target, |t| {
            budget.scaled(t)
        });
    }
    if *watermark > 0 {
        shorten_results(&mut own, *watermark);
    }
    let total = fixed + thread_tokens + own.iter().map(message_tokens).sum::<u64>();
    if budget.scaled(total) > limit {
        return None;
    }
    let mut messages = Vec::with_capacity(thread.len() + own.len());
    messages.extend_from_slice(thread);
    messages.extend(own);
    // The stable part of the history: everything but the newest message. The newest tool
    // results are what the next request shortens first when it must (older ones are cut
    // already); the rest usually stays, and when the newest stays too, Anthropic's breakpoint
    // on the last message lets the next request read all of it from the cache.
    let stable_prefix = (messages.len() - 1).max(thread.len());
    Some(Fitted {
        messages,
        stable_prefix,
        tokens: total,
    })
}

/// What to summarize when a request does not fit even with every older result shortened:
/// the messages from the end of the current summary (if any) to a cut that leaves the newer
/// turns within [`SUMMARY_KEEP_SHARE`] of `limit`, led by the current summary's text; and the
/// cut (the new summary's `upto`). None when there is nothing older left to summarize.
pub fn to_summarize(
    messages: &[Message],
    summary: Option<&(usize, String)>,
    limit: u64,
) -> Option<(usize, Vec<Message>)> {
    let keep = (limit as f64 * SUMMARY_KEEP_SHARE) as u64;
    let start = summary.map(|(u, _)| *u).unwrap_or(1).max(1);
    let cut = summary_cut(messages, start - 1, keep)?;
    if cut <= start {
        return None;
    }
    let mut old = Vec::new();
    if let Some((_, text)) = summary {
        old.push(Message::user_text(format!(
            "[Summary of the earlier steps]\n{text}"
        )));
    }
    old.extend(messages[start..cut].iter().cloned());
    Some((cut, old))
}

/// The transcript a summary is written from: each message as text, tool results shortened.
pub fn transcript(messages: &[Message], max_chars: usize) -> String {
    let mut out = String::new();
    for m in messages {
        let who = match m.role {
            Role::User => "USER",
            Role::Assistant => "ASSISTANT",
        };
        for p in &m.parts {
            let line = match p {
                Part::Text { text } => format!("{who}: {text}\n"),
                Part::Reasoning { .. } => continue,
                Part::Image { media_type, .. } => format!("{who}: [image {media_type}]\n"),
                Part::ToolCall { name, input, .. } => {
                    format!(
                        "ASSISTANT calls {name} {}\n",
                        one_line(&input.to_string(), 300)
                    )
                }
                Part::ToolResult {
                    name,
                    content,
                    is_error,
                    ..
                } => format!(
                    "RESULT of {name}{}: {}\n",
                    if *is_error { " (error)" } else { "" },
                    shorten(content)
                ),
            };
            out.push_str(&line);
        }
    }
    if out.len() > max_chars {
        // Keep the start and the end; the middle goes.
        let head: String = out.chars().take(max_chars / 2).collect();
        let tail_start = out.chars().count().saturating_sub(max_chars / 2);
        let tail: String = out.chars().skip(tail_start).collect();
        out = format!("{head}\n[…]\n{tail}");
    }
    out
}

/// The summary written when the model cannot write one: every user message's first line and
/// the tool calls, so that no request is lost from the thread.
pub fn extractive_summary(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        for p in &m.parts {
            match (m.role, p) {
                (Role::User, Part::Text { text }) => {
                    out.push_str(&format!("- user: {}\n", one_line(text, 300)))
                }
                (Role::Assistant, Part::Text { text }) if !text.trim().is_empty() => {
                    out.push_str(&format!("- assistant: {}\n", one_line(text, 200)))
                }
                (_, Part::ToolCall { name, input, .. }) => out.push_str(&format!(
                    "- called {name} {}\n",
                    one_line(&input.to_string(), 120)
                )),
                _ => {}
            }
        }
    }
    out
}

/// The system prompt of a summary request.
pub const SUMMARY_SYSTEM: &str = "You summarize a coding agent's conversation so that the \
agent can continue the work without it. Keep: every request the user made (close to their \
words) and every question and answer, decisions taken, files created or changed and why, \
commands run and what they showed, errors met and how they were fixed, and what remains to \
do. Be concise: at most a few hundred words, plain text, no preamble.";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn turn(call: &str) -> Message {
        Message {
            role: Role::Assistant,
            parts: vec![Part::ToolCall {
                id: call.into(),
                name: "read_file".into(),
                input: json!({"filePath": "a"}),
            }],
        }
    }

    fn result(call: &str, len: usize) -> Message {
        Message {
            role: Role::User,
            parts: vec![Part::ToolResult {
                id: call.into(),
                name: "read_file".into(),
                content: "x".repeat(len),
                is_error: false,
            }],
        }
    }

    #[test]
    fn shortening_keeps_head_and_tail_and_the_last_result() {
        let s = shorten(&format!("{}{}", "a".repeat(5000), "z".repeat(5000)));
        assert!(s.starts_with(&"a".repeat(KEEP_HEAD)));
        assert!(s.ends_with(&"z".repeat(KEEP_TAIL)));
        assert!(s.len() < 1200);
        assert_eq!(shorten("short"), "short");

        let mut msgs = vec![Message::user_text("do it")];
        for i in 0..10 {
            msgs.push(turn(&format!("c{i}")));
            msgs.push(result(&format!("c{i}"), 8000));
        }
        let w = shorten_watermark(&msgs, 0, 0, 1000, |t| t);
        // Never the last message.
        assert_eq!(w, msgs.len() - 1);
        let w2 = shorten_watermark(&msgs, 0, 0, 15_000, |t| t);
        assert!(w2 < w && w2 > 0, "{w2}");
        // Monotonic: never below the current watermark.
        assert_eq!(shorten_watermark(&msgs, 7, 0, 1_000_000, |t| t), 7);
    }

    #[test]
    fn summary_cut_starts_at_an_assistant_turn() {
        let mut msgs = vec![Message::user_text("do it")];
        for i in 0..10 {
            msgs.push(turn(&format!("c{i}")));
            msgs.push(result(&format!("c{i}"), 400));
        }
        let k = summary_cut(&msgs, 0, 500).unwrap();
        assert_eq!(msgs[k].role, Role::Assistant);
        assert!(k > 1);
        assert!(msgs[k..].iter().map(message_tokens).sum::<u64>() <= 500);
        assert_eq!(summary_cut(&msgs[..3], 0, 10), None);
    }

    #[test]
    fn thread_alternates_and_names_attachments() {
        let now = 0;
        let mut u =
            ConversationEntry::new("m1".into(), EntryKind::User, "build a todo app".into(), now);
        u.attachments
            .push(weldr_storage::conversation::AttachmentRef {
                id: "ab".repeat(32),
                media_type: "image/png".into(),
                filename: Some("mock.png".into()),
                size: 10,
            });
        let mut a = ConversationEntry::new(
            "m2".into(),
            EntryKind::Assistant,
            "Which framework?".into(),
            now,
        );
        a.status = Some("complete".into());
        let u2 = ConversationEntry::new("m3".into(), EntryKind::User, "React".into(), now);
        let msgs = thread_messages(None, &[u.clone(), a.clone(), u2]);
        let roles: Vec<Role> = msgs.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            vec![Role::User, Role::Assistant, Role::User, Role::Assistant]
        );
        assert!(msgs[0].text().contains("mock.png"));
        assert!(msgs[1].text().contains("Which framework?"));
        let mut s = ConversationEntry::new(
            "s".into(),
            EntryKind::Summary,
            "they asked for a todo app".into(),
            now,
        );
        s.covers_through = Some(2);
        let msgs = thread_messages(Some(&s), &[u, a]);
        assert_eq!(msgs[0].role, Role::User);
        assert!(msgs[0].text().contains("todo app"));
    }

    #[test]
    fn instructions_are_bounded_and_never_followed_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_instructions(dir.path()).is_none());
        std::fs::write(dir.path().join("CLAUDE.md"), "use tabs").unwrap();
        assert_eq!(read_instructions(dir.path()).unwrap().1, "use tabs");
        std::fs::write(
            dir.path().join("AGENTS.md"),
            "x".repeat(MAX_INSTRUCTION_BYTES + 10),
        )
        .unwrap();
        let (name, text) = read_instructions(dir.path()).unwrap();
        assert_eq!(name, "AGENTS.md");
        assert!(text.len() < MAX_INSTRUCTION_BYTES + 200 && text.contains("left out"));
        std::fs::remove_file(dir.path().join("AGENTS.md")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("AGENTS.md")).unwrap();
        assert_eq!(read_instructions(dir.path()).unwrap().0, "CLAUDE.md");
    }
}
