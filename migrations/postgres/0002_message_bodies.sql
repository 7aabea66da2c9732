-- MIME bodies live beside the message, not in it: a message row is updated
-- on every claim and outcome, and copying kilobytes of MIME with it on each
-- update was most of the store's write volume.
CREATE TABLE message_bodies (
    message_id TEXT PRIMARY KEY,
    mime TEXT,
    mime_redacted TEXT
);
INSERT INTO message_bodies (message_id, mime, mime_redacted)
    SELECT id, mime, mime_redacted FROM messages;
ALTER TABLE messages DROP COLUMN mime;
ALTER TABLE messages DROP COLUMN mime_redacted;
