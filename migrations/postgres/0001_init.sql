-- Mailroom schema (Postgres). Times are Unix epoch milliseconds (BIGINT);
-- JSON documents are TEXT. The SQLite migration mirrors this file.

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    prefix TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    mode TEXT NOT NULL,
    rate_millis BIGINT, -- thousandths of a request per second
    burst BIGINT,
    daily_quota BIGINT,
    monthly_quota BIGINT,
    per_recipient_hourly BIGINT,
    allowed_from_domains TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE templates (
    name TEXT NOT NULL,
    locale TEXT NOT NULL,
    version BIGINT NOT NULL,
    subject TEXT NOT NULL,
    html TEXT,
    text_body TEXT,
    required TEXT NOT NULL,
    secret TEXT NOT NULL,
    description TEXT,
    priority TEXT,
    builtin BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, locale, version)
);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    from_addr TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    subject TEXT NOT NULL,
    template TEXT,
    template_version BIGINT,
    locale TEXT,
    tags TEXT NOT NULL,
    metadata TEXT NOT NULL,
    message_id_header TEXT NOT NULL,
    mime TEXT,
    mime_redacted TEXT,
    size_bytes BIGINT NOT NULL,
    send_at BIGINT,
    expires_at BIGINT,
    collapse_key TEXT,
    canceled_reason TEXT,
    superseded_by TEXT,
    next_attempt_at BIGINT,
    enqueued_at BIGINT NOT NULL,
    lease_until BIGINT,
    lease_owner TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX messages_key_idx ON messages (key_id, id);
CREATE INDEX messages_created_idx ON messages (key_id, created_at);
CREATE INDEX messages_pending_idx ON messages (next_attempt_at)
    WHERE status IN ('scheduled', 'queued', 'deferred', 'sending');
CREATE INDEX messages_expiring_idx ON messages (expires_at)
    WHERE expires_at IS NOT NULL AND status IN ('scheduled', 'queued', 'deferred', 'sending');
CREATE INDEX messages_collapse_idx ON messages (key_id, collapse_key)
    WHERE collapse_key IS NOT NULL;

CREATE TABLE recipients (
    message_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT,
    smtp_code BIGINT,
    enhanced_code TEXT,
    response TEXT,
    canceled_reason TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX recipients_email_idx ON recipients (email);

CREATE TABLE attempts (
    id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    recipient_idx BIGINT NOT NULL,
    recipient TEXT NOT NULL,
    at BIGINT NOT NULL,
    relay TEXT NOT NULL,
    outcome TEXT NOT NULL,
    smtp_code BIGINT,
    enhanced_code TEXT,
    response TEXT NOT NULL,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX attempts_message_idx ON attempts (message_id);

CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    message_id TEXT,
    key_id TEXT,
    recipient TEXT,
    message_seq BIGINT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_message_idx ON events (message_id);

CREATE TABLE suppressions (
    email TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    message_id TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE idempotency (
    key_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    response_status BIGINT,
    response_body TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);

CREATE TABLE collapse_heads (
    key_id TEXT NOT NULL,
    collapse_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (key_id, collapse_key)
);

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    description TEXT,
    secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_until BIGINT,
    disabled_at BIGINT,
    disabled_reason TEXT,
    failing_since BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at BIGINT,
    lease_until BIGINT,
    last_status_code BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_webhook_idx ON webhook_deliveries (webhook_id, id);

CREATE TABLE webhook_attempts (
    id BIGSERIAL PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    status_code BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT
);
CREATE INDEX webhook_attempts_delivery_idx ON webhook_attempts (delivery_id);
