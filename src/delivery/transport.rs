//! Transports: how a message reaches a server. Tenant profiles use pooled SMTP sessions; the
//! system default service is the operator's SMTP relay or the file drop.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant as StdInstant},
};

use tokio::time::Instant;

use super::{
    filedrop::FileDrop,
    guard::Guard,
    smtp::{Accepted, FailureKind, Session, SmtpFailure, SmtpTarget, Stage},
};

/// How long an idle pooled session may be reused.
const IDLE_LIFETIME: Duration = Duration::from_secs(30);
/// Most idle sessions kept per profile.
const MAX_IDLE: usize = 64;

/// The operator's system default service.
#[derive(Debug, Clone)]
pub enum SystemService {
    /// An SMTP relay.
    Smtp(SmtpTarget),
    /// The embedded file drop.
    FileDrop(FileDrop),
}

#[derive(Debug, Default)]
struct PoolEntry {
    version: i64,
    idle: Vec<(Session, StdInstant)>,
}

/// Pooled SMTP sessions per profile. A profile change (new version) replaces its pool.
#[derive(Debug)]
pub struct Transports {
    guard: Guard,
    system: SystemService,
    pools: Mutex<HashMap<String, PoolEntry>>,
}

/// One message on its way: envelope and bytes.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Tenant (for the file drop's folder).
    pub tenant_id: &'a str,
    /// mailgate's id (for the file drop's file name).
    pub message_id: &'a str,
    /// Envelope sender.
    pub envelope_from: &'a str,
    /// Envelope recipients.
    pub recipients: &'a [String],
    /// The message.
    pub body: &'a [u8],
}

impl Transports {
    /// Transports with the operator's guard and system default service.
    pub fn new(guard: Guard, system: SystemService) -> Self {
        Self {
            guard,
            system,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The operator's system default service.
    pub fn system(&self) -> &SystemService {
        &self.system
    }

    /// The SSRF guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    fn checkout(&self, key: &str, version: i64) -> Option<Session> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let entry = pools.entry(key.to_owned()).or_default();
        if entry.version != version {
            entry.idle.clear();
            entry.version = version;
        }
        while let Some((session, since)) = entry.idle.pop() {
            if since.elapsed() < IDLE_LIFETIME && session.is_usable() {
                return Some(session);
            }
        }
        None
    }

    fn checkin(&self, key: &str, version: i64, session: Session) {
        if !session.is_usable() {
            return;
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let entry = pools.entry(key.to_owned()).or_default();
        if entry.version == version && entry.idle.len() < MAX_IDLE {
            entry.idle.push((session, StdInstant::now()));
        }
    }

    /// Sends through an SMTP target, reusing a pooled session of `pool_key` when one is idle.
    /// A reused session that turns out dead is replaced once by a fresh one.
    pub async fn send_smtp(
        &self,
        pool_key: &str,
        version: i64,
        target: &SmtpTarget,
        out: &Outgoing<'_>,
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        if let Some(mut session) = self.checkout(pool_key, version) {
            match session
                .send(out.envelope_from, out.recipients, out.body, deadline)
                .await
            {
                Err(f)
                    if f.stage == Stage::MailFrom
                        && matches!(f.kind, FailureKind::Network | FailureKind::Protocol) => {}
                result => {
                    self.checkin(pool_key, version, session);
                    return result;
                }
            }
        }
        let mut session = Session::open(target, &self.guard, deadline).await?;
        let result = session
            .send(out.envelope_from, out.recipients, out.body, deadline)
            .await;
        self.checkin(pool_key, version, session);
        result
    }

    /// Sends through the system default service.
    pub async fn send_system(
        &self,
        out: &Outgoing<'_>,
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        match &self.system {
            SystemService::Smtp(target) => self.send_smtp("system", 0, target, out, deadline).await,
            SystemService::FileDrop(drop) => {
                let path = drop
                    .write(
                        out.tenant_id,
                        out.message_id,
                        out.envelope_from,
                        out.recipients,
                        out.body,
                    )
                    .await
                    .map_err(|e| SmtpFailure {
                        stage: Stage::Data,
                        kind: FailureKind::Network,
                        code: None,
                        enhanced_code: String::new(),
                        text: format!("file drop: {e}"),
                    })?;
                Ok(Accepted {
                    code: 250,
                    enhanced_code: String::new(),
                    text: format!("written to {}", path.display()),
                    rejected: Vec::new(),
                })
            }
        }
    }

    /// "host:port" of the system default service, or "file-drop".
    pub fn system_server(&self) -> String {
        match &self.system {
            SystemService::Smtp(target) => target.server(),
            SystemService::FileDrop(_) => "file-drop".to_owned(),
        }
    }

    /// Closes idle sessions politely.
    pub async fn close_idle(&self) {
        let sessions: Vec<Session> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .values_mut()
                .flat_map(|entry| entry.idle.drain(..).map(|(s, _)| s))
                .collect()
        };
        for session in sessions {
            session.quit().await;
        }
    }
}
