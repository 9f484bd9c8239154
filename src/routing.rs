//! Routing: which profile sends an email, and what its template and campaign contribute.
//!
//! Order: the profile named in the request > the campaign's > the template's > the tenant's
//! default > the operator's system default service. A named profile that is inactive or not
//! usable by the tenant is an error; a bound or default one that is not usable is skipped.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    domain::{
        Document, DocumentKind, Mailbox, ProfileReason, ProfileStatus, SendingContext, SmtpProfile,
        TenantSettings,
    },
    storage::{Store, StoreError},
};

/// What routing reads: straight from the store, or through the API's short-lived cache.
/// Settings and profiles come shared: a cached one is handed out without a copy of its
/// strings (copying them was 4 % of mailgate's instructions per email).
#[async_trait]
pub trait RouteReads: Send + Sync {
    /// The tenant's settings.
    async fn tenant_settings(&self, tenant_id: &str) -> Result<Arc<TenantSettings>, StoreError>;
    /// A profile the tenant may send through (its own or shared with it).
    async fn usable_profile(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Arc<SmtpProfile>, StoreError>;
    /// A template or campaign of the tenant.
    async fn document(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        id: &str,
    ) -> Result<Document, StoreError>;
}

#[async_trait]
impl RouteReads for dyn Store {
    async fn tenant_settings(&self, tenant_id: &str) -> Result<Arc<TenantSettings>, StoreError> {
        self.get_tenant_settings(tenant_id).await.map(Arc::new)
    }
    async fn usable_profile(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Arc<SmtpProfile>, StoreError> {
        self.get_usable_profile(tenant_id, id).await.map(Arc::new)
    }
    async fn document(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        id: &str,
    ) -> Result<Document, StoreError> {
        self.get_document(kind, tenant_id, id).await
    }
}

/// Why an email cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The named profile, template or campaign does not exist for this tenant.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The named profile exists but is INACTIVE.
    #[error("profile {0} is INACTIVE: verify and activate it first")]
    Inactive(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A template or campaign as routing sees it.
#[derive(Debug, Clone)]
pub struct Context {
    /// Its id.
    pub id: String,
    /// What it contributes.
    pub context: SendingContext,
}

/// The routing decision for a request.
#[derive(Debug, Clone)]
pub struct Route {
    /// The profile that sends; None: the system default service.
    pub profile: Option<Arc<SmtpProfile>>,
    /// Why.
    pub reason: ProfileReason,
    /// The sender of the system default service for this tenant.
    pub system_from: Mailbox,
    /// The tenant's public gateway URL (for templates).
    pub gateway_url: String,
    /// The template, if the request names one.
    pub template: Option<Context>,
    /// The campaign, if the request names one.
    pub campaign: Option<Context>,
}

async fn load(
    store: &dyn RouteReads,
    kind: DocumentKind,
    tenant_id: &str,
    id: &str,
) -> Result<Option<(Context, Option<String>)>, RoutingError> {
    if id.is_empty() {
        return Ok(None);
    }
    let doc = match store.document(kind, tenant_id, id).await {
        Ok(doc) => doc,
        Err(StoreError::NotFound(what)) => return Err(RoutingError::NotFound(what)),
        Err(e) => return Err(e.into()),
    };
    let context: SendingContext =
        serde_json::from_str(&doc.body).map_err(|e| StoreError::Other(anyhow::Error::new(e)))?;
    Ok(Some((
        Context {
            id: doc.id,
            context,
        },
        doc.profile_id,
    )))
}

/// A bound profile, if it is usable: active and owned by or shared with the tenant.
async fn usable(
    store: &dyn RouteReads,
    tenant_id: &str,
    id: Option<&str>,
) -> Option<Arc<SmtpProfile>> {
    let id = id?;
    store
        .usable_profile(tenant_id, id)
        .await
        .ok()
        .filter(|p| p.status == ProfileStatus::Active)
}

/// Routes a request of `tenant_id` naming (maybe empty) a profile, campaign and template.
#[tracing::instrument(target = "mailgate::trace", name = "routing", skip_all, fields(tenant_id, profile_id = tracing::field::Empty, reason = tracing::field::Empty))]
pub async fn route(
    store: &dyn RouteReads,
    operator_sender: &Mailbox,
    tenant_id: &str,
    profile_id: &str,
    campaign_id: &str,
    template_id: &str,
) -> Result<Route, RoutingError> {
    let tenant = store.tenant_settings(tenant_id).await?;
    let campaign = load(store, DocumentKind::Campaign, tenant_id, campaign_id).await?;
    let template = load(store, DocumentKind::Template, tenant_id, template_id).await?;
    let (profile, reason) = if !profile_id.is_empty() {
        let profile = match store.usable_profile(tenant_id, profile_id).await {
            Ok(p) => p,
            Err(StoreError::NotFound(what)) => return Err(RoutingError::NotFound(what)),
            Err(e) => return Err(e.into()),
        };
        if profile.status != ProfileStatus::Active {
            return Err(RoutingError::Inactive(profile.name.clone()));
        }
        (Some(profile), ProfileReason::Request)
    } else if let Some(p) = usable(
        store,
        tenant_id,
        campaign.as_ref().and_then(|c| c.1.as_deref()),
    )
    .await
    {
        (Some(p), ProfileReason::Campaign)
    } else if let Some(p) = usable(
        store,
        tenant_id,
        template.as_ref().and_then(|t| t.1.as_deref()),
    )
    .await
    {
        (Some(p), ProfileReason::Template)
    } else if let Some(p) = usable(store, tenant_id, tenant.default_profile_id.as_deref()).await {
        (Some(p), ProfileReason::TenantDefault)
    } else {
        (None, ProfileReason::SystemDefault)
    };
    let span = tracing::Span::current();
    span.record("reason", reason.as_str());
    if let Some(p) = &profile {
        span.record("profile_id", p.id.as_str());
    }
    Ok(Route {
        profile,
        reason,
        system_from: tenant
            .default_from
            .clone()
            .unwrap_or_else(|| operator_sender.clone()),
        gateway_url: tenant.gateway_url.clone(),
        template: template.map(|t| t.0),
        campaign: campaign.map(|c| c.0),
    })
}
