//! The Anthropic, OpenAI (and Ollama/compatible) and Gemini clients against a fake server that
//! speaks their real streaming wire formats.

#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::sync::Mutex;
use std::time::Duration;

use fake_llm::{FakeLlm, Reply, TEST_KEY, Turn, Wire, keys_for, validate};
use serde_json::{Value, json};
use weldr_agent::config::ProviderKeys;
use weldr_agent::llm::anthropic::Anthropic;
use weldr_agent::llm::gemini::Gemini;
use weldr_agent::llm::http::{Retry, is_context_overflow};
use weldr_agent::llm::openai::OpenAi;
use weldr_agent::llm::replay::Replay;
use weldr_agent::llm::responses::Responses;
use weldr_agent::llm::{
    ChatRequest, ChatResponse, Delta, LlmError, LlmProvider, Message, ModelSpec, Part, Role,
    StopReason, ToolSpec, Usage, provider_for,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anthropic,
    OpenAi,
    Ollama,
    Gemini,
}

const ALL: [Kind; 4] = [Kind::Anthropic, Kind::OpenAi, Kind::Ollama, Kind::Gemini];

fn fast() -> Retry {
    Retry {
        attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
    }
}

fn provider(kind: Kind, keys: &ProviderKeys) -> Result<Box<dyn LlmProvider>, LlmError> {
    provider_with(kind, keys, fast())
}

fn provider_with(
    kind: Kind,
    keys: &ProviderKeys,
    retry: Retry,
) -> Result<Box<dyn LlmProvider>, LlmError> {
    Ok(match kind {
        Kind::Anthropic => Box::new(Anthropic::new(keys)?.with_retry(retry)),
        Kind::OpenAi => Box::new(OpenAi::openai(keys)?.with_retry(retry)),
        Kind::Ollama => Box::new(OpenAi::ollama(keys)?.with_retry(retry)),
        Kind::Gemini => Box::new(Gemini::new(keys)?.with_retry(retry)),
    })
}

fn read_file_tool() -> ToolSpec {
    ToolSpec {
        name: "read_file".into(),
        description: "Read a file".into(),
        input_schema: json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
    }
}

fn request(messages: Vec<Message>) -> ChatRequest {
    ChatRequest {
        model: "m-1".into(),
        system: "be brief".into(),
        messages,
        tools: vec![read_file_tool()],
        max_tokens: 1000,
        stable_prefix: 0,
        turn: Some(0),
    }
}

async fn chat(
    p: &dyn LlmProvider,
    req: &ChatRequest,
) -> (Result<ChatResponse, LlmError>, Vec<Delta>) {
    let deltas = Mutex::new(Vec::new());
    let sink = |d: Delta| deltas.lock().unwrap().push(d);
    let r = p.chat(req, &sink).await;
    (r, deltas.into_inner().unwrap())
}

async fn one(kind: Kind, script: Vec<Reply>) -> (FakeLlm, Result<ChatResponse, LlmError>) {
    let fake = FakeLlm::start(script).await;
    let p = provider(kind, &fake.keys()).unwrap();
    let (r, _) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
    (fake, r)
}

#[tokio::test]
async fn text_and_reasoning_stream_in_order_with_usage() {
    for kind in ALL {
        let fake = FakeLlm::start(vec![Reply::Turn(
            Turn::text(&["Hel", "lo", " world"])
                .reasoning(&["think", "ing"], Some("sig-1"))
                .usage(123, 45),
        )])
        .await;
        let p = provider(kind, &fake.keys()).unwrap();
        let (r, deltas) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
        let r = r.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(
            deltas,
            vec![
                Delta::Reasoning("think".into()),
                Delta::Reasoning("ing".into()),
                Delta::Text("Hel".into()),
                Delta::Text("lo".into()),
                Delta::Text(" world".into()),
            ],
            "{kind:?}"
        );
        let signature = (kind == Kind::Anthropic).then(|| "sig-1".to_string());
        assert_eq!(
            r.message,
            Message {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning {
                        text: "thinking".into(),
                        signature
                    },
                    Part::Text {
                        text: "Hello world".into()
                    },
                ],
            },
            "{kind:?}"
        );
        // The scripted prompt size; Anthropic's first request writes its prefix to the cache
        // (the fake's estimate of it).
        let written = fake.requests()[0].cache_write_tokens;
        assert_eq!(written > 0, kind == Kind::Anthropic, "{kind:?}");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 123,
                output_tokens: 45,
                cache_read_tokens: 0,
                cache_write_tokens: written,
            },
            "{kind:?}"
        );
        assert_eq!(r.stop, StopReason::EndTurn, "{kind:?}");

        let reqs = fake.requests();
        assert_eq!(reqs.len(), 1, "{kind:?}");
        let got = &reqs[0];
        assert_eq!(got.method, "POST");
        match kind {
            Kind::Anthropic => {
                assert_eq!(got.path, "/v1/messages");
                assert_eq!(got.header("x-api-key"), Some(TEST_KEY));
                assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
                assert_eq!(got.body["stream"], json!(true));
                assert_eq!(got.body["model"], json!("m-1"));
                assert_eq!(got.body["max_tokens"], json!(1000));
                assert_eq!(
                    got.body["system"],
                    json!([{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}])
                );
                assert_eq!(
                    got.body["messages"],
                    json!([{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}])
                );
            }
            Kind::OpenAi | Kind::Ollama => {
                assert_eq!(got.path, "/v1/chat/completions");
                if kind == Kind::OpenAi {
                    assert_eq!(
                        got.header("authorization"),
                        Some(format!("Bearer {TEST_KEY}").as_str())
                    );
                    assert_eq!(got.body["max_completion_tokens"], json!(1000));
                } else {
                    assert_eq!(got.header("authorization"), None);
                    assert_eq!(got.body["max_tokens"], json!(1000));
                }
                assert_eq!(got.body["stream"], json!(true));
                assert_eq!(got.body["stream_options"], json!({"include_usage": true}));
                assert_eq!(
                    got.body["messages"],
                    json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
                );
            }
            Kind::Gemini => {
                assert_eq!(got.path, "/v1beta/models/m-1:streamGenerateContent?alt=sse");
                assert_eq!(got.header("x-goog-api-key"), Some(TEST_KEY));
                assert_eq!(
                    got.body["systemInstruction"],
                    json!({"parts": [{"text": "be brief"}]})
                );
                assert_eq!(
                    got.body["contents"],
                    json!([{"role": "user", "parts": [{"text": "hi"}]}])
                );
                assert_eq!(got.body["generationConfig"]["maxOutputTokens"], json!(1000));
            }
        }
        // The key travels only in its header, never in the URL or the body.
        assert!(!got.path.contains(TEST_KEY), "{kind:?}");
        assert!(!got.body.to_string().contains(TEST_KEY), "{kind:?}");
    }
}

