-- Repeated fetches by one peer (uid, executable) of one version share one lease: each extends
-- it and adds one to `fetches`, durably, before it is answered. `audited_fetches` is how many of
-- them the audit chain already counts; the daemon folds the rest into `fetch.repeated` rows every
-- few seconds and at start, so every value handed out ends up in the chain.
ALTER TABLE leases ADD COLUMN fetches INTEGER NOT NULL DEFAULT 1;
ALTER TABLE leases ADD COLUMN audited_fetches INTEGER NOT NULL DEFAULT 1;
CREATE INDEX leases_unaudited ON leases (id) WHERE fetches > audited_fetches;
