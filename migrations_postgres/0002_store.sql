-- The store's tables as SQLite has them after migrations/0001..0012, in PostgreSQL's types:
-- INTEGER is BIGINT (times are Unix milliseconds, as in SQLite), BLOB is BYTEA, TEXT is TEXT.
-- Values are sealed exactly as in SQLite. `src/store/postgres/tests.rs` checks that both
-- schemas have the same tables, columns, types, nullability and keys: a migration added on
-- one side needs its twin here.

CREATE TABLE vault (
    id                      BIGINT PRIMARY KEY CHECK (id = 1),
    kdf_algorithm           TEXT   NOT NULL,
    kdf_memory_kib          BIGINT NOT NULL,
    kdf_iterations          BIGINT NOT NULL,
    kdf_parallelism         BIGINT NOT NULL,
    kdf_salt                BYTEA  NOT NULL,
    wrapped_root_key        BYTEA  NOT NULL,
    wrapped_fingerprint_key BYTEA  NOT NULL,
    root_generation         BIGINT NOT NULL,
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL
);

CREATE TABLE secrets (
    id               TEXT   PRIMARY KEY,
    name             TEXT   NOT NULL UNIQUE,
    provider         TEXT   NOT NULL,
    wrapped_data_key BYTEA  NOT NULL,
    tags             TEXT   NOT NULL DEFAULT '[]',
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    next_rotation_at BIGINT,
    last_rotated_at  BIGINT,
    failed_attempts  BIGINT NOT NULL DEFAULT 0,
    quarantined_at   BIGINT,
    last_error       TEXT,
    current_mac      BYTEA
);

CREATE TABLE versions (
    secret_id        TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    version          BIGINT NOT NULL CHECK (version > 0),
    stage            TEXT   NOT NULL CHECK (stage IN ('pending', 'current', 'previous', 'revoked')),
    ciphertext       BYTEA  NOT NULL,
    meta             TEXT   NOT NULL DEFAULT '{}',
    fingerprint      BYTEA  NOT NULL,
    created_at       BIGINT NOT NULL,
    stage_changed_at BIGINT NOT NULL,
    PRIMARY KEY (secret_id, version)
);
CREATE UNIQUE INDEX versions_one_current ON versions (secret_id) WHERE stage = 'current';
CREATE UNIQUE INDEX versions_one_previous ON versions (secret_id) WHERE stage = 'previous';
CREATE INDEX versions_fingerprint ON versions (fingerprint);

CREATE TABLE audit (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    secret      TEXT,
    incident_id TEXT,
    detail      TEXT   NOT NULL,
    prev_hash   BYTEA  NOT NULL,
    hash        BYTEA  NOT NULL
);
CREATE INDEX audit_broker_requests ON audit (at) WHERE action = 'broker.request';
CREATE INDEX audit_broker_blocks ON audit (seq)
    WHERE action IN ('broker.blocked', 'broker.unblocked');

CREATE TABLE audit_seals (
    seq BIGINT PRIMARY KEY,
    mac BYTEA  NOT NULL,
    at  BIGINT NOT NULL
);

CREATE TABLE audit_anchor (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    seq         BIGINT NOT NULL,
    hash        BYTEA  NOT NULL,
    archived_at BIGINT NOT NULL
);

CREATE TABLE rotations (
    id              TEXT   PRIMARY KEY,
    secret_id       TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    state           TEXT   NOT NULL CHECK (state IN ('planned', 'created', 'verified', 'promoted',
                                                     'pushed', 'draining', 'done', 'failed',
                                                     'rolled-back')),
    from_version    BIGINT,
    to_version      BIGINT,
    proposed        BYTEA,
    reason          TEXT   NOT NULL,
    emergency       BIGINT NOT NULL DEFAULT 0,
    incident_id     TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at BIGINT,
    draining_since  BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX rotations_one_active ON rotations (secret_id)
    WHERE state NOT IN ('done', 'failed', 'rolled-back');
CREATE INDEX rotations_by_secret ON rotations (secret_id, created_at);
CREATE INDEX rotations_incident ON rotations (incident_id) WHERE incident_id IS NOT NULL;

CREATE TABLE deliveries (
    secret_id  TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    consumer   TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    acked_at   BIGINT,
    attempts   BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (secret_id, consumer)
);

CREATE TABLE leases (
    id              TEXT   PRIMARY KEY,
    secret_id       TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    version         BIGINT,
    issued          BYTEA,
    issued_meta     TEXT,
    uid             BIGINT NOT NULL,
    gid             BIGINT NOT NULL,
    pid             BIGINT NOT NULL,
    exe             TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    ended_at        BIGINT,
    end_reason      TEXT,
    upstream_state  TEXT,
    fetches         BIGINT NOT NULL DEFAULT 1,
    audited_fetches BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX leases_unaudited ON leases (id) WHERE fetches > audited_fetches;

CREATE TABLE incidents (
    id                TEXT   PRIMARY KEY,
    started_at        BIGINT NOT NULL,
    finished_at       BIGINT,
    scope             TEXT   NOT NULL,
    assume_compromise BIGINT NOT NULL,
    trigger           TEXT   NOT NULL,
    leases_revoked    BIGINT NOT NULL DEFAULT 0,
    closed_by         TEXT
);

CREATE TABLE alerts (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    secret      TEXT,
    message     TEXT   NOT NULL,
    incident_id TEXT,
    acked_at    BIGINT,
    acked_by    TEXT
);

CREATE TABLE access_seen (
    secret_id  TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    uid        BIGINT NOT NULL,
    exe        TEXT   NOT NULL,
    first_seen BIGINT NOT NULL,
    PRIMARY KEY (secret_id, uid, exe)
);

CREATE TABLE issue_journal (
    lease_id    TEXT   PRIMARY KEY,
    secret_id   TEXT   NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    secret_name TEXT   NOT NULL,
    created_at  BIGINT NOT NULL
);
