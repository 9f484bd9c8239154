//! The email log's queries: list with filters and cursor, statistics, and their plans.

use std::collections::BTreeMap;

use sqlx::Row as _;

use super::{
    sql::{bind_all, db_error, Backend, Bind, SqlStore},
    EmailStats, StoreError,
};
use crate::domain::{LogFilter, MessageStatus};

/// The statement listing a tenant's log: newest first, below the cursor, at most `limit`.
pub(super) fn list_query(
    backend: Backend,
    tenant_id: &str,
    filter: &LogFilter,
    before_id: Option<&str>,
    limit: u32,
) -> (String, Vec<Bind>) {
    let mut binds = vec![Bind::Text(tenant_id.to_owned())];
    let mut sql = format!(
        "SELECT {} FROM messages WHERE tenant_id = $1{}",
        super::rows::message_columns(backend),
        filter_clauses(filter, &mut binds, 1)
    );
    if let Some(before) = before_id {
        binds.push(Bind::Text(before.to_owned()));
        sql.push_str(&format!(" AND id < ${}", binds.len()));
    }
    binds.push(Bind::Int(i64::from(limit)));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", binds.len()));
    (sql, binds)
}

/// The statement requeueing a tenant's FAILED and DEFERRED emails that match `filter`.
pub(super) fn requeue_query(tenant_id: &str, filter: &LogFilter, now: i64) -> (String, Vec<Bind>) {
    let mut binds = vec![Bind::Int(now), Bind::Text(tenant_id.to_owned())];
    let sql = format!(
        "UPDATE messages SET status = 'QUEUED', due_at = $1, updated_at = $1, \
         lease_token = NULL WHERE tenant_id = $2{}{}",
        statuses_clause(&[MessageStatus::Failed, MessageStatus::Deferred]),
        filter_clauses(filter, &mut binds, 2)
    );
    (sql, binds)
}

/// The statement counting a window of a tenant's log: by status, type, profile and (with
/// `$4`) bucket, from indexes alone (PostgreSQL) or nearly (SQLite). Its rows may repeat a
/// key; they add up.
///
/// The covering index leaves out the emails in flight (SENDING; migration 0014 on
/// PostgreSQL, 0012 on SQLite), so they are counted apart, from the status index: few at any
/// time, whatever the window.
fn stats_query(backend: Backend, bucketed: bool) -> String {
    let (bucket, group_bucket) = if bucketed {
        ("created_at / $4", ", created_at / $4")
    } else {
        ("CAST(0 AS BIGINT)", "")
    };
    // SQLite's planner would take the (tenant, status) index to save the GROUP BY sort and
    // then read every row of the table; the covering index reads no row at all. It also
    // needs each partial index's own term in the query before it uses the index.
    let (counts, in_flight) = match backend {
        Backend::Sqlite => (
            " INDEXED BY messages_tenant_created_counts",
            " INDEXED BY messages_tenant_status",
        ),
        Backend::Postgres => ("", ""),
    };
    let part = |index: &str, statuses: &str| {
        format!(
            "SELECT status, email_type, COALESCE(profile_id, '') AS p, {bucket} AS b, \
             COUNT(*) AS n FROM messages{index} WHERE tenant_id = $1{statuses} \
             AND created_at >= $2 AND created_at < $3 \
             GROUP BY status, email_type, COALESCE(profile_id, ''){group_bucket}"
        )
    };
    format!(
        "{} UNION ALL {}",
        part(counts, " AND status <> 'SENDING'"),
        part(in_flight, &statuses_clause(&[MessageStatus::Sending])),
    )
}

/// Microseconds in an hour: the rollup's unit.
const HOUR: i64 = 3_600_000_000;

/// Counts gathered from rollup rows and live rows.
#[derive(Debug, Default)]
struct Counts {
    by_status: BTreeMap<String, i64>,
    by_type: BTreeMap<String, i64>,
    by_profile: BTreeMap<String, i64>,
    buckets: BTreeMap<i64, BTreeMap<String, i64>>,
}

