//! Metrics: OpenTelemetry instruments (exported over OTLP and, if configured, scraped in the
//! Prometheus format), and the tower layer that times every RPC.
//!
//! Instruments live in one process-wide [`Metrics`], like the OpenTelemetry meter provider
//! they come from; without a provider they record nothing.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{
    global,
    metrics::{Counter, Histogram},
    KeyValue,
};

/// Queue figures refreshed by the health loop and read by observable gauges.
#[derive(Debug, Default)]
pub struct QueueGauges {
    /// Messages due now and not being delivered.
    pub depth: AtomicU64,
    /// Age in seconds of the oldest due message.
    pub oldest_due_seconds: AtomicU64,
}

/// Every instrument mailgate records.
#[derive(Debug)]
pub struct Metrics {
    /// Delivery attempts by outcome (sent, deferred, failed), tenant, profile and fallback.
    pub attempts: Counter<u64>,
    /// Duration of delivery attempts, seconds.
    pub attempt_duration: Histogram<f64>,
    /// From an attempt's end until its result is committed, seconds: the wait for a
    /// recording permit, then for the completion's commit.
    pub record_duration: Histogram<f64>,
    /// Fallbacks to the system default service, by tenant.
    pub fallbacks: Counter<u64>,
    /// Verification results (passed, failed).
    pub verifications: Counter<u64>,
    /// RPC duration by method and gRPC status code, seconds.
    pub rpc_duration: Histogram<f64>,
    /// Messages accepted, by tenant and type.
    pub accepted: Counter<u64>,
    /// The queue figures behind the gauges.
    pub queue: Arc<QueueGauges>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The instruments (created on first use, after telemetry is initialised).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let meter = global::meter("mailgate");
        let queue = Arc::new(QueueGauges::default());
        let depth = queue.clone();
        let _ = meter
            .u64_observable_gauge("mailgate.queue.depth")
            .with_description("Messages due and waiting for a worker")
            .with_callback(move |o| o.observe(depth.depth.load(Ordering::Relaxed), &[]))
            .build();
        let age = queue.clone();
        let _ = meter
            .u64_observable_gauge("mailgate.queue.oldest_due_age")
            .with_unit("s")
            .with_description("Age of the oldest due message")
            .with_callback(move |o| o.observe(age.oldest_due_seconds.load(Ordering::Relaxed), &[]))
            .build();
        let seconds = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Metrics {
            attempts: meter
                .u64_counter("mailgate.delivery.attempts")
                .with_description("Delivery attempts by outcome")
                .build(),
            attempt_duration: meter
                .f64_histogram("mailgate.delivery.attempt.duration")
                .with_unit("s")
                .with_boundaries(seconds.clone())
                .build(),
            record_duration: meter
                .f64_histogram("mailgate.delivery.record.duration")
                .with_unit("s")
                .with_description("From an attempt's end until its result is committed")
                .with_boundaries(seconds.clone())
                .build(),
            fallbacks: meter
                .u64_counter("mailgate.delivery.fallbacks")
                .with_description("Deliveries taken over by the system default service")
                .build(),
            verifications: meter
                .u64_counter("mailgate.profile.verifications")
                .with_description("SMTP profile verifications by result")
                .build(),
            rpc_duration: meter
                .f64_histogram("mailgate.rpc.duration")
                .with_unit("s")
                .with_boundaries(seconds)
                .build(),
            accepted: meter
                .u64_counter("mailgate.messages.accepted")
                .with_description("Emails accepted into the outbox")
                .build(),
            queue,
        }
    })
}

/// A tower layer recording each RPC's duration and gRPC status code.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/').to_owned();
        // The RPC runs in its log context (here, to share this layer's boxed future).
        let context = crate::telemetry::rpc_log_context(req.uri().path(), req.headers());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(crate::telemetry::in_log_context(context, async move {
            // Polled inside the RPC's span.
            crate::telemetry::record_rpc_trace();
            let result = fut.await;
            if let Ok(response) = &result {
                // Errors come as trailers-only responses, with grpc-status in the headers;
                // success carries it in the trailers, after the body: "0".
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned();
                metrics().rpc_duration.record(
                    started.elapsed().as_secs_f64(),
                    &[
                        KeyValue::new("rpc.method", method),
                        KeyValue::new("rpc.grpc.status_code", code),
                    ],
                );
            }
            result
        }))
    }
}

/// Serves the Prometheus text format on every path of `listener`.
pub async fn serve_prometheus(
    listener: tokio::net::TcpListener,
    registry: prometheus::Registry,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::Full;
    use hyper::{body::Bytes, server::conn::http1, service::service_fn, Response};
    use hyper_util::rt::TokioIo;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = prometheus::TextEncoder::new()
                    .encode_to_string(&registry.gather())
                    .unwrap_or_default();
                async move {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
