//! The SQLite backend: one file in WAL mode with full sync, `secure_delete` on, mode 0600.
//!
//! Every write transaction begins with `BEGIN IMMEDIATE`, so a read-then-write transaction
//! never fails on a stale snapshot. Group commits run on a write connection of their own in the
//! calling thread (`direct.rs`); other writes go through a single-connection sqlx pool, so they
//! queue fairly; the two, and other processes, wait for each other on SQLite's busy timeout.
//! Reads use a separate pool and run concurrently; point reads have a connection of their own.

mod audit;
mod batch;
mod brokers;
mod deliveries;
mod direct;
mod header;
mod incidents;
mod leases;
mod rotations;
mod secrets;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::broadcast;

use super::cache::SealedCache;
use crate::audit::AuditEvent;
use crate::crypto::IntegrityKey;
use crate::store::{StoreError, VaultHeader};

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const READERS: u32 = 8;
/// Each reader's page cache, in KiB (negative: SQLite's unit for a size in KiB).
const READER_CACHE_KIB: &str = "-512";
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLite backend. [`super::Store`] dereferences to it, so its public methods are the
/// store's operations; a second backend (PostgreSQL) would offer the same methods.
pub struct SqliteStore {
    path: PathBuf,
    writer: SqlitePool,
    reader: SqlitePool,
    /// Point reads, in the calling thread (see `direct.rs`).
    direct_reader: direct::Reader,
    /// Group commits, in the calling thread (see `direct.rs`).
    direct_writer: std::sync::Arc<direct::Writer>,
    /// Present when this process is the store's only writer (the daemon).
    cache: Option<SealedCache>,
    /// Dropped with the store: stops the background checkpointer.
    _checkpointer: Option<tokio::sync::watch::Sender<()>>,
    /// In the daemon: the journal's group commit (see `batch.rs`).
    batcher: Option<tokio::sync::mpsc::Sender<batch::Pending>>,
    /// Set once the vault is unlocked: every transaction that appends audit rows also seals
    /// the chain's new head with it, and every change of a current version records its MAC.
    integrity: batch::Sealer,
}

/// How often the daemon's background checkpointer moves the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Write-ahead log frames (pages) past which the checkpointer resets the log to zero bytes
/// instead of only copying it back: 4,096 pages, 16 MiB. Under continuous writes and reads a
/// passive checkpoint never finds a moment to restart the log, which then grows without bound.
const TRUNCATE_AT_FRAMES: i64 = 4096;
/// How long the checkpointer's TRUNCATE waits for readers before it gives up until next time.
const CHECKPOINT_BUSY_WAIT: Duration = Duration::from_millis(100);
/// The size SQLite trims the write-ahead log to whenever it restarts it (bytes).
const WAL_SIZE_LIMIT: &str = "16777216";

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        .pragma("secure_delete", "ON")
        .pragma("journal_size_limit", WAL_SIZE_LIMIT)
}

