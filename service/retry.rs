//! Retries of background work, on `backon`: one policy for every task that
//! runs without a caller (partition maintenance, the analytics refresh, the
//! idempotency sweep, the search-log writer, the outbox relay).
//!
//! **Policy**: 3 attempts, exponential backoff from 1 s with full jitter,
//! capped at 10 s. The cap is 10 s rather than 30 s: with three attempts
//! the waits are at most 1 s and 2 s either way, and a short cap keeps a
//! failing round (and a shutdown waiting for it) well inside the shortest
//! schedule these tasks run on. After the last attempt the failure is
//! reported, once, as `background_task_failures_total{task}` and an ERROR
//! line naming the task; the task tries again at its next round, so nothing
//! is dropped silently.

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};

/// Attempts of one round of background work, the first included.
pub const ATTEMPTS: usize = 3;
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The backoff between attempts of background work.
pub fn background_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_max_times(ATTEMPTS - 1)
        .with_jitter()
}

/// Runs `attempt` under [`background_policy`]: each failed attempt but the
/// last is logged at WARN; the last is counted and logged at ERROR as
/// `task`, and returned.
pub async fn background<T, E, F, Fut>(task: &'static str, attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let result = attempt
        .retry(background_policy())
        .sleep(tokio::time::sleep)
        .notify(|error: &E, pause: Duration| {
            tracing::warn!(task, error = ?error, retry_in = ?pause, "{task} failed; retrying");
        })
        .await;
    if let Err(error) = &result {
        metrics::counter!("background_task_failures_total", "task" => task).increment(1);
        tracing::error!(task, error = ?error, attempts = ATTEMPTS, "{task} failed after {ATTEMPTS} attempts");
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failing_round_is_tried_three_times_then_reported() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), &str> = background("test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err("down")
        })
        .await;
        assert_eq!(result, Err("down"));
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_that_recovers_succeeds_without_more_attempts() {
        let calls = AtomicUsize::new(0);
        let result: Result<usize, &str> = background("test", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err("transient"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result, Ok(1));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_waits_stay_within_the_cap() {
        let started = tokio::time::Instant::now();
        let _: Result<(), &str> = background("test", || async { Err("down") }).await;
        // Two waits, each at most the cap (full jitter makes them shorter).
        assert!(
            started.elapsed() <= MAX_DELAY * 2,
            "{:?}",
            started.elapsed()
        );
    }
}