#[tokio::test]
async fn tool_call_arguments_split_across_chunks_are_assembled() {
    for kind in ALL {
        let fake = FakeLlm::start(vec![Reply::Turn(
            Turn::text(&["Let me look."])
                .call(
                    "toolu_1",
                    "read_file",
                    &["{\"pa", "th\": \"src/", "main.rs\", \"n\": [1,", " 2]}"],
                )
                .call("toolu_2", "list_files", &[]),
        )])
        .await;
        let p = provider(kind, &fake.keys()).unwrap();
        let (r, deltas) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
        let r = r.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(deltas, vec![Delta::Text("Let me look.".into())], "{kind:?}");
        let (id1, id2) = if kind == Kind::Gemini {
            ("call_0", "call_1")
        } else {
            ("toolu_1", "toolu_2")
        };
        assert_eq!(
            r.message.parts,
            vec![
                Part::Text {
                    text: "Let me look.".into()
                },
                Part::ToolCall {
                    id: id1.into(),
                    name: "read_file".into(),
                    input: json!({"path": "src/main.rs", "n": [1, 2]}),
                },
                Part::ToolCall {
                    id: id2.into(),
                    name: "list_files".into(),
                    input: json!({}),
                },
            ],
            "{kind:?}"
        );
        assert_eq!(r.stop, StopReason::ToolUse, "{kind:?}");
    }
}

#[tokio::test]
async fn conversation_with_tool_result_is_serialised() {
    for kind in ALL {
        let id = if kind == Kind::Gemini {
            "call_0"
        } else {
            "toolu_1"
        };
        let conversation = vec![
            Message::user_text("read main"),
            Message {
                role: Role::Assistant,
                parts: vec![
                    Part::Reasoning {
                        text: "hmm".into(),
                        signature: Some("sig-9".into()),
                    },
                    Part::Text {
                        text: "Let me look.".into(),
                    },
                    Part::ToolCall {
                        id: id.into(),
                        name: "read_file".into(),
                        input: json!({"path": "src/main.rs"}),
                    },
                ],
            },
            Message {
                role: Role::User,
                parts: vec![
                    Part::ToolResult {
                        id: id.into(),
                        name: "read_file".into(),
                        content: "fn main() {}".into(),
                        is_error: false,
                    },
                    Part::Text {
                        text: "and be quick".into(),
                    },
                ],
            },
        ];
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["Done."]).call(
            "toolu_7",
            "read_file",
            &["{\"path\":\"b\"}"],
        ))])
        .await;
        let p = provider(kind, &fake.keys()).unwrap();
        let (r, _) = chat(p.as_ref(), &request(conversation)).await;
        let r = r.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let body = fake.requests()[0].body.clone();
        match kind {
            Kind::Anthropic => {
                assert_eq!(
                    body["messages"],
                    json!([
                        {"role": "user", "content": [{"type": "text", "text": "read main"}]},
                        {"role": "assistant", "content": [
                            {"type": "thinking", "thinking": "hmm", "signature": "sig-9"},
                            {"type": "text", "text": "Let me look."},
                            {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "src/main.rs"}},
                        ]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "fn main() {}", "is_error": false},
                            {"type": "text", "text": "and be quick", "cache_control": {"type": "ephemeral"}},
                        ]},
                    ])
                );
                assert_eq!(
                    body["tools"],
                    json!([{"name": "read_file", "description": "Read a file", "input_schema": read_file_tool().input_schema, "cache_control": {"type": "ephemeral"}}])
                );
            }
            Kind::OpenAi | Kind::Ollama => {
                let msgs = body["messages"].as_array().unwrap();
                assert_eq!(msgs.len(), 5);
                assert_eq!(msgs[0], json!({"role": "system", "content": "be brief"}));
                assert_eq!(msgs[1], json!({"role": "user", "content": "read main"}));
                assert_eq!(msgs[2]["role"], json!("assistant"));
                assert_eq!(msgs[2]["content"], json!("Let me look."));
                let call = &msgs[2]["tool_calls"][0];
                assert_eq!(call["id"], json!("toolu_1"));
                assert_eq!(call["type"], json!("function"));
                assert_eq!(call["function"]["name"], json!("read_file"));
                let args: Value =
                    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                assert_eq!(args, json!({"path": "src/main.rs"}));
                assert_eq!(
                    msgs[3],
                    json!({"role": "tool", "tool_call_id": "toolu_1", "content": "fn main() {}"})
                );
                assert_eq!(msgs[4], json!({"role": "user", "content": "and be quick"}));
                assert_eq!(
                    body["tools"],
                    json!([{"type": "function", "function": {"name": "read_file", "description": "Read a file", "parameters": read_file_tool().input_schema}}])
                );
            }
            Kind::Gemini => {
                assert_eq!(
                    body["contents"],
                    json!([
                        {"role": "user", "parts": [{"text": "read main"}]},
                        {"role": "model", "parts": [
                            {"text": "Let me look.", "thoughtSignature": "sig-9"},
                            {"functionCall": {"name": "read_file", "args": {"path": "src/main.rs"}}},
                        ]},
                        {"role": "user", "parts": [
                            {"functionResponse": {"name": "read_file", "response": {"content": "fn main() {}"}}},
                            {"text": "and be quick"},
                        ]},
                    ])
                );
                assert_eq!(
                    body["tools"],
                    json!([{"functionDeclarations": [{"name": "read_file", "description": "Read a file", "parameters": read_file_tool().input_schema}]}])
                );
                // Ids continue after the conversation's calls.
                assert_eq!(r.message.tool_calls().next().unwrap().0, "call_1");
            }
        }
        assert_eq!(r.message.text(), "Done.", "{kind:?}");
    }
}

