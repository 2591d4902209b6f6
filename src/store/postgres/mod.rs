//! The PostgreSQL backend (docs/design.md §13): the store's operations on a database several
//! daemons share, of which exactly one leads ([`leader`]).
//!
//! Its schema is `migrations_postgres/`: the same tables as SQLite's, in PostgreSQL's types, with
//! values sealed exactly as in SQLite. Every write transaction first takes one transaction-level
//! advisory lock ([`PgStore::begin_write`]): writers take turns as they do on SQLite's
//! `BEGIN IMMEDIATE`, so a read-then-write transaction never acts on a stale read and the audit
//! chain gets one row after another. (A transaction-level lock ends with its transaction, so it
//! is safe behind a transaction-pooling PgBouncer, unlike a session lock.) Reads run
//! concurrently. One file per table group, as under `sqlite/`.

mod audit;
mod batch;
mod brokers;
mod deliveries;
mod header;
mod incidents;
pub mod leader;
mod leases;
mod rotations;
mod secrets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;

use super::cache::SealedCache;

use crate::audit::AuditEvent;
use crate::crypto::IntegrityKey;
use crate::store::{StoreError, VaultHeader};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations_postgres");

/// The advisory lock every write transaction holds (an arbitrary constant: "kw" and 1).
const WRITER_LOCK: i64 = 0x6b77_0001;

/// Begins a write transaction on `pool`: writers take turns on [`WRITER_LOCK`], and while
/// `fence` holds a term (this daemon leads) the transaction is refused unless it is still
/// the store's.
async fn begin_write(
    pool: &PgPool,
    fence: &AtomicI64,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
    let mut tx = match fence.load(Ordering::SeqCst) {
        0 => pool.begin().await?,
        term => leader::begin_fenced(pool, term).await?,
    };
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITER_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// How long making a connection may take before the operation fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a pool on the database at `url` (`postgres://…`) and applies the schema's newer
/// migrations. Each connection waits at most `connect_timeout` to be made.
pub async fn connect(url: &str, connect_timeout: Duration) -> Result<PgPool, StoreError> {
    let pool = pool(url, connect_timeout).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

async fn pool(url: &str, connect_timeout: Duration) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(connect_timeout)
        .connect_with(options.application_name("keywarden"))
        .await?)
}

fn newest_known_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The store on PostgreSQL. Its public methods are the same as [`super::SqliteStore`]'s.
pub struct PgStore {
    /// The database's address without its password, for messages.
    location: PathBuf,
    pool: PgPool,
    /// Set once the vault is unlocked: every transaction that appends audit rows also seals
    /// the chain's new head with it, and every change of a current version records its MAC.
    integrity: Arc<OnceLock<IntegrityKey>>,
    /// The term this daemon leads under (0: none): while set, every write transaction checks
    /// it first and is refused once another daemon took over ([`leader::begin_fenced`]).
    fence: Arc<AtomicI64>,
    /// In the daemon: the journal's group commit (see `batch.rs`).
    batcher: Option<tokio::sync::mpsc::Sender<batch::Pending>>,
    /// In the daemon: sealed current versions, kept while [`listen`] hears every change.
    cache: Option<Arc<Cache>>,
    /// Dropped with the store: stops the listener.
    _listener: Option<tokio::sync::watch::Sender<()>>,
}

/// The daemon's cache of sealed current versions on a store other daemons write too: it is
/// used only while its listener hears the store's announcements (`LISTEN`), which every write
/// that changes a current version makes in its transaction (`NOTIFY`, delivered at commit).
#[derive(Default)]
struct Cache {
    rows: SealedCache,
    listening: AtomicBool,
}

/// The channel writes announce changed current versions on: a secret's name, or `*` for all.
const VERSIONS_CHANNEL: &str = "keywarden_versions";

