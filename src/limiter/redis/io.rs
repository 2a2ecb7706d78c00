//! The thread that runs the probe, the charge-back and their connection.
//!
//! Measured with three replicas on one Redis and two busy loops on two
//! cores, decisions missed 50 ms with Redis healthy because their answers
//! waited for other threads: one multiplexed connection per backend, opened
//! on the first worker, had its answers read by that worker's event loop, so
//! every other worker's decision waited until that worker finished its turn
//! and was scheduled again. Now each worker decides on a connection of its
//! own (see `batch`), whose answers its own event loop reads, and a decision
//! only times out when the answer was not there when its worker looked. The
//! probe must not depend on any worker (it runs while they are busy or
//! gone), so it runs here, on a single-threaded runtime that does nothing
//! else; decisions use its connection only while their worker's own is
//! being opened.

use std::future::Future;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A single-threaded runtime on its own thread; stops when dropped.
pub struct Io {
    handle: Handle,
    _stop: oneshot::Sender<()>,
}

impl Io {
    pub fn start() -> std::io::Result<Io> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("floodgate-redis".into())
            .spawn(move || {
                // Runs until the backend (holding `stop`) is gone; its
                // tasks end with the runtime.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Io {
            handle,
            _stop: stop,
        })
    }

    /// Runs `task` on the Redis thread.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}
