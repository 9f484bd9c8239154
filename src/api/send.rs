//! SendService: accepts emails into the durable outbox. No SMTP work on the request path.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{
    caller, convert::micros, convert::status_to_proto, template::variables_json, ApiContext, Caller,
};
use crate::{
    delivery::{now_micros, Engine},
    domain::{
        check_max_len, validate_headers, Attachment, EmailAddress, Header, Mailbox, MessageContent,
        MessageStatus, NewMessage, SendingContext, Violations,
    },
    error::ApiError,
    proto::v1::{self as pb, send_service_server::SendService},
    routing::{self, Route},
    storage::{Claimed, InsertOutcome, StoreError},
    templating::{self, Sources},
};

/// Largest total size of an email's attachments.
const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;

/// SendBatch calls building and storing their emails at once. A batch of 1,000 holds a few
/// megabytes until it is stored, and the writer stores one group at a time anyway: more
/// batches at once would only hold more memory.
const BATCHES_AT_ONCE: usize = 2;

/// The SendService implementation.
#[derive(Debug, Clone)]
pub struct SendApi {
    ctx: ApiContext,
    batches: std::sync::Arc<tokio::sync::Semaphore>,
}

fn mailboxes(field: &str, list: &[pb::Mailbox], v: &mut Violations) -> Vec<Mailbox> {
    list.iter()
        .enumerate()
        .filter_map(|(i, m)| v.check(Mailbox::parse(&format!("{field}[{i}]"), &m.email, &m.name)))
        .collect()
}

/// Profile headers first, then request headers; a later header replaces an earlier one of
/// the same name.
fn merge_headers(layers: &[&[Header]]) -> Vec<Header> {
    let mut out: Vec<Header> = Vec::new();
    for layer in layers {
        for h in *layer {
            out.retain(|o| !o.name.eq_ignore_ascii_case(&h.name));
            out.push(h.clone());
        }
    }
    out
}

/// Counts an accepted email in the metrics.
fn count_accepted(tenant_id: &str, email_type: &str) {
    crate::metrics::metrics().accepted.add(
        1,
        &[
            opentelemetry::KeyValue::new("tenant", tenant_id.to_owned()),
            opentelemetry::KeyValue::new("type", email_type.to_owned()),
        ],
    );
}

/// Counts a stored email and announces its status (SCHEDULED or QUEUED, as the answer
/// says), before the engine may announce its delivery.
fn announce_accepted(
    engine: &Engine,
    tenant_id: &str,
    id: &str,
    email_type: &str,
    scheduled: bool,
) -> MessageStatus {
    count_accepted(tenant_id, email_type);
    let status = if scheduled {
        MessageStatus::Scheduled
    } else {
        MessageStatus::Queued
    };
    engine.publish(tenant_id, id, status);
    status
}

/// The result of a refused batch recipient.
fn batch_error(index: u32, error: ApiError) -> pb::BatchResult {
    let status = Status::from(error);
    pb::BatchResult {
        index,
        message_id: String::new(),
        code: status.code() as i32,
        error: status.message().to_owned(),
    }
}

/// The request's SHA-256 (hex), which tells a replay of an idempotency key from a conflicting
/// reuse of it. Only a request with a key needs it: without one it is empty, which spares
/// every other email an encoding of the whole request and its hash (2-3 % of the server's
/// CPU per email). A stored hash is compared only when a later request has the same key.
fn request_hash(req: &pb::SendEmailRequest) -> String {
    if req.idempotency_key.is_empty() {
        return String::new();
    }
    crate::crypto::sha256_hex(&prost::Message::encode_to_vec(req))
}

impl SendApi {
    /// A service over the shared context.
    pub fn new(ctx: ApiContext) -> Self {
        Self {
            ctx,
            batches: std::sync::Arc::new(tokio::sync::Semaphore::new(BATCHES_AT_ONCE)),
        }
    }

    /// Routes a request: profile, template, campaign (see [`crate::routing`]).
    async fn route(&self, caller: &Caller, req: &pb::SendEmailRequest) -> Result<Route, ApiError> {
        Ok(routing::route(
            &self.ctx.reads.over(self.ctx.store.as_ref()),
            &self.ctx.system_sender,
            &caller.tenant_id,
            &req.profile_id,
            &req.campaign_id,
            &req.template_id,
        )
        .await?)
    }

