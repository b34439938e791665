//! Logs and traces: one `tracing` subscriber with a JSON or human-readable
//! formatter, an env-filter, and an OpenTelemetry layer exporting spans over
//! OTLP/gRPC when an endpoint is configured.
//!
//! The log and the export have a filter each (`telemetry.log_filter`,
//! `telemetry.trace_filter`), so spans below the log level (the loader
//! batches, DEBUG) are still exported.
//!
//! **Database spans.** Every SQL statement, Redis command (or pipeline,
//! script) and MongoDB operation is a client span ([`DbSpan`]) with the
//! OpenTelemetry semantic conventions (`db.system.name`, and the older
//! `db.system`; `db.operation.name`, `db.collection.name`, `db.query.text`
//! sanitized, `server.address`, `server.port`), a child of the span that
//! runs it (a loader batch, a domain operation). They are made on the
//! OpenTelemetry tracer directly, not as `tracing` spans: one that would
//! not be exported (no exporter configured, or the trace not sampled) costs
//! a check of the current context and nothing else, no span in the
//! registry, no attribute built.
//!
//! **Levels.** ERROR is for what the operators must look at: internal errors
//! (logged once, with their chain, by the status mapping in `api/error.rs`)
//! and failed background work. A caller's mistake (NOT_FOUND,
//! INVALID_ARGUMENT, ALREADY_EXISTS, FAILED_PRECONDITION, ...) is not the
//! service's: domain spans record their errors at INFO
//! (`err(level = "info")`) and the call's `rpc finished` line is INFO.
//!
//! **Context.** Every JSON line carries the fields of all the spans it is in
//! (`spans`), so the `rpc` span's `request_id` and `caller` are on every line
//! of a call, however deep the span that logs it; that span is enabled at
//! every level (see `middleware/rpc.rs`).

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use opentelemetry::{
    KeyValue,
    propagation::Extractor,
    trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::{
    config::{LogFormat, TelemetrySettings},
    statements::StatementLayer,
};

/// Flushes buffered spans when the service stops.
#[must_use = "dropping the guard loses the spans still buffered"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("datagate: flushing traces failed: {e}");
        }
    }
}

/// The JSON log format's span fields: a JSON object, written straight from
/// the fields (`tracing_subscriber`'s `JsonFields` builds a map of
/// `serde_json` values first), with a field recorded later (`span.record`:
/// the caller, the status code, the statement counts) appended to the
/// object. `JsonFields` parses the object and writes it whole again for each
/// one; with the rpc span in every call (enabled at any log level, so that
/// each line carries the request id), that was the largest share of a
/// cached call's instructions (`make bench-cpu`). A field recorded twice
/// appears twice; the last one wins where the line is written (`serde_json`
/// keeps the last of duplicate keys).
pub struct AppendJsonFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        let mut object = JsonObject::default();
        fields.record(&mut object);
        object.close();
        writer.write_str(&object.text)
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let text = &mut current.fields;
        if !text.ends_with('}') {
            let mut object = JsonObject::default();
            fields.record(&mut object);
            object.close();
            *text = object.text;
            return Ok(());
        }
        // Reopen the object: drop its closing brace, append, close again.
        text.pop();
        let mut object = JsonObject {
            members: usize::from(text.len() > 1),
            text: std::mem::take(text),
        };
        fields.record(&mut object);
        object.close();
        *text = object.text;
        Ok(())
    }
}

/// The bytes reserved for a span's JSON fields: an rpc span's are about 250.
const SPAN_FIELDS_CAPACITY: usize = 320;

/// A JSON object being written, one member per recorded field.
#[derive(Default)]
struct JsonObject {
    text: String,
    members: usize,
}

impl JsonObject {
    fn key(&mut self, field: &tracing::field::Field) {
        if self.text.is_empty() {
            // Room for a call's span fields at once, instead of growing
            // (a new allocation and a copy) several times per span.
            self.text.reserve(SPAN_FIELDS_CAPACITY);
            self.text.push('{');
        }
        if self.members > 0 {
            self.text.push(',');
        }
        self.members += 1;
        push_json_string(&mut self.text, field.name());
        self.text.push(':');
    }

