-- Scheduling and quarantine state per secret.
ALTER TABLE secrets ADD COLUMN next_rotation_at INTEGER;
ALTER TABLE secrets ADD COLUMN last_rotated_at INTEGER;
ALTER TABLE secrets ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE secrets ADD COLUMN quarantined_at INTEGER;
ALTER TABLE secrets ADD COLUMN last_error TEXT;

-- The rotation journal (DESIGN.md §4): one row per rotation, moved forward one transaction per
-- step, so a daemon killed at any instant resumes from the last committed state.
CREATE TABLE rotations (
    id              TEXT    PRIMARY KEY,
    secret_id       TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    state           TEXT    NOT NULL CHECK (state IN ('planned', 'created', 'verified', 'promoted',
                                                      'pushed', 'draining', 'done', 'failed',
                                                      'rolled-back')),
    from_version    INTEGER,
    to_version      INTEGER,
    proposed        BLOB,
    reason          TEXT    NOT NULL,
    emergency       INTEGER NOT NULL DEFAULT 0,
    incident_id     TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at INTEGER,
    draining_since  INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
-- The same secret is never rotated twice at once.
CREATE UNIQUE INDEX rotations_one_active ON rotations (secret_id)
    WHERE state NOT IN ('done', 'failed', 'rolled-back');
CREATE INDEX rotations_by_secret ON rotations (secret_id, created_at);

-- What each consumer of a secret has acknowledged.
CREATE TABLE deliveries (
    secret_id  TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    consumer   TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    acked_at   INTEGER,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (secret_id, consumer)
);

-- Leases handed to agents. While the daemon runs its in-memory lease table is authoritative
-- (expiry, draining); this is its durable copy, written in group commits, so it carries no
-- secondary index: one b-tree insert per fetch. Ended leases are purged after a day (the audit
-- log keeps their history).
CREATE TABLE leases (
    id             TEXT    PRIMARY KEY,
    secret_id      TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    version        INTEGER,
    issued         BLOB,
    issued_meta    TEXT,
    uid            INTEGER NOT NULL,
    gid            INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    exe            TEXT,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    ended_at       INTEGER,
    end_reason     TEXT,
    upstream_state TEXT
) WITHOUT ROWID;
