//! What an install writes, and writing it.
//!
//! [`plan`] computes every file an install writes, in memory: the base monorepo (the branch's
//! first install), the generated files that wire the installed integrations together (every
//! install), the integration's files rendered with minijinja, each package.json merged
//! with its fragment (key order kept), and in local mode the `.env` variables. Nothing is
//! touched until the whole plan exists, so a render error or a dependency conflict leaves the
//! tree as it was. [`apply`] then writes each file beside its place and renames it in,
//! through `fsx` (a symlink the agent planted never redirects a write), and undoes everything
//! it did when any write fails (a full disk): new files removed first, which frees the space
//! to put the replaced ones back, then the directories it made.

use std::io::{Read, Write};
use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::IntegrationError;
use super::catalog::{Catalog, Integration, TemplateFile};
use crate::fsx::Dir;

/// JSON with the key order of its source kept (package.json as people write it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(IndexMap<String, Json>),
}

/// The variables of every template (and `.env` value).
#[derive(Debug, Clone, Serialize)]
pub struct Vars {
    pub project: String,
    pub branch: String,
    /// The project id as an npm package name.
    pub app_name: String,
    pub database_url: String,
    /// The integrations installed on the branch, this one included, in install order.
    pub installed: Vec<String>,
}

impl Vars {
    pub fn new(project: &str, branch: &str, database_url: &str, installed: Vec<String>) -> Self {
        let mut app_name: String = project
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        app_name = app_name.trim_matches('-').to_string();
        if app_name.is_empty() {
            app_name = "app".into();
        }
        Self {
            project: project.into(),
            branch: branch.into(),
            app_name,
            database_url: database_url.into(),
            installed,
        }
    }
}

/// Every file an install writes: path relative to the branch root, and its bytes.
#[derive(Debug, Default)]
pub struct Plan {
    pub writes: IndexMap<String, Vec<u8>>,
}

/// What installing `integration` (with resolved `options`) into `dir` writes. `with_base`: the
/// branch's first install, which copies the base monorepo (never over a file the branch has).
/// `local_env`: write the integration's `.env` variables (local mode).
pub fn plan(
    dir: &Path,
    catalog: &Catalog,
    integration: &Integration,
    options: &Value,
    vars: &Vars,
    with_base: bool,
    local_env: bool,
) -> Result<Plan, IntegrationError> {
    let root = Dir::open(dir).map_err(|e| IntegrationError::io("opening the branch", e))?;
    let mut out = Plan::default();
    let key = &integration.manifest.key;
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let ctx = minijinja::context! {
        project => vars.project,
        branch => vars.branch,
        app_name => vars.app_name,
        database_url => vars.database_url,
        installed => vars.installed,
        options => minijinja::Value::from_serialize(options),
    };
    let render = |file: &TemplateFile, set: &str| -> Result<Vec<u8>, IntegrationError> {
        if !file.render {
            return Ok(file.bytes.clone());
        }
        let source = std::str::from_utf8(&file.bytes).map_err(|_| IntegrationError::Render {
            key: set.into(),
            path: file.path.clone(),
            message: "not UTF-8".into(),
        })?;
        env.render_str(source, &ctx)
            .map(String::into_bytes)
            .map_err(|e| IntegrationError::Render {
                key: set.into(),
                path: file.path.clone(),
                message: e.to_string(),
            })
    };
    if with_base {
        for file in &catalog.base {
            if read(&root, &file.path)?.is_none() {
                out.writes.insert(file.path.clone(), render(file, "base")?);
            }
        }
    }
    for file in &catalog.generated {
        out.writes.insert(file.path.clone(), render(file, "base")?);
    }
    for file in &integration.files {
        out.writes.insert(file.path.clone(), render(file, key)?);
    }
    for (path, fragment) in &integration.packages {
        let current = match out.writes.get(path) {
            Some(bytes) => Some(bytes.clone()),
            None => read(&root, path)?,
        };
        let mut doc: Json = match current {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| IntegrationError::Conflict {
                    key: key.clone(),
                    message: format!("{path} is not valid JSON: {e}"),
                })?
            }
            None => Json::Object(IndexMap::new()),
        };
        merge(&mut doc, fragment, path, "").map_err(|message| IntegrationError::Conflict {
            key: key.clone(),
            message,
        })?;
        let mut bytes = serde_json::to_vec_pretty(&doc).expect("serializing JSON");
        bytes.push(b'\n');
        out.writes.insert(path.clone(), bytes);
    }
    if local_env {
        let mut files: IndexMap<String, Vec<(String, String)>> = IndexMap::new();
        for spec in &integration.manifest.env {
            let value = match (&spec.value, &spec.generate) {
                (Some(template), _) => {
                    env.render_str(template, &ctx)
                        .map_err(|e| IntegrationError::Render {
                            key: key.clone(),
                            path: spec.file.clone(),
                            message: format!("{}: {e}", spec.name),
                        })?
                }
                _ => secret(),
            };
            files
                .entry(spec.file.clone())
                .or_default()
                .push((spec.name.clone(), value));
        }
        for (path, vars) in files {
            let current = match out.writes.get(&path) {
                Some(b) => Some(b.clone()),
                None => read(&root, &path)?,
            };
            out.writes
                .insert(path.clone(), env_file(current.as_deref(), &vars));
        }
    }
    Ok(out)
}

