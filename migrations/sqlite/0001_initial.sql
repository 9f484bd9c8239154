-- mailgate schema for SQLite. Times are unix microseconds (UTC).

CREATE TABLE smtp_profiles (
    id                TEXT    PRIMARY KEY,
    tenant_id         TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    settings          TEXT    NOT NULL,  -- JSON document of every setting but name and secrets
    secret_ciphertext TEXT,              -- AEAD ciphertext of the password or token, with key id
    status            TEXT    NOT NULL,
    verification      TEXT    NOT NULL,  -- JSON: state, verified_at, last_error
    created_by        TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    version           INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE tenant_settings (
    tenant_id  TEXT    PRIMARY KEY,
    settings   TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);

-- One row per email: the email log entry and the outbox (queue) item at once.
CREATE TABLE messages (
    id                TEXT    PRIMARY KEY,  -- UUIDv7: sorts by creation time
    tenant_id         TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    source            TEXT    NOT NULL,
    email_type        TEXT    NOT NULL,
    subject           TEXT    NOT NULL,
    sender            TEXT    NOT NULL,
    recipients        TEXT    NOT NULL,     -- ' a@x.org b@y.org ': lowercased, for the filter
    profile_id        TEXT,
    profile_reason    TEXT    NOT NULL,
    fallback          INTEGER NOT NULL DEFAULT 0,
    fallback_reason   TEXT    NOT NULL DEFAULT '',
    template_id       TEXT,
    campaign_id       TEXT,
    content           TEXT    NOT NULL,     -- JSON: everything needed to compose the email
    message_id_header TEXT    NOT NULL,
    trace_id          TEXT    NOT NULL DEFAULT '',
    tags              TEXT    NOT NULL DEFAULT '{}',
    attempt_count     INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NOT NULL DEFAULT '',
    idempotency_key   TEXT,
    request_hash      TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    sent_at           INTEGER,
    send_at           INTEGER,
    -- When a worker may take the message: its next attempt (SCHEDULED, QUEUED, DEFERRED) or
    -- the end of its lease (SENDING). NULL once final (SENT, FAILED, CANCELLED).
    due_at            INTEGER,
    lease_token       TEXT,
    UNIQUE (tenant_id, idempotency_key)
);

CREATE INDEX messages_due ON messages (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX messages_tenant_newest ON messages (tenant_id, id DESC);
CREATE INDEX messages_tenant_status ON messages (tenant_id, status, id DESC);

CREATE TABLE attempts (
    message_id          TEXT    NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    number              INTEGER NOT NULL,
    started_at          INTEGER NOT NULL,
    duration_us         INTEGER NOT NULL,
    server              TEXT    NOT NULL,
    profile_id          TEXT,
    fallback            INTEGER NOT NULL DEFAULT 0,
    reply_code          INTEGER NOT NULL,
    enhanced_code       TEXT    NOT NULL,
    reply_text          TEXT    NOT NULL,
    outcome             TEXT    NOT NULL,
    rejected_recipients TEXT    NOT NULL DEFAULT '[]',
    PRIMARY KEY (message_id, number)
);
