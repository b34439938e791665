//! Observing what the app did, for tests that must prove it: the value of a
//! metric series on the app's own `/metrics`, the log lines of one call
//! (captured by request id), the Redis keys under the app's prefix, and
//! waiting for a condition instead of sleeping.
//!
//! The metrics recorder and the tracing subscriber are process-wide and tests
//! run in parallel: compare a counter before and after (others only add to
//! it), and pick a call's log lines by the `x-request-id` the test chose.

use std::{
    io,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::{Request, metadata::MetadataValue};
use tracing::{Level, Subscriber};
use tracing_subscriber::{Layer, filter::filter_fn, fmt::MakeWriter, registry::LookupSpan};

use super::TestApp;

/// Polls `check` until it holds; panics naming `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- Metrics -----------------------------------------------------------------

/// The value of the series `name{labels}` in a Prometheus text scrape (0 when
/// absent: a counter nothing has incremented yet). Labels must be given in
/// the order the exporter prints them (the order the code records them in).
pub fn series(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scrape, name, labels).unwrap_or(0.0)
}

/// The value of the series `name{labels}` in a scrape, `None` when absent
/// (labels in the exporter's order, as for [`series`]).
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let selector = if labels.is_empty() {
        name.to_owned()
    } else {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        format!("{name}{{{}}}", labels.join(","))
    };
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(&selector)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("a numeric sample"))
    })
}

impl TestApp {
    /// The value of one series on this app's `/metrics`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        series(&self.metrics().await, name, labels)
    }
}

// --- Logs --------------------------------------------------------------------

/// Every live capture's lines; the layer formats nothing while there is none.
static SINKS: Mutex<Vec<Weak<Mutex<Vec<String>>>>> = Mutex::new(Vec::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The capturing layer of the test subscriber: the production JSON format
/// (with the span list, so a line carries its call's `request_id`), for
/// everything datagate logs at any level, statements, and others' INFO and
/// above; only while some test captures.
pub fn capture_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .fmt_fields(datagate::AppendJsonFields)
        .with_writer(CaptureWriter)
        .with_filter(filter_fn(|meta| {
            LIVE.load(Ordering::Relaxed) > 0
                && (meta.target().starts_with("datagate")
                    || meta.target() == "sqlx::query"
                    || *meta.level() <= Level::INFO)
        }))
}

struct CaptureWriter;

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter writes one whole line per event.
        let line = String::from_utf8_lossy(buf).trim_end().to_owned();
        let mut sinks = SINKS.lock().unwrap_or_else(|e| e.into_inner());
        sinks.retain(|sink| match sink.upgrade() {
            Some(lines) => {
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                true
            }
            None => false,
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CaptureWriter {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter
    }
}

/// The log lines of the whole process from `Logs::capture()` until drop.
/// Start it before the calls it is about: spans opened earlier are not
/// recorded.
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Logs {
    pub fn capture() -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        SINKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&lines));
        LIVE.fetch_add(1, Ordering::Relaxed);
        Self { lines }
    }

    /// Every line captured so far, as written.
    pub fn text(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines logged inside the call with this request id.
    pub fn of_request(&self, request_id: &str) -> Vec<serde_json::Value> {
        self.text()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == request_id))
            })
            .collect()
    }

    /// The call's lines once its `rpc finished` line is there (it is logged
    /// when the response ends, which may be after the caller has it).
    pub async fn of_finished_request(&self, request_id: &str) -> Vec<serde_json::Value> {
        wait_until(
            &format!("the rpc finished line of {request_id}"),
            Duration::from_secs(10),
            || async {
                self.of_request(request_id)
                    .iter()
                    .any(|l| l["message"] == "rpc finished")
            },
        )
        .await;
        self.of_request(request_id)
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request carrying a fresh `x-request-id`, and that id.
pub fn with_request_id<T>(message: T) -> (Request<T>, String) {
    let id = format!("test-{}", uuid::Uuid::new_v4().simple());
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "x-request-id",
        MetadataValue::try_from(id.as_str()).unwrap(),
    );
    (request, id)
}

// --- Redis -------------------------------------------------------------------

impl TestApp {
    /// Every Redis key under this app's prefix (single Redis only).
    pub async fn redis_keys(&self) -> Vec<String> {
        // The Redis the tests share, even when this app's cache is off.
        let url = std::env::var("REDIS_URL").expect("REDIS_URL is set (`make test` does)");
        let client = deadpool_redis::redis::Client::open(url).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let pattern = format!("{}:*", self.settings.redis.key_prefix);
        let mut keys: Vec<String> = deadpool_redis::redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }

    /// The generation counter of a query family (`search`, `analytics`): 0
    /// until a write bumps it.
    pub async fn family_generation(&self, family: &str) -> u64 {
        let key = format!("{}:v1:{family}:gen", self.settings.redis.key_prefix);
        self.redis_get(&key)
            .await
            .map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
    }
}