#[tokio::test]
async fn gemini_thought_signature_round_trips_on_the_call() {
    let fake = FakeLlm::start(vec![Reply::Turn(
        Turn::text(&["ok"]).reasoning(&[], Some("gsig")).call(
            "x",
            "read_file",
            &["{\"path\":\"a\"}"],
        ),
    )])
    .await;
    let p = provider(Kind::Gemini, &fake.keys()).unwrap();
    let (r, _) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
    let r = r.unwrap();
    assert_eq!(
        r.message.parts[1..],
        [
            Part::Reasoning {
                text: String::new(),
                signature: Some("gsig".into())
            },
            Part::ToolCall {
                id: "call_0".into(),
                name: "read_file".into(),
                input: json!({"path": "a"})
            },
        ]
    );
    // Sent back, the signature rides on the call again.
    let fake2 = FakeLlm::start(vec![Reply::Turn(Turn::text(&["bye"]))]).await;
    let p2 = provider(Kind::Gemini, &fake2.keys()).unwrap();
    let convo = vec![Message::user_text("hi"), r.message];
    let (r2, _) = chat(p2.as_ref(), &request(convo)).await;
    r2.unwrap();
    let body = &fake2.requests()[0].body;
    assert_eq!(
        body["contents"][1]["parts"][1],
        json!({"functionCall": {"name": "read_file", "args": {"path": "a"}}, "thoughtSignature": "gsig"})
    );
}

#[tokio::test]
async fn rate_limit_then_success() {
    for kind in ALL {
        let (fake, r) = one(
            kind,
            vec![
                Reply::Status {
                    code: 429,
                    message: "slow down".into(),
                    retry_after: Some(0),
                },
                Reply::Turn(Turn::text(&["ok"])),
            ],
        )
        .await;
        assert_eq!(r.unwrap().message.text(), "ok", "{kind:?}");
        assert_eq!(fake.requests().len(), 2, "{kind:?}");
    }
}

#[tokio::test]
async fn a_stated_retry_after_replaces_the_computed_backoff() {
    // The computed wait would be at least half an hour; the server asks for none.
    let patient = Retry {
        attempts: 2,
        base_delay: Duration::from_secs(3600),
        max_delay: Duration::from_secs(3600),
    };
    for kind in ALL {
        let fake = FakeLlm::start(vec![
            Reply::Status {
                code: 429,
                message: "slow down".into(),
                retry_after: Some(0),
            },
            Reply::Turn(Turn::text(&["ok"])),
        ])
        .await;
        let p = provider_with(kind, &fake.keys(), patient).unwrap();
        let req = request(vec![Message::user_text("hi")]);
        let (r, _) = tokio::time::timeout(Duration::from_secs(120), chat(p.as_ref(), &req))
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: the stated delay did not replace the backoff"));
        assert_eq!(r.unwrap().message.text(), "ok", "{kind:?}");
        assert_eq!(fake.requests().len(), 2, "{kind:?}");
    }
}

