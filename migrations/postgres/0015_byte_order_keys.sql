-- The email log's text keys compare byte by byte (COLLATE "C"), and the statistics' covering
-- index compares only what it is searched by.
--
-- Every email enters about ten B-tree indexes (the row, its recipients, its attempt, again
-- when its completion writes the row's new version), and each entry is placed by comparing
-- keys. Under the database's default collation (often `C.UTF-8` or `en_US.UTF-8`) each
-- comparison of two texts goes through the C library's locale code (`strcoll`), several
-- times the cost of `memcmp`. These keys are identifiers (UUIDv7 ids, tenant ids, status
-- names, lowercased addresses, idempotency keys) that no one reads in a language's order:
-- byte order is their natural order, and it keeps an id's creation-time order under every
-- default collation. Lookups by equality find the same rows under either order.
--
-- `messages_tenant_created_counts` (GetEmailStats' window counts) was searched by tenant and
-- time but compared all five of its columns on every insertion: the emails of one group share
-- their `created_at`, so each comparison went on through three text columns. Its status, type
-- and profile are now INCLUDE columns: still read from the index alone, never compared.
--
-- What each part saved is in docs/benchmarks.md (2026-12-07, seventh session).
--
-- Changing a column's collation does not rewrite the table, but it rebuilds every index on
-- that column: the migration holds an exclusive lock on `messages`, `message_recipients` and
-- `attempts` while it scans and sorts them (seconds for a few million emails; docs/operations.md,
-- Upgrading).

-- The rollup's update trigger names `status`; it is dropped and made again, unchanged (0011).
DROP TRIGGER log_rollup_mark_update ON messages;

ALTER TABLE messages
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN tenant_id TYPE TEXT COLLATE "C",
    ALTER COLUMN status TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C";

CREATE TRIGGER log_rollup_mark_update AFTER UPDATE OF status ON messages
FOR EACH ROW
WHEN (NEW.status IS DISTINCT FROM OLD.status
      AND NEW.created_at / 3600000000 < floor(date_part('epoch', clock_timestamp()) / 3600)::bigint)
EXECUTE FUNCTION log_rollup_mark_row();

ALTER TABLE message_recipients
    ALTER COLUMN tenant_id TYPE TEXT COLLATE "C",
    ALTER COLUMN email TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";

ALTER TABLE attempts ALTER COLUMN message_id TYPE TEXT COLLATE "C";

DROP INDEX messages_tenant_created_counts;
CREATE INDEX messages_tenant_created_counts
    ON messages (tenant_id, created_at) INCLUDE (status, email_type, profile_id)
    WHERE status <> 'SENDING';
