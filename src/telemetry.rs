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
    filter::{FilterExt, LevelFilter, Targets},
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
        .with(log_layer(log.format, &log_directives(log)))
        .try_init();
}

/// The log layer: lines in `format`, filtered by `directives`.
fn log_layer<S>(format: LogFormat, directives: &str) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let context_spans = show_context_spans(directives);
    let context = !context_spans;
    match format {
        LogFormat::Json => filtered(
            fmt::layer()
                .json()
                .flatten_event(true)
                .fmt_fields(AppendJsonFields)
                .event_format(json_format(context))
                .with_writer(std::io::stderr),
            directives,
            context_spans,
        ),
        LogFormat::Pretty => filtered(
            fmt::layer()
                .event_format(WithLogContext {
                    inner: fmt::format(),
                    json: false,
                    context,
                })
                .with_writer(std::io::stderr),
            directives,
            context_spans,
        ),
    }
}

/// The JSON lines' format, with the log context when `context`.
fn json_format(context: bool) -> WithLogContext<fmt::format::Format<fmt::format::Json>> {
    WithLogContext {
        inner: fmt::format().json().flatten_event(true),
        json: true,
        context,
    }
}

/// Whether the log filter's directives match spans (`[delivery]=debug`).
fn span_directives(directives: &str) -> bool {
    directives.contains(['[', '{'])
}

/// Directives of targets and levels only, each trimmed, without empty ones (`Targets` reads
/// an empty directive, `info,`, as a bare `error`, and `" sqlx"` as a target with a space);
/// None for span directives.
fn static_directives(directives: &str) -> Option<String> {
    if span_directives(directives) {
        return None;
    }
    let parts: Vec<&str> = directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    Some(parts.join(","))
}

/// Whether the log shows the RPC and delivery spans themselves ([`CONTEXT_SPANS`]), and not
/// their [`LogContext`]: for span directives, which need the spans, and when a library logs
/// at the debug level or finer, as libraries log from threads of their own (sqlx's SQLite
/// driver runs statements on a thread of its own, and carries the caller's span there, not
/// its task's context). Their lines then name the RPC or delivery as before, at the spans'
/// cost. Otherwise (`info`, the default, or `info,mailgate=debug`) the lines that such a
/// thread writes (sqlx's slow-statement warnings on SQLite) do not name it.
fn context_spans_logged(directives: &str) -> bool {
    let Some(Ok(targets)) = static_directives(directives).map(|d| d.parse::<Targets>()) else {
        return true;
    };
    let ours = |target: &str| target == "mailgate" || target.starts_with("mailgate::");
    targets
        .default_level()
        .is_some_and(|level| level >= LevelFilter::DEBUG)
        || targets
            .iter()
            .any(|(target, level)| level >= LevelFilter::DEBUG && !ours(target))
}

