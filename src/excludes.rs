//! What a branch snapshot leaves out: the original's exclude list plus `.weldrignore`.
//! Shared by forks (untracked files that sync keeps travel with a fork) and the syncer.

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// The original scripts' list (rclone filter syntax, matched at any depth).
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "node_modules/",
    ".next/",
    "dist/",
    "build/",
    ".turbo/",
    ".cache/",
    "tmp/",
    "*.log",
    ".DS_Store",
    "coverage/",
    ".nyc_output/",
    "out/",
    ".output/",
    ".nitro/",
    ".vercel/",
    ".react-router/",
    ".vscode/",
    ".idea/",
];

pub struct Excludes {
    matcher: Gitignore,
}

impl Excludes {
    /// The defaults plus the patterns of `{dir}/.weldrignore` (gitignore syntax), if any.
    pub fn for_dir(dir: &Path) -> Self {
        let mut builder = GitignoreBuilder::new(dir);
        for pattern in DEFAULT_EXCLUDES {
            let _ = builder.add_line(None, pattern);
        }
        let custom = dir.join(".weldrignore");
        // The branch's own file only: a symlink could make the server read anything.
        let own_file = std::fs::symlink_metadata(&custom).is_ok_and(|m| m.is_file());
        if own_file && let Some(e) = builder.add(&custom) {
            tracing::warn!(path = %custom.display(), error = %e, "ignoring bad lines in .weldrignore");
        }
        let matcher = builder.build().unwrap_or_else(|_| Gitignore::empty());
        Self { matcher }
    }

    /// Is the relative path excluded (itself or through a parent directory)?
    pub fn is_excluded(&self, rel: &Path, is_dir: bool) -> bool {
        self.matcher
            .matched_path_or_any_parents(rel, is_dir)
            .is_ignore()
    }

    /// Is the relative path excluded, for a walk that never enters an excluded directory (so
    /// the parents need no second look)? A fraction of [`Self::is_excluded`]'s cost.
    pub fn is_excluded_here(&self, rel: &Path, is_dir: bool) -> bool {
        self.matcher.matched(rel, is_dir).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_weldrignore() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".weldrignore"), "secret/\n*.bin\n").unwrap();
        let ex = Excludes::for_dir(dir.path());
        for (path, is_dir) in [
            ("node_modules", true),
            ("apps/web/node_modules/x.js", false),
            ("debug.log", false),
            ("a/b/.DS_Store", false),
            ("secret", true),
            ("data.bin", false),
            ("apps/web/.next/cache", true),
        ] {
            assert!(ex.is_excluded(Path::new(path), is_dir), "{path}");
        }
        // A walk that stops at excluded directories sees the same with the cheaper check.
        for (path, is_dir) in [
            ("node_modules", true),
            ("a/debug.log", false),
            ("secret", true),
        ] {
            assert!(ex.is_excluded_here(Path::new(path), is_dir), "{path}");
        }
        assert!(!ex.is_excluded_here(Path::new("src/main.rs"), false));
        for (path, is_dir) in [
            ("src/main.rs", false),
            (".git", true),
            ("README.md", false),
            ("logs.txt", false),
        ] {
            assert!(!ex.is_excluded(Path::new(path), is_dir), "{path}");
        }
    }
}