/// Merge `fragment` into `doc`: objects key by key, anything else set; a dependency already
/// there at another version is a conflict that names both.
fn merge(doc: &mut Json, fragment: &Json, path: &str, at: &str) -> Result<(), String> {
    match (doc, fragment) {
        (Json::Object(d), Json::Object(f)) => {
            for (k, v) in f {
                let here = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match d.get_mut(k) {
                    Some(existing) => {
                        let is_dep = at.ends_with("ependencies");
                        if is_dep && existing != v {
                            return Err(format!(
                                "{path}: {here} is {} there and {} in the integration",
                                show(existing),
                                show(v)
                            ));
                        }
                        merge(existing, v, path, &here)?;
                    }
                    None => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
            Ok(())
        }
        (d, f) => {
            *d = f.clone();
            Ok(())
        }
    }
}

fn show(v: &Json) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A `.env` file with `vars` set where it does not set them yet (a secret is generated once
/// and kept, so sessions signed with it stay valid across reinstalls).
fn env_file(current: Option<&[u8]>, vars: &[(String, String)]) -> Vec<u8> {
    let mut text = current
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let has = |text: &str, name: &str| {
        text.lines().any(|l| {
            l.trim_start()
                .strip_prefix("export ")
                .unwrap_or(l.trim_start())
                .split_once('=')
                .is_some_and(|(n, _)| n.trim() == name)
        })
    };
    for (name, value) in vars {
        if has(&text, name) {
            continue;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{name}={value}\n"));
    }
    text.into_bytes()
}

/// 32 random bytes, base64.
fn secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's random source");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The file at `path` under `root` (None when missing); a symlink or directory there is an
/// error (the install does not write through or over either).
fn read(root: &Dir, path: &str) -> Result<Option<Vec<u8>>, IntegrationError> {
    let (parent, name) = split(path)?;
    let dir = match root.walk(Path::new(parent)) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IntegrationError::io(path, e)),
    };
    match dir.stat(name).map_err(|e| IntegrationError::io(path, e))? {
        None => Ok(None),
        Some(st) if st.kind == crate::fsx::Kind::File => {
            let mut bytes = Vec::new();
            dir.read(name)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| IntegrationError::io(path, e))?;
            Ok(Some(bytes))
        }
        Some(_) => Err(IntegrationError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is not a regular file in the branch",
            ),
        )),
    }
}

fn split(path: &str) -> Result<(&str, &str), IntegrationError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(IntegrationError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a plain relative path",
            ),
        ));
    }
    Ok(path.rsplit_once('/').unwrap_or(("", path)))
}

/// What [`apply`] did, to undo it.
#[derive(Default)]
struct Undo {
    /// Directories made, outermost first.
    made_dirs: Vec<String>,
    /// Files written: their path and what was there before (None: nothing).
    files: Vec<(String, Option<Vec<u8>>)>,
}

/// Write `plan` into `dir`; on any failure undo every change and return the failure.
pub fn apply(dir: &Path, plan: &Plan) -> Result<(), IntegrationError> {
    let root = Dir::open(dir).map_err(|e| IntegrationError::io("opening the branch", e))?;
    let mut undo = Undo::default();
    for (path, bytes) in &plan.writes {
        if let Err(e) = write_one(&root, path, bytes, &mut undo) {
            rollback(&root, undo);
            return Err(e);
        }
    }
    Ok(())
}