    /// Validates the request and builds the message to store. Routing happens after
    /// validation, unless the caller routed already (a batch routes once).
    async fn build(
        &self,
        caller: &Caller,
        req: &pb::SendEmailRequest,
        routed: Option<&Route>,
    ) -> Result<NewMessage, ApiError> {
        let mut v = Violations::default();
        let to = mailboxes("to", &req.to, &mut v);
        let cc = mailboxes("cc", &req.cc, &mut v);
        let bcc = mailboxes("bcc", &req.bcc, &mut v);
        if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() {
            v.add("to", "at least one recipient (to, cc or bcc) is required");
        }
        let max_recipients = self.ctx.limits.max_recipients;
        if req.to.len() + req.cc.len() + req.bcc.len() > max_recipients {
            v.add(
                "to",
                format!("at most {max_recipients} recipients (to, cc and bcc together)"),
            );
        }
        if req.template_id.is_empty() {
            // Without a template the body is known now: report it with the other fields.
            check_body(&req.subject, &req.text_body, &req.html_body, &mut v);
        }
        let from = req
            .from
            .as_ref()
            .and_then(|m| v.check(Mailbox::parse("from", &m.email, &m.name)));
        let reply_to = (!req.reply_to.is_empty())
            .then(|| v.check(EmailAddress::parse("reply_to", &req.reply_to)))
            .flatten();
        let headers = match validate_headers(
            "headers",
            req.headers
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
        let mut attachments = Vec::new();
        let mut total = 0usize;
        for (i, a) in req.attachments.iter().enumerate() {
            let field = format!("attachments[{i}]");
            if a.filename.trim().is_empty() || a.filename.contains(['\r', '\n', '\0', '/', '\\']) {
                v.add(
                    format!("{field}.filename"),
                    "is required and must be a plain file name",
                );
            }
            let content_type = if a.content_type.is_empty() {
                "application/octet-stream".to_owned()
            } else {
                a.content_type.clone()
            };
            if lettre::message::header::ContentType::parse(&content_type).is_err() {
                v.add(
                    format!("{field}.content_type"),
                    format!("{content_type:?} is not a valid MIME type"),
                );
            }
            total += a.content.len();
            attachments.push(Attachment {
                filename: a.filename.clone(),
                content_type,
                content: a.content.clone(),
            });
        }
        if total > MAX_ATTACHMENT_BYTES {
            v.add(
                "attachments",
                format!("attachments may total at most {MAX_ATTACHMENT_BYTES} bytes"),
            );
        }
        let email_type = &req.email_type;
        if email_type.len() > 64
            || !email_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            v.add(
                "email_type",
                "must be at most 64 characters of a-z, 0-9, '_' and '-'",
            );
        }
        v.check(check_max_len("idempotency_key", &req.idempotency_key, 255));
        if req.tags.len() > 32 {
            v.add("tags", "at most 32 tags");
        }
        for (k, val) in &req.tags {
            if k.is_empty() || k.len() > 64 || val.len() > 256 {
                v.add(
                    format!("tags[{k}]"),
                    "keys are 1 to 64 characters, values at most 256",
                );
            }
        }
        v.finish()?;

        let owned;
        let route = match routed {
            Some(route) => route,
            None => {
                owned = self.route(caller, req).await?;
                &owned
            }
        };
        let (profile, reason) = (&route.profile, route.reason);
        let body = body_of(req, route)?;
        let email_type = [
            req.email_type.as_str(),
            route
                .template
                .as_ref()
                .map_or("", |t| t.context.email_type.as_str()),
            route
                .campaign
                .as_ref()
                .map_or("", |c| c.context.email_type.as_str()),
        ]
        .into_iter()
        .find(|t| !t.is_empty())
        .unwrap_or("notification")
        .to_owned();
        let content = self.compose_content(
            route,
            Identity { from, reply_to },
            Recipients { to, cc, bcc },
            headers,
            attachments,
            body,
        )?;
        let send_at = req.send_at.as_ref().map(micros);
        let id = uuid::Uuid::now_v7().to_string();
        // The accepting request's trace: delivery attempts continue it.
        let traceparent = crate::telemetry::current_traceparent().unwrap_or_default();
        Ok(NewMessage {
            message_id_header: format!("{id}@{}", content.from.email.domain()),
            id,
            tenant_id: caller.tenant_id.clone(),
            source: caller.source.clone(),
            email_type,
            profile_id: profile.as_ref().map(|p| p.id.clone()),
            profile_reason: reason,
            template_id: route.template.as_ref().map(|t| t.id.clone()),
            campaign_id: route.campaign.as_ref().map(|c| c.id.clone()),
            content,
            send_at,
            idempotency_key: (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone()),
            request_hash: request_hash(req),
            tags: req.tags.clone().into_iter().collect::<BTreeMap<_, _>>(),
            trace_id: crate::telemetry::trace_id_of(&traceparent),
            traceparent,
            lease: None,
        })
    }

