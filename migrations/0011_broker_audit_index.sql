-- Brokered requests are audit rows (`broker.request`); the daemon sums the day's rows at start
-- so budgets survive a restart, and reads the last `broker.blocked`/`broker.unblocked` row of
-- each broker. This index keeps both reads to the rows they need.
CREATE INDEX audit_action_at ON audit (action, at);
