//! The hash-chained audit table.

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use crate::audit::{AuditEvent, AuditRecord, GENESIS_HASH};
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::StoreError;

use super::PgStore;

impl PgStore {
    /// Appends audit rows in one transaction.
    pub async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let events: std::sync::Arc<[AuditEvent]> = events.into();
        self.write(Box::new(move |conn, chain, _| {
            let events = events.clone();
            Box::pin(async move { chain.append(conn, &events).await })
        }))
        .await
    }

    /// Up to `limit` audit rows with `seq > after`, in order.
    pub async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, secret, incident_id, detail, prev_hash, hash \
             FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The last `limit` audit rows, in order.
    pub async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, secret, incident_id, detail, prev_hash, hash \
             FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT $1) AS tail ORDER BY seq",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The chain head: the last row's sequence number and hash.
    pub async fn audit_head(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self.audit_tail(1).await?.pop().map(|r| (r.seq, r.hash)))
    }

    /// Where the chain in this store begins when older rows were archived: the last archived
    /// row's (seq, hash).
    pub async fn audit_anchor(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT seq, hash FROM audit_anchor WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The last row written before `before`, if any: where an archive up to that time ends.
    pub async fn audit_last_before(&self, before: Millis) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT max(seq) FROM audit WHERE at < $1")
                .bind(before)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Removes the rows up to `through_seq` (already written to an archive) in one
    /// transaction: the row must still have `hash`; it becomes the chain's anchor, sealed
    /// under `key` (the unlocked vault's integrity key), and `event` is appended after it.
    pub async fn archive_audit(
        &self,
        key: &IntegrityKey,
        through_seq: i64,
        hash: &[u8],
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let found: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = $1")
            .bind(through_seq)
            .fetch_optional(&mut *tx)
            .await?;
        if found.as_deref() != Some(hash) {
            // "audit row N changed concurrently; try again": nothing was removed.
            return Err(StoreError::Conflict(format!("audit row {through_seq}")));
        }
        let at = now_millis();
        sqlx::query("DELETE FROM audit WHERE seq <= $1")
            .bind(through_seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM audit_seals WHERE seq <= $1")
            .bind(through_seq)
            .execute(&mut *tx)
            .await?;
        seal(&mut tx, key, through_seq, hash, at).await?;
        sqlx::query(
            "INSERT INTO audit_anchor (id, seq, hash, archived_at) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, \
             archived_at = excluded.archived_at",
        )
        .bind(through_seq)
        .bind(hash)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, Some(key), &[event]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every seal, by row: (seq, mac).
    pub async fn audit_seals(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT seq, mac FROM audit_seals ORDER BY seq")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

/// Records the MAC of the chain up to row `seq`, whose hash is `hash`.
async fn seal(
    conn: &mut PgConnection,
    key: &IntegrityKey,
    seq: i64,
    hash: &[u8],
    at: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_seals (seq, mac, at) VALUES ($1, $2, $3) \
         ON CONFLICT (seq) DO UPDATE SET mac = excluded.mac, at = excluded.at",
    )
    .bind(seq)
    .bind(key.audit_seal(seq, hash).as_slice())
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends audit rows inside a write transaction from [`PgStore::begin_write`] (which makes
/// appends take turns), sealing the new head with `sealer`.
pub(super) async fn append_audit_in(
    conn: &mut PgConnection,
    sealer: Option<&IntegrityKey>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let head = load_head(conn).await?;
    let (seq, hash, at) = append_rows(conn, head, events).await?;
    if let Some(key) = sealer {
        // The new head, sealed in the same transaction: the chain up to it is authenticated.
        seal(conn, key, seq, &hash, at).await?;
    }
    Ok(())
}

/// The audit rows of a group commit's transaction (`batch.rs`): the chain's head is read once
/// and carried from one job's rows to the next; the rows are written together, in one
/// statement, and the head sealed once, just before the commit ([`Chain::finish`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Chain {
    head: Option<(i64, Vec<u8>)>,
    rows: Vec<ChainedRow>,
}

/// A row chained but not yet written.
#[derive(Debug, Clone)]
struct ChainedRow {
    seq: i64,
    at: Millis,
    event: AuditEvent,
    prev: Vec<u8>,
    hash: Vec<u8>,
}

impl Chain {
    /// Chains `events` after the head.
    pub(super) async fn append(
        &mut self,
        conn: &mut PgConnection,
        events: &[AuditEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let (mut seq, mut prev) = match self.head.take() {
            Some(head) => head,
            None => load_head(conn).await?,
        };
        let at = now_millis();
        for event in events {
            seq += 1;
            let hash = event.hash_after(&prev, seq, at).to_vec();
            self.rows.push(ChainedRow {
                seq,
                at,
                event: event.clone(),
                prev: std::mem::replace(&mut prev, hash.clone()),
                hash,
            });
        }
        self.head = Some((seq, prev));
        Ok(())
    }

    /// Writes the rows chained (one statement) and seals the new head with `key`.
    pub(super) async fn finish(
        &self,
        conn: &mut PgConnection,
        key: Option<&IntegrityKey>,
    ) -> Result<(), StoreError> {
        let Some((seq, hash)) = self.head.as_ref().filter(|_| !self.rows.is_empty()) else {
            return Ok(());
        };
        // One array per column, as `UNNEST` takes them.
        fn column<T>(rows: &[ChainedRow], value: impl Fn(&ChainedRow) -> T) -> Vec<T> {
            rows.iter().map(value).collect()
        }
        let rows = &self.rows;
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, secret, incident_id, detail, \
             prev_hash, hash) SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], \
             $4::text[], $5::text[], $6::text[], $7::text[], $8::bytea[], $9::bytea[])",
        )
        .bind(column(rows, |r| r.seq))
        .bind(column(rows, |r| r.at))
        .bind(column(rows, |r| r.event.actor.clone()))
        .bind(column(rows, |r| r.event.action.clone()))
        .bind(column(rows, |r| r.event.secret.clone()))
        .bind(column(rows, |r| r.event.incident_id.clone()))
        .bind(column(rows, |r| r.event.detail.clone()))
        .bind(column(rows, |r| r.prev.clone()))
        .bind(column(rows, |r| r.hash.clone()))
        .execute(&mut *conn)
        .await?;
        match key {
            Some(key) => seal(conn, key, *seq, hash, now_millis()).await,
            None => Ok(()),
        }
    }
}

/// The last row's sequence number and hash (the anchor's when every row was archived, the
/// genesis hash in an empty chain).
async fn load_head(conn: &mut PgConnection) -> Result<(i64, Vec<u8>), StoreError> {
    let last: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let last = match last {
        Some(last) => Some(last),
        // With every row archived, the chain goes on from the anchor.
        None => {
            sqlx::query_as("SELECT seq, hash FROM audit_anchor WHERE id = 1")
                .fetch_optional(&mut *conn)
                .await?
        }
    };
    Ok(last.unwrap_or((0, GENESIS_HASH.to_vec())))
}

/// Inserts `events` after `head`; the new head and the rows' time.
async fn append_rows(
    conn: &mut PgConnection,
    (mut seq, mut prev): (i64, Vec<u8>),
    events: &[AuditEvent],
) -> Result<(i64, Vec<u8>, Millis), StoreError> {
    let at: Millis = now_millis();
    for event in events {
        seq += 1;
        let hash = event.hash_after(&prev, seq, at).to_vec();
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, secret, incident_id, detail, \
             prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(seq)
        .bind(at)
        .bind(&event.actor)
        .bind(&event.action)
        .bind(&event.secret)
        .bind(&event.incident_id)
        .bind(&event.detail)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
        prev = hash;
    }
    Ok((seq, prev, at))
}

pub(super) fn audit_from_row(row: &PgRow) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        seq: row.try_get(0)?,
        at: row.try_get(1)?,
        actor: row.try_get(2)?,
        action: row.try_get(3)?,
        secret: row.try_get(4)?,
        incident_id: row.try_get(5)?,
        detail: row.try_get(6)?,
        prev_hash: row.try_get(7)?,
        hash: row.try_get(8)?,
    })
}
