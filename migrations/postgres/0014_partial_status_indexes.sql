-- Each of the two indexes that hold `status` keeps only the emails it is read for, so an email
-- on the usual path (stored as SENDING when it is handed to the engine, then SENT) enters each
-- of them once instead of twice.
--
-- A completion changes `status`, so it is never a HOT update: the new version of the row gets
-- an entry in every index whose predicate it satisfies. Before this migration both status
-- indexes took the email at its accept and again at its completion; pricing them showed the
-- two together at 18 to 25 % of PostgreSQL's instructions per email (docs/benchmarks.md).
--
-- - `messages_tenant_status` lists the log filtered by status. It leaves out SENT, which is
--   most of any log: a listing of SENT emails reads `messages_tenant_newest` and skips the
--   others, and a listing of any other status (FAILED, DEFERRED, ...) reads this index.
-- - `messages_tenant_created_counts` counts a window of the log for GetEmailStats, from the
--   index alone. It leaves out SENDING: those emails are in flight, few at any time, and the
--   statistics count them from `messages_tenant_status`.
--
-- Statements from the release before keep working: a status filter without SENT still
-- implies the first predicate; that release's statistics cannot use the second index and read
-- the table instead (slower, not wrong) until its replicas are replaced.
--
-- The migration's transaction drops and builds both under an exclusive lock on `messages`
-- (each build a scan of the table: seconds for a few million emails).
DROP INDEX messages_tenant_status;
CREATE INDEX messages_tenant_status ON messages (tenant_id, status, id DESC)
    WHERE status <> 'SENT';
DROP INDEX messages_tenant_created_counts;
CREATE INDEX messages_tenant_created_counts
    ON messages (tenant_id, created_at, status, email_type, profile_id)
    WHERE status <> 'SENDING';
