//! The email log's queries: list with filters and cursor, statistics, and their plans.

use std::collections::BTreeMap;

use sqlx::Row as _;

use super::{
    sql::{bind_all, db_error, Bind, Backend, SqlStore},
    EmailStats, StoreError,
};
use crate::domain::LogFilter;

/// The statement listing a tenant's log: newest first, below the cursor, at most `limit`.
pub(super) fn list_query(
    tenant_id: &str,
    filter: &LogFilter,
    before_id: Option<&str>,
    limit: u32,
) -> (String, Vec<Bind>) {
    let mut binds = vec![Bind::Text(tenant_id.to_owned())];
    let mut sql = format!(
        "SELECT {} FROM messages WHERE tenant_id = $1{}",
        super::rows::MESSAGE_COLUMNS,
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

/// The statement counting a window of a tenant's log in one pass: by status, type, profile
/// and (with `$4`) bucket.
fn stats_query(bucketed: bool) -> String {
    let bucket = if bucketed { ", created_at / $4" } else { "" };
    format!(
        "SELECT status, email_type, COALESCE(profile_id, '') AS p{bucket} AS b, COUNT(*) AS n \
         FROM messages WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3 \
         GROUP BY status, email_type, COALESCE(profile_id, ''){bucket}"
    )
    .replace(", COALESCE(profile_id, '') AS p AS b", ", COALESCE(profile_id, '') AS p, 0 AS b")
}

impl SqlStore {
    pub(super) async fn stats(
        &self,
        tenant_id: &str,
        start: i64,
        end: i64,
        bucket: Option<i64>,
    ) -> Result<EmailStats, StoreError> {
        let sql = stats_query(bucket.is_some());
        let mut query = sqlx::query(&sql).bind(tenant_id).bind(start).bind(end);
        if let Some(width) = bucket {
            query = query.bind(width);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(db_error)?;
        let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_type: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_profile: BTreeMap<String, i64> = BTreeMap::new();
        let mut buckets: BTreeMap<i64, BTreeMap<String, i64>> = BTreeMap::new();
        for row in rows {
            let status: String = row.try_get("status").map_err(db_error)?;
            let kind: String = row.try_get("email_type").map_err(db_error)?;
            let profile: String = row.try_get("p").map_err(db_error)?;
            let b: i64 = row.try_get("b").map_err(db_error)?;
            let n: i64 = row.try_get("n").map_err(db_error)?;
            *by_status.entry(status.clone()).or_default() += n;
            *by_type.entry(kind).or_default() += n;
            *by_profile.entry(profile).or_default() += n;
            if let Some(width) = bucket {
                *buckets
                    .entry(b * width)
                    .or_default()
                    .entry(status)
                    .or_default() += n;
            }
        }
        // Largest count first, then by key.
        let ordered = |m: BTreeMap<String, i64>| {
            let mut v: Vec<(String, i64)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        let by_status = ordered(by_status);
        Ok(EmailStats {
            total: by_status.iter().map(|(_, n)| n).sum(),
            by_status,
            by_type: ordered(by_type),
            by_profile: ordered(by_profile),
            buckets: buckets
                .into_iter()
                .map(|(at, counts)| (at, counts.into_iter().collect()))
                .collect(),
        })
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
        let (sql, binds) = list_query(tenant_id, filter, before_id, limit);
        self.explain(&sql, &binds).await
    }

    /// The database's plan for GetEmailStats over `[start, end)`.
    pub async fn explain_stats(
        &self,
        tenant_id: &str,
        start: i64,
        end: i64,
        bucket: Option<i64>,
    ) -> Result<Vec<String>, StoreError> {
        let mut binds = vec![
            Bind::Text(tenant_id.to_owned()),
            Bind::Int(start),
            Bind::Int(end),
        ];
        if let Some(width) = bucket {
            binds.push(Bind::Int(width));
        }
        self.explain(&stats_query(bucket.is_some()), &binds).await
    }

    async fn explain(&self, sql: &str, binds: &[Bind]) -> Result<Vec<String>, StoreError> {
        let (prefix, column) = match self.backend {
            Backend::Sqlite => ("EXPLAIN QUERY PLAN ", 3),
            Backend::Postgres => ("EXPLAIN (ANALYZE, BUFFERS) ", 0),
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

/// The WHERE clauses of a log filter; `tenant` is the number of the `$n` bound to the tenant.
pub(super) fn filter_clauses(filter: &LogFilter, binds: &mut Vec<Bind>, tenant: usize) -> String {
    let mut sql = String::new();
    let mut push = |sql: &mut String, clause: &str, bind: Bind| {
        binds.push(bind);
        sql.push_str(&clause.replace("$?", &format!("${}", binds.len())));
    };
    if !filter.statuses.is_empty() {
        // Status names are fixed identifiers from an enum, never caller text.
        let list = filter
            .statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        sql.push_str(&format!(" AND status IN ({list})"));
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
