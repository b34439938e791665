//! The circuit breaker in front of Redis.
//!
//! After `breaker_failures` consecutive failures the circuit opens for
//! `breaker_open_for`: Redis is not called, reads go to PostgreSQL. A
//! failure counts only if its command started after the last counted one was
//! seen: the commands in flight together when Redis (or this machine) stalls
//! once fail together, and that is one failure, not twenty. So a dead Redis,
//! refusing at once, opens the circuit in a few round trips, a paused one in
//! `breaker_failures` command timeouts, and one stall of the machine never
//! opens it. Then one
//! call (the probe) is let through and decides: success closes the circuit,
//! failure opens it for another period. A probe that never reports (its
//! caller was cancelled) cannot wedge the circuit: another is let through
//! after another period. Health reports the `redis` entry NOT_SERVING while
//! the circuit is not closed; the service stays SERVING.
//!
//! Time is passed in (`now`), so the state machine is tested without sleeps.

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
        /// When the last counted failure was seen: a command started before
        /// it was in flight during the same event.
        last_seen: Option<Instant>,
    },
    Open {
        until: Instant,
    },
    /// A probe is out; if it has not reported by `next_probe`, another is
    /// let through.
    HalfOpen {
        next_probe: Instant,
    },
}

pub(super) struct Breaker {
    state: Mutex<State>,
    failures_to_open: u32,
    open_for: Duration,
}

