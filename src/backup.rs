//! Backups and restores of the store.
//!
//! A backup is SQLite's `VACUUM INTO` of one read snapshot: consistent while the daemon serves,
//! written to a new file of mode 0600, every value still sealed (the passphrase current when it
//! was taken opens it). A restore copies a backup beside the store and opens the copy with the
//! passphrase; only once the caller has checked it does it replace the store, whose old file is
//! kept beside it, renamed. Nothing is replaced while a daemon or a command holds the store.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::audit::AuditEvent;
use crate::crypto;
use crate::store::{Access, Hold, Store, StoreError};
use crate::vault::{Passphrase, Vault, VaultError};

/// Why a backup or restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup's file exists and was not to be replaced.
    #[error("{0} already exists; give a new file name, or --force to replace it")]
    Exists(PathBuf),
    /// A store is where the restore would put one.
    #[error(
        "a store already exists at {0}; `restore --force` replaces it (its file is kept beside \
         it, renamed)"
    )]
    StoreExists(PathBuf),
    /// A daemon or a command holds the store.
    #[error(
        "the store at {0} is in use by a daemon or a command; stop the daemon first: a restore \
         replaces the store's file"
    )]
    InUse(PathBuf),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The backup does not open as a keywarden store.
    #[error("{backup} does not open as a keywarden store: {source}")]
    NotAStore {
        /// The backup.
        backup: PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The store is in PostgreSQL, whose own tools back it up.
    #[error(
        "the store at {0} is in PostgreSQL: back it up with PostgreSQL's tools (pg_dump, or a \
         base backup with its write-ahead log); values stay sealed in them as in the database"
    )]
    OnPostgres(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The vault failed: a wrong passphrase, or a value that does not open.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

/// A backup file, written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Where.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256, hex (to compare a copy kept elsewhere).
    pub sha256: String,
}

/// A consistent copy of `store` in a new file in `dir` (mode 0600) that the caller moves with
/// [`install`] or reads and removes.
pub async fn snapshot(store: &Store, dir: &Path) -> Result<PathBuf, BackupError> {
    let partial = dir.join(format!(
        ".keywarden-backup-{}.partial",
        uuid::Uuid::new_v4()
    ));
    let Some(file) = store.sqlite() else {
        return Err(BackupError::OnPostgres(store.path().to_path_buf()));
    };
    file.copy_into(&partial).await?;
    Ok(partial)
}

/// Moves the finished copy `partial` to `dest` (on the same file system), never over an existing
/// file unless `force`, and makes the move durable.
pub fn install(partial: &Path, dest: &Path, force: bool) -> Result<Written, BackupError> {
    let moved = if force {
        std::fs::rename(partial, dest)
    } else {
        // A link fails if `dest` exists: no window in which a file there is replaced.
        std::fs::hard_link(partial, dest).and_then(|()| std::fs::remove_file(partial))
    };
    if let Err(e) = moved {
        let _ = std::fs::remove_file(partial);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            BackupError::Exists(dest.to_path_buf())
        } else {
            io("cannot write", dest)(e)
        });
    }
    sync_dir(dest)?;
    Ok(Written {
        path: dest.to_path_buf(),
        bytes: std::fs::metadata(dest)
            .map_err(io("cannot read", dest))?
            .len(),
        sha256: crypto::file_sha256(dest).map_err(io("cannot read", dest))?,
    })
}

/// Writes a backup the daemon sent (`bytes`) to `dest`, like [`install`].
pub fn write(bytes: &[u8], dest: &Path, force: bool) -> Result<Written, BackupError> {
    let dir = parent(dest);
    let partial = dir.join(format!(
        ".keywarden-backup-{}.partial",
        uuid::Uuid::new_v4()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(io("cannot write", &partial)(e));
    }
    install(&partial, dest, force)
}

/// The directory a path is in (`.` for a bare file name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    let dir = parent(path);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", dir))
}