    fn close(&mut self) {
        if self.text.is_empty() {
            self.text.push('{');
        }
        self.text.push('}');
    }
}

impl tracing::field::Visit for JsonObject {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.key(field);
        push_json_string(&mut self.text, value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.key(field);
        self.text.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        use std::fmt::Write as _;
        self.key(field);
        let _ = write!(self.text, "{value}");
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        use std::fmt::Write as _;
        self.key(field);
        let _ = write!(self.text, "{value}");
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        use std::fmt::Write as _;
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.text, "{value}");
        } else {
            self.text.push_str("null");
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.key(field);
        push_json_string(&mut self.text, &format!("{value:?}"));
    }
}

/// `value` as a JSON string literal.
fn push_json_string(out: &mut String, value: &str) {
    use std::fmt::Write as _;
    out.push('"');
    // Most values (ids, names, codes) need no escape: copied at once.
    if !value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(value);
        out.push('"');
        return;
    }
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    let (subscriber, provider) = subscriber(settings)?;
    subscriber
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
}

/// The subscriber [`init`] installs, and the tracer provider it exports
/// spans with (if an OTLP endpoint is set).
///
/// Every layer has a filter of its own and there is no layer without one,
/// so a callsite that no filter enables is disabled: a span nobody wants
/// (h2's DEBUG `Connection` span, entered on every poll of a connection;
/// sqlx's own spans) costs nothing. The export layer is added only when
/// there is one, not as an `Option` layer: a `None` layer counts as a layer
/// without a filter, which enables every callsite.
fn subscriber(
    settings: &TelemetrySettings,
) -> anyhow::Result<(
    Box<dyn tracing::Subscriber + Send + Sync>,
    Option<SdkTracerProvider>,
)> {
    // Filters are per layer: the statement layer needs sqlx's DEBUG events
    // whatever the log filter lets through, and the export has its own.
    let filter = |key: &str, directives: &str| {
        EnvFilter::try_new(directives)
            .with_context(|| format!("invalid telemetry.{key} {directives:?}"))
    };
    let fmt = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .fmt_fields(AppendJsonFields)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    }
    .with_filter(filter("log_filter", &settings.log_filter)?);

    let (otel, provider) = if settings.otlp_endpoint.trim().is_empty() {
        (None, None)
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.trim())
            .build()
            .context("building the OTLP span exporter")?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.trace_sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("datagate");
        let trace_filter = filter("trace_filter", &settings.trace_filter)?;
        // The first tracer installed wins (one per process).
        let _ = TRACER.set(tracer.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(trace_filter),
            ),
            Some(provider),
        )
    };

    let logs = tracing_subscriber::registry()
        .with(StatementLayer::filtered(settings.slow_statement_threshold))
        .with(fmt);
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match otel {
        Some(otel) => Box::new(logs.with(otel)),
        None => Box::new(logs),
    };
    Ok((subscriber, provider))
}

/// Reads W3C trace context (`traceparent`) from gRPC request metadata.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The tracer of the database spans, once `init` has built an exporter.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The database systems, as `db.system.name` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbSystem {
    Postgres,
    Redis,
    MongoDb,
}

impl DbSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgresql",
            Self::Redis => "redis",
            Self::MongoDb => "mongodb",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Postgres => 5432,
            Self::Redis => 6379,
            Self::MongoDb => 27017,
        }
    }
}

/// The server a client talks to (`server.address`, `server.port`), read
/// once from its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub system: DbSystem,
    pub address: Arc<str>,
    pub port: u16,
}

impl Peer {
    /// The first host of `url` (`scheme://[user[:password]@]host[:port][,host…][/…]`,
    /// IPv6 in brackets), with the system's default port when it names
    /// none. `None` for a URL without a host (a Unix socket).
    pub fn from_url(system: DbSystem, url: &str) -> Option<Self> {
        let rest = url.trim().split_once("://").map_or(url, |(_, rest)| rest);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let first = hosts.split(',').next().unwrap_or_default();
        let (host, port) = match first.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']')?;
                (host, after.strip_prefix(':'))
            }
            None => match first.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (first, None),
            },
        };
        if host.is_empty() {
            return None;
        }
        let port = match port {
            Some(port) => port.parse().ok()?,
            None => system.default_port(),
        };
        Some(Self {
            system,
            address: host.into(),
            port,
        })
    }
}