#[tokio::test]
async fn persistent_rate_limit_is_rate_limited() {
    for kind in ALL {
        let (fake, r) = one(kind, vec![Reply::status(429, "slow down"); 5]).await;
        match r {
            Err(LlmError::RateLimited { attempts, message }) => {
                assert_eq!(attempts, 3, "{kind:?}");
                assert!(message.contains("slow down"), "{kind:?}: {message}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(fake.requests().len(), 3, "{kind:?}");
    }
}

#[tokio::test]
async fn persistent_server_error_is_unavailable() {
    for kind in ALL {
        let (fake, r) = one(kind, vec![Reply::status(500, "boom"); 5]).await;
        match r {
            Err(LlmError::Unavailable { attempts, message }) => {
                assert_eq!(attempts, 3, "{kind:?}");
                assert!(message.contains("boom"), "{kind:?}: {message}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(fake.requests().len(), 3, "{kind:?}");
    }
}

#[tokio::test]
async fn server_error_then_success() {
    for kind in ALL {
        let (fake, r) = one(
            kind,
            vec![
                Reply::status(503, "overloaded"),
                Reply::Turn(Turn::text(&["fine"])),
            ],
        )
        .await;
        assert_eq!(r.unwrap().message.text(), "fine", "{kind:?}");
        assert_eq!(fake.requests().len(), 2, "{kind:?}");
    }
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    let keys = keys_for(&FakeLlm::down_base().await);
    for kind in ALL {
        let p = provider(kind, &keys).unwrap();
        let (r, _) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
        assert!(
            matches!(r, Err(LlmError::Unavailable { attempts: 3, .. })),
            "{kind:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn malformed_stream_is_protocol_error() {
    for kind in ALL {
        let (fake, r) = one(kind, vec![Reply::Malformed]).await;
        assert!(matches!(r, Err(LlmError::Protocol(_))), "{kind:?}: {r:?}");
        assert_eq!(fake.requests().len(), 1, "{kind:?}");
    }
}

#[tokio::test]
async fn stream_cut_after_a_delta_is_unavailable_without_retry() {
    for kind in ALL {
        let (fake, r) = one(
            kind,
            vec![Reply::Truncated, Reply::Turn(Turn::text(&["again"]))],
        )
        .await;
        assert!(
            matches!(r, Err(LlmError::Unavailable { attempts: 1, .. })),
            "{kind:?}: {r:?}"
        );
        assert_eq!(fake.requests().len(), 1, "{kind:?}");
    }
}

#[tokio::test]
async fn unauthorized_is_auth_error() {
    for kind in ALL {
        for code in [401, 403] {
            let (fake, r) = one(kind, vec![Reply::status(code, "invalid x-api-key")]).await;
            match r {
                Err(LlmError::Auth(m)) => assert!(m.contains("invalid x-api-key"), "{m}"),
                other => panic!("{kind:?}: {other:?}"),
            }
            assert_eq!(fake.requests().len(), 1, "{kind:?}");
        }
    }
}

#[tokio::test]
async fn other_client_errors_are_refused_with_the_message() {
    for kind in ALL {
        let (fake, r) = one(kind, vec![Reply::status(400, "max_tokens is too large")]).await;
        match r {
            Err(LlmError::Refused(m)) => assert!(m.contains("max_tokens is too large"), "{m}"),
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(fake.requests().len(), 1, "{kind:?}");
    }
}

#[tokio::test]
async fn missing_keys_are_config_errors() {
    let mut keys = keys_for("http://127.0.0.1:9");
    keys.anthropic_api_key = None;
    keys.openai_api_key = None;
    keys.gemini_api_key = None;
    for (kind, var) in [
        (Kind::Anthropic, "ANTHROPIC_API_KEY"),
        (Kind::OpenAi, "OPENAI_API_KEY"),
        (Kind::Gemini, "GEMINI_API_KEY"),
    ] {
        match provider(kind, &keys) {
            Err(LlmError::Config(m)) => assert_eq!(m, format!("{var} is not set")),
            Err(e) => panic!("{kind:?}: {e:?}"),
            Ok(_) => panic!("{kind:?}: built without a key"),
        }
    }
    // Ollama needs none.
    assert!(provider(Kind::Ollama, &keys).is_ok());
    let spec = ModelSpec::parse("openai:gpt-x").unwrap();
    assert!(matches!(
        provider_for(&keys, &spec),
        Err(LlmError::Config(_))
    ));
}

#[tokio::test]
async fn provider_for_builds_working_providers() {
    let fake = FakeLlm::start(vec![
        Reply::Turn(Turn::text(&["a"])),
        Reply::Turn(Turn::text(&["b"])),
        Reply::Turn(Turn::text(&["c"])),
        Reply::Turn(Turn::text(&["d"])),
    ])
    .await;
    let keys = fake.keys();
    for (spec, text) in [
        ("anthropic:claude-x", "a"),
        ("openai:gpt-x", "b"),
        ("ollama:qwen2.5-coder:7b", "c"),
        ("gemini:gemini-x", "d"),
    ] {
        let spec = ModelSpec::parse(spec).unwrap();
        let p = provider_for(&keys, &spec).unwrap();
        assert_eq!(p.name(), spec.provider);
        let mut req = request(vec![Message::user_text("hi")]);
        req.model = spec.model.clone();
        let (r, _) = chat(p.as_ref(), &req).await;
        assert_eq!(r.unwrap().message.text(), text);
    }
    let reqs = fake.requests();
    assert_eq!(reqs[2].body["model"], json!("qwen2.5-coder:7b"));
    assert_eq!(
        reqs[3].path,
        "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    );
}

#[tokio::test]
async fn stalled_stream_times_out_as_unavailable() {
    for kind in ALL {
        let fake = FakeLlm::start(vec![Reply::Stall, Reply::Turn(Turn::text(&["late"]))]).await;
        let keys = fake.keys();
        let p: Box<dyn LlmProvider> = match kind {
            Kind::Anthropic => Box::new(
                Anthropic::new(&keys)
                    .unwrap()
                    .with_retry(fast())
                    .with_idle_timeout(Duration::from_millis(200)),
            ),
            Kind::OpenAi => Box::new(
                OpenAi::openai(&keys)
                    .unwrap()
                    .with_retry(fast())
                    .with_idle_timeout(Duration::from_millis(200)),
            ),
            Kind::Ollama => Box::new(
                OpenAi::ollama(&keys)
                    .unwrap()
                    .with_retry(fast())
                    .with_idle_timeout(Duration::from_millis(200)),
            ),
            Kind::Gemini => Box::new(
                Gemini::new(&keys)
                    .unwrap()
                    .with_retry(fast())
                    .with_idle_timeout(Duration::from_millis(200)),
            ),
        };
        // Nothing was streamed before the stall, so the retry gets the late answer.
        let (r, _) = chat(p.as_ref(), &request(vec![Message::user_text("hi")])).await;
        assert_eq!(r.unwrap().message.text(), "late", "{kind:?}");
        assert_eq!(fake.requests().len(), 2, "{kind:?}");
    }
}

#[tokio::test]
async fn anthropic_overloaded_event_in_the_stream_is_retried() {
    let overloaded = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n".to_string(),
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".to_string(),
    ];
    let (fake, r) = one(
        Kind::Anthropic,
        vec![
            Reply::Raw(overloaded.clone()),
            Reply::Turn(Turn::text(&["ok"])),
        ],
    )
    .await;
    assert_eq!(r.unwrap().message.text(), "ok");
    assert_eq!(fake.requests().len(), 2);
    let (_, r) = one(Kind::Anthropic, vec![Reply::Raw(overloaded); 3]).await;
    match r {
        Err(LlmError::Unavailable {
            attempts: 3,
            message,
        }) => assert!(message.contains("Overloaded")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn max_tokens_stop_reason() {
    for kind in ALL {
        let mut turn = Turn::text(&["cut"]);
        turn.max_tokens = true;
        let (_, r) = one(kind, vec![Reply::Turn(turn)]).await;
        assert_eq!(r.unwrap().stop, StopReason::MaxTokens, "{kind:?}");
    }
}

#[tokio::test]
async fn compatible_server_tool_call_without_id_gets_one() {
    let chunk = |v: Value| format!("data: {v}\n\n");
    let events = vec![
        chunk(
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "function": {"name": "read_file", "arguments": {"path": "a"}}}]}, "finish_reason": null}]}),
        ),
        chunk(
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        ),
    ];
    let (_, r) = one(Kind::Ollama, vec![Reply::Raw(events)]).await;
    let r = r.unwrap();
    assert_eq!(
        r.message.parts,
        vec![Part::ToolCall {
            id: "call_0".into(),
            name: "read_file".into(),
            input: json!({"path": "a"}),
        }]
    );
    assert_eq!(r.stop, StopReason::ToolUse);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 5,
            output_tokens: 2,
            ..Default::default()
        }
    );
}

// ---------------------------------------------------------------------------------------
// Images, prompt caching, context windows, replay turns
// ---------------------------------------------------------------------------------------

/// Every wire: the four chat kinds and OpenAI's Responses API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnyWire {
    Chat(Kind),
    Responses,
}

const EVERY_WIRE: [AnyWire; 5] = [
    AnyWire::Chat(Kind::Anthropic),
    AnyWire::Chat(Kind::OpenAi),
    AnyWire::Chat(Kind::Ollama),
    AnyWire::Chat(Kind::Gemini),
    AnyWire::Responses,
];

fn any_provider(wire: AnyWire, keys: &ProviderKeys) -> Box<dyn LlmProvider> {
    match wire {
        AnyWire::Chat(kind) => provider(kind, keys).unwrap(),
        AnyWire::Responses => Box::new(Responses::new(keys).unwrap().with_retry(fast())),
    }
}

fn png() -> Part {
    Part::Image {
        media_type: "image/png".into(),
        data: fake_llm::PNG_1X1_BASE64.into(),
    }
}

fn cache_mark() -> Value {
    json!({"type": "ephemeral"})
}

#[tokio::test]
async fn an_image_reaches_each_provider_in_its_format() {
    let url = format!("data:image/png;base64,{}", fake_llm::PNG_1X1_BASE64);
    for wire in EVERY_WIRE {
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["a cat"]))]).await;
        let p = any_provider(wire, &fake.keys());
        let message = Message {
            role: Role::User,
            parts: vec![
                Part::Text {
                    text: "what is this?".into(),
                },
                png(),
                Part::Text {
                    text: "be short".into(),
                },
            ],
        };
        let (r, _) = chat(p.as_ref(), &request(vec![message])).await;
        assert_eq!(r.unwrap().message.text(), "a cat", "{wire:?}");
        let body = &fake.requests()[0].body;
        match wire {
            AnyWire::Chat(Kind::Anthropic) => assert_eq!(
                body["messages"][0]["content"],
                json!([
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": fake_llm::PNG_1X1_BASE64}},
                    {"type": "text", "text": "be short", "cache_control": cache_mark()},
                ]),
            ),
            AnyWire::Chat(Kind::OpenAi | Kind::Ollama) => assert_eq!(
                body["messages"][1],
                json!({"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "be short"},
                ]}),
                "{wire:?}"
            ),
            AnyWire::Chat(Kind::Gemini) => assert_eq!(
                body["contents"][0],
                json!({"role": "user", "parts": [
                    {"text": "what is this?"},
                    {"inlineData": {"mimeType": "image/png", "data": fake_llm::PNG_1X1_BASE64}},
                    {"text": "be short"},
                ]}),
            ),
            AnyWire::Responses => assert_eq!(
                body["input"][0],
                json!({"role": "user", "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": url, "detail": "auto"},
                    {"type": "input_text", "text": "be short"},
                ]}),
            ),
        }
        // Text-only user messages stay plain strings on Chat Completions.
        if wire == AnyWire::Chat(Kind::OpenAi) {
            let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["ok"]))]).await;
            let p = any_provider(wire, &fake.keys());
            chat(p.as_ref(), &request(vec![Message::user_text("hi")]))
                .await
                .0
                .unwrap();
            assert_eq!(
                fake.requests()[0].body["messages"][1]["content"],
                json!("hi")
            );
        }
    }
}

