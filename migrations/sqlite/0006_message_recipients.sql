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
INSERT OR IGNORE INTO message_recipients (tenant_id, email, message_id)
WITH RECURSIVE split (tenant_id, id, rest, email) AS (
    SELECT tenant_id, id, ltrim(recipients, ' '), NULL FROM messages
    UNION ALL
    SELECT tenant_id, id,
           CASE WHEN instr(rest, ' ') > 0 THEN ltrim(substr(rest, instr(rest, ' ') + 1), ' ')
                ELSE '' END,
           CASE WHEN instr(rest, ' ') > 0 THEN substr(rest, 1, instr(rest, ' ') - 1)
                ELSE rest END
    FROM split WHERE rest <> ''
)
SELECT tenant_id, email, id FROM split WHERE email IS NOT NULL AND email <> '';
