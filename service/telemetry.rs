//! Logs and traces: one `tracing` subscriber with a JSON or human-readable
//! formatter, an env-filter, and an OpenTelemetry layer exporting spans over
//! OTLP/gRPC when an endpoint is configured.
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

use anyhow::Context as _;
use opentelemetry::{propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
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

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<TelemetryGuard> {
    // Filters are per layer: the statement layer needs sqlx's DEBUG events
    // whatever the log filter lets through.
    let filter = || {
        EnvFilter::try_new(&settings.log_filter)
            .with_context(|| format!("invalid telemetry.log_filter {:?}", settings.log_filter))
    };
    let fmt = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    }
    .with_filter(filter()?);

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
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter()?),
            ),
            Some(provider),
        )
    };

    tracing_subscriber::registry()
        .with(StatementLayer::filtered(settings.slow_statement_threshold))
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
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
