-- Which version of a secret is current, and under which name: a MAC under the vault's
-- integrity key, so a database writer cannot roll `current` back to an old (revoked) version or
-- swap two secrets' names unnoticed.
ALTER TABLE secrets ADD COLUMN current_mac BLOB;
