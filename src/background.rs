//! Bulk file work (snapshot scans and hashing, restores, deleting evicted branches) on threads of
//! its own at a lower CPU priority, so that it never slows the writer thread, the SSE fan-out or
//! request handlers on a small machine: under contention the scheduler serves them first.

/// How much nicer than the server the bulk work runs.
const NICENESS: i32 = 10;

/// The thread gave up without an answer (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("a background thread failed: {0}")]
pub struct Failed(String);

/// Run `f` on a fresh thread at nice +10 and await its result. A thread per call: the niceness
/// of a thread cannot be raised back without privileges, so pooled threads must never get it.
pub async fn low_priority<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failed> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("weldr-bulk".into())
        .spawn(move || {
            // On Linux PRIO_PROCESS with a thread id sets that thread's niceness alone. A
            // failure only leaves the priority as it was.
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICENESS);
            let _ = tx.send(f());
        })
        .map_err(|e| Failed(format!("could not start a thread: {e}")))?;
    rx.await
        .map_err(|_| Failed("the thread ended without an answer".into()))
}
