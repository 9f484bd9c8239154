-- GetEmailStats reads only the index: the window's rows by creation time, with the columns
-- it counts by. Replaces the narrower (tenant_id, created_at) index.
CREATE INDEX messages_tenant_created_counts
    ON messages (tenant_id, created_at, status, email_type, profile_id);
DROP INDEX messages_tenant_created;
