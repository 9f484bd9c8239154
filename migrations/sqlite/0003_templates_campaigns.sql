-- Templates and campaigns: identity and references in columns, the rest as a JSON document.
CREATE TABLE templates (
    id         TEXT    PRIMARY KEY,
    tenant_id  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    profile_id TEXT,
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX templates_profile ON templates (profile_id) WHERE profile_id IS NOT NULL;

CREATE TABLE campaigns (
    id         TEXT    PRIMARY KEY,
    tenant_id  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    profile_id TEXT,
    body       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX campaigns_profile ON campaigns (profile_id) WHERE profile_id IS NOT NULL;
