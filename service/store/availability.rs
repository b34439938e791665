//! Fail fast while a PostgreSQL server is down, and reconnect gently.
//!
//! Without this, every call during an outage waits the pool's whole
//! `acquire_timeout` (3 s) for a connection that cannot be made, and every
//! one of them makes the pool try to connect, so a server in crash recovery
//! is met by dozens of connection attempts a second.
//!
//! Each server (host, port and database of a pool) has a [`Gate`]. It
//! closes when an acquire fails for want of a server (an I/O error, or a
//! pool timeout while the pool holds no live connection: a saturated pool
//! is overload, not an outage) or when the readiness probe's own
//! connection fails. While closed, calls fail at once with UNAVAILABLE and
//! `RetryInfo`, except one trial call per backoff period, whose acquire
//! (at most [`TRIAL_WAIT`]) is what reconnects: exponential from
//! [`FIRST_BACKOFF`] to [`MAX_BACKOFF`] with jitter, so a handful of
//! connection attempts a second (sqlx retries within one acquire too). The gate opens at the first successful
//! acquire or probe, so normal service resumes within a backoff period of
//! the server's return.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::PgPool;

use crate::error::{Detail, Error, reason};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a trial call waits for its connection.
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

/// The availability of one PostgreSQL server, as calls and the readiness
/// probe have found it.
#[derive(Debug)]
pub struct Gate {
    /// Whether the state is `Down`: the fast path of every acquire reads
    /// only this.
    down: AtomicBool,
    state: Mutex<State>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            down: AtomicBool::new(false),
            state: Mutex::new(State::Up),
        }
    }
}

impl Gate {
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
            tracing::info!(dependency = "postgres", "database reachable again");
        }
        *state = State::Up;
    }

    /// The server could not be reached: close the gate, or back off more.
    pub fn down(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let backoff = match *state {
            State::Up => {
                tracing::warn!(
                    dependency = "postgres",
                    "database unreachable: calls fail fast until it answers"
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

/// The gate of the server `pool` connects to.
pub fn gate(pool: &PgPool) -> Arc<Gate> {
    static GATES: OnceLock<Mutex<HashMap<String, Arc<Gate>>>> = OnceLock::new();
    let options = pool.connect_options();
    let key = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    );
    GATES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_default()
        .clone()
}

/// UNAVAILABLE for a call refused while the server is down.
pub fn refused(retry_after: Duration) -> Error {
    Error::Unavailable {
        detail: Detail::new(
            reason::DEPENDENCY_UNAVAILABLE,
            "the database is unreachable; retry with backoff",
        )
        .with("dependency", "postgres"),
        retry_after: retry_after.max(FIRST_BACKOFF),
    }
}

/// Whether an acquire's failure means the server cannot be reached (rather
/// than a saturated pool or the call's own deadline).
pub fn is_outage(error: &sqlx::Error, pool: &PgPool) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::PoolTimedOut => pool.size() == 0,
        // "the database system is starting up" / "is shutting down".
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_up_gate_lets_every_call_go() {
        let gate = Gate::default();
        assert_eq!(gate.admit(Instant::now()), Admit::Go);
        assert!(gate.is_up());
    }

    #[test]
    fn a_down_gate_refuses_until_the_trial_then_lets_one_through() {
        let gate = Gate::default();
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
        let gate = Gate::default();
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
        let gate = Gate::default();
        gate.down(Instant::now());
        gate.up();
        assert_eq!(gate.admit(Instant::now()), Admit::Go);
    }

    #[test]
    fn a_refusal_names_the_dependency_and_a_retry_delay() {
        assert!(
            !refused(Duration::ZERO).is_transient(),
            "the fail-fast path is not retried inside the call"
        );
        match refused(Duration::ZERO) {
            Error::Unavailable {
                detail,
                retry_after,
            } => {
                assert_eq!(detail.reason, reason::DEPENDENCY_UNAVAILABLE);
                assert_eq!(detail.metadata["dependency"], "postgres");
                assert_eq!(retry_after, FIRST_BACKOFF);
            }
            other => panic!("{other:?}"),
        }
    }
}
