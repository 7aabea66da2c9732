-- The webhook dispatcher claims due deliveries endpoint by endpoint, each
-- up to its share of the request slots (so an endpoint that hangs cannot
-- hold them all). The due-work index leads with the endpoint, so each
-- endpoint's due deliveries are one index range, whatever the backlog of
-- another; the index it replaces served only a claim across all endpoints.
DROP INDEX webhook_deliveries_due_idx;
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (webhook_id, next_attempt_at)
    WHERE status = 'pending';
