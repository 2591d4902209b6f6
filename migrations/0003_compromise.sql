-- Compromise runs (`rotate-all`, the admin API, signals). Which secrets an incident rotated is
-- read from the rotations that carry its id.
CREATE TABLE incidents (
    id                TEXT    PRIMARY KEY,
    started_at        INTEGER NOT NULL,
    finished_at       INTEGER,
    scope             TEXT    NOT NULL,
    assume_compromise INTEGER NOT NULL,
    trigger           TEXT    NOT NULL,
    leases_revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX rotations_incident ON rotations (incident_id) WHERE incident_id IS NOT NULL;

-- Alerts raised by signals, canaries, leak reports and access anomalies.
CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    secret      TEXT,
    message     TEXT    NOT NULL,
    incident_id TEXT
);

-- Which callers (uid, executable) have fetched each secret: a new one is an anomaly.
CREATE TABLE access_seen (
    secret_id  TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    uid        INTEGER NOT NULL,
    exe        TEXT    NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (secret_id, uid, exe)
) WITHOUT ROWID;
