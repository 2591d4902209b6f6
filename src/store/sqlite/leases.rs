//! Leases and their group-committed batches; callers seen per secret.

use std::sync::Arc;

use rusqlite::{ToSql, params};
use sqlx::Row;

use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::store::UpstreamState;
use crate::store::{LeaseOp, LeaseRow, StoreError};

use super::audit::append_audit;
use super::direct::{Db, in_transaction};
use super::{MultiRowTable, SqliteStore, chunk_len, multi_row_insert};

impl SqliteStore {
    /// Applies lease changes and audit rows in one group-committed transaction. Durable
    /// against a crash of the process (the write-ahead log is written before this returns) but
    /// not fsynced individually, so many fetches share one disk flush.
    pub async fn apply_lease_batch(
        &self,
        ops: &[LeaseOp],
        audit: &[AuditEvent],
    ) -> Result<(), StoreError> {
        let key = self.integrity();
        self.direct_writer.write(|db| {
            // Group commit: the WAL is written before COMMIT returns (a crash of this process
            // loses nothing), but the fsync is left to the next checkpoint or FULL commit.
            db.execute_batch("PRAGMA synchronous = NORMAL")?;
            let result = in_transaction(db, |tx| {
                insert_leases(tx, ops)?;
                extend_leases(tx, ops)?;
                // The batch's audit rows, then those folding repeated fetches: one append.
                // (Copied only when a fold adds rows: the fetch path's batches append as
                // they are.)
                let mut rows = std::borrow::Cow::Borrowed(audit);
                for op in ops {
                    match op {
                        LeaseOp::FoldFetches => rows.to_mut().extend(fold_fetches(tx)?),
                        op => apply_lease_op(tx, op)?,
                    }
                }
                // A lease that holds an issued credential ends its journal entry, atomically.
                for op in ops {
                    if let LeaseOp::Insert(l) = op {
                        if l.issued.is_some() {
                            tx.prepare_cached("DELETE FROM issue_journal WHERE lease_id = ?")?
                                .execute([l.id.as_str()])?;
                        }
                    }
                }
                append_audit(tx, key, &rows)
            });
            let reset = db.execute_batch("PRAGMA synchronous = FULL");
            result?;
            Ok(reset?)
        })
    }

