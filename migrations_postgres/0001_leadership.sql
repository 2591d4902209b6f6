-- One leader per store: the lease row, renewed on the database's clock, and its term (the
-- fencing token every leader-only write checks). The row always exists; an expired lease is
-- one whose valid_until has passed.
CREATE TABLE leadership (
    id          SMALLINT PRIMARY KEY CHECK (id = 1),
    holder      TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    term        BIGINT NOT NULL,
    valid_until TIMESTAMPTZ NOT NULL,
    since       TIMESTAMPTZ NOT NULL
);
INSERT INTO leadership (id, holder, host, pid, term, valid_until, since)
VALUES (1, '', '', 0, 0, 'epoch', 'epoch');

-- Every daemon on the store, leader or follower, as last seen by its own heartbeat.
CREATE TABLE daemons (
    id      TEXT PRIMARY KEY,
    host    TEXT NOT NULL,
    pid     BIGINT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL
);
