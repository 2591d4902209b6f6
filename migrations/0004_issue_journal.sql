-- Credentials being minted for a lease (`issue`): a row is written, durably, before the plugin
-- is called and deleted once the lease that holds the credential is committed, or the
-- credential is revoked. A row left with no lease after a crash names a credential to revoke.
CREATE TABLE issue_journal (
    lease_id    TEXT    PRIMARY KEY,
    secret_id   TEXT    NOT NULL REFERENCES secrets (id) ON DELETE CASCADE,
    secret_name TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
