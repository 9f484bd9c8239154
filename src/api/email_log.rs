//! EmailLogService: the email log, newest first, with cursor pagination and a live tail.

use std::pin::Pin;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::{
    caller,
    convert::{entry_to_proto, micros, status_from_proto},
    page_size, ApiContext,
};
use crate::{
    domain::{LogFilter, StoredMessage, Violations},
    error::ApiError,
    proto::v1::{self as pb, email_log_service_server::EmailLogService},
};

/// The EmailLogService implementation.
#[derive(Debug, Clone)]
pub struct EmailLogApi {
    ctx: ApiContext,
}

impl EmailLogApi {
    /// A service over the shared context.
    pub fn new(ctx: ApiContext) -> Self {
        Self { ctx }
    }
}

/// An opaque page token for a cursor value.
pub(crate) fn encode_token(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{cursor}"))
}

/// The cursor value of a page token; empty token: first page.
pub(crate) fn decode_token(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("v1:").map(str::to_owned))
        .map(Some)
        .ok_or_else(|| ApiError::invalid("page_token", "is not a token this service issued"))
}

pub(crate) fn filter_from_proto(f: Option<pb::EmailLogFilter>) -> Result<LogFilter, ApiError> {
    let Some(f) = f else {
        return Ok(LogFilter::default());
    };
    let mut v = Violations::default();
    let statuses = f
        .statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| v.check(status_from_proto(*s, &format!("filter.statuses[{i}]"))))
        .collect();
    v.finish()?;
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(LogFilter {
        statuses,
        email_type: opt(f.email_type),
        source: opt(f.source),
        profile_id: opt(f.profile_id),
        template_id: opt(f.template_id),
        campaign_id: opt(f.campaign_id),
        recipient: opt(f.recipient.trim().to_ascii_lowercase()),
        subject_contains: opt(f.subject_contains),
        start: f.start_time.as_ref().map(micros),
        end: f.end_time.as_ref().map(micros),
    })
}

