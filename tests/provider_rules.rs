//! What the real provider APIs refuse or signal, against fake servers that validate requests
//! by the providers' published rules (tests/common/fake_llm.rs): tool schemas, tool-call ids,
//! stop reasons, retry delays, output limits.

#[path = "common/fake_llm.rs"]
mod fake_llm;

use fake_llm::{Wire, validate};
use serde_json::{Value, json};
use weldr_agent::llm::{
    ChatRequest, Message, ToolSpec, anthropic, gemini, openai, responses, schema,
};

/// Every tool of every phase: the planner's read-only tools and `submit_plan`, the coder's
/// tools and `done`.
fn every_spec() -> Vec<ToolSpec> {
    let mut specs = weldr_agent::tools::specs();
    specs.push(weldr_agent::workflow::plan::submit_plan_spec());
    specs.push(weldr_agent::workflow::plan::done_spec());
    specs
}

/// What a generated schema must not carry into a request (see `schema::tool_schema`): keywords
/// Gemini refuses and the converter would drop silently (`$ref` would lose the subschema),
/// nullable types, and integer formats such as `uint64` that OpenAI and Gemini refuse.
fn dialect_problems(schema: &Value, at: &str, found: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        found.push(format!("{at}: not an object"));
        return;
    };
    for key in [
        "$schema",
        "$ref",
        "$defs",
        "definitions",
        "title",
        "nullable",
    ] {
        if obj.contains_key(key) {
            found.push(format!("{at}: {key}"));
        }
    }
    match obj.get("type") {
        Some(Value::String(t)) if t != "null" => {}
        None if at.is_empty() => found.push("the top level has no type".into()),
        None => {}
        Some(other) => found.push(format!("{at}: type {other}")),
    }
    if obj.contains_key("format") && matches!(obj["type"].as_str(), Some("integer" | "number")) {
        found.push(format!("{at}: format {}", obj["format"]));
    }
    if let Some(items) = obj.get("items") {
        dialect_problems(items, &format!("{at}.items"), found);
    }
    for (name, sub) in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        dialect_problems(sub, &format!("{at}.properties.{name}"), found);
    }
    let required = obj.get("required").and_then(Value::as_array);
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        if obj["properties"].get(name).is_none() {
            found.push(format!("{at}: required {name:?} is not a property"));
        }
    }
}

#[test]
fn every_tool_schema_is_valid_for_every_provider() {
    for spec in every_spec() {
        assert!(
            schema::arrays_without_items(&spec.input_schema).is_empty(),
            "{}: our own schema has an array without items",
            spec.name
        );
        let mut problems = Vec::new();
        dialect_problems(&spec.input_schema, "", &mut problems);
        assert!(problems.is_empty(), "{}: {problems:?}", spec.name);
        let request = ChatRequest {
            model: "m".into(),
            system: "s".into(),
            messages: vec![Message::user_text("hi")],
            tools: vec![spec.clone()],
            max_tokens: 1000,
            stable_prefix: 0,
            turn: Some(0),
        };
        for (wire, body, model) in [
            (Wire::Anthropic, anthropic::request_body(&request), ""),
            (Wire::OpenAi, openai::request_body(&request, true), ""),
            (Wire::OpenAi, openai::request_body(&request, false), ""),
            (Wire::Responses, responses::request_body(&request), ""),
            (
                Wire::Gemini,
                gemini::request_body(&request),
                "gemini-2.5-pro",
            ),
        ] {
            assert_eq!(
                validate(wire, &body, model),
                None,
                "{} on {wire:?}",
                spec.name
            );
        }
    }
}

#[test]
fn the_validators_refuse_what_the_apis_refuse() {
    let tool = |schema: serde_json::Value| ToolSpec {
        name: "t".into(),
        description: "d".into(),
        input_schema: schema,
    };
    let raw = |schema: serde_json::Value| ChatRequest {
        model: "m".into(),
        system: String::new(),
        messages: vec![Message::user_text("hi")],
        tools: vec![tool(schema)],
        max_tokens: 10,
        stable_prefix: 0,
        turn: Some(0),
    };
    // A schema as it was before: an array without items, and additionalProperties.
    let old = json!({"type": "object", "additionalProperties": false,
                     "properties": {"subTasks": {"type": "array"}}});
    let mut body = openai::request_body(&raw(old.clone()), true);
    body["tools"][0]["function"]["parameters"] = old.clone();
    let refused = validate(Wire::OpenAi, &body, "").unwrap();
    assert_eq!(refused["error"]["code"], "invalid_function_parameters");
    let mut body = gemini::request_body(&raw(old.clone()));
    body["tools"][0]["functionDeclarations"][0]["parameters"] = old;
    let refused = validate(Wire::Gemini, &body, "gemini-2.5-pro").unwrap();
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown name \"additionalProperties\""),
        "{refused}"
    );
}
