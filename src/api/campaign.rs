//! CampaignService: named sending contexts with a bound profile and headers.

use tonic::{Request, Response, Status};

use super::{
    caller,
    convert::timestamp,
    documents::{Documents, Input, Stored},
    ApiContext,
};
use crate::{
    domain::DocumentKind,
    error::ApiError,
    proto::v1::{self as pb, campaign_service_server::CampaignService},
};

/// The CampaignService implementation.
#[derive(Debug, Clone)]
pub struct CampaignApi {
    docs: Documents,
}

impl CampaignApi {
    /// A service over the shared context.
    pub fn new(ctx: ApiContext) -> Self {
        Self {
            docs: Documents {
                ctx,
                kind: DocumentKind::Campaign,
                field: "campaign",
            },
        }
    }
}

fn input(c: pb::Campaign) -> Input {
    Input {
        id: c.id,
        name: c.name,
        profile_id: c.profile_id,
        description: c.description,
        email_type: c.email_type,
        headers: c.headers,
        from: c.from,
        reply_to: c.reply_to,
        ..Input::default()
    }
}

fn to_proto(s: &Stored) -> pb::Campaign {
    let c = &s.context;
    pb::Campaign {
        id: s.doc.id.clone(),
        name: s.doc.name.clone(),
        description: c.description.clone(),
        profile_id: s.doc.profile_id.clone().unwrap_or_default(),
        email_type: c.email_type.clone(),
        headers: c
            .headers
            .iter()
            .map(|h| pb::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        from: c.from.as_ref().map(|m| pb::Mailbox {
            email: m.email.to_string(),
            name: m.name.clone(),
        }),
        reply_to: c.reply_to.clone().unwrap_or_default(),
        create_time: Some(timestamp(s.doc.created_at)),
        update_time: Some(timestamp(s.doc.updated_at)),
        version: s.doc.version,
    }
}

#[tonic::async_trait]
impl CampaignService for CampaignApi {
    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::CreateCampaignResponse>, Status> {
        let caller = caller(&request)?;
        let c = request
            .into_inner()
            .campaign
            .ok_or_else(|| ApiError::invalid("campaign", "is required"))?;
        let stored = self.docs.create(&caller, input(c)).await?;
        Ok(Response::new(pb::CreateCampaignResponse {
            campaign: Some(to_proto(&stored)),
        }))
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::GetCampaignResponse>, Status> {
        let caller = caller(&request)?;
        let stored = self.docs.get(&caller, &request.get_ref().id).await?;
        Ok(Response::new(pb::GetCampaignResponse {
            campaign: Some(to_proto(&stored)),
        }))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let (stored, next_page_token) = self
            .docs
            .list(&caller, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListCampaignsResponse {
            campaigns: stored.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_campaign(
        &self,
        request: Request<pb::UpdateCampaignRequest>,
    ) -> Result<Response<pb::UpdateCampaignResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let c = req
            .campaign
            .ok_or_else(|| ApiError::invalid("campaign", "is required"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let stored = self.docs.update(&caller, input(c), &paths).await?;
        Ok(Response::new(pb::UpdateCampaignResponse {
            campaign: Some(to_proto(&stored)),
        }))
    }

    async fn delete_campaign(
        &self,
        request: Request<pb::DeleteCampaignRequest>,
    ) -> Result<Response<pb::DeleteCampaignResponse>, Status> {
        let caller = caller(&request)?;
        self.docs.delete(&caller, &request.get_ref().id).await?;
        Ok(Response::new(pb::DeleteCampaignResponse {}))
    }
}
