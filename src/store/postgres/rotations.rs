//! The rotation journal: planning, advancing one legal step at a time, retries, reads.

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use crate::audit::AuditEvent;
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::Reason;
use crate::store::{
    NewRotation, NewVersion, RotationRecord, RotationState, Stage, StepChange, StoreError,
};

use super::audit::{Chain, append_audit_in};
use super::secrets::{insert_version, mark_current, retire_current};
use super::{PgStore, announce, is_unique_violation};

impl PgStore {
    /// Plans a rotation. Fails with [`StoreError::Conflict`] if one is already active for the
    /// secret or the current version moved.
    pub async fn plan_rotation(
        &self,
        rotation: &NewRotation,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let job = std::sync::Arc::new((rotation.clone(), audit));
        self.write(Box::new(move |conn, chain, _| {
            let job = job.clone();
            Box::pin(async move { plan_in(conn, chain, &job.0, &job.1).await })
        }))
        .await
    }

    /// Records a failed attempt at the current step and when to retry it.
    pub async fn retry_rotation_later(
        &self,
        rotation_id: &str,
        error: &str,
        next_attempt_at: Millis,
    ) -> Result<i64, StoreError> {
        // A write transaction like any other: the leader's term fences it.
        let mut tx = self.begin_write().await?;
        let attempts: i64 = sqlx::query_scalar(
            "UPDATE rotations SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, \
             updated_at = $3 WHERE id = $4 RETURNING attempts",
        )
        .bind(error)
        .bind(next_attempt_at)
        .bind(now_millis())
        .bind(rotation_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(attempts)
    }

    /// Resets a rotation's attempt count (an operator asked to resume it).
    pub async fn reset_rotation_attempts(&self, rotation_id: &str) -> Result<(), StoreError> {
        // A write transaction like any other: the leader's term fences it.
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE rotations SET attempts = 0, next_attempt_at = NULL WHERE id = $1")
            .bind(rotation_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks an active rotation as an emergency of `incident_id`.
    pub async fn escalate_rotation(
        &self,
        rotation_id: &str,
        incident_id: Option<&str>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE rotations SET emergency = 1, incident_id = coalesce($1, incident_id), \
             updated_at = $2 WHERE id = $3",
        )
        .bind(incident_id)
        .bind(now_millis())
        .bind(rotation_id)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A rotation by id.
    pub async fn rotation(&self, id: &str) -> Result<Option<RotationRecord>, StoreError> {
        let row = sqlx::query(ROTATION_SELECT_BY_ID)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    /// Every rotation not in a terminal state (read once, at start-up).
    pub async fn active_rotations(&self) -> Result<Vec<RotationRecord>, StoreError> {
        let rows = sqlx::query(ROTATION_SELECT_ACTIVE)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rotation_from_row).collect()
    }

    /// Each rotation not in a terminal state as (secret name, state, created at): a listing
    /// for metrics, on sqlx's readers (the full records are point reads, in the calling thread).
    pub async fn active_rotation_ages(
        &self,
    ) -> Result<Vec<(String, RotationState, Millis)>, StoreError> {
        let rows: Vec<(String, String, Millis)> = sqlx::query_as(
            "SELECT s.name, r.state, r.created_at FROM rotations r JOIN secrets s \
             ON s.id = r.secret_id WHERE r.state NOT IN ('done', 'failed', 'rolled-back') \
             ORDER BY r.created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(name, state, at)| Ok((name, RotationState::parse(&state)?, at)))
            .collect()
    }

    /// The latest rotation of a secret, active or not.
    pub async fn latest_rotation(
        &self,
        secret_id: &str,
    ) -> Result<Option<RotationRecord>, StoreError> {
        let row = sqlx::query(ROTATION_SELECT_LATEST)
            .bind(secret_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    /// How many rotations ended in each terminal state.
    pub async fn rotation_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        // `COLLATE "C"`: SQLite's byte order, whatever the database's collation.
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM rotations WHERE state IN ('done', 'failed', 'rolled-back') \
             GROUP BY state ORDER BY state COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Applies one step. Fails with [`StoreError::Conflict`] if the rotation is no longer in
    /// `change.from`.
    pub async fn advance_rotation(
        &self,
        rotation: &RotationRecord,
        change: &StepChange,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        if !change.from.can_move_to(change.to) {
            return Err(StoreError::IllegalMove {
                rotation: rotation.id.clone(),
                from: change.from,
                to: change.to,
            });
        }
        let changes_versions = change.promote || change.revoke_version.is_some();
        let job = std::sync::Arc::new((rotation.clone(), change.clone(), audit));
        self.write(Box::new(move |conn, chain, key| {
            let job = job.clone();
            Box::pin(async move {
                let (rotation, change, audit) = &*job;
                advance_in(conn, chain, key, rotation, change, audit).await?;
                if changes_versions {
                    announce(conn, Some(&rotation.secret_name)).await?;
                }
                Ok(())
            })
        }))
        .await?;
        if changes_versions {
            self.invalidate(Some(&rotation.secret_name));
        }
        Ok(())
    }
}

/// The statements of [`PgStore::plan_rotation`]; its audit row goes on `chain`.
async fn plan_in(
    conn: &mut PgConnection,
    chain: &mut Chain,
    rotation: &NewRotation,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM versions WHERE secret_id = $1 AND stage = 'current'",
    )
    .bind(rotation.secret_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if current != rotation.from_version {
        return Err(StoreError::Conflict("the current version".into()));
    }
    let now = now_millis();
    let inserted = sqlx::query(
        "INSERT INTO rotations (id, secret_id, state, from_version, proposed, reason, \
         emergency, incident_id, created_at, updated_at) \
         VALUES ($1, $2, 'planned', $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(rotation.id.as_str())
    .bind(rotation.secret_id.as_str())
    .bind(rotation.from_version)
    .bind(rotation.proposed.as_deref())
    .bind(rotation.reason.as_str())
    .bind(i64::from(rotation.emergency))
    .bind(rotation.incident_id.as_deref())
    .bind(now)
    .execute(&mut *conn)
    .await;
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            return Err(StoreError::Conflict("an active rotation".into()));
        }
        other => other?,
    };
    chain.append(conn, std::slice::from_ref(audit)).await
}

/// The statements of one step ([`PgStore::advance_rotation`]); its audit row goes on `chain`.
async fn advance_in(
    conn: &mut PgConnection,
    chain: &mut Chain,
    key: Option<&IntegrityKey>, // for the current version's MAC at a promotion
    rotation: &RotationRecord,
    change: &StepChange,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let now = now_millis();
    let moved = sqlx::query(
        "UPDATE rotations SET state = $1, updated_at = $2, attempts = 0, last_error = $3, \
         next_attempt_at = NULL, draining_since = coalesce($4, draining_since), \
         to_version = coalesce($5, to_version) WHERE id = $6 AND state = $7",
    )
    .bind(change.to.as_str())
    .bind(now)
    .bind(change.error.as_deref())
    .bind(change.draining_since)
    .bind(change.insert_pending.as_ref().map(|v| v.version))
    .bind(rotation.id.as_str())
    .bind(change.from.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(StoreError::Conflict(format!("rotation {}", rotation.id)));
    }
    let secret_id = rotation.secret_id.as_str();
    if let Some(version) = &change.insert_pending {
        insert_pending(&mut *conn, secret_id, version, now).await?;
    }
    if change.promote {
        let to = rotation.to_version.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "rotation {}: promoting a rotation with no new version",
                rotation.id
            ))
        })?;
        promote(&mut *conn, key, secret_id, to, now).await?;
    }
    if let Some(version) = change.revoke_version {
        sqlx::query(
            "UPDATE versions SET stage = 'revoked', stage_changed_at = $1 \
             WHERE secret_id = $2 AND version = $3 AND stage != 'revoked'",
        )
        .bind(now)
        .bind(secret_id)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    }
    if change.succeeded {
        sqlx::query("UPDATE secrets SET failed_attempts = 0, last_error = NULL WHERE id = $1")
            .bind(secret_id)
            .execute(&mut *conn)
            .await?;
    }
    chain.append(conn, std::slice::from_ref(audit)).await
}

const ROTATION_SELECT_BY_ID: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE r.id = $1";
const ROTATION_SELECT_ACTIVE: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id \
     WHERE r.state NOT IN ('done', 'failed', 'rolled-back') ORDER BY r.created_at";
// The latest rotation: SQLite breaks a tie of `created_at` by rowid (insertion order), which
// PostgreSQL's table does not have. At most one rotation of a secret is active at a time, and a
// new one is planned only after the previous one ended, so among rotations planned in the same
// millisecond the active one, then the one that moved last, is the later one; the id (random)
// only makes the order total.
const ROTATION_SELECT_LATEST: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE r.secret_id = $1 \
     ORDER BY r.created_at DESC, (r.state NOT IN ('done', 'failed', 'rolled-back')) DESC, \
     r.updated_at DESC, r.id DESC LIMIT 1";

fn rotation_from_row(row: &PgRow) -> Result<RotationRecord, StoreError> {
    let id: String = row.try_get(0)?;
    let in_row = |e: StoreError| e.in_row(format!("rotation {id}"));
    let state = RotationState::parse(&row.try_get::<String, _>(3)?).map_err(in_row)?;
    let reason = Reason::parse(&row.try_get::<String, _>(7)?).map_err(in_row)?;
    let emergency: i64 = row.try_get(8)?;
    Ok(RotationRecord {
        id,
        secret_id: row.try_get(1)?,
        secret_name: row.try_get(2)?,
        state,
        from_version: row.try_get(4)?,
        to_version: row.try_get(5)?,
        proposed: row.try_get(6)?,
        reason,
        emergency: emergency != 0,
        incident_id: row.try_get(9)?,
        attempts: row.try_get(10)?,
        last_error: row.try_get(11)?,
        next_attempt_at: row.try_get(12)?,
        draining_since: row.try_get(13)?,
        created_at: row.try_get(14)?,
        updated_at: row.try_get(15)?,
    })
}

/// The id of the secret's active rotation (one not in a terminal state), if any.
pub(super) async fn active_rotation_in(
    conn: &mut PgConnection,
    secret_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM rotations WHERE secret_id = $1 AND state NOT IN ('done', 'failed', 'rolled-back')",
    )
    .bind(secret_id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Stores a rotation's new version as `pending`; it must be the secret's next number.
async fn insert_pending(
    conn: &mut PgConnection,
    secret_id: &str,
    version: &NewVersion,
    now: Millis,
) -> Result<(), StoreError> {
    let latest: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM versions WHERE secret_id = $1")
            .bind(secret_id)
            .fetch_one(&mut *conn)
            .await?;
    if latest.unwrap_or(0) + 1 != version.version {
        return Err(StoreError::Conflict("the secret's versions".into()));
    }
    insert_version(conn, secret_id, version, Stage::Pending, now).await
}

/// Makes version `to` current: the old current becomes previous, the old previous revoked.
async fn promote(
    conn: &mut PgConnection,
    key: Option<&IntegrityKey>,
    secret_id: &str,
    to: i64,
    now: Millis,
) -> Result<(), StoreError> {
    retire_current(&mut *conn, secret_id, Some(to), now).await?;
    sqlx::query(
        "UPDATE versions SET stage = 'current', stage_changed_at = $1 \
         WHERE secret_id = $2 AND version = $3",
    )
    .bind(now)
    .bind(secret_id)
    .bind(to)
    .execute(&mut *conn)
    .await?;
    mark_current(&mut *conn, key, secret_id, to).await?;
    sqlx::query("UPDATE secrets SET updated_at = $1, last_rotated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(secret_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
