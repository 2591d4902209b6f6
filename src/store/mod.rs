//! Persistence: the rows keywarden keeps, and the atomic operations on them.
//!
//! Callers see [`Store`] and the record types of [`records`], never SQL. Each method that changes
//! state is one transaction and appends its audit rows inside that same transaction, so a change
//! and its audit row are durable together or not at all.
//!
//! Two backends offer the same operations: [`SqliteStore`] (a file; one file per table group
//! under `sqlite/`) and [`PgStore`] (a PostgreSQL database; the same under `postgres/`).
//! [`Store`] owns the lock and forwards each operation to the backend it was opened on
//! (`backend.rs`), so no caller knows which one it is.
//!
//! Nothing here encrypts or decrypts: values arrive sealed and leave sealed.

/// Defines an enum that is stored as text: each variant with its one spelling, `as_str`,
/// `Display` and `Serialize` as that spelling, and `parse`, which turns any other text into
/// [`StoreError::Corrupt`] (a damaged row is an error, never a default).
macro_rules! stored_enum {
    ($(#[$meta:meta])* pub enum $name:ident ($what:literal) {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// The stored spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// Parses the stored spelling.
            pub fn parse(text: &str) -> Result<Self, $crate::store::StoreError> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::store::StoreError::Corrupt(format!(
                        concat!("unknown ", $what, " {:?}"),
                        other
                    ))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

mod backend;
mod cache;
pub mod journal;
mod lock;
pub mod postgres;
pub mod records;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lock::{LockError, StoreLock};

use crate::audit::AuditEvent;

pub use journal::{Reason, RotationState};
pub use postgres::PgStore;
pub use records::*;
pub use sqlite::SqliteStore;

use backend::Backend;

/// Why `path` cannot be reached: the deepest directory on the way that this user can see,
/// with its owner and mode.
fn permission_denied(path: &Path) -> StoreError {
    use std::os::unix::fs::MetadataExt;
    let blocking = path
        .ancestors()
        .skip(1)
        .find_map(|dir| std::fs::metadata(dir).ok().map(|m| (dir.to_path_buf(), m)));
    let (blocking, owner, mode) = match blocking {
        Some((dir, meta)) => (dir, user_name(meta.uid()), meta.mode() & 0o7777),
        None => (PathBuf::from("/"), "an unknown user".into(), 0),
    };
    StoreError::PermissionDenied {
        path: path.to_path_buf(),
        blocking,
        owner,
        mode,
    }
}

/// Whether `e` is a unique-constraint violation (either backend).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// A secret's stored tags (a JSON list); anything else is corruption.
fn parse_tags(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|_| StoreError::Corrupt("a secret's tags are not a JSON list".into()))
}

/// This host's name (for `status` and the leadership row).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The name /etc/passwd gives `uid`, else `uid N`.
fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map_or(format!("uid {uid}"), |f| format!("{} (uid {uid})", f[0]))
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No store file where one was expected.
    #[error("no store at {path} ({hint})")]
    NotFound {
        /// Where we looked.
        path: PathBuf,
        /// How to create one.
        hint: &'static str,
    },
    /// A directory on the way to the store cannot be entered by this user.
    #[error(
        "cannot reach the store at {path}: permission denied ({blocking} belongs to {owner}, \
         mode {mode:o}); run keywarden as that user, or point --store or [store] path elsewhere"
    )]
    PermissionDenied {
        /// The store.
        path: PathBuf,
        /// The deepest directory on the way that this user can see but not enter or read.
        blocking: PathBuf,
        /// Its owner: a user name where /etc/passwd has one, else `uid N`.
        owner: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The store file exists but cannot be opened.
    #[error("cannot open the store at {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// `init` found a store already there.
    #[error("a store already exists at {path}; refusing to overwrite it")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// The store was written by a newer keywarden.
    #[error(
        "the store at {path} has schema version {found}, newer than this keywarden supports \
         ({supported}); upgrade keywarden to open it"
    )]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// The store's schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// The file is an SQLite database but holds no vault.
    #[error("the store at {path} holds no vault (was `keywarden init` interrupted?)")]
    NotInitialized {
        /// The file.
        path: PathBuf,
    },
    /// A daemon holds the store (for a CLI writer), or another daemon does (for a daemon).
    #[error(
        "the store at {path} is in use by a running keywarden daemon (lock {lock}); \
         stop it, or run the command against the daemon"
    )]
    Locked {
        /// The store.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Commands hold the store (shared) and did not finish within the daemon's wait.
    #[error(
        "the store at {path} is still in use by {holders} after waiting {waited:?}; wait for it \
         to finish or stop it, then start the daemon"
    )]
    InUseByCommands {
        /// The store.
        path: PathBuf,
        /// Who holds it.
        holders: String,
        /// How long the daemon waited.
        waited: std::time::Duration,
    },
    /// The store's schema is older than this build and the store was opened read-only.
    #[error(
        "the store at {path} has an older schema than this keywarden; run a command that writes \
         (or start the daemon) to upgrade it"
    )]
    SchemaTooOld {
        /// The store.
        path: PathBuf,
    },
    /// A rotation of the secret is in progress; a manual write would race it.
    #[error("a rotation of {0:?} is in progress; wait for it to finish")]
    RotationInProgress(String),
    /// Another writer changed what this operation was based on; retry it.
    #[error("{0} changed concurrently; try again")]
    Conflict(String),
    /// A step asked the journal for a move the state machine does not have (a bug, refused
    /// before anything is written).
    #[error("rotation {rotation}: {from} -> {to} is not a legal move of the rotation journal")]
    IllegalMove {
        /// The rotation.
        rotation: String,
        /// Its state.
        from: RotationState,
        /// The state asked for.
        to: RotationState,
    },
    /// A leader-only write by a daemon whose leadership has ended: another daemon leads the
    /// store now (PostgreSQL; see `postgres/leader.rs`). Nothing was written.
    #[error(
        "this daemon no longer leads the store (its term {mine} ended; term {current} leads): \
         the write was refused"
    )]
    Fenced {
        /// The term the write was made under.
        mine: i64,
        /// The term that leads now.
        current: i64,
    },
    /// The root key was replaced (by `rekey` in another process) since this process unlocked.
    #[error("the store was rekeyed by another process; unlock it again")]
    StaleKeys,
    /// A row holds something this build cannot read (the message names the row).
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("store database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database failed, in a statement run in the calling thread (`sqlite/direct.rs`).
    #[error("store database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The shared transaction a write was batched in could not be committed: nothing of it was
    /// written.
    #[error("store database error: the write could not be committed: {0}")]
    Commit(String),
    /// Applying the schema failed.
    #[error("cannot apply the store schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the store could not take the operation for now (busy, full, unreachable), as
    /// opposed to refusing it: answers say "unavailable" (503) rather than "internal error".
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode::{DiskFull, SystemIoFailure};
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                self.is_busy() || matches!(e.code, DiskFull | SystemIoFailure)
            }
            StoreError::Database(e) => {
                self.is_busy()
                    || matches!(
                        e,
                        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
                    )
                    || e.as_database_error().is_some_and(|d| {
                        // SQLite: full, I/O error. PostgreSQL: connection exceptions (08…),
                        // shut down by an administrator or the server (57P0…), too many
                        // connections (53300), the database not accepting connections (55000).
                        let code = d.code().unwrap_or_default();
                        matches!(code.as_ref(), "13" | "10" | "53300" | "55000")
                            || code.starts_with("08")
                            || code.starts_with("57P0")
                    })
            }
            StoreError::Commit(_) => true,
            _ => false,
        }
    }

    /// Whether SQLite gave up waiting for another connection's lock (its busy timeout has
    /// already been waited out: trying again at once only waits as long again).
    pub fn is_busy(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.code, DatabaseBusy | DatabaseLocked)
            }
            StoreError::Database(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("5" | "6" | "517" | "262"))
            }
            _ => false,
        }
    }

    /// Names the row a [`StoreError::Corrupt`] came from (other errors pass unchanged).
    pub(crate) fn in_row(self, row: impl std::fmt::Display) -> StoreError {
        match self {
            StoreError::Corrupt(what) => StoreError::Corrupt(format!("{row}: {what}")),
            other => other,
        }
    }
}

