-- Hourly counts of the email log for GetEmailStats: a housekeeping pass rolls up every ended
-- hour; a trigger marks an hour dirty when one of its rows changes after it was rolled up, and
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

CREATE FUNCTION log_rollup_mark() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tenant TEXT;
    h BIGINT;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        tenant := OLD.tenant_id;
        h := OLD.created_at / 3600000000;
    ELSE
        tenant := NEW.tenant_id;
        h := NEW.created_at / 3600000000;
    END IF;
    IF h < (SELECT watched_until FROM log_rollup_state WHERE id = 1) THEN
        INSERT INTO log_rollup_dirty (tenant_id, hour, version) VALUES (tenant, h, 1)
        ON CONFLICT (tenant_id, hour) DO UPDATE SET version = log_rollup_dirty.version + 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER log_rollup_mark AFTER INSERT OR DELETE OR UPDATE OF status ON messages
FOR EACH ROW EXECUTE FUNCTION log_rollup_mark();