/// Whether an entry matches a filter (for the live tail).
fn matches(m: &StoredMessage, f: &LogFilter) -> bool {
    let eq =
        |want: &Option<String>, have: Option<&str>| want.as_deref().is_none_or(|w| Some(w) == have);
    (f.statuses.is_empty() || f.statuses.contains(&m.status))
        && eq(&f.email_type, Some(&m.email_type))
        && eq(&f.source, Some(&m.source))
        && eq(&f.profile_id, m.profile_id.as_deref())
        && eq(&f.template_id, m.template_id.as_deref())
        && eq(&f.campaign_id, m.campaign_id.as_deref())
        && f.recipient.as_deref().is_none_or(|r| {
            m.content
                .recipients()
                .any(|x| x.email.as_str().eq_ignore_ascii_case(r))
        })
        && f.subject_contains
            .as_deref()
            .is_none_or(|s| m.content.subject.to_lowercase().contains(&s.to_lowercase()))
        && f.start.is_none_or(|s| m.created_at >= s)
        && f.end.is_none_or(|e| m.created_at < e)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEmailLogsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EmailLogService for EmailLogApi {
    async fn list_email_logs(
        &self,
        request: Request<pb::ListEmailLogsRequest>,
    ) -> Result<Response<pb::ListEmailLogsResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let mut filter = filter_from_proto(req.filter)?;
        let limit = page_size(req.page_size);
        let before = decode_token(&req.page_token)?;
        if !super::restrict_to_caller(&caller, &mut filter) {
            return Err(Status::permission_denied(
                "a member key sees only the emails it sent: filter.source must be empty or its own name",
            ));
        }
        let mut entries = self
            .ctx
            .store
            .list_messages(&caller.tenant_id, &filter, before.as_deref(), limit + 1)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if entries.len() > limit as usize {
            entries.truncate(limit as usize);
            entries
                .last()
                .map(|m| encode_token(&m.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEmailLogsResponse {
            entries: entries.iter().map(|m| entry_to_proto(m, &[])).collect(),
            next_page_token,
        }))
    }

    async fn get_email_log(
        &self,
        request: Request<pb::GetEmailLogRequest>,
    ) -> Result<Response<pb::GetEmailLogResponse>, Status> {
        let caller = caller(&request)?;
        let id = &request.get_ref().id;
        let store = &self.ctx.store;
        let message = store
            .get_message(&caller.tenant_id, id)
            .await
            .map_err(ApiError::from)?;
        if caller.own_emails_only() && message.source != caller.source {
            return Err(ApiError::NotFound("email").into());
        }
        let attempts = store
            .list_attempts(&caller.tenant_id, id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetEmailLogResponse {
            entry: Some(entry_to_proto(&message, &attempts)),
        }))
    }

    async fn get_email_stats(
        &self,
        request: Request<pb::GetEmailStatsRequest>,
    ) -> Result<Response<pb::GetEmailStatsResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let start = req
            .start_time
            .as_ref()
            .map(micros)
            .ok_or_else(|| ApiError::invalid("start_time", "is required"))?;
        let end = req
            .end_time
            .as_ref()
            .map(micros)
            .unwrap_or_else(crate::delivery::now_micros);
        if end <= start {
            return Err(ApiError::invalid("end_time", "must be after start_time").into());
        }
        let width = match pb::StatsBucketWidth::try_from(req.bucket_width) {
            Ok(pb::StatsBucketWidth::Unspecified) => None,
            Ok(pb::StatsBucketWidth::Hour) => Some(3_600_000_000),
            Ok(pb::StatsBucketWidth::Day) => Some(86_400_000_000),
            Err(_) => return Err(ApiError::invalid("bucket_width", "unknown bucket width").into()),
        };
        if let Some(w) = width {
            if (end - start) / w > MAX_BUCKETS {
                return Err(ApiError::invalid(
                    "bucket_width",
                    format!("the window holds more than {MAX_BUCKETS} buckets: use a wider bucket or a shorter window"),
                )
                .into());
            }
        }
        let stats = self
            .ctx
            .store
            .email_stats(&caller.tenant_id, start, end, width)
            .await
            .map_err(ApiError::from)?;
        let counts = |list: &[(String, i64)]| -> Vec<pb::StatsCount> {
            list.iter()
                .map(|(key, count)| pb::StatsCount {
                    key: key.clone(),
                    count: *count,
                })
                .collect()
        };
        Ok(Response::new(pb::GetEmailStatsResponse {
            total: stats.total,
            by_status: counts(&stats.by_status),
            by_type: counts(&stats.by_type),
            by_profile: counts(&stats.by_profile),
            buckets: stats
                .buckets
                .iter()
                .map(|(at, list)| pb::StatsBucket {
                    start_time: Some(super::convert::timestamp(*at)),
                    by_status: counts(list),
                })
                .collect(),
        }))
    }

    async fn watch_email_logs(
        &self,
        request: Request<pb::WatchEmailLogsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = caller(&request)?;
        let mut filter = filter_from_proto(request.into_inner().filter)?;
        if !super::restrict_to_caller(&caller, &mut filter) {
            return Err(Status::permission_denied(
                "a member key sees only the emails it sent: filter.source must be empty or its own name",
            ));
        }
        let mut events = self.ctx.engine.subscribe();
        let store = self.ctx.store.clone();
        let mut shutdown = self.ctx.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    // The server is shutting down: end the stream so shutdown is not held up.
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                let event = match received {
                    Ok(event) => event,
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "the watcher fell {n} changes behind; list the log with ListEmailLogs and watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                };
                if event.tenant_id != caller.tenant_id {
                    continue;
                }
                let Ok(message) = store
                    .get_message(&caller.tenant_id, &event.message_id)
                    .await
                else {
                    continue;
                };
                // Report the status of the event: the row may have moved on since.
                let mut message = message;
                message.status = event.status;
                if !matches(&message, &filter) {
                    continue;
                }
                let item = pb::WatchEmailLogsResponse {
                    entry: Some(entry_to_proto(&message, &[])),
                };
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Most buckets one GetEmailStats call may ask for.
const MAX_BUCKETS: i64 = 2000;

/// A stream fed by a task through a bounded channel (a slow client fills the channel; the
/// broadcast behind it then reports the lag instead of holding the service back).
fn async_stream<F, Fut>(producer: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchEmailLogsResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
