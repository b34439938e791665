//! Admission control: an adaptive concurrency limit in front of the
//! handlers, a short fair queue behind it, and a cheap RESOURCE_EXHAUSTED
//! (reason `OVERLOADED`, with `RetryInfo`) for what fits in neither.
//!
//! - **The limit** is Netflix's Gradient2 ([`Gradient2`]): every finished
//!   call is an RTT sample; a short average of them is compared with a
//!   reference latency measured every ten seconds at half the limit (where
//!   Netflix uses a long average, which lets the limit drift past the
//!   capacity), and while it stays within `tolerance` of it the limit
//!   grows by a few calls per round, when it rises above it the limit
//!   shrinks (at most by half per sample, smoothed), always within
//!   `[min_limit, max_limit]`. It only moves while the calls in flight use
//!   at least half of it: an idle service says nothing about its capacity.
//! - **Pushback** ([`Pushback`]): the `RetryInfo` delay grows while
//!   rejections outnumber admissions and shrinks back after, so callers
//!   that follow it come back at about the rate that fits.
//! - **The queue** ([`Gate`]): a call beyond the limit waits in a FIFO of
//!   at most `queue_length` calls for at most `max_queue_wait` (and never
//!   more than half of what is left of its deadline, so that an admitted
//!   call still has time to work); then, or at once when the queue is full,
//!   it is answered RESOURCE_EXHAUSTED. A rejection takes one lock and no
//!   I/O.
//! - **Fairness** by caller (the [`Caller`] the auth layer attached, so this
//!   layer runs after it). A caller alone may use the whole limit; once
//!   others have calls, none may hold more than `caller_share` of it (at
//!   least one call). A caller under its share is admitted even past the
//!   limit when another holds more than its own (the room that one took
//!   beyond its share, as in Netflix's partitioned limiter; in flight stays
//!   under twice the limit and drains back to it), so a caller arriving
//!   after a flood is not kept waiting behind it. A freed slot goes to the
//!   waiting caller with the fewest calls in flight; a full queue makes
//!   room for a caller with less load than the most loaded one by turning
//!   away that one's newest waiter (never back and forth: only when the
//!   move leaves the displaced caller at least as loaded). Per-caller state
//!   exists only while a caller has calls in flight or queued, so it is
//!   bounded by twice the limit plus the queue.
//! - **Never shed**: health checks and reflection (skipped like in every
//!   middleware here) and `AdminService`, which operators need most when
//!   the service is overloaded.
//!
//! Metrics, from start-up: `admission_limit`, `admission_in_flight`,
//! `admission_queued`, `admission_retry_after_seconds` and
//! `admission_rejected_total{reason}` with reason
//! `queue_full`, `queue_timeout` or `displaced`.
//!
//! # Why not a crate
//!
//! `tower-acc` (0.1, a young one-maintainer crate) has Vegas and Gradient2,
//! but as a tower `ConcurrencyLimit` that waits for a permit in
//! `poll_ready`: before the request is seen, so it cannot exempt health or
//! admin calls, key fairness by caller, bound a queue or answer with a
//! status (in a tonic server a pending `poll_ready` stalls the connection's
//! calls instead). Only its algorithm would be usable, and its Gradient2
//! takes the last sample as the short-term RTT, so one slow analytic call
//! cuts the limit. The algorithm is a few lines; it is here, with its tests
//! driven by synthetic samples. `governor` is a rate limiter: per-caller
//! quotas (requests per second) are another issue's, this one bounds
//! concurrency.
//!
//! The RTT of a call is from admission to its response headers (for our
//! unary RPCs, the handler's whole work); queueing time is not part of it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::Request;
use tokio::sync::oneshot;
use tonic::body::Body;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{
    auth::Caller,
    config::AdmissionSettings,
    error::{Detail, Error, reason},
    model::deadline::Deadline,
};

/// Calls to this service are never shed.
const ADMIN_SERVICE: &str = "/datagate.v1.AdminService/";

/// Sheds the calls beyond the adaptive limit and its short queue.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

struct Shared {
    gate: Mutex<Gate<oneshot::Sender<Permit>>>,
    pushback: Mutex<Pushback>,
    max_queue_wait: Duration,
}

impl Admission {
    pub fn new(settings: &AdmissionSettings) -> Self {
        // Exported from start-up: the recorder must exist before the gate
        // takes its gauges and the first values are set.
        crate::metrics::handle();
        let gate = Gate::new(
            Gradient2::new(
                settings.min_limit,
                settings.initial_limit,
                settings.max_limit,
            ),
            settings.queue_length,
            settings.caller_share,
        );
        for cause in [Cause::QueueFull, Cause::QueueTimeout, Cause::Displaced] {
            metrics::counter!("admission_rejected_total", "reason" => cause.label()).increment(0);
        }
        gate.record_gauges();
        let pushback = Pushback::new(settings.retry_after, settings.max_retry_after);
        metrics::gauge!("admission_retry_after_seconds").set(pushback.delay.as_secs_f64());
        Self {
            shared: Arc::new(Shared {
                gate: Mutex::new(gate),
                pushback: Mutex::new(pushback),
                max_queue_wait: settings.max_queue_wait,
            }),
        }
    }
}

impl Middleware for Admission {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        if request.uri().path().starts_with(ADMIN_SERVICE) {
            return Box::pin(inner.call(request));
        }
        let caller: Arc<str> = request
            .extensions()
            .get::<Caller>()
            .map_or_else(|| Arc::from(""), Caller::shared_name);
        let wait = request
            .extensions()
            .get::<Deadline>()
            .map_or(self.shared.max_queue_wait, |d| {
                self.shared.max_queue_wait.min(d.remaining() / 2)
            });

