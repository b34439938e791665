//! The deadline of the current call, as a value the code running in the call
//! can read.
//!
//! The deadline middleware computes each call's [`Deadline`] (the shorter of
//! the caller's `grpc-timeout` and the server's bound) and runs the rest of
//! the call inside [`Deadline::scope`]. Domain and store code read it with
//! [`Deadline::current`] to bound what they wait for (a statement timeout, a
//! pool wait, a Redis command) without the deadline being threaded through
//! every function signature, the way `statements::scope` carries the
//! statement log.
//!
//! The scope is a `tokio::task_local!`: it reaches everything the call's own
//! task polls (its loaders' batches included, which the calling task drives),
//! but **not work spawned onto another task** (`tokio::spawn`,
//! `spawn_blocking`): there `Deadline::current()` is `None`. Code that hands
//! work to another task and wants it bounded passes the deadline along and
//! opens a scope there.
//!
//! This type sits at the bottom of the crate with the other value types: it
//! imports nothing from the api, domain or store layers.
//!
//! A scope also watches whether the call is **abandoned**: its future
//! dropped before it finished (the caller cancelled it with RST_STREAM, or
//! the deadline passed and the middleware dropped it). Code holding a
//! resource that outlives a dropped future (a statement in flight in
//! PostgreSQL) takes the call's [`Abandoned`] flag while the call runs and
//! reads it in its `Drop`: set means "dropped mid-call, clean up", clear
//! means an ordinary early return.
//!
//! The instant is tokio's, so that a test with a paused clock
//! (`tokio::time::pause`) moves deadlines as it moves timers, and the
//! middleware can hand it to `tokio::time::timeout_at` as it is.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Deadline;
    static ABANDONED: Abandoned;
}

/// How far ahead a deadline too far to represent is put: further than any
/// call can run.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// How long one wait inside a call (a Redis command, a MongoDB operation)
/// may take: its own `timeout`, or the call's `remaining` time when that is
/// shorter (then true: a timeout is the caller's deadline, not a failure of
/// what it waited for).
pub fn wait_bound(timeout: Duration, remaining: Option<Duration>) -> (Duration, bool) {
    match remaining {
        Some(remaining) if remaining < timeout => (remaining, true),
        _ => (timeout, false),
    }
}

/// When a call must be finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        Self(now.checked_add(timeout).unwrap_or_else(|| now + FAR_FUTURE))
    }

    pub fn instant(self) -> Instant {
        self.0
    }

    /// The time left, zero once the deadline has passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn is_expired(self) -> bool {
        self.0 <= Instant::now()
    }

    /// `timeout`, or the time left if that is shorter: how long a single
    /// wait inside the call may take.
    pub fn bound(self, timeout: Duration) -> Duration {
        timeout.min(self.remaining())
    }

    /// The deadline of the call running on this task, if any (see the module
    /// doc for what "on this task" means).
    pub fn current() -> Option<Self> {
        CURRENT.try_with(|deadline| *deadline).ok()
    }

    /// Runs `work` with `self` as the current deadline; a scope inside it
    /// (a tighter bound for one step) takes precedence while it runs.
    ///
    /// It also watches `work` for abandonment (see the module doc): if the
    /// returned future is dropped before `work` completes, the
    /// [`Abandoned`] flag of the scope is set before `work` is dropped.
    pub fn scope<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        let abandoned = Abandoned::default();
        let watched = Watched {
            work: Box::pin(work),
            abandoned: abandoned.clone(),
            done: false,
        };
        CURRENT.scope(self, ABANDONED.scope(abandoned, watched))
    }
}

/// Whether the call was dropped before it finished; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    /// The flag of the call running on this task, if it runs in a
    /// [`Deadline::scope`].
    pub fn current() -> Option<Self> {
        ABANDONED.try_with(Clone::clone).ok()
    }

    /// True once the call's future was dropped before it completed.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// `work`, flagging `abandoned` when dropped unfinished. A hand-written
/// future rather than an `async` block so that the order is certain: the
/// flag is set in `drop`, before the fields (and so `work`, and whatever
/// it holds) are dropped.
struct Watched<F> {
    work: Pin<Box<F>>,
    abandoned: Abandoned,
    done: bool,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let output = self.work.as_mut().poll(cx);
        if output.is_ready() {
            self.done = true;
        }
        output
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        if !self.done {
            self.abandoned.0.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inside_a_scope_the_current_deadline_is_the_scopes() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let seen = deadline.scope(async { Deadline::current() }).await;
        assert_eq!(seen, Some(deadline));
    }

