//! The integration catalog: `integrations/` of the repository, embedded in the binary.
//!
//! ```text
//! integrations/base/files/…               the monorepo, copied by a branch's first install
//! integrations/base/generated/…           files rendered again by every install (they wire
//!                                         the installed integrations together)
//! integrations/<key>/integration.json     key, category, name, description, dependsOn,
//!                                         version, options (JSON Schema), env
//! integrations/<key>/files/…              files at the same path in the branch
//! integrations/<key>/package/<path>       a fragment merged into the package.json at <path>
//! ```
//!
//! A file whose name ends in `.jinja` is rendered (the suffix dropped); others are copied.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::IntegrationError;
use super::render::Json;

#[derive(rust_embed::Embed)]
#[folder = "integrations/"]
struct Templates;

/// The categories, in the order the catalog lists them.
pub const CATEGORIES: [&str; 4] = ["backend", "frontend", "database", "authentication"];

/// One environment variable an integration writes into a `.env` file in local mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvSpec {
    /// The `.env` file, relative to the branch root.
    pub file: String,
    pub name: String,
    /// A template of the value (same variables as the files).
    #[serde(default)]
    pub value: Option<String>,
    /// `secret`: 32 random bytes, base64 (kept when the file already has the variable).
    #[serde(default)]
    pub generate: Option<String>,
}

/// What `integration.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub key: String,
    pub category: String,
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    pub version: String,
    pub options: Value,
    #[serde(default)]
    pub env: Vec<EnvSpec>,
}

/// A file of a template set: where it goes, whether it is rendered, its bytes.
#[derive(Debug, Clone)]
pub struct TemplateFile {
    pub path: String,
    pub render: bool,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Integration {
    pub manifest: Manifest,
    pub files: Vec<TemplateFile>,
    /// package.json fragments by the path of the package.json they merge into.
    pub packages: BTreeMap<String, Json>,
}

#[derive(Debug)]
pub struct Catalog {
    pub base: Vec<TemplateFile>,
    /// Rendered by every install with the then installed set, over what the branch has.
    pub generated: Vec<TemplateFile>,
    /// In catalog order: by category, then key.
    pub integrations: Vec<Integration>,
}

impl Catalog {
    /// The embedded catalog, loaded and checked once. A broken catalog is a build defect:
    /// `tests` load it, and the server refuses to start with it.
    pub fn get() -> Result<&'static Catalog, IntegrationError> {
        static CATALOG: OnceLock<Result<Catalog, String>> = OnceLock::new();
        CATALOG
            .get_or_init(|| load().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| IntegrationError::Catalog(e.clone()))
    }

    pub fn find(&self, key: &str) -> Option<&Integration> {
        self.integrations.iter().find(|i| i.manifest.key == key)
    }
}