        let mut gate = self
            .shared
            .gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if gate.try_admit(&caller) {
            gate.record_gauges();
            drop(gate);
            self.shared.note(Outcome::Admitted);
            let permit = Permit::running(self.shared.clone(), caller);
            let response = inner.call(request);
            return Box::pin(async move {
                let response = response.await;
                drop(permit);
                response
            });
        }
        let (sender, mut receiver) = oneshot::channel();
        let queued = gate.enqueue(caller, sender);
        gate.record_gauges();
        drop(gate);
        let ticket = match queued {
            Ok((ticket, displaced)) => {
                // Dropping its sender wakes the displaced waiter, which
                // answers for itself.
                drop(displaced);
                ticket
            }
            Err(_refused) => return Box::pin(self.shared.reject(Cause::QueueFull)),
        };

        // Created now, polled once admitted: the inner future does nothing
        // until then.
        let response = inner.call(request);
        let shared = self.shared.clone();
        // Outside the future: a call dropped before its first poll leaves
        // the queue too.
        let mut waiting = Waiting {
            shared: shared.clone(),
            ticket: Some(ticket),
        };
        Box::pin(async move {
            let admitted = match tokio::time::timeout(wait, &mut receiver).await {
                Ok(admitted) => admitted,
                // Still queued: give up. Otherwise it was admitted (or
                // displaced) at the last moment, and the answer is on its
                // way through the channel.
                Err(_elapsed) if waiting.leave() => {
                    return shared.reject(Cause::QueueTimeout).await;
                }
                Err(_elapsed) => receiver.await,
            };
            waiting.out_of_the_queue();
            let Ok(mut permit) = admitted else {
                return shared.reject(Cause::Displaced).await;
            };
            permit.start();
            shared.note(Outcome::Admitted);
            let response = response.await;
            drop(permit);
            response
        })
    }
}

impl Shared {
    /// The answer to a shed call.
    fn reject<E>(&self, cause: Cause) -> std::future::Ready<Result<http::Response<Body>, E>> {
        metrics::counter!("admission_rejected_total", "reason" => cause.label()).increment(1);
        let retry_after = self.note(Outcome::Rejected);
        std::future::ready(Ok(status_response(Error::ResourceExhausted {
            detail: Detail::new(
                reason::OVERLOADED,
                "this server is at its concurrency limit; retry after the RetryInfo delay, with backoff",
            )
            .with("cause", cause.label()),
            retry_after,
        })))
    }

    /// Counts an admission or a rejection; the `RetryInfo` delay now.
    fn note(&self, outcome: Outcome) -> Duration {
        let mut pushback = self
            .pushback
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = pushback.delay;
        let delay = pushback.note(outcome, Instant::now());
        if delay != before {
            metrics::gauge!("admission_retry_after_seconds").set(delay.as_secs_f64());
        }
        delay
    }

    /// Frees a slot and hands the freed capacity to waiters.
    fn release(self: &Arc<Self>, caller: &str, rtt: Option<Duration>) {
        let admitted = {
            let mut gate = self
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let admitted = gate.release(caller, rtt);
            gate.record_gauges();
            admitted
        };
        self.wake(admitted);
    }

    /// Hands permits to admitted waiters, outside the lock: a waiter that
    /// is gone hands its permit back, and dropping it releases again.
    fn wake(self: &Arc<Self>, admitted: Vec<(Arc<str>, oneshot::Sender<Permit>)>) {
        for (caller, sender) in admitted {
            let _ = sender.send(Permit::waiting(self.clone(), caller));
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Admitted,
    Rejected,
}

/// The `RetryInfo` delay of a shed call, scaled to the overload (server
/// pushback). With a fixed delay, N shed callers come back N / delay times
/// a second whatever the service can take, so at 64× the limit rejections
/// outnumber admissions many times over and their cost eats the capacity
/// they protect. So the delay doubles (up to `max`) after every window in
/// which rejections outnumber half the admissions, and halves back (down
/// to `base`) after every window with rejections under a tenth of them:
/// callers that follow `RetryInfo` spread out until what comes back is
/// about what fits.
#[derive(Debug)]
struct Pushback {
    base: Duration,
    max: Duration,
    delay: Duration,
    window_start: Instant,
    admitted: u32,
    rejected: u32,
}

impl Pushback {
    const WINDOW: Duration = Duration::from_millis(500);
    /// Rejections per admission above which the delay doubles.
    const GROW_ABOVE: f64 = 0.5;
    /// Rejections per admission under which it halves.
    const SHRINK_BELOW: f64 = 0.1;

    fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            delay: base,
            window_start: Instant::now(),
            admitted: 0,
            rejected: 0,
        }
    }

    fn note(&mut self, outcome: Outcome, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Self::WINDOW {
            let ratio = f64::from(self.rejected) / f64::from(self.admitted.max(1));
            if ratio > Self::GROW_ABOVE {
                self.delay = (self.delay * 2).min(self.max);
            } else if ratio < Self::SHRINK_BELOW {
                self.delay = (self.delay / 2).max(self.base);
            }
            // Windows with no calls at all count as calm ones.
            let idle = (elapsed.as_millis() / Self::WINDOW.as_millis()).saturating_sub(1);
            for _ in 0..idle.min(32) {
                self.delay = (self.delay / 2).max(self.base);
            }
            self.window_start = now;
            self.admitted = 0;
            self.rejected = 0;
        }
        match outcome {
            Outcome::Admitted => self.admitted = self.admitted.saturating_add(1),
            Outcome::Rejected => self.rejected = self.rejected.saturating_add(1),
        }
        self.delay
    }
}

/// Why a call was shed: the `reason` label of `admission_rejected_total`
/// and the `cause` of its ErrorInfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    QueueFull,
    QueueTimeout,
    Displaced,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
            Self::Displaced => "displaced",
        }
    }
}

/// One admitted call's slot, released (with the call's RTT) when dropped.
struct Permit {
    shared: Arc<Shared>,
    caller: Arc<str>,
    /// When the call started running; `None` for a permit handed to a
    /// waiter that has not started (or had gone): released without a sample.
    started: Option<Instant>,
}

impl Permit {
    fn running(shared: Arc<Shared>, caller: Arc<str>) -> Self {
        let mut permit = Self::waiting(shared, caller);
        permit.start();
        permit
    }

    fn waiting(shared: Arc<Shared>, caller: Arc<str>) -> Self {
        Self {
            shared,
            caller,
            started: None,
        }
    }