#[tokio::test]
async fn a_bad_image_is_refused_by_every_fake_as_by_the_service() {
    let bad = [
        // Not a supported type anywhere.
        Part::Image {
            media_type: "image/bmp".into(),
            data: fake_llm::PNG_1X1_BASE64.into(),
        },
        // Not base64.
        Part::Image {
            media_type: "image/png".into(),
            data: "not base64 at all!".into(),
        },
        // Base64, but not an image.
        Part::Image {
            media_type: "image/png".into(),
            data: "aGVsbG8gd29ybGQ=".into(),
        },
    ];
    for wire in EVERY_WIRE {
        for part in &bad {
            let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["never"]))]).await;
            let p = any_provider(wire, &fake.keys());
            let message = Message {
                role: Role::User,
                parts: vec![Part::Text { text: "see".into() }, part.clone()],
            };
            let (r, _) = chat(p.as_ref(), &request(vec![message])).await;
            assert!(
                matches!(&r, Err(LlmError::Refused(m)) if m.starts_with("HTTP 400")),
                "{wire:?} {part:?}: {r:?}"
            );
            assert_eq!(fake.requests().len(), 1, "a refusal is not retried");
        }
    }
    // Anthropic checks the bytes against the stated type; Gemini takes no GIF.
    let png_as_jpeg = Part::Image {
        media_type: "image/jpeg".into(),
        data: fake_llm::PNG_1X1_BASE64.into(),
    };
    let gif = Part::Image {
        media_type: "image/gif".into(),
        data: "R0lGODlhAQABAAAAACw=".into(),
    };
    for (kind, part, expected) in [
        (
            Kind::Anthropic,
            png_as_jpeg,
            "appears to be a image/png image",
        ),
        (Kind::Gemini, gif, "Unsupported MIME type: image/gif"),
    ] {
        let fake = FakeLlm::start(vec![]).await;
        let p = provider(kind, &fake.keys()).unwrap();
        let message = Message {
            role: Role::User,
            parts: vec![part],
        };
        let (r, _) = chat(p.as_ref(), &request(vec![message])).await;
        assert!(
            matches!(&r, Err(LlmError::Refused(m)) if m.contains(expected)),
            "{kind:?}: {r:?}"
        );
    }
}

