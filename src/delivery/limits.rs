//! Per-profile sending limits: a rate (messages per second) and a quota (messages per UTC day).
//!
//! Slots are counted in the store (`profile_usage`), one atomic upsert per slot, so the limits
//! hold across every replica on one database. A message over a limit is not failed: the
//! worker either waits for a slot a few seconds ahead, or puts the message back in the queue
//! until the window that has room.

use std::{collections::HashMap, sync::Mutex};

use crate::{
    domain::SmtpProfile,
    storage::{Store, StoreError},
};

/// Seconds in a quota window (one UTC day).
pub(super) const DAY_SECS: i64 = 86_400;

/// What a profile's limits allow for one message now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    /// Send at this unix second (now, or a second a little ahead that has a free slot).
    SendAt(i64),
    /// Every slot in reach is taken: queue the message until this unix second.
    Wait {
        /// When to look again.
        until: i64,
        /// Why, for the log.
        note: String,
    },
}

/// Reserves sending slots; remembers which seconds it found full, so a busy profile costs
/// one statement per message, not one per full window.
#[derive(Debug, Default)]
pub(super) struct Limiter {
    full_until: Mutex<HashMap<String, i64>>,
}

impl Limiter {
    /// Takes a slot for one message of `profile` at or after `now` (unix seconds), looking at
    /// most `lookahead` seconds ahead for a free per-second slot.
    pub(super) async fn admit(
        &self,
        store: &dyn Store,
        profile: &SmtpProfile,
        now: i64,
        lookahead: i64,
    ) -> Result<Admission, StoreError> {
        let limits = &profile.settings.limits;
        let mut send_at = now;
        if limits.per_second > 0 {
            let first = self.first_open_second(&profile.id).max(now);
            let mut slot = None;
            for second in first..=now + lookahead {
                if store
                    .reserve_slot(&profile.id, 1, second, limits.per_second)
                    .await?
                {
                    slot = Some(second);
                    break;
                }
                self.mark_full(&profile.id, second);
            }
            match slot {
                Some(second) => send_at = second,
                None => {
                    return Ok(Admission::Wait {
                        until: now + lookahead + 1,
                        note: format!(
                            "waiting for the rate limit of profile {:?} ({} per second)",
                            profile.name, limits.per_second
                        ),
                    })
                }
            }
        }
        if limits.per_day > 0 {
            let day = send_at - send_at.rem_euclid(DAY_SECS);
            if !store
                .reserve_slot(&profile.id, DAY_SECS, day, limits.per_day)
                .await?
            {
                // The per-second slot, if any, goes unused: that only slows this profile.
                return Ok(Admission::Wait {
                    until: day + DAY_SECS,
                    note: format!(
                        "waiting for the next UTC day: profile {:?} reached its quota of {} \
                         messages per day",
                        profile.name, limits.per_day
                    ),
                });
            }
        }
        Ok(Admission::SendAt(send_at))
    }

    fn first_open_second(&self, profile_id: &str) -> i64 {
        let full = self.full_until.lock().unwrap_or_else(|e| e.into_inner());
        full.get(profile_id).map_or(i64::MIN, |s| s + 1)
    }

    fn mark_full(&self, profile_id: &str, second: i64) {
        let mut full = self.full_until.lock().unwrap_or_else(|e| e.into_inner());
        if full.len() > 10_000 {
            full.clear();
        }
        let entry = full.entry(profile_id.to_owned()).or_insert(second);
        *entry = (*entry).max(second);
    }
}
