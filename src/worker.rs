//! Background jobs: one small [`Worker`] shape, run by one [`Workers`] runner that the server
//! owns. A worker does one unit of work at a time and says whether more is waiting; when it is
//! idle the runner waits for its [`Worker::wait_for_work`]; when a unit fails the runner backs
//! off (exponentially, with jitter) before the next one, and keeps the error for `/health` and
//! `weldr-agent status`. At shutdown the runner cancels the shared token and joins every worker
//! within a budget. (garage's `Worker` is the model.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What a unit of work left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// More work is waiting: run the next unit at once.
    Busy,
    /// Nothing to do until [`Worker::wait_for_work`] returns.
    Idle,
    /// The worker has finished for good (a one-off job such as recovery).
    Done,
}

#[async_trait]
pub trait Worker: Send + 'static {
    /// A short stable name (`syncer`, `evictor`, ...).
    fn name(&self) -> &'static str;

    /// A one-line description of what it is doing or holding (shown in status), if any.
    fn detail(&self) -> Option<String> {
        None
    }

    /// One unit of work. `shutdown` is cancelled when the server stops: a long unit should end
    /// early then.
    async fn work(&mut self, shutdown: &CancellationToken) -> Result<WorkerState, String>;

    /// Wait until there may be work again (a timer, a notification). Cancelled at shutdown.
    async fn wait_for_work(&mut self);
}

/// How a worker is doing, as `/health` and `status` show it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub name: &'static str,
    /// `busy`, `idle`, `backoff` (after an error) or `done`.
    pub state: &'static str,
    pub last_error: Option<String>,
    /// Failed units since the start.
    pub errors: u64,
    /// Failed units in a row (the backoff grows with it).
    pub consecutive_errors: u32,
    pub detail: Option<String>,
}

/// The first backoff after an error, and the longest.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The wait after `n` failures in a row: 1 s doubling up to 60 s, with up to 25% jitter so that
/// workers failing on the same cause do not retry in step.
pub fn backoff(n: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << n.saturating_sub(1).min(6))
        .min(BACKOFF_MAX);
    let mut byte = [0u8; 2];
    let jitter = match getrandom::fill(&mut byte) {
        Ok(()) => u16::from_le_bytes(byte) as f64 / u16::MAX as f64 * 0.25,
        Err(_) => 0.0,
    };
    base.mul_f64(1.0 + jitter).min(BACKOFF_MAX)
}

type Shared = Arc<Mutex<WorkerInfo>>;

/// Runs the workers and joins them at shutdown.
pub struct Workers {
    shutdown: CancellationToken,
    infos: Mutex<Vec<Shared>>,
    handles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Workers {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            infos: Mutex::default(),
            handles: Mutex::default(),
        }
    }

    /// Start a worker on the runtime.
    pub fn spawn(&self, mut worker: impl Worker) {
        let info: Shared = Arc::new(Mutex::new(WorkerInfo {
            name: worker.name(),
            state: "busy",
            last_error: None,
            errors: 0,
            consecutive_errors: 0,
            detail: None,
        }));
        self.infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(info.clone());
        let shutdown = self.shutdown.clone();
        let handle = tokio::spawn(async move {
            let set = |state: &'static str, detail: Option<String>| {
                let mut i = info.lock().unwrap_or_else(|p| p.into_inner());
                i.state = state;
                i.detail = detail;
            };
            while !shutdown.is_cancelled() {
                let outcome = worker.work(&shutdown).await;
                let detail = worker.detail();
                match outcome {
                    Ok(WorkerState::Busy) => {
                        set("busy", detail);
                        info.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .consecutive_errors = 0;
                        tokio::task::yield_now().await;
                    }
                    Ok(WorkerState::Idle) => {
                        set("idle", detail);
                        info.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .consecutive_errors = 0;
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = worker.wait_for_work() => {}
                        }
                        set("busy", worker.detail());
                    }
                    Ok(WorkerState::Done) => {
                        set("done", detail);
                        return;
                    }
                    Err(error) => {
                        let wait = {
                            let mut i = info.lock().unwrap_or_else(|p| p.into_inner());
                            i.state = "backoff";
                            i.detail = detail;
                            i.errors += 1;
                            i.consecutive_errors = i.consecutive_errors.saturating_add(1);
                            tracing::warn!(worker = i.name, error = %error, errors_in_a_row = i.consecutive_errors, "worker failed; backing off");
                            i.last_error = Some(error);
                            backoff(i.consecutive_errors)
                        };
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
            set("done", worker.detail());
        });
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// Every worker's status, in the order they were started.
    pub fn status(&self) -> Vec<WorkerInfo> {
        self.infos
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|i| i.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Stop: cancel the shared token and wait for every worker to end, at most `budget`; the
    /// ones still running then are aborted (and named in the log).
    pub async fn join(&self, budget: Duration) {
        self.shutdown.cancel();
        let handles: Vec<_> =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + budget;
        for (handle, info) in handles.into_iter().zip(self.status()) {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                tracing::warn!(
                    worker = info.name,
                    "worker did not stop within the shutdown budget; aborted"
                );
                abort.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        calls: Arc<AtomicU32>,
    }

    #[async_trait]
    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn work(&mut self, _: &CancellationToken) -> Result<WorkerState, String> {
            match self.calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err("first unit fails".into()),
                1 => Ok(WorkerState::Busy),
                _ => Ok(WorkerState::Idle),
            }
        }
        async fn wait_for_work(&mut self) {
            std::future::pending::<()>().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn errors_back_off_are_reported_and_workers_join() {
        let workers = Workers::new(CancellationToken::new());
        let calls = Arc::new(AtomicU32::new(0));
        workers.spawn(Flaky {
            calls: calls.clone(),
        });
        // The first unit fails: the worker backs off (paused time advances by itself).
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = workers.status();
        assert_eq!(status[0].name, "flaky");
        assert_eq!(status[0].errors, 1);
        assert_eq!(status[0].consecutive_errors, 0);
        assert_eq!(status[0].last_error.as_deref(), Some("first unit fails"));
        workers.join(Duration::from_secs(1)).await;
        assert_eq!(workers.status()[0].state, "done");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= BACKOFF_MIN && backoff(1) < BACKOFF_MIN * 2);
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(50) <= BACKOFF_MAX);
    }
}
