//! The SQLite backend: one file in WAL mode with full sync, `secure_delete` on, mode 0600.
//!
//! Writes go through a single-connection pool and `BEGIN IMMEDIATE`, so in-process writers queue
//! fairly and a read-then-write transaction never fails on a stale snapshot; other processes
//! wait on SQLite's busy timeout. Reads use a separate pool and run concurrently.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

use super::{
    Millis, NewVersion, RewrappedKey, SealedSecret, SecretRecord, SecretSummary, Stage, StoreError,
    VaultHeader, VersionRecord, VersionTarget, now_millis,
};
use crate::audit::{AuditEvent, AuditRecord, GENESIS_HASH, chain_hash};
use crate::crypto::KdfParams;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const READERS: u32 = 8;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

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
            let store = Self::connect(path).await?;
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

    pub(super) async fn open(path: &Path, migrate: bool) -> Result<Self, StoreError> {
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
        let store = Self::connect(path).await?;
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

    async fn connect(path: &Path) -> Result<Self, StoreError> {
        let options = connect_options(path);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
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
        Ok(Self { writer, reader })
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

    pub(super) async fn list(&self) -> Result<Vec<SecretSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, s.provider, \
             (SELECT version FROM versions v WHERE v.secret_id = s.id AND v.stage = 'current'), \
             s.updated_at, s.tags FROM secrets s ORDER BY s.name",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SecretSummary {
                    name: row.try_get(0)?,
                    provider: row.try_get(1)?,
                    version: row.try_get(2)?,
                    updated_at: row.try_get(3)?,
                    tags: parse_tags(&row.try_get::<String, _>(4)?)?,
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
    let last: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    let (mut seq, mut prev) = last.unwrap_or((0, GENESIS_HASH.to_vec()));
    let at: Millis = now_millis();
    for event in events {
        seq += 1;
        let detail = event.detail.to_string();
        let hash = chain_hash(
            &prev,
            seq,
            at,
            &event.actor,
            &event.action,
            event.secret.as_deref(),
            event.incident_id.as_deref(),
            &detail,
        );
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, secret, incident_id, detail, prev_hash, \
             hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(seq)
        .bind(at)
        .bind(event.actor.as_str())
        .bind(event.action.as_str())
        .bind(event.secret.as_deref())
        .bind(event.incident_id.as_deref())
        .bind(detail)
        .bind(prev.as_slice())
        .bind(hash.as_slice())
        .execute(&mut *tx)
        .await?;
        prev = hash.to_vec();
    }
    Ok(())
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
