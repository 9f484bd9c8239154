-- The recipient filter reads message_recipients (0006); the space-separated column it
-- replaced is no longer read or written.
ALTER TABLE messages DROP COLUMN recipients;
