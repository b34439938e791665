//! Per-caller quotas: a token bucket per caller identity (the [`Caller`] the
//! auth layer attached), refilled at the caller's requests per second and
//! holding `burst` seconds of them. A call finding its bucket empty is
//! answered RESOURCE_EXHAUSTED (`QUOTA_EXCEEDED`) at once, with a
//! `RetryInfo` of when the next token arrives: before the deadline, the
//! admission queue or any database work.
//!
//! Admission protects the instance from all callers together; a quota keeps
//! one caller to its agreed rate whatever the instance's load, so one
//! misbehaving client is refused at its own rate, not by shedding everyone.
//!
//! The rate of a caller is its own (`quotas.callers`), else its highest
//! role's (`quotas.reader` / `writer` / `admin`); zero is unlimited. Buckets
//! are kept per caller name; a bucket that has refilled is forgotten once
//! there are many (callers from JWTs are not bounded by the configuration),
//! which changes nothing, since a new bucket starts full.
//!
//! Metrics: `quota_requests_total{caller, outcome}` (`admitted`,
//! `exceeded`); `caller` is a configured caller's name, or `other` for the
//! rest, so the label's cardinality is bounded by the configuration.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::Request;
use tonic::body::Body;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::{Caller, Role},
    config::QuotaSettings,
    error::{Detail, Error, reason},
};

/// Buckets kept before refilled ones are forgotten.
const KEPT_BUCKETS: usize = 4096;

/// The `caller` label of callers the configuration does not name.
const OTHER_CALLER: &str = "other";

/// Enforces each caller's requests per second.
#[derive(Clone)]
pub struct Quotas {
    shared: Arc<Shared>,
}

