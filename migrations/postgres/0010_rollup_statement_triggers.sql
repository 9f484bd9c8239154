-- The hourly rollup's dirty marks (0008), set once per statement instead of once per row.
--
-- The row trigger called PL/pgSQL for every email accepted and every status change: two
-- calls per email, a tenth of PostgreSQL's time under load, almost always to find that the
-- row's hour is not watched yet. These statement triggers see the statement's rows as
-- transition tables and mark each watched (tenant, hour) once. A mark only has to change
-- the version: one increment per statement serves the housekeeping pass as well as one per
-- row. SQLite keeps its row triggers (0008): their WHEN clause skips unwatched hours
-- without running anything.
DROP TRIGGER log_rollup_mark ON messages;
DROP FUNCTION log_rollup_mark();

CREATE FUNCTION log_rollup_mark_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO log_rollup_dirty (tenant_id, hour, version)
        SELECT tenant_id, created_at / 3600000000, 1 FROM new_rows
        WHERE created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
        GROUP BY 1, 2
        ON CONFLICT (tenant_id, hour) DO UPDATE SET version = log_rollup_dirty.version + 1;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO log_rollup_dirty (tenant_id, hour, version)
        SELECT tenant_id, created_at / 3600000000, 1 FROM old_rows
        WHERE created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
        GROUP BY 1, 2
        ON CONFLICT (tenant_id, hour) DO UPDATE SET version = log_rollup_dirty.version + 1;
    ELSE
        -- An UPDATE: only a changed status changes the counts (an id never changes).
        INSERT INTO log_rollup_dirty (tenant_id, hour, version)
        SELECT n.tenant_id, n.created_at / 3600000000, 1
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status <> o.status
          AND n.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
        GROUP BY 1, 2
        ON CONFLICT (tenant_id, hour) DO UPDATE SET version = log_rollup_dirty.version + 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER log_rollup_mark_insert AFTER INSERT ON messages
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION log_rollup_mark_rows();

CREATE TRIGGER log_rollup_mark_update AFTER UPDATE ON messages
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION log_rollup_mark_rows();

CREATE TRIGGER log_rollup_mark_delete AFTER DELETE ON messages
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION log_rollup_mark_rows();
