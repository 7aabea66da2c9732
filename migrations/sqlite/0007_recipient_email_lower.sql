-- Recipients are looked up by address case-insensitively: the list filter
-- (`GET /v1/messages?to=`) and collapse-key superseding both compare
-- LOWER(email). The plain index on `email` served neither (an expression
-- must match an index's expression to use it), so it cost every accept an
-- index insert for nothing, and a list by recipient scanned messages
-- newest first, testing each. One index, on the expression both use.
DROP INDEX IF EXISTS recipients_email_idx;
CREATE INDEX recipients_email_lower_idx ON recipients (LOWER(email));