    /// Journals, durably, that a credential is about to be issued for lease `lease_id`.
    pub async fn journal_issue(
        &self,
        lease_id: &str,
        secret_id: &str,
        secret_name: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO issue_journal (lease_id, secret_id, secret_name, created_at) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(lease_id)
        .bind(secret_id)
        .bind(secret_name)
        .bind(at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Ends a journal entry: its credential was revoked, or never issued.
    pub async fn end_issue(&self, lease_id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM issue_journal WHERE lease_id = ?")
            .bind(lease_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Journal entries whose lease was never committed: (lease id, secret name), oldest first.
    /// Entries whose lease exists are ended on the way.
    pub async fn orphaned_issues(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query("DELETE FROM issue_journal WHERE lease_id IN (SELECT id FROM leases)")
            .execute(&self.writer)
            .await?;
        let rows =
            sqlx::query("SELECT lease_id, secret_name FROM issue_journal ORDER BY created_at")
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect())
    }

    /// The credential issued for lease `id`, sealed, as the store holds it now (a `rekey
    /// --data-keys` reseals it).
    pub async fn issued_credential(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT issued FROM leases WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .flatten())
    }

    /// Leases still live, and issued credentials whose upstream revocation is pending.
    pub async fn open_leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.id, l.secret_id, s.name, l.version, l.issued, l.issued_meta, l.uid, l.gid, \
             l.pid, l.exe, l.created_at, l.expires_at, l.ended_at, l.upstream_state \
             FROM leases l JOIN secrets s ON s.id = l.secret_id \
             WHERE l.ended_at IS NULL OR l.upstream_state = 'revoke-pending'",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                let meta: Option<String> = r.try_get(5)?;
                let upstream: Option<String> = r.try_get(13)?;
                let parsed = (|| {
                    let meta = meta
                        .map(|m| match serde_json::from_str(&m) {
                            Ok(serde_json::Value::Object(map)) => Ok(map),
                            _ => Err(StoreError::Corrupt(
                                "its issued meta is not a JSON object".into(),
                            )),
                        })
                        .transpose()?;
                    let upstream = upstream.as_deref().map(UpstreamState::parse).transpose()?;
                    Ok::<_, StoreError>((meta, upstream))
                })();
                let (issued_meta, upstream_state) =
                    parsed.map_err(|e| e.in_row(format!("lease {id}")))?;
                Ok(LeaseRow {
                    id,
                    secret_id: r.try_get(1)?,
                    secret_name: r.try_get(2)?,
                    version: r.try_get(3)?,
                    issued: r.try_get(4)?,
                    issued_meta,
                    uid: r.try_get(6)?,
                    gid: r.try_get(7)?,
                    pid: r.try_get(8)?,
                    exe: r.try_get(9)?,
                    created_at: r.try_get(10)?,
                    expires_at: r.try_get(11)?,
                    ended_at: r.try_get(12)?,
                    upstream_state,
                })
            })
            .collect()
    }

    /// Every (secret id, uid, executable) seen fetching, with when it first was.
    pub async fn access_seen(&self) -> Result<Vec<(String, u32, String, Millis)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT secret_id, uid, exe, first_seen FROM access_seen")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    /// Live leases on a version at `now`, and the earliest expiry among them.
    pub async fn live_leases(
        &self,
        secret_id: &str,
        version: i64,
        now: Millis,
    ) -> Result<(i64, Option<Millis>), StoreError> {
        let (count, next): (i64, Option<Millis>) = sqlx::query_as(
            "SELECT count(*), min(expires_at) FROM leases WHERE secret_id = ? AND version = ? \
             AND ended_at IS NULL AND expires_at > ?",
        )
        .bind(secret_id)
        .bind(version)
        .bind(now)
        .fetch_one(&self.reader)
        .await?;
        Ok((count, next))
    }
}