    fn start(&mut self) {
        self.started = Some(Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let rtt = self.started.map(|started| started.elapsed());
        self.shared.release(&self.caller, rtt);
    }
}

/// A queued call's place; it leaves the queue if the call goes away (its
/// deadline, its caller) while waiting.
struct Waiting {
    shared: Arc<Shared>,
    ticket: Option<u64>,
}

impl Waiting {
    /// The call is no longer queued (admitted or displaced): nothing to do
    /// when dropped.
    fn out_of_the_queue(mut self) {
        self.ticket = None;
    }

    /// Leaves the queue; false if the call was no longer in it (admitted
    /// or displaced).
    fn leave(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let (waiter, admitted) = {
            let mut gate = self
                .shared
                .gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let left = gate.leave_queue(ticket);
            gate.record_gauges();
            left
        };
        self.shared.wake(admitted);
        waiter.is_some()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // A permit sent after this is dropped with the receiver, unstarted.
        self.leave();
    }
}

/// The queue and the accounting behind the limit, without I/O or time:
/// `W` is what wakes a waiter (a channel sender in the server, a label in
/// the tests).
struct Gate<W> {
    limiter: Gradient2,
    queue_length: usize,
    caller_share: f64,
    in_flight: usize,
    callers: HashMap<Arc<str>, Load>,
    queue: VecDeque<Queued<W>>,
    next_ticket: u64,
    gauges: Gauges,
}

/// The gate's gauges, resolved once: they are set on every admission and
/// release.
struct Gauges {
    limit: metrics::Gauge,
    in_flight: metrics::Gauge,
    queued: metrics::Gauge,
}

/// One caller's calls, while it has any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Load {
    in_flight: usize,
    queued: usize,
}

impl Load {
    fn total(self) -> usize {
        self.in_flight + self.queued
    }
}

struct Queued<W> {
    ticket: u64,
    caller: Arc<str>,
    waiter: W,
}

impl<W> Gate<W> {
    fn new(limiter: Gradient2, queue_length: usize, caller_share: f64) -> Self {
        Self {
            limiter,
            queue_length,
            caller_share,
            in_flight: 0,
            callers: HashMap::new(),
            queue: VecDeque::new(),
            next_ticket: 0,
            gauges: Gauges {
                limit: metrics::gauge!("admission_limit"),
                in_flight: metrics::gauge!("admission_in_flight"),
                queued: metrics::gauge!("admission_queued"),
            },
        }
    }

    fn limit(&self) -> usize {
        self.limiter.limit()
    }

    /// The most calls one caller may have in flight.
    fn caller_cap(&self) -> usize {
        ((self.limit() as f64 * self.caller_share).floor() as usize).clamp(1, self.limit())
    }

    fn load(&self, caller: &str) -> Load {
        self.callers.get(caller).copied().unwrap_or_default()
    }

    /// Whether a call of `caller` may run now:
    ///
    /// - under the limit, if the caller holds less than its share, or is the
    ///   only caller with calls (one caller alone may use the whole limit);
    /// - past the limit, if the caller holds less than its share and others
    ///   hold more than theirs: the room they took beyond their share is its
    ///   (as in Netflix's partitioned limiter), so a caller arriving after a
    ///   flood is not kept waiting behind it. Calls in flight stay below
    ///   twice the limit, and fall back to it as the flood's calls end.
    fn may_admit(&self, caller: &str) -> bool {
        let (limit, cap) = (self.limit(), self.caller_cap());
        let mine = self.load(caller).in_flight;
        if self.in_flight < limit && (mine < cap || self.callers.keys().all(|c| &**c == caller)) {
            return true;
        }
        let within_shares: usize = self.callers.values().map(|l| l.in_flight.min(cap)).sum();
        mine < cap && within_shares < limit && self.in_flight < 2 * limit
    }

    /// Takes a slot for a call of `caller` if [`may_admit`](Self::may_admit).
    /// Waiters never block a call that may run: a waiter that could run
    /// would have been admitted already (see [`admit_waiters`](Self::admit_waiters)).
    fn try_admit(&mut self, caller: &Arc<str>) -> bool {
        if !self.may_admit(caller) {
            return false;
        }
        self.in_flight += 1;
        self.callers.entry(caller.clone()).or_default().in_flight += 1;
        true
    }