struct Shared {
    settings: QuotaSettings,
    /// `quota_requests_total` (admitted, exceeded) of each caller whose name
    /// is a metric label, resolved once.
    named: HashMap<String, Outcomes>,
    /// The same for every other caller (`other`).
    other: Outcomes,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl Quotas {
    /// `named`: the callers the configuration names (their tokens,
    /// certificates, quotas), the only `caller` labels besides `other`.
    pub fn new(settings: &QuotaSettings, named: impl IntoIterator<Item = String>) -> Self {
        let mut named: HashSet<String> = named.into_iter().collect();
        named.extend(settings.callers.keys().cloned());
        // Exported from start-up for every caller label there can be: the
        // recorder must exist before the first values are set.
        crate::metrics::handle();
        let other = Outcomes::of(OTHER_CALLER);
        let named = named
            .into_iter()
            .map(|caller| {
                let outcomes = Outcomes::of(&caller);
                (caller, outcomes)
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                settings: settings.clone(),
                named,
                other,
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The requests per second `caller` may make; `None` is unlimited.
    fn rate_of(&self, caller: &Caller) -> Option<f64> {
        let settings = &self.shared.settings;
        let rate = match settings.callers.get(caller.name()) {
            Some(rate) => *rate,
            None => Role::ALL
                .into_iter()
                .rev()
                .find(|role| caller.may(*role))
                // A caller with no role never passes authorization; were
                // it counted, the lowest rate would be its.
                .map_or(settings.reader, |role| match role {
                    Role::Reader => settings.reader,
                    Role::Writer => settings.writer,
                    Role::Admin => settings.admin,
                }),
        };
        (rate > 0.0).then_some(rate)
    }

    /// Takes a token for `caller` at `now`: `Err` is how long until one
    /// arrives.
    fn take(&self, caller: &Caller, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate_of(caller) else {
            return Ok(());
        };
        let capacity = (rate * self.shared.settings.burst.as_secs_f64()).max(1.0);
        let mut buckets = self
            .shared
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= KEPT_BUCKETS && !buckets.contains_key(caller.name()) {
            buckets.retain(|_, bucket| !bucket.is_full(now));
            if buckets.len() >= KEPT_BUCKETS {
                // None has refilled: the one used longest ago goes.
                let oldest = buckets
                    .iter()
                    .min_by_key(|(_, bucket)| bucket.at)
                    .map(|(name, _)| name.clone());
                if let Some(oldest) = oldest {
                    buckets.remove(&oldest);
                }
            }
        }
        let bucket = buckets
            .entry(caller.name().into())
            .or_insert_with(|| Bucket::full(rate, capacity, now));
        // A rate changed by a reload of the configuration applies at once.
        bucket.rate = rate;
        bucket.capacity = capacity;
        bucket.take(now)
    }

    fn outcomes(&self, caller: &Caller) -> &Outcomes {
        self.shared
            .named
            .get(caller.name())
            .unwrap_or(&self.shared.other)
    }
}

/// One caller label's `quota_requests_total` counters, registered at zero.
struct Outcomes {
    admitted: metrics::Counter,
    exceeded: metrics::Counter,
}

impl Outcomes {
    fn of(caller: &str) -> Self {
        let counter = |outcome: &'static str| {
            let counter = metrics::counter!(
                "quota_requests_total",
                "caller" => caller.to_owned(),
                "outcome" => outcome
            );
            counter.increment(0);
            counter
        };
        Self {
            admitted: counter("admitted"),
            exceeded: counter("exceeded"),
        }
    }
}

impl Middleware for Quotas {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        // Every service call passed the auth layer, which attaches the
        // caller; without one there is nobody to count against.
        let Some(caller) = request.extensions().get::<Caller>() else {
            return Box::pin(inner.call(request));
        };
        match self.take(caller, Instant::now()) {
            Ok(()) => {
                self.outcomes(caller).admitted.increment(1);
                Box::pin(inner.call(request))
            }
            Err(retry_after) => {
                self.outcomes(caller).exceeded.increment(1);
                let error = Error::ResourceExhausted {
                    detail: Detail::new(
                        reason::QUOTA_EXCEEDED,
                        format!(
                            "caller {} is over its quota of requests per second; retry after the RetryInfo delay",
                            caller.name()
                        ),
                    )
                    .with("caller", caller.name()),
                    retry_after,
                };
                Box::pin(std::future::ready(Ok(status_response(error))))
            }
        }
    }
}

/// A token bucket: `tokens` at `at`, refilled at `rate` per second up to
/// `capacity`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: f64,
    capacity: f64,
}

/// The longest RetryInfo delay a quota answers (a bucket refilling more
/// slowly still answers this: the caller asks again then).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

impl Bucket {
    fn full(rate: f64, capacity: f64, now: Instant) -> Self {
        Self {
            tokens: capacity,
            at: now,
            rate,
            capacity,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.at = now.max(self.at);
    }

    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // At least a millisecond: RetryInfo of zero reads as "now".
            let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
                .unwrap_or(MAX_RETRY_AFTER)
                .min(MAX_RETRY_AFTER);
            Err(wait.max(Duration::from_millis(1)))
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        let mut refilled = *self;
        refilled.refill(now);
        refilled.tokens >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(reader: f64, callers: &[(&str, f64)]) -> QuotaSettings {
        QuotaSettings {
            reader,
            writer: 0.0,
            admin: 0.0,
            burst: Duration::from_secs(2),
            callers: callers.iter().map(|(n, r)| ((*n).to_owned(), *r)).collect(),
        }
    }

    fn caller(name: &str, role: &str) -> Caller {
        Caller::new(name, &[role.to_owned()])
    }

    /// Whether each of `calls` calls by `who` at `at` is admitted, in order.
    fn admitted(quotas: &Quotas, who: &Caller, at: Instant, calls: usize) -> Vec<bool> {
        (0..calls).map(|_| quotas.take(who, at).is_ok()).collect()
    }

    #[test]
    fn a_full_bucket_admits_a_burst_then_refills_at_the_rate() {
        let quotas = Quotas::new(&settings(5.0, &[]), []);
        let reader = caller("dash", "reader");
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(quotas.take(&reader, t0), Ok(()), "burst call {i}");
        }
        let wait = quotas.take(&reader, t0).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_millis(200), "one token at 5/s");
        assert!(quotas.take(&reader, t0 + wait).is_ok());
        assert!(quotas.take(&reader, t0 + wait).is_err());
    }

