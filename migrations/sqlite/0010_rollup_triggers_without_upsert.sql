-- The hourly rollup's dirty marks (0008) without an upsert in the triggers.
--
-- The DO UPDATE of an upsert always resolves its conflicts by aborting the statement, so a
-- trigger holding one made every statement that stores or updates an email keep a statement
-- journal: a copy of each page before the statement's first change to it, kept in case the
-- statement alone had to be undone. The writer never undoes a statement alone (a failed
-- statement fails its whole transaction), and its statements say so (OR ROLLBACK). These
-- triggers mark an hour dirty without a conflict to resolve: insert the mark if the hour
-- has none, then count the change. The version a new mark gets is 1, as before.
DROP TRIGGER log_rollup_insert;
DROP TRIGGER log_rollup_update;
DROP TRIGGER log_rollup_delete;

CREATE TRIGGER log_rollup_insert AFTER INSERT ON messages
WHEN NEW.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    SELECT NEW.tenant_id, NEW.created_at / 3600000000, 0
    WHERE NOT EXISTS (SELECT 1 FROM log_rollup_dirty
                      WHERE tenant_id = NEW.tenant_id AND hour = NEW.created_at / 3600000000);
    UPDATE log_rollup_dirty SET version = version + 1
    WHERE tenant_id = NEW.tenant_id AND hour = NEW.created_at / 3600000000;
END;

CREATE TRIGGER log_rollup_update AFTER UPDATE OF status ON messages
WHEN NEW.status <> OLD.status
 AND NEW.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    SELECT NEW.tenant_id, NEW.created_at / 3600000000, 0
    WHERE NOT EXISTS (SELECT 1 FROM log_rollup_dirty
                      WHERE tenant_id = NEW.tenant_id AND hour = NEW.created_at / 3600000000);
    UPDATE log_rollup_dirty SET version = version + 1
    WHERE tenant_id = NEW.tenant_id AND hour = NEW.created_at / 3600000000;
END;

CREATE TRIGGER log_rollup_delete AFTER DELETE ON messages
WHEN OLD.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    SELECT OLD.tenant_id, OLD.created_at / 3600000000, 0
    WHERE NOT EXISTS (SELECT 1 FROM log_rollup_dirty
                      WHERE tenant_id = OLD.tenant_id AND hour = OLD.created_at / 3600000000);
    UPDATE log_rollup_dirty SET version = version + 1
    WHERE tenant_id = OLD.tenant_id AND hour = OLD.created_at / 3600000000;
END;
