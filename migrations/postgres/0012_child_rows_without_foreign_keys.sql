-- attempts and message_recipients without foreign keys to messages (PostgreSQL only).
--
-- Every check of those keys looked the message up and locked its row: once for each
-- recipient when an email was stored, once for each attempt when its delivery was recorded.
-- In a burst of SendEmail calls that was a fifth of PostgreSQL's CPU per email, and taking
-- it away raised the delivered rate by 15-19 % (docs/benchmarks.md, 2026-12-03, fourth
-- session). The keys guarded nothing the statements do not guarantee already:
-- - recipients are stored in the statement that stores their email, only for the rows its
--   INSERT returned (an email whose idempotency key was taken returns none);
-- - attempts are stored in the statement that completes their email, only for the rows its
--   UPDATE returned (the row exists and the worker still held its lease);
-- - retention deletes an email's attempts and recipients in the statement that deletes the
--   email (ON DELETE CASCADE did that before), in a REPEATABLE READ transaction that fails
--   rather than miss an attempt recorded meanwhile.
-- The indexes that find the child rows of a message stay: attempts' primary key starts with
-- message_id, and message_recipients_message (0006).
-- SQLite keeps its keys: checking them is an index lookup in the writer's own process.
ALTER TABLE attempts DROP CONSTRAINT attempts_message_id_fkey;
ALTER TABLE message_recipients DROP CONSTRAINT message_recipients_message_id_fkey;