    /// Applies sender identity (request > template > campaign > profile), the profile's
    /// lists, headers (profile < campaign < template < request) and the relay rule.
    fn compose_content(
        &self,
        route: &Route,
        identity: Identity,
        recipients: Recipients,
        headers: Vec<Header>,
        attachments: Vec<Attachment>,
        body: Body,
    ) -> Result<MessageContent, ApiError> {
        let Recipients {
            to,
            mut cc,
            mut bcc,
        } = recipients;
        let contexts: Vec<&SendingContext> = [&route.template, &route.campaign]
            .into_iter()
            .flatten()
            .map(|c| &c.context)
            .collect();
        let context_from = contexts.iter().find_map(|c| c.from.clone());
        let context_reply_to = contexts.iter().find_map(|c| c.reply_to.clone());
        let campaign_headers = route
            .campaign
            .as_ref()
            .map_or(&[][..], |c| &c.context.headers[..]);
        let template_headers = route
            .template
            .as_ref()
            .map_or(&[][..], |t| &t.context.headers[..]);
        let reply_to = identity.reply_to.map(String::from).or(context_reply_to);
        let Some(profile) = &route.profile else {
            return Ok(MessageContent {
                from: identity
                    .from
                    .or(context_from)
                    .unwrap_or_else(|| route.system_from.clone()),
                reply_to,
                error_to: None,
                to,
                cc,
                bcc,
                subject: body.subject,
                text: body.text,
                html: body.html,
                headers: merge_headers(&[campaign_headers, template_headers, &headers]),
                attachments,
            });
        };
        let s = &profile.settings;
        let from = match identity.from.or(context_from) {
            Some(from) => from,
            None => Mailbox::parse("profile.from_email", &s.from_email, &s.from_name)?,
        };
        if !s.has_relay {
            let domain = from.email.domain();
            let allowed = s.sender_domains();
            if !allowed.contains(&domain) {
                return Err(ApiError::FailedPrecondition(format!(
                    "from: the domain {domain} is not allowed for profile {} (allowed: {}); set has_relay or allowed_sender_domains",
                    profile.name,
                    allowed.join(", ")
                )));
            }
        }
        for (i, a) in s.cc.iter().enumerate() {
            cc.push(Mailbox::parse(&format!("profile.cc[{i}]"), a, "")?);
        }
        for (i, a) in s.bcc.iter().enumerate() {
            bcc.push(Mailbox::parse(&format!("profile.bcc[{i}]"), a, "")?);
        }
        Ok(MessageContent {
            from,
            reply_to: reply_to.or_else(|| (!s.reply_to.is_empty()).then(|| s.reply_to.clone())),
            error_to: (!s.error_to.is_empty()).then(|| s.error_to.clone()),
            to,
            cc,
            bcc,
            subject: body.subject,
            text: body.text,
            html: body.html,
            headers: merge_headers(&[&s.headers, campaign_headers, template_headers, &headers]),
            attachments,
        })
    }
}

/// The sender the request asks for.
#[derive(Debug)]
struct Identity {
    from: Option<Mailbox>,
    reply_to: Option<EmailAddress>,
}

/// The request's recipients.
#[derive(Debug)]
struct Recipients {
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
}

/// Subject and bodies, rendered.
#[derive(Debug)]
struct Body {
    subject: String,
    text: Option<String>,
    html: Option<String>,
}

