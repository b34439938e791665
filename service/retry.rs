//! Retries, on `backon`: every retry policy of the service is here, one for
//! the work of calls and one for background work.
//!
//! # Calls
//!
//! A call's PostgreSQL work that failed for a transient reason
//! ([`Error::is_transient`]: a serialization failure or deadlock, the server
//! ending the connection as it shuts down or restarts, a connection reset or
//! lost under a statement) is done again inside the call by [`postgres`]:
//! every read (an acquire and its statements) and every write transaction
//! (begin to commit; `domain::write` says which failed commits are repeated
//! and why that is safe). Never repeated: the call's own deadline
//! (`QUERY_TIMEOUT`, DEADLINE_EXCEEDED), constraint violations and other
//! outcomes, a failed pool acquire (the pool already retried connecting
//! inside it), and the availability gate's refusal while the server is
//! down (that is the fail-fast path; the gate's trial call reconnects).
//!
//! **Policy**: [`CALL_ATTEMPTS`] attempts; before each retry a wait drawn
//! uniformly between zero and the step (full jitter), the steps exponential
//! from [`CALL_FIRST_DELAY`] and capped at [`CALL_MAX_DELAY`]. A retry is
//! made only if at least [`ROOM`] of the call's deadline is left after its
//! wait: no wait runs past the deadline, and the caller hears the failure
//! that stopped the call rather than a DEADLINE_EXCEEDED of an attempt that
//! had no time to run.
//!
//! **Budget**: retries draw on a token bucket shared by the process
//! ([`Budget::postgres`]), like Finagle's retry budget and gRPC's retry
//! throttling: each operation's first attempt deposits a tenth of a token
//! (at most [`Budget::MAX_BALANCE`] banked), each retry withdraws one, and a
//! reserve refilled at 10 tokens a second (holding at most 10) lets a quiet
//! process retry too. So retries add at most about 10 % to the work
//! PostgreSQL sees, plus 10 a second: when PostgreSQL is in trouble for
//! every call, retries do not multiply its load. With the budget empty, the
//! failure is returned as it is.
//!
//! Counted as `call_retries_total{outcome}`: `retried` for each retry made,
//! `budget_exhausted` for each transient failure returned because the
//! budget was empty; each retry is also logged at WARN in the call's span.
//!
//! # Background work
//!
//! One policy for every task that runs without a caller (partition
//! maintenance, the analytics refresh, the idempotency sweep, the
//! search-log writer, the outbox relay).
//!
//! **Policy**: 3 attempts, exponential backoff from 1 s with full jitter,
//! capped at 10 s. The cap is 10 s rather than 30 s: with three attempts
//! the waits are at most 1 s and 2 s either way, and a short cap keeps a
//! failing round (and a shutdown waiting for it) well inside the shortest
//! schedule these tasks run on. After the last attempt the failure is
//! reported, once, as `background_task_failures_total{task}` and an ERROR
//! line naming the task; the task tries again at its next round, so nothing
//! is dropped silently.

use std::{
    future::Future,
    sync::{LazyLock, Mutex, PoisonError},
    time::Duration,
};

use backon::{BackoffBuilder as _, ExponentialBuilder, Retryable as _};
use tokio::time::Instant;

use crate::{
    error::{Error, Result},
    model::deadline::Deadline,
};

// --- Calls -------------------------------------------------------------------

/// Attempts of one operation of a call, the first included.
pub const CALL_ATTEMPTS: usize = 3;
pub const CALL_FIRST_DELAY: Duration = Duration::from_millis(10);
pub const CALL_MAX_DELAY: Duration = Duration::from_millis(100);
/// What a retry must have left of the call's deadline after its wait: more
/// than a statement's margin (`store::postgres::MARGIN`, 50 ms), below which
/// the attempt would fail at once with DEADLINE_EXCEEDED.
pub const ROOM: Duration = Duration::from_millis(100);

