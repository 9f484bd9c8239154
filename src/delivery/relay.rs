//! Status changes across replicas on PostgreSQL: every process sends its changes with
//! `pg_notify` (batched, many per notification) and LISTENs for the others', which it hands to
//! its own live watchers. SQLite runs one process, so it needs none of this.
//!
//! Notifications are a live tail, not a log: a change made while a listener reconnects is not
//! replayed (WatchEmailLogs clients resume from ListEmailLogs, as after any interruption).

use std::{sync::Arc, time::Duration};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{Engine, MessageEvent};
use crate::domain::MessageStatus;

/// The channel every replica listens on.
const CHANNEL: &str = "mailgate_events";
/// How long changes are gathered before they are sent: other replicas' watchers see a
/// change this much later, and a busy replica sends one notification per window instead of
/// one per few changes (at 1,000 emails/s, about 360 a second, each its own commit).
const GATHER: Duration = Duration::from_millis(20);
/// Most changes sent at once.
const MAX_BATCH: usize = 4096;
/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7_800;

/// A connected relay, listening already; [`Relay::run`] moves the events.
#[derive(Debug)]
pub struct Relay {
    origin: String,
    listener: PgListener,
    pool: PgPool,
    outbound: mpsc::Receiver<MessageEvent>,
    engine: Arc<Engine>,
}

impl Relay {
    /// Connects to `url`, starts listening, and makes `engine` send its changes here.
    pub async fn connect(engine: Arc<Engine>, url: &str) -> Result<Self, sqlx::Error> {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
        let (tx, outbound) = mpsc::channel(8192);
        engine.relay_to(tx);
        Ok(Self {
            origin: uuid::Uuid::new_v4().simple().to_string(),
            listener,
            pool,
            outbound,
            engine,
        })
    }

    /// Sends this process's changes and receives the others' until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Self {
            origin,
            mut listener,
            pool,
            mut outbound,
            engine,
        } = self;
        let sender = {
            let origin = origin.clone();
            async move {
                let mut batch = Vec::new();
                while outbound.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    // Each notification is a transaction that waits for its commit to reach
                    // the disk: gather the changes of a short window into one.
                    tokio::time::sleep(GATHER).await;
                    while batch.len() < MAX_BATCH {
                        match outbound.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    for payload in payloads(&origin, &batch) {
                        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                            .bind(CHANNEL)
                            .bind(&payload)
                            .execute(&pool)
                            .await
                        {
                            warn!(error = %e, "notifying other replicas failed; their watchers miss these changes");
                        }
                    }
                    batch.clear();
                }
            }
        };
        let receiver = async move {
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        for event in parse(&origin, n.payload()) {
                            engine.rebroadcast(event);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "listening for other replicas' changes failed; reconnecting");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = sender => {}
            () = receiver => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// Payloads of at most [`MAX_PAYLOAD`] bytes: the origin, then one `tenant id STATUS` a line.
fn payloads(origin: &str, events: &[MessageEvent]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = origin.to_owned();
    for e in events {
        // "\n{tenant} {id} {status}", written in place (a `format!` of each line first was
        // 1 % of mailgate's instructions per email).
        let line = [
            "\n",
            e.tenant_id.as_str(),
            " ",
            e.message_id.as_str(),
            " ",
            e.status.as_str(),
        ];
        let len: usize = line.iter().map(|s| s.len()).sum();
        if current.len() + len > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut current, origin.to_owned()));
        }
        current.extend(line);
    }
    if current.len() > origin.len() {
        out.push(current);
    }
    out
}

/// The events of another process's payload (none of our own, none malformed).
fn parse(own_origin: &str, payload: &str) -> Vec<MessageEvent> {
    let mut lines = payload.lines();
    if lines.next() == Some(own_origin) {
        return Vec::new();
    }
    lines
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (tenant, id, status) = (parts.next()?, parts.next()?, parts.next()?);
            Some(MessageEvent {
                tenant_id: tenant.to_owned(),
                message_id: id.to_owned(),
                status: MessageStatus::parse(status)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_split_under_the_limit_and_skip_their_origin() {
        let events: Vec<MessageEvent> = (0..300)
            .map(|i| MessageEvent {
                tenant_id: format!("tenant-{i}"),
                message_id: format!("0197a6c1-0000-7000-8000-{i:012}"),
                status: MessageStatus::Sent,
            })
            .collect();
        let sent = payloads("me", &events);
        assert!(sent.len() > 1 && sent.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let received: Vec<MessageEvent> = sent.iter().flat_map(|p| parse("other", p)).collect();
        assert_eq!(received, events);
        assert!(sent.iter().all(|p| parse("me", p).is_empty()));
        assert!(parse("other", "x\nbroken").is_empty());
    }
}
