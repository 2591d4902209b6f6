//! Persistence: the rows keywarden keeps, and the atomic operations on them.
//!
//! Callers see [`Store`] and the record types here, never SQL. Each method that changes state is
//! one transaction and appends its audit rows inside that same transaction, so a change and its
//! audit row are durable together or not at all. The backend is chosen when the store is opened;
//! today that is SQLite ([`sqlite`]); a PostgreSQL backend would be another variant of `Backend`
//! implementing the same methods, and no caller would change.
//!
//! Nothing here encrypts or decrypts: values arrive sealed and leave sealed.

mod cache;
mod lock;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::SealedCache;
use lock::{LockError, StoreLock};

use crate::audit::{AuditEvent, AuditRecord};
use crate::crypto::KdfParams;
use crate::rotation::RotationState;

/// Unix time in milliseconds, the unit of every timestamp in the store.
pub type Millis = i64;

/// The current time as [`Millis`].
pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
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
    /// The root key was replaced (by `rekey` in another process) since this process unlocked.
    #[error("the store was rekeyed by another process; unlock it again")]
    StaleKeys,
    /// A row holds something this build cannot read.
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("store database error: {0}")]
    Database(#[from] sqlx::Error),
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

/// The record that unlocks the vault: KDF parameters, salt and the wrapped keys.
#[derive(Debug, Clone)]
pub struct VaultHeader {
    /// Argon2id parameters for the key-encryption key.
    pub kdf: KdfParams,
    /// Argon2id salt.
    pub salt: Vec<u8>,
    /// The root key, sealed under the key-encryption key.
    pub wrapped_root_key: Vec<u8>,
    /// The fingerprint key, sealed under the root key.
    pub wrapped_fingerprint_key: Vec<u8>,
    /// Incremented by every `rekey`; writes of wrapped material check it.
    pub root_generation: i64,
}

/// Where a version stands in its secret's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Created by a rotation, not yet served.
    Pending,
    /// The version fetches receive.
    Current,
    /// The version before current, still valid while it drains.
    Previous,
    /// No longer valid; kept for audit and leak matching.
    Revoked,
}

impl Stage {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Current => "current",
            Stage::Previous => "previous",
            Stage::Revoked => "revoked",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "pending" => Stage::Pending,
            "current" => Stage::Current,
            "previous" => Stage::Previous,
            "revoked" => Stage::Revoked,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown version stage {other:?}"
                )));
            }
        })
    }
}

/// A secret's row, without its versions.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    /// Immutable random id; bound into every ciphertext of the secret.
    pub id: String,
    /// Unique name, such as `openai/prod`.
    pub name: String,
    /// Provider kind (`manual`, `random`, a plugin kind).
    pub provider: String,
    /// The data key, sealed under the root key.
    pub wrapped_data_key: Vec<u8>,
    /// Free-form labels for scoping.
    pub tags: Vec<String>,
    /// When the secret was created.
    pub created_at: Millis,
    /// When a version last changed.
    pub updated_at: Millis,
    /// The highest version number, if any.
    pub latest_version: Option<i64>,
}

/// One version of a secret, still sealed.
#[derive(Debug, Clone)]
pub struct VersionRecord {
    /// Version number, from 1.
    pub version: i64,
    /// Its stage.
    pub stage: Stage,
    /// The value sealed under the secret's data key.
    pub ciphertext: Vec<u8>,
    /// Non-secret facts (a key id, a user name).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Keyed fingerprint of the value.
    pub fingerprint: Vec<u8>,
    /// When it was created.
    pub created_at: Millis,
}

/// A secret and one of its versions, as the read path needs them.
#[derive(Debug, Clone)]
pub struct SealedSecret {
    /// The secret's id.
    pub secret_id: String,
    /// The secret's data key, sealed under the root key.
    pub wrapped_data_key: Vec<u8>,
    /// The version.
    pub version: VersionRecord,
}

