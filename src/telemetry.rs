//! Logs, traces and metrics.
//!
//! Logs: JSON or human-readable lines on stderr, filtered by `RUST_LOG` or the configuration.
//! Traces and metrics: OpenTelemetry over OTLP (gRPC), configured by the standard `OTEL_*`
//! variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER`, ...); off when no endpoint is set. Metrics can also be scraped in the
//! Prometheus format (`metrics.prometheus_addr`).
//!
//! The caller's W3C trace context (`traceparent`, `tracestate` metadata) becomes the parent
//! of the RPC span; the context of the accepting request is stored with each message so the
//! asynchronous delivery attempts join the same trace, even after a restart.

use std::{collections::HashMap, fmt::Write as _};

use opentelemetry::{
    global,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
    Context, Key,
};
use opentelemetry_otlp::{MetricExporter, SpanExporter};
use opentelemetry_sdk::{
    metrics::SdkMeterProvider, propagation::TraceContextPropagator, trace::SdkTracerProvider,
    Resource,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::{filter_fn, FilterExt, LevelFilter, Targets},
    fmt,
    layer::SubscriberExt,
    util::SubscriberInitExt,
    EnvFilter, Layer,
};

use crate::{
    config::{LogConfig, LogFormat},
    json::push_string,
};

/// The installed telemetry pipelines; flush them with [`Telemetry::shutdown`] before exit.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    /// The registry behind the Prometheus scrape endpoint, when enabled.
    pub prometheus: Option<prometheus::Registry>,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn otlp_enabled(signal: &str) -> bool {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return false;
    }
    env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || env_set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
}

fn resource() -> Resource {
    // Reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let detected = Resource::builder().build();
    let unnamed = detected
        .get(&Key::new("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    if unnamed {
        Resource::builder().with_service_name("mailgate").build()
    } else {
        detected
    }
}

/// Logging only (for commands that do not serve).
pub fn init(log: &LogConfig) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(log))
        .try_init();
}

fn log_layer<S>(log: &LogConfig) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let directives = log_directives(log);
    match log.format {
        LogFormat::Json => filtered(
            fmt::layer()
                .json()
                .flatten_event(true)
                .fmt_fields(AppendJsonFields)
                .with_writer(std::io::stderr),
            &directives,
        ),
        LogFormat::Pretty => filtered(fmt::layer().with_writer(std::io::stderr), &directives),
    }
}

/// The log filter's directives: `RUST_LOG` when it is set and valid, else `log.level`.
fn log_directives(log: &LogConfig) -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty() && EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| log.level.clone())
}

/// The target of spans that are for traces only: the log lines never show them.
///
/// A span shows in a log line when an event happens inside it. The spans with this target
/// (routing, rendering, enqueueing, each SMTP attempt) hold no event of mailgate's own: the
/// events of a request or a delivery happen in its RPC span or its `delivery` span, whose
/// fields (method, tenant, message, trace) the lines carry. Kept from the log layer, these
/// spans are not made at all when no trace exporter is configured. Making them, recording
/// their fields and entering them at every poll, with a span per RPC handler besides (now
/// gone: the RPC's span holds the tenant), was 3.6 % of mailgate's instructions per email
/// through SendEmail on SQLite and 4.7 % on PostgreSQL (docs/benchmarks.md). Use it as
/// `target: TRACE_ONLY`, or as the same string in `#[instrument(target = ...)]`.
pub(crate) const TRACE_ONLY: &str = "mailgate::trace";

/// Whether the log layer sees `meta`: every event, and the spans that are not [`TRACE_ONLY`].
fn logged(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target() == TRACE_ONLY)
}