impl Breaker {
    /// Opens after `failures_to_open` (at least one) consecutive failures.
    pub(super) fn new(failures_to_open: u32, open_for: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed {
                failures: 0,
                last_seen: None,
            }),
            failures_to_open: failures_to_open.max(1),
            open_for,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether to call Redis at `now`. After the open period, one caller
    /// (the probe) is let through; if it never reports, another is let
    /// through after another period.
    pub(super) fn allow(&self, now: Instant) -> bool {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } | State::HalfOpen { next_probe: until } if now >= until => {
                *state = State::HalfOpen {
                    next_probe: now + self.open_for,
                };
                true
            }
            _ => false,
        }
    }

    pub(super) fn success(&self) {
        let mut state = self.state();
        if !matches!(*state, State::Closed { .. }) {
            tracing::info!(dependency = "redis", "circuit closed: Redis answers again");
        }
        *state = State::Closed {
            failures: 0,
            last_seen: None,
        };
    }

    /// A command started at `started` failed, seen at `now`.
    pub(super) fn failure(&self, started: Instant, now: Instant) {
        let mut state = self.state();
        let open = State::Open {
            until: now + self.open_for,
        };
        match *state {
            State::Closed {
                last_seen: Some(seen),
                ..
            } if started < seen => {}
            State::Closed { failures, .. } if failures + 1 >= self.failures_to_open => {
                tracing::warn!(
                    dependency = "redis",
                    failures = failures + 1,
                    "circuit open: reads go to PostgreSQL"
                );
                *state = open;
            }
            State::Closed { failures, .. } => {
                *state = State::Closed {
                    failures: failures + 1,
                    last_seen: Some(now),
                }
            }
            State::HalfOpen { .. } => *state = open,
            State::Open { .. } => {}
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        matches!(*self.state(), State::Closed { .. })
    }

    /// The state as the `cache_breaker_state` gauge shows it: 0 closed,
    /// 1 half-open (a probe may go), 2 open (Redis is not called).
    pub(super) fn gauge_value(&self) -> f64 {
        match *self.state() {
            State::Closed { .. } => 0.0,
            State::HalfOpen { .. } => 1.0,
            State::Open { .. } => 2.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_shows_closed_open_and_half_open() {
        let (breaker, at) = opened();
        assert_eq!(breaker.gauge_value(), 2.0);
        assert!(breaker.allow(at + PERIOD));
        assert_eq!(breaker.gauge_value(), 1.0);
        breaker.success();
        assert_eq!(breaker.gauge_value(), 0.0);
    }

    const PERIOD: Duration = Duration::from_secs(10);
    const TICK: Duration = Duration::from_millis(1);

    /// A breaker that opens after three failures, with `n` failures at the
    /// returned time.
    fn after_failures(n: usize) -> (Breaker, Instant) {
        let breaker = Breaker::new(3, PERIOD);
        let t0 = Instant::now();
        for _ in 0..n {
            breaker.failure(t0, t0);
        }
        (breaker, t0)
    }

    /// A breaker that opens after three failures, opened at the returned time.
    fn opened() -> (Breaker, Instant) {
        after_failures(3)
    }

    #[test]
    fn a_closed_breaker_opens_after_n_consecutive_failures() {
        let (breaker, now) = after_failures(2);
        assert!(breaker.is_closed());
        assert!(breaker.allow(now), "two failures of three: still closed");

        breaker.failure(now, now);
        assert!(!breaker.is_closed());
        assert!(!breaker.allow(now), "the third failure opens it");
    }

    #[test]
    fn commands_that_fail_together_count_as_one_failure() {
        let breaker = Breaker::new(3, PERIOD);
        let t0 = Instant::now();
        let stall = Duration::from_millis(100);
        for _ in 0..20 {
            breaker.failure(t0, t0 + stall);
        }
        assert!(breaker.is_closed(), "twenty in flight during one stall");

        let after = t0 + stall + TICK;
        breaker.failure(after, after + stall);
        assert!(breaker.is_closed(), "a second event: two of three");
        let later = after + stall + TICK;
        breaker.failure(later, later + stall);
        assert!(!breaker.is_closed(), "the third event in a row opens it");
    }

    #[test]
    fn a_success_resets_the_count_of_consecutive_failures() {
        let (breaker, now) = after_failures(2);
        breaker.success();
        breaker.failure(now, now);
        breaker.failure(now, now);
        assert!(breaker.is_closed(), "two, then two: never three in a row");
    }

    #[test]
    fn zero_failures_to_open_means_one() {
        let breaker = Breaker::new(0, PERIOD);
        let now = Instant::now();
        assert!(breaker.allow(now));
        breaker.failure(now, now);
        assert!(!breaker.allow(now));
    }

    #[test]
    fn an_open_breaker_refuses_every_call_for_the_whole_period() {
        let (breaker, t0) = opened();
        for at in [t0, t0 + PERIOD / 2, t0 + PERIOD - TICK] {
            assert!(!breaker.allow(at));
        }
    }

    #[test]
    fn failures_while_open_do_not_extend_the_period() {
        let (breaker, t0) = opened();
        breaker.failure(t0 + PERIOD / 2, t0 + PERIOD / 2);
        assert!(breaker.allow(t0 + PERIOD));
    }

    #[test]
    fn after_the_period_exactly_one_probe_is_let_through() {
        let (breaker, t0) = opened();
        let after = t0 + PERIOD;
        assert!(breaker.allow(after), "the probe");
        assert!(!breaker.allow(after), "no second caller while it is out");
        assert!(!breaker.allow(after + PERIOD - TICK));
        assert!(!breaker.is_closed(), "half-open is not closed");
    }

    #[test]
    fn a_successful_probe_closes_the_breaker() {
        let (breaker, t0) = opened();
        assert!(breaker.allow(t0 + PERIOD));
        breaker.success();
        assert!(breaker.is_closed());
        assert!(breaker.allow(t0 + PERIOD));
        assert!(breaker.allow(t0 + PERIOD));
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_for_another_period() {
        let (breaker, t0) = opened();
        let probed = t0 + PERIOD + Duration::from_secs(1);
        assert!(breaker.allow(probed));
        breaker.failure(probed, probed);
        assert!(!breaker.is_closed());
        assert!(!breaker.allow(probed + PERIOD - TICK));
        assert!(breaker.allow(probed + PERIOD), "the next probe");
    }

    #[test]
    fn a_probe_that_never_reports_lets_another_through_after_another_period() {
        let (breaker, t0) = opened();
        let probed = t0 + PERIOD;
        assert!(breaker.allow(probed));
        assert!(!breaker.allow(probed + PERIOD - TICK));
        assert!(breaker.allow(probed + PERIOD), "a second probe");
        assert!(!breaker.allow(probed + PERIOD), "and only one");
    }
}
