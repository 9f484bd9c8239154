//! What TemplateService and CampaignService share: validation of a sending context, binding
//! to a usable profile, and create/get/list/update/delete over the store's documents.

use crate::{
    delivery::now_micros,
    domain::{
        check_max_len, validate_headers, Document, DocumentKind, EmailAddress, FieldError, Mailbox,
        SendingContext, Violations,
    },
    error::ApiError,
    proto::v1 as pb,
    templating::{self, Sources},
};

use super::{
    email_log::{decode_token, encode_token},
    page_size, ApiContext, Caller,
};

/// A template or campaign as it arrives, before validation.
#[derive(Debug, Default, Clone)]
pub(crate) struct Input {
    pub id: String,
    pub name: String,
    pub profile_id: String,
    pub description: String,
    pub email_type: String,
    pub headers: Vec<pb::Header>,
    pub from: Option<pb::Mailbox>,
    pub reply_to: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: String,
}

/// Paths an update mask may name, per kind.
fn updatable(kind: DocumentKind) -> &'static [&'static str] {
    match kind {
        DocumentKind::Template => &[
            "name",
            "description",
            "profile_id",
            "email_type",
            "headers",
            "from",
            "reply_to",
            "subject",
            "text_body",
            "html_body",
        ],
        DocumentKind::Campaign => &[
            "name",
            "description",
            "profile_id",
            "email_type",
            "headers",
            "from",
            "reply_to",
        ],
    }
}

/// Validates an input; `p` is the field prefix (`template` or `campaign`).
fn validate(kind: DocumentKind, input: &Input, p: &str) -> Result<SendingContext, ApiError> {
    let mut v = Violations::default();
    let name = input.name.trim();
    if name.is_empty() {
        v.add(format!("{p}.name"), "is required");
    }
    v.check(check_max_len(&format!("{p}.name"), name, 255));
    v.check(check_max_len(
        &format!("{p}.description"),
        &input.description,
        2000,
    ));
    if !input.email_type.is_empty()
        && (input.email_type.len() > 64
            || !input
                .email_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'))
    {
        v.add(
            format!("{p}.email_type"),
            "must be at most 64 characters of a-z, 0-9, '_' and '-'",
        );
    }
    let headers = match validate_headers(
        &format!("{p}.headers"),
        input
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str())),
    ) {
        Ok(h) => h,
        Err(errors) => {
            for e in errors {
                v.add(e.field, e.description);
            }
            Vec::new()
        }
    };
    let from = match &input.from {
        Some(m) if !m.email.is_empty() => {
            v.check(Mailbox::parse(&format!("{p}.from"), &m.email, &m.name))
        }
        _ => None,
    };
    let reply_to = if input.reply_to.is_empty() {
        None
    } else {
        v.check(EmailAddress::parse(
            &format!("{p}.reply_to"),
            &input.reply_to,
        ))
        .map(String::from)
    };
    if kind == DocumentKind::Template {
        if input.subject.trim().is_empty() {
            v.add(format!("{p}.subject"), "is required");
        }
        if input.text_body.is_empty() && input.html_body.is_empty() {
            v.add(
                format!("{p}.text_body"),
                "text_body or html_body is required",
            );
        }
        let sources = Sources {
            subject: &input.subject,
            text: &input.text_body,
            html: &input.html_body,
        };
        if let Err(errors) = templating::check(&sources, &format!("{p}.")) {
            for e in errors {
                v.add(e.field, e.description);
            }
        }
    }
    v.finish()?;
    Ok(SendingContext {
        description: input.description.clone(),
        email_type: input.email_type.clone(),
        headers,
        from,
        reply_to,
        subject: input.subject.clone(),
        text_body: input.text_body.clone(),
        html_body: input.html_body.clone(),
    })
}

/// A stored document with its parsed context.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub doc: Document,
    pub context: SendingContext,
}

fn parse(doc: Document) -> Result<Stored, ApiError> {
    let context = serde_json::from_str(&doc.body).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Stored { doc, context })
}

/// Create/get/list/update/delete of one kind.
#[derive(Debug, Clone)]
pub(crate) struct Documents {
    pub ctx: ApiContext,
    pub kind: DocumentKind,
    /// The request field holding the document (`template` or `campaign`).
    pub field: &'static str,
}

impl Documents {
    async fn check_profile(
        &self,
        caller: &Caller,
        profile_id: &str,
    ) -> Result<Option<String>, ApiError> {
        if profile_id.is_empty() {
            return Ok(None);
        }
        self.ctx
            .store
            .get_usable_profile(&caller.tenant_id, profile_id)
            .await
            .map_err(|_| {
                ApiError::from(FieldError::new(
                    format!("{}.profile_id", self.field),
                    "no such profile",
                ))
            })?;
        Ok(Some(profile_id.to_owned()))
    }

