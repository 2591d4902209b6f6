-- The vault: one row holding the wrapped root key and the KDF parameters that unlock it.
CREATE TABLE vault (
    id                      INTEGER PRIMARY KEY CHECK (id = 1),
    kdf_algorithm           TEXT    NOT NULL,
    kdf_memory_kib          INTEGER NOT NULL,
    kdf_iterations          INTEGER NOT NULL,
    kdf_parallelism         INTEGER NOT NULL,
    kdf_salt                BLOB    NOT NULL,
    wrapped_root_key        BLOB    NOT NULL,
    wrapped_fingerprint_key BLOB    NOT NULL,
    root_generation         INTEGER NOT NULL,
    created_at              INTEGER NOT NULL,
    updated_at              INTEGER NOT NULL
);

-- One row per secret. The data key is wrapped by the root key; deleting the row destroys it.
CREATE TABLE secrets (
    id               TEXT    PRIMARY KEY,
    name             TEXT    NOT NULL UNIQUE,
    provider         TEXT    NOT NULL,
    wrapped_data_key BLOB    NOT NULL,
    tags             TEXT    NOT NULL DEFAULT '[]',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

-- Every version of every secret, sealed under the secret's data key.
CREATE TABLE versions (
    secret_id        TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    version          INTEGER NOT NULL CHECK (version > 0),
    stage            TEXT    NOT NULL CHECK (stage IN ('pending', 'current', 'previous', 'revoked')),
    ciphertext       BLOB    NOT NULL,
    meta             TEXT    NOT NULL DEFAULT '{}',
    fingerprint      BLOB    NOT NULL,
    created_at       INTEGER NOT NULL,
    stage_changed_at INTEGER NOT NULL,
    PRIMARY KEY (secret_id, version)
);
CREATE UNIQUE INDEX versions_one_current ON versions (secret_id) WHERE stage = 'current';
CREATE UNIQUE INDEX versions_one_previous ON versions (secret_id) WHERE stage = 'previous';
CREATE INDEX versions_fingerprint ON versions (fingerprint);

-- The append-only, hash-chained audit log.
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    secret      TEXT,
    incident_id TEXT,
    detail      TEXT    NOT NULL,
    prev_hash   BLOB    NOT NULL,
    hash        BLOB    NOT NULL
);
