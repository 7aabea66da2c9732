-- The due-work indexes key on `next_attempt_at`, which is NULL exactly when
-- the message is final (the Postgres migration of the same number explains
-- why: claims there become HOT updates).
UPDATE messages SET next_attempt_at = NULL
    WHERE status NOT IN ('scheduled', 'queued', 'deferred', 'sending') AND next_attempt_at IS NOT NULL;
DROP INDEX messages_pending_idx;
CREATE INDEX messages_pending_idx ON messages (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
DROP INDEX messages_expiring_idx;
CREATE INDEX messages_expiring_idx ON messages (expires_at)
    WHERE expires_at IS NOT NULL AND next_attempt_at IS NOT NULL;
