//! A few threads that run short redb reads for async code.
//!
//! A redb read is a few microseconds from the page cache, but it may touch the disk, so async
//! code must not run it on the runtime. `spawn_blocking` would do, yet a burst of requests
//! (a thousand clients reconnecting after a deploy) then starts a blocking thread per waiting
//! read, up to hundreds, and those threads take the CPU from the runtime that accepts and
//! answers. These threads are few and always there: reads queue in order instead.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use crate::StorageError;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pool. Dropping it lets its threads finish the queued jobs and exit.
pub(crate) struct Readers {
    queue: Arc<Queue>,
}

impl Readers {
    pub(crate) fn start(threads: usize) -> Result<Self, StorageError> {
        let queue = Arc::new(Queue::default());
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("redb-reader-{i}"))
                .spawn(move || work(&queue))
                .map_err(|e| StorageError::Database(format!("starting a reader thread: {e}")))?;
        }
        Ok(Self { queue })
    }

    /// Threads for this machine: one per core, at least 2, at most 8.
    pub(crate) fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
    }

    /// Queue `job`; it runs on a reader thread. A job that panics is dropped, its thread lives on.
    pub(crate) fn submit(&self, job: Job) {
        let mut state = self.queue.lock();
        state.jobs.push_back(job);
        drop(state);
        self.queue.ready.notify_one();
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

fn work(queue: &Queue) {
    loop {
        let job = {
            let mut state = queue.lock();
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.closed {
                    return;
                }
                state = queue.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        // The job's caller sees the panic as a dropped answer.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_a_panic_spares_the_thread_and_a_drop_drains_the_queue() {
        let readers = Readers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        readers.submit(Box::new(|| panic!("a bad job")));
        for i in 0..100 {
            let tx = tx.clone();
            readers.submit(Box::new(move || tx.send(i).unwrap()));
        }
        drop(readers);
        drop(tx);
        assert_eq!(rx.iter().collect::<Vec<_>>(), (0..100).collect::<Vec<_>>());
    }
}
