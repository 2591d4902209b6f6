//! Secrets and their versions: reads, new versions, registration, failures and quarantine.

use std::sync::Arc;

use sqlx::Row;
use sqlx::sqlite::SqliteConnection;

use crate::audit::AuditEvent;
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::{
    NewSecret, NewVersion, Registered, SealedSecret, SecretRecord, SecretSummary, Stage,
    StoreError, VersionRecord, VersionTarget,
};
use crate::store::{RotationState, parse_tags};

use rusqlite::{OptionalExtension, params};

use super::audit::{append_audit, append_audit_in};
use super::direct::{Db, blob, on_handle, optional_blob};
use super::incidents::resolutions_in;
use super::rotations::active_rotation_in;
use super::{SqliteStore, check_generation, is_unique_violation};

impl SqliteStore {
    /// A secret by name.
    pub async fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.direct_reader.read(|db| {
            db.prepare_cached(
                "SELECT id, name, provider, wrapped_data_key, tags, created_at, updated_at, \
                 (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
                 FROM secrets WHERE name = ?",
            )?
            .query_and_then([name], |row| {
                Ok(SecretRecord {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    provider: row.get(2)?,
                    wrapped_data_key: blob(row, 3)?,
                    tags: parse_tags(&row.get::<_, String>(4)?)?,
                    created_at: row.get(5)?,
                    updated_at: row.get(6)?,
                    latest_version: row.get(7)?,
                })
            })?
            .next()
            .transpose()
        })
    }

    /// Whether the secret is quarantined (a cheap read for the engine's waits).
    pub async fn is_quarantined(&self, name: &str) -> Result<bool, StoreError> {
        self.direct_reader.read(|db| {
            Ok(db
                .prepare_cached("SELECT quarantined_at IS NOT NULL FROM secrets WHERE name = ?")?
                .query_row([name], |row| row.get(0))
                .optional()?
                .unwrap_or(false))
        })
    }

    async fn sealed_in_db(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<SealedSecret>, StoreError> {
        macro_rules! select_joined_on {
            ($on:literal) => {
                concat!(
                    "SELECT s.id, s.wrapped_data_key, v.version, v.stage, v.ciphertext, v.meta, \
                     v.fingerprint, v.created_at, s.current_mac FROM secrets s JOIN versions v \
                     ON v.secret_id = s.id ",
                    $on
                )
            };
        }
        let sealed = |row: &rusqlite::Row<'_>| {
            Ok(SealedSecret {
                secret_id: row.get(0)?,
                wrapped_data_key: blob(row, 1)?,
                version: version_from_row(row, 2)?,
                current_mac: optional_blob(row, 8)?,
            })
        };
        self.direct_reader.read(|db| {
            match version {
                None => db
                    .prepare_cached(select_joined_on!(
                        "AND v.stage = 'current' WHERE s.name = ?"
                    ))?
                    .query_and_then([name], sealed)?
                    .next(),
                Some(n) => db
                    .prepare_cached(select_joined_on!("AND v.version = ? WHERE s.name = ?"))?
                    .query_and_then(params![n, name], sealed)?
                    .next(),
            }
            .transpose()
        })
    }

    async fn put_version_in_db(
        &self,
        generation: i64,
        target: &VersionTarget,
        version: &NewVersion,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        check_generation(&mut tx, generation).await?;
        let now = now_millis();
        let secret_id = match target {
            VersionTarget::New(secret) => {
                insert_secret(&mut tx, secret, now).await?;
                secret.id.as_str()
            }
            VersionTarget::Existing {
                secret_id,
                expected_latest,
            } => {
                check_latest(&mut tx, secret_id, *expected_latest).await?;
                secret_id.as_str()
            }
        };
        let mut audits = match target {
            VersionTarget::New(_) => Vec::new(),
            VersionTarget::Existing { .. } => {
                let previous: Millis =
                    sqlx::query_scalar("SELECT updated_at FROM secrets WHERE id = ?")
                        .bind(secret_id)
                        .fetch_one(&mut *tx)
                        .await?;
                resolutions_in(&mut tx, secret_id, previous, &audit.actor).await?
            }
        };
        audits.insert(0, audit);
        let key = self.integrity();
        on_handle(&mut tx, |db| {
            retire_current(db, secret_id, None, now)?;
            insert_version(db, secret_id, version, Stage::Current, now)?;
            mark_current(db, key, secret_id, version.version)
        })
        .await?;
        sqlx::query("UPDATE secrets SET updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(secret_id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, self.integrity(), &audits).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn summaries(&self, name: Option<&str>) -> Result<Vec<SecretSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, s.name, s.provider, \
             (SELECT version FROM versions v WHERE v.secret_id = s.id AND v.stage = 'current'), \
             s.updated_at, s.tags, s.next_rotation_at, s.last_rotated_at, \
             (SELECT state FROM rotations r WHERE r.secret_id = s.id \
              ORDER BY r.created_at DESC, r.rowid DESC LIMIT 1), \
             s.failed_attempts, s.quarantined_at, \
             coalesce((SELECT r.last_error FROM rotations r WHERE r.secret_id = s.id \
              AND r.state NOT IN ('done', 'failed', 'rolled-back')), s.last_error) \
             FROM secrets s WHERE ?1 IS NULL OR s.name = ?1 ORDER BY s.name",
        )
        .bind(name)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let name: String = row.try_get(1)?;
                let in_row = |e: StoreError| e.in_row(format!("secret {name:?}"));
                let tags = parse_tags(&row.try_get::<String, _>(5)?).map_err(in_row)?;
                let state: Option<String> = row.try_get(8)?;
                let rotation_state = state
                    .as_deref()
                    .map(RotationState::parse)
                    .transpose()
                    .map_err(in_row)?;
                Ok(SecretSummary {
                    id: row.try_get(0)?,
                    name,
                    provider: row.try_get(2)?,
                    version: row.try_get(3)?,
                    updated_at: row.try_get(4)?,
                    tags,
                    next_rotation_at: row.try_get(6)?,
                    last_rotated_at: row.try_get(7)?,
                    rotation_state,
                    failed_attempts: row.try_get(9)?,
                    quarantined_at: row.try_get(10)?,
                    last_error: row.try_get(11)?,
                })
            })
            .collect()
    }

    async fn remove_secret_in_db(
        &self,
        name: &str,
        audit: AuditEvent,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM secrets WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else { return Ok(None) };
        let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM versions WHERE secret_id = ?")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM secrets WHERE id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        // secure_delete zeroed the freed pages; checkpointing and truncating the WAL drops the
        // frames that still held the old pages (best effort: a concurrent reader may delay it).
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.writer)
            .await
        {
            tracing::warn!(error = %e, "could not truncate the write-ahead log after a removal");
        }
        Ok(Some(versions))
    }

    /// For each secret, creates its row (with its fresh wrapped data key) if its name does not
    /// exist, or updates its provider and tags if they changed, appending the secret's audit
    /// event when anything changed; one transaction for all. Returns how many changed.
    pub async fn register_secrets(
        &self,
        generation: i64,
        secrets: Vec<(NewSecret, AuditEvent)>,
    ) -> Result<usize, StoreError> {
        let mut tx = self.begin_write().await?;
        check_generation(&mut tx, generation).await?;
        let now = now_millis();
        let mut audits = Vec::new();
        for (secret, audit) in secrets {
            let tags = serde_json::to_string(&secret.tags).expect("tags serialize");
            let existing: Option<(String, String, String)> =
                sqlx::query_as("SELECT id, provider, tags FROM secrets WHERE name = ?")
                    .bind(secret.name.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            match existing {
                None => {
                    sqlx::query(
                        "INSERT INTO secrets (id, name, provider, wrapped_data_key, tags, \
                         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(secret.id.as_str())
                    .bind(secret.name.as_str())
                    .bind(secret.provider.as_str())
                    .bind(secret.wrapped_data_key.as_slice())
                    .bind(tags.as_str())
                    .bind(now)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                Some((id, provider, old_tags))
                    if provider != secret.provider || old_tags != tags =>
                {
                    sqlx::query("UPDATE secrets SET provider = ?, tags = ? WHERE id = ?")
                        .bind(secret.provider.as_str())
                        .bind(tags.as_str())
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Some(_) => continue,
            }
            audits.push(audit);
        }
        append_audit_in(&mut tx, self.integrity(), &audits).await?;
        tx.commit().await?;
        self.invalidate(None);
        Ok(audits.len())
    }

    /// Sets when the scheduler next rotates a secret.
    pub async fn set_next_rotation(
        &self,
        secret_id: &str,
        at: Option<Millis>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE secrets SET next_rotation_at = ? WHERE id = ?")
            .bind(at)
            .bind(secret_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Counts a failed rotation against a secret; quarantines it if asked. Returns the count.
    pub async fn record_secret_failure(
        &self,
        secret_id: &str,
        error: &str,
        quarantine: bool,
        audit: AuditEvent,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let count: i64 = sqlx::query_scalar(
            "UPDATE secrets SET failed_attempts = failed_attempts + 1, last_error = ?, \
             quarantined_at = CASE WHEN ? THEN coalesce(quarantined_at, ?) ELSE quarantined_at END \
             WHERE id = ? RETURNING failed_attempts",
        )
        .bind(error)
        .bind(quarantine)
        .bind(now_millis())
        .bind(secret_id)
        .fetch_one(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(count)
    }

    /// Lifts a quarantine and resets the failure count: a read when there is nothing to lift
    /// (every request of an incident asks), else a write (group-committed in the daemon).
    pub async fn unquarantine(&self, secret_id: &str, audit: AuditEvent) -> Result<(), StoreError> {
        // Most requests find nothing to lift: a read, and no write at all. (A failure counted
        // after this read is one the request did not see; it stays counted.)
        let counted = self.direct_reader.read(|db| {
            Ok(db
                .prepare_cached(
                    "SELECT quarantined_at IS NOT NULL OR failed_attempts > 0 FROM secrets \
                     WHERE id = ?",
                )?
                .query_row([secret_id], |row| row.get(0))
                .optional()?
                .unwrap_or(false))
        })?;
        if !counted {
            return Ok(());
        }
        let secret_id = secret_id.to_string();
        self.write(Box::new(move |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE secrets SET quarantined_at = NULL, failed_attempts = 0 \
                     WHERE id = ? AND (quarantined_at IS NOT NULL OR failed_attempts > 0)",
                )?
                .execute([secret_id.as_str()])?;
            if changed > 0 {
                append_audit(tx, None, std::slice::from_ref(&audit))?;
            }
            Ok(())
        }))
        .await
    }

    async fn revoke_version_in_db(
        &self,
        secret_id: &str,
        version: i64,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE versions SET stage = 'revoked', stage_changed_at = ? \
             WHERE secret_id = ? AND version = ? AND stage != 'revoked'",
        )
        .bind(now_millis())
        .bind(secret_id)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Versions whose keyed fingerprint is `fingerprint`: (secret name, version, stage).
    pub async fn versions_by_fingerprint(
        &self,
        fingerprint: &[u8],
    ) -> Result<Vec<(String, i64, Stage)>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, v.version, v.stage FROM versions v JOIN secrets s ON s.id = v.secret_id \
             WHERE v.fingerprint = ?",
        )
        .bind(fingerprint)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    Stage::parse(&r.try_get::<String, _>(2)?)?,
                ))
            })
            .collect()
    }

    /// A secret's current version (`version = None`) or a given version, still sealed. The
    /// daemon's reads of current versions are served from its cache.
    pub async fn sealed(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<Arc<SealedSecret>>, StoreError> {
        let Some(cache) = self.cache.as_ref().filter(|_| version.is_none()) else {
            return Ok(self.sealed_in_db(name, version).await?.map(Arc::new));
        };
        let epoch = match cache.get(name) {
            Ok(hit) => return Ok(Some(hit)),
            Err(epoch) => epoch,
        };
        let found = self.sealed_in_db(name, None).await?.map(Arc::new);
        if let Some(sealed) = &found {
            cache.insert(epoch, name, sealed.clone());
        }
        Ok(found)
    }

    /// Adds a version and makes it current (the old current becomes previous, the old previous
    /// revoked). Checks that the root key generation is still `generation`.
    pub async fn put_version(
        &self,
        name: &str,
        generation: i64,
        target: &VersionTarget,
        version: &NewVersion,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let result = self
            .put_version_in_db(generation, target, version, audit)
            .await;
        self.invalidate(Some(name));
        result
    }

    /// All secrets, by name.
    pub async fn list(&self) -> Result<Vec<SecretSummary>, StoreError> {
        self.summaries(None).await
    }

    /// Secrets whose current version a plugin marked as not persisted upstream
    /// (`meta.acl_persisted = false`: a restart of the server would undo the change).
    pub async fn unpersisted_current_versions(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT s.name FROM versions v JOIN secrets s ON s.id = v.secret_id \
             WHERE v.stage = 'current' AND json_extract(v.meta, '$.acl_persisted') = 0 \
             ORDER BY s.name",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    /// Every secret's name, provider, tags and current version: what start-up needs, in one
    /// narrow read.
    pub async fn registered(&self) -> Result<Vec<Registered>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, s.provider, s.tags, \
             (SELECT version FROM versions v WHERE v.secret_id = s.id AND v.stage = 'current') \
             FROM secrets s",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get(0)?;
                let tags: String = r.try_get(2)?;
                let tags = serde_json::from_str(&tags).map_err(|_| {
                    StoreError::Corrupt(format!("secret {name:?}: its tags are not a JSON list"))
                })?;
                Ok(Registered {
                    provider: r.try_get(1)?,
                    version: r.try_get(3)?,
                    tags,
                    name,
                })
            })
            .collect()
    }

    /// Every secret's name, next scheduled rotation and whether it is quarantined: what the
    /// scheduler reads on each wake, in one narrow read.
    pub async fn due_times(&self) -> Result<Vec<(String, Option<Millis>, bool)>, StoreError> {
        Ok(
            sqlx::query_as(
                "SELECT name, next_rotation_at, quarantined_at IS NOT NULL FROM secrets",
            )
            .fetch_all(&self.reader)
            .await?,
        )
    }

    /// One secret's summary.
    pub async fn secret_summary(&self, name: &str) -> Result<Option<SecretSummary>, StoreError> {
        Ok(self.summaries(Some(name)).await?.pop())
    }

    /// Deletes a secret, its data key and all its versions. Returns how many versions it had,
    /// or `None` if there was no such secret.
    pub async fn remove_secret(
        &self,
        name: &str,
        audit: AuditEvent,
    ) -> Result<Option<i64>, StoreError> {
        let result = self.remove_secret_in_db(name, audit).await;
        self.invalidate(Some(name));
        result
    }

    /// Marks a version revoked outside a rotation (a credential deactivated by hand or in an
    /// emergency, for providers that cannot create a replacement).
    pub async fn revoke_version(
        &self,
        name: &str,
        secret_id: &str,
        version: i64,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let result = self.revoke_version_in_db(secret_id, version, audit).await;
        self.invalidate(Some(name));
        result
    }
}