/// Inserts the batch's new leases with a few multi-row statements.
fn insert_leases(db: &Db, ops: &[LeaseOp]) -> Result<(), StoreError> {
    let inserts: Vec<&Arc<LeaseRow>> = ops
        .iter()
        .filter_map(|op| match op {
            LeaseOp::Insert(l) => Some(l),
            _ => None,
        })
        .collect();
    let mut rest = inserts.as_slice();
    while !rest.is_empty() {
        let n = chunk_len(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut insert = db.prepare_cached(multi_row_insert(MultiRowTable::Leases, n).0)?;
        let mut i = 0;
        for l in chunk {
            let meta = l
                .issued_meta
                .as_ref()
                .map(|m| serde_json::Value::Object(m.clone()).to_string());
            let values: [&dyn ToSql; 12] = [
                &l.id,
                &l.secret_id,
                &l.version,
                &l.issued,
                &meta,
                &l.uid,
                &l.gid,
                &l.pid,
                &l.exe,
                &l.created_at,
                &l.expires_at,
                &l.upstream_state.map(UpstreamState::as_str),
            ];
            for value in values {
                i += 1;
                insert.raw_bind_parameter(i, value)?;
            }
        }
        insert.raw_execute()?;
    }
    Ok(())
}

/// Counts the batch's repeated fetches: one statement per lease however many fetches of it
/// the batch holds. The expiry moves only forward, and only on a live lease; the count is
/// recorded even on a lease that ended meanwhile, so the fetch is still accounted for.
fn extend_leases(db: &Db, ops: &[LeaseOp]) -> Result<(), StoreError> {
    let mut merged: std::collections::BTreeMap<&str, (Millis, i64)> = Default::default();
    for op in ops {
        if let LeaseOp::Extend {
            id,
            expires_at,
            fetches,
        } = op
        {
            let entry = merged.entry(id.as_str()).or_insert((*expires_at, 0));
            entry.0 = entry.0.max(*expires_at);
            entry.1 += i64::from(*fetches);
        }
    }
    if merged.is_empty() {
        return Ok(());
    }
    let mut extend = db.prepare_cached(
        "UPDATE leases SET fetches = fetches + ?, expires_at = CASE WHEN ended_at IS NULL \
         THEN max(expires_at, ?) ELSE expires_at END WHERE id = ?",
    )?;
    for (id, (expires_at, fetches)) in merged {
        extend.execute(params![fetches, expires_at, id])?;
    }
    Ok(())
}

/// The `fetch.repeated` rows for every lease whose fetches the chain does not count yet; marks
/// them counted.
fn fold_fetches(db: &Db) -> Result<Vec<AuditEvent>, StoreError> {
    let mut select = db.prepare_cached(
        "SELECT l.id, s.name, l.version, l.uid, l.gid, l.exe, l.fetches, l.audited_fetches \
         FROM leases l JOIN secrets s ON s.id = l.secret_id \
         WHERE l.fetches > l.audited_fetches ORDER BY l.id",
    )?;
    let mut rows = select.query([])?;
    let mut events = Vec::new();
    while let Some(r) = rows.next()? {
        let id: String = r.get(0)?;
        let name: String = r.get(1)?;
        let version: Option<i64> = r.get(2)?;
        let (uid, gid): (u32, u32) = (r.get(3)?, r.get(4)?);
        let exe: Option<String> = r.get(5)?;
        let (fetches, audited): (i64, i64) = (r.get(6)?, r.get(7)?);
        let actor = format!(
            "agent uid={uid} gid={gid} exe={}",
            exe.as_deref().unwrap_or("unknown")
        );
        events.push(
            AuditEvent::new(actor, "fetch.repeated")
                .secret(&name)
                .detail(serde_json::json!({
                    "lease_id": id,
                    "version": version,
                    "count": fetches - audited,
                    "total": fetches,
                })),
        );
    }
    db.prepare_cached(
        "UPDATE leases SET audited_fetches = fetches WHERE fetches > audited_fetches",
    )?
    .execute([])?;
    Ok(events)
}

/// Applies one change other than an insert or an extension (those went in first, in bulk).
fn apply_lease_op(db: &Db, op: &LeaseOp) -> Result<(), StoreError> {
    match op {
        LeaseOp::Insert(_) | LeaseOp::Extend { .. } | LeaseOp::FoldFetches => {}
        LeaseOp::Renew { id, expires_at } => {
            db.prepare_cached(
                "UPDATE leases SET expires_at = ? WHERE id = ? AND ended_at IS NULL",
            )?
            .execute(params![expires_at, id])?;
        }
        LeaseOp::End {
            id,
            at,
            reason,
            upstream_state,
        } => {
            db.prepare_cached(
                "UPDATE leases SET ended_at = ?, end_reason = ?, \
                 upstream_state = coalesce(?, upstream_state) WHERE id = ? AND ended_at IS NULL",
            )?
            .execute(params![
                at,
                reason.as_str(),
                upstream_state.map(UpstreamState::as_str),
                id
            ])?;
        }
        LeaseOp::PurgeEnded { before } => {
            db.prepare_cached(
                "DELETE FROM leases WHERE ended_at IS NOT NULL AND ended_at < ? \
                 AND fetches = audited_fetches \
                 AND (upstream_state IS NULL OR upstream_state = 'revoked')",
            )?
            .execute([before])?;
        }
        LeaseOp::AccessSeen {
            secret_id,
            uid,
            exe,
            at,
        } => {
            db.prepare_cached(
                "INSERT OR IGNORE INTO access_seen (secret_id, uid, exe, first_seen) \
                 VALUES (?, ?, ?, ?)",
            )?
            .execute(params![secret_id, uid, exe, at])?;
        }
        LeaseOp::UpstreamRevoked { id } => {
            db.prepare_cached("UPDATE leases SET upstream_state = 'revoked' WHERE id = ?")?
                .execute([id.as_str()])?;
        }
    }
    Ok(())
}