pub(super) fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn newest_known_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// From now on, seal the audit chain's head in every transaction that appends rows, and
    /// MAC every new current version.
    pub fn set_integrity_key(&self, key: IntegrityKey) {
        let _ = self.integrity.set(key);
    }

    pub(super) fn integrity(&self) -> Option<&IntegrityKey> {
        self.integrity.get()
    }

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
            store.cache = Some(SealedCache::default());
            store.batcher = Some(batch::start(
                store.direct_writer.clone(),
                store.integrity.clone(),
            ));
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
        // The daemon reads current versions from its own cache: small page caches here keep
        // eight readers from holding 2 MiB each.
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .test_before_acquire(false)
            .connect_with(options.pragma("cache_size", READER_CACHE_KIB))
            .await
            .map_err(|e| unreadable(path, e))?;
        let direct_reader = direct::Reader::open(path, BUSY_TIMEOUT)?;
        let direct_writer = std::sync::Arc::new(direct::Writer::open(
            path,
            BUSY_TIMEOUT,
            WAL_SIZE_LIMIT,
            background_checkpoints,
        )?);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            reader,
            direct_reader,
            direct_writer,
            cache: None,
            _checkpointer: None,
            batcher: None,
            integrity: batch::Sealer::default(),
        })
    }

    /// Starts the daemon's checkpointer on its own connection, so writers never run one: the
    /// write-ahead log left by an earlier run is folded in and reset first; then a PASSIVE
    /// checkpoint every half second, and a TRUNCATE one (writers wait for it, briefly)
    /// whenever the log has grown past [`TRUNCATE_AT_FRAMES`]. It stops when the store is
    /// dropped.
    async fn start_checkpointer(path: &Path) -> Result<tokio::sync::watch::Sender<()>, StoreError> {
        // A TRUNCATE checkpoint holds writers back while it waits for readers to let go: it
        // waits briefly and, when they do not, it is tried again at the next tick.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(connect_options(path).busy_timeout(CHECKPOINT_BUSY_WAIT))
            .await
            .map_err(|e| unreadable(path, e))?;
        checkpoint(&pool, Checkpoint::Truncate).await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                    _ = stopped.changed() => break,
                }
                let result = match checkpoint(&pool, Checkpoint::Passive).await {
                    Ok(frames) if frames > TRUNCATE_AT_FRAMES => {
                        checkpoint(&pool, Checkpoint::Truncate).await
                    }
                    other => other,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "background checkpoint failed");
                }
            }
            let _ = checkpoint(&pool, Checkpoint::Truncate).await;
            pool.close().await;
        });
        Ok(stop)
    }

    /// Folds the write-ahead log into the database and truncates it to zero bytes, waiting for
    /// readers and writers in this process to let it (the daemon does this when it stops).
    pub async fn truncate_wal(&self) -> Result<(), StoreError> {
        checkpoint(&self.writer, Checkpoint::Truncate).await?;
        Ok(())
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Folds the write-ahead log into the database and closes every connection: the file is
    /// then whole on its own (a restore moves it).
    pub async fn close(&self) -> Result<(), StoreError> {
        self.truncate_wal().await?;
        self.writer.close().await;
        self.reader.close().await;
        self.direct_writer.close()?;
        self.direct_reader.close()
    }

    /// Writes a consistent copy of the store to `dest`, which must not exist: created here
    /// with mode 0600, then filled by SQLite's `VACUUM INTO` from one read snapshot (writers
    /// do not wait for it) and synced. What is sealed in the store stays sealed in the copy.
    pub async fn copy_into(&self, dest: &Path) -> Result<(), StoreError> {
        let io = |what, source| StoreError::Io {
            what,
            path: dest.to_path_buf(),
            source,
        };
        let path = dest.to_str().ok_or_else(|| {
            io(
                "cannot name the copy",
                std::io::Error::other("the path is not UTF-8"),
            )
        })?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| io("cannot create", e))?;
        // VACUUM INTO writes into an empty file as it finds it (mode included).
        let copied = sqlx::query("VACUUM INTO ?")
            .bind(path)
            .execute(&self.reader)
            .await;
        let synced = copied.map_err(StoreError::from).and_then(|_| {
            std::fs::File::open(dest)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot sync", e))
        });
        if synced.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        synced
    }

    /// The path the store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names whose current version may have changed, as writes commit; `None` unless
    /// this process is the store's only writer (the daemon), which sees every write.
    pub fn watch_versions(&self) -> Option<broadcast::Receiver<Option<Arc<str>>>> {
        self.cache.as_ref().map(SealedCache::watch)
    }

    /// Forgets cached rows after a write: of `name`, or all of them.
    fn invalidate(&self, name: Option<&str>) {
        if let Some(cache) = &self.cache {
            cache.invalidate(name);
        }
    }
}

/// SQLite's checkpoint modes used here.
#[derive(Debug, Clone, Copy)]
enum Checkpoint {
    /// Copy what it can without waiting for anyone.
    Passive,
    /// Wait for readers and writers, copy everything, and truncate the log to zero bytes.
    Truncate,
}

/// Runs a checkpoint; returns the frames in the write-ahead log as it found it.
async fn checkpoint(pool: &SqlitePool, mode: Checkpoint) -> Result<i64, StoreError> {
    let sql = match mode {
        Checkpoint::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
        Checkpoint::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
    };
    let (_busy, frames, _copied): (i64, i64, i64) = sqlx::query_as(sql).fetch_one(pool).await?;
    Ok(frames)
}

pub(super) fn unreadable(path: &Path, e: sqlx::Error) -> StoreError {
    StoreError::Unreadable {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

pub(super) use super::is_unique_violation;

pub(super) async fn check_generation(
    tx: &mut SqliteConnection,
    generation: i64,
) -> Result<(), StoreError> {
    let current: i64 = sqlx::query_scalar("SELECT root_generation FROM vault WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    if current != generation {
        return Err(StoreError::StaleKeys);
    }
    Ok(())
}

/// Rows per multi-row INSERT: a few fixed sizes, so the prepared statements stay cached.
pub(super) fn chunk_len(remaining: usize) -> usize {
    [64, 16, 4, 1]
        .into_iter()
        .find(|n| *n <= remaining)
        .unwrap_or(1)
}

/// The tables written with multi-row inserts.
#[derive(Clone, Copy)]
pub(super) enum MultiRowTable {
    Leases,
    Audit,
}

/// `INSERT INTO … VALUES (?, …), (?, …)` for `rows` rows, built once per shape from constant
/// text and counts (never from data) and kept for the life of the process.
pub(super) fn multi_row_insert(
    table: MultiRowTable,
    rows: usize,
) -> sqlx::AssertSqlSafe<&'static str> {
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

/// Removes a half-created store and its SQLite side files.
pub(super) fn remove_store_files(path: &Path) {
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