fn version_from_row(row: &rusqlite::Row<'_>, first: usize) -> Result<VersionRecord, StoreError> {
    let meta: String = row.get(first + 3)?;
    let meta = match serde_json::from_str(&meta) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(StoreError::Corrupt(
                "a version's meta is not a JSON object".into(),
            ));
        }
    };
    Ok(VersionRecord {
        version: row.get(first)?,
        stage: Stage::parse(&row.get::<_, String>(first + 1)?)?,
        ciphertext: blob(row, first + 2)?,
        meta,
        fingerprint: blob(row, first + 4)?,
        created_at: row.get(first + 5)?,
    })
}

/// Inserts a new secret's row; a name already taken is a conflict.
async fn insert_secret(
    tx: &mut SqliteConnection,
    secret: &NewSecret,
    now: Millis,
) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO secrets (id, name, provider, wrapped_data_key, tags, created_at, \
         updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(secret.id.as_str())
    .bind(secret.name.as_str())
    .bind(secret.provider.as_str())
    .bind(secret.wrapped_data_key.as_slice())
    .bind(serde_json::to_string(&secret.tags).expect("tags serialize"))
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            Err(StoreError::Conflict(format!("secret {:?}", secret.name)))
        }
        other => other.map(|_| ()).map_err(Into::into),
    }
}

