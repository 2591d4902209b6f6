//! The store lock: an advisory `flock` on `<store>.lock` that keeps writers from stepping on a
//! running daemon.
//!
//! The daemon holds it exclusively for its whole life (so two daemons never rotate the same
//! store, and the daemon may cache what it alone writes). CLI commands that write hold it shared;
//! they fail fast while a daemon runs and go through its admin socket instead.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// A held lock; released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
pub(crate) struct StoreLock {
    _file: File,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Someone else holds it in a conflicting mode.
    Busy(PathBuf),
    /// The lock file cannot be opened.
    Io(PathBuf, std::io::Error),
}

/// The lock file beside a store file.
pub(crate) fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    store.with_file_name(name)
}

impl StoreLock {
    /// Takes the lock without waiting: exclusive for the daemon, shared for CLI writers.
    pub(crate) fn acquire(store: &Path, exclusive: bool) -> Result<StoreLock, LockError> {
        let path = lock_path(store);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| LockError::Io(path.clone(), e))?;
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        match flock(&file, op) {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Busy(path)),
            Err(e) => Err(LockError::Io(path, e.into())),
        }
    }
}
