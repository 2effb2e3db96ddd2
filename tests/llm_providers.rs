//! The Anthropic, OpenAI (and Ollama/compatible) and Gemini clients against a fake server that
//! speaks their real streaming wire formats.

#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::sync::Mutex;
use std::time::Duration;

use fake_llm::{FakeLlm, Reply, TEST_KEY, Turn, keys_for};
use serde_json::{Value, json};
use weldr_agent::config::ProviderKeys;
use weldr_agent::llm::anthropic::Anthropic;
use weldr_agent::llm::gemini::Gemini;
use weldr_agent::llm::http::Retry;
use weldr_agent::llm::openai::OpenAi;
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