/// What `list` and `status` show of a secret.
#[derive(Debug, Clone)]
pub struct SecretSummary {
    /// The secret's id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Provider kind.
    pub provider: String,
    /// The current version, if any.
    pub version: Option<i64>,
    /// When a version last changed.
    pub updated_at: Millis,
    /// Tags.
    pub tags: Vec<String>,
    /// When the scheduler will next rotate it.
    pub next_rotation_at: Option<Millis>,
    /// When a rotation last completed its promotion.
    pub last_rotated_at: Option<Millis>,
    /// The state of the latest rotation, if any.
    pub rotation_state: Option<RotationState>,
    /// Failed rotations since the last success.
    pub failed_attempts: i64,
    /// When automatic rotation was stopped for a person to look, if it was.
    pub quarantined_at: Option<Millis>,
    /// The last rotation error.
    pub last_error: Option<String>,
}

/// A rotation journal row.
#[derive(Debug, Clone)]
pub struct RotationRecord {
    /// The rotation id (sent to plugins as `rotation_id`).
    pub id: String,
    /// The secret's id.
    pub secret_id: String,
    /// The secret's name.
    pub secret_name: String,
    /// Where it stands.
    pub state: RotationState,
    /// The version being replaced (N), if any.
    pub from_version: Option<i64>,
    /// The new version (N+1), once created.
    pub to_version: Option<i64>,
    /// The proposed value, sealed under the secret's data key.
    pub proposed: Option<Vec<u8>>,
    /// Why it started.
    pub reason: String,
    /// Emergency rotations revoke N right after promotion.
    pub emergency: bool,
    /// The incident it belongs to.
    pub incident_id: Option<String>,
    /// Failed attempts of the current step.
    pub attempts: i64,
    /// The last step error.
    pub last_error: Option<String>,
    /// When the current step may be retried.
    pub next_attempt_at: Option<Millis>,
    /// When draining began.
    pub draining_since: Option<Millis>,
    /// When it was planned.
    pub created_at: Millis,
    /// When it last moved.
    pub updated_at: Millis,
}

/// A rotation to plan.
#[derive(Debug, Clone)]
pub struct NewRotation {
    /// Its id.
    pub id: String,
    /// The secret.
    pub secret_id: String,
    /// The current version it replaces (must still be current).
    pub from_version: Option<i64>,
    /// The proposed value, sealed.
    pub proposed: Option<Vec<u8>>,
    /// Why.
    pub reason: String,
    /// Whether it is an emergency rotation.
    pub emergency: bool,
    /// The incident.
    pub incident_id: Option<String>,
}

/// One step of a rotation: the state move and everything that changes with it, applied in one
/// transaction, and only if the rotation is still in `from`.
#[derive(Debug, Clone)]
pub struct StepChange {
    /// The state the step starts from.
    pub from: RotationState,
    /// The state it ends in (may equal `from` for an effect without a move).
    pub to: RotationState,
    /// `created`: the new version, stored as `pending`.
    pub insert_pending: Option<NewVersion>,
    /// `promoted`: pending → current, current → previous, previous → revoked.
    pub promote: bool,
    /// A version that is now revoked (N at done, N+1 at rollback).
    pub revoke_version: Option<i64>,
    /// `draining`: when it began.
    pub draining_since: Option<Millis>,
    /// `done`: clear the secret's failure count and error.
    pub succeeded: bool,
    /// `failed`, `rolled-back`: why (kept as the rotation's last error).
    pub error: Option<String>,
}

impl StepChange {
    /// A plain state move.
    pub fn to(from: RotationState, to: RotationState) -> Self {
        StepChange {
            from,
            to,
            insert_pending: None,
            promote: false,
            revoke_version: None,
            draining_since: None,
            succeeded: false,
            error: None,
        }
    }
}

/// A lease as stored.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    /// Lease id.
    pub id: String,
    /// The secret's id.
    pub secret_id: String,
    /// The secret's name (not stored: joined on load).
    pub secret_name: String,
    /// The stored version served, or `None` for a credential issued for this lease.
    pub version: Option<i64>,
    /// An issued credential's value, sealed under the secret's data key.
    pub issued: Option<Vec<u8>>,
    /// An issued credential's non-secret facts.
    pub issued_meta: Option<serde_json::Map<String, serde_json::Value>>,
    /// Holder's uid.
    pub uid: u32,
    /// Holder's gid.
    pub gid: u32,
    /// Holder's pid.
    pub pid: i32,
    /// Holder's executable.
    pub exe: Option<String>,
    /// When it was granted.
    pub created_at: Millis,
    /// When it expires.
    pub expires_at: Millis,
    /// When it ended (expired, deleted, revoked), if it did.
    pub ended_at: Option<Millis>,
    /// For issued credentials: `live`, `revoke-pending` or `revoked`.
    pub upstream_state: Option<String>,
}

