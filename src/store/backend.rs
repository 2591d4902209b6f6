//! The backend a [`Store`] was opened on, and the store's operations forwarded to it: each
//! one is the same method on [`SqliteStore`] and on [`PgStore`].

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::audit::{AuditEvent, AuditRecord};
use crate::clock::Millis;
use crate::crypto::IntegrityKey;

/// Where a store's rows are.
pub(super) enum Backend {
    /// A file (the default).
    Sqlite(Box<SqliteStore>),
    /// A PostgreSQL database several daemons may share.
    Postgres(PgStore),
}

/// Writes `impl Store` with each listed operation calling the same method on the backend.
macro_rules! forward {
    ($($(#[doc = $doc:literal])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Store {
            $(
                $(#[doc = $doc])*
                pub async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match &self.inner.backend {
                        Backend::Sqlite(b) => b.$name($($arg),*).await,
                        Backend::Postgres(b) => b.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

impl Store {
    /// From now on, seal the audit chain's head in every transaction that appends rows, and
    /// MAC every new current version.
    pub fn set_integrity_key(&self, key: IntegrityKey) {
        match &self.inner.backend {
            Backend::Sqlite(b) => b.set_integrity_key(key),
            Backend::Postgres(b) => b.set_integrity_key(key),
        }
    }

    /// The names whose current version may have changed, as writes commit (`None`: any); only
    /// in the daemon (`None` elsewhere). See `cache.rs`.
    pub fn watch_versions(&self) -> Option<tokio::sync::broadcast::Receiver<Option<Arc<str>>>> {
        match &self.inner.backend {
            Backend::Sqlite(b) => b.watch_versions(),
            Backend::Postgres(b) => b.watch_versions(),
        }
    }

    /// Where the store is: its file, or its database's address without a password.
    pub fn path(&self) -> &Path {
        match &self.inner.backend {
            Backend::Sqlite(b) => b.path(),
            Backend::Postgres(b) => b.path(),
        }
    }
}

forward! {
    /// Appends audit rows in one transaction.
    fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError>;
    /// Up to `limit` audit rows with `seq > after`, in order.
    fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError>;
    /// The last `limit` audit rows, in order.
    fn audit_tail(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError>;
    /// The chain head: the last row's sequence number and hash.
    fn audit_head(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// Where the chain in this store begins when older rows were archived: the last archived
    /// row's (seq, hash).
    fn audit_anchor(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// The last row written before `before`, if any: where an archive up to that time ends.
    fn audit_last_before(&self, before: Millis) -> Result<Option<i64>, StoreError>;
    /// Removes the rows up to `through_seq` (already written to an archive) in one
    /// transaction: the row must still have `hash`; it becomes the chain's anchor, sealed
    /// under `key` (the unlocked vault's integrity key), and `event` is appended after it.
    fn archive_audit(&self, key: &IntegrityKey, through_seq: i64, hash: &[u8], event: AuditEvent) -> Result<(), StoreError>;
    /// Every seal, by row: (seq, mac).
    fn audit_seals(&self) -> Result<Vec<(i64, Vec<u8>)>, StoreError>;
    /// Waits until every write queued so far is committed (batches run in order): at shutdown,
    /// before the process ends.
    fn flush_writes(&self) -> Result<(), StoreError>;
    /// Sums the `broker.request` rows since `day_start` per caller (policy, uid, executable):
    /// requests since `minute_start`, requests and tokens since `day_start`.
    fn broker_spending(&self, day_start: Millis, minute_start: Millis) -> Result<Vec<((String, u32, String), u64, u64, u64)>, StoreError>;
    /// Brokers whose last `broker.blocked`/`broker.unblocked` row blocks them.
    fn blocked_brokers(&self) -> Result<Vec<String>, StoreError>;
    /// What each consumer of a secret has acknowledged.
    fn deliveries(&self, secret_id: &str) -> Result<Vec<DeliveryRecord>, StoreError>;
    /// Records a delivery attempt: `Ok(audit)` acknowledges `version` and appends its audit row
    /// in the same transaction; `Err` counts a failure.
    fn record_delivery(&self, secret_id: &str, consumer: &str, version: i64, outcome: Result<AuditEvent, &str>) -> Result<(), StoreError>;
    /// The vault header, or [`StoreError::NotInitialized`].
    fn header(&self) -> Result<VaultHeader, StoreError>;
    /// Replaces the KDF parameters, salt and wrapped root key (a passphrase change).
    fn replace_root_wrapping(&self, header: &VaultHeader, audit: AuditEvent) -> Result<(), StoreError>;
    /// Every secret's id, name and wrapped data key (for `rekey`).
    fn all_data_keys(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError>;
    /// Upgrades a store whose current versions carry no MAC: records one for every secret's
    /// current version under `key` and installs `wrapped_fingerprint_key` (the same key, wrapped
    /// to say MACs are now kept), in one transaction.
    fn install_current_macs(&self, key: &IntegrityKey, wrapped_fingerprint_key: &[u8]) -> Result<usize, StoreError>;
    /// Everything sealed under secret `secret_id`'s data key: its versions, its rotations'
    /// proposed values and the credentials issued for its leases.
    fn sealed_material(&self, secret_id: &str) -> Result<SealedMaterial, StoreError>;
    /// Installs a new root key: the header and every data key, in one transaction. Fails with
    /// [`StoreError::Conflict`] if the set of secrets changed since `rewrapped` was computed.
    fn rekey(&self, old_generation: i64, header: &VaultHeader, rewrapped: &[RewrappedKey], audit: AuditEvent) -> Result<(), StoreError>;
    /// Records a new incident.
    fn create_incident(&self, incident: &IncidentRecord, audit: AuditEvent) -> Result<(), StoreError>;
    /// Adds to an incident's count of revoked leases.
    fn add_incident_leases(&self, id: &str, revoked: i64) -> Result<(), StoreError>;
    /// Marks an incident finished.
    fn finish_incident(&self, id: &str, audit: AuditEvent) -> Result<(), StoreError>;
    /// Marks a finished incident unfinished again (a run of its scope retries what failed),
    /// unless someone closed it by hand. Returns whether it was reopened.
    fn reopen_incident(&self, id: &str, audit: AuditEvent) -> Result<bool, StoreError>;
    /// Closes an incident by hand: it is finished and never resumed. Returns whether it was
    /// open or finished (not already closed).
    fn close_incident(&self, id: &str, by: &str, audit: AuditEvent) -> Result<bool, StoreError>;
    /// Every incident, oldest first.
    fn all_incidents(&self) -> Result<Vec<IncidentRecord>, StoreError>;
    /// The latest rotation of each secret under an incident.
    fn incident_rotations(&self, id: &str) -> Result<Vec<IncidentRotation>, StoreError>;
    /// Records an alert (with its audit row). Returns its id.
    fn insert_alert(&self, alert: &AlertRecord, audit: AuditEvent) -> Result<i64, StoreError>;
    /// The most recent alerts, newest first; with `unacked_only`, those no one acknowledged.
    fn recent_alerts(&self, limit: i64, unacked_only: bool) -> Result<Vec<AlertRecord>, StoreError>;
    /// Acknowledges alerts (these ids, or every one not yet acknowledged), with the audit row
    /// `audit` (its detail gets the ids). Returns the ids acknowledged now.
    fn ack_alerts(&self, ids: Option<&[i64]>, by: &str, audit: AuditEvent) -> Result<Vec<i64>, StoreError>;
    /// An incident by id.
    fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError>;
    /// Incidents not yet finished, oldest first.
    fn unfinished_incidents(&self) -> Result<Vec<IncidentRecord>, StoreError>;
    /// Applies lease changes and audit rows in one group-committed transaction. Durable
    /// against a crash of the process (the write-ahead log is written before this returns) but
    /// not fsynced individually, so many fetches share one disk flush.
    fn apply_lease_batch(&self, ops: &[LeaseOp], audit: &[AuditEvent]) -> Result<(), StoreError>;
    /// Journals, durably, that a credential is about to be issued for lease `lease_id`.
    fn journal_issue(&self, lease_id: &str, secret_id: &str, secret_name: &str, at: Millis) -> Result<(), StoreError>;
    /// Ends a journal entry: its credential was revoked, or never issued.
    fn end_issue(&self, lease_id: &str) -> Result<(), StoreError>;
    /// Journal entries whose lease was never committed: (lease id, secret name), oldest first.
    /// Entries whose lease exists are ended on the way.
    fn orphaned_issues(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// The credential issued for lease `id`, sealed, as the store holds it now (a `rekey
    /// --data-keys` reseals it).
    fn issued_credential(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Leases still live, and issued credentials whose upstream revocation is pending.
    fn open_leases(&self) -> Result<Vec<LeaseRow>, StoreError>;
    /// Every (secret id, uid, executable) seen fetching, with when it first was.
    fn access_seen(&self) -> Result<Vec<(String, u32, String, Millis)>, StoreError>;
    /// Live leases on a version at `now`, and the earliest expiry among them.
    fn live_leases(&self, secret_id: &str, version: i64, now: Millis) -> Result<(i64, Option<Millis>), StoreError>;
    /// Folds the write-ahead log into the database and closes every connection: the file is
    /// then whole on its own (a restore moves it).
    fn close(&self) -> Result<(), StoreError>;
    /// Plans a rotation. Fails with [`StoreError::Conflict`] if one is already active for the
    /// secret or the current version moved.
    fn plan_rotation(&self, rotation: &NewRotation, audit: AuditEvent) -> Result<(), StoreError>;
    /// Records a failed attempt at the current step and when to retry it.
    fn retry_rotation_later(&self, rotation_id: &str, error: &str, next_attempt_at: Millis) -> Result<i64, StoreError>;
    /// Resets a rotation's attempt count (an operator asked to resume it).
    fn reset_rotation_attempts(&self, rotation_id: &str) -> Result<(), StoreError>;
    /// Marks an active rotation as an emergency of `incident_id`.
    fn escalate_rotation(&self, rotation_id: &str, incident_id: Option<&str>, audit: AuditEvent) -> Result<(), StoreError>;
    /// A rotation by id.
    fn rotation(&self, id: &str) -> Result<Option<RotationRecord>, StoreError>;
    /// Every rotation not in a terminal state (read once, at start-up).
    fn active_rotations(&self) -> Result<Vec<RotationRecord>, StoreError>;
    /// Each rotation not in a terminal state as (secret name, state, created at): a listing
    /// for metrics, on sqlx's readers (the full records are point reads, in the calling thread).
    fn active_rotation_ages(&self) -> Result<Vec<(String, RotationState, Millis)>, StoreError>;
    /// The latest rotation of a secret, active or not.
    fn latest_rotation(&self, secret_id: &str) -> Result<Option<RotationRecord>, StoreError>;
    /// How many rotations ended in each terminal state.
    fn rotation_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// Applies one step. Fails with [`StoreError::Conflict`] if the rotation is no longer in
    /// `change.from`.
    fn advance_rotation(&self, rotation: &RotationRecord, change: &StepChange, audit: AuditEvent) -> Result<(), StoreError>;
    /// A secret by name.
    fn secret(&self, name: &str) -> Result<Option<SecretRecord>, StoreError>;
    /// Whether the secret is quarantined (a cheap read for the engine's waits).
    fn is_quarantined(&self, name: &str) -> Result<bool, StoreError>;
    /// For each secret, creates its row (with its fresh wrapped data key) if its name does not
    /// exist, or updates its provider and tags if they changed, appending the secret's audit
    /// event when anything changed; one transaction for all. Returns how many changed.
    fn register_secrets(&self, generation: i64, secrets: Vec<(NewSecret, AuditEvent)>) -> Result<usize, StoreError>;
    /// Sets when the scheduler next rotates a secret.
    fn set_next_rotation(&self, secret_id: &str, at: Option<Millis>) -> Result<(), StoreError>;
    /// Counts a failed rotation against a secret; quarantines it if asked. Returns the count.
    fn record_secret_failure(&self, secret_id: &str, error: &str, quarantine: bool, audit: AuditEvent) -> Result<i64, StoreError>;
    /// Lifts a quarantine and resets the failure count: a read when there is nothing to lift
    /// (every request of an incident asks), else a write (group-committed in the daemon).
    fn unquarantine(&self, secret_id: &str, audit: AuditEvent) -> Result<(), StoreError>;
    /// Versions whose keyed fingerprint is `fingerprint`: (secret name, version, stage).
    fn versions_by_fingerprint(&self, fingerprint: &[u8]) -> Result<Vec<(String, i64, Stage)>, StoreError>;
    /// A secret's current version (`version = None`) or a given version, still sealed. The
    /// daemon's reads of current versions are served from its cache.
    fn sealed(&self, name: &str, version: Option<i64>) -> Result<Option<Arc<SealedSecret>>, StoreError>;
    /// Adds a version and makes it current (the old current becomes previous, the old previous
    /// revoked). Checks that the root key generation is still `generation`.
    fn put_version(&self, name: &str, generation: i64, target: &VersionTarget, version: &NewVersion, audit: AuditEvent) -> Result<(), StoreError>;
    /// All secrets, by name.
    fn list(&self) -> Result<Vec<SecretSummary>, StoreError>;
    /// Secrets whose current version a plugin marked as not persisted upstream
    /// (`meta.acl_persisted = false`: a restart of the server would undo the change).
    fn unpersisted_current_versions(&self) -> Result<Vec<String>, StoreError>;
    /// Every secret's name, provider, tags and current version: what start-up needs, in one
    /// narrow read.
    fn registered(&self) -> Result<Vec<Registered>, StoreError>;
    /// Every secret's name, next scheduled rotation and whether it is quarantined: what the
    /// scheduler reads on each wake, in one narrow read.
    fn due_times(&self) -> Result<Vec<(String, Option<Millis>, bool)>, StoreError>;
    /// One secret's summary.
    fn secret_summary(&self, name: &str) -> Result<Option<SecretSummary>, StoreError>;
    /// Deletes a secret, its data key and all its versions. Returns how many versions it had,
    /// or `None` if there was no such secret.
    fn remove_secret(&self, name: &str, audit: AuditEvent) -> Result<Option<i64>, StoreError>;
    /// Marks a version revoked outside a rotation (a credential deactivated by hand or in an
    /// emergency, for providers that cannot create a replacement).
    fn revoke_version(&self, name: &str, secret_id: &str, version: i64, audit: AuditEvent) -> Result<(), StoreError>;
}