    pub(crate) async fn create(&self, caller: &Caller, input: Input) -> Result<Stored, ApiError> {
        let context = validate(self.kind, &input, self.field)?;
        let profile_id = self.check_profile(caller, &input.profile_id).await?;
        let now = now_micros();
        let doc = Document {
            id: uuid::Uuid::now_v7().to_string(),
            tenant_id: caller.tenant_id.clone(),
            name: input.name.trim().to_owned(),
            profile_id,
            body: serde_json::to_string(&context).map_err(|e| ApiError::Internal(e.into()))?,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        self.ctx.store.insert_document(self.kind, &doc).await?;
        Ok(Stored { doc, context })
    }

    pub(crate) async fn get(&self, caller: &Caller, id: &str) -> Result<Stored, ApiError> {
        parse(
            self.ctx
                .store
                .get_document(self.kind, &caller.tenant_id, id)
                .await?,
        )
    }

    pub(crate) async fn list(
        &self,
        caller: &Caller,
        size: i32,
        token: &str,
    ) -> Result<(Vec<Stored>, String), ApiError> {
        let limit = page_size(size);
        let after = decode_token(token)?;
        let mut docs = self
            .ctx
            .store
            .list_documents(self.kind, &caller.tenant_id, after.as_deref(), limit + 1)
            .await?;
        let next = if docs.len() > limit as usize {
            docs.truncate(limit as usize);
            docs.last()
                .map(|d| encode_token(&d.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let stored = docs.into_iter().map(parse).collect::<Result<Vec<_>, _>>()?;
        Ok((stored, next))
    }

    pub(crate) async fn update(
        &self,
        caller: &Caller,
        input: Input,
        paths: &[String],
    ) -> Result<Stored, ApiError> {
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "is required: name the fields to change",
            ));
        }
        if let Some(bad) = paths
            .iter()
            .find(|p| !updatable(self.kind).contains(&p.as_str()))
        {
            return Err(ApiError::invalid(
                "update_mask",
                format!("{bad:?} is not a field that can be updated"),
            ));
        }
        let current = self.get(caller, &input.id).await?;
        let has = |p: &str| paths.iter().any(|x| x == p);
        let c = &current.context;
        let merged = Input {
            id: input.id.clone(),
            name: if has("name") {
                input.name.clone()
            } else {
                current.doc.name.clone()
            },
            profile_id: if has("profile_id") {
                input.profile_id.clone()
            } else {
                current.doc.profile_id.clone().unwrap_or_default()
            },
            description: if has("description") {
                input.description.clone()
            } else {
                c.description.clone()
            },
            email_type: if has("email_type") {
                input.email_type.clone()
            } else {
                c.email_type.clone()
            },
            headers: if has("headers") {
                input.headers.clone()
            } else {
                c.headers
                    .iter()
                    .map(|h| pb::Header {
                        name: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect()
            },
            from: if has("from") {
                input.from.clone()
            } else {
                c.from.as_ref().map(|m| pb::Mailbox {
                    email: m.email.to_string(),
                    name: m.name.clone(),
                })
            },
            reply_to: if has("reply_to") {
                input.reply_to.clone()
            } else {
                c.reply_to.clone().unwrap_or_default()
            },
            subject: if has("subject") {
                input.subject.clone()
            } else {
                c.subject.clone()
            },
            text_body: if has("text_body") {
                input.text_body.clone()
            } else {
                c.text_body.clone()
            },
            html_body: if has("html_body") {
                input.html_body.clone()
            } else {
                c.html_body.clone()
            },
        };
        let context = validate(self.kind, &merged, self.field)?;
        let profile_id = if has("profile_id") {
            self.check_profile(caller, &merged.profile_id).await?
        } else {
            current.doc.profile_id.clone()
        };
        let doc = Document {
            name: merged.name.trim().to_owned(),
            profile_id,
            body: serde_json::to_string(&context).map_err(|e| ApiError::Internal(e.into()))?,
            updated_at: now_micros(),
            ..current.doc
        };
        let saved = self
            .ctx
            .store
            .update_document(self.kind, &doc, None)
            .await?;
        Ok(Stored {
            doc: saved,
            context,
        })
    }

    pub(crate) async fn delete(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        Ok(self
            .ctx
            .store
            .delete_document(self.kind, &caller.tenant_id, id)
            .await?)
    }
}
