-- attempts and message_recipients without foreign keys to messages (PostgreSQL only).
--
-- Every check of those keys looked the message up and locked its row: once for each
-- recipient when an email was stored, once for each attempt when its delivery was recorded.
-- In a burst of SendEmail calls that was about a tenth of PostgreSQL's CPU per email
-- (docs/benchmarks.md, 2026-12-03, fourth session). The keys guarded nothing the statements
-- do not guarantee already:
-- - recipients are stored in the statement that stores their email, only for the rows its
--   INSERT returned (an email whose idempotency key was taken returns none);
-- - attempts are stored in the statement that completes their email, only for the rows its
--   UPDATE returned: the row exists, and it stays locked until the attempt is committed.
--
-- What ON DELETE CASCADE did, a statement trigger does: it deletes the attempts and
-- recipients of the emails a DELETE removed (retention, in batches, or a person by hand),
-- and a release still running the older retention during a rolling upgrade leaves nothing
-- behind either. Inserts and updates, the hot path, never fire it. Its statements run after
-- the DELETE, with a snapshot of their own, so they also see an attempt committed while the
-- DELETE waited for the row's lock. The indexes that find a message's rows stay: attempts'
-- primary key starts with message_id, and message_recipients_message (0006).
--
-- SQLite keeps its keys: checking them is an index lookup in the writer's own process.
ALTER TABLE attempts DROP CONSTRAINT attempts_message_id_fkey;
ALTER TABLE message_recipients DROP CONSTRAINT message_recipients_message_id_fkey;

CREATE FUNCTION messages_delete_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- By key, whatever the statistics: a transition table has none.
    DELETE FROM attempts WHERE message_id = ANY(ARRAY(SELECT id FROM old_rows));
    DELETE FROM message_recipients WHERE message_id = ANY(ARRAY(SELECT id FROM old_rows));
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_delete_children AFTER DELETE ON messages
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION messages_delete_children();