#[test]
fn the_fakes_refuse_images_outside_user_messages() {
    let url = format!("data:image/png;base64,{}", fake_llm::PNG_1X1_BASE64);
    let anthropic = json!({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": fake_llm::PNG_1X1_BASE64}}]},
    ]});
    let openai = json!({"model": "m", "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]},
    ]});
    let responses = json!({"model": "m", "input": [
        {"role": "assistant", "content": [{"type": "input_image", "image_url": url}]},
    ]});
    for (wire, body) in [
        (Wire::Anthropic, anthropic),
        (Wire::OpenAi, openai),
        (Wire::Responses, responses),
    ] {
        assert!(validate(wire, &body, "").is_some(), "{wire:?}");
    }
    // An https URL is fine for OpenAI; a plain http one is not.
    for (url, ok) in [
        ("https://example.com/cat.png", true),
        ("http://example.com/cat.png", false),
    ] {
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        ]});
        assert_eq!(validate(Wire::OpenAi, &body, "").is_none(), ok, "{url}");
    }
}

/// The blocks of an Anthropic body that carry `cache_control`, as paths.
fn cache_marks(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (i, t) in body["tools"].as_array().into_iter().flatten().enumerate() {
        if t.get("cache_control").is_some() {
            out.push(format!("tools.{i}"));
        }
    }
    for (i, b) in body["system"].as_array().into_iter().flatten().enumerate() {
        if b.get("cache_control").is_some() {
            out.push(format!("system.{i}"));
        }
    }
    for (i, m) in body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for (k, b) in m["content"].as_array().into_iter().flatten().enumerate() {
            if b.get("cache_control").is_some() {
                assert_eq!(b["cache_control"], cache_mark());
                out.push(format!("messages.{i}.{k}"));
            }
        }
    }
    out
}

fn history() -> Vec<Message> {
    vec![
        Message::user_text("read main"),
        Message {
            role: Role::Assistant,
            parts: vec![
                Part::Reasoning {
                    text: "hmm".into(),
                    signature: Some("sig".into()),
                },
                Part::Text {
                    text: "Let me look.".into(),
                },
                Part::ToolCall {
                    id: "toolu_1".into(),
                    name: "read_file".into(),
                    input: json!({"path": "src/main.rs"}),
                },
            ],
        },
        Message {
            role: Role::User,
            parts: vec![Part::ToolResult {
                id: "toolu_1".into(),
                name: "read_file".into(),
                content: "fn main() {}".into(),
                is_error: false,
            }],
        },
        Message {
            role: Role::Assistant,
            parts: vec![Part::Reasoning {
                text: "thinking only".into(),
                signature: Some("sig2".into()),
            }],
        },
        Message::user_text("go on"),
    ]
}

#[tokio::test]
async fn anthropic_cache_breakpoints_by_stable_prefix() {
    let n = history().len();
    for (stable, expected) in [
        // Tools, system and the last message only.
        (0, vec!["tools.1", "system.0", "messages.4.0"]),
        (
            1,
            vec!["tools.1", "system.0", "messages.0.0", "messages.4.0"],
        ),
        (
            2,
            vec!["tools.1", "system.0", "messages.1.2", "messages.4.0"],
        ),
        // Message 3 holds only a thinking block: the block before it takes the mark.
        (
            4,
            vec!["tools.1", "system.0", "messages.2.0", "messages.4.0"],
        ),
        (n, vec!["tools.1", "system.0", "messages.4.0"]),
        (n + 3, vec!["tools.1", "system.0", "messages.4.0"]),
    ] {
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["ok"]))]).await;
        let p = provider(Kind::Anthropic, &fake.keys()).unwrap();
        let mut req = request(history());
        req.tools.push(ToolSpec {
            name: "list_dir".into(),
            description: "List a directory".into(),
            input_schema: json!({"type": "object", "properties": {}}),
        });
        req.stable_prefix = stable;
        let (r, _) = chat(p.as_ref(), &req).await;
        r.unwrap_or_else(|e| panic!("stable {stable}: {e}"));
        let marks = cache_marks(&fake.requests()[0].body);
        assert!(marks.len() <= 4);
        assert_eq!(marks, expected, "stable {stable}");
    }
    // No tools, no system prompt: only the history's marks.
    let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["ok"]))]).await;
    let p = provider(Kind::Anthropic, &fake.keys()).unwrap();
    let mut req = request(history());
    req.tools.clear();
    req.system.clear();
    req.stable_prefix = 1;
    chat(p.as_ref(), &req).await.0.unwrap();
    let body = &fake.requests()[0].body;
    assert_eq!(cache_marks(body), vec!["messages.0.0", "messages.4.0"]);
    assert!(body.get("system").is_none());
}

