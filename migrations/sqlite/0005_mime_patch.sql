-- A message with secret variables keeps its redacted MIME and a small patch
-- that turns it into the MIME sent (`mime` stays NULL). Once the message is
-- final the patch is dropped, so the row never held two full copies and the
-- redaction no longer rewrites one. Rows written before keep `mime`.
ALTER TABLE message_bodies ADD COLUMN mime_patch TEXT;
