-- Keyed seals over the audit chain: HMAC of a row's hash under a key only an unlocked vault
-- holds. A database writer can rewrite rows and recompute every SHA-256 of the chain, but not a
-- seal; `audit verify --keyed` checks each seal against the recomputed chain.
CREATE TABLE audit_seals (
    seq INTEGER PRIMARY KEY,
    mac BLOB    NOT NULL,
    at  INTEGER NOT NULL
);
