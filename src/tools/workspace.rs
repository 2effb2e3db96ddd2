//! Confinement: every path a tool touches is resolved here, relative to one branch directory.
//!
//! Rules: relative paths only (no absolute paths, no `..`, no NUL bytes); every existing
//! component is resolved through its symlinks and must stay inside the root, so a symlink never
//! leads out (a dangling symlink is refused too: writing through it would create its target);
//! writes never go into a `.git` directory. The returned path has no symlinks left in its
//! existing part, so opening it cannot escape.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::sandbox::Sandbox;

use super::ToolError;

/// One branch directory, the only place the tools may read or write.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    /// Where run_command's processes are confined.
    sandbox: Arc<Sandbox>,
}

impl Workspace {
    /// Root the tools at `root` (an existing directory; it is canonicalized), with commands in
    /// the default sandbox.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, ToolError> {
        Self::with_sandbox(root, Arc::new(Sandbox::default()))
    }

    /// Root the tools at `root`, with commands confined by `sandbox`.
    pub fn with_sandbox(root: impl AsRef<Path>, sandbox: Arc<Sandbox>) -> Result<Self, ToolError> {
        let root = std::fs::canonicalize(root.as_ref()).map_err(|e| {
            ToolError::Io(format!("workspace root {}: {e}", root.as_ref().display()))
        })?;
        if !root.is_dir() {
            return Err(ToolError::Invalid(format!(
                "workspace root {} is not a directory",
                root.display()
            )));
        }
        Ok(Self { root, sandbox })
    }

    /// The sandbox commands run in.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolve a relative path for reading. `""` and `"."` are the root.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, ToolError> {
        let comps = components(rel)?;
        self.walk(rel, &comps)
    }

    /// Resolve a relative path for writing or creating a file: like [`Self::resolve`], plus the
    /// path must name something below the root, not the root itself, and not inside `.git`.
    pub fn resolve_for_write(&self, rel: &str) -> Result<PathBuf, ToolError> {
        let comps = components(rel)?;
        if comps.is_empty() {
            return Err(ToolError::Invalid("a file path is required".into()));
        }
        let path = self.walk(rel, &comps)?;
        self.refuse_git(rel, &path)?;
        if path == self.root || path.is_dir() {
            return Err(ToolError::Invalid(format!("{rel} is a directory")));
        }
        Ok(path)
    }

    /// Resolve the parent of a relative path and return it with the final name, without
    /// following the final component (used by delete, which removes a symlink itself).
    pub fn resolve_parent(&self, rel: &str) -> Result<(PathBuf, PathBuf), ToolError> {
        let comps = components(rel)?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(ToolError::Invalid("a file path is required".into()));
        };
        let parent = self.walk(rel, parents)?;
        let path = parent.join(last);
        self.refuse_git(rel, &path)?;
        Ok((parent, path))
    }

    /// The path relative to the root, with `/` separators (for results and change reports).
    pub fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let s = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if s.is_empty() { ".".into() } else { s }
    }

    fn refuse_git(&self, rel: &str, path: &Path) -> Result<(), ToolError> {
        let inside = path.strip_prefix(&self.root).unwrap_or(path);
        if inside
            .components()
            .any(|c| c.as_os_str() == OsStr::new(".git"))
        {
            return Err(ToolError::Refused(format!(
                "{rel}: writing inside .git is not allowed"
            )));
        }
        Ok(())
    }

    /// Join `comps` onto the root one at a time, resolving symlinks as they come.
    fn walk(&self, rel: &str, comps: &[&OsStr]) -> Result<PathBuf, ToolError> {
        let mut cur = self.root.clone();
        for (i, comp) in comps.iter().enumerate() {
            let next = cur.join(comp);
            match std::fs::symlink_metadata(&next) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::canonicalize(&next).map_err(|_| {
                        ToolError::Refused(format!(
                            "{rel}: {} is a symlink to a missing target",
                            self.relative(&next)
                        ))
                    })?;
                    if !target.starts_with(&self.root) {
                        return Err(ToolError::Refused(format!(
                            "{rel}: {} is a symlink that points outside the branch directory",
                            self.relative(&next)
                        )));
                    }
                    cur = target;
                }
                Ok(_) => cur = next,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    // Nothing exists from here on, so no symlink can lie below.
                    for rest in &comps[i..] {
                        cur.push(rest);
                    }
                    return Ok(cur);
                }
                Err(e) => return Err(ToolError::Io(format!("{rel}: {e}"))),
            }
        }
        Ok(cur)
    }
}

/// The normal components of a relative path; refuses what could leave the root.
fn components(rel: &str) -> Result<Vec<&OsStr>, ToolError> {
    if rel.contains('\0') {
        return Err(ToolError::Refused("path contains a NUL byte".into()));
    }
    let path = Path::new(rel);
    if path.is_absolute() || rel.starts_with('/') {
        return Err(ToolError::Refused(format!(
            "{rel}: absolute paths are not allowed; use a path relative to the branch root"
        )));
    }
    let mut out = Vec::new();
    for comp in path.components() {
        match comp {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ToolError::Refused(format!(
                    "{rel}: `..` is not allowed in paths"
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ToolError::Refused(format!(
                    "{rel}: absolute paths are not allowed"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        for bad in ["../x", "a/../../x", "/etc/passwd", "a\0b", "a/.."] {
            assert!(
                matches!(ws.resolve(bad), Err(ToolError::Refused(_))),
                "{bad:?}"
            );
        }
        assert_eq!(ws.resolve("").unwrap(), ws.root());
        assert_eq!(ws.resolve("./a/b").unwrap(), ws.root().join("a/b"));
        assert!(ws.resolve_for_write(".git/config").is_err());
        assert!(ws.resolve_for_write("sub/.git/HEAD").is_err());
        assert!(ws.resolve_for_write(".").is_err());
    }
}
