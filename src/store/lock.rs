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

/// A process holding a store's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    /// Its pid.
    pub(crate) pid: u32,
    /// Whether it holds the lock exclusively (a daemon) or shared (a CLI command).
    pub(crate) exclusive: bool,
    /// Its command line, for messages.
    pub(crate) command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// The processes holding the lock of `store`, from the kernel's table of locks (`/proc/locks`).
pub(crate) fn holders(store: &Path) -> Vec<Holder> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(lock_path(store)) else {
        return Vec::new();
    };
    // /proc/locks names a file as MAJOR:MINOR:INODE (device numbers in hex): an inode number
    // alone can be another file's on another device, held by someone else entirely.
    let file_id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(meta.dev()),
        rustix::fs::minor(meta.dev()),
        meta.ino()
    );
    let table = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut found: Vec<Holder> = table
        .lines()
        .filter(|l| !l.contains("->")) // waiting, not holding
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  READ  1234 fe:00:770064 0 EOF"
            let (kind, mode, pid, file) = (
                fields.get(1)?,
                fields.get(3)?,
                fields.get(4)?,
                fields.get(5)?,
            );
            (*kind == "FLOCK" && *file == file_id).then(|| {
                let pid: u32 = pid.parse().unwrap_or(0);
                Holder {
                    pid,
                    exclusive: *mode == "WRITE",
                    command: command_line(pid),
                }
            })
        })
        .collect();
    found.sort_by_key(|h| h.pid);
    found.dedup();
    found
}

/// A process's command line, printable, for messages (`?` when it cannot be read).
fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text: String = String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(200)
        .collect();
    if text.is_empty() { "?".into() } else { text }
}
