-- The hourly rollup's dirty marks (0008, 0010) for inserts and status changes: row triggers
-- that only rows of an ended hour reach.
--
-- The statement triggers of 0010 ran PL/pgSQL for every statement that stored or updated
-- emails, and made PostgreSQL keep a copy of each of their rows (transition tables) for it.
-- At 1,000 SendEmail/s, where most accepts are statements of their own, that was 15 % of
-- PostgreSQL's CPU per email and a quarter of SendEmail's median latency; yet almost every
-- such row is of the current hour, which no rollup watches. Each trigger's WHEN clause now
-- lets only a row created before the current hour (by the database's clock) reach the
-- function, which checks it against watched_until as before; the rest cost an integer
-- comparison. On PostgreSQL the rollup pass never sets watched_until beyond the
-- database's current hour, so a watched row always passes the WHEN clause. Deletes
-- (retention, in batches of old emails) keep their statement trigger.
DROP TRIGGER log_rollup_mark_insert ON messages;
DROP TRIGGER log_rollup_mark_update ON messages;

CREATE FUNCTION log_rollup_mark_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1) THEN
        INSERT INTO log_rollup_dirty (tenant_id, hour, version)
        VALUES (NEW.tenant_id, NEW.created_at / 3600000000, 1)
        ON CONFLICT (tenant_id, hour) DO UPDATE SET version = log_rollup_dirty.version + 1;
    END IF;
    RETURN NULL;
END
$$;

-- In the WHEN clauses, the database's current hour as created_at / 3600000000 counts it
-- is written out (built-in functions only): a SQL function there would be called, not
-- inlined, for every row. It is the hour when the row changes (clock_timestamp), not when
-- its statement began, as the statement triggers checked at the statement's end.
-- Replicas still running a release without that cap on watched_until (a rolling upgrade)
-- could watch an hour the database has not ended only if their clock ran ahead of the
-- database's by more than the time between two rollup passes.
CREATE TRIGGER log_rollup_mark_insert AFTER INSERT ON messages
FOR EACH ROW
WHEN (NEW.created_at / 3600000000 < floor(date_part('epoch', clock_timestamp()) / 3600)::bigint)
EXECUTE FUNCTION log_rollup_mark_row();

CREATE TRIGGER log_rollup_mark_update AFTER UPDATE OF status ON messages
FOR EACH ROW
WHEN (NEW.status IS DISTINCT FROM OLD.status
      AND NEW.created_at / 3600000000 < floor(date_part('epoch', clock_timestamp()) / 3600)::bigint)
EXECUTE FUNCTION log_rollup_mark_row();
