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
//! The instant is tokio's, so that a test with a paused clock
//! (`tokio::time::pause`) moves deadlines as it moves timers, and the
//! middleware can hand it to `tokio::time::timeout_at` as it is.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Deadline;
}

/// How far ahead a deadline too far to represent is put: further than any
/// call can run.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

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
    pub fn scope<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, work)
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
    fn an_unrepresentable_timeout_is_far_in_the_future() {
        let deadline = Deadline::after(Duration::MAX);
        assert!(deadline.remaining() > Duration::from_secs(86_400 * 365));
    }
}
