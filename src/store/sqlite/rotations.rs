//! The rotation journal: planning, advancing one legal step at a time, retries, reads.

use rusqlite::{OptionalExtension, params};
use sqlx::sqlite::SqliteConnection;

use crate::audit::AuditEvent;
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::Reason;
use crate::store::{
    NewRotation, NewVersion, RotationRecord, RotationState, Stage, StepChange, StoreError,
};

use super::SqliteStore;
use super::audit::{append_audit, append_audit_in};
use super::direct::{Db, Tx, is_unique_violation, optional_blob};
use super::secrets::{insert_version, mark_current, retire_current};

impl SqliteStore {
    /// Plans a rotation. Fails with [`StoreError::Conflict`] if one is already active for the
    /// secret or the current version moved.
    pub async fn plan_rotation(
        &self,
        rotation: &NewRotation,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let rotation = rotation.clone();
        self.write(Box::new(move |tx| plan_in(tx, &rotation, &audit)))
            .await
    }

    async fn advance_rotation_in_db(
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
        let (rotation, change) = (rotation.clone(), change.clone());
        let key = self.integrity().cloned();
        self.write(Box::new(move |tx| {
            advance_in(tx, key.as_ref(), &rotation, &change, &audit)
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
        let attempts: i64 = sqlx::query_scalar(
            "UPDATE rotations SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, \
             updated_at = ? WHERE id = ? RETURNING attempts",
        )
        .bind(error)
        .bind(next_attempt_at)
        .bind(now_millis())
        .bind(rotation_id)
        .fetch_one(&self.writer)
        .await?;
        Ok(attempts)
    }

    /// Resets a rotation's attempt count (an operator asked to resume it).
    pub async fn reset_rotation_attempts(&self, rotation_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotations SET attempts = 0, next_attempt_at = NULL WHERE id = ?")
            .bind(rotation_id)
            .execute(&self.writer)
            .await?;
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
            "UPDATE rotations SET emergency = 1, incident_id = coalesce(?, incident_id), \
             updated_at = ? WHERE id = ?",
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
        self.direct_reader.read(|db| {
            db.prepare_cached(ROTATION_SELECT_BY_ID)?
                .query_and_then([id], rotation_from_row)?
                .next()
                .transpose()
        })
    }

    /// Every rotation not in a terminal state (read once, at start-up).
    pub async fn active_rotations(&self) -> Result<Vec<RotationRecord>, StoreError> {
        self.direct_reader.read(|db| {
            db.prepare_cached(ROTATION_SELECT_ACTIVE)?
                .query_and_then([], rotation_from_row)?
                .collect()
        })
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
        .fetch_all(&self.reader)
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
        self.direct_reader.read(|db| {
            db.prepare_cached(ROTATION_SELECT_LATEST)?
                .query_and_then([secret_id], rotation_from_row)?
                .next()
                .transpose()
        })
    }

    /// How many rotations ended in each terminal state.
    pub async fn rotation_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM rotations WHERE state IN ('done', 'failed', 'rolled-back') \
             GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.reader)
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
        let result = self.advance_rotation_in_db(rotation, change, audit).await;
        if change.promote || change.revoke_version.is_some() {
            self.invalidate(Some(&rotation.secret_name));
        }
        result
    }
}

/// The statements of [`SqliteStore::plan_rotation`].
fn plan_in(tx: &mut Tx<'_>, rotation: &NewRotation, audit: &AuditEvent) -> Result<(), StoreError> {
    let current: Option<i64> = tx
        .prepare_cached("SELECT version FROM versions WHERE secret_id = ? AND stage = 'current'")?
        .query_row([rotation.secret_id.as_str()], |r| r.get(0))
        .optional()?;
    if current != rotation.from_version {
        return Err(StoreError::Conflict("the current version".into()));
    }
    let now = now_millis();
    let inserted = tx
        .prepare_cached(
            "INSERT INTO rotations (id, secret_id, state, from_version, proposed, reason, \
             emergency, incident_id, created_at, updated_at) \
             VALUES (?, ?, 'planned', ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            rotation.id,
            rotation.secret_id,
            rotation.from_version,
            rotation.proposed,
            rotation.reason.as_str(),
            rotation.emergency,
            rotation.incident_id,
            now,
            now
        ]);
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            return Err(StoreError::Conflict("an active rotation".into()));
        }
        other => other?,
    };
    // Sealed once for the whole transaction (see `batch.rs`).
    append_audit(tx, None, std::slice::from_ref(audit))
}