/// [`context_spans_logged`] for a log layer being made: when it shows the spans, [`record`]
/// records into them too.
fn show_context_spans(directives: &str) -> bool {
    let shown = context_spans_logged(directives);
    if shown {
        LOG_SPANS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    shown
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
/// events of a request or a delivery happen in its RPC or its delivery, whose fields
/// (method, tenant, message, trace) the lines carry (see [`LogContext`]). Kept from the log
/// layer, these spans are not made at all when no trace exporter is configured. Making them, recording
/// their fields and entering them at every poll, with a span per RPC handler besides (since
/// gone), was 3.6 % of mailgate's instructions per email
/// through SendEmail on SQLite and 4.7 % on PostgreSQL (docs/benchmarks.md). Use it as
/// `target: TRACE_ONLY`, or as the same string in `#[instrument(target = ...)]`.
pub(crate) const TRACE_ONLY: &str = "mailgate::trace";

/// The target of the spans of an RPC (`grpc.request`) and of a delivery (`delivery`).
///
/// Their log lines name them from the task's [`LogContext`], not from these spans: the log
/// layer sees them only when [`context_spans_logged`] (span directives, or a library at
/// debug), and without that, or a trace exporter, they are not made at all. Made for the log, the two spans (registered,
/// their fields formatted and recorded, entered at every poll) were about 7 % of mailgate's
/// instructions per email through SendEmail (docs/benchmarks.md, 2026-12-07, eighth
/// session).
pub(crate) const CONTEXT_SPANS: &str = "mailgate::context";

/// The log layer's filter of spans: it sees every event, and the spans that are neither
/// [`TRACE_ONLY`] nor, unless `context_spans`, [`CONTEXT_SPANS`]: decided by the callsite
/// (its kind and target).
#[derive(Debug, Clone, Copy)]
struct Shown {
    context_spans: bool,
}

impl Shown {
    fn shows(self, meta: &tracing::Metadata<'_>) -> bool {
        !meta.is_span()
            || match meta.target() {
                TRACE_ONLY => false,
                CONTEXT_SPANS => self.context_spans,
                _ => true,
            }
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Shown {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.shows(meta)
    }

    // `never` for the spans it keeps out: with per-layer filters, a span whose callsite
    // some filter finds interesting is made (then skipped by the layers that do not want
    // it), so only `never` keeps it from being made. `sometimes` for the rest, so that
    // `enabled` is asked every time: with `always` (paired with the directives' filter) a
    // callsite that the directives let through skipped `enabled` in a process with one
    // subscriber, and the layer's per-event filter state was then the last one asked's:
    // lines went missing (seen on a server's log, not in tests, whose subscribers are
    // scoped).
    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.shows(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    // With no hint of its own, the pair's hint would be none at all, and with it the
    // process-wide maximum level: every `trace!` and `debug!` in the libraries would be
    // looked up instead of skipped by level.
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }
}

/// `layer` behind a filter of `directives`, without the [`TRACE_ONLY`] spans (nor the
/// [`CONTEXT_SPANS`] unless `context_spans`, which [`context_spans_logged`] decides).
///
/// Directives of targets and levels only (`info`, `mailgate=debug,info`), the usual kind,
/// become a [`Targets`] filter; those that match spans or fields (`[delivery]=debug`) need an
/// [`EnvFilter`]. Both enable the same spans and events for the former. An `EnvFilter` looks
/// every span's entry, exit and close up in a table behind a lock, kept for span
/// directives; each email had about six spans then (RPC, handler, routing, enqueue,
/// delivery, attempt), and with a `Targets` filter mailgate used about 2 % less CPU per
/// email (docs/benchmarks.md).
fn filtered<S, L>(
    layer: L,
    directives: &str,
    context_spans: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: Layer<S> + Send + Sync + 'static,
{
    let without_trace_only = Shown { context_spans };
    match static_directives(directives).map(|d| d.parse::<Targets>()) {
        Some(Ok(targets)) => layer.with_filter(targets.and(without_trace_only)).boxed(),
        _ => layer
            .with_filter(EnvFilter::new(directives).and(without_trace_only))
            .boxed(),
    }
}

/// What the log lines of one RPC or one delivery say about it: a name (`grpc.request`,
/// `delivery`) and fields (method, tenant, message, trace, ...), kept by the task that
/// serves it (see [`in_log_context`]) and shown in every line written while it runs, as
/// the outermost span of the line: in JSON lines the `span` object (unless a span of
/// tracing's is open within it) and the first of the `spans`; in human-readable lines after
/// the fields, `name{field=value ...}`.
///
/// The RPC's and the delivery's spans ([`CONTEXT_SPANS`]) carry the same fields for traces.
/// Naming the lines from a span made every RPC and delivery register it with the log layer,
/// format its fields, and enter and leave it at every poll, whether or not a line was ever
/// written; the context costs a few copied strings, and the formatting only when a line is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogContext {
    name: &'static str,
    fields: Vec<(&'static str, LogValue)>,
}

/// A [`LogContext`] field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum LogValue {
    /// A text, shown as a JSON string (escaped) or as it is in human-readable lines.
    Text(String),
    /// A count or a number, shown as a JSON number.
    Number(u64),
}

impl From<&str> for LogValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<u64> for LogValue {
    fn from(v: u64) -> Self {
        Self::Number(v)
    }
}

impl LogContext {
    /// A context named `name`, without fields yet.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            fields: Vec::with_capacity(6),
        }
    }

    /// With `field` set to `value`.
    pub fn with(mut self, field: &'static str, value: impl Into<LogValue>) -> Self {
        self.set(field, value.into());
        self
    }

    /// Sets `field` (in place if it is already there: fields keep their first order).
    fn set(&mut self, field: &'static str, value: LogValue) {
        match self.fields.iter_mut().find(|(name, _)| *name == field) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((field, value)),
        }
    }

    /// The context as a JSON object, as tracing's JSON lines show a span.
    fn json(&self, out: &mut String) {
        out.push('{');
        for (name, value) in &self.fields {
            push_string(out, name);
            out.push(':');
            match value {
                LogValue::Text(text) => push_string(out, text),
                LogValue::Number(n) => {
                    let _ = write!(out, "{n}");
                }
            }
            out.push(',');
        }
        out.push_str("\"name\":");
        push_string(out, self.name);
        out.push('}');
    }

    /// The context as human-readable lines show a span: `name{field=value ...}`.
    fn pretty(&self, out: &mut String) {
        out.push_str(self.name);
        out.push('{');
        for (i, (name, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let _ = match value {
                LogValue::Text(text) => write!(out, "{name}={text}"),
                LogValue::Number(n) => write!(out, "{name}={n}"),
            };
        }
        out.push('}');
    }
}

tokio::task_local! {
    static LOG_CONTEXT: std::cell::RefCell<LogContext>;
}

/// Runs `f` in `context`: the lines logged while it is polled carry the context.
pub fn in_log_context<F: std::future::Future>(
    context: LogContext,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    LOG_CONTEXT.scope(std::cell::RefCell::new(context), f)
}

/// Runs `f` in a copy of the current task's log context, if it has one (else in an empty
/// one, which lines do not show): for a task spawned on the current one's behalf.
pub fn carry_log_context<F: std::future::Future>(
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    let context = LOG_CONTEXT
        .try_with(|c| c.borrow().clone())
        .unwrap_or_default();
    in_log_context(context, f)
}

/// Whether a trace exporter is configured (the RPC and delivery spans are then made).
static TRACES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn traced() -> bool {
    TRACES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a log layer shows the RPC and delivery spans (see [`context_spans_logged`]).
static LOG_SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the RPC and delivery spans are made, for traces or for the log.
fn spans_made() -> bool {
    traced() || LOG_SPANS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records a field (a text or a number) of the current RPC or delivery: in its log context,
/// and in its span when the span is made (for traces, or for the log).
pub fn record<V>(field: &'static str, value: V)
where
    V: Into<LogValue> + tracing::Value + Copy,
{
    if spans_made() {
        tracing::Span::current().record(field, value);
    }
    let _ = LOG_CONTEXT.try_with(|c| c.borrow_mut().set(field, value.into()));
}

/// The log context of an RPC to `path` (`/mailgate.v1.SendService/SendEmail`): its service,
/// its method, and the trace id of the caller's `traceparent`, if it sent one. Run the RPC
/// in it with [`in_log_context`], and call [`record_rpc_trace`] inside.
pub fn rpc_log_context(path: &str, headers: &http::HeaderMap) -> LogContext {
    let (service, method) = rpc_names(path);
    let mut context = LogContext::new("grpc.request")
        .with("rpc.service", service)
        .with("rpc.method", method);
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let trace = parent.span().span_context().trace_id();
        if trace != opentelemetry::trace::TraceId::INVALID {
            context.set("trace_id", trace.to_string().as_str().into());
        }
    }
    context
}

/// The service and the method of an RPC to `path` (`/mailgate.v1.SendService/SendEmail`).
fn rpc_names(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""))
}

/// Records the RPC's trace id, when its span is made: the span's own (the caller's trace,
/// or a new one, when traces are exported) in the span and the log context, else the
/// caller's (in the context since [`rpc_log_context`]) in the span. Call it inside the RPC's
/// span.
pub fn record_rpc_trace() {
    if !spans_made() {
        return;
    }
    let own = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id();
    if own != opentelemetry::trace::TraceId::INVALID {
        record("trace_id", own.to_string().as_str());
        return;
    }
    let _ = LOG_CONTEXT.try_with(|c| {
        if let Some((_, LogValue::Text(caller))) = c
            .borrow()
            .fields
            .iter()
            .find(|(name, _)| *name == "trace_id")
        {
            tracing::Span::current().record("trace_id", caller.as_str());
        }
    });
}

/// A log line's format (`inner`) with the task's [`LogContext`] added, when `context` (the
/// log layer does not show the RPC and delivery spans themselves).
struct WithLogContext<F> {
    inner: F,
    json: bool,
    context: bool,
}

impl<S, N, F> fmt::FormatEvent<S, N> for WithLogContext<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> fmt::FormatFields<'w> + 'static,
    F: fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut writer: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut shown = String::new();
        let found = self.context
            && LOG_CONTEXT
                .try_with(|c| {
                    let c = c.borrow();
                    if c.name.is_empty() {
                        return false;
                    }
                    if self.json {
                        c.json(&mut shown);
                    } else {
                        c.pretty(&mut shown);
                    }
                    true
                })
                .unwrap_or(false);
        if !found {
            return self.inner.format_event(ctx, writer, event);
        }
        // The line as the inner format writes it (without colours: the context is added in
        // the middle), then the context.
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, fmt::format::Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        if !self.json {
            return writeln!(writer, "{line} {shown}");
        }
        // tracing's JSON line ends with the open spans, outermost first, when there are any.
        const SPANS: &str = ",\"spans\":[";
        match line.rfind(SPANS) {
            Some(at) => {
                let (head, rest) = line.split_at(at + SPANS.len());
                let comma = if rest.starts_with(']') { "" } else { "," };
                writeln!(writer, "{head}{shown}{comma}{rest}")
            }
            None => {
                let head = line.strip_suffix('}').unwrap_or(line);
                writeln!(writer, "{head},\"span\":{shown},\"spans\":[{shown}]}}")
            }
        }
    }
}

