//! A short-lived cache of what routing reads on every SendEmail: the tenant's settings, the
//! profiles, templates and campaigns it names. Without it each accepted email costs two to
//! four database reads before its insert; with it, a busy tenant's emails cost none.
//!
//! Entries live for [`TTL`]. Any write RPC of the configuration services in this process
//! empties the cache once it has answered ([`InvalidateOnWriteLayer`]), so a change made
//! here is seen by the next email; a change made through another replica is seen within
//! [`TTL`]. The delivery engine checks the profile again before sending.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_trait::async_trait;

use crate::{
    domain::{Document, DocumentKind, SmtpProfile, TenantSettings},
    routing::RouteReads,
    storage::{Store, StoreError},
};

/// How long an entry serves.
pub const TTL: Duration = Duration::from_secs(1);
/// Entries kept at most; the cache starts over when full.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Tenant(String),
    Profile(String, String),
    Document(DocumentKind, String, String),
}

#[derive(Debug, Clone)]
enum Value {
    Tenant(Arc<TenantSettings>),
    Profile(Option<Arc<SmtpProfile>>),
    Document(Option<Document>),
}

/// The cache; shared by the send API and the invalidating layer.
#[derive(Debug, Default)]
pub struct ReadCache {
    generation: AtomicU64,
    entries: Mutex<HashMap<Key, (Value, u64, Instant)>>,
}

impl ReadCache {
    /// Forgets everything read before now.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn get(&self, key: &Key) -> Option<Value> {
        let generation = self.generation.load(Ordering::SeqCst);
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((value, g, at)) if *g == generation && at.elapsed() < TTL => Some(value.clone()),
            _ => None,
        }
    }

    fn put(&self, key: Key, value: Value, generation: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (value, generation, Instant::now()));
    }

    /// Routing's reads through this cache.
    pub fn over<'a>(&'a self, store: &'a dyn Store) -> Cached<'a> {
        Cached { cache: self, store }
    }
}

/// [`RouteReads`] answered from the cache, or from the store and remembered.
#[derive(Debug)]
pub struct Cached<'a> {
    cache: &'a ReadCache,
    store: &'a dyn Store,
}

impl Cached<'_> {
    /// The generation a read starts in: a write finishing meanwhile invalidates its result.
    fn start(&self) -> u64 {
        self.cache.generation.load(Ordering::SeqCst)
    }
}

fn missing_as_none<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl RouteReads for Cached<'_> {
    async fn tenant_settings(&self, tenant_id: &str) -> Result<Arc<TenantSettings>, StoreError> {
        let key = Key::Tenant(tenant_id.to_owned());
        if let Some(Value::Tenant(t)) = self.cache.get(&key) {
            return Ok(t);
        }
        let generation = self.start();
        let settings = Arc::new(self.store.get_tenant_settings(tenant_id).await?);
        self.cache
            .put(key, Value::Tenant(Arc::clone(&settings)), generation);
        Ok(settings)
    }

    async fn usable_profile(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Arc<SmtpProfile>, StoreError> {
        let key = Key::Profile(tenant_id.to_owned(), id.to_owned());
        let found = match self.cache.get(&key) {
            Some(Value::Profile(p)) => p,
            _ => {
                let generation = self.start();
                let found = missing_as_none(self.store.get_usable_profile(tenant_id, id).await)?
                    .map(Arc::new);
                self.cache
                    .put(key, Value::Profile(found.clone()), generation);
                found
            }
        };
        found.ok_or(StoreError::NotFound("smtp profile"))
    }

    async fn document(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        id: &str,
    ) -> Result<Document, StoreError> {
        let key = Key::Document(kind, tenant_id.to_owned(), id.to_owned());
        let found = match self.cache.get(&key) {
            Some(Value::Document(d)) => d,
            _ => {
                let generation = self.start();
                let found = missing_as_none(self.store.get_document(kind, tenant_id, id).await)?;
                self.cache
                    .put(key, Value::Document(found.clone()), generation);
                found
            }
        };
        found.ok_or(StoreError::NotFound(kind.noun()))
    }
}

/// Empties the cache after every write RPC of the configuration services (profiles, tenant
/// settings, templates, campaigns), once the write has answered.
#[derive(Debug, Clone)]
pub struct InvalidateOnWriteLayer {
    cache: Arc<ReadCache>,
}

impl InvalidateOnWriteLayer {
    /// A layer emptying `cache`.
    pub fn new(cache: Arc<ReadCache>) -> Self {
        Self { cache }
    }
}

impl<S> tower::Layer<S> for InvalidateOnWriteLayer {
    type Service = InvalidateOnWrite<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InvalidateOnWrite {
            inner,
            cache: self.cache.clone(),
        }
    }
}

/// The service of [`InvalidateOnWriteLayer`].
#[derive(Debug, Clone)]
pub struct InvalidateOnWrite<S> {
    inner: S,
    cache: Arc<ReadCache>,
}

/// Whether `path` may change what routing reads.
fn is_config_write(path: &str) -> bool {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    matches!(
        service,
        "mailgate.v1.SmtpConfigService"
            | "mailgate.v1.TemplateService"
            | "mailgate.v1.CampaignService"
    ) && !method.starts_with("Get")
        && !method.starts_with("List")
        && method != "RenderTemplate"
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for InvalidateOnWrite<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let write = is_config_write(req.uri().path());
        let cache = self.cache.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            if write {
                cache.invalidate();
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_writes_are_told_from_reads() {
        for write in [
            "/mailgate.v1.SmtpConfigService/UpdateSmtpProfile",
            "/mailgate.v1.SmtpConfigService/DeactivateSmtpProfile",
            "/mailgate.v1.SmtpConfigService/VerifySmtpProfile",
            "/mailgate.v1.SmtpConfigService/UpdateTenantSettings",
            "/mailgate.v1.TemplateService/DeleteEmailTemplate",
            "/mailgate.v1.CampaignService/CreateCampaign",
        ] {
            assert!(is_config_write(write), "{write}");
        }
        for read in [
            "/mailgate.v1.SmtpConfigService/GetSmtpProfile",
            "/mailgate.v1.SmtpConfigService/ListProviderPresets",
            "/mailgate.v1.TemplateService/RenderTemplate",
            "/mailgate.v1.SendService/SendEmail",
        ] {
            assert!(!is_config_write(read), "{read}");
        }
    }
}
