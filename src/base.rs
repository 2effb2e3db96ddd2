//! What every domain layer shares: the configuration, the store, the event bus, the branch
//! locks and the shutdown signal. Built once by the composition root ([`crate::app::App`]) and
//! handed to the services that need it; it knows nothing above the leaves, so holding it never
//! makes an import circle.

use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use weldr_storage::{Event, StorageError, Store};

use crate::branches::layout::{BranchKey, BranchLocks, branch_dir};
use crate::config::Config;
use crate::stream::{Cursor, EventBus, EventError, Subscription, new_event};

#[derive(Clone)]
pub struct Base {
    pub config: Arc<Config>,
    pub store: Store,
    pub bus: Arc<EventBus>,
    pub locks: Arc<BranchLocks>,
    /// Cancelled when the server starts shutting down: streams, workflows and workers end.
    pub shutdown: CancellationToken,
}

/// An event could not be appended.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl Base {
    /// Append one event to a branch stream; answers after it is durable. `fields` must be a
    /// JSON object; `id`, `type` and `timestamp` are set by the log.
    pub async fn emit(
        &self,
        key: &BranchKey,
        kind: &str,
        fields: Value,
    ) -> Result<Arc<Event>, EmitError> {
        let event = new_event(kind, fields)?;
        let mut events = self
            .store
            .writer()
            .append(key.stream(), vec![event])
            .await?;
        Ok(events
            .pop()
            .ok_or_else(|| StorageError::Database("append returned no event".into()))?)
    }

    /// Read from redb off the runtime: the one way request-path code reads the store.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        self.store.read(move |s| f(&s.begin_read()?)).await
    }

    /// The branch's directory.
    pub fn dir(&self, key: &BranchKey) -> std::path::PathBuf {
        branch_dir(&self.config, key)
    }

    /// Subscribe to a branch stream from `cursor`.
    pub async fn subscribe(
        &self,
        key: &BranchKey,
        cursor: Cursor,
    ) -> Result<Subscription, StorageError> {
        let stream = key.stream();
        let rx = self.bus.subscribe(&stream);
        Subscription::start(
            self.store.clone(),
            self.bus.frames.clone(),
            stream,
            rx,
            cursor,
            self.shutdown.child_token(),
            self.config.sse_heartbeat,
        )
        .await
    }
}