/// Runs a call's PostgreSQL work, `attempt` (the acquire or `begin`, the
/// statements and, for a write, its commit), and again while it fails for
/// a transient reason, under the call policy and the process's PostgreSQL
/// budget. Every read and write of a call goes through here.
pub async fn postgres<T, F, Fut>(attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    call(Budget::postgres(), attempt).await
}

/// Runs `attempt` and, while it fails with a transient error, again under
/// the call policy and `budget` (see the module doc). The error returned is
/// the last attempt's, no longer transient: it has had its retries, so an
/// enclosing retry would not multiply them.
pub async fn call<T, F, Fut>(budget: &Budget, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    budget.deposit();
    let waits = CallWaits {
        steps: FullJitter(
            ExponentialBuilder::default()
                .with_min_delay(CALL_FIRST_DELAY)
                .with_max_delay(CALL_MAX_DELAY)
                .with_max_times(CALL_ATTEMPTS - 1)
                .build(),
        ),
        deadline: Deadline::current(),
        budget,
    };
    attempt
        .retry(waits)
        .sleep(tokio::time::sleep)
        .when(Error::is_transient)
        .notify(|error: &Error, pause: Duration| {
            metrics::counter!("call_retries_total", "outcome" => "retried").increment(1);
            tracing::warn!(error = %error, retry_in = ?pause, "transient database failure; retrying");
        })
        .await
        .map_err(Error::not_transient)
}

/// The waits before the retries of one operation: the policy's steps, as
/// long as they fit the deadline and the budget pays for them. Asked only
/// after a transient failure.
#[derive(Debug)]
struct CallWaits<'a, S> {
    steps: S,
    deadline: Option<Deadline>,
    budget: &'a Budget,
}

impl<S: Iterator<Item = Duration>> Iterator for CallWaits<'_, S> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.steps.next()?;
        if let Some(deadline) = self.deadline
            && wait.saturating_add(ROOM) > deadline.remaining()
        {
            tracing::debug!(?wait, "no time left to retry a transient database failure");
            return None;
        }
        if !self.budget.withdraw() {
            metrics::counter!("call_retries_total", "outcome" => "budget_exhausted").increment(1);
            tracing::warn!("retry budget exhausted: a transient database failure is returned");
            return None;
        }
        Some(wait)
    }
}

/// Tokens are counted in thousandths, so that ten deposits of a tenth make
/// exactly one.
const MILLI: u64 = 1000;

/// A retry budget: a token bucket that first attempts fill and retries
/// drain (see the module doc). Time is tokio's, so a paused test clock
/// moves the reserve's refill.
#[derive(Debug)]
pub struct Budget {
    /// Thousandths of a token each first attempt deposits.
    deposit: u64,
    /// Tokens a second the reserve refills with; it holds a second's worth.
    reserve_per_second: u64,
    tokens: Mutex<Tokens>,
}

#[derive(Debug)]
struct Tokens {
    /// Thousandths deposited by first attempts, at most `MAX_BALANCE`.
    deposited: u64,
    /// Thousandths in the reserve as of `at`.
    reserve: u64,
    at: Instant,
}

impl Budget {
    /// Retries per 100 first attempts.
    pub const PERCENT: u64 = 10;
    /// Retries a second allowed whatever the traffic.
    pub const MIN_PER_SECOND: u64 = 10;
    /// The most tokens deposits bank: after a busy, healthy spell, a burst
    /// of at most this many retries before the ratio holds.
    pub const MAX_BALANCE: u64 = 100;

    /// A budget of `percent` retries per 100 first attempts, plus
    /// `min_per_second`; its reserve starts full.
    pub fn new(percent: u64, min_per_second: u64) -> Self {
        Self {
            deposit: percent * MILLI / 100,
            reserve_per_second: min_per_second,
            tokens: Mutex::new(Tokens {
                deposited: 0,
                reserve: min_per_second * MILLI,
                at: Instant::now(),
            }),
        }
    }

