-- Every recipient (to, cc, bcc; lowercased) of every email, so the log's recipient filter is an
-- index lookup instead of a scan of the tenant's whole log.
CREATE TABLE message_recipients (
    tenant_id  TEXT NOT NULL,
    email      TEXT NOT NULL,
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    PRIMARY KEY (tenant_id, email, message_id)
);
CREATE INDEX message_recipients_message ON message_recipients (message_id);

-- Backfill from the space-separated `recipients` column (' a@x.org b@y.org ').
INSERT INTO message_recipients (tenant_id, email, message_id)
SELECT DISTINCT m.tenant_id, e.email, m.id
FROM messages m, unnest(string_to_array(btrim(m.recipients), ' ')) AS e (email)
WHERE e.email <> ''
ON CONFLICT DO NOTHING;