/// Span fields as a JSON object, for the JSON log lines of events inside the span.
///
/// tracing-subscriber's own `JsonFields` parses the span's JSON back into a map and writes
/// it anew every time a field is recorded after the span starts; mailgate's RPC and
/// delivery spans, when the log shows them, record fields as they go. Here a recorded field is
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
    TRACES.store(
        tracer_provider.is_some(),
        std::sync::atomic::Ordering::Relaxed,
    );
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
    let _ = dispatch(log.format, &log_directives(log), otel_layer).try_init();
    Ok(Telemetry {
        tracer_provider,
        meter_provider,
        prometheus: registry,
    })
}

/// The log layer (lines in `format`, filtered by `directives`), and `traces` when an exporter
/// is configured, over tracing's registry.
///
/// Without an exporter the trace layer is left out, not added as `None`: an absent layer
/// (`Option::None`) tells tracing that it wants every span, so the [`TRACE_ONLY`] spans were
/// made for nobody, five per email through SendEmail, and the log layer's filter only kept
/// them out of the lines (docs/benchmarks.md, 2026-12-07, eighth session).
fn dispatch<L>(format: LogFormat, directives: &str, traces: Option<L>) -> tracing::Dispatch
where
    L: Layer<tracing_subscriber::layer::Layered<BoxedLayer, tracing_subscriber::Registry>>
        + Send
        + Sync
        + 'static,
{
    let logging = tracing_subscriber::registry().with(log_layer(format, directives));
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
/// Used as the server's `trace_fn`: the handler runs inside it. Made for traces, and for the
/// log only when [`context_spans_logged`] (see [`CONTEXT_SPANS`]); otherwise the log lines
/// of the RPC carry its [`rpc_log_context`]. The authentication layer records the caller's `tenant_id`;
/// SendEmail records the `message_id` it accepted, SendBatch the number of `recipients`
/// ([`record`]).
pub fn grpc_server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let (service, method) = rpc_names(path);
    let span = tracing::info_span!(
        target: CONTEXT_SPANS,
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
    if span.is_disabled() {
        return span;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    // Its `trace_id` field (for the lines that show the span) is recorded inside it, with the
    // log context's ([`record_rpc_trace`]).
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

    use tracing_subscriber::layer::Identity;

    use super::*;

    /// Log lines written through the JSON layer while `f` runs.
    fn json_lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        filtered_lines(None, f)
    }

    /// Log lines written through the JSON layer, behind a filter of `directives` if given,
    /// while `f` runs.
    fn filtered_lines(directives: Option<&str>, f: impl FnOnce()) -> Vec<serde_json::Value> {
        let _one = one_subscriber();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let context = directives.is_none_or(|d| !show_context_spans(d));
        let layer = fmt::layer()
            .json()
            .flatten_event(true)
            .fmt_fields(AppendJsonFields)
            .event_format(json_format(context))
            .with_writer(move || Sink(Arc::clone(&sink)));
        let layer = match directives {
            Some(directives) => filtered(layer, directives, !context),
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

    /// Held by every test that installs a subscriber: which callsites tracing asks a
    /// subscriber about, and how, depends on every subscriber alive at the time.
    static SUBSCRIBERS: Mutex<()> = Mutex::new(());

    fn one_subscriber() -> std::sync::MutexGuard<'static, ()> {
        SUBSCRIBERS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Without a trace exporter the trace-only spans are not made at all, with it they are;
    /// the spans that the log shows are made either way.
    #[test]
    fn trace_only_spans_are_made_only_for_traces() {
        let _one = one_subscriber();
        let made = |traces: Option<Identity>| {
            tracing::dispatcher::with_default(&dispatch(LogFormat::Json, "info", traces), || {
                let trace_only = tracing::info_span!(target: TRACE_ONLY, "made only for traces");
                let logged = tracing::info_span!("made for the log");
                (!trace_only.is_disabled(), !logged.is_disabled())
            })
        };
        assert_eq!(made(None), (false, true));
        assert_eq!(made(Some(Identity::new())), (true, true));
    }

    /// `f` run to its end on a runtime of its own.
    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// An RPC's context, as the server makes one.
    fn rpc_context() -> LogContext {
        rpc_log_context(
            "/mailgate.v1.SendService/SendEmail",
            &http::HeaderMap::new(),
        )
    }

    /// A line written in a log context carries it as its span, with the fields recorded
    /// after it started, escaped; a line outside carries none.
    #[test]
    fn lines_carry_their_log_context() {
        let tricky = "acme \" \\ \n ✓";
        let lines = json_lines(|| {
            block_on(in_log_context(rpc_context(), async {
                record("tenant_id", tricky);
                record("recipients", 3);
                record("tenant_id", "acme");
                tracing::warn!(code = 7, "inside");
            }));
            tracing::warn!("outside");
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let span = &lines[0]["span"];
        assert_eq!(span["name"], "grpc.request", "{}", lines[0]);
        assert_eq!(span["rpc.service"], "mailgate.v1.SendService");
        assert_eq!(span["rpc.method"], "SendEmail");
        assert_eq!(span["tenant_id"], "acme", "recorded again, replaced");
        assert_eq!(span["recipients"], 3);
        assert_eq!(lines[0]["spans"], serde_json::json!([span]));
        assert_eq!(lines[0]["code"], 7);
        assert_eq!(lines[0]["message"], "inside");
        assert!(lines[1].get("span").is_none(), "{}", lines[1]);
        let lines = json_lines(|| {
            block_on(in_log_context(
                LogContext::new("delivery").with("message_id", tricky),
                async { tracing::warn!("inside") },
            ));
        });
        assert_eq!(lines[0]["span"]["message_id"], tricky);
    }

    /// Inside a span that the log shows, the context is the outermost of the line's spans.
    #[test]
    fn the_log_context_is_the_outermost_span() {
        let lines = json_lines(|| {
            block_on(in_log_context(rpc_context(), async {
                tracing::info_span!("inner", n = 1u64).in_scope(|| tracing::warn!("inside"));
            }));
        });
        assert_eq!(lines[0]["span"]["name"], "inner", "{}", lines[0]);
        assert_eq!(lines[0]["spans"][0]["name"], "grpc.request");
        assert_eq!(lines[0]["spans"][1]["name"], "inner");
        assert_eq!(lines[0]["spans"].as_array().map(Vec::len), Some(2));
    }

    /// A task spawned with the context carried logs in it.
    #[test]
    fn a_carried_log_context_reaches_a_spawned_task() {
        let lines = json_lines(|| {
            block_on(in_log_context(rpc_context(), async {
                tokio::spawn(carry_log_context(async { tracing::warn!("carried") }))
                    .await
                    .unwrap();
                tokio::spawn(async { tracing::warn!("not carried") })
                    .await
                    .unwrap();
            }));
        });
        assert_eq!(lines[0]["span"]["rpc.method"], "SendEmail", "{}", lines[0]);
        assert!(lines[1].get("span").is_none(), "{}", lines[1]);
        // Carried from outside any context: nothing to show.
        let lines = json_lines(|| {
            block_on(async {
                tokio::spawn(carry_log_context(async { tracing::warn!("from nowhere") }))
                    .await
                    .unwrap();
            });
        });
        assert!(lines[0].get("span").is_none(), "{}", lines[0]);
    }

    /// Human-readable lines end with the context, as a span is shown.
    #[test]
    fn pretty_lines_carry_their_log_context() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let layer = fmt::layer()
            .event_format(WithLogContext {
                inner: fmt::format(),
                json: false,
                context: true,
            })
            .with_writer(move || Sink(Arc::clone(&sink)));
        let subscriber = tracing_subscriber::registry().with(layer);
        let _one = one_subscriber();
        tracing::subscriber::with_default(subscriber, || {
            block_on(in_log_context(rpc_context(), async {
                record("tenant_id", "acme");
                tracing::warn!("inside");
            }));
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(
            text.ends_with(
                "inside grpc.request{rpc.service=mailgate.v1.SendService rpc.method=SendEmail tenant_id=acme}\n"
            ),
            "{text}"
        );
    }

    /// With span directives, or at the debug level, the log shows the RPC and delivery
    /// spans themselves, and no context beside them; otherwise those spans are not made (no
    /// trace exporter here).
    #[test]
    fn span_directives_show_the_context_spans_instead() {
        let lines = filtered_lines(Some("info,[delivery]=debug"), || {
            block_on(in_log_context(LogContext::new("delivery"), async {
                tracing::info_span!(target: CONTEXT_SPANS, "delivery", message_id = "m-1")
                    .in_scope(|| tracing::debug!(target: "h2::codec", "debug in delivery"));
            }));
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["span"]["message_id"], "m-1", "{}", lines[0]);
        assert_eq!(lines[0]["spans"].as_array().map(Vec::len), Some(1));
        // What the RPC or delivery records reaches the span the log shows.
        let lines = filtered_lines(Some("info,[delivery]=debug"), || {
            block_on(in_log_context(LogContext::new("delivery"), async {
                let span = tracing::info_span!(
                    target: CONTEXT_SPANS,
                    "delivery",
                    mailgate.status = tracing::field::Empty
                );
                span.in_scope(|| {
                    record("mailgate.status", "SENT");
                    tracing::info!("finished");
                });
            }));
        });
        assert_eq!(lines[0]["span"]["mailgate.status"], "SENT", "{}", lines[0]);
        // Without an exporter, the caller's trace id reaches the RPC's span the log shows.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let lines = filtered_lines(Some("info,[grpc.request]=debug"), || {
            let context = rpc_log_context("/mailgate.v1.SendService/SendEmail", &headers);
            block_on(in_log_context(context, async {
                let span = tracing::info_span!(
                    target: CONTEXT_SPANS,
                    "grpc.request",
                    trace_id = tracing::field::Empty
                );
                span.in_scope(|| {
                    record_rpc_trace();
                    tracing::info!("handled");
                });
            }));
        });
        assert_eq!(
            lines[0]["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "{}",
            lines[0]
        );
        let _one = one_subscriber();
        let made = |directives: &str| {
            let dispatch = dispatch(LogFormat::Json, directives, None::<Identity>);
            tracing::dispatcher::with_default(&dispatch, || {
                !tracing::info_span!(target: CONTEXT_SPANS, "delivery").is_disabled()
            })
        };
        assert!(!made("info"));
        assert!(!made("warn,mailgate=info"));
        assert!(!made("info,mailgate=debug"));
        assert!(!made("mailgate::delivery=trace,warn,"));
        assert!(!made(" info , mailgate=debug "));
        assert!(made("info,[delivery]=debug"));
        assert!(made("debug"));
        assert!(made("info,sqlx=debug"));
        assert!(made("info, sqlx=debug"));
        assert!(made("trace"));
    }

    /// Every event the directives let through is written, whatever the spans and events
    /// the filter kept out just before it on the same thread (with this scoped subscriber;
    /// the server's own, the process's only one, is checked by the tests that read its log).
    #[test]
    fn events_pass_beside_spans_kept_out() {
        for directives in ["info,mailgate=debug", "info", "info,[delivery]=debug"] {
            let lines = filtered_lines(Some(directives), || {
                for _ in 0..2 {
                    let _ = tracing::info_span!(target: TRACE_ONLY, "kept out").entered();
                    let _ = tracing::info_span!(target: CONTEXT_SPANS, "delivery").entered();
                    tracing::debug!(target: "h2::codec", "kept out by level");
                    tracing::warn!(target: "mailgate::app", "warned");
                    tracing::info!(target: "mailgate::delivery::engine", "told");
                }
            });
            let messages: Vec<&str> = lines
                .iter()
                .map(|l| l["message"].as_str().unwrap_or_default())
                .collect();
            assert_eq!(
                messages,
                ["warned", "told", "warned", "told"],
                "{directives}"
            );
        }
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