/// How a process uses the store; see [`lock`] for the locking rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only (`list`, `audit`): no lock, no migrations.
    ReadOnly,
    /// A CLI command that writes: shared lock, fails while a daemon runs.
    Shared,
    /// The daemon: exclusive lock for the process's life; reads of current versions cached.
    Exclusive,
}

struct Inner {
    backend: Backend,
    _lock: Option<StoreLock>,
}

/// The store. Cheap to clone; clones share connections, lock and cache. Its operations are the
/// backend's public methods, forwarded (`backend.rs`).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path()).finish()
    }
}

fn take_lock(path: &Path, access: Access) -> Result<Option<StoreLock>, StoreError> {
    if access == Access::ReadOnly {
        return Ok(None);
    }
    match StoreLock::acquire(path, access == Access::Exclusive) {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Busy(lock)) => Err(StoreError::Locked {
            path: path.to_path_buf(),
            lock,
        }),
        Err(LockError::Io(lock, source)) => Err(StoreError::Io {
            what: "cannot open the store lock",
            path: lock,
            source,
        }),
    }
}

/// Where a store is. `Debug` shows what `Display` shows: never a database password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL database (`postgres://…`), which several daemons may share.
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

impl std::fmt::Display for Location {
    /// The file, or the database's address without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => write!(f, "{}", postgres::location(url).display()),
        }
    }
}

