-- A message with secret variables keeps only its redacted MIME in
-- `message_bodies` (`mime` stays NULL) and, on its own row while it is in
-- flight, a small patch that turns that copy into the MIME sent. The outcome
-- update that makes the message final clears the patch, so the body row is
-- written once and never holds two full copies. Rows written before keep
-- their full `mime` until final, as before.
ALTER TABLE messages ADD COLUMN mime_patch TEXT;
