//! A directory tree as data, for byte-exact comparisons of restores.
//!
//! Use it from a test with `#[path = "common/tree.rs"] mod tree;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use weldr_agent::sync::manifest;

/// Everything in a tree, except entries named in `skip`: kind, mode, size and content hash,
/// or link target, by relative path.
pub fn tree(root: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    fn walk(root: &Path, rel: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            if skip.iter().any(|s| name == *s) {
                continue;
            }
            let r = rel.join(&name);
            let abs = root.join(&r);
            let meta = std::fs::symlink_metadata(&abs).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let key = r.to_string_lossy().into_owned();
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&abs).unwrap();
                out.insert(key, format!("link {}", t.display()));
            } else if meta.is_dir() {
                out.insert(key, format!("dir {mode:o}"));
                walk(root, &r, skip, out);
            } else {
                let data = std::fs::read(&abs).unwrap();
                out.insert(
                    key,
                    format!(
                        "file {mode:o} {} {}",
                        data.len(),
                        manifest::hash_bytes(&data)
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), skip, &mut out);
    out
}

/// Assert two trees are the same, listing only the differences.
pub fn assert_same(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>, what: &str) {
    let diff: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {:?} vs {:?}", a.get(k), b.get(k)))
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: trees differ:\n{}",
        diff.join("\n")
    );
}