/// Checks that an existing secret's latest version is still `expected` and that no rotation
/// of it is under way (a manual write would race it).
async fn check_latest(
    tx: &mut SqliteConnection,
    secret_id: &str,
    expected: Option<i64>,
) -> Result<(), StoreError> {
    let row: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
         FROM secrets WHERE id = ?",
    )
    .bind(secret_id)
    .fetch_optional(&mut *tx)
    .await?;
    if row != Some(expected) {
        return Err(StoreError::Conflict("the secret".into()));
    }
    if active_rotation_in(&mut *tx, secret_id).await?.is_some() {
        let name: String = sqlx::query_scalar("SELECT name FROM secrets WHERE id = ?")
            .bind(secret_id)
            .fetch_one(&mut *tx)
            .await?;
        return Err(StoreError::RotationInProgress(name));
    }
    Ok(())
}

/// Makes room for a new current version: the previous one is revoked, the current one becomes
/// previous (both except version `keep`, when given: the one being promoted).
///
/// Two statements with the stages written out, and `keep` as a plain comparison (versions
/// start at 1, so 0 keeps none): SQLite prepares a statement again whenever a parameter that
/// can steer its plan is bound to a new value, which one statement taking the stages (or
/// `? IS NULL OR …`) as parameters made it do at every call.
pub(super) fn retire_current(
    db: &Db,
    secret_id: &str,
    keep: Option<i64>,
    now: Millis,
) -> Result<(), StoreError> {
    let keep = keep.unwrap_or(0);
    db.prepare_cached(
        "UPDATE versions SET stage = 'revoked', stage_changed_at = ?1 \
         WHERE secret_id = ?2 AND stage = 'previous' AND version != ?3",
    )?
    .execute(params![now, secret_id, keep])?;
    db.prepare_cached(
        "UPDATE versions SET stage = 'previous', stage_changed_at = ?1 \
         WHERE secret_id = ?2 AND stage = 'current' AND version != ?3",
    )?
    .execute(params![now, secret_id, keep])?;
    Ok(())
}

