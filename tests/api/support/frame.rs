//! The frame `#[api_test]` runs every test body in.
//!
//! - **A time limit.** A hung test fails on its own, naming itself, instead
//!   of holding the whole run until CI gives up. The bound is measured on
//!   the wall clock by a thread of its own, so a test that pauses tokio's
//!   clock (`tokio::time::pause`, `start_paused`) does not trip it.
//! - **Teardown.** What a test starts (a `TestApp`'s server and background
//!   tasks, a PostgreSQL database, a MongoDB database) registers its
//!   teardown here when it is dropped. After the body, the frame stops the
//!   servers gracefully (their shutdown token is cancelled, and the server
//!   finishes its background tasks and closes its pools), then drops the
//!   databases, in the order the guards were dropped, all on the test's own
//!   runtime. When the body panics or times out, or a guard is dropped
//!   outside a frame (in a spawned task), the same teardown runs at once
//!   and blocking: servers are aborted and databases dropped from a thread.

use std::{cell::RefCell, future::Future, time::Duration};

use tokio::task::JoinHandle;

/// The bound of a test without `#[api_test(timeout_secs = N)]`: far above
/// any test's normal run, even on a busy machine.
const DEFAULT_LIMIT: Duration = Duration::from_secs(120);
/// Replaces every test's bound (seconds), e.g. to sit in a debugger.
const LIMIT_VARIABLE: &str = "DATAGATE_TEST_TIMEOUT_SECS";
/// How long a server may take to stop before it is aborted.
const STOP_LIMIT: Duration = Duration::from_secs(10);

tokio::task_local! {
    static PENDING: RefCell<Pending>;
}

/// Runs one test body: within its time limit, then the teardown of what it
/// left behind.
pub async fn run<F: Future>(test: &str, limit: Option<Duration>, body: F) -> F::Output {
    let limit = std::env::var(LIMIT_VARIABLE)
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map(Duration::from_secs)
        .or(limit)
        .unwrap_or(DEFAULT_LIMIT);
    PENDING
        .scope(RefCell::new(Pending::default()), async {
            let output = match within(limit, body).await {
                Some(output) => output,
                None => panic!(
                    "{test} did not finish within {limit:?} \
                     (#[api_test(timeout_secs = N)] or {LIMIT_VARIABLE} changes the bound)"
                ),
            };
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            pending.finish().await;
            output
        })
        .await
}

/// `future`'s output, or None once `limit` has passed on the wall clock.
async fn within<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    let (expired_tx, expired_rx) = tokio::sync::oneshot::channel::<()>();
    // Dropping `finished` wakes the timer thread, which then exits.
    let (finished, timer) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = timer.recv_timeout(limit) {
            let _ = expired_tx.send(());
        }
    });
    let output = tokio::select! {
        biased;
        output = future => Some(output),
        _ = expired_rx => None,
    };
    drop(finished);
    output
}

/// Something a test started that must not outlive it.
pub enum Teardown {
    /// A server whose shutdown token was cancelled: wait for it to stop.
    Server(JoinHandle<anyhow::Result<()>>),
    /// Any other cleanup: an async and a blocking way to do the same thing
    /// (the blocking one runs outside a frame, or when the test failed).
    Task {
        run: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        blocking: Box<dyn FnOnce() + Send>,
    },
}

impl Teardown {
    /// A cleanup done by `cleanup`, awaited in the frame or, outside one,
    /// on a runtime of its own in a thread (the caller's runtime may be the
    /// one running the drop, which cannot block).
    pub fn task<F, Fut>(cleanup: F) -> Self
    where
        F: FnOnce() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let blocking = cleanup.clone();
        Self::Task {
            run: Box::pin(async move { cleanup().await }),
            blocking: Box::new(move || block_on_a_thread(blocking)),
        }
    }

    /// Hands this teardown to the running test's frame, or does it now,
    /// blocking, when there is none.
    pub fn register(self) {
        let mut teardown = Some(self);
        let _ = PENDING.try_with(|pending| {
            if let Ok(mut pending) = pending.try_borrow_mut() {
                pending.0.extend(teardown.take());
            }
        });
        if let Some(teardown) = teardown {
            teardown.run_blocking();
        }
    }

    async fn run(self) {
        match self {
            Self::Server(mut server) => {
                if within(STOP_LIMIT, &mut server).await.is_none() {
                    eprintln!("a test server did not stop within {STOP_LIMIT:?}; aborted");
                    server.abort();
                }
            }
            Self::Task { run, .. } => run.await,
        }
    }

    fn run_blocking(self) {
        match self {
            Self::Server(server) => server.abort(),
            Self::Task { blocking, .. } => blocking(),
        }
    }
}

/// The teardowns registered so far, in the order they were registered.
#[derive(Default)]
struct Pending(Vec<Teardown>);

impl Pending {
    async fn finish(mut self) {
        for teardown in std::mem::take(&mut self.0) {
            teardown.run().await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        for teardown in self.0.drain(..) {
            teardown.run_blocking();
        }
    }
}

/// Runs `cleanup` to completion on a runtime of its own, in a thread of its
/// own: a drop may run on a runtime's thread, where blocking on that same
/// runtime is not allowed.
fn block_on_a_thread<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for a test's teardown")
            .block_on(cleanup());
    })
    .join();
}