/// `layer` behind a filter of `directives`, without the [`TRACE_ONLY`] spans.
///
/// Directives of targets and levels only (`info`, `mailgate=debug,info`), the usual kind,
/// become a [`Targets`] filter; those that match spans or fields (`[delivery]=debug`) need an
/// [`EnvFilter`]. Both enable the same spans and events for the former. An `EnvFilter` looks
/// every span's entry, exit and close up in a table behind a lock, kept for span
/// directives; each email had about six spans then (RPC, handler, routing, enqueue,
/// delivery, attempt), and with a `Targets` filter mailgate used about 2 % less CPU per
/// email (docs/benchmarks.md).
fn filtered<S, L>(layer: L, directives: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S> + Send + Sync + 'static,
{
    // With no hint of its own, the pair's hint would be none at all, and with it the
    // process-wide maximum level: every `trace!` and `debug!` in the libraries would be
    // looked up instead of skipped by level.
    let without_trace_only = filter_fn(logged).with_max_level_hint(LevelFilter::TRACE);
    // `Targets` reads an empty directive (`info,`) as a bare `error`, which would override
    // the level before it; `EnvFilter` skips it.
    let static_only =
        !directives.contains(['[', '{']) && !directives.split(',').any(|d| d.trim().is_empty());
    match directives.parse::<Targets>() {
        Ok(targets) if static_only => layer.with_filter(targets.and(without_trace_only)).boxed(),
        _ => layer
            .with_filter(EnvFilter::new(directives).and(without_trace_only))
            .boxed(),
    }
}

/// Span fields as a JSON object, for the JSON log lines of events inside the span.
///
/// tracing-subscriber's own `JsonFields` parses the span's JSON back into a map and writes
/// it anew every time a field is recorded after the span starts; mailgate's RPC, delivery
/// and attempt spans record fields as they go, for every email. Here a recorded field is
/// appended to the object instead (a field recorded twice appears twice; a JSON reader keeps
/// the last).
#[derive(Debug, Clone, Copy, Default)]
struct AppendJsonFields;

/// Writes fields as `"name":value` members, comma-separated. The `otel.*` fields are left
/// out: they tell the OpenTelemetry layer how to name a span, and say nothing the `rpc.*`
/// fields beside them do not.
struct JsonMembers<'a> {
    out: &'a mut String,
    first: bool,
}

impl JsonMembers<'_> {
    /// Starts a member, `"name":`; false for a field that is left out.
    fn key(&mut self, field: &tracing::field::Field) -> bool {
        if field.name().starts_with("otel.") {
            return false;
        }
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_string(self.out, field.name());
        self.out.push(':');
        true
    }

    fn member(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Display) {
        if self.key(field) {
            let _ = write!(self.out, "{value}");
        }
    }
}

impl tracing::field::Visit for JsonMembers<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if self.key(field) {
            push_string(self.out, value);
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.member(field, &value);
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.member(field, &value);
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.member(field, &value);
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if value.is_finite() {
            self.member(field, &value);
        } else if self.key(field) {
            push_string(self.out, &value.to_string());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if self.key(field) {
            // Not `format!`, which panics if the value's formatting fails; what was written
            // before the failure is kept.
            let mut text = String::new();
            let _ = write!(text, "{value:?}");
            push_string(self.out, &text);
        }
    }
}

impl<'w> fmt::FormatFields<'w> for AppendJsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        // Room for every field of a span at once (growing the buffer field by field, and the
        // span's own copy of it at each field recorded later, was 2 % of mailgate's
        // instructions per email).
        let mut out = String::with_capacity(512);
        out.push('{');
        fields.record(&mut JsonMembers {
            out: &mut out,
            first: true,
        });
        out.push('}');
        writer.write_str(&out)
    }

    fn add_fields(
        &self,
        current: &'w mut fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let existing = current.fields.trim_end_matches('}').len();
        // The span's copy was made to measure: room for the fields recorded from here on
        // (doubled when short of it, as a `String` grows).
        current.fields.reserve(64);
        if existing == 0 {
            current.fields.clear();
            current.fields.push('{');
        } else {
            current.fields.truncate(existing);
        }
        let first = current.fields.len() == 1;
        fields.record(&mut JsonMembers {
            out: &mut current.fields,
            first,
        });
        current.fields.push('}');
        Ok(())
    }
}

/// Installs logging, and the OTLP trace and metric pipelines when an endpoint is configured.
/// Call inside the Tokio runtime.
pub fn init_with_otel(log: &LogConfig, prometheus: bool) -> anyhow::Result<Telemetry> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = resource();
    let tracer_provider = if otlp_enabled("TRACES") {
        let exporter = SpanExporter::builder().with_tonic().build()?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };
    let mut registry = None;
    let meter_provider = if otlp_enabled("METRICS") || prometheus {
        let mut builder = SdkMeterProvider::builder().with_resource(resource);
        if otlp_enabled("METRICS") {
            builder =
                builder.with_periodic_exporter(MetricExporter::builder().with_tonic().build()?);
        }
        if prometheus {
            let r = prometheus::Registry::new();
            builder = builder.with_reader(
                opentelemetry_prometheus::exporter()
                    .with_registry(r.clone())
                    .build()?,
            );
            registry = Some(r);
        }
        let provider = builder.build();
        global::set_meter_provider(provider.clone());
        Some(provider)
    } else {
        None
    };
    let otel_layer = tracer_provider.as_ref().map(|tp| {
        global::set_tracer_provider(tp.clone());
        tracing_opentelemetry::layer()
            .with_tracer(tp.tracer("mailgate"))
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target("h2", LevelFilter::OFF)
                    .with_target("tonic", LevelFilter::OFF)
                    .with_target("hyper", LevelFilter::OFF)
                    .with_target("tower", LevelFilter::OFF)
                    .with_target("sqlx", LevelFilter::OFF)
                    .with_target("opentelemetry", LevelFilter::OFF),
            )
    });
    let _ = dispatch(log, otel_layer).try_init();
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
        prometheus: registry,
    })
}

