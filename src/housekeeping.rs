//! The background bookkeeping every process runs: log retention and the pruning of old
//! sending-limit windows. Safe to run in every replica at once: each batch is one idempotent
//! statement.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::RetentionConfig,
    delivery::now_micros,
    storage::{Store, StoreError},
};

/// Sending-limit windows are kept this long after they end (seconds).
const USAGE_KEPT_SECS: i64 = 2 * 86_400;

/// Hours of log statistics one pass rolls up at most (a first pass over an old log catches up
/// over several passes).
const ROLLUP_HOURS_PER_PASS: i64 = 500;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Log entries deleted.
    pub deleted: u64,
    /// Batches (statements) it took.
    pub batches: u64,
    /// Usage windows forgotten.
    pub pruned_windows: u64,
    /// Hours of log statistics rolled up or recomputed.
    pub rolled_hours: u64,
}

/// One pass at `now` (unix microseconds): deletes final entries older than the retention
/// age, one batch per statement, then forgets old usage windows.
pub async fn run_once(
    store: &dyn Store,
    config: &RetentionConfig,
    now: i64,
) -> Result<Pass, StoreError> {
    let mut pass = Pass::default();
    if !config.max_age.is_zero() {
        let age = i64::try_from(config.max_age.as_micros()).unwrap_or(i64::MAX);
        let cutoff = now.saturating_sub(age);
        let batch = config.batch_size.max(1);
        loop {
            let deleted = store.delete_expired(cutoff, batch).await?;
            pass.deleted += deleted;
            pass.batches += 1;
            if deleted < u64::from(batch) {
                break;
            }
            // Let the hot path have the database between batches.
            tokio::task::yield_now().await;
        }
    }
    pass.pruned_windows = store.prune_usage(now / 1_000_000 - USAGE_KEPT_SECS).await?;
    pass.rolled_hours = store.roll_up_log(now, ROLLUP_HOURS_PER_PASS).await?;
    Ok(pass)
}

/// Runs a pass every `config.interval` until `stop` turns true.
pub async fn run(store: Arc<dyn Store>, config: RetentionConfig, mut stop: watch::Receiver<bool>) {
    loop {
        match run_once(store.as_ref(), &config, now_micros()).await {
            Ok(pass) if pass.deleted > 0 => info!(
                deleted = pass.deleted,
                batches = pass.batches,
                "retention deleted old log entries"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "housekeeping pass failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.interval.max(Duration::from_secs(1))) => {}
            _ = stop.changed() => return,
        }
    }
}