fn load() -> Result<Catalog, IntegrationError> {
    let bad = |m: String| IntegrationError::Catalog(m);
    let mut base = Vec::new();
    let mut generated = Vec::new();
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut files: BTreeMap<String, Vec<TemplateFile>> = BTreeMap::new();
    let mut packages: BTreeMap<String, BTreeMap<String, Json>> = BTreeMap::new();
    for name in Templates::iter() {
        let name = name.as_ref();
        // Notes about the templates (integrations/README.md) are not templates.
        if !name.contains('/') && name.ends_with(".md") {
            continue;
        }
        let Some(file) = Templates::get(name) else {
            continue;
        };
        let bytes = file.data.into_owned();
        let (set, rest) = name
            .split_once('/')
            .ok_or_else(|| bad(format!("{name}: not inside an integration's directory")))?;
        if rest == "integration.json" {
            let m: Manifest =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("{name}: {e}")))?;
            if m.key != set {
                return Err(bad(format!("{name}: key {:?} is not its directory", m.key)));
            }
            manifests.insert(set.to_string(), m);
        } else if let Some(path) = rest.strip_prefix("generated/").filter(|_| set == "base") {
            let (path, render) = match path.strip_suffix(".jinja") {
                Some(p) => (p.to_string(), true),
                None => (path.to_string(), false),
            };
            generated.push(TemplateFile {
                path,
                render,
                bytes,
            });
        } else if let Some(path) = rest.strip_prefix("files/") {
            let (path, render) = match path.strip_suffix(".jinja") {
                Some(p) => (p.to_string(), true),
                None => (path.to_string(), false),
            };
            let f = TemplateFile {
                path,
                render,
                bytes,
            };
            if set == "base" {
                base.push(f);
            } else {
                files.entry(set.to_string()).or_default().push(f);
            }
        } else if let Some(path) = rest.strip_prefix("package/") {
            if !path.ends_with("package.json") {
                return Err(bad(format!(
                    "{name}: only package.json fragments go in package/"
                )));
            }
            let v: Json =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("{name}: {e}")))?;
            if !matches!(v, Json::Object(_)) {
                return Err(bad(format!("{name}: a fragment is a JSON object")));
            }
            packages
                .entry(set.to_string())
                .or_default()
                .insert(path.to_string(), v);
        } else {
            return Err(bad(format!(
                "{name}: expected integration.json, files/ or package/"
            )));
        }
    }
    if base.is_empty() {
        return Err(bad("integrations/base/files is empty".into()));
    }
    let mut integrations = Vec::new();
    for (key, manifest) in manifests {
        if !CATEGORIES.contains(&manifest.category.as_str()) {
            return Err(bad(format!(
                "{key}: unknown category {:?}",
                manifest.category
            )));
        }
        check_schema(&manifest.options).map_err(|e| bad(format!("{key}: options: {e}")))?;
        for env in &manifest.env {
            if env.value.is_some() == env.generate.is_some() {
                return Err(bad(format!(
                    "{key}: env {} needs exactly one of value and generate",
                    env.name
                )));
            }
            if env.generate.as_deref().is_some_and(|g| g != "secret") {
                return Err(bad(format!("{key}: env {}: unknown generator", env.name)));
            }
        }
        integrations.push(Integration {
            files: files.remove(&key).unwrap_or_default(),
            packages: packages.remove(&key).unwrap_or_default(),
            manifest,
        });
    }
    if let Some(stray) = files.keys().chain(packages.keys()).next() {
        return Err(bad(format!("{stray}: files without an integration.json")));
    }
    let keys: Vec<String> = integrations
        .iter()
        .map(|i| i.manifest.key.clone())
        .collect();
    for i in &integrations {
        for dep in &i.manifest.depends_on {
            if !keys.contains(dep) {
                return Err(bad(format!("{}: depends on unknown {dep}", i.manifest.key)));
            }
        }
    }
    // Dependencies must not form a circle: order them once.
    order(
        &integrations,
        &keys.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .map_err(|e| bad(e.to_string()))?;
    integrations.sort_by_key(|i| {
        (
            CATEGORIES.iter().position(|c| *c == i.manifest.category),
            i.manifest.key.clone(),
        )
    });
    Ok(Catalog {
        base,
        generated,
        integrations,
    })
}

/// `keys` in an order where every integration comes after its dependencies among them, in
/// catalog order otherwise.
pub fn order<'a>(
    integrations: &[Integration],
    keys: &[&'a str],
) -> Result<Vec<&'a str>, IntegrationError> {
    let deps = |k: &str| -> Vec<String> {
        integrations
            .iter()
            .find(|i| i.manifest.key == k)
            .map(|i| i.manifest.depends_on.clone())
            .unwrap_or_default()
    };
    let mut out: Vec<&'a str> = Vec::new();
    let mut visiting: Vec<&str> = Vec::new();
    fn visit<'a>(
        k: &'a str,
        keys: &[&'a str],
        deps: &dyn Fn(&str) -> Vec<String>,
        out: &mut Vec<&'a str>,
        visiting: &mut Vec<&'a str>,
    ) -> Result<(), IntegrationError> {
        if out.contains(&k) {
            return Ok(());
        }
        if visiting.contains(&k) {
            return Err(IntegrationError::Catalog(format!(
                "dependencies form a circle through {k}"
            )));
        }
        visiting.push(k);
        for d in deps(k) {
            if let Some(dk) = keys.iter().find(|x| **x == d) {
                visit(dk, keys, deps, out, visiting)?;
            }
        }
        visiting.pop();
        out.push(k);
        Ok(())
    }
    // Catalog order (backend, frontend, database, authentication) where dependencies allow.
    let position = |k: &str| integrations.iter().position(|i| i.manifest.key == k);
    let mut sorted: Vec<&'a str> = keys.to_vec();
    sorted.sort_by_key(|k| position(k));
    for k in &sorted {
        visit(k, keys, &deps, &mut out, &mut visiting)?;
    }
    Ok(out)
}

