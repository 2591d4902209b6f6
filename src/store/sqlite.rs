//! The SQLite backend: one file in WAL mode with full sync, `secure_delete` on, mode 0600.
//!
//! Writes go through a single-connection pool and `BEGIN IMMEDIATE`, so in-process writers queue
//! fairly and a read-then-write transaction never fails on a stale snapshot; other processes
//! wait on SQLite's busy timeout. Reads use a separate pool and run concurrently.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use super::{
    AlertRecord, DeliveryRecord, IncidentRecord, IncidentRotation, LeaseOp, LeaseRow, Millis,
    NewRotation, NewSecret, NewVersion, RewrappedKey, RotationRecord, SealedSecret, SecretRecord,
    SecretSummary, Stage, StepChange, StoreError, VaultHeader, VersionRecord, VersionTarget,
    now_millis,
};
use crate::audit::{AuditEvent, AuditRecord, GENESIS_HASH, chain_hash};
use crate::crypto::KdfParams;
use crate::rotation::RotationState;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const READERS: u32 = 8;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// Dropped with the store: stops the background checkpointer.
    _checkpointer: Option<tokio::sync::watch::Sender<()>>,
}

/// How often the daemon's background checkpointer moves the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        .pragma("secure_delete", "ON")
}

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn newest_known_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