/// What a database span says about its operation, built only for a span
/// that is exported.
pub struct DbOperation {
    /// `db.operation.name`: the SQL keyword, the Redis command, the MongoDB
    /// operation.
    pub operation: &'static str,
    /// `db.collection.name`: the table or collection, when known.
    pub collection: Option<Arc<str>>,
    /// `db.query.text`: normalized, never a parameter value.
    pub query: Option<Arc<str>>,
}

/// One database client span, or nothing when it would not be exported (see
/// the module doc). Ends when dropped.
pub struct DbSpan(Option<opentelemetry_sdk::trace::Span>);

impl DbSpan {
    /// Starts a span now (or `started_ago`, for an operation that has
    /// already run), as a child of the current span, if a trace is being
    /// exported and the current one is sampled. `describe` runs only then.
    pub fn start(
        peer: Option<&Peer>,
        started_ago: Option<Duration>,
        describe: impl FnOnce() -> DbOperation,
    ) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Self(None);
        };
        let span = opentelemetry::Context::map_current(|cx| {
            if !cx.span().span_context().is_sampled() {
                return None;
            }
            let op = describe();
            let mut attributes = Vec::with_capacity(8);
            let name = match &op.collection {
                Some(collection) => format!("{} {collection}", op.operation),
                None => op.operation.to_owned(),
            };
            if let Some(peer) = peer {
                attributes.push(KeyValue::new("db.system.name", peer.system.as_str()));
                attributes.push(KeyValue::new("db.system", peer.system.as_str()));
                attributes.push(KeyValue::new("server.address", peer.address.clone()));
                attributes.push(KeyValue::new("server.port", i64::from(peer.port)));
            }
            attributes.push(KeyValue::new("db.operation.name", op.operation));
            if let Some(collection) = op.collection {
                attributes.push(KeyValue::new("db.collection.name", collection));
            }
            if let Some(query) = op.query {
                attributes.push(KeyValue::new("db.query.text", query));
            }
            let mut builder = tracer
                .span_builder(name)
                .with_kind(SpanKind::Client)
                .with_attributes(attributes);
            if let Some(ago) = started_ago {
                let now = SystemTime::now();
                builder = builder.with_start_time(now.checked_sub(ago).unwrap_or(now));
            }
            Some(builder.start_with_context(tracer, cx))
        });
        Self(span)
    }

    /// Marks the operation failed (`error.type`, status ERROR).
    pub fn fail(&mut self, error_type: &'static str) {
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(Status::error(error_type));
        }
    }
}

