//! Tool input schemas as each provider accepts them.
//!
//! Every tool describes its input once, in JSON Schema ([`super::ToolSpec::input_schema`]). The
//! providers validate that schema by different rules, and refuse the whole request when one
//! tool breaks them:
//!
//! - **Anthropic** takes JSON Schema as it is (the top level must be an object).
//! - **OpenAI** (Chat Completions and Responses, and strict gateways in front of compatible
//!   servers) needs `items` on every array: [`openai`] adds an unconstrained `{}` where a schema
//!   lacks it (our own schemas all have one; a test checks).
//! - **Gemini**'s `parameters` is the protobuf `Schema`, a subset of OpenAPI 3.0: unknown
//!   fields (`additionalProperties`, `$schema`, ...) are refused, a type is one name (nullability
//!   is `nullable`), and `format` is limited. [`gemini`] converts to that subset, dropping what
//!   it cannot say; the tools validate their input themselves anyway.

use serde_json::{Map, Value, json};

/// The fields Gemini's `Schema` message has.
const GEMINI_FIELDS: &[&str] = &[
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
];

/// The schema for OpenAI: every array has `items`.
pub fn openai(schema: &Value) -> Value {
    let mut s = schema.clone();
    add_items(&mut s);
    s
}

fn add_items(v: &mut Value) {
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    if is_type(obj, "array") && !obj.contains_key("items") {
        obj.insert("items".into(), json!({}));
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = obj.get_mut(key) {
            add_items(sub);
        }
    }
    for key in ["properties", "$defs", "definitions", "patternProperties"] {
        if let Some(Value::Object(props)) = obj.get_mut(key) {
            props.values_mut().for_each(add_items);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(subs)) = obj.get_mut(key) {
            subs.iter_mut().for_each(add_items);
        }
    }
}

fn is_type(obj: &Map<String, Value>, name: &str) -> bool {
    match obj.get("type") {
        Some(Value::String(t)) => t == name,
        Some(Value::Array(ts)) => ts.iter().any(|t| t == name),
        _ => false,
    }
}

/// The schema as Gemini's `Schema` subset.
pub fn gemini(schema: &Value) -> Value {
    let Some(obj) = schema.as_object() else {
        return json!({"type": "object"});
    };
    let mut out = Map::new();
    for (key, value) in obj {
        if !GEMINI_FIELDS.contains(&key.as_str()) {
            continue;
        }
        let converted = match key.as_str() {
            "type" => match value {
                Value::String(_) => value.clone(),
                // ["string", "null"] is a nullable string.
                Value::Array(types) => {
                    if types.iter().any(|t| t == "null") {
                        out.insert("nullable".into(), Value::Bool(true));
                    }
                    match types.iter().find(|t| *t != "null") {
                        Some(t) => t.clone(),
                        None => continue,
                    }
                }
                _ => continue,
            },
            "format" => {
                let ty = obj.get("type").and_then(Value::as_str).unwrap_or_default();
                let allowed = match ty {
                    "string" => ["enum", "date-time"].as_slice(),
                    "integer" => ["int32", "int64"].as_slice(),
                    "number" => ["float", "double"].as_slice(),
                    _ => [].as_slice(),
                };
                if !value.as_str().is_some_and(|f| allowed.contains(&f)) {
                    continue;
                }
                value.clone()
            }
            "properties" => match value {
                Value::Object(props) => Value::Object(
                    props
                        .iter()
                        .map(|(name, sub)| (name.clone(), gemini(sub)))
                        .collect(),
                ),
                _ => continue,
            },
            "items" => gemini(value),
            "anyOf" => match value {
                Value::Array(subs) => Value::Array(subs.iter().map(gemini).collect()),
                _ => continue,
            },
            "enum" => match value {
                // Gemini's enum values are strings.
                Value::Array(values) => Value::Array(
                    values
                        .iter()
                        .map(|v| match v {
                            Value::String(_) => v.clone(),
                            other => Value::String(other.to_string()),
                        })
                        .collect(),
                ),
                _ => continue,
            },
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if out.get("type").and_then(Value::as_str) == Some("array") && !out.contains_key("items") {
        out.insert("items".into(), json!({"type": "string"}));
    }
    Value::Object(out)
}

/// Where `schema` has an array without `items`: the JSON paths (`properties.tasks.items...`).
pub fn arrays_without_items(schema: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk_arrays(schema, String::new(), &mut found);
    found
}

fn walk_arrays(v: &Value, path: String, found: &mut Vec<String>) {
    let Some(obj) = v.as_object() else {
        return;
    };
    if is_type(obj, "array") && !obj.contains_key("items") {
        found.push(if path.is_empty() {
            ".".into()
        } else {
            path.clone()
        });
    }
    if let Some(items) = obj.get("items") {
        walk_arrays(items, format!("{path}.items"), found);
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (name, sub) in props {
            walk_arrays(sub, format!("{path}.properties.{name}"), found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_arrays_get_items() {
        let s = json!({"type": "object", "properties": {
            "a": {"type": "array"},
            "b": {"type": "array", "items": {"type": "object", "properties": {"c": {"type": ["array", "null"]}}}}
        }});
        assert_eq!(arrays_without_items(&s).len(), 2);
        let o = openai(&s);
        assert!(arrays_without_items(&o).is_empty(), "{o}");
        assert_eq!(o["properties"]["a"]["items"], json!({}));
    }

    #[test]
    fn gemini_keeps_only_its_subset() {
        let s = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "n": {"type": ["integer", "null"], "format": "uint64", "minimum": 0},
                "tags": {"type": "array"},
                "kind": {"enum": ["a", 1]}
            },
            "required": ["n"]
        });
        let g = gemini(&s);
        assert_eq!(
            g,
            json!({
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "nullable": true, "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "kind": {"enum": ["a", "1"]}
                },
                "required": ["n"]
            })
        );
    }
}
