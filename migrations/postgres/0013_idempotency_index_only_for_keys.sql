-- The idempotency keys' unique index holds only emails sent with a key (PostgreSQL only).
--
-- Most emails come without a key, and the unique constraint of 0001 indexed them all the
-- same: an entry when the email was stored, and another every time its row changed
-- (claimed, completed: a change of status or due_at cannot be a HOT update, so every index
-- of the table gets the new row version). Two NULL keys never conflict, so an index of the
-- rows that have a key enforces exactly the same rule. The writers' INSERT names the index
-- by its columns and this predicate (ON CONFLICT (tenant_id, idempotency_key) WHERE
-- idempotency_key IS NOT NULL), and the lookup of a replayed key (idempotency_key = $2)
-- implies the predicate, so both use it.
--
-- Building the index reads the whole table once, under a lock that holds up writes to it;
-- on a large log that takes a while at the upgrade (as 0006 and 0007 did).
CREATE UNIQUE INDEX messages_idempotency ON messages (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE messages DROP CONSTRAINT messages_tenant_id_idempotency_key_key;