#[test]
fn the_anthropic_fake_refuses_bad_cache_marks() {
    let text = |cc: bool| {
        let mut b = json!({"type": "text", "text": "x"});
        if cc {
            b["cache_control"] = cache_mark();
        }
        b
    };
    let body = |content: Vec<Value>| json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": content}]});
    let refused = |b: &Value| {
        validate(Wire::Anthropic, b, "")
            .map(|e| e["error"]["message"].as_str().unwrap().to_string())
    };
    assert_eq!(refused(&body(vec![text(true); 4])), None);
    assert_eq!(
        refused(&body(vec![text(true); 5])).as_deref(),
        Some("A maximum of 4 blocks with cache_control may be provided. Found 5.")
    );
    let mut ttl = text(false);
    ttl["cache_control"] = json!({"type": "persistent"});
    assert!(refused(&body(vec![ttl])).unwrap().contains("'ephemeral'"));
    let empty = json!({"type": "text", "text": "", "cache_control": cache_mark()});
    assert_eq!(
        refused(&body(vec![text(false), empty])).as_deref(),
        Some("messages.0.content.1.text: cache_control cannot be set for empty text blocks")
    );
    let thinking = json!({"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": [text(false)]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s", "cache_control": cache_mark()}]},
    ]});
    assert!(
        refused(&thinking)
            .unwrap()
            .contains("thinking.cache_control")
    );
    // Marks on tools and the system prompt count too.
    let mut five = body(vec![text(true); 3]);
    five["system"] = json!([{"type": "text", "text": "s", "cache_control": cache_mark()}]);
    five["tools"] =
        json!([{"name": "t", "input_schema": {"type": "object"}, "cache_control": cache_mark()}]);
    assert!(refused(&five).unwrap().contains("Found 5"));
}

#[tokio::test]
async fn a_repeated_prefix_is_read_from_the_anthropic_cache() {
    let fake = FakeLlm::start(vec![
        Reply::Turn(Turn::text(&["first answer"])),
        Reply::Turn(Turn::text(&["second answer"])),
    ])
    .await;
    let p = provider(Kind::Anthropic, &fake.keys()).unwrap();
    let mut req = request(vec![Message::user_text(
        "a long first question ".repeat(50),
    )]);
    req.stable_prefix = 1;
    let (first, _) = chat(p.as_ref(), &req).await;
    let first = first.unwrap();
    let prompt = fake.prompt_tokens();
    // Everything up to the last mark (the whole prompt here) was written.
    assert_eq!(first.usage.cache_read_tokens, 0);
    assert_eq!(first.usage.input_tokens, prompt[0]);
    assert_eq!(first.usage.cache_write_tokens, prompt[0]);

    req.messages.push(first.message);
    req.messages.push(Message::user_text("and a follow-up"));
    req.stable_prefix = 3;
    let (second, _) = chat(p.as_ref(), &req).await;
    let second = second.unwrap();
    let prompt = fake.prompt_tokens();
    assert_eq!(second.usage.input_tokens, prompt[1], "the whole prompt");
    assert_eq!(
        second.usage.cache_read_tokens, first.usage.cache_write_tokens,
        "the first request's prefix"
    );
    assert_eq!(
        second.usage.cache_write_tokens,
        prompt[1] - prompt[0],
        "the rest up to the last mark"
    );
    let recorded = &fake.requests()[1];
    assert_eq!(recorded.cache_read_tokens, second.usage.cache_read_tokens);
    assert_eq!(recorded.cache_write_tokens, second.usage.cache_write_tokens);

    // A changed system prompt changes every prefix: nothing is read.
    let fake2 = FakeLlm::start(vec![Reply::Turn(Turn::text(&["x"]))]).await;
    let p2 = provider(Kind::Anthropic, &fake2.keys()).unwrap();
    chat(p2.as_ref(), &req).await.0.unwrap();
    assert_eq!(fake2.requests()[0].cache_read_tokens, 0);
}

#[tokio::test]
async fn the_minimum_cacheable_prefix_is_respected() {
    let fake = FakeLlm::start(vec![
        Reply::Turn(Turn::text(&["a"])),
        Reply::Turn(Turn::text(&["b"])),
    ])
    .await
    .with_min_cache_tokens(1_000_000);
    let p = provider(Kind::Anthropic, &fake.keys()).unwrap();
    let req = request(vec![Message::user_text("hi")]);
    for _ in 0..2 {
        let r = chat(p.as_ref(), &req).await.0.unwrap();
        assert_eq!(
            (r.usage.cache_read_tokens, r.usage.cache_write_tokens),
            (0, 0)
        );
    }
}

#[tokio::test]
async fn cache_reads_are_reported_by_every_provider() {
    for wire in EVERY_WIRE {
        let fake = FakeLlm::start(vec![
            Reply::Turn(Turn::text(&["one"])),
            Reply::Turn(Turn::text(&["two"])),
        ])
        .await;
        let p = any_provider(wire, &fake.keys());
        let mut req = request(vec![Message::user_text("a question ".repeat(40))]);
        req.stable_prefix = 1;
        let first = chat(p.as_ref(), &req).await.0.unwrap();
        req.messages.push(first.message);
        req.messages.push(Message::user_text("more"));
        req.stable_prefix = 3;
        let second = chat(p.as_ref(), &req).await.0.unwrap();
        let recorded = fake.requests();
        assert!(recorded[1].cache_read_tokens > 0, "{wire:?}");
        assert_eq!(
            second.usage.cache_read_tokens, recorded[1].cache_read_tokens,
            "{wire:?}"
        );
        assert_eq!(
            second.usage.input_tokens, recorded[1].prompt_tokens,
            "{wire:?}"
        );
        if wire != AnyWire::Chat(Kind::Anthropic) {
            // Caching by prefix: the second request starts with the first one's bytes.
            assert_eq!(second.usage.cache_write_tokens, 0, "{wire:?}");
        }
    }
}

