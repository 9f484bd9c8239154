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
        // old.
        let oldest = "SELECT id FROM messages WHERE created_at < $1 AND due_at IS NULL \
                      ORDER BY created_at LIMIT $2";
        match self.backend {
            Backend::Postgres => self.delete_expired_postgres(oldest, before, batch).await,
            Backend::Sqlite => {
                // Attempts and recipients go with their message (ON DELETE CASCADE).
                let deleted = sqlx::query(&format!(
                    "DELETE FROM messages WHERE due_at IS NULL AND id IN ({oldest})"
                ))
                .bind(before)
                .bind(i64::from(batch))
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
                Ok(deleted.rows_affected())
            }
        }
    }

    /// PostgreSQL keeps no foreign keys from attempts and recipients to their message
    /// (migration 0012): one statement deletes the emails and their rows. It runs in a
    /// REPEATABLE READ transaction, so that an email whose row changed after the statement's
    /// snapshot (queued again, delivered, an attempt recorded that the snapshot cannot see)
    /// fails the statement instead of leaving that attempt behind; the batch is then tried
    /// again on a new snapshot.
    async fn delete_expired_postgres(
        &self,
        oldest: &str,
        before: i64,
        batch: u32,
    ) -> Result<u64, StoreError> {
        // By primary key, whatever the statistics (see `claim_one`).
        let sql = format!(
            "WITH gone AS (DELETE FROM messages \
               WHERE due_at IS NULL AND id = ANY(ARRAY({oldest})) RETURNING id), \
             a AS (DELETE FROM attempts WHERE message_id IN (SELECT id FROM gone)), \
             r AS (DELETE FROM message_recipients WHERE message_id IN (SELECT id FROM gone)) \
             SELECT count(*) FROM gone"
        );
        let mut tries = 0;
        loop {
            tries += 1;
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let deleted = async {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    .execute(&mut *tx)
                    .await?;
                let deleted: i64 = sqlx::query_scalar(&sql)
                    .bind(before)
                    .bind(i64::from(batch))
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(deleted)
            }
            .await;
            match deleted {
                Ok(n) => return Ok(u64::try_from(n).unwrap_or(0)),
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(SERIALIZATION_FAILURE) && tries < 5 => {}
                Err(e) => return Err(db_error(e)),
            }
        }
    }
}

/// PostgreSQL's SQLSTATE for a transaction that conflicted with a concurrent one.
const SERIALIZATION_FAILURE: &str = "40001";
