//! Workflow records: one active workflow per branch in storage, release on a terminal status,
//! and the journal in order across a reopen.

use std::sync::Arc;

use weldr_storage::events::NoObserver;
use weldr_storage::workflow::*;
use weldr_storage::{StorageError, Store, StoreOptions};

fn wf(id: &str) -> WorkflowRecord {
    WorkflowRecord {
        workflow_id: id.into(),
        project_id: "p".into(),
        branch_id: "b".into(),
        status: WorkflowStatus::Pending,
        model: "replay:x".into(),
        user_message: "hi".into(),
        plan: None,
        tasks: vec![],
        version: None,
        error: None,
        reply: None,
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cancel_requested: false,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

#[tokio::test]
async fn one_active_workflow_per_branch_and_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, StoreOptions::default(), Arc::new(NoObserver)).unwrap();
    let a = wf("a");
    store
        .writer()
        .write(move |ctx| create_workflow(ctx, &a))
        .await
        .unwrap();
    let b = wf("b");
    let err = store
        .writer()
        .write(move |ctx| create_workflow(ctx, &b))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::Conflict(ref h) if h == "a"),
        "{err:?}"
    );
    for i in 0..3 {
        store
            .writer()
            .write(move |ctx| {
                append_journal(
                    ctx,
                    "a",
                    &JournalEntry::User {
                        phase: "plan".into(),
                        message_json: format!("{i}"),
                    },
                )
            })
            .await
            .unwrap();
    }
    let mut done = wf("a");
    done.status = WorkflowStatus::Complete;
    store
        .writer()
        .write(move |ctx| put_workflow(ctx, &done))
        .await
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(&path, StoreOptions::default(), Arc::new(NoObserver)).unwrap();
    let b = wf("b");
    store
        .writer()
        .write(move |ctx| create_workflow(ctx, &b))
        .await
        .unwrap();
    let rtx = store.begin_read().unwrap();
    let j = journal(&rtx, "a").unwrap();
    assert_eq!(j.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        get_workflow(&rtx, "a").unwrap().unwrap().status,
        WorkflowStatus::Complete
    );
    let open: Vec<_> = list_unfinished(&rtx)
        .unwrap()
        .into_iter()
        .map(|w| w.workflow_id)
        .collect();
    assert_eq!(open, vec!["b".to_string()]);
}
