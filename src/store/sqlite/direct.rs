//! Statements run in the calling thread instead of on sqlx's thread for the connection.
//!
//! sqlx runs each SQLite connection on a thread of its own, and every statement is a round trip
//! to it: two thread switches, which on a small machine cost more than the statement itself.
//! Three paths here avoid them:
//! - group commits (the journal's and the leases'): a batch runs hundreds of statements, all
//!   in the calling thread on a write connection of their own ([`Writer`]), whose prepared
//!   statements stay cached from batch to batch;
//! - other write transactions begun on sqlx's writer connection run their shared statements
//!   (an audit append) on that connection's own handle, locked once ([`on_handle`]);
//! - point reads the rotation engine makes several of per step (a secret, a version, a
//!   rotation, a secret's deliveries, its quarantine flag) run on a read connection of their
//!   own ([`Reader`]), in the calling thread: an indexed lookup in SQLite's page cache takes
//!   microseconds, less than the hand-off.
//!
//! Listings (but the active rotations read once at start-up), other reads and other writes stay
//! on sqlx. The write connection and sqlx's writer take SQLite's write lock in turn, as two
//! processes would (`busy_timeout`).

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{OpenFlags, Transaction, TransactionBehavior};
use sqlx::sqlite::SqliteConnection;

use crate::store::StoreError;

/// The connection statements run on here.
pub(super) type Db = rusqlite::Connection;

/// An open write transaction, and the audit chain's head as its appends left it (so that the
/// next append, and the seal before the commit, need not read it back).
pub(super) struct Tx<'c> {
    db: &'c Db,
    /// The last row this transaction appended: (seq, hash).
    pub(super) head: Option<(i64, Vec<u8>)>,
}

impl<'c> Tx<'c> {
    /// A transaction already begun on `db`, which has appended nothing yet.
    pub(super) fn new(db: &'c Db) -> Self {
        Tx { db, head: None }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;

    fn deref(&self) -> &Db {
        self.db
    }
}

/// Runs `f` on `conn`'s own handle, in this thread, while sqlx's thread for it waits: a few
/// statements inside a transaction sqlx began (the commit, and its fsync, stay with sqlx).
pub(super) async fn on_handle<T>(
    conn: &mut SqliteConnection,
    f: impl FnOnce(&Db) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut locked = conn.lock_handle().await?;
    f(&*crate::sys::borrow_sqlite(&mut locked)?)
}

/// Runs `job` in a write transaction of its own on `db` (`BEGIN IMMEDIATE`): committed when it
/// returns `Ok`, rolled back otherwise.
pub(super) fn in_transaction<T>(
    db: &Db,
    job: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let txn = Transaction::new_unchecked(db, TransactionBehavior::Immediate)?;
    let value = job(&mut Tx::new(&txn))?;
    txn.commit()?;
    Ok(value)
}

/// A BLOB column's bytes. TEXT is taken as its bytes too, as sqlx reads it: a sealed value that
/// someone edited into text in the file reaches the integrity check that names its secret,
/// instead of failing as a column type.
pub(super) fn blob(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    match row.get_ref(i)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Ok(b.to_vec()),
        other => Err(rusqlite::Error::InvalidColumnType(
            i,
            row.as_ref().column_name(i)?.to_string(),
            other.data_type(),
        )),
    }
}

/// [`blob`], or `None` for NULL.
pub(super) fn optional_blob(
    row: &rusqlite::Row<'_>,
    i: usize,
) -> rusqlite::Result<Option<Vec<u8>>> {
    match row.get_ref(i)? {
        ValueRef::Null => Ok(None),
        _ => blob(row, i).map(Some),
    }
}

/// A uniqueness (or primary key) constraint refused the statement.
pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi::{SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE};
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// The write connection group commits use in the calling thread. Writers in this process
/// take turns on its lock; sqlx's writer connection (the other write transactions) waits on
/// SQLite's lock like another process would.
pub(super) struct Writer(Mutex<Option<Db>>);

/// Prepared statements a connection keeps (rusqlite's default, 16, is fewer than a batch uses).
const CACHED_STATEMENTS: usize = 64;

impl Writer {
    /// Opens the existing store at `path` for group commits, with the settings of sqlx's
    /// writer (full sync, foreign keys, secure delete); with `no_autocheckpoint`, commits
    /// leave checkpoints to the daemon's checkpointer.
    pub(super) fn open(
        path: &Path,
        busy_timeout: Duration,
        wal_size_limit: &'static str,
        no_autocheckpoint: bool,
    ) -> Result<Self, StoreError> {
        let pragmas = format!(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON; \
             PRAGMA journal_size_limit = {wal_size_limit}; {}",
            if no_autocheckpoint {
                "PRAGMA wal_autocheckpoint = 0;"
            } else {
                ""
            }
        );
        Ok(Writer(Mutex::new(Some(connect(
            path,
            busy_timeout,
            &pragmas,
        )?))))
    }

    /// Runs `f` on the connection. In a multi-threaded runtime this thread is handed over as
    /// blocking meanwhile (a commit waits for its fsync), so the runtime's other tasks go on
    /// elsewhere.
    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let run = || match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => {
                // A transaction whose rollback failed (an I/O error) must not be built upon.
                if !db.is_autocommit() {
                    db.execute_batch("ROLLBACK")?;
                }
                f(db)
            }
            // As sqlx's pools answer once closed.
            None => Err(sqlx::Error::PoolClosed.into()),
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    /// Closes the connection; writes fail from now on.
    pub(super) fn close(&self) -> Result<(), StoreError> {
        close(&self.0)
    }
}

/// The read connection point reads use in the calling thread. `query_only`: it cannot write.
pub(super) struct Reader(Mutex<Option<Db>>);

impl Reader {
    /// Opens the existing store at `path` for reads.
    pub(super) fn open(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        let pragmas = "PRAGMA query_only = ON; PRAGMA cache_size = -512";
        Ok(Reader(Mutex::new(Some(connect(
            path,
            busy_timeout,
            pragmas,
        )?))))
    }

    /// Runs `f` on the connection (one caller at a time; each is a few indexed lookups).
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(db) => f(db),
            // As sqlx's pools answer once closed.
            None => Err(sqlx::Error::PoolClosed.into()),
        }
    }

    /// Closes the connection; reads fail from now on.
    pub(super) fn close(&self) -> Result<(), StoreError> {
        close(&self.0)
    }
}

/// A connection of this module's own to the existing store at `path`, set up with `pragmas`.
fn connect(path: &Path, busy_timeout: Duration, pragmas: &str) -> Result<Db, StoreError> {
    let db = Db::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(busy_timeout)?;
    db.set_prepared_statement_cache_capacity(CACHED_STATEMENTS);
    db.execute_batch(pragmas)?;
    Ok(db)
}

fn close(connection: &Mutex<Option<Db>>) -> Result<(), StoreError> {
    let db = connection
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match db {
        Some(db) => db.close().map_err(|(_, e)| e.into()),
        None => Ok(()),
    }
}
