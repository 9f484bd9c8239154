//! Sending-limit counters and retention: the store's background bookkeeping.

use super::{
    sql::{db_error, Backend, SqlStore},
    StoreError,
};

impl SqlStore {
    pub(super) async fn reserve_usage_slot(
        &self,
        profile_id: &str,
        window_secs: i64,
        window_start: i64,
        limit: u32,
    ) -> Result<bool, StoreError> {
        // One statement: insert the window's first use, or count one more while under the
        // limit. A full window updates nothing and returns no row.
        let row = sqlx::query(
            "INSERT INTO profile_usage (profile_id, window_secs, window_start, used) \
             VALUES ($1, $2, $3, 1) \
             ON CONFLICT (profile_id, window_secs, window_start) \
             DO UPDATE SET used = profile_usage.used + 1 WHERE profile_usage.used < $4 \
             RETURNING used",
        )
        .bind(profile_id)
        .bind(window_secs)
        .bind(window_start)
        .bind(i64::from(limit))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(row.is_some())
    }

    pub(super) async fn prune_usage_windows(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM profile_usage WHERE window_start + window_secs < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    pub(super) async fn delete_expired_entries(
        &self,
        before: i64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        // Only final entries: a message still waiting to be sent is never dropped, however
        // old. Attempts and recipients go with their message (ON DELETE CASCADE; on
        // PostgreSQL a trigger does it, see migration 0012).
        let oldest = "SELECT id FROM messages WHERE created_at < $1 AND due_at IS NULL \
                      ORDER BY created_at LIMIT $2";
        // PostgreSQL: by primary key, whatever the statistics (see `claim_one`).
        let sql = match self.backend {
            Backend::Postgres => {
                format!("DELETE FROM messages WHERE due_at IS NULL AND id = ANY(ARRAY({oldest}))")
            }
            Backend::Sqlite => {
                format!("DELETE FROM messages WHERE due_at IS NULL AND id IN ({oldest})")
            }
        };
        let deleted = sqlx::query(&sql)
            .bind(before)
            .bind(i64::from(batch))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(deleted.rows_affected())
    }
}