/// The log layer, and `traces` when an exporter is configured, over tracing's registry.
///
/// Without an exporter the trace layer is left out, not added as `None`: an absent layer
/// (`Option::None`) tells tracing that it wants every span, so the [`TRACE_ONLY`] spans were
/// made for nobody, five per email through SendEmail, and the log layer's filter only kept
/// them out of the lines (docs/benchmarks.md, 2026-12-07, eighth session).
fn dispatch<L>(log: &LogConfig, traces: Option<L>) -> tracing::Dispatch
where
    L: Layer<tracing_subscriber::layer::Layered<BoxedLayer, tracing_subscriber::Registry>>
        + Send
        + Sync
        + 'static,
{
    let logging = tracing_subscriber::registry().with(log_layer(log));
    match traces {
        Some(traces) => logging.with(traces).into(),
        None => logging.into(),
    }
}

/// The log layer over the registry.
type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

impl Telemetry {
    /// Flushes and stops the pipelines (blocking work, kept off the runtime's workers).
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(tp) = self.tracer_provider {
                let _ = tp.shutdown();
            }
            if let Some(mp) = self.meter_provider {
                let _ = mp.shutdown();
            }
        })
        .await;
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one RPC, a child of the caller's trace context when the request carries one.
/// Used as the server's `trace_fn`: the handler runs inside it, and the log lines of the
/// RPC carry its fields. The authentication layer records the caller's `tenant_id`;
/// SendEmail records the `message_id` it accepted, SendBatch the number of `recipients`.
pub fn grpc_server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        trace_id = tracing::field::Empty,
        tenant_id = tracing::field::Empty,
        message_id = tracing::field::Empty,
        recipients = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    let parent_trace = parent.span().span_context().trace_id();
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    // Log lines inside the RPC carry the trace id (the caller's, or the new trace's).
    let own = span.context().span().span_context().clone();
    if own.is_valid() {
        span.record("trace_id", own.trace_id().to_string());
    } else if parent_trace != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", parent_trace.to_string());
    }
    span
}

/// The current span's W3C `traceparent`, for storing with a message; None when not traced.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id of a `traceparent` ("00-<trace id>-<span id>-<flags>").
pub fn trace_id_of(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap_or_default().to_owned()
}