/// The schema keywords options may use: a flat object of typed, defaulted properties.
const PROPERTY_KEYWORDS: [&str; 10] = [
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "title",
];

fn check_schema(schema: &Value) -> Result<(), String> {
    let obj = schema.as_object().ok_or("not an object")?;
    if obj.get("type") != Some(&Value::from("object")) {
        return Err("type must be object".into());
    }
    if obj.get("additionalProperties") != Some(&Value::Bool(false)) {
        return Err("additionalProperties must be false".into());
    }
    for (name, prop) in obj
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let p = prop.as_object().ok_or(format!("{name}: not an object"))?;
        for k in p.keys() {
            if !PROPERTY_KEYWORDS.contains(&k.as_str()) {
                return Err(format!("{name}: keyword {k} is not supported"));
            }
        }
        let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
        if !["string", "integer", "number", "boolean"].contains(&ty) {
            return Err(format!(
                "{name}: type must be string, integer, number or boolean"
            ));
        }
        if let Some(pattern) = p.get("pattern").and_then(Value::as_str) {
            regex_lite_check(pattern).map_err(|e| format!("{name}: pattern: {e}"))?;
        }
        if let Some(default) = p.get("default") {
            check_value(name, p, default).map_err(|e| format!("default: {e}"))?;
        }
    }
    Ok(())
}

fn regex_lite_check(pattern: &str) -> Result<(), String> {
    grep_regex::RegexMatcher::new(pattern)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One option's value against its property schema.
fn check_value(name: &str, p: &Map<String, Value>, v: &Value) -> Result<(), String> {
    let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => false,
    };
    if !ok {
        return Err(format!("{name} must be a {ty}"));
    }
    if let Some(allowed) = p.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        return Err(format!(
            "{name} must be one of {}",
            Value::from(allowed.clone())
        ));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = p.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return Err(format!("{name} must be at least {min}"));
        }
        if let Some(max) = p.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return Err(format!("{name} must be at most {max}"));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = p.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            return Err(format!("{name} must be at least {min} characters"));
        }
        if let Some(max) = p.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            return Err(format!("{name} must be at most {max} characters"));
        }
        if let Some(pattern) = p.get("pattern").and_then(Value::as_str) {
            use grep_matcher::Matcher;
            // JSON Schema's `pattern` is a search, not a whole match (write `^…$` for one).
            let m = grep_regex::RegexMatcher::new(pattern).map_err(|e| e.to_string())?;
            if !m.is_match(s.as_bytes()).unwrap_or(false) {
                return Err(format!("{name} must match {pattern}"));
            }
        }
    }
    Ok(())
}

/// `given` options checked against the integration's schema, with its defaults applied.
pub fn resolve_options(integration: &Integration, given: Option<&Value>) -> Result<Value, String> {
    let schema = integration.manifest.options.as_object();
    let props = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let given = match given {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("options must be a JSON object".into()),
    };
    for name in given.keys() {
        if !props.contains_key(name) {
            let known: Vec<&str> = props.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown option {name:?} (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    let mut out = Map::new();
    for (name, prop) in &props {
        let p = prop.as_object().cloned().unwrap_or_default();
        match given.get(name).or_else(|| p.get("default")) {
            Some(v) => {
                check_value(name, &p, v)?;
                out.insert(name.clone(), v.clone());
            }
            None => return Err(format!("option {name} is required")),
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_catalog_loads_with_four_integrations_in_four_categories() {
        let c = Catalog::get().unwrap();
        let cats: Vec<&str> = c
            .integrations
            .iter()
            .map(|i| i.manifest.category.as_str())
            .collect();
        assert_eq!(cats, CATEGORIES);
        for i in &c.integrations {
            assert!(
                resolve_options(i, None).is_ok(),
                "{} defaults",
                i.manifest.key
            );
        }
    }

    #[test]
    fn order_puts_dependencies_first() {
        let c = Catalog::get().unwrap();
        let got = order(&c.integrations, &["better-auth", "postgresql", "orpc"]).unwrap();
        assert_eq!(got, vec!["orpc", "postgresql", "better-auth"]);
    }
}