    #[tokio::test]
    async fn outside_a_scope_there_is_no_current_deadline() {
        assert_eq!(Deadline::current(), None);
        let _ = Deadline::after(Duration::from_secs(5))
            .scope(async {})
            .await;
        assert_eq!(Deadline::current(), None, "the scope ends with its future");
    }

    #[tokio::test]
    async fn a_nested_scope_takes_precedence_while_it_runs() {
        let outer = Deadline::after(Duration::from_secs(5));
        let inner = Deadline::after(Duration::from_secs(1));
        let (during, after) = outer
            .scope(async {
                let during = inner.scope(async { Deadline::current() }).await;
                (during, Deadline::current())
            })
            .await;
        assert_eq!(during, Some(inner));
        assert_eq!(after, Some(outer));
    }

    #[tokio::test]
    async fn a_task_spawned_from_a_scope_does_not_see_its_deadline() {
        let seen = Deadline::after(Duration::from_secs(5))
            .scope(async { tokio::spawn(async { Deadline::current() }).await })
            .await
            .unwrap();
        assert_eq!(seen, None);
    }

    #[test]
    fn the_remaining_time_shrinks_and_ends_at_zero() {
        let deadline = Deadline::after(Duration::from_secs(10));
        let first = deadline.remaining();
        std::thread::sleep(Duration::from_millis(2));
        let later = deadline.remaining();
        assert!(later < first, "{later:?} < {first:?}");
        assert!(!deadline.is_expired());

        let passed = Deadline::at(Instant::now() - Duration::from_millis(1));
        assert_eq!(passed.remaining(), Duration::ZERO);
        assert!(passed.is_expired());
    }

    #[test]
    fn bound_picks_the_shorter_of_the_timeout_and_the_time_left() {
        let deadline = Deadline::after(Duration::from_secs(10));
        assert_eq!(
            deadline.bound(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        let bounded = deadline.bound(Duration::from_secs(60));
        assert!(bounded <= Duration::from_secs(10) && bounded > Duration::from_secs(9));

        let passed = Deadline::at(Instant::now() - Duration::from_millis(1));
        assert_eq!(passed.bound(Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn a_wait_takes_the_shorter_of_its_timeout_and_the_calls_time_left() {
        const MS: Duration = Duration::from_millis(1);
        assert_eq!(wait_bound(100 * MS, None), (100 * MS, false));
        assert_eq!(wait_bound(100 * MS, Some(5_000 * MS)), (100 * MS, false));
        assert_eq!(wait_bound(100 * MS, Some(100 * MS)), (100 * MS, false));
        assert_eq!(wait_bound(100 * MS, Some(30 * MS)), (30 * MS, true));
        assert_eq!(
            wait_bound(100 * MS, Some(Duration::ZERO)),
            (Duration::ZERO, true),
            "no time left: Redis is skipped, not failed"
        );
        assert_eq!(wait_bound(5_000 * MS, None), (5_000 * MS, false));
        assert_eq!(
            wait_bound(5_000 * MS, Some(30_000 * MS)),
            (5_000 * MS, false)
        );
        assert_eq!(wait_bound(5_000 * MS, Some(200 * MS)), (200 * MS, true));
    }

    #[tokio::test]
    async fn a_call_that_completes_is_not_abandoned() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let flag = deadline
            .scope(async { Abandoned::current() })
            .await
            .expect("a scope has a flag");
        assert!(!flag.is_set());
    }

    #[tokio::test]
    async fn a_call_dropped_mid_flight_is_abandoned_before_what_it_holds_is_dropped() {
        struct SeesFlag(Abandoned, Option<tokio::sync::oneshot::Sender<bool>>);
        impl Drop for SeesFlag {
            fn drop(&mut self) {
                if let Some(tx) = self.1.take() {
                    let _ = tx.send(self.0.is_set());
                }
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let call = Deadline::after(Duration::from_secs(5)).scope(async move {
            let _held = SeesFlag(Abandoned::current().unwrap(), Some(tx));
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        let handle = tokio::spawn(call);
        started_rx.await.unwrap();
        handle.abort();
        assert!(
            rx.await.unwrap(),
            "the flag is set when what the call holds is dropped"
        );
    }

    #[tokio::test]
    async fn an_early_return_inside_a_call_is_not_abandonment() {
        let seen = Deadline::after(Duration::from_secs(5))
            .scope(async {
                let flag = Abandoned::current().unwrap();
                // Something dropped while the call runs on: not abandoned.
                drop(String::from("an early return drops its locals"));
                flag.is_set()
            })
            .await;
        assert!(!seen);
    }

    #[test]
    fn an_unrepresentable_timeout_is_far_in_the_future() {
        let deadline = Deadline::after(Duration::MAX);
        assert!(deadline.remaining() > Duration::from_secs(86_400 * 365));
    }
}