    /// The budget of every call's PostgreSQL work in this process.
    pub fn postgres() -> &'static Self {
        static BUDGET: LazyLock<Budget> =
            LazyLock::new(|| Budget::new(Budget::PERCENT, Budget::MIN_PER_SECOND));
        &BUDGET
    }

    /// A first attempt: deposit its share.
    pub fn deposit(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.deposited = (tokens.deposited + self.deposit).min(Self::MAX_BALANCE * MILLI);
    }

    /// A retry: take one token, from the deposits or else the reserve;
    /// false when neither holds one.
    pub fn withdraw(&self) -> bool {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut tokens, Instant::now());
        if tokens.deposited >= MILLI {
            tokens.deposited -= MILLI;
            true
        } else if tokens.reserve >= MILLI {
            tokens.reserve -= MILLI;
            true
        } else {
            false
        }
    }

    /// Adds to the reserve what `reserve_per_second` gives from `at` to
    /// `now`, moving `at` only by the time it paid for (no fraction lost).
    fn refill(&self, tokens: &mut Tokens, now: Instant) {
        let full = self.reserve_per_second * MILLI;
        // `now` before `at`: another runtime's clock (tests pause and move
        // theirs); count from here.
        if self.reserve_per_second == 0 || tokens.reserve >= full || now < tokens.at {
            tokens.at = now;
            return;
        }
        let nanos = now.saturating_duration_since(tokens.at).as_nanos();
        // thousandths = nanos × tokens/s × 1000 / 1e9
        let earned = nanos * u128::from(self.reserve_per_second) / 1_000_000;
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        if earned >= full - tokens.reserve {
            tokens.reserve = full;
            tokens.at = now;
        } else {
            tokens.reserve += earned;
            let paid = u128::from(earned) * 1_000_000 / u128::from(self.reserve_per_second);
            tokens.at += Duration::from_nanos(u64::try_from(paid).unwrap_or(u64::MAX));
        }
    }
}

// --- Background work ---------------------------------------------------------

/// Attempts of one round of background work, the first included.
pub const ATTEMPTS: usize = 3;
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The waits between attempts of background work.
fn background_waits() -> impl backon::Backoff {
    FullJitter(
        ExponentialBuilder::default()
            .with_min_delay(FIRST_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_max_times(ATTEMPTS - 1)
            .build(),
    )
}

/// Runs `attempt` under the background policy: each failed attempt but the
/// last is logged at WARN; the last is counted and logged at ERROR as
/// `task`, and returned.
pub async fn background<T, E, F, Fut>(task: &'static str, attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let result = attempt
        .retry(background_waits())
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

// --- Both --------------------------------------------------------------------

/// Full jitter: each wait drawn uniformly between zero and its step.
/// (backon's own jitter adds up to a step to the step instead.)
#[derive(Debug)]
struct FullJitter<S>(S);

impl<S: Iterator<Item = Duration>> Iterator for FullJitter<S> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.next().map(|step| step.mul_f64(unit()))
    }
}