    #[test]
    fn callers_have_buckets_of_their_own() {
        let quotas = Quotas::new(&settings(1.0, &[]), []);
        let t0 = Instant::now();
        let (a, b) = (caller("a", "reader"), caller("b", "reader"));
        assert_eq!(admitted(&quotas, &a, t0, 3), [true, true, false]);
        assert_eq!(
            admitted(&quotas, &b, t0, 1),
            [true],
            "a's use leaves b's bucket full"
        );
    }

    #[test]
    fn a_callers_own_quota_overrides_its_roles_and_zero_is_unlimited() {
        let quotas = Quotas::new(&settings(1.0, &[("batch", 0.5), ("free", 0.0)]), []);
        let t0 = Instant::now();
        let batch = caller("batch", "reader");
        assert!(quotas.take(&batch, t0).is_ok());
        assert_eq!(quotas.take(&batch, t0), Err(Duration::from_secs(2)));
        let free = caller("free", "reader");
        assert!((0..1000).all(|_| quotas.take(&free, t0).is_ok()));
        let writer = caller("w", "writer");
        assert!(
            (0..1000).all(|_| quotas.take(&writer, t0).is_ok()),
            "writer = 0"
        );
        let nobody = Caller::new("nobody", &[]);
        assert_eq!(
            admitted(&quotas, &nobody, t0, 3),
            [true, true, false],
            "no role: the reader rate"
        );
    }

    #[test]
    fn only_configured_callers_are_metric_labels() {
        let quotas = Quotas::new(&settings(1.0, &[("batch", 1.0)]), ["orders-api".to_owned()]);
        let mut labels: Vec<&str> = quotas.shared.named.keys().map(String::as_str).collect();
        labels.sort_unstable();
        assert_eq!(labels, ["batch", "orders-api"]);
        let other = &quotas.shared.other;
        for named in ["orders-api", "batch"] {
            assert!(!std::ptr::eq(
                quotas.outcomes(&caller(named, "reader")),
                other
            ));
        }
        assert!(
            std::ptr::eq(quotas.outcomes(&caller("jwt-sub-123", "reader")), other),
            "anyone else is counted as {OTHER_CALLER}"
        );
    }

    #[test]
    fn a_tiny_rate_answers_a_bounded_retry_delay() {
        let quotas = Quotas::new(&settings(1e-300, &[]), []);
        let reader = caller("slow", "reader");
        let t0 = Instant::now();
        assert!(quotas.take(&reader, t0).is_ok());
        assert_eq!(quotas.take(&reader, t0), Err(MAX_RETRY_AFTER));
    }

    #[test]
    fn with_many_callers_and_none_refilled_the_one_idle_longest_goes() {
        let quotas = Quotas::new(&settings(1e-3, &[]), []);
        let t0 = Instant::now();
        for i in 0..KEPT_BUCKETS {
            let at = t0 + Duration::from_millis(i as u64);
            assert!(quotas.take(&caller(&format!("c{i}"), "reader"), at).is_ok());
        }
        let later = t0 + Duration::from_secs(10);
        assert!(quotas.take(&caller("new", "reader"), later).is_ok());
        let buckets = quotas.shared.buckets.lock().unwrap();
        assert_eq!(buckets.len(), KEPT_BUCKETS);
        assert!(!buckets.contains_key("c0") && buckets.contains_key("c1"));
    }

    #[test]
    fn refilled_buckets_are_forgotten_once_there_are_many() {
        let quotas = Quotas::new(&settings(1.0, &[]), []);
        let t0 = Instant::now();
        for i in 0..KEPT_BUCKETS {
            assert!(quotas.take(&caller(&format!("c{i}"), "reader"), t0).is_ok());
        }
        let later = t0 + Duration::from_secs(10);
        assert!(quotas.take(&caller("new", "reader"), later).is_ok());
        let kept = quotas.shared.buckets.lock().unwrap().len();
        assert_eq!(kept, 1, "every old bucket had refilled");
    }
}