/// The store's lock held exclusively, with no store open: nothing else (daemon or command)
/// may use the store at `path` while it is held (see [`Store::hold`]).
#[derive(Debug)]
pub struct Hold {
    _lock: StoreLock,
}

impl Store {
    /// Takes the lock of the store at `path` (which need not exist yet) exclusively, as a
    /// daemon would, without opening it: for a command that replaces the store's file.
    pub fn hold(path: &Path) -> Result<Hold, StoreError> {
        Ok(Hold {
            _lock: take_lock(path, Access::Exclusive)?.expect("an exclusive lock"),
        })
    }

    /// Creates a new store file holding `header` (mode 0600; a missing directory is created
    /// 0700). Fails if a file is already there; leaves nothing behind if it fails.
    pub async fn create(
        path: &Path,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Store, StoreError> {
        let backend = SqliteStore::create(path, header, audit).await?;
        let lock = take_lock(path, Access::Shared)?;
        Ok(Store::assemble(backend, lock))
    }

    /// Opens an existing store. Unless read-only, takes the store lock and applies newer schema
    /// migrations if needed. With [`Access::Exclusive`] reads of current versions are cached.
    pub async fn open(path: &Path, access: Access) -> Result<Store, StoreError> {
        // Look for the file before creating its lock file beside it.
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(permission_denied(path));
            }
            Err(_) => {
                return Err(StoreError::NotFound {
                    path: path.to_path_buf(),
                    hint: "run `keywarden init` to create one, or point --store or [store] path \
                           at an existing store",
                });
            }
            Ok(_) => {}
        }
        let lock = take_lock(path, access)?;
        let backend = SqliteStore::open(
            path,
            access != Access::ReadOnly,
            access == Access::Exclusive,
        )
        .await?;
        Ok(Store::assemble(backend, lock))
    }

    /// Creates a new store at `location` (see [`Store::create`], [`Store::create_postgres`]).
    pub async fn create_at(
        location: &Location,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Store, StoreError> {
        match location {
            Location::File(path) => Store::create(path, header, audit).await,
            Location::Postgres(url) => Store::create_postgres(url, header, audit).await,
        }
    }

    /// Opens the store at `location` (see [`Store::open`], [`Store::open_postgres`]).
    pub async fn open_at(location: &Location, access: Access) -> Result<Store, StoreError> {
        match location {
            Location::File(path) => Store::open(path, access).await,
            Location::Postgres(url) => Store::open_postgres(url, access).await,
        }
    }

    /// Opens the store for the daemon: exclusively. A command that holds it shared (a
    /// daemon-less `rotate`, a `put`) is waited for, up to `wait`; another daemon is not.
    pub async fn open_for_daemon(
        path: &Path,
        wait: std::time::Duration,
    ) -> Result<Store, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut told = false;
        loop {
            match Store::open(path, Access::Exclusive).await {
                Err(StoreError::Locked { path: p, lock: l }) => {
                    let holders = lock::holders(path);
                    // No holder seen: the lock was let go meanwhile, or the kernel's table,
                    // read in pieces while other processes lock and unlock, missed its line.
                    // Either way, look again (until the deadline) rather than guess.
                    let unseen = holders.is_empty();
                    if holders.iter().any(|h| h.exclusive)
                        || (unseen && tokio::time::Instant::now() >= deadline)
                    {
                        return Err(StoreError::Locked { path: p, lock: l });
                    }
                    if unseen {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                    let named = holders
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StoreError::InUseByCommands {
                            path: p,
                            holders: named,
                            waited: wait,
                        });
                    }
                    if !told {
                        tracing::warn!(store = %path.display(), holders = %named, "the store is in use by a command; waiting for it to finish");
                        told = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Creates the store's tables in the empty PostgreSQL database at `url` (`postgres://…`)
    /// and writes `header`. Fails if the database already holds a vault.
    pub async fn create_postgres(
        url: &str,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Store, StoreError> {
        let backend = PgStore::create(url, header, audit).await?;
        Ok(Store::assemble_with(Backend::Postgres(backend), None))
    }

    /// Opens the store in the PostgreSQL database at `url`. Unless read-only, applies newer
    /// schema migrations. No file lock: the leader's lease takes its place
    /// (`postgres/leader.rs`). A command that writes ([`Access::Shared`]) is refused with
    /// [`StoreError::Locked`] while a daemon leads the store, as it is while a daemon holds a
    /// SQLite store's lock: it goes through that daemon instead.
    pub async fn open_postgres(url: &str, access: Access) -> Result<Store, StoreError> {
        let backend =
            PgStore::open(url, access != Access::ReadOnly, access == Access::Exclusive).await?;
        if access == Access::Shared {
            if let Some(leader) = backend.live_leader().await? {
                return Err(StoreError::Locked {
                    path: backend.path().to_path_buf(),
                    lock: PathBuf::from(format!(
                        "the leadership of {}, pid {}, term {}",
                        leader.host, leader.pid, leader.term
                    )),
                });
            }
        }
        Ok(Store::assemble_with(Backend::Postgres(backend), None))
    }

    /// The SQLite backend, where the store is one (`backup` copies its file, the daemon
    /// truncates its write-ahead log on a stop); `None` on PostgreSQL.
    pub fn sqlite(&self) -> Option<&SqliteStore> {
        match &self.inner.backend {
            Backend::Sqlite(b) => Some(b.as_ref()),
            Backend::Postgres(_) => None,
        }
    }

    /// The pid of the daemon holding this SQLite store's lock: the store's one leader (`None`
    /// on PostgreSQL, whose leadership is a lease row, or when no daemon runs).
    pub fn lock_holder(&self) -> Option<u32> {
        let file = self.sqlite()?;
        lock::holders(file.path())
            .into_iter()
            .find(|h| h.exclusive)
            .map(|h| h.pid)
    }

    /// The PostgreSQL backend, where the store is one (the daemon campaigns for its
    /// leadership); `None` on SQLite.
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.inner.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b),
        }
    }

    fn assemble(backend: SqliteStore, lock: Option<StoreLock>) -> Store {
        Store::assemble_with(Backend::Sqlite(Box::new(backend)), lock)
    }

    fn assemble_with(backend: Backend, lock: Option<StoreLock>) -> Store {
        Store {
            inner: Arc::new(Inner {
                backend,
                _lock: lock,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