/// A change to the lease table, applied in a batch with audit rows.
#[derive(Debug, Clone)]
pub enum LeaseOp {
    /// A new lease.
    Insert(Arc<LeaseRow>),
    /// A renewed lease.
    Renew {
        /// Lease id.
        id: String,
        /// New expiry.
        expires_at: Millis,
    },
    /// A lease that ended.
    End {
        /// Lease id.
        id: String,
        /// When.
        at: Millis,
        /// `expired`, `deleted`, `revoked`.
        reason: String,
        /// For issued credentials: the upstream state now.
        upstream_state: Option<String>,
    },
    /// Deletes ended leases older than `before` (their history stays in the audit log).
    PurgeEnded {
        /// Cut-off time.
        before: Millis,
    },
    /// A caller (uid, executable) seen fetching a secret for the first time.
    AccessSeen {
        /// The secret's id.
        secret_id: String,
        /// Caller uid.
        uid: u32,
        /// Caller executable.
        exe: String,
        /// When.
        at: Millis,
    },
    /// An issued credential revoked upstream after its lease ended.
    UpstreamRevoked {
        /// Lease id.
        id: String,
    },
}

/// A compromise run.
#[derive(Debug, Clone)]
pub struct IncidentRecord {
    /// Incident id (in every audit row the run writes).
    pub id: String,
    /// When it started.
    pub started_at: Millis,
    /// When every secret in scope was rotated, if that happened.
    pub finished_at: Option<Millis>,
    /// Its scope, as JSON.
    pub scope: String,
    /// Whether old versions and leases were revoked without grace.
    pub assume_compromise: bool,
    /// What started it (`cli`, `admin`, `signal`, `leak`, `canary`, `anomaly`).
    pub trigger: String,
    /// Leases it revoked.
    pub leases_revoked: i64,
}

/// The latest rotation of a secret under an incident.
#[derive(Debug, Clone)]
pub struct IncidentRotation {
    /// The secret.
    pub secret: String,
    /// The rotation's state.
    pub state: RotationState,
    /// Its last error.
    pub last_error: Option<String>,
}

/// An alert.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertRecord {
    /// Row id.
    pub id: i64,
    /// When.
    pub at: Millis,
    /// `signal`, `leak`, `canary`, `anomaly`.
    pub kind: String,
    /// The secret concerned.
    pub secret: Option<String>,
    /// What happened.
    pub message: String,
    /// The incident it started, if any.
    pub incident_id: Option<String>,
}

/// What a consumer has acknowledged for a secret.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    /// The consumer's name.
    pub consumer: String,
    /// The version last attempted or acknowledged.
    pub version: i64,
    /// When that version was acknowledged, if it was.
    pub acked_at: Option<Millis>,
    /// Failed attempts at that version.
    pub attempts: i64,
    /// The last delivery error.
    pub last_error: Option<String>,
}

/// A secret to create together with its first version.
#[derive(Debug, Clone)]
pub struct NewSecret {
    /// Its random id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its provider kind.
    pub provider: String,
    /// Its data key, sealed under the root key.
    pub wrapped_data_key: Vec<u8>,
    /// Its tags.
    pub tags: Vec<String>,
}

/// A version to add.
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// Its number: the secret's latest plus one.
    pub version: i64,
    /// The sealed value.
    pub ciphertext: Vec<u8>,
    /// Non-secret facts.
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Keyed fingerprint of the value.
    pub fingerprint: Vec<u8>,
}

/// Which secret a new version belongs to.
#[derive(Debug, Clone)]
pub enum VersionTarget {
    /// A secret that does not exist yet; created in the same transaction.
    New(NewSecret),
    /// An existing secret, whose latest version must still be `expected_latest`.
    Existing {
        /// The secret's id.
        secret_id: String,
        /// The latest version the caller saw.
        expected_latest: Option<i64>,
    },
}

/// A data key rewrapped under a new root key.
#[derive(Debug, Clone)]
pub struct RewrappedKey {
    /// The secret's id.
    pub secret_id: String,
    /// The data key sealed under the new root key.
    pub wrapped_data_key: Vec<u8>,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
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
    path: PathBuf,
    cache: Option<SealedCache>,
    _lock: Option<StoreLock>,
}