impl Counts {
    /// Adds rows of (status, email_type, p, b, n); `b` times the bucket width is the bucket.
    fn add_rows(
        &mut self,
        rows: &[sqlx::any::AnyRow],
        bucket: Option<i64>,
    ) -> Result<(), StoreError> {
        for row in rows {
            let status: String = row.try_get("status").map_err(db_error)?;
            let kind: String = row.try_get("email_type").map_err(db_error)?;
            let profile: String = row.try_get("p").map_err(db_error)?;
            let b: i64 = row.try_get("b").map_err(db_error)?;
            let n: i64 = row.try_get("n").map_err(db_error)?;
            *self.by_status.entry(status.clone()).or_default() += n;
            *self.by_type.entry(kind).or_default() += n;
            *self.by_profile.entry(profile).or_default() += n;
            if let Some(width) = bucket {
                *self
                    .buckets
                    .entry(b * width)
                    .or_default()
                    .entry(status)
                    .or_default() += n;
            }
        }
        Ok(())
    }

    fn finish(self, bucketed: bool) -> EmailStats {
        // Largest count first, then by key.
        let ordered = |m: BTreeMap<String, i64>| {
            let mut v: Vec<(String, i64)> = m.into_iter().filter(|(_, n)| *n != 0).collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        let by_status = ordered(self.by_status);
        EmailStats {
            total: by_status.iter().map(|(_, n)| n).sum(),
            by_status,
            by_type: ordered(self.by_type),
            by_profile: ordered(self.by_profile),
            buckets: if bucketed {
                self.buckets
                    .into_iter()
                    .map(|(at, counts)| (at, counts.into_iter().collect()))
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// The statement summing clean rolled-up hours `[$2, $3)`, in buckets of `$4` hours when
/// `per` (hours a bucket) is not zero.
fn rollup_query(per: i64) -> String {
    let (group, group_by) = if per > 0 {
        ("hour / $4", ", hour / $4")
    } else {
        ("0", "")
    };
    format!(
        "SELECT status, email_type, profile_id AS p, CAST({group} AS BIGINT) AS b, \
         CAST(SUM(n) AS BIGINT) AS n \
         FROM log_rollup WHERE tenant_id = $1 AND hour >= $2 AND hour < $3 \
         AND hour NOT IN (SELECT hour FROM log_rollup_dirty WHERE tenant_id = $1) \
         GROUP BY status, email_type, profile_id{group_by}"
    )
}

/// Rewrites the rollup of `hour` from the log: for every tenant, or for one.
async fn recount(
    conn: &mut sqlx::AnyConnection,
    tenant: Option<&str>,
    hour: i64,
) -> Result<(), StoreError> {
    // The tenant parameter is NULL for all of them.
    sqlx::query("DELETE FROM log_rollup WHERE hour = $1 AND ($2 IS NULL OR tenant_id = $2)")
        .bind(hour)
        .bind(tenant)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    sqlx::query(
        "INSERT INTO log_rollup (tenant_id, hour, status, email_type, profile_id, n) \
         SELECT tenant_id, $1, status, email_type, COALESCE(profile_id, ''), COUNT(*) \
         FROM messages WHERE created_at >= $2 AND created_at < $3 \
         AND ($4 IS NULL OR tenant_id = $4) \
         GROUP BY tenant_id, status, email_type, COALESCE(profile_id, '')",
    )
    .bind(hour)
    .bind(hour * HOUR)
    .bind((hour + 1) * HOUR)
    .bind(tenant)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

impl SqlStore {
    /// The whole hours of `[start, end)` that are rolled up: `first..end` (empty when
    /// `end <= first`).
    async fn rolled_span(&self, start: i64, end: i64) -> Result<(i64, i64), StoreError> {
        let rolled_until: i64 =
            sqlx::query("SELECT rolled_until FROM log_rollup_state WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db_error)?;
        let first_hour = start.div_euclid(HOUR) + i64::from(start.rem_euclid(HOUR) != 0);
        Ok((first_hour, end.div_euclid(HOUR).min(rolled_until)))
    }

    pub(super) async fn stats(
        &self,
        tenant_id: &str,
        start: i64,
        end: i64,
        bucket: Option<i64>,
    ) -> Result<EmailStats, StoreError> {
        let mut acc = Counts::default();
        // Whole hours of the window that are rolled up and clean come from log_rollup; the
        // window's ragged ends, the hours not rolled up yet and dirty hours are counted live.
        let (first_hour, rolled_end) = self.rolled_span(start, end).await?;
        let hour_buckets = bucket.is_none_or(|w| w % HOUR == 0);
        let mut live = Vec::new();
        if first_hour < rolled_end && hour_buckets {
            let dirty: Vec<i64> = sqlx::query(
                "SELECT hour FROM log_rollup_dirty WHERE tenant_id = $1 AND hour >= $2 \
                 AND hour < $3 ORDER BY hour",
            )
            .bind(tenant_id)
            .bind(first_hour)
            .bind(rolled_end)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
            let per = bucket.map_or(0, |w| w / HOUR);
            let sql = rollup_query(per);
            let mut query = sqlx::query(&sql)
                .bind(tenant_id)
                .bind(first_hour)
                .bind(rolled_end);
            if per > 0 {
                query = query.bind(per);
            }
            let rows = query.fetch_all(&self.pool).await.map_err(db_error)?;
            acc.add_rows(&rows, bucket)?;
            live.push((start, first_hour * HOUR));
            live.push((rolled_end * HOUR, end));
            live.extend(dirty.into_iter().map(|h| (h * HOUR, (h + 1) * HOUR)));
        } else {
            live.push((start, end));
        }
        let sql = stats_query(self.backend, bucket.is_some());
        for (from, to) in live.into_iter().filter(|(a, b)| a < b) {
            // Planned with its values (see list_messages): the range decides the index.
            let mut query = sqlx::query(&sql)
                .persistent(false)
                .bind(tenant_id)
                .bind(from)
                .bind(to);
            if let Some(width) = bucket {
                query = query.bind(width);
            }
            let rows = query.fetch_all(&self.pool).await.map_err(db_error)?;
            acc.add_rows(&rows, bucket)?;
        }
        Ok(acc.finish(bucket.is_some()))
    }

    /// Rolls up, for every tenant, the hours the triggers have watched since the previous
    /// pass (at most `max_hours` of them) and recomputes up to 1,000 dirty hours. Returns the
    /// hours written.
    pub(super) async fn roll_up_log_hours(
        &self,
        now: i64,
        max_hours: i64,
    ) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT watched_until, rolled_until FROM log_rollup_state WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        let watched: i64 = row.try_get(0).map_err(db_error)?;
        let stored_rolled: i64 = row.try_get(1).map_err(db_error)?;
        let mut rolled = stored_rolled;
        // Hours watched since the previous pass are safe to roll up: a change that began
        // before the triggers watched them has long committed. Ended hours get watched now.
        // On PostgreSQL, never beyond the database's own current hour: its triggers let only
        // rows of hours before that one reach their check (migration 0011), so a watched
        // hour must be one of them whatever this process's clock says.
        let current = now.div_euclid(HOUR);
        if watched < current {
            let watch = match self.backend {
                Backend::Postgres => {
                    "UPDATE log_rollup_state SET watched_until = hour FROM (SELECT LEAST($1, \
                     floor(date_part('epoch', statement_timestamp()) / 3600)::bigint) AS hour) \
                     AS h WHERE id = 1 AND watched_until < hour"
                }
                Backend::Sqlite => {
                    "UPDATE log_rollup_state SET watched_until = $1 WHERE id = 1 AND watched_until < $1"
                }
            };
            sqlx::query(watch)
                .bind(current)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
        }
        if rolled == 0 {
            let oldest: Option<i64> = sqlx::query("SELECT MIN(created_at) FROM messages")
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(db_error)?;
            rolled = oldest.map_or(watched, |t| t.div_euclid(HOUR)).min(watched);
        }
        let mut written = 0;
        let to = watched.min(rolled.saturating_add(max_hours));
        // Replicas run this pass too: each hour's transaction first moves rolled_until on
        // from the value this pass expects, which locks the row. A replica that finds it
        // moved already stops instead of counting the same hour.
        let mut expected = stored_rolled;
        for hour in rolled..to {
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let claimed = sqlx::query(
                "UPDATE log_rollup_state SET rolled_until = $1 WHERE id = 1 AND rolled_until = $2",
            )
            .bind(hour + 1)
            .bind(expected)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            if claimed.rows_affected() == 0 {
                break;
            }
            recount(&mut tx, None, hour).await?;
            tx.commit().await.map_err(db_error)?;
            expected = hour + 1;
            written += 1;
        }
        let dirty = sqlx::query(
            "SELECT tenant_id, hour, version FROM log_rollup_dirty WHERE hour < $1 \
             ORDER BY hour LIMIT 1000",
        )
        .bind(rolled.max(to))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        for row in dirty {
            let tenant: String = row.try_get(0).map_err(db_error)?;
            let hour: i64 = row.try_get(1).map_err(db_error)?;
            let version: i64 = row.try_get(2).map_err(db_error)?;
            // The mark goes first, which locks it: a replica recounting the same hour waits
            // and then finds nothing to do, and a change whose trigger bumped the version
            // keeps the mark for the next pass (its own transaction holds the row until it
            // commits, so the recount below never misses it silently).
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            let taken = sqlx::query(
                "DELETE FROM log_rollup_dirty WHERE tenant_id = $1 AND hour = $2 AND version = $3",
            )
            .bind(&tenant)
            .bind(hour)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            if taken.rows_affected() == 0 {
                continue;
            }
            recount(&mut tx, Some(&tenant), hour).await?;
            tx.commit().await.map_err(db_error)?;
            written += 1;
        }
        Ok(written)
    }

    /// The database's plan for listing the log with `filter` (EXPLAIN QUERY PLAN on SQLite,
    /// EXPLAIN ANALYZE on PostgreSQL), one line a step. For the benchmark's report.
    pub async fn explain_list(
        &self,
        tenant_id: &str,
        filter: &LogFilter,
        before_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let (sql, binds) = list_query(self.backend, tenant_id, filter, before_id, limit);
        self.explain(&sql, &binds).await
    }

    /// The database's plans for GetEmailStats over `[start, end)`: the rollup's whole hours,
    /// then the live count of the window's end after the last rolled-up hour.
    pub async fn explain_stats(
        &self,
        tenant_id: &str,
        start: i64,
        end: i64,
        bucket: Option<i64>,
    ) -> Result<Vec<String>, StoreError> {
        let (first_hour, rolled_end) = self.rolled_span(start, end).await?;
        let rolled_end = rolled_end.max(first_hour);
        let per = bucket.map_or(0, |w| w / HOUR);
        let mut binds = vec![
            Bind::Text(tenant_id.to_owned()),
            Bind::Int(first_hour),
            Bind::Int(rolled_end),
        ];
        if per > 0 {
            binds.push(Bind::Int(per));
        }
        let mut plan = vec![format!(
            "-- rollup: hours {first_hour}..{rolled_end} ({} hours)",
            rolled_end - first_hour
        )];
        plan.extend(self.explain(&rollup_query(per), &binds).await?);
        let mut binds = vec![
            Bind::Text(tenant_id.to_owned()),
            Bind::Int(rolled_end * HOUR),
            Bind::Int(end),
        ];
        if let Some(width) = bucket {
            binds.push(Bind::Int(width));
        }
        plan.push(format!(
            "-- live: the last {} minutes of the window",
            (end - rolled_end * HOUR) / 60_000_000
        ));
        plan.extend(
            self.explain(&stats_query(self.backend, bucket.is_some()), &binds)
                .await?,
        );
        Ok(plan)
    }

    /// The database's plan for requeueing with `filter` (RequeueEmails), without running it.
    pub async fn explain_requeue(
        &self,
        tenant_id: &str,
        filter: &LogFilter,
    ) -> Result<Vec<String>, StoreError> {
        let (sql, binds) = requeue_query(tenant_id, filter, 0);
        self.plan(&sql, &binds, false).await
    }

    async fn explain(&self, sql: &str, binds: &[Bind]) -> Result<Vec<String>, StoreError> {
        self.plan(sql, binds, true).await
    }

    /// The plan of `sql`; on PostgreSQL also run (`analyzed`) for its timings.
    async fn plan(
        &self,
        sql: &str,
        binds: &[Bind],
        analyzed: bool,
    ) -> Result<Vec<String>, StoreError> {
        let (prefix, column) = match self.backend {
            Backend::Sqlite => ("EXPLAIN QUERY PLAN ", 3),
            Backend::Postgres if analyzed => ("EXPLAIN (ANALYZE, BUFFERS) ", 0),
            Backend::Postgres => ("EXPLAIN ", 0),
        };
        let explained = format!("{prefix}{sql}");
        let rows = bind_all(sqlx::query(&explained), binds)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(column).map_err(db_error))
            .collect()
    }
}

/// ` AND status IN (...)` for `statuses` (not empty). Without SENT among them it also says
/// `status <> 'SENT'`: the status index leaves SENT out (migration 0014 on PostgreSQL, 0012 on
/// SQLite), and SQLite uses a partial index only for a query that carries its term.
fn statuses_clause(statuses: &[MessageStatus]) -> String {
    // Status names are fixed identifiers from an enum, never caller text.
    let list = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!(" AND status IN ({list})");
    if !statuses.contains(&MessageStatus::Sent) {
        sql.push_str(" AND status <> 'SENT'");
    }
    sql
}

/// The WHERE clauses of a log filter; `tenant` is the number of the `$n` bound to the tenant.
pub(super) fn filter_clauses(filter: &LogFilter, binds: &mut Vec<Bind>, tenant: usize) -> String {
    let mut sql = String::new();
    let mut push = |sql: &mut String, clause: &str, bind: Bind| {
        binds.push(bind);
        sql.push_str(&clause.replace("$?", &format!("${}", binds.len())));
    };
    if !filter.statuses.is_empty() {
        sql.push_str(&statuses_clause(&filter.statuses));
    }
    let exact = [
        ("email_type", &filter.email_type),
        ("source", &filter.source),
        ("profile_id", &filter.profile_id),
        ("template_id", &filter.template_id),
        ("campaign_id", &filter.campaign_id),
    ];
    for (column, value) in exact {
        if let Some(value) = value {
            push(
                &mut sql,
                &format!(" AND {column} = $?"),
                Bind::Text(value.clone()),
            );
        }
    }
    if let Some(recipient) = &filter.recipient {
        push(
            &mut sql,
            &format!(
                " AND id IN (SELECT message_id FROM message_recipients \
                 WHERE tenant_id = ${tenant} AND email = $?)"
            ),
            Bind::Text(recipient.to_ascii_lowercase()),
        );
    }
    if let Some(text) = &filter.subject_contains {
        let pattern = format!("%{}%", escape_like(&text.to_lowercase()));
        push(
            &mut sql,
            " AND LOWER(subject) LIKE $? ESCAPE '\\'",
            Bind::Text(pattern),
        );
    }
    if let Some(start) = filter.start {
        push(&mut sql, " AND created_at >= $?", Bind::Int(start));
    }
    if let Some(end) = filter.end {
        push(&mut sql, " AND created_at < $?", Bind::Int(end));
    }
    sql
}

fn escape_like(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}