fn write_one(
    root: &Dir,
    path: &str,
    bytes: &[u8],
    undo: &mut Undo,
) -> Result<(), IntegrationError> {
    let (parent, name) = split(path)?;
    let mut dir = root
        .try_clone()
        .map_err(|e| IntegrationError::io(path, e))?;
    let mut at = String::new();
    for comp in parent.split('/').filter(|c| !c.is_empty()) {
        at = if at.is_empty() {
            comp.to_string()
        } else {
            format!("{at}/{comp}")
        };
        if dir
            .stat(comp)
            .map_err(|e| IntegrationError::io(&at, e))?
            .is_none()
        {
            dir.mkdir(comp, 0o755)
                .map_err(|e| IntegrationError::io(&at, e))?;
            undo.made_dirs.push(at.clone());
        }
        dir = dir.dir(comp).map_err(|e| IntegrationError::io(&at, e))?;
    }
    let old = read(root, path)?;
    let tmp = format!(".{name}.weldr-install");
    let _ = dir.unlink(&tmp);
    let written = (|| {
        let mut f = dir.create(&tmp, 0o644)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        dir.rename(&tmp, &dir, name)
    })();
    if let Err(e) = written {
        let _ = dir.unlink(&tmp);
        return Err(IntegrationError::io(path, e));
    }
    undo.files.push((path.to_string(), old));
    Ok(())
}

fn rollback(root: &Dir, undo: Undo) {
    let parent_of = |path: &str| -> Option<(Dir, String)> {
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        Some((root.walk(Path::new(parent)).ok()?, name.to_string()))
    };
    // New files first: removing them frees the space the replaced ones need.
    for (path, old) in undo.files.iter().rev() {
        if old.is_none()
            && let Some((dir, name)) = parent_of(path)
        {
            let _ = dir.unlink(&name);
        }
    }
    for (path, old) in undo.files.iter().rev() {
        if let (Some(bytes), Some((dir, name))) = (old, parent_of(path)) {
            let tmp = format!(".{name}.weldr-install");
            let _ = dir.unlink(&tmp);
            let restored = (|| {
                let mut f = dir.create(&tmp, 0o644)?;
                f.write_all(bytes)?;
                dir.rename(&tmp, &dir, &name)
            })();
            if let Err(e) = restored {
                let _ = dir.unlink(&tmp);
                tracing::error!(path, error = %e, "could not put a file back after a failed install");
            }
        }
    }
    for made in undo.made_dirs.iter().rev() {
        if let Some((dir, name)) = parent_of(made) {
            let _ = dir.rmdir(&name);
        }
    }
}

/// Every file of `plan`, sorted (what an install writes).
pub fn paths(plan: &Plan) -> Vec<String> {
    let mut p: Vec<String> = plan.writes.keys().cloned().collect();
    p.sort();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Json {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn merge_keeps_order_unions_and_names_both_versions_of_a_conflict() {
        let mut doc = j(r#"{"name":"x","scripts":{"b":"1"},"dependencies":{"z":"1.0.0"}}"#);
        merge(
            &mut doc,
            &j(r#"{"scripts":{"a":"2"},"dependencies":{"z":"1.0.0","a":"2.0.0"}}"#),
            "package.json",
            "",
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"name":"x","scripts":{"b":"1","a":"2"},"dependencies":{"z":"1.0.0","a":"2.0.0"}}"#
        );
        let err = merge(
            &mut doc,
            &j(r#"{"dependencies":{"z":"2.0.0"}}"#),
            "apps/server/package.json",
            "",
        )
        .unwrap_err();
        assert!(
            err.contains(r#""1.0.0""#) && err.contains(r#""2.0.0""#),
            "{err}"
        );
        assert!(err.contains("dependencies.z"), "{err}");
    }

    #[test]
    fn env_files_keep_what_is_set() {
        let out = env_file(
            Some(b"A=1\nexport B=2"),
            &[("A".into(), "9".into()), ("C".into(), "3".into())],
        );
        assert_eq!(String::from_utf8(out).unwrap(), "A=1\nexport B=2\nC=3\n");
    }
}