/// Records, under the integrity key, that `version` is secret `secret_id`'s current version
/// (and under which name). Without a key (a process that never unlocked) nothing is recorded.
pub(super) fn mark_current(
    db: &Db,
    key: Option<&IntegrityKey>,
    secret_id: &str,
    version: i64,
) -> Result<(), StoreError> {
    let Some(key) = key else { return Ok(()) };
    let name: String = db
        .prepare_cached("SELECT name FROM secrets WHERE id = ?")?
        .query_row([secret_id], |r| r.get(0))?;
    db.prepare_cached("UPDATE secrets SET current_mac = ? WHERE id = ?")?
        .execute(params![
            key.current_version(secret_id, &name, version).as_slice(),
            secret_id
        ])?;
    Ok(())
}

/// Inserts a sealed version at `stage`.
pub(super) fn insert_version(
    db: &Db,
    secret_id: &str,
    version: &NewVersion,
    stage: Stage,
    now: Millis,
) -> Result<(), StoreError> {
    db.prepare_cached(
        "INSERT INTO versions (secret_id, version, stage, ciphertext, meta, fingerprint, \
         created_at, stage_changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        secret_id,
        version.version,
        stage.as_str(),
        version.ciphertext.as_slice(),
        serde_json::Value::Object(version.meta.clone()).to_string(),
        version.fingerprint.as_slice(),
        now,
        now
    ])?;
    Ok(())
}
