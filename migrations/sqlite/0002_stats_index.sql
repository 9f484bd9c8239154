-- Time-window queries (statistics, time filters) per tenant.
CREATE INDEX messages_tenant_created ON messages (tenant_id, created_at);
