//! The store's files: owner-only, and a lost database is not silently replaced by a new one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use weldr_storage::events::NoObserver;
use weldr_storage::{NewEvent, StorageError, Store, StoreOptions, StreamKey, wal_path};

fn open(path: &Path) -> Result<Store, StorageError> {
    Store::open(path, StoreOptions::default(), Arc::new(NoObserver))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

async fn close(store: Store) {
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

async fn append(store: &Store) {
    store
        .writer()
        .append(
            StreamKey::new("p", "b"),
            vec![NewEvent {
                kind: "text".into(),
                data: "{}".into(),
            }],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_data_directory_is_0700_and_the_store_and_append_log_0600() {
    let root = tempfile::tempdir().unwrap();
    // Created by the store, whatever the umask.
    let path = root.path().join("data").join("state.redb");
    let store = open(&path).unwrap();
    append(&store).await;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&wal_path(&path)), 0o600);
    close(store).await;

    // An existing directory and files readable by others are tightened at the next open.
    std::fs::set_permissions(path.parent().unwrap(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::set_permissions(wal_path(&path), PermissionsExt::from_mode(0o666)).unwrap();
    let store = open(&path).unwrap();
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&wal_path(&path)), 0o600);
    close(store).await;

    // A directory shared on purpose (sticky, as /tmp) is left as it is.
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, PermissionsExt::from_mode(0o1777)).unwrap();
    let store = open(&shared.join("s.redb")).unwrap();
    assert_eq!(mode(&shared), 0o1777);
    assert_eq!(mode(&shared.join("s.redb")), 0o600);
    close(store).await;
}

#[tokio::test]
async fn an_empty_or_missing_database_beside_an_append_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = open(&path).unwrap();
    append(&store).await;
    close(store).await;

    // Emptied: refused, saying what to do, and nothing is changed.
    std::fs::write(&path, b"").unwrap();
    let wal_len = std::fs::metadata(wal_path(&path)).unwrap().len();
    let err = open(&path).err().expect("an empty database is refused");
    let message = err.to_string();
    assert!(matches!(err, StorageError::Refused(_)), "{err:?}");
    assert!(message.contains("is empty"), "{message}");
    assert!(message.contains("backup"), "{message}");
    assert!(message.contains(".wal"), "{message}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(std::fs::metadata(wal_path(&path)).unwrap().len(), wal_len);

    // Missing: refused too.
    std::fs::remove_file(&path).unwrap();
    let err = open(&path).err().expect("a missing database is refused");
    assert!(err.to_string().contains("is missing"), "{err}");
    assert!(!path.exists());

    // With the append log moved away, as the message says, a new store starts.
    std::fs::rename(wal_path(&path), dir.path().join("old.wal")).unwrap();
    let store = open(&path).unwrap();
    close(store).await;

    // An empty database file alone (nothing of an earlier store beside it) is a new store.
    let fresh = tempfile::tempdir().unwrap();
    let path = fresh.path().join("state.redb");
    std::fs::write(&path, b"").unwrap();
    let store = open(&path).unwrap();
    append(&store).await;
    close(store).await;
}
