//! The replay provider: plays a recorded transcript (tests, demos, benchmarks).
//!
//! A transcript is a JSON list of assistant turns. Each turn is either a list of parts (the
//! serde form of [`Part`]: `{"type":"text","text":...}`, `{"type":"reasoning","text":...}`,
//! `{"type":"tool_call","id","name","input"}`) or an object `{"parts": [...], "usage":
//! {"inputTokens", "outputTokens"}}`. The turn played is the request's [`ChatRequest::turn`]
//! (the model turns the workflow took before it, summarized ones included), so a replay is
//! deterministic across restarts, recovery and a history the engine compacted.
//!
//! A side request (`turn` None: the engine asks for a summary of older turns) takes no turn
//! from the transcript. It is answered with a deterministic extractive summary: the line
//! `Summary of the earlier conversation:` and then, in the order of the request, `- user: `
//! with the first non-empty line (at most 200 characters) of each user text, and `- called: ` with the
//! name of each tool call and its target (the first of its `path`, `filePath`, `command`,
//! `pattern`, `query`, `url` inputs that is a string, its first line), if any.
//!
//! A `replay:<path>` model names a file, and a request may name the model: so a transcript is
//! read only from inside the operator's `REPLAY_DIR` ([`allowed_path`]), and not at all while
//! that is unset. Tests and benchmarks set it to their scratch directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    ChatRequest, ChatResponse, Delta, DeltaSink, LlmError, LlmProvider, Message, Part, Role,
    StopReason, Usage,
};

/// Characters per streamed delta.
const CHUNK_CHARS: usize = 16;

#[derive(Deserialize)]
#[serde(untagged)]
enum TurnFile {
    Parts(Vec<Part>),
    Full {
        parts: Vec<Part>,
        #[serde(default)]
        usage: Option<Usage>,
    },
}

/// The transcript `model` names, if it lies inside `replay_dir` (after resolving `..` and
/// links); [`LlmError::Config`] otherwise, before anything of the file is read.
pub fn allowed_path(replay_dir: Option<&Path>, model: &str) -> Result<PathBuf, LlmError> {
    let Some(dir) = replay_dir else {
        return Err(LlmError::Config(
            "the replay provider is off: set REPLAY_DIR to the directory of recorded transcripts \
             to play `replay:<path>` models from it"
                .into(),
        ));
    };
    let outside = || {
        LlmError::Config(format!(
            "replay transcripts are played only from inside REPLAY_DIR ({}); {model:?} is not there",
            dir.display()
        ))
    };
    let dir = dir.canonicalize().map_err(|e| {
        LlmError::Config(format!("REPLAY_DIR {} is not usable: {e}", dir.display()))
    })?;
    let path = Path::new(model);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    // A missing file says only that it is outside: no probing of the server's files.
    let path = path.canonicalize().map_err(|_| outside())?;
    if path.starts_with(&dir) && path.is_file() {
        Ok(path)
    } else {
        Err(outside())
    }
}

pub struct Replay {
    turns: Vec<(Message, Usage)>,
}

impl Replay {
    pub fn from_path(path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            LlmError::Config(format!(
                "reading the replay transcript {}: {e}",
                path.display()
            ))
        })?;
        let turns: Vec<TurnFile> = serde_json::from_str(&text).map_err(|e| {
            LlmError::Config(format!(
                "the replay transcript {} is invalid: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            turns: turns
                .into_iter()
                .map(|t| {
                    let (parts, usage) = match t {
                        TurnFile::Parts(parts) => (parts, None),
                        TurnFile::Full { parts, usage } => (parts, usage),
                    };
                    (
                        Message {
                            role: Role::Assistant,
                            parts,
                        },
                        usage.unwrap_or_default(),
                    )
                })
                .collect(),
        })
    }

    /// A replay of these assistant turns (no usage).
    pub fn from_turns(turns: Vec<Message>) -> Self {
        Self {
            turns: turns.into_iter().map(|m| (m, Usage::default())).collect(),
        }
    }
}

/// Longest user line a summary keeps, in characters.
const SUMMARY_LINE_CHARS: usize = 200;

