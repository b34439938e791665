//! A bounded load client: N callers, each making one call after another
//! until stopped or until the time bound, every call itself bounded (a call
//! that does not answer within `CALL_BOUND` is counted as `HANG`). Outcomes
//! are kept per call (when it started, how long it took, its code), so a
//! scenario can count them by phase.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The longest any one call may take before it counts as a hang.
pub const CALL_BOUND: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the load started.
    pub started: Duration,
    pub latency: Duration,
    /// A gRPC code's name, or `HANG`.
    pub code: String,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.code == "Ok"
    }
}

/// How long a caller waits after a call before its next one (not counted in
/// its latency).
#[derive(Debug, Clone, Copy)]
pub enum Pacing {
    /// Calls again at once, whatever the answer (a misbehaving client).
    Eager,
    /// Waits this long after every call (a bounded rate).
    Every(Duration),
    /// Waits what a RESOURCE_EXHAUSTED's `RetryInfo` asks, with full jitter
    /// (a uniformly random part of it), as a gRPC client that follows the
    /// service's contract does.
    HonourRetryInfo,
}

impl Pacing {
    /// The pause after a call that answered `answer` (`None`: it hung).
    fn pause_after(self, answer: Option<&Result<(), Status>>) -> Option<Duration> {
        use tonic_types::StatusExt as _;
        match self {
            Self::Eager => None,
            Self::Every(pause) => Some(pause).filter(|p| !p.is_zero()),
            Self::HonourRetryInfo => {
                let status = answer?.as_ref().err()?;
                if status.code() != tonic::Code::ResourceExhausted {
                    return None;
                }
                let delay = status.get_error_details().retry_info()?.retry_delay?;
                let unit = getrandom::u64().unwrap_or(0) as f64 / u64::MAX as f64;
                Some(delay.mul_f64(unit))
            }
        }
    }
}

pub struct Load {
    pub start: Instant,
    stop: CancellationToken,
    samples: Arc<Mutex<Vec<Sample>>>,
    callers: JoinSet<()>,
}

impl Load {
    /// Starts `callers` callers for at most `bound`; `call(caller, n)` makes
    /// the caller's n-th call.
    pub fn start<F, Fut>(callers: usize, bound: Duration, call: F) -> Self
    where
        F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        Self::start_with(callers, bound, Pacing::Eager, call)
    }

    /// Like [`Load::start`], each caller waiting `pause` after each call (not
    /// counted in its latency): a bounded rate for a server that takes only
    /// a few hundred operations a second.
    pub fn paced<F, Fut>(callers: usize, bound: Duration, pause: Duration, call: F) -> Self
    where
        F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        Self::start_with(callers, bound, Pacing::Every(pause), call)
    }

    /// [`Load::start`], with the callers' pause between calls.
    pub fn start_with<F, Fut>(callers: usize, bound: Duration, pacing: Pacing, call: F) -> Self
    where
        F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let start = Instant::now();
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut set = JoinSet::new();
        for caller in 0..callers {
            let (stop, samples, call) = (stop.clone(), samples.clone(), call.clone());
            set.spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() && start.elapsed() < bound {
                    let begun = Instant::now();
                    let answer = tokio::time::timeout(CALL_BOUND, call(caller, n)).await;
                    let pause = pacing.pause_after(answer.as_ref().ok());
                    let code = match answer {
                        Ok(Ok(())) => "Ok".to_owned(),
                        Ok(Err(status)) => format!("{:?}", status.code()),
                        Err(_) => "HANG".to_owned(),
                    };
                    samples.lock().unwrap().push(Sample {
                        started: begun - start,
                        latency: begun.elapsed(),
                        code,
                    });
                    n += 1;
                    if let Some(pause) = pause {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                }
            });
        }
        Self {
            start,
            stop,
            samples,
            callers: set,
        }
    }

    /// Time since the load started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops starting calls; waits for those in flight; returns every sample.
    pub async fn finish(mut self) -> Samples {
        self.stop.cancel();
        while self.callers.join_next().await.is_some() {}
        let samples = std::mem::take(&mut *self.samples.lock().unwrap());
        Samples(samples)
    }
}

pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// The samples whose call started in `[from, to)`.
    pub fn started_between(&self, from: Duration, to: Duration) -> Samples {
        Samples(
            self.0
                .iter()
                .filter(|s| s.started >= from && s.started < to)
                .cloned()
                .collect(),
        )
    }

    pub fn codes(&self) -> BTreeMap<String, usize> {
        let mut codes = BTreeMap::new();
        for s in &self.0 {
            *codes.entry(s.code.clone()).or_default() += 1;
        }
        codes
    }

    /// Asserts that these calls, made while a dependency was down (`what`),
    /// failed only with UNAVAILABLE (never INTERNAL or a hang) and that at
    /// least one failed: the outage was seen.
    #[track_caller]
    pub fn assert_failed_only_unavailable(&self, what: &str) {
        let unexpected = self
            .0
            .iter()
            .filter(|s| !s.ok() && s.code != "Unavailable")
            .count();
        assert_eq!(
            unexpected,
            0,
            "{what} calls fail only with UNAVAILABLE (never INTERNAL or a hang): {}",
            self.summary()
        );
        assert!(self.failed() > 0, "the outage was seen: {}", self.summary());
    }

    pub fn failed(&self) -> usize {
        self.0.iter().filter(|s| !s.ok()).count()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The q-quantile (0..=1) of the latencies, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut ms: Vec<f64> = self
            .0
            .iter()
            .map(|s| s.latency.as_secs_f64() * 1e3)
            .collect();
        if ms.is_empty() {
            return 0.0;
        }
        ms.sort_by(f64::total_cmp);
        let index = ((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1;
        ms[index]
    }

    /// `n=…, codes={…}, p50=…ms, p99=…ms, max=…ms`.
    pub fn summary(&self) -> String {
        format!(
            "n={} codes={:?} p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.len(),
            self.codes(),
            self.quantile_ms(0.5),
            self.quantile_ms(0.99),
            self.quantile_ms(1.0)
        )
    }
}
