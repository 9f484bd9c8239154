-- Each of the two indexes that hold `status` keeps only the emails it is read for, so an email
-- on the usual path (stored as SENDING when it is handed to the engine, then SENT) enters each
-- of them once instead of twice: its completion changes `status`, which moved its entry in
-- both (a delete and an insert in each B-tree).
--
-- - `messages_tenant_status` lists the log filtered by status. It leaves out SENT, which is
--   most of any log: a listing of SENT emails reads `messages_tenant_newest` and skips the
--   others; a filter without SENT says `status <> 'SENT'`, the term SQLite needs to see
--   before it uses a partial index.
-- - `messages_tenant_created_counts` counts a window of the log for GetEmailStats, from the
--   index alone. It leaves out SENDING: those emails are in flight, few at any time, and the
--   statistics count them from `messages_tenant_status`.
--
-- The release before names `messages_tenant_created_counts` in its statistics (INDEXED BY)
-- without the new predicate, which SQLite then refuses: stop the old process before the new
-- one migrates (a SQLite file is one process's anyway).
DROP INDEX messages_tenant_status;
CREATE INDEX messages_tenant_status ON messages (tenant_id, status, id DESC)
    WHERE status <> 'SENT';
DROP INDEX messages_tenant_created_counts;
CREATE INDEX messages_tenant_created_counts
    ON messages (tenant_id, created_at, status, email_type, profile_id)
    WHERE status <> 'SENDING';
