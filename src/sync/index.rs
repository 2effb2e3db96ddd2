//! What this machine knows the store holds for a branch, so that a push of an unchanged tree
//! costs one request and one stat walk, and re-reads nothing else.
//!
//! Two files per branch under `{data_dir}/sync/{projectId}/`:
//! - `{branchId}.idx`: a versioned postcard record ([`storage::record`]) with the store's
//!   identity, the id of the snapshot this machine last pushed or pulled, the digest of that
//!   snapshot's tree ([`manifest::tree_digest`]) and the stat cache. It is all a no-op push
//!   reads: the walk's digest equals the stored one, and `latest` still names that snapshot.
//! - `{branchId}.manifest.json`: that snapshot's manifest, exactly as the store holds it. Read
//!   only when the tree changed (to know which content the store already has); checked against
//!   the id in the index, and fetched from the store instead when it does not match.
//!
//! Both are caches: losing or corrupting either only costs a re-hash and one more request.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weldr_storage::record::{self, Record};

use super::manifest::{self, Manifest, StatCache};
use crate::branches::layout::BranchKey;
use crate::config::Config;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct LocalIndex {
    /// Which store the snapshot lives in (a different endpoint or bucket invalidates it all).
    pub store: String,
    /// The snapshot this machine last pushed or pulled, and the digest of its tree.
    pub snapshot: Option<(String, [u8; 32])>,
    pub stat: StatCache,
}

impl Record for LocalIndex {
    const KIND: &'static str = "sync index";
    const VERSION: u8 = 1;
}

pub(super) struct IndexFiles {
    index: PathBuf,
    manifest: PathBuf,
}

impl IndexFiles {
    pub fn new(config: &Config, key: &BranchKey) -> Self {
        let dir = config.data_dir.join("sync").join(&key.project_id);
        Self {
            index: dir.join(format!("{}.idx", key.branch_id)),
            manifest: dir.join(format!("{}.manifest.json", key.branch_id)),
        }
    }

    /// The index for `identity`, or an empty one (missing, unreadable, another store).
    pub async fn load(&self, identity: &str) -> LocalIndex {
        let loaded = read_decoded(self.index.clone(), |bytes| {
            record::decode::<LocalIndex>(bytes).ok()
        })
        .await;
        match loaded {
            Some(index) if index.store == identity => index,
            _ => LocalIndex {
                store: identity.to_string(),
                ..Default::default()
            },
        }
    }

    /// The cached manifest of snapshot `id`, if the file holds exactly that snapshot.
    pub async fn load_manifest(&self, id: &str) -> Option<Manifest> {
        let id = id.to_string();
        read_decoded(self.manifest.clone(), move |bytes| {
            let m = serde_json::from_slice::<Manifest>(bytes).ok()?;
            (m.id == id && manifest::validate(&m).is_ok()).then_some(m)
        })
        .await
    }

    /// Save the index, and the manifest when given (best effort). The manifest goes first:
    /// an index naming a snapshot whose manifest file is older is caught by the id check.
    pub async fn save(&self, index: LocalIndex, manifest: Option<Manifest>) {
        let (ipath, mpath) = (self.index.clone(), self.manifest.clone());
        // Encoding a big tree's manifest takes tens of milliseconds: not on the runtime.
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(parent) = ipath.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if let Some(m) = manifest {
                let body = serde_json::to_vec(&m).map_err(std::io::Error::other)?;
                write_atomic(&mpath, &body)?;
            }
            write_atomic(&ipath, &record::encode(&index))?;
            // The JSON index of earlier versions is dead weight once this one exists.
            let _ = std::fs::remove_file(ipath.with_extension("json"));
            Ok(())
        })
        .await;
        if !matches!(result, Ok(Ok(()))) {
            tracing::warn!("could not save the local sync index: {result:?}");
        }
    }
}

/// Read `path` and decode it off the runtime; None when it is missing or does not decode.
async fn read_decoded<T: Send + 'static>(
    path: PathBuf,
    decode: impl FnOnce(&[u8]) -> Option<T> + Send + 'static,
) -> Option<T> {
    tokio::task::spawn_blocking(move || decode(&std::fs::read(path).ok()?))
        .await
        .ok()
        .flatten()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::StatKey;

    #[test]
    fn the_index_round_trips_through_its_envelope() {
        let mut stat = StatCache::new();
        stat.insert(
            "a/b.txt".into(),
            (
                StatKey {
                    size: 3,
                    mtime_ns: -5,
                    ctime_ns: 7,
                    ino: 9,
                },
                "ab".repeat(32),
            ),
        );
        let index = LocalIndex {
            store: "fs:/x".into(),
            snapshot: Some(("1-ab".into(), [7; 32])),
            stat,
        };
        let back: LocalIndex = record::decode(&record::encode(&index)).unwrap();
        assert_eq!(back.store, index.store);
        assert_eq!(back.snapshot, index.snapshot);
        assert_eq!(back.stat, index.stat);
        assert!(record::decode::<LocalIndex>(b"{\"store\":\"x\"}").is_err());
    }
}