impl Drop for DbSpan {
    fn drop(&mut self) {
        if let Some(mut span) = self.0.take() {
            span.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(system: DbSystem, address: &str, port: u16) -> Option<Peer> {
        Some(Peer {
            system,
            address: address.into(),
            port,
        })
    }

    #[test]
    fn a_peer_is_the_first_host_of_the_url_without_its_credentials() {
        use DbSystem::*;
        assert_eq!(
            Peer::from_url(
                Postgres,
                "postgres://u:p@db.internal:6432/app?sslmode=require"
            ),
            peer(Postgres, "db.internal", 6432)
        );
        assert_eq!(
            Peer::from_url(Postgres, "postgres://u@db/app"),
            peer(Postgres, "db", 5432),
            "the default port"
        );
        assert_eq!(
            Peer::from_url(Redis, "rediss://user:pw@[::1]:6380/0"),
            peer(Redis, "::1", 6380)
        );
        assert_eq!(
            Peer::from_url(MongoDb, "mongodb://a:27018,b:27019/?replicaSet=rs"),
            peer(MongoDb, "a", 27018)
        );
        assert_eq!(Peer::from_url(Postgres, "postgres:///app"), None);
        assert_eq!(Peer::from_url(Redis, "redis://h:notaport"), None);
    }

    #[test]
    fn without_an_exporter_a_db_span_is_nothing_and_describes_nothing() {
        let span = DbSpan::start(None, None, || unreachable!("not described"));
        assert!(span.0.is_none());
    }

    /// The metadata of `span`'s callsite, to ask a subscriber about
    /// directly: a callsite's cached interest also counts the other tests'
    /// subscribers in this process.
    fn metadata_of(span: impl FnOnce() -> tracing::Span) -> &'static tracing::Metadata<'static> {
        // A subscriber without filters enables everything, so the span is
        // real and has its metadata.
        tracing::subscriber::with_default(tracing_subscriber::registry(), || span().metadata())
            .expect("an enabled span has metadata")
    }

    #[tokio::test]
    async fn a_span_no_filter_wants_is_disabled_with_or_without_an_exporter() {
        let h2 =
            metadata_of(|| tracing::debug_span!(target: "h2::proto::connection", "Connection"));
        let rpc = metadata_of(|| tracing::error_span!("rpc"));
        let sqlx = metadata_of(|| tracing::debug_span!(target: "sqlx::query", "query"));
        // The exporter connects lazily: an unreachable endpoint is fine.
        for otlp_endpoint in ["", "http://127.0.0.1:9"] {
            let settings = TelemetrySettings {
                log_format: crate::config::LogFormat::Json,
                log_filter: "warn".into(),
                trace_filter: "info,datagate::loaders=debug".into(),
                otlp_endpoint: otlp_endpoint.into(),
                service_name: "datagate".into(),
                trace_sample_ratio: 1.0,
                slow_statement_threshold: Duration::from_millis(200),
                n_plus_one_threshold: 5,
            };
            let (subscriber, _provider) = subscriber(&settings).expect("the subscriber builds");
            // What the subscriber answers when the callsite registers: a
            // callsite it is never interested in is disabled for good.
            let enabled = |metadata| !subscriber.register_callsite(metadata).is_never();
            assert!(
                !enabled(h2),
                "h2's DEBUG span under a warn log filter, exporter {otlp_endpoint:?}"
            );
            assert!(
                enabled(rpc),
                "the rpc span is ERROR so that every line carries it"
            );
            assert!(
                enabled(sqlx),
                "the statement layer reads sqlx's DEBUG statement events"
            );
        }
    }
}

#[cfg(test)]
mod append_json_fields_tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::AppendJsonFields;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_recorded_later_are_in_the_span_object_of_every_line_after() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .fmt_fields(AppendJsonFields)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                request_id = "r-1",
                caller = tracing::field::Empty,
                code = tracing::field::Empty,
                ratio = tracing::field::Empty,
                nan = tracing::field::Empty,
                debug = tracing::field::Empty,
                negative = -3_i64,
                flag = false
            );
            let _entered = span.enter();
            span.record("caller", "orders \"svc\" \\ \n\u{1}é");
            span.record("ratio", 0.5);
            span.record("nan", f64::NAN);
            span.record("debug", tracing::field::debug(&["a", "b"]));
            span.record("code", 5);
            span.record("code", 0);
            let empty = tracing::info_span!("empty", later = tracing::field::Empty);
            empty.in_scope(|| tracing::info!("first"));
            empty.record("later", true);
            empty.in_scope(|| tracing::info!("second"));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let rpc = &lines[0]["spans"][0];
        assert_eq!(rpc["request_id"], "r-1");
        assert_eq!(rpc["caller"], "orders \"svc\" \\ \n\u{1}é");
        assert_eq!(rpc["ratio"], 0.5);
        assert_eq!(rpc["nan"], serde_json::Value::Null);
        assert_eq!(rpc["debug"], "[\"a\", \"b\"]");
        assert_eq!(rpc["negative"], -3);
        assert_eq!(rpc["flag"], false);
        assert_eq!(rpc["code"], 0, "the last record wins");
        assert_eq!(lines[0]["span"]["name"], "empty");
        assert_eq!(lines[0]["span"].get("later"), None);
        assert_eq!(lines[1]["span"]["later"], true);
    }
}
