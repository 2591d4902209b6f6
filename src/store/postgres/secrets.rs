//! Secrets and their versions: reads, new versions, registration, failures and quarantine.

use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use crate::audit::AuditEvent;
use crate::clock::{Millis, now_millis};
use crate::crypto::IntegrityKey;
use crate::store::{
    NewSecret, NewVersion, Registered, SealedSecret, SecretRecord, SecretSummary, Stage,
    StoreError, VersionRecord, VersionTarget,
};
use crate::store::{RotationState, parse_tags};

use super::audit::append_audit_in;
use super::incidents::resolutions_in;
use super::rotations::active_rotation_in;
use super::{PgStore, announce, check_generation, is_unique_violation};

impl PgStore {
    /// A secret by name.
    pub async fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, provider, wrapped_data_key, tags, created_at, updated_at, \
             (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
             FROM secrets WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(SecretRecord {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            provider: row.try_get(2)?,
            wrapped_data_key: row.try_get(3)?,
            tags: parse_tags(&row.try_get::<String, _>(4)?)?,
            created_at: row.try_get(5)?,
            updated_at: row.try_get(6)?,
            latest_version: row.try_get(7)?,
        }))
    }

    /// Whether the secret is quarantined (a cheap read for the engine's waits).
    pub async fn is_quarantined(&self, name: &str) -> Result<bool, StoreError> {
        let quarantined: Option<bool> =
            sqlx::query_scalar("SELECT quarantined_at IS NOT NULL FROM secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(quarantined.unwrap_or(false))
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
        let row = match version {
            None => {
                sqlx::query(select_joined_on!(
                    "AND v.stage = 'current' WHERE s.name = $1"
                ))
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
            }
            Some(n) => {
                sqlx::query(select_joined_on!("AND v.version = $1 WHERE s.name = $2"))
                    .bind(n)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        let Some(row) = row else { return Ok(None) };
        Ok(Some(SealedSecret {
            secret_id: row.try_get(0)?,
            wrapped_data_key: row.try_get(1)?,
            version: version_from_row(&row, 2)?,
            current_mac: row.try_get(8)?,
        }))
    }

    async fn summaries(&self, name: Option<&str>) -> Result<Vec<SecretSummary>, StoreError> {
        // SQLite breaks a tie of `created_at` by rowid (the later insert); PostgreSQL has no
        // rowid. Of two rotations of one secret, the later was planned only once the earlier
        // had ended (one active rotation per secret), so an active one is the later, and
        // otherwise the later moved last; the id only makes a full tie deterministic.
        // Names in SQLite's order (BINARY: bytewise), whatever the database's collation.
        let rows = sqlx::query(
            "SELECT s.id, s.name, s.provider, \
             (SELECT version FROM versions v WHERE v.secret_id = s.id AND v.stage = 'current'), \
             s.updated_at, s.tags, s.next_rotation_at, s.last_rotated_at, \
             (SELECT state FROM rotations r WHERE r.secret_id = s.id \
              ORDER BY r.created_at DESC, \
              (r.state NOT IN ('done', 'failed', 'rolled-back')) DESC, \
              r.updated_at DESC, r.id DESC LIMIT 1), \
             s.failed_attempts, s.quarantined_at, \
             coalesce((SELECT r.last_error FROM rotations r WHERE r.secret_id = s.id \
              AND r.state NOT IN ('done', 'failed', 'rolled-back') LIMIT 1), s.last_error) \
             FROM secrets s WHERE $1::text IS NULL OR s.name = $1 ORDER BY s.name COLLATE \"C\"",
        )
        .bind(name)
        .fetch_all(&self.pool)
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
                sqlx::query_as("SELECT id, provider, tags FROM secrets WHERE name = $1")
                    .bind(secret.name.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            match existing {
                None => {
                    sqlx::query(
                        "INSERT INTO secrets (id, name, provider, wrapped_data_key, tags, \
                         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
                    sqlx::query("UPDATE secrets SET provider = $1, tags = $2 WHERE id = $3")
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
        announce(&mut tx, None).await?;
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
        // A write transaction like any other: the leader's term fences it.
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE secrets SET next_rotation_at = $1 WHERE id = $2")
            .bind(at)
            .bind(secret_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
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
        // `quarantine` is a parameter of a CASE condition, not a stored flag: a boolean here.
        let count: i64 = sqlx::query_scalar(
            "UPDATE secrets SET failed_attempts = failed_attempts + 1, last_error = $1, \
             quarantined_at = CASE WHEN $2 THEN coalesce(quarantined_at, $3) \
             ELSE quarantined_at END \
             WHERE id = $4 RETURNING failed_attempts",
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
        let counted: Option<bool> = sqlx::query_scalar(
            "SELECT quarantined_at IS NOT NULL OR failed_attempts > 0 FROM secrets WHERE id = $1",
        )
        .bind(secret_id)
        .fetch_optional(&self.pool)
        .await?;
        if !counted.unwrap_or(false) {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE secrets SET quarantined_at = NULL, failed_attempts = 0 \
             WHERE id = $1 AND (quarantined_at IS NOT NULL OR failed_attempts > 0)",
        )
        .bind(secret_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed > 0 {
            // SQLite's group commit sealed the chain's head at its commit: sealed here.
            append_audit_in(&mut tx, self.integrity(), std::slice::from_ref(&audit)).await?;
        }
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
             WHERE v.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_all(&self.pool)
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
        let Some(cache) = self.cache().filter(|_| version.is_none()) else {
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
                    sqlx::query_scalar("SELECT updated_at FROM secrets WHERE id = $1")
                        .bind(secret_id)
                        .fetch_one(&mut *tx)
                        .await?;
                resolutions_in(&mut tx, secret_id, previous, &audit.actor).await?
            }
        };
        audits.insert(0, audit);
        retire_current(&mut tx, secret_id, None, now).await?;
        insert_version(&mut tx, secret_id, version, Stage::Current, now).await?;
        mark_current(&mut tx, self.integrity(), secret_id, version.version).await?;
        sqlx::query("UPDATE secrets SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(secret_id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, self.integrity(), &audits).await?;
        announce(&mut tx, Some(name)).await?;
        tx.commit().await?;
        self.invalidate(Some(name));
        Ok(())
    }

    /// All secrets, by name.
    pub async fn list(&self) -> Result<Vec<SecretSummary>, StoreError> {
        self.summaries(None).await
    }

    /// Secrets whose current version a plugin marked as not persisted upstream
    /// (`meta.acl_persisted = false`: a restart of the server would undo the change).
    pub async fn unpersisted_current_versions(&self) -> Result<Vec<String>, StoreError> {
        // SQLite's `json_extract(meta, '$.acl_persisted') = 0` holds for JSON false and for
        // the number 0 (in any spelling); jsonb compares numbers by value. Names in SQLite's
        // bytewise order.
        Ok(sqlx::query_scalar(
            "SELECT s.name FROM versions v JOIN secrets s ON s.id = v.secret_id \
             WHERE v.stage = 'current' \
             AND (v.meta::jsonb -> 'acl_persisted') IN ('false'::jsonb, '0'::jsonb) \
             ORDER BY s.name COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
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
        let mut tx = self.begin_write().await?;
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else { return Ok(None) };
        let versions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM versions WHERE secret_id = $1")
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM secrets WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        announce(&mut tx, Some(name)).await?;
        tx.commit().await?;
        self.invalidate(Some(name));
        // (SQLite then truncates its write-ahead log, whose frames still held the old pages.
        // PostgreSQL's WAL and dead tuples are the server's to recycle: nothing to do here.)
        Ok(Some(versions))
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
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE versions SET stage = 'revoked', stage_changed_at = $1 \
             WHERE secret_id = $2 AND version = $3 AND stage != 'revoked'",
        )
        .bind(now_millis())
        .bind(secret_id)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        announce(&mut tx, Some(name)).await?;
        tx.commit().await?;
        self.invalidate(Some(name));
        Ok(())
    }
}

/// The version in a row's columns `first..first + 6`: version, stage, ciphertext, meta,
/// fingerprint, created_at.
fn version_from_row(row: &PgRow, first: usize) -> Result<VersionRecord, StoreError> {
    let meta: String = row.try_get(first + 3)?;
    let meta = match serde_json::from_str(&meta) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(StoreError::Corrupt(
                "a version's meta is not a JSON object".into(),
            ));
        }
    };
    Ok(VersionRecord {
        version: row.try_get(first)?,
        stage: Stage::parse(&row.try_get::<String, _>(first + 1)?)?,
        ciphertext: row.try_get(first + 2)?,
        meta,
        fingerprint: row.try_get(first + 4)?,
        created_at: row.try_get(first + 5)?,
    })
}

/// Inserts a new secret's row; a name already taken is a conflict.
async fn insert_secret(
    conn: &mut PgConnection,
    secret: &NewSecret,
    now: Millis,
) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO secrets (id, name, provider, wrapped_data_key, tags, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(secret.id.as_str())
    .bind(secret.name.as_str())
    .bind(secret.provider.as_str())
    .bind(secret.wrapped_data_key.as_slice())
    .bind(serde_json::to_string(&secret.tags).expect("tags serialize"))
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
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
    conn: &mut PgConnection,
    secret_id: &str,
    expected: Option<i64>,
) -> Result<(), StoreError> {
    let row: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
         FROM secrets WHERE id = $1",
    )
    .bind(secret_id)
    .fetch_optional(&mut *conn)
    .await?;
    if row != Some(expected) {
        return Err(StoreError::Conflict("the secret".into()));
    }
    if active_rotation_in(&mut *conn, secret_id).await?.is_some() {
        let name: String = sqlx::query_scalar("SELECT name FROM secrets WHERE id = $1")
            .bind(secret_id)
            .fetch_one(&mut *conn)
            .await?;
        return Err(StoreError::RotationInProgress(name));
    }
    Ok(())
}

/// Makes room for a new current version: the previous one is revoked, the current one becomes
/// previous (both except version `keep`, when given: the one being promoted).
///
/// Two statements in this order, and `keep` as a plain comparison (versions start at 1, so 0
/// keeps none), as on SQLite: the old previous leaves its stage before the current one takes
/// it (a unique index allows one previous per secret, checked row by row).
pub(super) async fn retire_current(
    conn: &mut PgConnection,
    secret_id: &str,
    keep: Option<i64>,
    now: Millis,
) -> Result<(), StoreError> {
    let keep = keep.unwrap_or(0);
    sqlx::query(
        "UPDATE versions SET stage = 'revoked', stage_changed_at = $1 \
         WHERE secret_id = $2 AND stage = 'previous' AND version != $3",
    )
    .bind(now)
    .bind(secret_id)
    .bind(keep)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE versions SET stage = 'previous', stage_changed_at = $1 \
         WHERE secret_id = $2 AND stage = 'current' AND version != $3",
    )
    .bind(now)
    .bind(secret_id)
    .bind(keep)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records, under the integrity key, that `version` is secret `secret_id`'s current version
/// (and under which name). Without a key (a process that never unlocked) nothing is recorded.
pub(super) async fn mark_current(
    conn: &mut PgConnection,
    key: Option<&IntegrityKey>,
    secret_id: &str,
    version: i64,
) -> Result<(), StoreError> {
    let Some(key) = key else { return Ok(()) };
    let name: String = sqlx::query_scalar("SELECT name FROM secrets WHERE id = $1")
        .bind(secret_id)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query("UPDATE secrets SET current_mac = $1 WHERE id = $2")
        .bind(key.current_version(secret_id, &name, version).as_slice())
        .bind(secret_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts a sealed version at `stage`.
pub(super) async fn insert_version(
    conn: &mut PgConnection,
    secret_id: &str,
    version: &NewVersion,
    stage: Stage,
    now: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO versions (secret_id, version, stage, ciphertext, meta, fingerprint, \
         created_at, stage_changed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(secret_id)
    .bind(version.version)
    .bind(stage.as_str())
    .bind(version.ciphertext.as_slice())
    .bind(serde_json::Value::Object(version.meta.clone()).to_string())
    .bind(version.fingerprint.as_slice())
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