/// The statements of one step ([`SqliteStore::advance_rotation`]).
fn advance_in(
    tx: &mut Tx<'_>,
    key: Option<&IntegrityKey>, // for the current version's MAC at a promotion
    rotation: &RotationRecord,
    change: &StepChange,
    audit: &AuditEvent,
) -> Result<(), StoreError> {
    let now = now_millis();
    let moved = tx
        .prepare_cached(
            "UPDATE rotations SET state = ?, updated_at = ?, attempts = 0, last_error = ?, \
             next_attempt_at = NULL, draining_since = coalesce(?, draining_since), \
             to_version = coalesce(?, to_version) WHERE id = ? AND state = ?",
        )?
        .execute(params![
            change.to.as_str(),
            now,
            change.error,
            change.draining_since,
            change.insert_pending.as_ref().map(|v| v.version),
            rotation.id,
            change.from.as_str()
        ])?;
    if moved != 1 {
        return Err(StoreError::Conflict(format!("rotation {}", rotation.id)));
    }
    let secret_id = rotation.secret_id.as_str();
    if let Some(version) = &change.insert_pending {
        insert_pending(tx, secret_id, version, now)?;
    }
    if change.promote {
        let to = rotation.to_version.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "rotation {}: promoting a rotation with no new version",
                rotation.id
            ))
        })?;
        promote(tx, key, secret_id, to, now)?;
    }
    if let Some(version) = change.revoke_version {
        tx.prepare_cached(
            "UPDATE versions SET stage = 'revoked', stage_changed_at = ? \
             WHERE secret_id = ? AND version = ? AND stage != 'revoked'",
        )?
        .execute(params![now, secret_id, version])?;
    }
    if change.succeeded {
        tx.prepare_cached(
            "UPDATE secrets SET failed_attempts = 0, last_error = NULL WHERE id = ?",
        )?
        .execute([secret_id])?;
    }
    // Sealed once for the whole transaction (see `batch.rs`).
    append_audit(tx, None, std::slice::from_ref(audit))
}

const ROTATION_SELECT_BY_ID: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE r.id = ?";
const ROTATION_SELECT_ACTIVE: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id \
     WHERE r.state NOT IN ('done', 'failed', 'rolled-back') ORDER BY r.created_at";
const ROTATION_SELECT_LATEST: &str = "SELECT r.id, r.secret_id, s.name, r.state, r.from_version, \
     r.to_version, r.proposed, r.reason, r.emergency, r.incident_id, r.attempts, r.last_error, \
     r.next_attempt_at, r.draining_since, r.created_at, r.updated_at \
     FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE r.secret_id = ? \
     ORDER BY r.created_at DESC, r.rowid DESC LIMIT 1";

fn rotation_from_row(row: &rusqlite::Row<'_>) -> Result<RotationRecord, StoreError> {
    let id: String = row.get(0)?;
    let in_row = |e: StoreError| e.in_row(format!("rotation {id}"));
    let state = RotationState::parse(&row.get::<_, String>(3)?).map_err(in_row)?;
    let reason = Reason::parse(&row.get::<_, String>(7)?).map_err(in_row)?;
    Ok(RotationRecord {
        id,
        secret_id: row.get(1)?,
        secret_name: row.get(2)?,
        state,
        from_version: row.get(4)?,
        to_version: row.get(5)?,
        proposed: optional_blob(row, 6)?,
        reason,
        emergency: row.get(8)?,
        incident_id: row.get(9)?,
        attempts: row.get(10)?,
        last_error: row.get(11)?,
        next_attempt_at: row.get(12)?,
        draining_since: row.get(13)?,
        created_at: row.get(14)?,
        updated_at: row.get(15)?,
    })
}

pub(super) async fn active_rotation_in(
    tx: &mut SqliteConnection,
    secret_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM rotations WHERE secret_id = ? AND state NOT IN ('done', 'failed', 'rolled-back')",
    )
    .bind(secret_id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// Stores a rotation's new version as `pending`; it must be the secret's next number.
fn insert_pending(
    db: &Db,
    secret_id: &str,
    version: &NewVersion,
    now: Millis,
) -> Result<(), StoreError> {
    let latest: Option<i64> = db
        .prepare_cached("SELECT max(version) FROM versions WHERE secret_id = ?")?
        .query_row([secret_id], |r| r.get(0))?;
    if latest.unwrap_or(0) + 1 != version.version {
        return Err(StoreError::Conflict("the secret's versions".into()));
    }
    insert_version(db, secret_id, version, Stage::Pending, now)
}

/// Makes version `to` current: the old current becomes previous, the old previous revoked.
fn promote(
    db: &Db,
    key: Option<&IntegrityKey>,
    secret_id: &str,
    to: i64,
    now: Millis,
) -> Result<(), StoreError> {
    retire_current(db, secret_id, Some(to), now)?;
    db.prepare_cached(
        "UPDATE versions SET stage = 'current', stage_changed_at = ? \
         WHERE secret_id = ? AND version = ?",
    )?
    .execute(params![now, secret_id, to])?;
    mark_current(db, key, secret_id, to)?;
    db.prepare_cached("UPDATE secrets SET updated_at = ?, last_rotated_at = ? WHERE id = ?")?
        .execute(params![now, now, secret_id])?;
    Ok(())
}