/// The store. Cheap to clone; clones share connections, lock and cache.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
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

impl Store {
    /// Creates a new store file holding `header` (mode 0600; a missing directory is created
    /// 0700). Fails if a file is already there; leaves nothing behind if it fails.
    pub async fn create(
        path: &Path,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<Store, StoreError> {
        let backend = sqlite::SqliteStore::create(path, header, audit).await?;
        let lock = take_lock(path, Access::Shared)?;
        Ok(Store::assemble(
            Backend::Sqlite(backend),
            path,
            Access::Shared,
            lock,
        ))
    }

    /// Opens an existing store. Unless read-only, takes the store lock and applies newer schema
    /// migrations if needed.
    pub async fn open(path: &Path, access: Access) -> Result<Store, StoreError> {
        // Look for the file before creating its lock file beside it.
        if !path.exists() {
            return Err(StoreError::NotFound {
                path: path.to_path_buf(),
                hint: "run `keywarden init` to create one, or point --store or [store] path at \
                       an existing store",
            });
        }
        let lock = take_lock(path, access)?;
        let backend = sqlite::SqliteStore::open(
            path,
            access != Access::ReadOnly,
            access == Access::Exclusive,
        )
        .await?;
        Ok(Store::assemble(
            Backend::Sqlite(backend),
            path,
            access,
            lock,
        ))
    }

    fn assemble(backend: Backend, path: &Path, access: Access, lock: Option<StoreLock>) -> Store {
        Store {
            inner: Arc::new(Inner {
                backend,
                path: path.to_path_buf(),
                cache: (access == Access::Exclusive).then(SealedCache::default),
                _lock: lock,
            }),
        }
    }

    /// The path the store was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn sqlite(&self) -> &sqlite::SqliteStore {
        match &self.inner.backend {
            Backend::Sqlite(s) => s,
        }
    }

    /// Forgets cached rows after a write: of `name`, or all of them.
    fn invalidate(&self, name: Option<&str>) {
        if let Some(cache) = &self.inner.cache {
            cache.invalidate(name);
        }
    }

    /// The vault header, or [`StoreError::NotInitialized`].
    pub async fn header(&self) -> Result<VaultHeader, StoreError> {
        self.sqlite()
            .header()
            .await?
            .ok_or_else(|| StoreError::NotInitialized {
                path: self.inner.path.clone(),
            })
    }

    /// Replaces the KDF parameters, salt and wrapped root key (a passphrase change).
    pub async fn replace_root_wrapping(
        &self,
        header: &VaultHeader,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.sqlite().replace_root_wrapping(header, audit).await
    }

    /// Installs a new root key: the header and every data key, in one transaction. Fails with
    /// [`StoreError::Conflict`] if the set of secrets changed since `rewrapped` was computed.
    pub async fn rekey(
        &self,
        old_generation: i64,
        header: &VaultHeader,
        rewrapped: &[RewrappedKey],
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let result = self
            .sqlite()
            .rekey(old_generation, header, rewrapped, audit)
            .await;
        self.invalidate(None);
        result
    }

