//! The tower layer that runs [`Authenticator::authorize`] before every RPC.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use super::Authenticator;

/// Authenticates and authorizes each request; refused requests never reach a handler.
/// Also answers an oversized request with RESOURCE_EXHAUSTED (tonic's decoder says
/// OUT_OF_RANGE).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    max_request_bytes: usize,
}

impl AuthLayer {
    /// A layer deciding with `auth`; `max_request_bytes` is the decoders' limit.
    pub fn new(auth: Arc<Authenticator>, max_request_bytes: usize) -> Self {
        Self {
            auth,
            max_request_bytes,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    max_request_bytes: usize,
}

/// tonic refuses a request over the decoding limit with OUT_OF_RANGE in a trailers-only
/// response; the API promises RESOURCE_EXHAUSTED for request size.
fn too_large_is_resource_exhausted<R>(response: &mut http::Response<R>, max: usize) {
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        if let Ok(message) = http::HeaderValue::from_str(&format!(
            "request%20too%20large:%20the%20limit%20is%20{max}%20bytes%20(limits.max_request_bytes)"
        )) {
            headers.insert("grpc-message", message);
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if self.auth.is_public(path) {
            return Box::pin(self.inner.call(req));
        }
        match self.auth.authorize(path, req.headers()) {
            Ok(caller) => {
                let tenant_id = caller.tenant_id.clone();
                req.extensions_mut().insert(caller);
                let max = self.max_request_bytes;
                let fut = self.inner.call(req);
                Box::pin(async move {
                    // Polled inside the RPC's span and log context (`call` is not): the
                    // handler's log lines, and the RPC's trace span, name the tenant.
                    crate::telemetry::record("tenant_id", tenant_id.as_str());
                    let mut response = fut.await?;
                    too_large_is_resource_exhausted(&mut response, max);
                    Ok(response)
                })
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), path, "request refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
