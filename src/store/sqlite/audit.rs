//! The hash-chained audit table.

use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};

use crate::audit::{AuditEvent, AuditRecord, GENESIS_HASH};
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::StoreError;

use rusqlite::{OptionalExtension, ToSql, params};

use super::direct::{Tx, blob, on_handle};
use super::{MultiRowTable, SqliteStore, chunk_len, multi_row_insert};

impl SqliteStore {
    /// Appends audit rows in one transaction.
    pub async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.to_vec();
        self.write(Box::new(move |tx| append_audit(tx, None, &events)))
            .await
    }

    /// Up to `limit` audit rows with `seq > after`, in order.
    pub async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, secret, incident_id, detail, prev_hash, hash \
             FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// The last `limit` audit rows, in order.
    pub async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, secret, incident_id, detail, prev_hash, hash \
             FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        )
        .bind(limit)
        .fetch_all(&self.reader)
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
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// The last row written before `before`, if any: where an archive up to that time ends.
    pub async fn audit_last_before(&self, before: Millis) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT max(seq) FROM audit WHERE at < ?")
                .bind(before)
                .fetch_one(&self.reader)
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
        let found: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = ?")
            .bind(through_seq)
            .fetch_optional(&mut *tx)
            .await?;
        if found.as_deref() != Some(hash) {
            // "audit row N changed concurrently; try again": nothing was removed.
            return Err(StoreError::Conflict(format!("audit row {through_seq}")));
        }
        let at = now_millis();
        sqlx::query("DELETE FROM audit WHERE seq <= ?")
            .bind(through_seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM audit_seals WHERE seq <= ?")
            .bind(through_seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO audit_seals (seq, mac, at) VALUES (?, ?, ?)")
            .bind(through_seq)
            .bind(key.audit_seal(through_seq, hash).as_slice())
            .bind(at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT OR REPLACE INTO audit_anchor (id, seq, hash, archived_at) VALUES (1, ?, ?, ?)",
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
        let rows = sqlx::query("SELECT seq, mac FROM audit_seals ORDER BY seq")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (sqlx::Row::get(r, 0), sqlx::Row::get(r, 1)))
            .collect())
    }
}

/// Seals the chain's head inside an open write transaction (the transactions that run
/// [`super::batch::Job`]s do this once, after all their jobs, instead of once per append).
pub(super) fn seal_head(tx: &Tx<'_>, key: &IntegrityKey) -> Result<(), StoreError> {
    if let Some((seq, hash)) = last_row(tx, LAST_AUDIT_ROW)? {
        seal(tx, key, seq, &hash, now_millis())?;
    }
    Ok(())
}

const LAST_AUDIT_ROW: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
const ANCHOR: &str = "SELECT seq, hash FROM audit_anchor WHERE id = 1";

/// The chain's last row as (seq, hash): the one this transaction appended last, else the one
/// `select` (`LAST_AUDIT_ROW` or `ANCHOR`) finds.
fn last_row(tx: &Tx<'_>, select: &'static str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
    if tx.head.is_some() {
        return Ok(tx.head.clone());
    }
    Ok(tx
        .prepare_cached(select)?
        .query_row([], |r| Ok((r.get(0)?, blob(r, 1)?)))
        .optional()?)
}

/// Records the MAC of the chain up to row `seq`, whose hash is `hash`.
fn seal(
    tx: &Tx<'_>,
    key: &IntegrityKey,
    seq: i64,
    hash: &[u8],
    at: Millis,
) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT OR REPLACE INTO audit_seals (seq, mac, at) VALUES (?, ?, ?)")?
        .execute(params![seq, key.audit_seal(seq, hash).as_slice(), at])?;
    Ok(())
}

/// Appends audit rows inside a write transaction begun by sqlx (sealing the new head with
/// `sealer`).
pub(super) async fn append_audit_in(
    conn: &mut SqliteConnection,
    sealer: Option<&IntegrityKey>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    on_handle(conn, |db| append_audit(&mut Tx::new(db), sealer, events)).await
}

/// Appends audit rows inside an open write transaction (sealing the new head with `sealer`).
pub(super) fn append_audit(
    tx: &mut Tx<'_>,
    sealer: Option<&IntegrityKey>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let last = match last_row(tx, LAST_AUDIT_ROW)? {
        Some(last) => Some(last),
        // With every row archived, the chain goes on from the anchor.
        None => last_row(tx, ANCHOR)?,
    };
    let (mut seq, mut prev) = last.unwrap_or((0, GENESIS_HASH.to_vec()));
    let at: Millis = now_millis();
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        seq += 1;
        let hash = event.hash_after(&prev, seq, at).to_vec();
        rows.push((seq, event, std::mem::replace(&mut prev, hash.clone()), hash));
    }
    let mut rest = rows.as_slice();
    while !rest.is_empty() {
        let n = chunk_len(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut insert = tx.prepare_cached(multi_row_insert(MultiRowTable::Audit, n).0)?;
        let mut i = 0;
        for (seq, event, prev_hash, hash) in chunk {
            let values: [&dyn ToSql; 9] = [
                seq,
                &at,
                &event.actor,
                &event.action,
                &event.secret,
                &event.incident_id,
                &event.detail,
                prev_hash,
                hash,
            ];
            for value in values {
                i += 1;
                insert.raw_bind_parameter(i, value)?;
            }
        }
        insert.raw_execute()?;
    }
    if let Some((seq, _, _, hash)) = rows.last() {
        if let Some(key) = sealer {
            // The new head, sealed in the same transaction: the chain up to it is authenticated.
            seal(tx, key, *seq, hash, at)?;
        }
        tx.head = Some((*seq, hash.clone()));
    }
    Ok(())
}

pub(super) fn audit_from_row(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
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
