//! Fail fast while a database server is down, and reconnect gently: the
//! state machine both PostgreSQL (`store::availability`, one gate per
//! server) and MongoDB (`documents::mongo`, one per client) put in front of
//! their calls.
//!
//! Without it, every call during an outage waits the whole bound of its
//! driver (a pool's acquire timeout, MongoDB's server selection) for a
//! server that cannot answer, and every one of them makes the driver try to
//! connect, so a server in crash recovery is met by dozens of connection
//! attempts a second.
//!
//! A [`Gate`] closes when a call (or a readiness probe) finds the server
//! unreachable; what counts as unreachable is the driver's business, decided
//! where the gate is used. While closed, calls fail at once with
//! UNAVAILABLE `DEPENDENCY_UNAVAILABLE` and `RetryInfo` ([`Gate::refused`]),
//! except one trial call per backoff period, bounded by [`TRIAL_WAIT`],
//! which is what reconnects: exponential from [`FIRST_BACKOFF`] to
//! [`MAX_BACKOFF`] with jitter, so a handful of connection attempts a
//! second. The gate opens at the first success, so normal service resumes
//! within a backoff period of the server's return.
//!
//! It sits with the value types at the bottom of the crate (like
//! [`super::deadline`]) so that `store` and `documents` can both use it.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::error::{Detail, Error, reason};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a trial call waits for the server (a connection, a server
/// selection) before it counts as failed.
pub const TRIAL_WAIT: Duration = Duration::from_millis(250);

/// What a call may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The server answers: go ahead.
    Go,
    /// The server is down, and this call is the period's trial.
    Trial,
    /// The server is down: fail now, retry after this long.
    Refuse(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Up,
    Down {
        next_trial: Instant,
        backoff: Duration,
    },
}

/// The availability of one server (or deployment), as calls and the
/// readiness probe have found it.
#[derive(Debug)]
pub struct Gate {
    /// The `dependency` a refusal and the log lines name: `postgres`,
    /// `mongodb`.
    dependency: &'static str,
    /// What the caller is told is unreachable: "the database".
    what: &'static str,
    /// Whether the state is `Down`: the fast path of every call reads only
    /// this.
    down: AtomicBool,
    state: Mutex<State>,
}

impl Gate {
    /// An open gate for `dependency`, described to callers as `what`.
    pub const fn new(dependency: &'static str, what: &'static str) -> Self {
        Self {
            dependency,
            what,
            down: AtomicBool::new(false),
            state: Mutex::new(State::Up),
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        if !self.down.load(Ordering::Acquire) {
            return Admit::Go;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            State::Up => Admit::Go,
            State::Down {
                next_trial,
                backoff,
            } if now >= next_trial => {
                *state = State::Down {
                    next_trial: now + jittered(backoff),
                    backoff,
                };
                Admit::Trial
            }
            State::Down { next_trial, .. } => Admit::Refuse(next_trial - now),
        }
    }

    /// The server answered.
    pub fn up(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.down.store(false, Ordering::Release);
        if *state != State::Up {
            tracing::info!(
                dependency = self.dependency,
                "{} reachable again",
                self.what
            );
        }
        *state = State::Up;
    }

    /// The server could not be reached: close the gate, or back off more.
    pub fn down(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let backoff = match *state {
            State::Up => {
                tracing::warn!(
                    dependency = self.dependency,
                    "{} unreachable: calls fail fast until it answers",
                    self.what
                );
                FIRST_BACKOFF
            }
            State::Down { backoff, .. } => (backoff * 2).min(MAX_BACKOFF),
        };
        *state = State::Down {
            next_trial: now + jittered(backoff),
            backoff,
        };
        self.down.store(true, Ordering::Release);
    }

    pub fn is_up(&self) -> bool {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) == State::Up
    }

    /// UNAVAILABLE for a call refused while the server is down (or whose
    /// trial failed), naming the dependency.
    pub fn refused(&self, retry_after: Duration) -> Error {
        Error::Unavailable {
            detail: Detail::new(
                reason::DEPENDENCY_UNAVAILABLE,
                format!("{} is unreachable; retry with backoff", self.what),
            )
            .with("dependency", self.dependency),
            retry_after: retry_after.max(FIRST_BACKOFF),
        }
    }
}

/// Between half and all of `backoff`, so replicas do not trial in step.
fn jittered(backoff: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let unit = if getrandom::fill(&mut byte).is_ok() {
        f64::from(byte[0]) / 255.0
    } else {
        1.0
    };
    backoff.mul_f64(0.5 + 0.5 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_up_gate_lets_every_call_go() {
        let gate = Gate::new("postgres", "the database");
        assert_eq!(gate.admit(Instant::now()), Admit::Go);
        assert!(gate.is_up());
    }

    #[test]
    fn a_down_gate_refuses_until_the_trial_then_lets_one_through() {
        let gate = Gate::new("postgres", "the database");
        let t0 = Instant::now();
        gate.down(t0);
        assert!(matches!(gate.admit(t0), Admit::Refuse(_)));
        let after = t0 + FIRST_BACKOFF;
        assert_eq!(gate.admit(after), Admit::Trial);
        assert!(
            matches!(gate.admit(after), Admit::Refuse(_)),
            "one trial a period"
        );
    }

    #[test]
    fn failed_trials_back_off_exponentially_up_to_the_cap() {
        let gate = Gate::new("postgres", "the database");
        let mut now = Instant::now();
        gate.down(now);
        let mut trials = 0;
        // Ten seconds of calls every millisecond, every trial failing.
        for _ in 0..10_000 {
            now += Duration::from_millis(1);
            if gate.admit(now) == Admit::Trial {
                trials += 1;
                gate.down(now);
            }
        }
        // At most the first backoffs plus one a second after the cap:
        // well under ten a second.
        assert!((8..=40).contains(&trials), "{trials} trials in 10 s");
    }

    #[test]
    fn the_first_success_opens_the_gate() {
        let gate = Gate::new("postgres", "the database");
        gate.down(Instant::now());
        gate.up();
        assert_eq!(gate.admit(Instant::now()), Admit::Go);
    }

    #[test]
    fn a_refusal_names_the_dependency_and_a_retry_delay() {
        let gate = Gate::new("mongodb", "the document store");
        assert!(
            !gate.refused(Duration::ZERO).is_transient(),
            "the fail-fast path is not retried inside the call"
        );
        match gate.refused(Duration::ZERO) {
            Error::Unavailable {
                detail,
                retry_after,
            } => {
                assert_eq!(detail.reason, reason::DEPENDENCY_UNAVAILABLE);
                assert_eq!(detail.metadata["dependency"], "mongodb");
                assert_eq!(
                    detail.message,
                    "the document store is unreachable; retry with backoff"
                );
                assert_eq!(retry_after, FIRST_BACKOFF);
            }
            other => panic!("{other:?}"),
        }
    }
}
