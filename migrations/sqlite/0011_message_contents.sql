-- Each email's content (the JSON document the email is composed from: addresses, subject,
-- bodies, headers, attachments) in a table of its own, out of the `messages` row.
--
-- A completion rewrites its email's row. With the content in it, that row was about 2 KB
-- (two to a 4 KB page), so every completion rewrote the content too, and the pages of the
-- `messages` table were 40 % of the pages a SendEmail burst wrote to the WAL. Without it the
-- row is a few hundred bytes: the content is written once, when the email is stored, and
-- never again (docs/benchmarks.md, 2026-12-07, fourth session).
--
-- `message_contents.id` is an INTEGER PRIMARY KEY (the rowid, which VACUUM keeps), written
-- at the insert and kept in `messages.content_id`: the content is found by rowid, with no
-- index of its own to update. Deleting an email deletes its content (the trigger below),
-- whatever deletes it: retention, or a person by hand.
--
-- PostgreSQL keeps the content in the row: moving it out of line there (TOAST) showed no gain.
CREATE TABLE message_contents (
    id      INTEGER PRIMARY KEY,
    content TEXT    NOT NULL
);

ALTER TABLE messages ADD COLUMN content_id INTEGER;

-- Existing emails: each content under its email's current rowid (unique, and free in the
-- new table), then the column goes.
INSERT INTO message_contents (id, content) SELECT rowid, content FROM messages;
UPDATE messages SET content_id = rowid;
ALTER TABLE messages DROP COLUMN content;

CREATE TRIGGER messages_delete_content AFTER DELETE ON messages
BEGIN
    DELETE FROM message_contents WHERE id = OLD.content_id;
END;
