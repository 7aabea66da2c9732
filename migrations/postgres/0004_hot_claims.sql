-- A claim changes a message's status and lease. While an index (or a
-- partial index's predicate) read `status`, every claim was a non-HOT
-- update that inserted a new entry into each of the table's indexes. The
-- due-work indexes now key on `next_attempt_at`, which is NULL exactly when
-- the message is final, and the tables leave room on each page so that the
-- new row version of a claim (and of a recipient's outcome) stays on its
-- page.
UPDATE messages SET next_attempt_at = NULL
    WHERE status NOT IN ('scheduled', 'queued', 'deferred', 'sending') AND next_attempt_at IS NOT NULL;
DROP INDEX messages_pending_idx;
CREATE INDEX messages_pending_idx ON messages (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
DROP INDEX messages_expiring_idx;
CREATE INDEX messages_expiring_idx ON messages (expires_at)
    WHERE expires_at IS NOT NULL AND next_attempt_at IS NOT NULL;
ALTER TABLE messages SET (fillfactor = 70);
ALTER TABLE recipients SET (fillfactor = 70);