/// Makes a stored `traceparent` the parent of `span` (call before the span is entered).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx: Context = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written through the JSON layer while `f` runs.
    fn json_lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        filtered_lines(None, f)
    }

    /// Log lines written through the JSON layer, behind a filter of `directives` if given,
    /// while `f` runs.
    fn filtered_lines(directives: Option<&str>, f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let layer = fmt::layer()
            .json()
            .flatten_event(true)
            .fmt_fields(AppendJsonFields)
            .with_writer(move || Sink(Arc::clone(&sink)));
        let layer = match directives {
            Some(directives) => filtered(layer, directives),
            None => layer.boxed(),
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The messages of the lines that `directives` let through, of a debug and an info event
    /// of two targets, outside and inside a `delivery` span.
    fn let_through(directives: &str) -> Vec<String> {
        filtered_lines(Some(directives), || {
            let events = || {
                tracing::debug!(target: "mailgate::engine", "mailgate debug");
                tracing::info!(target: "mailgate::engine", "mailgate info");
                tracing::debug!(target: "h2::codec", "h2 debug");
                tracing::info!(target: "h2::codec", "h2 info");
            };
            events();
            tracing::info_span!("delivery").in_scope(|| {
                tracing::debug!(target: "h2::codec", "h2 debug in delivery");
            });
        })
        .iter()
        .map(|line| line["message"].as_str().unwrap_or_default().to_owned())
        .collect()
    }

    /// Target and level directives (a `Targets` filter) and span directives (an `EnvFilter`)
    /// let through what they say, and nothing else.
    #[test]
    fn log_filters_follow_their_directives() {
        assert_eq!(let_through("info"), ["mailgate info", "h2 info"]);
        assert_eq!(
            let_through("mailgate=debug,info"),
            ["mailgate debug", "mailgate info", "h2 info"]
        );
        assert_eq!(let_through("h2=off,mailgate=info"), ["mailgate info"]);
        assert_eq!(let_through("info,"), ["mailgate info", "h2 info"]);
        assert_eq!(let_through(",h2=off"), [] as [&str; 0]);
        assert_eq!(let_through("mailgate"), ["mailgate debug", "mailgate info"]);
        assert_eq!(
            let_through("info,[delivery]=debug"),
            ["mailgate info", "h2 info", "h2 debug in delivery"]
        );
    }

    /// Span fields reach the lines of events inside the span as valid JSON, whatever their
    /// characters, with fields recorded later added and the `otel.*` fields left out.
    #[test]
    fn span_fields_are_escaped_json() {
        let tricky = "quote \" backslash \\ newline \n tab \t nul \0 esc \u{1b} del \u{7f} é ✓";
        let lines = json_lines(|| {
            let span = tracing::info_span!(
                "rpc",
                otel.name = "svc/Method",
                rpc.method = %"Send\"Email",
                text = tricky,
                plain = "msg-01H/é ✓ {id}",
                only_newline = "a\nb",
                only_backslash = "a\\b",
                debug = ?vec!["a\"b"],
                count = 3u64,
                delta = -2i64,
                ok = true,
                ratio = 0.5f64,
                inf = f64::INFINITY,
                later = tracing::field::Empty,
            );
            span.record("later", "recorded \"later\"");
            span.in_scope(|| tracing::info!("inside"));
        });
        assert_eq!(lines.len(), 1);
        let span = &lines[0]["span"];
        assert_eq!(span["name"], "rpc");
        assert_eq!(span["rpc.method"], "Send\"Email");
        assert_eq!(span["text"], tricky);
        assert_eq!(span["plain"], "msg-01H/é ✓ {id}");
        assert_eq!(span["only_newline"], "a\nb");
        assert_eq!(span["only_backslash"], "a\\b");
        assert_eq!(span["debug"], "[\"a\\\"b\"]");
        assert_eq!(span["count"], 3);
        assert_eq!(span["delta"], -2);
        assert_eq!(span["ok"], true);
        assert_eq!(span["ratio"], 0.5);
        assert_eq!(span["inf"], "inf");
        assert_eq!(span["later"], "recorded \"later\"");
        assert!(span.get("otel.name").is_none(), "{span}");
    }

    /// The trace-only spans stay out of the log lines, with either kind of filter: an event
    /// inside one carries the fields of the spans around it. (Whether such a span is made at
    /// all depends on every subscriber alive when its callsite registers, other tests' too,
    /// so this test does not look.)
    #[test]
    fn trace_only_spans_are_not_logged() {
        for directives in ["info", "info,[delivery]=debug"] {
            let lines = filtered_lines(Some(directives), || {
                tracing::info_span!("delivery", message_id = "m-1").in_scope(|| {
                    tracing::info_span!(target: TRACE_ONLY, "smtp.attempt", port = 25u64)
                        .in_scope(|| tracing::info!(target: "mailgate::engine", "inside"));
                });
            });
            assert_eq!(lines.len(), 1, "{directives}: {lines:?}");
            assert_eq!(lines[0]["message"], "inside");
            assert_eq!(lines[0]["span"]["name"], "delivery", "{}", lines[0]);
            assert_eq!(lines[0]["span"]["message_id"], "m-1");
            assert_eq!(lines[0]["spans"].as_array().map(Vec::len), Some(1));
        }
    }

    /// Without a trace exporter the trace-only spans are not made at all, with it they are;
    /// the spans that the log shows are made either way.
    #[test]
    fn trace_only_spans_are_made_only_for_traces() {
        let made = |traces: Option<tracing_subscriber::layer::Identity>| {
            tracing::dispatcher::with_default(&dispatch(&LogConfig::default(), traces), || {
                let trace_only = tracing::info_span!(target: TRACE_ONLY, "made only for traces");
                let logged = tracing::info_span!("made for the log");
                (!trace_only.is_disabled(), !logged.is_disabled())
            })
        };
        assert_eq!(made(None), (false, true));
        assert_eq!(
            made(Some(tracing_subscriber::layer::Identity::new())),
            (true, true)
        );
    }

    /// A span whose only fields are left out, or that has none, still gives valid lines.
    #[test]
    fn spans_without_logged_fields() {
        let lines = json_lines(|| {
            let outer =
                tracing::info_span!("outer", otel.kind = "server", later = tracing::field::Empty);
            outer.in_scope(|| {
                tracing::info_span!("inner").in_scope(|| tracing::info!(n = 1, "inside"));
            });
            // A logged field recorded after only left-out ones: no stray comma.
            outer.record("later", 2u64);
            outer.in_scope(|| tracing::info!("after"));
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["spans"][0]["name"], "outer", "{}", lines[0]);
        assert_eq!(lines[0]["spans"][1]["name"], "inner");
        assert_eq!(lines[0]["n"], 1);
        assert_eq!(lines[1]["span"]["later"], 2, "{}", lines[1]);
        assert!(lines[1]["span"].get("otel.kind").is_none());
    }
}