/// Announces, inside a write transaction, that the current version of `name` (`None`: of every
/// secret) changed: every daemon's cache forgets it once the transaction commits.
pub(super) async fn announce(
    conn: &mut PgConnection,
    name: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(VERSIONS_CHANNEL)
        .bind(name.unwrap_or("*"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Listens for announcements until `stop` is dropped; forgets what they name. While it is not
/// listening (at start, after a lost connection) the cache is empty and unused.
async fn listen(pool: PgPool, cache: Arc<Cache>, mut stop: tokio::sync::watch::Receiver<()>) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(VERSIONS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            l = listener => l,
            _ = stop.changed() => return,
        };
        match &mut listener {
            Ok(listener) => {
                cache.rows.invalidate(None);
                cache.listening.store(true, Ordering::SeqCst);
                loop {
                    let heard = tokio::select! {
                        heard = listener.try_recv() => heard,
                        _ = stop.changed() => return,
                    };
                    match heard {
                        Ok(Some(n)) if n.payload() == "*" => cache.rows.invalidate(None),
                        Ok(Some(n)) => cache.rows.invalidate(Some(n.payload())),
                        Ok(None) | Err(_) => break,
                    }
                }
                tracing::warn!(
                    "lost the store's announcements of new versions; reading every version from \
                     the database until they are heard again"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot listen for the store's announcements of new versions; reading every \
                 version from the database meanwhile"
            ),
        }
        cache.listening.store(false, Ordering::SeqCst);
        cache.rows.invalidate(None);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// `url` without a password (`postgres://user@host:port/db`), for messages and `status`.
pub(crate) fn location(url: &str) -> PathBuf {
    match url.parse::<PgConnectOptions>() {
        Ok(o) => PathBuf::from(format!(
            "postgres://{}@{}:{}/{}",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        )),
        Err(_) => PathBuf::from("postgres://(an address that does not parse)"),
    }
}

impl PgStore {
    /// Creates the store's tables in the (empty) database at `url` and writes `header`. Fails
    /// if the database already holds a vault.
    pub(crate) async fn create(
        url: &str,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Self, StoreError> {
        let store = PgStore {
            location: location(url),
            pool: connect(url, CONNECT_TIMEOUT).await?,
            integrity: Arc::default(),
            fence: Arc::default(),
            batcher: None,
            cache: None,
            _listener: None,
        };
        let mut tx = store.begin_write().await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM vault)")
            .fetch_one(&mut *tx)
            .await?;
        if exists {
            return Err(StoreError::AlreadyExists {
                path: store.location.clone(),
            });
        }
        store.init_header(&mut tx, header, audit).await?;
        tx.commit().await?;
        Ok(store)
    }

    /// Opens the store in the database at `url`; applies newer migrations when `migrate`;
    /// with `cached` (the daemon), keeps sealed current versions while it hears every change.
    pub(crate) async fn open(url: &str, migrate: bool, cached: bool) -> Result<Self, StoreError> {
        let pool = pool(url, CONNECT_TIMEOUT).await?;
        let (cache, listener) = if cached {
            let cache = Arc::new(Cache::default());
            let (stop, stopped) = tokio::sync::watch::channel(());
            tokio::spawn(listen(pool.clone(), cache.clone(), stopped));
            (Some(cache), Some(stop))
        } else {
            (None, None)
        };
        let integrity: Arc<OnceLock<IntegrityKey>> = Arc::default();
        let fence: Arc<AtomicI64> = Arc::default();
        let batcher = cached.then(|| {
            batch::start(batch::Writer {
                pool: pool.clone(),
                fence: fence.clone(),
                integrity: integrity.clone(),
            })
        });
        let store = PgStore {
            location: location(url),
            pool,
            integrity,
            fence,
            batcher,
            cache,
            _listener: listener,
        };
        let has_migrations: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&store.pool)
                .await?;
        if !has_migrations {
            return Err(StoreError::NotInitialized {
                path: store.location.clone(),
            });
        }
        let found: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&store.pool)
                .await?;
        let supported = newest_known_migration();
        if let Some(found) = found.filter(|f| *f > supported) {
            return Err(StoreError::SchemaTooNew {
                path: store.location.clone(),
                found,
                supported,
            });
        }
        if found.unwrap_or(0) < supported {
            if !migrate {
                return Err(StoreError::SchemaTooOld {
                    path: store.location.clone(),
                });
            }
            MIGRATOR.run(&store.pool).await?;
        }
        Ok(store)
    }

    /// From now on, seal the audit chain's head in every transaction that appends rows, and
    /// MAC every new current version.
    pub fn set_integrity_key(&self, key: IntegrityKey) {
        let _ = self.integrity.set(key);
    }

    pub(super) fn integrity(&self) -> Option<&IntegrityKey> {
        self.integrity.get()
    }

    /// Where the store is (its database's address, without a password).
    pub fn path(&self) -> &std::path::Path {
        &self.location
    }

    /// From now on, every write checks that this daemon still leads under `term` (`None`: it
    /// does not lead; writes are no longer checked).
    pub fn fence_writes(&self, term: Option<i64>) {
        self.fence.store(term.unwrap_or(0), Ordering::SeqCst);
    }

    /// A candidate for the store's leadership on this store's connections.
    pub fn candidate(&self, timing: leader::Timing) -> leader::Candidate {
        leader::Candidate::new(self.pool.clone(), timing)
    }

    /// Who leads the store, and the daemons heard from within `within`.
    pub async fn leadership(
        &self,
        within: Duration,
    ) -> Result<(Option<leader::Leadership>, Vec<leader::Member>), StoreError> {
        Ok((
            leader::leadership(&self.pool).await?,
            leader::members(&self.pool, within).await?,
        ))
    }

    /// Begins a write transaction: writers take turns (see the module's documentation), and a
    /// leader's writes are fenced by its term.
    pub(super) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        begin_write(&self.pool, &self.fence).await
    }

    /// Runs `job` in a write transaction: the daemon's group commit's (`batch.rs`), shared with
    /// other jobs, or, without one (the CLI), a transaction of its own.
    async fn write(&self, job: batch::Job) -> Result<(), StoreError> {
        match &self.batcher {
            Some(batcher) => batch::submit(batcher, job).await,
            None => {
                let mut tx = self.begin_write().await?;
                let mut chain = audit::Chain::default();
                job(&mut tx, &mut chain, self.integrity()).await?;
                chain.finish(&mut tx, self.integrity()).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// The daemon that leads the store, if its lease still runs (on the database's clock).
    pub async fn live_leader(&self) -> Result<Option<leader::Leadership>, StoreError> {
        Ok(leader::leadership(&self.pool)
            .await?
            .filter(|l| l.valid_for_ms > 0))
    }

    /// The cache, while it may be used (its listener hears every change).
    fn cache(&self) -> Option<&SealedCache> {
        self.cache
            .as_deref()
            .filter(|c| c.listening.load(Ordering::SeqCst))
            .map(|c| &c.rows)
    }

    /// The names whose current version may have changed, as writes commit, this daemon's and
    /// (as their announcements are heard) other daemons'; after a lost connection to the
    /// announcements, `None` (any) once it is back. `None` outside the daemon.
    pub fn watch_versions(&self) -> Option<broadcast::Receiver<Option<Arc<str>>>> {
        self.cache.as_ref().map(|c| c.rows.watch())
    }

    /// Forgets cached rows after this daemon's own write (the announcement follows).
    fn invalidate(&self, name: Option<&str>) {
        if let Some(cache) = &self.cache {
            cache.rows.invalidate(name);
        }
    }

    /// Every write is committed when its call returns: nothing is queued.
    pub async fn flush_writes(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.pool.close().await;
        Ok(())
    }
}

/// Whether `e` is a unique-constraint violation.
pub(super) use super::is_unique_violation;

/// [`StoreError::StaleKeys`] unless the root key's generation is still `generation`.
pub(super) async fn check_generation(
    tx: &mut PgConnection,
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

#[cfg(test)]
pub(crate) mod tests;