    /// Every secret's id, name and wrapped data key (for `rekey`).
    pub async fn all_data_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        self.sqlite().all_data_keys().await
    }

    /// A secret by name.
    pub async fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.sqlite().secret(name).await
    }

    /// A secret's current version (`version = None`) or a given version, still sealed.
    pub async fn sealed(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<Option<Arc<SealedSecret>>, StoreError> {
        let Some(cache) = self.inner.cache.as_ref().filter(|_| version.is_none()) else {
            return Ok(self.sqlite().sealed(name, version).await?.map(Arc::new));
        };
        let epoch = match cache.get(name) {
            Ok(hit) => return Ok(Some(hit)),
            Err(epoch) => epoch,
        };
        let found = self.sqlite().sealed(name, None).await?.map(Arc::new);
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
        let result = self
            .sqlite()
            .put_version(generation, target, version, audit)
            .await;
        self.invalidate(Some(name));
        result
    }

    /// All secrets, by name.
    pub async fn list(&self) -> Result<Vec<SecretSummary>, StoreError> {
        self.sqlite().summaries(None).await
    }

    /// Deletes a secret, its data key and all its versions. Returns how many versions it had,
    /// or `None` if there was no such secret.
    pub async fn remove_secret(
        &self,
        name: &str,
        audit: AuditEvent,
    ) -> Result<Option<i64>, StoreError> {
        let result = self.sqlite().remove_secret(name, audit).await;
        self.invalidate(Some(name));
        result
    }

    /// Appends audit rows in one transaction.
    pub async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        self.sqlite().append_audit(events).await
    }

    /// Up to `limit` audit rows with `seq > after`, in order.
    pub async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        self.sqlite().audit_page(after, limit).await
    }

    /// The chain head: the last row's sequence number and hash.
    pub async fn audit_head(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .sqlite()
            .audit_tail(1)
            .await?
            .pop()
            .map(|r| (r.seq, r.hash)))
    }

    /// The last `limit` audit rows, in order.
    pub async fn audit_tail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        self.sqlite().audit_tail(limit).await
    }

    /// Creates a secret row (with a fresh wrapped data key) if `name` does not exist, or updates
    /// its provider and tags if they changed. Returns the secret and whether anything changed.
    pub async fn register_secret(
        &self,
        generation: i64,
        secret: &NewSecret,
        audit: AuditEvent,
    ) -> Result<(SecretRecord, bool), StoreError> {
        self.sqlite()
            .register_secret(generation, secret, audit)
            .await
    }

    /// Sets when the scheduler next rotates a secret.
    pub async fn set_next_rotation(
        &self,
        secret_id: &str,
        at: Option<Millis>,
    ) -> Result<(), StoreError> {
        self.sqlite().set_next_rotation(secret_id, at).await
    }

    /// Counts a failed rotation against a secret; quarantines it if asked. Returns the count.
    pub async fn record_secret_failure(
        &self,
        secret_id: &str,
        error: &str,
        quarantine: bool,
        audit: AuditEvent,
    ) -> Result<i64, StoreError> {
        self.sqlite()
            .record_secret_failure(secret_id, error, quarantine, audit)
            .await
    }

    /// Lifts a quarantine and resets the failure count.
    pub async fn unquarantine(&self, secret_id: &str, audit: AuditEvent) -> Result<(), StoreError> {
        self.sqlite().unquarantine(secret_id, audit).await
    }

    /// Plans a rotation. Fails with [`StoreError::Conflict`] if one is already active for the
    /// secret or the current version moved.
    pub async fn plan_rotation(
        &self,
        rotation: &NewRotation,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.sqlite().plan_rotation(rotation, audit).await
    }

    /// Applies one step. Fails with [`StoreError::Conflict`] if the rotation is no longer in
    /// `change.from`.
    pub async fn advance_rotation(
        &self,
        rotation: &RotationRecord,
        change: &StepChange,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let result = self
            .sqlite()
            .advance_rotation(rotation, change, audit)
            .await;
        if change.promote || change.revoke_version.is_some() {
            self.invalidate(Some(&rotation.secret_name));
        }
        result
    }

    /// Records a failed attempt at the current step and when to retry it.
    pub async fn retry_rotation_later(
        &self,
        rotation_id: &str,
        error: &str,
        next_attempt_at: Millis,
    ) -> Result<i64, StoreError> {
        self.sqlite()
            .retry_rotation_later(rotation_id, error, next_attempt_at)
            .await
    }

    /// Resets a rotation's attempt count (an operator asked to resume it).
    pub async fn reset_rotation_attempts(&self, rotation_id: &str) -> Result<(), StoreError> {
        self.sqlite().reset_rotation_attempts(rotation_id).await
    }

    /// Marks an active rotation as an emergency of `incident_id`.
    pub async fn escalate_rotation(
        &self,
        rotation_id: &str,
        incident_id: Option<&str>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.sqlite()
            .escalate_rotation(rotation_id, incident_id, audit)
            .await
    }

    /// A rotation by id.
    pub async fn rotation(&self, id: &str) -> Result<Option<RotationRecord>, StoreError> {
        self.sqlite().rotation(id).await
    }

    /// Every rotation not in a terminal state.
    pub async fn active_rotations(&self) -> Result<Vec<RotationRecord>, StoreError> {
        self.sqlite().active_rotations().await
    }

    /// The latest rotation of a secret, active or not.
    pub async fn latest_rotation(
        &self,
        secret_id: &str,
    ) -> Result<Option<RotationRecord>, StoreError> {
        self.sqlite().latest_rotation(secret_id).await
    }

    /// What each consumer of a secret has acknowledged.
    pub async fn deliveries(&self, secret_id: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.sqlite().deliveries(secret_id).await
    }

    /// Records a delivery attempt: `Ok` acknowledges `version`; `Err` counts a failure.
    pub async fn record_delivery(
        &self,
        secret_id: &str,
        consumer: &str,
        version: i64,
        outcome: Result<(), &str>,
    ) -> Result<(), StoreError> {
        self.sqlite()
            .record_delivery(secret_id, consumer, version, outcome)
            .await
    }

    /// Live leases on a version at `now`, and the earliest expiry among them.
    pub async fn live_leases(
        &self,
        secret_id: &str,
        version: i64,
        now: Millis,
    ) -> Result<(i64, Option<Millis>), StoreError> {
        self.sqlite().live_leases(secret_id, version, now).await
    }

    /// One secret's summary.
    pub async fn secret_summary(&self, name: &str) -> Result<Option<SecretSummary>, StoreError> {
        Ok(self.sqlite().summaries(Some(name)).await?.pop())
    }

    /// Applies lease changes and audit rows in one group-committed transaction. Durable
    /// against a crash of the process (the write-ahead log is written before this returns) but
    /// not fsynced individually, so many fetches share one disk flush.
    pub async fn apply_lease_batch(
        &self,
        ops: &[LeaseOp],
        audit: &[AuditEvent],
    ) -> Result<(), StoreError> {
        self.sqlite().apply_lease_batch(ops, audit).await
    }

    /// Leases still live, and issued credentials whose upstream revocation is pending.
    pub async fn open_leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        self.sqlite().open_leases().await
    }

    /// How many rotations ended in each terminal state.
    pub async fn rotation_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.sqlite().rotation_counts().await
    }

    /// Records a new incident.
    pub async fn create_incident(
        &self,
        incident: &IncidentRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.sqlite().create_incident(incident, audit).await
    }

    /// An incident by id.
    pub async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        Ok(self.sqlite().incidents(Some(id), false).await?.pop())
    }

    /// Incidents not yet finished, oldest first.
    pub async fn unfinished_incidents(&self) -> Result<Vec<IncidentRecord>, StoreError> {
        self.sqlite().incidents(None, true).await
    }

    /// Adds to an incident's count of revoked leases.
    pub async fn add_incident_leases(&self, id: &str, revoked: i64) -> Result<(), StoreError> {
        self.sqlite().add_incident_leases(id, revoked).await
    }

    /// Marks an incident finished.
    pub async fn finish_incident(&self, id: &str, audit: AuditEvent) -> Result<(), StoreError> {
        self.sqlite().finish_incident(id, audit).await
    }

    /// The latest rotation of each secret under an incident.
    pub async fn incident_rotations(&self, id: &str) -> Result<Vec<IncidentRotation>, StoreError> {
        self.sqlite().incident_rotations(id).await
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
        let result = self
            .sqlite()
            .revoke_version(secret_id, version, audit)
            .await;
        self.invalidate(Some(name));
        result
    }

    /// Records an alert (with its audit row). Returns its id.
    pub async fn insert_alert(
        &self,
        alert: &AlertRecord,
        audit: AuditEvent,
    ) -> Result<i64, StoreError> {
        self.sqlite().insert_alert(alert, audit).await
    }

    /// The most recent alerts, newest first.
    pub async fn recent_alerts(&self, limit: i64) -> Result<Vec<AlertRecord>, StoreError> {
        self.sqlite().recent_alerts(limit).await
    }

    /// Every (secret id, uid, executable) seen fetching.
    pub async fn access_seen(&self) -> Result<Vec<(String, u32, String)>, StoreError> {
        self.sqlite().access_seen().await
    }

    /// Versions whose keyed fingerprint is `fingerprint`: (secret name, version, stage).
    pub async fn versions_by_fingerprint(
        &self,
        fingerprint: &[u8],
    ) -> Result<Vec<(String, i64, Stage)>, StoreError> {
        self.sqlite().versions_by_fingerprint(fingerprint).await
    }
}