/// A random number in [0, 1] (1 if the system has no randomness to give).
fn unit() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_ok() {
        f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::error::{Detail, reason, testing::sqlstate};

    const MS: Duration = Duration::from_millis(1);

    // --- the classifier ---

    fn database(code: &'static str) -> Error {
        sqlstate(code).into()
    }

    fn io(kind: io::ErrorKind) -> Error {
        sqlx::Error::Io(io::Error::from(kind)).into()
    }

    #[test]
    fn transient_database_failures_are_retried_and_nothing_else() {
        let table: Vec<(&str, Error, bool)> = vec![
            ("serialization failure", database("40001"), true),
            ("deadlock", database("40P01"), true),
            ("admin shutdown", database("57P01"), true),
            ("crash shutdown", database("57P02"), true),
            ("starting up", database("57P03"), true),
            ("connection reset", io(io::ErrorKind::ConnectionReset), true),
            (
                "connection refused",
                io(io::ErrorKind::ConnectionRefused),
                true,
            ),
            (
                "connection aborted",
                io(io::ErrorKind::ConnectionAborted),
                true,
            ),
            ("broken pipe", io(io::ErrorKind::BrokenPipe), true),
            (
                "closed by the server",
                io(io::ErrorKind::UnexpectedEof),
                true,
            ),
            ("statement timeout", database("57014"), false),
            ("lock timeout", database("55P03"), false),
            ("unique violation", database("23505"), false),
            ("foreign key violation", database("23503"), false),
            ("syntax error", database("42601"), false),
            ("other I/O", io(io::ErrorKind::TimedOut), false),
            ("saturated pool", sqlx::Error::PoolTimedOut.into(), false),
            ("closed pool", sqlx::Error::PoolClosed.into(), false),
            ("row not found", sqlx::Error::RowNotFound.into(), false),
            ("the call's deadline", Error::deadline_exceeded(), false),
            (
                "a version conflict",
                Error::version_conflict("user", 1, 1, 2),
                false,
            ),
            (
                "unavailable, not from the database",
                Error::Unavailable {
                    detail: Detail::new(reason::DEPENDENCY_UNAVAILABLE, "down"),
                    retry_after: Duration::from_secs(1),
                },
                false,
            ),
        ];
        for (what, error, transient) in table {
            assert_eq!(error.is_transient(), transient, "{what}: {error:?}");
        }
    }

    #[test]
    fn transient_failures_keep_the_status_the_caller_sees() {
        assert!(matches!(
            database("40P01"),
            Error::Aborted(d) if d.reason == reason::TRANSACTION_CONFLICT
        ));
        for code in ["57P01", "57P02", "57P03"] {
            assert!(
                matches!(
                    database(code),
                    Error::Unavailable { ref detail, .. }
                        if detail.reason == reason::DEPENDENCY_UNAVAILABLE
                ),
                "{code} is UNAVAILABLE, not INTERNAL"
            );
        }
        assert!(!database("40001").not_transient().is_transient());
    }

    // --- the budget ---

    #[tokio::test(start_paused = true)]
    async fn the_reserve_allows_its_retries_a_second_and_no_more() {
        let budget = Budget::new(10, 10);
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 10, "a full reserve, nothing deposited");
        tokio::time::advance(100 * MS).await;
        assert!(budget.withdraw(), "100 ms refill one token");
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(60)).await;
        let allowed = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(allowed, 10, "the reserve holds a second's worth");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_refills_exactly_under_frequent_withdrawals() {
        let budget = Budget::new(0, 10);
        while budget.withdraw() {}
        // A second in steps of 10 µs, each trying to withdraw.
        let mut allowed = 0;
        for _ in 0..100_000 {
            tokio::time::advance(Duration::from_micros(10)).await;
            allowed += usize::from(budget.withdraw());
        }
        assert_eq!(allowed, 10);
    }

    /// The retries `deposits` first attempts pay for, with no reserve: as
    /// many withdrawals as deposits, counting those allowed.
    fn paid_by(deposits: usize) -> usize {
        let budget = Budget::new(10, 0);
        for _ in 0..deposits {
            budget.deposit();
        }
        (0..deposits).filter(|_| budget.withdraw()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_pay_one_retry_per_ten_first_attempts() {
        assert_eq!(paid_by(1000), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_bank_at_most_the_maximum_balance() {
        assert_eq!(paid_by(100_000), Budget::MAX_BALANCE as usize);
    }

    // --- the call policy ---

    fn transient() -> Error {
        database("40P01")
    }

    /// Runs `calls` operations that each fail transiently `failures` times
    /// and then succeed; (attempts made, operations that succeeded).
    async fn operations(budget: &Budget, calls: usize, failures: usize) -> (usize, usize) {
        let attempts = AtomicUsize::new(0);
        let mut succeeded = 0;
        for _ in 0..calls {
            let made = AtomicUsize::new(0);
            let result = call(budget, || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                if made.fetch_add(1, Ordering::SeqCst) < failures {
                    Err(transient())
                } else {
                    Ok(())
                }
            })
            .await;
            succeeded += usize::from(result.is_ok());
        }
        (attempts.load(Ordering::SeqCst), succeeded)
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_retried_and_the_call_succeeds() {
        let budget = Budget::new(10, 10);
        assert_eq!(operations(&budget, 1, 1).await, (2, 1));
        assert_eq!(operations(&budget, 1, 2).await, (3, 1));
    }

    /// Runs one operation that fails with `error()` every time; (attempts
    /// made, the error returned).
    async fn always_failing(error: fn() -> Error) -> (usize, Error) {
        let budget = Budget::new(10, 10);
        let attempts = AtomicUsize::new(0);
        let result: Result<()> = call(&budget, || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err(error())
        })
        .await;
        (attempts.load(Ordering::SeqCst), result.unwrap_err())
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_last_attempt_the_failure_is_returned_and_final() {
        let (attempts, error) = always_failing(transient).await;
        assert_eq!(attempts, CALL_ATTEMPTS);
        assert!(matches!(&error, Error::Aborted(d) if d.reason == reason::TRANSACTION_CONFLICT));
        assert!(
            !error.is_transient(),
            "an enclosing retry would not repeat it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_not_retried() {
        let (attempts, _) = always_failing(|| database("23505")).await;
        assert_eq!(attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_budget_empty_the_failure_is_returned_as_it_is() {
        let budget = Budget::new(0, 0);
        assert_eq!(operations(&budget, 5, 1).await, (5, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn under_failures_everywhere_retries_are_a_tenth_of_the_calls() {
        // No reserve: only deposits pay. Every operation fails once.
        let budget = Budget::new(10, 0);
        let (attempts, succeeded) = operations(&budget, 1000, 1).await;
        assert_eq!(attempts - 1000, 100, "retries");
        assert_eq!(succeeded, 100);
        // Every operation fails every time: still a tenth.
        let budget = Budget::new(10, 0);
        let (attempts, succeeded) = operations(&budget, 1000, usize::MAX).await;
        assert_eq!(attempts - 1000, 100, "retries");
        assert_eq!(succeeded, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_waits_past_the_deadline() {
        let budget = Budget::new(100, 1000);
        for timeout in [0, 50, 99, 100, 105, 120, 150, 200, 400] {
            let deadline = Deadline::after(timeout * MS);
            let left = Mutex::new(Vec::new());
            let result: Result<()> = deadline
                .scope(call(&budget, || async {
                    left.lock().unwrap().push(deadline.remaining());
                    Err(transient())
                }))
                .await;
            assert!(
                matches!(&result, Err(Error::Aborted(_))),
                "the failure, not a deadline: {result:?}"
            );
            let left = left.into_inner().unwrap();
            assert!(!left.is_empty() && left.len() <= CALL_ATTEMPTS);
            for (retry, remaining) in left.iter().enumerate().skip(1) {
                assert!(
                    *remaining >= ROOM,
                    "{timeout} ms: retry {retry} started with {remaining:?} left"
                );
            }
            if timeout < ROOM.as_millis() as u32 {
                assert_eq!(left.len(), 1, "{timeout} ms: no room for a retry");
            }
            if timeout >= 300 {
                // Waits of at most 10 ms and 20 ms: both retries fit.
                assert_eq!(left.len(), CALL_ATTEMPTS, "{timeout} ms");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_within_their_steps() {
        let steps = [10, 20, 40, 80, 100, 100];
        for _ in 0..100 {
            let waits = FullJitter(
                ExponentialBuilder::default()
                    .with_min_delay(CALL_FIRST_DELAY)
                    .with_max_delay(CALL_MAX_DELAY)
                    .with_max_times(steps.len())
                    .build(),
            );
            for (wait, step) in waits.zip(steps) {
                assert!(wait <= step * MS, "{wait:?} > {step} ms");
            }
        }
    }

    // --- background work ---

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
        // Two waits of at most 1 s and 2 s (full jitter makes them shorter).
        assert!(
            started.elapsed() <= FIRST_DELAY * 3,
            "{:?}",
            started.elapsed()
        );
    }
}