impl SqliteStore {
    pub(super) async fn create(
        path: &Path,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| io_error("cannot create the store directory", dir, e))?;
            }
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
                    path: path.to_path_buf(),
                },
                _ => io_error("cannot create the store file", path, e),
            })?;
        let result = async {
            let store = Self::connect(path, false).await?;
            MIGRATOR.run(&store.writer).await?;
            store.init_header(header, audit).await?;
            Ok(store)
        }
        .await;
        if result.is_err() {
            remove_store_files(path);
        }
        result
    }

    pub(super) async fn open(
        path: &Path,
        migrate: bool,
        background_checkpoints: bool,
    ) -> Result<Self, StoreError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    path: path.to_path_buf(),
                    hint: "run `keywarden init` to create one, or point --store or [store] path \
                           at an existing store",
                });
            }
            Err(e) => {
                return Err(StoreError::Unreadable {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            Ok(meta) => {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", meta.permissions().mode() & 0o777),
                        "the store file is readable by other users; chmod 600 it"
                    );
                }
            }
        }
        // Surface permission problems as such, before SQLite turns them into something vaguer.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::Unreadable {
                path: path.to_path_buf(),
                source: e,
            })?;
        let mut store = Self::connect(path, background_checkpoints).await?;
        if background_checkpoints {
            store._checkpointer = Some(Self::start_checkpointer(path).await?);
        }
        let has_migrations: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&store.reader)
        .await
        .map_err(|e| unreadable(path, e))?;
        if !has_migrations {
            return Err(StoreError::NotInitialized {
                path: path.to_path_buf(),
            });
        }
        let found: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&store.reader)
                .await?;
        let supported = newest_known_migration();
        if let Some(found) = found.filter(|f| *f > supported) {
            return Err(StoreError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported,
            });
        }
        if found.unwrap_or(0) < supported {
            if !migrate {
                return Err(StoreError::SchemaTooOld {
                    path: path.to_path_buf(),
                });
            }
            MIGRATOR.run(&store.writer).await?;
        }
        Ok(store)
    }

    async fn connect(path: &Path, background_checkpoints: bool) -> Result<Self, StoreError> {
        let options = connect_options(path);
        // In the daemon, commits never run a checkpoint themselves (which would fsync the
        // database while every fetch waits behind it); a background connection does instead.
        let writer_options = if background_checkpoints {
            options.clone().pragma("wal_autocheckpoint", "0")
        } else {
            options.clone()
        };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(writer_options)
            .await
            .map_err(|e| unreadable(path, e))?;
        // A local file connection does not go stale: skip sqlx's ping before each acquire,
        // which would double the cost of a point read.
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|e| unreadable(path, e))?;
        Ok(Self {
            writer,
            reader,
            _checkpointer: None,
        })
    }

    /// Starts the daemon's checkpointer: a PASSIVE checkpoint every half second on its own
    /// connection, so writers never wait for one. It stops when the store is dropped.
    async fn start_checkpointer(path: &Path) -> Result<tokio::sync::watch::Sender<()>, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(connect_options(path))
            .await
            .map_err(|e| unreadable(path, e))?;
        let (stop, mut stopped) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                    _ = stopped.changed() => break,
                }
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, "background checkpoint failed");
                }
            }
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&pool)
                .await;
            pool.close().await;
        });
        Ok(stop)
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub(super) async fn header(&self) -> Result<Option<VaultHeader>, StoreError> {
        let row = sqlx::query(
            "SELECT kdf_algorithm, kdf_memory_kib, kdf_iterations, kdf_parallelism, kdf_salt, \
             wrapped_root_key, wrapped_fingerprint_key, root_generation FROM vault WHERE id = 1",
        )
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let algorithm: String = row.try_get(0)?;
        if algorithm != "argon2id" {
            return Err(StoreError::Corrupt(format!(
                "unknown key-derivation algorithm {algorithm:?}"
            )));
        }
        let param = |i: usize| -> Result<u32, StoreError> {
            let v: i64 = row.try_get(i)?;
            u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("KDF parameter {v} out of range")))
        };
        Ok(Some(VaultHeader {
            kdf: KdfParams {
                memory_kib: param(1)?,
                iterations: param(2)?,
                parallelism: param(3)?,
            },
            salt: row.try_get(4)?,
            wrapped_root_key: row.try_get(5)?,
            wrapped_fingerprint_key: row.try_get(6)?,
            root_generation: row.try_get(7)?,
        }))
    }

    async fn init_header(&self, header: &VaultHeader, audit: AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let now = now_millis();
        sqlx::query(
            "INSERT INTO vault (id, kdf_algorithm, kdf_memory_kib, kdf_iterations, \
             kdf_parallelism, kdf_salt, wrapped_root_key, wrapped_fingerprint_key, \
             root_generation, created_at, updated_at) \
             VALUES (1, 'argon2id', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(header.wrapped_fingerprint_key.as_slice())
        .bind(header.root_generation)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn replace_root_wrapping(
        &self,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE vault SET kdf_memory_kib = ?, kdf_iterations = ?, kdf_parallelism = ?, \
             kdf_salt = ?, wrapped_root_key = ?, updated_at = ? \
             WHERE id = 1 AND root_generation = ?",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(now_millis())
        .bind(header.root_generation)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::StaleKeys);
        }
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn all_data_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query("SELECT id, name, wrapped_data_key FROM secrets ORDER BY id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    pub(super) async fn rekey(
        &self,
        old_generation: i64,
        header: &VaultHeader,
        rewrapped: &[RewrappedKey],
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE vault SET kdf_memory_kib = ?, kdf_iterations = ?, kdf_parallelism = ?, \
             kdf_salt = ?, wrapped_root_key = ?, wrapped_fingerprint_key = ?, \
             root_generation = ?, updated_at = ? WHERE id = 1 AND root_generation = ?",
        )
        .bind(header.kdf.memory_kib)
        .bind(header.kdf.iterations)
        .bind(header.kdf.parallelism)
        .bind(header.salt.as_slice())
        .bind(header.wrapped_root_key.as_slice())
        .bind(header.wrapped_fingerprint_key.as_slice())
        .bind(header.root_generation)
        .bind(now_millis())
        .bind(old_generation)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::StaleKeys);
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM secrets")
            .fetch_one(&mut *tx)
            .await?;
        if count != rewrapped.len() as i64 {
            return Err(StoreError::Conflict("the set of secrets".into()));
        }
        for key in rewrapped {
            let done = sqlx::query("UPDATE secrets SET wrapped_data_key = ? WHERE id = ?")
                .bind(key.wrapped_data_key.as_slice())
                .bind(key.secret_id.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict("the set of secrets".into()));
            }
        }
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, provider, wrapped_data_key, tags, created_at, updated_at, \
             (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
             FROM secrets WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(SecretRecord {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                provider: row.try_get(2)?,
                wrapped_data_key: row.try_get(3)?,
                tags: parse_tags(&row.try_get::<String, _>(4)?)?,
                created_at: row.try_get(5)?,
                updated_at: row.try_get(6)?,
                latest_version: row.try_get(7)?,
            })
        })
        .transpose()
    }

    pub(super) async fn sealed(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<SealedSecret>, StoreError> {
        let row =
            match version {
                None => sqlx::query(
                    "SELECT s.id, s.wrapped_data_key, v.version, v.stage, v.ciphertext, v.meta, \
                     v.fingerprint, v.created_at FROM secrets s JOIN versions v \
                     ON v.secret_id = s.id AND v.stage = 'current' WHERE s.name = ?",
                )
                .bind(name)
                .fetch_optional(&self.reader)
                .await?,
                Some(n) => sqlx::query(
                    "SELECT s.id, s.wrapped_data_key, v.version, v.stage, v.ciphertext, v.meta, \
                     v.fingerprint, v.created_at FROM secrets s JOIN versions v \
                     ON v.secret_id = s.id AND v.version = ? WHERE s.name = ?",
                )
                .bind(n)
                .bind(name)
                .fetch_optional(&self.reader)
                .await?,
            };
        row.map(|row| {
            Ok(SealedSecret {
                secret_id: row.try_get(0)?,
                wrapped_data_key: row.try_get(1)?,
                version: version_from_row(&row, 2)?,
            })
        })
        .transpose()
    }

    pub(super) async fn put_version(
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
                        return Err(StoreError::Conflict(format!("secret {:?}", secret.name)));
                    }
                    other => other?,
                };
                secret.id.as_str()
            }
            VersionTarget::Existing {
                secret_id,
                expected_latest,
            } => {
                let row: Option<Option<i64>> = sqlx::query_scalar(
                    "SELECT (SELECT max(version) FROM versions WHERE secret_id = secrets.id) \
                     FROM secrets WHERE id = ?",
                )
                .bind(secret_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if row != Some(*expected_latest) {
                    return Err(StoreError::Conflict("the secret".into()));
                }
                if active_rotation_in(&mut tx, secret_id).await?.is_some() {
                    let name: String = sqlx::query_scalar("SELECT name FROM secrets WHERE id = ?")
                        .bind(secret_id.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                    return Err(StoreError::RotationInProgress(name));
                }
                secret_id.as_str()
            }
        };
        sqlx::query(
            "UPDATE versions SET stage = 'revoked', stage_changed_at = ? \
             WHERE secret_id = ? AND stage = 'previous'",
        )
        .bind(now)
        .bind(secret_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE versions SET stage = 'previous', stage_changed_at = ? \
             WHERE secret_id = ? AND stage = 'current'",
        )
        .bind(now)
        .bind(secret_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO versions (secret_id, version, stage, ciphertext, meta, fingerprint, \
             created_at, stage_changed_at) VALUES (?, ?, 'current', ?, ?, ?, ?, ?)",
        )
        .bind(secret_id)
        .bind(version.version)
        .bind(version.ciphertext.as_slice())
        .bind(serde_json::Value::Object(version.meta.clone()).to_string())
        .bind(version.fingerprint.as_slice())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE secrets SET updated_at = ? WHERE id = ?")
            .bind(now)
            .bind(secret_id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn summaries(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<SecretSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, s.name, s.provider, \
             (SELECT version FROM versions v WHERE v.secret_id = s.id AND v.stage = 'current'), \
             s.updated_at, s.tags, s.next_rotation_at, s.last_rotated_at, \
             (SELECT state FROM rotations r WHERE r.secret_id = s.id \
              ORDER BY r.created_at DESC, r.rowid DESC LIMIT 1), \
             s.failed_attempts, s.quarantined_at, s.last_error \
             FROM secrets s WHERE ?1 IS NULL OR s.name = ?1 ORDER BY s.name",
        )
        .bind(name)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let state: Option<String> = row.try_get(8)?;
                Ok(SecretSummary {
                    id: row.try_get(0)?,
                    name: row.try_get(1)?,
                    provider: row.try_get(2)?,
                    version: row.try_get(3)?,
                    updated_at: row.try_get(4)?,
                    tags: parse_tags(&row.try_get::<String, _>(5)?)?,
                    next_rotation_at: row.try_get(6)?,
                    last_rotated_at: row.try_get(7)?,
                    rotation_state: state.as_deref().map(parse_state).transpose()?,
                    failed_attempts: row.try_get(9)?,
                    quarantined_at: row.try_get(10)?,
                    last_error: row.try_get(11)?,
                })
            })
            .collect()
    }

    pub(super) async fn remove_secret(
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
        append_audit_in(&mut tx, &[audit]).await?;
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

    pub(super) async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        append_audit_in(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn audit_page(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
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

    pub(super) async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, secret, incident_id, detail, prev_hash, hash \
             FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq",
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) async fn register_secret(
        &self,
        generation: i64,
        secret: &NewSecret,
        audit: AuditEvent,
    ) -> Result<(SecretRecord, bool), StoreError> {
        let mut tx = self.begin_write().await?;
        check_generation(&mut tx, generation).await?;
        let tags = serde_json::to_string(&secret.tags).expect("tags serialize");
        let existing: Option<(String, String, String)> =
            sqlx::query_as("SELECT id, provider, tags FROM secrets WHERE name = ?")
                .bind(secret.name.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let now = now_millis();
        let changed = match existing {
            None => {
                sqlx::query(
                    "INSERT INTO secrets (id, name, provider, wrapped_data_key, tags, created_at, \
                     updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                true
            }
            Some((id, provider, old_tags)) if provider != secret.provider || old_tags != tags => {
                sqlx::query("UPDATE secrets SET provider = ?, tags = ? WHERE id = ?")
                    .bind(secret.provider.as_str())
                    .bind(tags.as_str())
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                true
            }
            Some(_) => false,
        };
        if changed {
            append_audit_in(&mut tx, &[audit]).await?;
        }
        tx.commit().await?;
        let record = self
            .secret(&secret.name)
            .await?
            .ok_or_else(|| StoreError::Conflict(format!("secret {:?}", secret.name)))?;
        Ok((record, changed))
    }

    pub(super) async fn set_next_rotation(
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

    pub(super) async fn record_secret_failure(
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
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(count)
    }

    pub(super) async fn unquarantine(
        &self,
        secret_id: &str,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE secrets SET quarantined_at = NULL, failed_attempts = 0 \
             WHERE id = ? AND (quarantined_at IS NOT NULL OR failed_attempts > 0)",
        )
        .bind(secret_id)
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() > 0 {
            append_audit_in(&mut tx, &[audit]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn plan_rotation(
        &self,
        rotation: &NewRotation,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM versions WHERE secret_id = ? AND stage = 'current'",
        )
        .bind(rotation.secret_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if current != rotation.from_version {
            return Err(StoreError::Conflict("the current version".into()));
        }
        let now = now_millis();
        let inserted = sqlx::query(
            "INSERT INTO rotations (id, secret_id, state, from_version, proposed, reason, \
             emergency, incident_id, created_at, updated_at) \
             VALUES (?, ?, 'planned', ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(rotation.id.as_str())
        .bind(rotation.secret_id.as_str())
        .bind(rotation.from_version)
        .bind(rotation.proposed.as_deref())
        .bind(rotation.reason.as_str())
        .bind(rotation.emergency)
        .bind(rotation.incident_id.as_deref())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict("an active rotation".into()));
            }
            other => other?,
        };
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn advance_rotation(
        &self,
        rotation: &RotationRecord,
        change: &StepChange,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let now = now_millis();
        let moved = sqlx::query(
            "UPDATE rotations SET state = ?, updated_at = ?, attempts = 0, last_error = ?, \
             next_attempt_at = NULL, draining_since = coalesce(?, draining_since), \
             to_version = coalesce(?, to_version) WHERE id = ? AND state = ?",
        )
        .bind(change.to.as_str())
        .bind(now)
        .bind(change.error.as_deref())
        .bind(change.draining_since)
        .bind(change.insert_pending.as_ref().map(|v| v.version))
        .bind(rotation.id.as_str())
        .bind(change.from.as_str())
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!("rotation {}", rotation.id)));
        }
        let secret_id = rotation.secret_id.as_str();
        if let Some(version) = &change.insert_pending {
            let latest: Option<i64> =
                sqlx::query_scalar("SELECT max(version) FROM versions WHERE secret_id = ?")
                    .bind(secret_id)
                    .fetch_one(&mut *tx)
                    .await?;
            if latest.unwrap_or(0) + 1 != version.version {
                return Err(StoreError::Conflict("the secret's versions".into()));
            }
            sqlx::query(
                "INSERT INTO versions (secret_id, version, stage, ciphertext, meta, fingerprint, \
                 created_at, stage_changed_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
            )
            .bind(secret_id)
            .bind(version.version)
            .bind(version.ciphertext.as_slice())
            .bind(serde_json::Value::Object(version.meta.clone()).to_string())
            .bind(version.fingerprint.as_slice())
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if change.promote {
            let to = rotation.to_version.ok_or_else(|| {
                StoreError::Corrupt("promoting a rotation with no new version".into())
            })?;
            for (sql, version) in [
                (
                    "UPDATE versions SET stage = 'revoked', stage_changed_at = ? \
                  WHERE secret_id = ? AND stage = 'previous' AND version != ?",
                    None,
                ),
                (
                    "UPDATE versions SET stage = 'previous', stage_changed_at = ? \
                  WHERE secret_id = ? AND stage = 'current' AND version != ?",
                    None,
                ),
                (
                    "UPDATE versions SET stage = 'current', stage_changed_at = ? \
                  WHERE secret_id = ? AND version = ?",
                    Some(to),
                ),
            ] {
                sqlx::query(sql)
                    .bind(now)
                    .bind(secret_id)
                    .bind(version.unwrap_or(to))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("UPDATE secrets SET updated_at = ?, last_rotated_at = ? WHERE id = ?")
                .bind(now)
                .bind(now)
                .bind(secret_id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(version) = change.revoke_version {
            sqlx::query(
                "UPDATE versions SET stage = 'revoked', stage_changed_at = ? \
                 WHERE secret_id = ? AND version = ? AND stage != 'revoked'",
            )
            .bind(now)
            .bind(secret_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        if change.succeeded {
            sqlx::query("UPDATE secrets SET failed_attempts = 0, last_error = NULL WHERE id = ?")
                .bind(secret_id)
                .execute(&mut *tx)
                .await?;
        }
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn retry_rotation_later(
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

    pub(super) async fn reset_rotation_attempts(
        &self,
        rotation_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotations SET attempts = 0, next_attempt_at = NULL WHERE id = ?")
            .bind(rotation_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub(super) async fn escalate_rotation(
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
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn rotation(&self, id: &str) -> Result<Option<RotationRecord>, StoreError> {
        let row = sqlx::query(ROTATION_SELECT_BY_ID)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    pub(super) async fn active_rotations(&self) -> Result<Vec<RotationRecord>, StoreError> {
        let rows = sqlx::query(ROTATION_SELECT_ACTIVE)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(rotation_from_row).collect()
    }

    pub(super) async fn latest_rotation(
        &self,
        secret_id: &str,
    ) -> Result<Option<RotationRecord>, StoreError> {
        let row = sqlx::query(ROTATION_SELECT_LATEST)
            .bind(secret_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    pub(super) async fn deliveries(
        &self,
        secret_id: &str,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT consumer, version, acked_at, attempts, last_error FROM deliveries \
             WHERE secret_id = ? ORDER BY consumer",
        )
        .bind(secret_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRecord {
                    consumer: r.try_get(0)?,
                    version: r.try_get(1)?,
                    acked_at: r.try_get(2)?,
                    attempts: r.try_get(3)?,
                    last_error: r.try_get(4)?,
                })
            })
            .collect()
    }

    pub(super) async fn record_delivery(
        &self,
        secret_id: &str,
        consumer: &str,
        version: i64,
        outcome: Result<(), &str>,
    ) -> Result<(), StoreError> {
        let now = now_millis();
        match outcome {
            Ok(()) => {
                sqlx::query(
                    "INSERT INTO deliveries (secret_id, consumer, version, acked_at, attempts) \
                     VALUES (?, ?, ?, ?, 0) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                     version = excluded.version, acked_at = excluded.acked_at, attempts = 0, \
                     last_error = NULL",
                )
                .bind(secret_id)
                .bind(consumer)
                .bind(version)
                .bind(now)
                .execute(&self.writer)
                .await?;
            }
            Err(error) => {
                sqlx::query(
                    "INSERT INTO deliveries (secret_id, consumer, version, attempts, last_error) \
                     VALUES (?, ?, ?, 1, ?) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                     attempts = CASE WHEN deliveries.version = excluded.version \
                                THEN deliveries.attempts + 1 ELSE 1 END, \
                     acked_at = CASE WHEN deliveries.version = excluded.version \
                                THEN deliveries.acked_at ELSE NULL END, \
                     version = excluded.version, last_error = excluded.last_error",
                )
                .bind(secret_id)
                .bind(consumer)
                .bind(version)
                .bind(error)
                .execute(&self.writer)
                .await?;
            }
        }
        Ok(())
    }

    pub(super) async fn apply_lease_batch(
        &self,
        ops: &[LeaseOp],
        audit: &[AuditEvent],
    ) -> Result<(), StoreError> {
        let mut conn = self.writer.acquire().await?;
        // Group commit: the WAL is written before COMMIT returns (a crash of this process loses
        // nothing), but the fsync is left to the next checkpoint or FULL commit.
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await?;
        let result = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
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
                let mut query = sqlx::query(multi_row_insert(MultiRowTable::Leases, n));
                for l in chunk {
                    query = query
                        .bind(l.id.as_str())
                        .bind(l.secret_id.as_str())
                        .bind(l.version)
                        .bind(l.issued.as_deref())
                        .bind(
                            l.issued_meta
                                .as_ref()
                                .map(|m| serde_json::Value::Object(m.clone()).to_string()),
                        )
                        .bind(l.uid)
                        .bind(l.gid)
                        .bind(l.pid)
                        .bind(l.exe.as_deref())
                        .bind(l.created_at)
                        .bind(l.expires_at)
                        .bind(l.upstream_state.as_deref());
                }
                query.execute(&mut *tx).await?;
            }
            for op in ops {
                match op {
                    LeaseOp::Insert(_) => {}
                    LeaseOp::Renew { id, expires_at } => {
                        sqlx::query("UPDATE leases SET expires_at = ? WHERE id = ? AND ended_at IS NULL")
                            .bind(expires_at)
                            .bind(id.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                    LeaseOp::End {
                        id,
                        at,
                        reason,
                        upstream_state,
                    } => {
                        sqlx::query(
                            "UPDATE leases SET ended_at = ?, end_reason = ?, \
                             upstream_state = coalesce(?, upstream_state) WHERE id = ? AND ended_at IS NULL",
                        )
                        .bind(at)
                        .bind(reason.as_str())
                        .bind(upstream_state.as_deref())
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    }
                    LeaseOp::PurgeEnded { before } => {
                        sqlx::query(
                            "DELETE FROM leases WHERE ended_at IS NOT NULL AND ended_at < ? \
                             AND (upstream_state IS NULL OR upstream_state = 'revoked')",
                        )
                        .bind(before)
                        .execute(&mut *tx)
                        .await?;
                    }
                    LeaseOp::AccessSeen {
                        secret_id,
                        uid,
                        exe,
                        at,
                    } => {
                        sqlx::query(
                            "INSERT OR IGNORE INTO access_seen (secret_id, uid, exe, first_seen) \
                             VALUES (?, ?, ?, ?)",
                        )
                        .bind(secret_id.as_str())
                        .bind(uid)
                        .bind(exe.as_str())
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                    }
                    LeaseOp::UpstreamRevoked { id } => {
                        sqlx::query("UPDATE leases SET upstream_state = 'revoked' WHERE id = ?")
                            .bind(id.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            append_audit_in(&mut tx, audit).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        }
        .await;
        let reset = sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await;
        result?;
        reset?;
        Ok(())
    }

    pub(super) async fn open_leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
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
                let meta: Option<String> = r.try_get(5)?;
                Ok(LeaseRow {
                    id: r.try_get(0)?,
                    secret_id: r.try_get(1)?,
                    secret_name: r.try_get(2)?,
                    version: r.try_get(3)?,
                    issued: r.try_get(4)?,
                    issued_meta: meta.and_then(|m| match serde_json::from_str(&m) {
                        Ok(serde_json::Value::Object(map)) => Some(map),
                        _ => None,
                    }),
                    uid: r.try_get(6)?,
                    gid: r.try_get(7)?,
                    pid: r.try_get(8)?,
                    exe: r.try_get(9)?,
                    created_at: r.try_get(10)?,
                    expires_at: r.try_get(11)?,
                    ended_at: r.try_get(12)?,
                    upstream_state: r.try_get(13)?,
                })
            })
            .collect()
    }

    pub(super) async fn create_incident(
        &self,
        incident: &IncidentRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO incidents (id, started_at, scope, assume_compromise, trigger) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(incident.id.as_str())
        .bind(incident.started_at)
        .bind(incident.scope.as_str())
        .bind(incident.assume_compromise)
        .bind(incident.trigger.as_str())
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn incidents(
        &self,
        id: Option<&str>,
        unfinished: bool,
    ) -> Result<Vec<IncidentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, started_at, finished_at, scope, assume_compromise, trigger, leases_revoked \
             FROM incidents WHERE (?1 IS NULL OR id = ?1) AND (NOT ?2 OR finished_at IS NULL) \
             ORDER BY started_at",
        )
        .bind(id)
        .bind(unfinished)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(IncidentRecord {
                    id: r.try_get(0)?,
                    started_at: r.try_get(1)?,
                    finished_at: r.try_get(2)?,
                    scope: r.try_get(3)?,
                    assume_compromise: r.try_get(4)?,
                    trigger: r.try_get(5)?,
                    leases_revoked: r.try_get(6)?,
                })
            })
            .collect()
    }

    pub(super) async fn add_incident_leases(
        &self,
        id: &str,
        revoked: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE incidents SET leases_revoked = leases_revoked + ? WHERE id = ?")
            .bind(revoked)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub(super) async fn finish_incident(
        &self,
        id: &str,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE incidents SET finished_at = ? WHERE id = ? AND finished_at IS NULL")
            .bind(now_millis())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn incident_rotations(
        &self,
        id: &str,
    ) -> Result<Vec<IncidentRotation>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, r.state, r.last_error FROM rotations r JOIN secrets s ON s.id = r.secret_id \
             WHERE r.incident_id = ? AND r.rowid = (SELECT r2.rowid FROM rotations r2 \
             WHERE r2.incident_id = r.incident_id AND r2.secret_id = r.secret_id \
             ORDER BY r2.created_at DESC, r2.rowid DESC LIMIT 1) ORDER BY s.name",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(IncidentRotation {
                    secret: r.try_get(0)?,
                    state: parse_state(&r.try_get::<String, _>(1)?)?,
                    last_error: r.try_get(2)?,
                })
            })
            .collect()
    }

    pub(super) async fn revoke_version(
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
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn insert_alert(
        &self,
        alert: &AlertRecord,
        audit: AuditEvent,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO alerts (at, kind, secret, message, incident_id) VALUES (?, ?, ?, ?, ?) \
             RETURNING id",
        )
        .bind(alert.at)
        .bind(alert.kind.as_str())
        .bind(alert.secret.as_deref())
        .bind(alert.message.as_str())
        .bind(alert.incident_id.as_deref())
        .fetch_one(&mut *tx)
        .await?;
        append_audit_in(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(id)
    }

    pub(super) async fn recent_alerts(&self, limit: i64) -> Result<Vec<AlertRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, kind, secret, message, incident_id FROM alerts ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertRecord {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    secret: r.try_get(3)?,
                    message: r.try_get(4)?,
                    incident_id: r.try_get(5)?,
                })
            })
            .collect()
    }

    pub(super) async fn access_seen(&self) -> Result<Vec<(String, u32, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT secret_id, uid, exe FROM access_seen")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    pub(super) async fn versions_by_fingerprint(
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

    pub(super) async fn rotation_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM rotations WHERE state IN ('done', 'failed', 'rolled-back') \
             GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    pub(super) async fn live_leases(
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

fn parse_state(text: &str) -> Result<RotationState, StoreError> {
    RotationState::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown rotation state {text:?}")))
}

fn rotation_from_row(row: &SqliteRow) -> Result<RotationRecord, StoreError> {
    Ok(RotationRecord {
        id: row.try_get(0)?,
        secret_id: row.try_get(1)?,
        secret_name: row.try_get(2)?,
        state: parse_state(&row.try_get::<String, _>(3)?)?,
        from_version: row.try_get(4)?,
        to_version: row.try_get(5)?,
        proposed: row.try_get(6)?,
        reason: row.try_get(7)?,
        emergency: row.try_get(8)?,
        incident_id: row.try_get(9)?,
        attempts: row.try_get(10)?,
        last_error: row.try_get(11)?,
        next_attempt_at: row.try_get(12)?,
        draining_since: row.try_get(13)?,
        created_at: row.try_get(14)?,
        updated_at: row.try_get(15)?,
    })
}

async fn active_rotation_in(
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

fn unreadable(path: &Path, e: sqlx::Error) -> StoreError {
    StoreError::Unreadable {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

async fn check_generation(tx: &mut SqliteConnection, generation: i64) -> Result<(), StoreError> {
    let current: i64 = sqlx::query_scalar("SELECT root_generation FROM vault WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    if current != generation {
        return Err(StoreError::StaleKeys);
    }
    Ok(())
}

/// Appends audit rows inside an open write transaction.
async fn append_audit_in(
    tx: &mut SqliteConnection,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let last: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    let (mut seq, mut prev) = last.unwrap_or((0, GENESIS_HASH.to_vec()));
    let at: Millis = now_millis();
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        seq += 1;
        let detail = event.detail.clone();
        let hash = chain_hash(
            &prev,
            seq,
            at,
            &event.actor,
            &event.action,
            event.secret.as_deref(),
            event.incident_id.as_deref(),
            &detail,
        )
        .to_vec();
        rows.push((
            seq,
            event,
            detail,
            std::mem::replace(&mut prev, hash.clone()),
            hash,
        ));
    }
    let mut rest = rows.as_slice();
    while !rest.is_empty() {
        let n = chunk_len(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut query = sqlx::query(multi_row_insert(MultiRowTable::Audit, n));
        for (seq, event, detail, prev_hash, hash) in chunk {
            query = query
                .bind(*seq)
                .bind(at)
                .bind(event.actor.as_str())
                .bind(event.action.as_str())
                .bind(event.secret.as_deref())
                .bind(event.incident_id.as_deref())
                .bind(detail.as_str())
                .bind(prev_hash.as_slice())
                .bind(hash.as_slice());
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Rows per multi-row INSERT: a few fixed sizes, so the prepared statements stay cached.
fn chunk_len(remaining: usize) -> usize {
    [64, 16, 4, 1]
        .into_iter()
        .find(|n| *n <= remaining)
        .unwrap_or(1)
}

/// The tables written with multi-row inserts.
#[derive(Clone, Copy)]
enum MultiRowTable {
    Leases,
    Audit,
}

/// `INSERT INTO … VALUES (?, …), (?, …)` for `rows` rows, built once per shape from constant
/// text and counts (never from data) and kept for the life of the process.
fn multi_row_insert(table: MultiRowTable, rows: usize) -> sqlx::AssertSqlSafe<&'static str> {
    static CACHE: std::sync::OnceLock<std::collections::HashMap<(u8, usize), &'static str>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        let mut map = std::collections::HashMap::new();
        for (tag, prefix, columns) in [
            (
                0u8,
                "INSERT INTO leases (id, secret_id, version, issued, issued_meta, uid, gid, pid, \
                 exe, created_at, expires_at, upstream_state)",
                12,
            ),
            (
                1u8,
                "INSERT INTO audit (seq, at, actor, action, secret, incident_id, detail, \
                 prev_hash, hash)",
                9,
            ),
        ] {
            let row = format!("({})", vec!["?"; columns].join(", "));
            for n in [1usize, 4, 16, 64] {
                let sql = format!("{prefix} VALUES {}", vec![row.as_str(); n].join(", "));
                map.insert((tag, n), &*Box::leak(sql.into_boxed_str()));
            }
        }
        map
    });
    let tag = match table {
        MultiRowTable::Leases => 0,
        MultiRowTable::Audit => 1,
    };
    sqlx::AssertSqlSafe(cache[&(tag, rows)])
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditRecord, StoreError> {
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

fn version_from_row(row: &SqliteRow, first: usize) -> Result<VersionRecord, StoreError> {
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

fn parse_tags(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|_| StoreError::Corrupt("a secret's tags are not a JSON list".into()))
}

/// Removes a half-created store and its SQLite side files.
fn remove_store_files(path: &Path) {
    let mut side = PathBuf::from(path);
    let _ = std::fs::remove_file(path);
    for suffix in ["-wal", "-shm"] {
        side.set_file_name(format!(
            "{}{suffix}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_file(&side);
    }
}
