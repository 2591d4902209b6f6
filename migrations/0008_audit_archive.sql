-- Where this store's audit chain begins once older rows were moved to an archive file
-- (`keywarden audit archive`): the last archived row's sequence number and hash. The next row
-- links to it; its keyed seal stays in audit_seals under the same sequence number.
CREATE TABLE audit_anchor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL,
    hash        BLOB    NOT NULL,
    archived_at INTEGER NOT NULL
);
