//! Leases and their group-committed batches; callers seen per secret.

use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::store::UpstreamState;
use crate::store::{LeaseOp, LeaseRow, StoreError};

use super::PgStore;
use super::audit::append_audit_in;

impl PgStore {
    /// Which of `ids` are open leases, with their expiry: what another daemon's sweeper checks
    /// before it ends a lease this one may have renewed or ended.
    pub async fn open_lease_expiries(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Millis>, StoreError> {
        let rows: Vec<(String, Millis)> = sqlx::query_as(
            "SELECT id, expires_at FROM leases WHERE id = ANY($1) AND ended_at IS NULL",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Applies lease changes and audit rows in one transaction, committed as the server's
    /// `synchronous_commit` says (on by default: durable when this returns). The caller batches
    /// many fetches into one call.
    pub async fn apply_lease_batch(
        &self,
        ops: &[LeaseOp],
        audit: &[AuditEvent],
    ) -> Result<(), StoreError> {
        // PostgreSQL flushes its write-ahead log at COMMIT (and groups concurrent commits into
        // one flush itself): there is no per-transaction synchronous setting to lower here.
        let mut tx = self.begin_write().await?;
        insert_leases(&mut tx, ops).await?;
        extend_leases(&mut tx, ops).await?;
        // The batch's audit rows, then those folding repeated fetches: one append.
        // (Copied only when a fold adds rows: the fetch path's batches append as they are.)
        let mut rows = std::borrow::Cow::Borrowed(audit);
        for op in ops {
            match op {
                LeaseOp::FoldFetches => rows.to_mut().extend(fold_fetches(&mut tx).await?),
                op => apply_lease_op(&mut tx, op).await?,
            }
        }
        // A lease that holds an issued credential ends its journal entry, atomically.
        for op in ops {
            if let LeaseOp::Insert(l) = op {
                if l.issued.is_some() {
                    sqlx::query("DELETE FROM issue_journal WHERE lease_id = $1")
                        .bind(l.id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        append_audit_in(&mut tx, self.integrity(), &rows).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Journals, durably, that a credential is about to be issued for lease `lease_id`.
    pub async fn journal_issue(
        &self,
        lease_id: &str,
        secret_id: &str,
        secret_name: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO issue_journal (lease_id, secret_id, secret_name, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(lease_id)
        .bind(secret_id)
        .bind(secret_name)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends a journal entry: its credential was revoked, or never issued.
    pub async fn end_issue(&self, lease_id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM issue_journal WHERE lease_id = $1")
            .bind(lease_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Journal entries whose lease was never committed: (lease id, secret name), oldest first.
    /// Entries whose lease exists are ended on the way.
    pub async fn orphaned_issues(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM issue_journal WHERE lease_id IN (SELECT id FROM leases)")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let rows =
            sqlx::query("SELECT lease_id, secret_name FROM issue_journal ORDER BY created_at")
                .fetch_all(&self.pool)
                .await?;
        let mut orphans = Vec::with_capacity(rows.len());
        for r in &rows {
            orphans.push((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?));
        }
        Ok(orphans)
    }

    /// The credential issued for lease `id`, sealed, as the store holds it now (a `rekey
    /// --data-keys` reseals it).
    pub async fn issued_credential(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let issued: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT issued FROM leases WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(issued.flatten())
    }

    /// Leases still live, and issued credentials whose upstream revocation is pending.
    pub async fn open_leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.id, l.secret_id, s.name, l.version, l.issued, l.issued_meta, l.uid, l.gid, \
             l.pid, l.exe, l.created_at, l.expires_at, l.ended_at, l.upstream_state \
             FROM leases l JOIN secrets s ON s.id = l.secret_id \
             WHERE l.ended_at IS NULL OR l.upstream_state = 'revoke-pending'",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                let meta: Option<String> = r.try_get(5)?;
                let upstream: Option<String> = r.try_get(13)?;
                let (uid, gid, pid): (i64, i64, i64) =
                    (r.try_get(6)?, r.try_get(7)?, r.try_get(8)?);
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
                    let uid = id_u32("uid", uid)?;
                    let gid = id_u32("gid", gid)?;
                    let pid = i32::try_from(pid)
                        .map_err(|_| StoreError::Corrupt(format!("pid {pid} out of range")))?;
                    Ok::<_, StoreError>((meta, upstream, uid, gid, pid))
                })();
                let (issued_meta, upstream_state, uid, gid, pid) =
                    parsed.map_err(|e| e.in_row(format!("lease {id}")))?;
                Ok(LeaseRow {
                    id,
                    secret_id: r.try_get(1)?,
                    secret_name: r.try_get(2)?,
                    version: r.try_get(3)?,
                    issued: r.try_get(4)?,
                    issued_meta,
                    uid,
                    gid,
                    pid,
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
        let rows: Vec<(String, i64, String, Millis)> =
            sqlx::query_as("SELECT secret_id, uid, exe, first_seen FROM access_seen")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(secret_id, uid, exe, first_seen)| {
                let uid = id_u32("uid", uid)
                    .map_err(|e| e.in_row(format!("access seen for secret {secret_id}")))?;
                Ok::<_, StoreError>((secret_id, uid, exe, first_seen))
            })
            .collect()
    }

    /// Live leases on a version at `now`, and the earliest expiry among them.
    pub async fn live_leases(
        &self,
        secret_id: &str,
        version: i64,
        now: Millis,
    ) -> Result<(i64, Option<Millis>), StoreError> {
        let (count, next): (i64, Option<Millis>) = sqlx::query_as(
            "SELECT count(*), min(expires_at) FROM leases WHERE secret_id = $1 AND version = $2 \
             AND ended_at IS NULL AND expires_at > $3",
        )
        .bind(secret_id)
        .bind(version)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok((count, next))
    }
}

/// A stored uid or gid (BIGINT) as the `u32` it was written from; anything else is
/// [`StoreError::Corrupt`].
fn id_u32(what: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} out of range")))
}

/// Inserts the batch's new leases, one statement each (in order).
async fn insert_leases(conn: &mut PgConnection, ops: &[LeaseOp]) -> Result<(), StoreError> {
    let inserts = ops.iter().filter_map(|op| match op {
        LeaseOp::Insert(l) => Some(l),
        _ => None,
    });
    for l in inserts {
        let l: &Arc<LeaseRow> = l;
        let meta = l
            .issued_meta
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone()).to_string());
        sqlx::query(
            "INSERT INTO leases (id, secret_id, version, issued, issued_meta, uid, gid, pid, \
             exe, created_at, expires_at, upstream_state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(l.id.as_str())
        .bind(l.secret_id.as_str())
        .bind(l.version)
        .bind(l.issued.as_deref())
        .bind(meta)
        .bind(i64::from(l.uid))
        .bind(i64::from(l.gid))
        .bind(i64::from(l.pid))
        .bind(l.exe.as_deref())
        .bind(l.created_at)
        .bind(l.expires_at)
        .bind(l.upstream_state.map(UpstreamState::as_str))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Counts the batch's repeated fetches: one statement per lease however many fetches of it
/// the batch holds. The expiry moves only forward, and only on a live lease; the count is
/// recorded even on a lease that ended meanwhile, so the fetch is still accounted for.
async fn extend_leases(conn: &mut PgConnection, ops: &[LeaseOp]) -> Result<(), StoreError> {
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
    for (id, (expires_at, fetches)) in merged {
        sqlx::query(
            "UPDATE leases SET fetches = fetches + $1, expires_at = CASE WHEN ended_at IS NULL \
             THEN greatest(expires_at, $2) ELSE expires_at END WHERE id = $3",
        )
        .bind(fetches)
        .bind(expires_at)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The `fetch.repeated` rows for every lease whose fetches the chain does not count yet; marks
/// them counted.
async fn fold_fetches(conn: &mut PgConnection) -> Result<Vec<AuditEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT l.id, s.name, l.version, l.uid, l.gid, l.exe, l.fetches, l.audited_fetches \
         FROM leases l JOIN secrets s ON s.id = l.secret_id \
         WHERE l.fetches > l.audited_fetches ORDER BY l.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.try_get(0)?;
        let name: String = r.try_get(1)?;
        let version: Option<i64> = r.try_get(2)?;
        let (uid, gid): (i64, i64) = (r.try_get(3)?, r.try_get(4)?);
        let uid = id_u32("uid", uid).map_err(|e| e.in_row(format!("lease {id}")))?;
        let gid = id_u32("gid", gid).map_err(|e| e.in_row(format!("lease {id}")))?;
        let exe: Option<String> = r.try_get(5)?;
        let (fetches, audited): (i64, i64) = (r.try_get(6)?, r.try_get(7)?);
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
    sqlx::query("UPDATE leases SET audited_fetches = fetches WHERE fetches > audited_fetches")
        .execute(&mut *conn)
        .await?;
    Ok(events)
}

/// Applies one change other than an insert or an extension (those went in first).
async fn apply_lease_op(conn: &mut PgConnection, op: &LeaseOp) -> Result<(), StoreError> {
    match op {
        LeaseOp::Insert(_) | LeaseOp::Extend { .. } | LeaseOp::FoldFetches => {}
        LeaseOp::Renew { id, expires_at } => {
            sqlx::query("UPDATE leases SET expires_at = $1 WHERE id = $2 AND ended_at IS NULL")
                .bind(*expires_at)
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
        }
        LeaseOp::End {
            id,
            at,
            reason,
            upstream_state,
        } => {
            sqlx::query(
                "UPDATE leases SET ended_at = $1, end_reason = $2, \
                 upstream_state = coalesce($3, upstream_state) \
                 WHERE id = $4 AND ended_at IS NULL",
            )
            .bind(*at)
            .bind(reason.as_str())
            .bind(upstream_state.map(UpstreamState::as_str))
            .bind(id.as_str())
            .execute(&mut *conn)
            .await?;
        }
        LeaseOp::PurgeEnded { before } => {
            sqlx::query(
                "DELETE FROM leases WHERE ended_at IS NOT NULL AND ended_at < $1 \
                 AND fetches = audited_fetches \
                 AND (upstream_state IS NULL OR upstream_state = 'revoked')",
            )
            .bind(*before)
            .execute(&mut *conn)
            .await?;
        }
        LeaseOp::AccessSeen {
            secret_id,
            uid,
            exe,
            at,
        } => {
            sqlx::query(
                "INSERT INTO access_seen (secret_id, uid, exe, first_seen) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(secret_id.as_str())
            .bind(i64::from(*uid))
            .bind(exe.as_str())
            .bind(*at)
            .execute(&mut *conn)
            .await?;
        }
        LeaseOp::UpstreamRevoked { id } => {
            sqlx::query("UPDATE leases SET upstream_state = 'revoked' WHERE id = $1")
                .bind(id.as_str())
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
