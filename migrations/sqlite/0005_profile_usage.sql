-- Sending-limit counters: how many messages each profile sent in a window (a second or a UTC day).
-- Workers reserve a slot with one atomic upsert, so the limits hold across replicas.
CREATE TABLE profile_usage (
    profile_id TEXT NOT NULL,
    window_secs BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (profile_id, window_secs, window_start)
);

-- Retention deletes the oldest entries first.
CREATE INDEX messages_created ON messages (created_at);