/// A restore under way: the store's lock held, the backup copied beside the store. Dropped
/// without [`Restore::install`], it removes the copy and changes nothing.
#[derive(Debug)]
pub struct Restore {
    _hold: Hold,
    backup: PathBuf,
    /// The backup's SHA-256, hex, as it was copied.
    sha256: String,
    store: PathBuf,
    copy: PathBuf,
}

impl Restore {
    /// Holds the store at `store` (which need not exist) and copies `backup` beside it; refuses
    /// if a store is there and not `force`, or if a daemon or command holds it.
    pub fn prepare(backup: &Path, store: &Path, force: bool) -> Result<Restore, BackupError> {
        let dir = parent(store);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("cannot create", dir))?;
        }
        let hold = match Store::hold(store) {
            Ok(hold) => hold,
            Err(StoreError::Locked { .. }) => return Err(BackupError::InUse(store.to_path_buf())),
            Err(e) => return Err(e.into()),
        };
        if store.exists() && !force {
            return Err(BackupError::StoreExists(store.to_path_buf()));
        }
        let mut source = std::fs::File::open(backup).map_err(io("cannot open", backup))?;
        let copy = dir.join(format!(
            ".{}.restoring-{}",
            store.file_name().unwrap_or_default().to_string_lossy(),
            uuid::Uuid::new_v4()
        ));
        let mut restore = Restore {
            _hold: hold,
            backup: backup.to_path_buf(),
            sha256: String::new(),
            store: store.to_path_buf(),
            copy,
        };
        let mut target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&restore.copy)
            .map_err(io("cannot create", &restore.copy))?;
        std::io::copy(&mut source, &mut target)
            .and_then(|_| target.sync_all())
            .map_err(io("cannot copy the backup to", &restore.copy))?;
        restore.sha256 =
            crypto::file_sha256(&restore.copy).map_err(io("cannot read", &restore.copy))?;
        Ok(restore)
    }

    /// Opens the copy (applying newer schema migrations) and unlocks it with `passphrase`.
    pub async fn open(&self, passphrase: &Passphrase) -> Result<Vault, BackupError> {
        let not_a_store = |source| BackupError::NotAStore {
            backup: self.backup.clone(),
            source,
        };
        let store = Store::open(&self.copy, Access::Shared)
            .await
            .map_err(not_a_store)?;
        match Vault::unlock(store, passphrase).await {
            Err(VaultError::Store(e)) => Err(not_a_store(e)),
            other => Ok(other?),
        }
    }

    /// Records the restore in the copy's audit chain (as `actor`), closes it and
    /// moves it into the store's place; the store it replaces is kept beside it, renamed.
    /// Returns where the replaced store was kept, if there was one.
    pub async fn install(self, vault: Vault, actor: &str) -> Result<Option<PathBuf>, BackupError> {
        let audit = AuditEvent::new(actor, "vault.restored").detail(json!({
            "from": self.backup.display().to_string(),
            "sha256": self.sha256,
        }));
        vault.store().append_audit(&[audit]).await?;
        vault.store().close().await?;
        drop(vault);
        let kept = if self.store.exists() {
            let mut name = self.store.as_os_str().to_os_string();
            name.push(format!(".replaced-{}", crate::clock::now_millis()));
            let kept = PathBuf::from(name);
            for suffix in ["", "-wal", "-shm"] {
                let from = with_suffix(&self.store, suffix);
                if from.exists() {
                    std::fs::rename(&from, with_suffix(&kept, suffix))
                        .map_err(io("cannot move aside", &from))?;
                }
            }
            Some(kept)
        } else {
            None
        };
        std::fs::rename(&self.copy, &self.store)
            .map_err(io("cannot move into place", &self.store))?;
        sync_dir(&self.store)?;
        Ok(kept)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        // The copy, or what is left of it once moved into place (its lock file).
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let _ = std::fs::remove_file(with_suffix(&self.copy, suffix));
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}