/// Checks subject and bodies as they will be sent.
fn check_body(subject: &str, text: &str, html: &str, v: &mut Violations) {
    if subject.trim().is_empty() {
        v.add("subject", "is required (or a template_id)");
    }
    v.check(check_max_len("subject", subject, 998));
    if subject.contains(['\r', '\n', '\0']) {
        v.add("subject", "must not contain CR, LF or NUL");
    }
    if text.is_empty() && html.is_empty() {
        v.add(
            "text_body",
            "text_body or html_body is required (or a template_id)",
        );
    }
}

/// Subject and bodies: the template's, rendered with the request's variables and the
/// tenant's gateway URL, unless the request sets its own; then checked.
fn body_of(req: &pb::SendEmailRequest, route: &Route) -> Result<Body, ApiError> {
    let (mut subject, mut text, mut html) = (
        req.subject.clone(),
        req.text_body.clone(),
        req.html_body.clone(),
    );
    if let Some(t) = &route.template {
        let sources = Sources {
            subject: &t.context.subject,
            text: &t.context.text_body,
            html: &t.context.html_body,
        };
        let rendered = templating::render(
            &sources,
            &variables_json(req.variables.clone()),
            &route.gateway_url,
        )?;
        for (mine, theirs) in [
            (&mut subject, rendered.subject),
            (&mut text, rendered.text),
            (&mut html, rendered.html),
        ] {
            if mine.is_empty() {
                *mine = theirs;
            }
        }
    }
    let mut v = Violations::default();
    check_body(&subject, &text, &html, &mut v);
    v.finish()?;
    Ok(Body {
        subject,
        text: (!text.is_empty()).then_some(text),
        html: (!html.is_empty()).then_some(html),
    })
}

