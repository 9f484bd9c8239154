//! Services whose RPCs are not built yet: every call answers UNIMPLEMENTED (the generated
//! default methods).

use crate::proto::v1::{
    campaign_service_server::CampaignService, template_service_server::TemplateService,
};

/// TemplateService: templates arrive with the delivery engine's routing work.
#[derive(Debug, Default)]
pub struct TemplateApi;

#[tonic::async_trait]
impl TemplateService for TemplateApi {}

/// CampaignService: campaigns arrive with the delivery engine's routing work.
#[derive(Debug, Default)]
pub struct CampaignApi;

#[tonic::async_trait]
impl CampaignService for CampaignApi {}