    /// Queues a call that was not admitted: its ticket, and the waiter it
    /// displaced if the queue was full; or the waiter back if there is no
    /// room for it.
    fn enqueue(&mut self, caller: Arc<str>, waiter: W) -> Result<(u64, Option<W>), W> {
        let mut displaced = None;
        if self.queue.len() >= self.queue_length {
            let mine = self.load(&caller).total();
            let heaviest = self
                .callers
                .iter()
                .filter(|(_, load)| load.queued > 0)
                .max_by_key(|(_, load)| load.total())
                .map(|(name, load)| (name.clone(), load.total()));
            match heaviest {
                // Only while the displaced caller keeps at least as much
                // load as this one gets: no back and forth.
                Some((victim, load)) if load > mine + 1 => {
                    let position = self
                        .queue
                        .iter()
                        .rposition(|q| q.caller == victim)
                        .expect("a caller with queued calls has one in the queue");
                    let out = self.queue.remove(position).expect("in range");
                    self.forget_queued(&out.caller);
                    displaced = Some(out.waiter);
                }
                _ => return Err(waiter),
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.callers.entry(caller.clone()).or_default().queued += 1;
        self.queue.push_back(Queued {
            ticket,
            caller,
            waiter,
        });
        Ok((ticket, displaced))
    }

    /// A waiter gives up: its waker if it was still queued, and the
    /// waiters admitted since (its caller leaving may leave another alone).
    fn leave_queue(&mut self, ticket: u64) -> (Option<W>, Vec<(Arc<str>, W)>) {
        let Some(position) = self.queue.iter().position(|q| q.ticket == ticket) else {
            return (None, Vec::new());
        };
        let out = self.queue.remove(position).expect("in range");
        self.forget_queued(&out.caller);
        (Some(out.waiter), self.admit_waiters())
    }

    /// A call of `caller` finished (after `rtt`, if it ran): frees its slot,
    /// feeds the limiter, and returns the waiters admitted into the room
    /// (their slots already taken).
    fn release(&mut self, caller: &str, rtt: Option<Duration>) -> Vec<(Arc<str>, W)> {
        if let Some(rtt) = rtt {
            self.limiter.sample(rtt, self.in_flight);
        }
        self.in_flight -= 1;
        if let Some(load) = self.callers.get_mut(caller) {
            load.in_flight -= 1;
            if load.total() == 0 {
                self.callers.remove(caller);
            }
        }
        self.admit_waiters()
    }

    /// While there is room, admits the oldest waiter of the waiting caller
    /// with the fewest calls in flight, among those that [`may_admit`](Self::may_admit).
    fn admit_waiters(&mut self) -> Vec<(Arc<str>, W)> {
        let mut admitted = Vec::new();
        loop {
            let next = self
                .queue
                .iter()
                .enumerate()
                .filter(|(_, q)| self.may_admit(&q.caller))
                .min_by_key(|&(i, q)| (self.load(&q.caller).in_flight, i))
                .map(|(i, _)| i);
            let Some(position) = next else { break };
            let out = self.queue.remove(position).expect("in range");
            let load = self.callers.entry(out.caller.clone()).or_default();
            load.queued -= 1;
            load.in_flight += 1;
            self.in_flight += 1;
            admitted.push((out.caller, out.waiter));
        }
        admitted
    }

    fn forget_queued(&mut self, caller: &str) {
        if let Some(load) = self.callers.get_mut(caller) {
            load.queued -= 1;
            if load.total() == 0 {
                self.callers.remove(caller);
            }
        }
    }

    fn record_gauges(&self) {
        self.gauges.limit.set(self.limit() as f64);
        self.gauges.in_flight.set(self.in_flight as f64);
        self.gauges.queued.set(self.queue.len() as f64);
    }
}

/// Netflix's Gradient2 adaptive concurrency limit, driven by RTT samples,
/// with a probed reference latency.
///
/// `gradient = clamp(tolerance × reference / short, 0.5, 1)`, then the
/// limit moves a `smoothing` fraction of the way to `gradient × limit +
/// headroom`, within `[min, max]`: per sample when it shrinks, per round
/// (`limit` samples) when it grows, as TCP grows its window per round trip.
/// `short` is an average of the last few samples (Netflix averages a time
/// window; this needs no timer and one outlier moves it little).
///
/// The reference is where this departs from Netflix, whose reference is a
/// long average of the same samples: a limit growing past the capacity
/// raises the latency slowly enough for a long average to follow it, so
/// the gradient stays 1 and the limit drifts to its maximum while every
/// call queues (at 64× overload it reached 126 against a capacity near 20).
/// Here the reference is measured, as BBR measures its minimum RTT: every
/// [`PROBE_INTERVAL`](Self::PROBE_INTERVAL) the limit is halved for one
/// round, and the mean latency of the calls that ran at that lower
/// concurrency (no queue behind the limit) becomes the reference (down at
/// once, up by at most a quarter per probe). Queueing cannot raise it; a
/// lasting change of the call mix is picked up over the next probes. A probe costs about half the limit for one round every ten
/// seconds.
#[derive(Clone, Debug)]
pub struct Gradient2 {
    limit: f64,
    min: f64,
    max: f64,
    short_rtt: Average,
    /// The latency with no queue, in seconds (`None` until the first probe).
    reference: Option<f64>,
    probe: Probe,
}

#[derive(Clone, Debug)]
enum Probe {
    /// The next probe starts at the first sample from this instant on
    /// (`None`: at the first sample).
    Waiting(Option<Instant>),
    /// The limit is `limit` until `samples` calls have run at or under it
    /// (or `until` has passed).
    Running {
        limit: f64,
        until: Instant,
        samples: u32,
        sum: f64,
    },
}

impl Gradient2 {
    /// How much more latency than the reference is still no queue. At 1.5
    /// the limit settled at 32-41 under a 64× flood on 2 cores (latency 2×
    /// the unqueued) and goodput fell to 0.79-0.96× the best level; at 1.25,
    /// 27-33 and 0.94-0.96× (RELIABILITY.md, overload).
    const TOLERANCE: f64 = 1.25;
    /// The fraction of the way to the new estimate the limit moves per
    /// sample (shrinking) or per round (growing).
    const SMOOTHING: f64 = 0.2;
    /// Calls added above `gradient × limit`: how the limit probes for room.
    const HEADROOM: f64 = 4.0;
    const SHORT_WINDOW: u32 = 10;
    /// The most the reference rises per probe.
    const REFERENCE_RISE: f64 = 1.25;
    /// How often the reference latency is measured again.
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
    /// The longest a probe lasts (slow calls: fewer samples then).
    const PROBE_MAX: Duration = Duration::from_secs(1);

    pub fn new(min: usize, initial: usize, max: usize) -> Self {
        let min = min.max(1) as f64;
        let max = (max as f64).max(min);
        Self {
            limit: (initial as f64).clamp(min, max),
            min,
            max,
            short_rtt: Average::new(Self::SHORT_WINDOW),
            reference: None,
            probe: Probe::Waiting(None),
        }
    }

    /// The calls that may run now: the limit, or less during a probe.
    pub fn limit(&self) -> usize {
        match self.probe {
            Probe::Running { limit, .. } => limit as usize,
            Probe::Waiting(_) => self.limit as usize,
        }
    }

    /// One finished call: its RTT and the calls in flight when it ended.
    pub fn sample(&mut self, rtt: Duration, in_flight: usize) {
        self.sample_at(rtt, in_flight, Instant::now());
    }

    /// [`sample`](Self::sample), at `now`.
    fn sample_at(&mut self, rtt: Duration, in_flight: usize, now: Instant) {
        let rtt = rtt.as_secs_f64().max(1e-6);
        let short = self.short_rtt.add(rtt);
        if self.probing(rtt, in_flight, now) {
            return;
        }
        let Some(reference) = self.reference else {
            return;
        };
        // App-limited: too few calls to say anything about capacity.
        if (in_flight as f64) < self.limit / 2.0 {
            return;
        }
        let gradient = (Self::TOLERANCE * reference / short).clamp(0.5, 1.0);
        let target = self.limit * gradient + Self::HEADROOM;
        let smoothing = if target < self.limit {
            Self::SMOOTHING
        } else {
            Self::SMOOTHING / self.limit
        };
        self.limit =
            (self.limit * (1.0 - smoothing) + target * smoothing).clamp(self.min, self.max);
    }

    /// Starts, feeds or ends a probe; true while one runs (the limit does
    /// not move then).
    fn probing(&mut self, rtt: f64, in_flight: usize, now: Instant) -> bool {
        if let Probe::Waiting(at) = self.probe {
            if at.is_some_and(|at| now < at) {
                return false;
            }
            // The first probe runs at the initial limit; later ones at half.
            let limit = if self.reference.is_none() {
                self.limit
            } else {
                (self.limit / 2.0).max(self.min)
            };
            self.probe = Probe::Running {
                limit,
                until: now + Self::PROBE_MAX,
                samples: 0,
                sum: 0.0,
            };
        }
        let Probe::Running {
            limit,
            until,
            samples,
            sum,
        } = &mut self.probe
        else {
            unreachable!("a probe runs");
        };
        // Only calls that ran once the in-flight count had come down count.
        if in_flight as f64 <= *limit {
            *samples += 1;
            *sum += rtt;
        }
        let wanted = (*limit / 2.0).max(f64::from(Self::SHORT_WINDOW));
        if f64::from(*samples) >= wanted || now >= *until {
            if *samples > 0 {
                let measured = *sum / f64::from(*samples);
                // Down at once, up by at most a quarter a probe: one probe
                // taken while the machine was busy does not let the limit
                // past the capacity.
                self.reference = Some(
                    self.reference
                        .map_or(measured, |old| measured.min(old * Self::REFERENCE_RISE)),
                );
            }
            self.probe = Probe::Waiting(Some(now + Self::PROBE_INTERVAL));
        }
        true
    }
}

/// An exponential moving average over about `window` samples; the plain
/// mean until that many have been seen.
#[derive(Clone, Debug)]
struct Average {
    window: u32,
    count: u32,
    value: f64,
}

impl Average {
    fn new(window: u32) -> Self {
        Self {
            window,
            count: 0,
            value: 0.0,
        }
    }

    fn add(&mut self, sample: f64) -> f64 {
        // Within the warm-up the weight is 1/n (the running mean), then a
        // fixed 2/(window + 1).
        let weight = if self.count < self.window {
            self.count += 1;
            1.0 / f64::from(self.count)
        } else {
            2.0 / (f64::from(self.window) + 1.0)
        };
        self.value += (sample - self.value) * weight;
        self.value
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use tonic::{Code, Status};
    use tonic_types::StatusExt as _;
    use tower::{Layer as _, Service as _, ServiceExt as _, service_fn};

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A limiter and the clock its samples are taken on.
    struct Clocked {
        limiter: Gradient2,
        now: Instant,
    }

    impl Clocked {
        fn new(min: usize, initial: usize, max: usize) -> Self {
            Self {
                limiter: Gradient2::new(min, initial, max),
                now: Instant::now(),
            }
        }

        fn limit(&self) -> usize {
            self.limiter.limit()
        }

        /// One sample, `in_flight` calls of `rtt` ending evenly spread.
        fn sample(&mut self, rtt: Duration, in_flight: usize) {
            self.now += rtt / in_flight.max(1) as u32;
            self.limiter.sample_at(rtt, in_flight, self.now);
        }

        /// `n` samples of `rtt` with the limit fully used.
        fn busy(&mut self, rtt: Duration, n: usize) {
            for _ in 0..n {
                let in_flight = self.limit();
                self.sample(rtt, in_flight);
            }
        }
    }

    #[test]
    fn the_limit_grows_while_latency_stays_low_up_to_its_maximum() {
        let mut limiter = Clocked::new(1, 10, 100);
        // The first probe measures the reference (10 calls) ...
        limiter.busy(ms(10), 10);
        assert_eq!(limiter.limit(), 10);
        // ... then about headroom × smoothing (0.8) more per round of
        // `limit` calls.
        limiter.busy(ms(10), 10 + 11 + 12);
        assert_eq!(limiter.limit(), 12);
        limiter.busy(ms(10), 500);
        let grown = limiter.limit();
        assert!(grown > 20, "{grown}");
        for _ in 0..10_000 {
            limiter.busy(ms(10), 1);
            assert!(limiter.limit() <= 100);
        }
        assert_eq!(limiter.limit(), 100);
    }

    #[test]
    fn a_limit_past_capacity_falls_back_instead_of_drifting_up() {
        // A service whose latency grows with the calls past 20 in flight
        // (a pool of 20): the limit must stay near 20, not follow the
        // latency it causes up to its maximum.
        let mut limiter = Clocked::new(5, 20, 200);
        let mut highest = 0;
        for _ in 0..50_000 {
            let in_flight = limiter.limit();
            let rtt = ms(10).mul_f64((in_flight as f64 / 20.0).max(1.0));
            limiter.sample(rtt, in_flight);
            highest = highest.max(limiter.limit());
        }
        assert!(limiter.limit() <= 40, "ended at {}", limiter.limit());
        assert!(highest <= 40, "reached {highest}");
    }

    #[test]
    fn the_limit_shrinks_when_latency_rises_down_to_its_minimum() {
        let mut limiter = Clocked::new(10, 100, 100);
        limiter.busy(ms(10), 600);
        assert_eq!(limiter.limit(), 100);
        limiter.busy(ms(40), 30);
        let shrunk = limiter.limit();
        assert!(shrunk < 50, "{shrunk}");
        for _ in 0..100 {
            limiter.busy(ms(400), 1);
            assert!(limiter.limit() >= 10);
        }
        assert_eq!(limiter.limit(), 10);
    }

    #[test]
    fn a_lasting_slower_mix_becomes_the_reference_over_the_next_probes() {
        let mut limiter = Clocked::new(10, 100, 100);
        limiter.busy(ms(10), 600);
        // Slower calls from now on: the limit falls while the fast ones are
        // still the reference, then grows again once the probes have
        // measured the new latency.
        limiter.busy(ms(40), 200);
        let low = limiter.limit();
        // Four times slower: seven probes at a quarter more each.
        let after = limiter.now + Gradient2::PROBE_INTERVAL * 8;
        while limiter.now < after {
            limiter.busy(ms(40), 1);
        }
        limiter.busy(ms(40), 5_000);
        assert!(limiter.limit() > low + 50, "{low} -> {}", limiter.limit());
    }

    #[test]
    fn the_limit_recovers_once_latency_is_back_to_normal() {
        let mut limiter = Clocked::new(1, 50, 100);
        limiter.busy(ms(10), 600);
        limiter.busy(ms(100), 200);
        let low = limiter.limit();
        limiter.busy(ms(10), 5_000);
        assert!(limiter.limit() > low + 50, "{low} -> {}", limiter.limit());
    }

    #[test]
    fn a_probe_halves_the_limit_for_one_round_every_interval() {
        let mut limiter = Clocked::new(10, 40, 40);
        limiter.busy(ms(10), 20);
        assert_eq!(limiter.limit(), 40, "the first probe runs at the limit");
        let (start, mut probes, mut probing) = (limiter.now, 0, false);
        while limiter.now < start + Gradient2::PROBE_INTERVAL * 7 / 2 {
            limiter.busy(ms(10), 1);
            let now_probing = limiter.limit() == 20;
            assert!(now_probing || limiter.limit() == 40, "{}", limiter.limit());
            probes += usize::from(now_probing && !probing);
            probing = now_probing;
        }
        assert_eq!(probes, 3);
    }

    #[test]
    fn an_idle_service_says_nothing_about_capacity() {
        let mut limiter = Clocked::new(1, 20, 100);
        for _ in 0..100 {
            limiter.sample(ms(10), 3);
        }
        assert_eq!(limiter.limit(), 20, "fewer than half in flight: no growth");
    }

    #[test]
    fn one_slow_call_barely_moves_the_limit() {
        let mut limiter = Clocked::new(1, 50, 50);
        limiter.busy(ms(10), 600);
        limiter.busy(Duration::from_secs(2), 1);
        assert!(limiter.limit() >= 45, "{}", limiter.limit());
    }

    #[test]
    fn the_limit_stays_within_its_bounds_whatever_the_samples() {
        let mut limiter = Clocked::new(4, 16, 64);
        let mut seed: u64 = 42;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        for _ in 0..10_000 {
            let rtt = Duration::from_micros(1 + next() % 500_000);
            let in_flight = (next() % 128) as usize;
            limiter.sample(rtt, in_flight);
            assert!((4..=64).contains(&limiter.limit()), "{}", limiter.limit());
        }
    }

    /// A gate with a fixed limit (min = max).
    fn gate(limit: usize, queue_length: usize, caller_share: f64) -> Gate<&'static str> {
        Gate::new(
            Gradient2::new(limit, limit, limit),
            queue_length,
            caller_share,
        )
    }

    fn name(caller: &str) -> Arc<str> {
        Arc::from(caller)
    }

    #[test]
    fn calls_are_admitted_up_to_the_limit_then_queued_then_refused() {
        let mut gate = gate(2, 1, 1.0);
        let a = name("a");
        assert!(gate.try_admit(&a));
        assert!(gate.try_admit(&a));
        assert!(!gate.try_admit(&a));
        assert!(matches!(gate.enqueue(a.clone(), "w1"), Ok((_, None))));
        assert!(!gate.try_admit(&a));
        assert_eq!(gate.enqueue(a.clone(), "w2").err(), Some("w2"));
        assert_eq!(gate.in_flight, 2);
        assert_eq!(gate.queue.len(), 1);
    }

    #[test]
    fn a_freed_slot_goes_to_the_oldest_waiter() {
        let mut gate = gate(1, 2, 1.0);
        let a = name("a");
        assert!(gate.try_admit(&a));
        gate.enqueue(a.clone(), "w1").unwrap();
        gate.enqueue(a.clone(), "w2").unwrap();
        assert_eq!(gate.release("a", Some(ms(5))), vec![(a.clone(), "w1")]);
        assert_eq!(gate.release("a", Some(ms(5))), vec![(a.clone(), "w2")]);
        assert_eq!(gate.release("a", Some(ms(5))), vec![]);
        assert_eq!(gate.in_flight, 0);
        assert!(gate.callers.is_empty(), "idle callers are forgotten");
    }

    #[test]
    fn a_caller_alone_may_use_the_whole_limit() {
        let mut gate = gate(4, 4, 0.5);
        let a = name("a");
        for _ in 0..4 {
            assert!(gate.try_admit(&a));
        }
        assert!(!gate.try_admit(&a), "the limit holds");
    }

    #[test]
    fn a_caller_arriving_after_a_flood_gets_its_share_at_once() {
        let mut gate = gate(4, 4, 0.5);
        let (a, b) = (name("a"), name("b"));
        for _ in 0..4 {
            assert!(gate.try_admit(&a));
        }
        gate.enqueue(a.clone(), "a5").unwrap();
        // a holds two calls beyond its share: they are b's.
        assert!(gate.try_admit(&b));
        assert!(gate.try_admit(&b));
        assert!(!gate.try_admit(&b), "b holds its share");
        assert_eq!(gate.in_flight, 6, "past the limit by a's excess only");
        // a's calls end: its waiter runs only once a is back under its
        // share and the total under the limit.
        assert_eq!(gate.release("a", None), vec![]);
        assert_eq!(gate.release("a", None), vec![]);
        assert_eq!(gate.release("a", None), vec![(a.clone(), "a5")]);
        assert_eq!(gate.load("a").in_flight, 2);
        assert_eq!(gate.in_flight, 4);
    }

    #[test]
    fn no_caller_holds_more_than_its_share_while_others_have_calls() {
        let mut gate = gate(4, 4, 0.5);
        let (a, b) = (name("a"), name("b"));
        assert!(gate.try_admit(&b));
        assert!(gate.try_admit(&a));
        assert!(gate.try_admit(&a));
        assert!(!gate.try_admit(&a), "a holds half the limit, b has a call");
        gate.enqueue(a.clone(), "a3").unwrap();
        // b's call ends: a is alone, and its waiter may use the room.
        assert_eq!(gate.release("b", None), vec![(a.clone(), "a3")]);
    }

    #[test]
    fn a_share_is_at_least_one_call() {
        let mut gate = gate(1, 0, 0.1);
        assert!(gate.try_admit(&name("a")));
    }

    #[test]
    fn a_freed_slot_goes_to_the_waiting_caller_with_the_fewest_calls_in_flight() {
        let mut gate = gate(3, 4, 1.0);
        let (a, b) = (name("a"), name("b"));
        for _ in 0..3 {
            assert!(gate.try_admit(&a));
        }
        gate.enqueue(a.clone(), "a4").unwrap();
        gate.enqueue(b.clone(), "b1").unwrap();
        assert_eq!(gate.release("a", None), vec![(b.clone(), "b1")]);
        assert_eq!(gate.release("a", None), vec![(a.clone(), "a4")]);
    }

    #[test]
    fn a_full_queue_makes_room_for_a_lighter_caller_without_back_and_forth() {
        let mut gate = gate(2, 1, 1.0);
        let (a, b) = (name("a"), name("b"));
        assert!(gate.try_admit(&a));
        assert!(gate.try_admit(&a));
        gate.enqueue(a.clone(), "a3").unwrap();
        let (_, displaced) = gate.enqueue(b.clone(), "b1").unwrap();
        assert_eq!(displaced, Some("a3"), "a's newest waiter makes room for b");
        assert_eq!(
            gate.enqueue(a.clone(), "a4").err(),
            Some("a4"),
            "a is still the heavier: it does not take the place back"
        );
        assert_eq!(
            gate.load("a"),
            Load {
                in_flight: 2,
                queued: 0
            }
        );
        assert_eq!(
            gate.load("b"),
            Load {
                in_flight: 0,
                queued: 1
            }
        );
        assert_eq!(gate.release("a", None), vec![(b.clone(), "b1")]);
    }

    #[test]
    fn a_waiter_that_leaves_frees_its_place() {
        let mut gate = gate(1, 1, 1.0);
        let a = name("a");
        assert!(gate.try_admit(&a));
        let (ticket, _) = gate.enqueue(a.clone(), "w1").unwrap();
        assert_eq!(gate.leave_queue(ticket), (Some("w1"), vec![]));
        assert_eq!(gate.leave_queue(ticket), (None, vec![]));
        assert!(gate.enqueue(a.clone(), "w2").is_ok(), "the place is free");
        assert_eq!(gate.release("a", None), vec![(a.clone(), "w2")]);
        assert_eq!(gate.release("a", None), vec![]);
        assert!(gate.callers.is_empty());
    }

    // --- Pushback --------------------------------------------------------

    /// `admitted` admissions and `rejected` rejections in the window that
    /// starts at `now`; returns the start of the next one.
    fn window(pushback: &mut Pushback, now: Instant, admitted: u32, rejected: u32) -> Instant {
        for _ in 0..admitted {
            pushback.note(Outcome::Admitted, now);
        }
        for _ in 0..rejected {
            pushback.note(Outcome::Rejected, now);
        }
        now + Pushback::WINDOW
    }

    #[test]
    fn pushback_doubles_up_to_the_cap_while_rejections_dominate() {
        let mut pushback = Pushback::new(ms(1000), ms(8000));
        let mut now = pushback.window_start;
        for expected in [2000, 4000, 8000, 8000, 8000] {
            // Five rejections per admission.
            now = window(&mut pushback, now, 10, 50);
            assert_eq!(pushback.note(Outcome::Rejected, now), ms(expected));
        }
    }

    #[test]
    fn pushback_stays_at_the_base_while_few_are_shed() {
        let mut pushback = Pushback::new(ms(1000), ms(8000));
        let mut now = pushback.window_start;
        for _ in 0..5 {
            // 4 rejections per 10 admissions: between the two thresholds.
            now = window(&mut pushback, now, 10, 4);
        }
        assert_eq!(pushback.note(Outcome::Admitted, now), ms(1000));
    }

    #[test]
    fn pushback_halves_back_in_calm_or_idle_windows() {
        let mut pushback = Pushback::new(ms(1000), ms(8000));
        pushback.delay = ms(8000);
        let now = pushback.window_start;
        // One calm window (no rejections) halves it.
        let next = window(&mut pushback, now, 10, 0);
        assert_eq!(pushback.note(Outcome::Admitted, next), ms(4000));
        // Three idle windows after that count as calm ones too.
        let later = next + Pushback::WINDOW * 4;
        assert_eq!(pushback.note(Outcome::Admitted, later), ms(1000));
    }

    // --- The middleware ------------------------------------------------

    /// A fixed limit; queued calls wait for as long as a test takes,
    /// unless it says otherwise.
    fn settings(limit: usize, queue_length: usize) -> AdmissionSettings {
        AdmissionSettings {
            enabled: true,
            min_limit: limit,
            initial_limit: limit,
            max_limit: limit,
            queue_length,
            max_queue_wait: Duration::from_secs(60),
            caller_share: 1.0,
            retry_after: ms(100),
            max_retry_after: ms(100),
        }
    }

    /// A call of `caller` to `path`; the handler holds it until `open`.
    fn request(path: &str, caller: &str) -> Request<Body> {
        let mut request = Request::builder().uri(path).body(Body::empty()).unwrap();
        request.extensions_mut().insert(Caller::new(caller, &[]));
        request
    }

    const CALL: &str = "/datagate.v1.UserService/GetUser";

    /// A call answered by the middleware or the handler.
    type Call = tokio::task::JoinHandle<Result<http::Response<Body>, Infallible>>;

    /// The admission middleware in front of a handler that answers once
    /// `open` is true, and the first call of a test, running there.
    struct Held<S> {
        admission: Admission,
        open: tokio::sync::watch::Sender<bool>,
        service: S,
        running: Call,
    }

    /// The middleware with `settings`, holding a running call of `caller`.
    async fn held(
        settings: AdmissionSettings,
        caller: &str,
    ) -> Held<impl Inner<Error = Infallible> + use<>> {
        let admission = Admission::new(&settings);
        let (open, opened) = tokio::sync::watch::channel(false);
        let handler = service_fn(move |_: Request<Body>| {
            let mut opened = opened.clone();
            async move {
                opened.wait_for(|open| *open).await.unwrap();
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        });
        let mut service = admission.clone().into_layer().layer(handler);
        let running = start(&mut service, request(CALL, caller)).await;
        Held {
            admission,
            open,
            service,
            running,
        }
    }

    /// `request` on its way through `service`.
    async fn start<S: Inner<Error = Infallible>>(service: &mut S, request: Request<Body>) -> Call {
        let future = service.ready().await.unwrap().call(request);
        tokio::spawn(future)
    }

    impl<S: Inner<Error = Infallible>> Held<S> {
        async fn start(&mut self, request: Request<Body>) -> Call {
            start(&mut self.service, request).await
        }

        fn gate(&self) -> std::sync::MutexGuard<'_, Gate<oneshot::Sender<Permit>>> {
            self.admission.shared.gate.lock().unwrap()
        }

        /// Calls in flight and calls queued.
        fn counts(&self) -> (usize, usize) {
            let gate = self.gate();
            (gate.in_flight, gate.queue.len())
        }

        /// Opens the handler and waits for the running call, which the
        /// handler answers.
        async fn finish(&mut self) {
            self.open.send(true).unwrap();
            let response = (&mut self.running).await.unwrap().unwrap();
            assert!(status_of(&response).is_none(), "answered by the handler");
        }

        /// [`Held::finish`] when the running call is the only one in the
        /// middleware: nothing is left in it after.
        async fn finish_last(&mut self) {
            assert_eq!(self.counts(), (1, 0), "only the running call");
            self.finish().await;
            assert_eq!(self.counts(), (0, 0), "nothing left");
        }
    }

    fn status_of(response: &http::Response<Body>) -> Option<Status> {
        Status::from_header_map(response.headers())
    }

    #[track_caller]
    fn assert_shed(response: &http::Response<Body>, cause: &str) {
        let status = status_of(response).expect("answered by the middleware");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason::OVERLOADED);
        assert_eq!(info.metadata.get("cause").map(String::as_str), Some(cause));
        let retry = details.retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(ms(100)));
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_and_the_queue_are_shed_at_once_and_the_queued_one_runs_later() {
        let mut held = held(settings(1, 1), "a").await;
        let queued = held.start(request(CALL, "a")).await;
        let shed = held
            .service
            .ready()
            .await
            .unwrap()
            .call(request(CALL, "a"))
            .await
            .unwrap();
        assert_shed(&shed, "queue_full");
        assert_eq!(held.counts(), (1, 1));

        held.finish().await;
        let response = queued.await.unwrap().unwrap();
        assert!(status_of(&response).is_none(), "answered by the handler");
        assert_eq!(held.counts(), (0, 0));
        assert!(held.gate().callers.is_empty());
    }

    #[tokio::test]
    async fn a_call_that_waits_past_max_queue_wait_is_shed() {
        let settings = AdmissionSettings {
            max_queue_wait: ms(1),
            ..settings(1, 1)
        };
        let mut held = held(settings, "a").await;
        let waited = held.start(request(CALL, "a")).await;
        // The running call never ends: the only possible answer is a shed.
        let response = waited.await.unwrap().unwrap();
        assert_shed(&response, "queue_timeout");
        held.finish_last().await;
    }

    #[tokio::test]
    async fn a_call_waits_in_the_queue_for_at_most_half_its_deadline() {
        let mut held = held(settings(1, 1), "a").await;
        let mut short = request(CALL, "a");
        short
            .extensions_mut()
            .insert(Deadline::after(Duration::from_millis(4)));
        let queued = held.start(short).await;
        // Not the 60 s of max_queue_wait.
        let response = tokio::time::timeout(Duration::from_secs(10), queued)
            .await
            .expect("bounded by the deadline")
            .unwrap()
            .unwrap();
        assert_shed(&response, "queue_timeout");
        held.finish_last().await;
    }

    #[tokio::test]
    async fn a_queued_call_that_goes_away_leaves_the_queue() {
        let mut held = held(settings(1, 1), "a").await;
        let queued = held.service.ready().await.unwrap().call(request(CALL, "a"));
        assert_eq!(held.counts(), (1, 1));
        drop(queued);
        held.finish_last().await;
    }

    #[tokio::test]
    async fn a_displaced_waiter_is_shed_and_the_lighter_caller_runs_next() {
        let mut held = held(settings(1, 1), "flooder").await;
        let displaced = held.start(request(CALL, "flooder")).await;
        let other = held.start(request(CALL, "other")).await;
        assert_shed(&displaced.await.unwrap().unwrap(), "displaced");
        held.finish().await;
        let response = other.await.unwrap().unwrap();
        assert!(status_of(&response).is_none(), "the other caller ran");
    }

    #[tokio::test]
    async fn health_reflection_and_admin_calls_are_never_shed() {
        let mut held = held(settings(1, 0), "a").await;
        let shed = held.start(request(CALL, "a")).await;
        assert_shed(&shed.await.unwrap().unwrap(), "queue_full");
        let exempt = [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/datagate.v1.AdminService/ListPartitions",
        ]
        .map(|path| {
            (
                path,
                tokio::spawn(held.service.clone().oneshot(request(path, "a"))),
            )
        });
        tokio::task::yield_now().await;
        // The exempt calls take no slot.
        held.finish_last().await;
        for (path, call) in exempt {
            let response = call.await.unwrap().unwrap();
            assert!(status_of(&response).is_none(), "{path} reached the handler");
        }
    }
}