/// The extractive summary a side request gets (see the module doc).
fn summary(request: &ChatRequest) -> String {
    let mut out = String::from("Summary of the earlier conversation:");
    for m in &request.messages {
        for part in &m.parts {
            match (m.role, part) {
                (Role::User, Part::Text { text }) => {
                    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
                    if let Some(line) = line {
                        let line: String = line.chars().take(SUMMARY_LINE_CHARS).collect();
                        out.push_str("\n- user: ");
                        out.push_str(&line);
                    }
                }
                (Role::Assistant, Part::ToolCall { name, input, .. }) => {
                    out.push_str("\n- called: ");
                    out.push_str(name);
                    let target = ["path", "filePath", "command", "pattern", "query", "url"]
                        .iter()
                        .find_map(|k| input.get(*k).and_then(|v| v.as_str()));
                    if let Some(target) = target {
                        let target = target.lines().next().unwrap_or_default();
                        let target: String = target.chars().take(SUMMARY_LINE_CHARS).collect();
                        out.push(' ');
                        out.push_str(&target);
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn stream_chunks(text: &str, on_delta: DeltaSink<'_>, make: fn(String) -> Delta) {
    let chars: Vec<char> = text.chars().collect();
    for chunk in chars.chunks(CHUNK_CHARS) {
        on_delta(make(chunk.iter().collect()));
    }
}

#[async_trait::async_trait]
impl LlmProvider for Replay {
    fn name(&self) -> &str {
        "replay"
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        on_delta: DeltaSink<'_>,
    ) -> Result<ChatResponse, LlmError> {
        let Some(index) = request.turn else {
            let text = summary(request);
            stream_chunks(&text, on_delta, Delta::Text);
            return Ok(ChatResponse {
                message: Message {
                    role: Role::Assistant,
                    parts: vec![Part::Text { text }],
                },
                usage: Usage::default(),
                stop: StopReason::EndTurn,
            });
        };
        let (message, usage) = self.turns.get(index).cloned().ok_or_else(|| {
            LlmError::Protocol(format!(
                "the replay transcript has {} turns; turn {} was requested",
                self.turns.len(),
                index + 1
            ))
        })?;
        for part in &message.parts {
            match part {
                Part::Text { text } => stream_chunks(text, on_delta, Delta::Text),
                Part::Reasoning { text, .. } => stream_chunks(text, on_delta, Delta::Reasoning),
                _ => {}
            }
        }
        let stop = if message.tool_calls().next().is_some() {
            StopReason::ToolUse
        } else {
            StopReason::EndTurn
        };
        Ok(ChatResponse {
            message,
            usage,
            stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn transcripts_come_only_from_inside_replay_dir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("replays");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("t.json"), "[]").unwrap();
        std::fs::write(root.path().join("secret.json"), "[]").unwrap();
        let inside = dir.join("t.json");
        assert_eq!(
            allowed_path(Some(&dir), inside.to_str().unwrap()).unwrap(),
            inside.canonicalize().unwrap()
        );
        assert!(allowed_path(Some(&dir), "t.json").is_ok());
        let outside = root.path().join("secret.json");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, dir.join("link.json")).unwrap();
        for bad in [
            outside.to_str().unwrap(),
            "../secret.json",
            "/etc/passwd",
            "missing.json",
            #[cfg(unix)]
            "link.json",
        ] {
            assert!(
                matches!(allowed_path(Some(&dir), bad), Err(LlmError::Config(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            allowed_path(None, inside.to_str().unwrap()),
            Err(LlmError::Config(_))
        ));
    }

    #[tokio::test]
    async fn plays_turns_by_number_and_streams_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(
            &path,
            r#"[
              [{"type":"reasoning","text":"thinking about it"},{"type":"text","text":"Hello there, this is a long reply."}],
              {"parts":[{"type":"tool_call","id":"c1","name":"done","input":{}}],"usage":{"inputTokens":3,"outputTokens":4}}
            ]"#,
        )
        .unwrap();
        let replay = Replay::from_path(&path).unwrap();
        let mut request = ChatRequest {
            model: "x".into(),
            system: String::new(),
            messages: vec![Message::user_text("hi")],
            tools: vec![],
            max_tokens: 100,
            stable_prefix: 0,
            turn: Some(0),
        };
        let seen = Mutex::new(Vec::new());
        let sink = |d: Delta| seen.lock().unwrap().push(d);
        let first = replay.chat(&request, &sink).await.unwrap();
        assert_eq!(first.stop, StopReason::EndTurn);
        let deltas = seen.lock().unwrap().clone();
        assert!(deltas.len() > 2);
        let text: String = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Hello there, this is a long reply.");
        request.messages.push(first.message);
        request.turn = Some(1);
        let second = replay.chat(&request, &sink).await.unwrap();
        assert_eq!(second.stop, StopReason::ToolUse);
        assert_eq!(second.usage.output_tokens, 4);
        request.messages.push(second.message);
        request.turn = Some(2);
        assert!(matches!(
            replay.chat(&request, &sink).await,
            Err(LlmError::Protocol(_))
        ));
        assert!(matches!(
            Replay::from_path(&dir.path().join("missing.json")),
            Err(LlmError::Config(_))
        ));
    }

    #[tokio::test]
    async fn the_turn_number_not_the_history_picks_the_turn() {
        let replay = Replay::from_turns(vec![
            Message {
                role: Role::Assistant,
                parts: vec![Part::Text { text: "one".into() }],
            },
            Message {
                role: Role::Assistant,
                parts: vec![Part::Text { text: "two".into() }],
            },
        ]);
        // A compacted history: one message, yet the workflow is at its second turn.
        let request = ChatRequest {
            model: "x".into(),
            system: String::new(),
            messages: vec![Message::user_text(
                "Summary of the earlier conversation: ...",
            )],
            tools: vec![],
            max_tokens: 100,
            stable_prefix: 0,
            turn: Some(1),
        };
        let r = replay.chat(&request, &|_| {}).await.unwrap();
        assert_eq!(r.message.text(), "two");
    }

    #[tokio::test]
    async fn a_side_request_gets_an_extractive_summary_and_takes_no_turn() {
        let replay = Replay::from_turns(vec![Message {
            role: Role::Assistant,
            parts: vec![Part::Text {
                text: "only".into(),
            }],
        }]);
        let long = "x".repeat(300);
        let request = ChatRequest {
            model: "x".into(),
            system: "summarize".into(),
            messages: vec![
                Message::user_text("\nbuild a todo app\nwith a blue button"),
                Message {
                    role: Role::Assistant,
                    parts: vec![
                        Part::Text { text: "ok".into() },
                        Part::ToolCall {
                            id: "c1".into(),
                            name: "write_file".into(),
                            input: serde_json::json!({"filePath": "index.html", "content": "<p>"}),
                        },
                        Part::ToolCall {
                            id: "c2".into(),
                            name: "run_command".into(),
                            input: serde_json::json!({"command": "npm test\nnpm run lint"}),
                        },
                        Part::ToolCall {
                            id: "c3".into(),
                            name: "done".into(),
                            input: serde_json::json!({}),
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    parts: vec![
                        Part::ToolResult {
                            id: "c1".into(),
                            name: "write_file".into(),
                            content: "written".into(),
                            is_error: false,
                        },
                        Part::Text { text: long.clone() },
                    ],
                },
            ],
            tools: vec![],
            max_tokens: 100,
            stable_prefix: 0,
            turn: None,
        };
        let seen = Mutex::new(String::new());
        let sink = |d: Delta| {
            if let Delta::Text(t) = d {
                seen.lock().unwrap().push_str(&t);
            }
        };
        let r = replay.chat(&request, &sink).await.unwrap();
        let expected = format!(
            "Summary of the earlier conversation:\n- user: build a todo app\n- called: write_file index.html\n- called: run_command npm test\n- called: done\n- user: {}",
            "x".repeat(200)
        );
        assert_eq!(r.message.text(), expected);
        assert_eq!(*seen.lock().unwrap(), expected);
        assert_eq!(r.stop, StopReason::EndTurn);
        // The same request again: the same answer, and the transcript's turn is still there.
        assert_eq!(
            replay.chat(&request, &|_| {}).await.unwrap().message.text(),
            expected
        );
        let turn = ChatRequest {
            turn: Some(0),
            ..request
        };
        assert_eq!(
            replay.chat(&turn, &|_| {}).await.unwrap().message.text(),
            "only"
        );
    }
}
