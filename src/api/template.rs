//! TemplateService: email templates and their preview.

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
    proto::v1::{self as pb, template_service_server::TemplateService},
    templating::{self, Sources},
};

/// The TemplateService implementation.
#[derive(Debug, Clone)]
pub struct TemplateApi {
    docs: Documents,
}

impl TemplateApi {
    /// A service over the shared context.
    pub fn new(ctx: ApiContext) -> Self {
        Self {
            docs: Documents {
                ctx,
                kind: DocumentKind::Template,
                field: "template",
            },
        }
    }
}

fn input(t: pb::EmailTemplate) -> Input {
    Input {
        id: t.id,
        name: t.name,
        profile_id: t.profile_id,
        description: t.description,
        email_type: t.email_type,
        headers: t.headers,
        from: t.from,
        reply_to: t.reply_to,
        subject: t.subject,
        text_body: t.text_body,
        html_body: t.html_body,
    }
}

pub(crate) fn to_proto(s: &Stored) -> pb::EmailTemplate {
    let c = &s.context;
    pb::EmailTemplate {
        id: s.doc.id.clone(),
        name: s.doc.name.clone(),
        description: c.description.clone(),
        subject: c.subject.clone(),
        text_body: c.text_body.clone(),
        html_body: c.html_body.clone(),
        email_type: c.email_type.clone(),
        profile_id: s.doc.profile_id.clone().unwrap_or_default(),
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

/// Proto variables (a Struct) as a JSON object.
pub(crate) fn variables_json(variables: Option<prost_types::Struct>) -> serde_json::Value {
    fn value(v: prost_types::Value) -> serde_json::Value {
        use prost_types::value::Kind;
        match v.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
                .map(|num| {
                    // Whole numbers render as integers ("42", not "42.0").
                    if n.fract() == 0.0 && n.abs() < 9.0e15 {
                        serde_json::Value::from(n as i64)
                    } else {
                        serde_json::Value::Number(num)
                    }
                })
                .unwrap_or(serde_json::Value::Null),
            Some(Kind::StringValue(s)) => serde_json::Value::String(s),
            Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
            Some(Kind::StructValue(s)) => object(s),
            Some(Kind::ListValue(l)) => {
                serde_json::Value::Array(l.values.into_iter().map(value).collect())
            }
        }
    }
    fn object(s: prost_types::Struct) -> serde_json::Value {
        serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, value(v))).collect())
    }
    variables
        .map(object)
        .unwrap_or_else(|| serde_json::json!({}))
}

#[tonic::async_trait]
impl TemplateService for TemplateApi {
    async fn create_email_template(
        &self,
        request: Request<pb::CreateEmailTemplateRequest>,
    ) -> Result<Response<pb::CreateEmailTemplateResponse>, Status> {
        let caller = caller(&request)?;
        let t = request
            .into_inner()
            .template
            .ok_or_else(|| ApiError::invalid("template", "is required"))?;
        let stored = self.docs.create(&caller, input(t)).await?;
        Ok(Response::new(pb::CreateEmailTemplateResponse {
            template: Some(to_proto(&stored)),
        }))
    }

    async fn get_email_template(
        &self,
        request: Request<pb::GetEmailTemplateRequest>,
    ) -> Result<Response<pb::GetEmailTemplateResponse>, Status> {
        let caller = caller(&request)?;
        let stored = self.docs.get(&caller, &request.get_ref().id).await?;
        Ok(Response::new(pb::GetEmailTemplateResponse {
            template: Some(to_proto(&stored)),
        }))
    }

    async fn list_email_templates(
        &self,
        request: Request<pb::ListEmailTemplatesRequest>,
    ) -> Result<Response<pb::ListEmailTemplatesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let (stored, next_page_token) = self
            .docs
            .list(&caller, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(pb::ListEmailTemplatesResponse {
            templates: stored.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_email_template(
        &self,
        request: Request<pb::UpdateEmailTemplateRequest>,
    ) -> Result<Response<pb::UpdateEmailTemplateResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let t = req
            .template
            .ok_or_else(|| ApiError::invalid("template", "is required"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let stored = self.docs.update(&caller, input(t), &paths).await?;
        Ok(Response::new(pb::UpdateEmailTemplateResponse {
            template: Some(to_proto(&stored)),
        }))
    }

    async fn delete_email_template(
        &self,
        request: Request<pb::DeleteEmailTemplateRequest>,
    ) -> Result<Response<pb::DeleteEmailTemplateResponse>, Status> {
        let caller = caller(&request)?;
        self.docs.delete(&caller, &request.get_ref().id).await?;
        Ok(Response::new(pb::DeleteEmailTemplateResponse {}))
    }

    async fn render_template(
        &self,
        request: Request<pb::RenderTemplateRequest>,
    ) -> Result<Response<pb::RenderTemplateResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let context = match req.source {
            None => return Err(ApiError::invalid("source", "set template_id or template").into()),
            Some(pb::render_template_request::Source::TemplateId(id)) => {
                self.docs.get(&caller, &id).await?.context
            }
            Some(pb::render_template_request::Source::Template(t)) => {
                let sources = Sources {
                    subject: &t.subject,
                    text: &t.text_body,
                    html: &t.html_body,
                };
                templating::check(&sources, "template.").map_err(ApiError::from)?;
                crate::domain::SendingContext {
                    subject: t.subject,
                    text_body: t.text_body,
                    html_body: t.html_body,
                    ..Default::default()
                }
            }
        };
        let gateway_url = self
            .docs
            .ctx
            .store
            .get_tenant_settings(&caller.tenant_id)
            .await
            .map_err(ApiError::from)?
            .gateway_url;
        let sources = Sources {
            subject: &context.subject,
            text: &context.text_body,
            html: &context.html_body,
        };
        let rendered = templating::render(&sources, &variables_json(req.variables), &gateway_url)
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RenderTemplateResponse {
            subject: rendered.subject,
            text_body: rendered.text,
            html_body: rendered.html,
        }))
    }
}
