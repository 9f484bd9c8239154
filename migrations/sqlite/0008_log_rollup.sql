-- Hourly counts of the email log for GetEmailStats: a housekeeping pass rolls up every ended
-- hour; triggers mark an hour dirty when one of its rows changes after it was rolled up, and
-- statistics count dirty and recent hours live.
CREATE TABLE log_rollup (
    tenant_id  TEXT   NOT NULL,
    hour       BIGINT NOT NULL,   -- created_at / 3600000000
    status     TEXT   NOT NULL,
    email_type TEXT   NOT NULL,
    profile_id TEXT   NOT NULL,   -- '' without a profile
    n          BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, hour, status, email_type, profile_id)
);

-- watched_until: rows of earlier hours mark their hour dirty when they change.
-- rolled_until: earlier hours are in log_rollup (unless dirty).
CREATE TABLE log_rollup_state (
    id            BIGINT PRIMARY KEY,
    watched_until BIGINT NOT NULL,
    rolled_until  BIGINT NOT NULL
);
INSERT INTO log_rollup_state (id, watched_until, rolled_until) VALUES (1, 0, 0);

CREATE TABLE log_rollup_dirty (
    tenant_id TEXT   NOT NULL,
    hour      BIGINT NOT NULL,
    version   BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, hour)
);

CREATE TRIGGER log_rollup_insert AFTER INSERT ON messages
WHEN NEW.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    VALUES (NEW.tenant_id, NEW.created_at / 3600000000, 1)
    ON CONFLICT (tenant_id, hour) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER log_rollup_update AFTER UPDATE OF status ON messages
WHEN NEW.status <> OLD.status
 AND NEW.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    VALUES (NEW.tenant_id, NEW.created_at / 3600000000, 1)
    ON CONFLICT (tenant_id, hour) DO UPDATE SET version = version + 1;
END;

CREATE TRIGGER log_rollup_delete AFTER DELETE ON messages
WHEN OLD.created_at / 3600000000 < (SELECT watched_until FROM log_rollup_state WHERE id = 1)
BEGIN
    INSERT INTO log_rollup_dirty (tenant_id, hour, version)
    VALUES (OLD.tenant_id, OLD.created_at / 3600000000, 1)
    ON CONFLICT (tenant_id, hour) DO UPDATE SET version = version + 1;
END;
