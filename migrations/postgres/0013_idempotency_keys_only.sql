-- Idempotency keys are unique per tenant through an index of only the emails that carry one.
--
-- The unique constraint of 0001 indexed every email, with or without a key: each email
-- without one (most of them) added a (tenant, NULL) entry that no lookup ever reads, and,
-- because a completion rewrites the row with a new version (its status is indexed, so the
-- update is never HOT), another entry at every status change. What leaving them out saved is
-- measured in docs/benchmarks.md (2026-12-06, fifth session).
--
-- Uniqueness is unchanged: NULL keys never conflicted with one another, and every key
-- present is in the new index. The writers' conflict target already names the predicate
-- (`ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL`), which
-- the old constraint and this index both satisfy, so replicas of builds that have it keep
-- accepting during the upgrade (docs/operations.md, Upgrading). Lookups by key
-- (`idempotency_key = $2`) imply the predicate and use the index.
--
-- The migration's transaction builds the index with a scan of the table, during which
-- writes to `messages` wait (seconds for a few million emails), then drops the constraint
-- under an exclusive lock that also holds up reads until the migration commits.
CREATE UNIQUE INDEX messages_tenant_idempotency_key
    ON messages (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE messages DROP CONSTRAINT messages_tenant_id_idempotency_key_key;