#[tokio::test]
async fn cache_counts_are_parsed_from_each_wire() {
    let anthropic = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":20,\"output_tokens\":1}}}\n\n".to_string(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n".to_string(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string(),
    ];
    let openai = vec![
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n".to_string(),
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":125,\"completion_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":100}}}\n\n".to_string(),
        "data: [DONE]\n\n".to_string(),
    ];
    let gemini = vec![
        "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"x\"}]},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":125,\"cachedContentTokenCount\":100,\"candidatesTokenCount\":9}}\n\n".to_string(),
    ];
    let responses = vec![
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":125,\"input_tokens_details\":{\"cached_tokens\":100},\"output_tokens\":9}}}\n\n".to_string(),
    ];
    for (wire, events, written) in [
        (AnyWire::Chat(Kind::Anthropic), anthropic, 20),
        (AnyWire::Chat(Kind::OpenAi), openai, 0),
        (AnyWire::Chat(Kind::Gemini), gemini, 0),
        (AnyWire::Responses, responses, 0),
    ] {
        let fake = FakeLlm::start(vec![Reply::Raw(events)]).await;
        let p = any_provider(wire, &fake.keys());
        let r = chat(p.as_ref(), &request(vec![Message::user_text("hi")]))
            .await
            .0
            .unwrap_or_else(|e| panic!("{wire:?}: {e}"));
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 125,
                output_tokens: 9,
                cache_read_tokens: 100,
                cache_write_tokens: written,
            },
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn requests_with_the_same_history_are_byte_identical() {
    use weldr_agent::llm::{anthropic, gemini, openai, responses};
    let mut req = request(history());
    req.stable_prefix = 2;
    let bodies = |r: &ChatRequest| {
        [
            anthropic::request_body(r).to_string(),
            openai::request_body(r, true).to_string(),
            openai::request_body(r, false).to_string(),
            responses::request_body(r).to_string(),
            gemini::request_body(r).to_string(),
        ]
    };
    let again = request(history());
    assert_eq!(
        bodies(&req),
        bodies(&ChatRequest {
            stable_prefix: 2,
            ..again
        })
    );
}

#[tokio::test]
async fn a_prompt_over_the_context_window_is_refused_as_by_the_service() {
    for wire in EVERY_WIRE {
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["fits"]))])
            .await
            .with_context_window(2_000);
        let p = any_provider(wire, &fake.keys());
        let mut req = request(vec![Message::user_text("word ".repeat(2_000))]);
        req.max_tokens = 500;
        let (r, _) = chat(p.as_ref(), &req).await;
        let err = r.expect_err("over the window");
        assert!(matches!(err, LlmError::Refused(_)), "{wire:?}: {err:?}");
        assert!(is_context_overflow(&err), "{wire:?}: {err}");
        assert_eq!(fake.requests().len(), 1, "{wire:?}: not retried");
        assert!(fake.prompt_tokens()[0] > 2_000);
        // A request that fits gets the scripted reply, which the refusal left in place.
        let req = request(vec![Message::user_text("short")]);
        let r = chat(p.as_ref(), &req).await.0.unwrap();
        assert_eq!(r.message.text(), "fits", "{wire:?}");
    }
    // Anthropic and OpenAI count the output limit in; Gemini only the input.
    for (wire, refused) in [
        (AnyWire::Chat(Kind::Anthropic), true),
        (AnyWire::Chat(Kind::OpenAi), true),
        (AnyWire::Responses, true),
        (AnyWire::Chat(Kind::Gemini), false),
    ] {
        let fake = FakeLlm::start(vec![Reply::Turn(Turn::text(&["ok"]))])
            .await
            .with_context_window(1_000);
        let p = any_provider(wire, &fake.keys());
        let mut req = request(vec![Message::user_text("small")]);
        req.max_tokens = 999;
        let (r, _) = chat(p.as_ref(), &req).await;
        assert_eq!(r.is_err(), refused, "{wire:?}: {r:?}");
    }
}

#[test]
fn fake_tokens_counts_text_and_images() {
    let text =
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]});
    assert_eq!(fake_llm::fake_tokens(&text), 2);
    let image = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "abcd"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x".repeat(10_000)}},
    ]}]});
    assert_eq!(
        fake_llm::fake_tokens(&image),
        1 + fake_llm::FAKE_IMAGE_TOKENS
    );
    assert_eq!(
        fake_llm::fake_tokens(&json!({"model": "a-long-model-name"})),
        0
    );
}

#[tokio::test]
async fn replay_picks_the_turn_by_number_and_summarizes_side_requests() {
    let replay = Replay::from_turns(vec![
        Message {
            role: Role::Assistant,
            parts: vec![Part::Text {
                text: "zero".into(),
            }],
        },
        Message {
            role: Role::Assistant,
            parts: vec![Part::Text { text: "one".into() }],
        },
    ]);
    let mut req = request(history());
    req.turn = Some(1);
    assert_eq!(chat(&replay, &req).await.0.unwrap().message.text(), "one");
    req.turn = Some(0);
    assert_eq!(chat(&replay, &req).await.0.unwrap().message.text(), "zero");
    req.turn = None;
    let summary = chat(&replay, &req).await.0.unwrap().message.text();
    assert_eq!(
        summary,
        "Summary of the earlier conversation:\n- user: read main\n- called: read_file src/main.rs\n- user: go on"
    );
    req.turn = Some(2);
    assert!(matches!(
        chat(&replay, &req).await.0,
        Err(LlmError::Protocol(_))
    ));
}