#[tonic::async_trait]
impl SendService for SendApi {
    async fn send_email(
        &self,
        request: Request<pb::SendEmailRequest>,
    ) -> Result<Response<pb::SendEmailResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let mut message = self.build(&caller, &req, None).await?;
        crate::telemetry::record("message_id", message.id.as_str());
        let now = now_micros();
        // Due now and the engine has room: store it leased to this process and deliver it
        // straight away, instead of queueing it for a claim.
        let reservation = if message.scheduled_after(now) {
            None
        } else {
            self.ctx.engine.reserve(message.content.held_bytes())
        };
        message.lease = reservation.as_ref().map(|r| r.lease().clone());
        // Storing and handing over run to the end even if the caller goes away meanwhile:
        // an email stored with a lease must reach the engine, or it would wait for the lease
        // to run out.
        let (store, engine) = (self.ctx.store.clone(), self.ctx.engine.clone());
        let tenant_id = caller.tenant_id.clone();
        let accept = async move {
            let outcome = store.insert_message(&message, now).await?;
            Ok::<_, StoreError>(match outcome {
                InsertOutcome::Created => {
                    let status = announce_accepted(
                        &engine,
                        &tenant_id,
                        &message.id,
                        &message.email_type,
                        message.scheduled_after(now),
                    );
                    let id = message.id.clone();
                    match (reservation, Claimed::stored_leased(message, now)) {
                        (Some(reservation), Some(claimed)) => engine.adopt(reservation, claimed),
                        _ => engine.wake(),
                    }
                    (id, status, false)
                }
                InsertOutcome::Replayed { id, status } => (id, status, true),
            })
        };
        // A trace-only span (not made without a trace exporter); the task runs in the RPC's
        // log context, so what it logs still names the RPC and its tenant.
        let span = tracing::info_span!(target: crate::telemetry::TRACE_ONLY, "enqueue");
        let span = if span.is_disabled() {
            tracing::Span::current()
        } else {
            span
        };
        let accept = crate::telemetry::carry_log_context(accept.instrument(span));
        let (id, status, replayed) = tokio::spawn(accept)
            .await
            .map_err(|e| Status::internal(format!("accepting the email failed: {e}")))?
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::SendEmailResponse {
            message_id: id,
            status: status_to_proto(status).into(),
            replayed,
        }))
    }

    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        crate::telemetry::record("recipients", req.recipients.len() as u64);
        let base = req
            .message
            .ok_or_else(|| ApiError::invalid("message", "is required"))?;
        if req.recipients.is_empty() {
            return Err(
                ApiError::invalid("recipients", "at least one recipient is required").into(),
            );
        }
        let max_batch = self.ctx.limits.max_batch;
        if req.recipients.len() > max_batch {
            return Err(Status::resource_exhausted(format!(
                "recipients: at most {max_batch} per batch; split the batch"
            )));
        }
        let _turn = self
            .batches
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        // Route once for the whole batch: every email goes through the same profile.
        let route = self.route(&caller, &base).await?;
        let mut results: Vec<pb::BatchResult> = Vec::with_capacity(req.recipients.len());
        // The emails to store, and for each what the answer needs once it is stored (the
        // emails themselves go to the writer: one copy in memory, not three; those handed to
        // the engine keep a second copy for it).
        let mut messages = Vec::new();
        let mut accepted = Vec::new();
        // Emails due now that the engine has room for (a slot in hand, or a place in its
        // line) are stored leased to this process and delivered from memory, as SendEmail
        // does, instead of queued for a claim, which would rewrite each email's row once
        // more and read it back. The rest is queued. Each email asks on its own: one too
        // large for what is left of the line does not keep a smaller one after it out.
        let mut adoptions = Vec::new();
        // The content the batch's emails hold together, and how much they may.
        let (mut held, max_bytes) = (0usize, self.ctx.limits.max_batch_bytes);
        for (i, recipient) in req.recipients.into_iter().enumerate() {
            let mut one = base.clone();
            one.to = recipient.to.into_iter().collect();
            one.cc.clear();
            one.bcc.clear();
            one.idempotency_key = recipient.idempotency_key;
            one.tags.extend(recipient.tags);
            if let Some(own) = recipient.variables {
                let mut merged = one.variables.take().unwrap_or_default();
                merged.fields.extend(own.fields);
                one.variables = Some(merged);
            }
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match self.build(&caller, &one, Some(&route)).await {
                Ok(mut message) => {
                    // Each email holds its own copy of the body and attachments, in memory
                    // until stored and in the log afterwards: a batch of a thousand emails
                    // with a few megabytes of attachments would take gigabytes.
                    let size = message.content.held_bytes();
                    held += size;
                    if held > max_bytes {
                        return Err(Status::resource_exhausted(if i == 0 {
                            format!(
                                "recipients: one email of this batch holds {size} bytes of \
                                 subject, bodies, headers and attachments, more than \
                                 limits.max_batch_bytes ({max_bytes} bytes) allows a whole \
                                 batch; send it with SendEmail"
                            )
                        } else {
                            format!(
                                "recipients: the emails of this batch would hold more than \
                                 limits.max_batch_bytes ({max_bytes} bytes) of content \
                                 together (email {i} alone holds {size} bytes of subject, \
                                 bodies, headers and attachments, and each email holds its own \
                                 copy); send fewer recipients per batch"
                            )
                        }));
                    }
                    results.push(pb::BatchResult {
                        index,
                        message_id: message.id.clone(),
                        code: 0,
                        error: String::new(),
                    });
                    let scheduled = message.scheduled_after(now_micros());
                    let reservation = if scheduled {
                        None
                    } else {
                        self.ctx.engine.reserve(size)
                    };
                    if let Some(reservation) = reservation {
                        message.lease = Some(reservation.lease().clone());
                        adoptions.push((accepted.len(), reservation, message.clone()));
                    }
                    accepted.push((i, message.id.clone(), scheduled, message.email_type.clone()));
                    messages.push(message);
                }
                Err(e) => results.push(batch_error(index, e)),
            }
        }
        // Storing and handing over run to the end even if the caller goes away meanwhile
        // (see `send_email`); each email is announced before the engine may announce its
        // delivery.
        let (store, engine) = (self.ctx.store.clone(), self.ctx.engine.clone());
        let tenant_id = caller.tenant_id.clone();
        let store_all = async move {
            let now = now_micros();
            let outcomes = store.insert_messages(messages, now).await?;
            let mut created = 0;
            for ((_, id, scheduled, email_type), outcome) in accepted.iter().zip(&outcomes) {
                if let Ok(InsertOutcome::Created) = outcome {
                    announce_accepted(&engine, &tenant_id, id, email_type, *scheduled);
                    created += 1;
                }
            }
            let mut handed_over = 0;
            for (at, reservation, message) in adoptions {
                if matches!(outcomes.get(at), Some(Ok(InsertOutcome::Created))) {
                    if let Some(claimed) = Claimed::stored_leased(message, now) {
                        engine.adopt(reservation, claimed);
                        handed_over += 1;
                    }
                }
            }
            // The engine claims only for emails it was not handed: a claim while adopted
            // emails wait would hold a quarter of its slots for a round trip, for nothing.
            if handed_over < created {
                engine.wake();
            }
            Ok::<_, StoreError>((accepted, outcomes))
        };
        let store_all = crate::telemetry::carry_log_context(store_all.in_current_span());
        let (accepted, outcomes) = tokio::spawn(store_all)
            .await
            .map_err(|e| Status::internal(format!("accepting the batch failed: {e}")))?
            .map_err(ApiError::from)?;
        for ((i, ..), outcome) in accepted.iter().zip(outcomes) {
            match outcome {
                Ok(InsertOutcome::Created) => {}
                Ok(InsertOutcome::Replayed { id, .. }) => results[*i].message_id = id,
                Err(e) => {
                    let index = results[*i].index;
                    results[*i] = batch_error(index, ApiError::from(e));
                }
            }
        }
        let accepted_count =
            u32::try_from(results.iter().filter(|r| r.code == 0).count()).unwrap_or(u32::MAX);
        Ok(Response::new(pb::SendBatchResponse {
            results,
            accepted_count,
        }))
    }

    async fn cancel_email(
        &self,
        request: Request<pb::CancelEmailRequest>,
    ) -> Result<Response<pb::CancelEmailResponse>, Status> {
        let caller = caller(&request)?;
        let id = &request.get_ref().message_id;
        super::ensure_visible(&self.ctx, &caller, id).await?;
        let status = self
            .ctx
            .store
            .cancel_message(&caller.tenant_id, id, now_micros())
            .await
            .map_err(ApiError::from)?;
        self.ctx.engine.publish(&caller.tenant_id, id, status);
        Ok(Response::new(pb::CancelEmailResponse {
            status: status_to_proto(status).into(),
        }))
    }

    async fn retry_email(
        &self,
        request: Request<pb::RetryEmailRequest>,
    ) -> Result<Response<pb::RetryEmailResponse>, Status> {
        let caller = caller(&request)?;
        let id = &request.get_ref().message_id;
        super::ensure_visible(&self.ctx, &caller, id).await?;
        let status = self
            .ctx
            .store
            .retry_message(&caller.tenant_id, id, now_micros())
            .await
            .map_err(ApiError::from)?;
        self.ctx.engine.publish(&caller.tenant_id, id, status);
        self.ctx.engine.wake();
        Ok(Response::new(pb::RetryEmailResponse {
            status: status_to_proto(status).into(),
        }))
    }

    async fn requeue_emails(
        &self,
        request: Request<pb::RequeueEmailsRequest>,
    ) -> Result<Response<pb::RequeueEmailsResponse>, Status> {
        let caller = caller(&request)?;
        let filter = super::email_log::filter_from_proto(request.into_inner().filter)?;
        let count = self
            .ctx
            .store
            .requeue_messages(&caller.tenant_id, &filter, now_micros())
            .await
            .map_err(ApiError::from)?;
        self.ctx.engine.wake();
        Ok(Response::new(pb::RequeueEmailsResponse {
            requeued_count: i64::try_from(count).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_headers_win() {
        let h = |n: &str, v: &str| Header {
            name: n.into(),
            value: v.into(),
        };
        let merged = merge_headers(&[&[h("X-A", "1"), h("X-B", "1")], &[h("x-a", "2")]]);
        assert_eq!(merged, vec![h("X-B", "1"), h("x-a", "2")]);
    }

    /// Only a request with an idempotency key is hashed; the hash tells requests apart.
    #[test]
    fn request_hash_only_with_a_key() {
        let mut req = pb::SendEmailRequest {
            subject: "Hello".into(),
            ..Default::default()
        };
        assert_eq!(request_hash(&req), "");
        req.idempotency_key = "k1".into();
        let keyed = request_hash(&req);
        assert_eq!(keyed.len(), 64);
        assert!(keyed
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(request_hash(&req), keyed);
        req.subject = "Hello again".into();
        assert_ne!(request_hash(&req), keyed);
    }
}
