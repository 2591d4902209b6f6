-- 0011 indexed every audit row by (action, at) for two reads that need only brokers' rows (the
-- day's `broker.request` rows, summed at start; the last `broker.blocked`/`broker.unblocked`
-- row of each broker). Every other row paid for it: each rotation's audit rows dirtied one
-- index page per action in every commit. Partial indexes keep the reads and spare the rest.
DROP INDEX audit_action_at;
CREATE INDEX audit_broker_requests ON audit (at) WHERE action = 'broker.request';
CREATE INDEX audit_broker_blocks ON audit (seq) WHERE action IN ('broker.blocked', 'broker.unblocked');
