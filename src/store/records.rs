//! The rows keywarden keeps, as typed records: what the store's operations take and return.

use std::sync::Arc;

use crate::clock::Millis;
use crate::crypto::KdfParams;
use crate::store::journal::{Reason, RotationState};

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

stored_enum! {
    /// Where a version stands in its secret's life.
    pub enum Stage ("version stage") {
        /// Created by a rotation, not yet served.
        Pending = "pending",
        /// The version fetches receive.
        Current = "current",
        /// The version before current, still valid while it drains.
        Previous = "previous",
        /// No longer valid; kept for audit and leak matching.
        Revoked = "revoked",
    }
}

stored_enum! {
    /// Where a credential issued for a lease stands upstream.
    pub enum UpstreamState ("upstream state") {
        /// Valid upstream; revoked when its lease ends.
        Live = "live",
        /// Its lease ended; the upstream revocation has not succeeded yet.
        RevokePending = "revoke-pending",
        /// Revoked upstream.
        Revoked = "revoked",
    }
}

stored_enum! {
    /// Why a lease ended.
    pub enum LeaseEnd ("lease end") {
        /// Its time ran out.
        Expired = "expired",
        /// Its holder deleted it.
        Deleted = "deleted",
        /// Revoked (a compromise run).
        Revoked = "revoked",
    }
}

stored_enum! {
    /// What started a compromise run.
    pub enum Trigger ("incident trigger") {
        /// `keywarden rotate-all` without a daemon.
        Cli = "cli",
        /// The admin API (the CLI against a running daemon).
        Admin = "admin",
        /// A signed signal from an outside detector.
        Signal = "signal",
        /// A leaked value matched by fingerprint.
        Leak = "leak",
        /// A canary secret was fetched.
        Canary = "canary",
        /// An access anomaly.
        Anomaly = "anomaly",
    }
}

stored_enum! {
    /// What an alert is about.
    pub enum AlertKind ("alert kind") {
        /// A signal from an outside detector.
        Signal = "signal",
        /// A leaked value matched by fingerprint.
        Leak = "leak",
        /// A canary secret was fetched.
        Canary = "canary",
        /// An access anomaly.
        Anomaly = "anomaly",
    }
}

impl From<AlertKind> for Trigger {
    fn from(kind: AlertKind) -> Trigger {
        match kind {
            AlertKind::Signal => Trigger::Signal,
            AlertKind::Leak => Trigger::Leak,
            AlertKind::Canary => Trigger::Canary,
            AlertKind::Anomaly => Trigger::Anomaly,
        }
    }
}

/// Which secrets a compromise run covers. Explicit names are always in scope; tags and
/// providers filter the rest (both must match when both are given). Nothing given (or `all`)
/// means everything. Stored with its incident as JSON, in canonical order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// Everything.
    #[serde(default)]
    pub all: bool,
    /// These secrets.
    #[serde(default)]
    pub names: Vec<String>,
    /// Secrets with any of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Secrets of any of these provider kinds.
    #[serde(default)]
    pub providers: Vec<String>,
}

impl Scope {
    /// Everything.
    pub fn everything() -> Scope {
        Scope {
            all: true,
            ..Scope::default()
        }
    }

    /// One secret.
    pub fn secret(name: &str) -> Scope {
        Scope {
            names: vec![name.to_string()],
            ..Scope::default()
        }
    }

    /// These secrets.
    pub fn names(names: &[String]) -> Scope {
        Scope {
            names: names.to_vec(),
            ..Scope::default()
        }
    }

    /// Whether a secret is in scope.
    pub fn covers(&self, name: &str, tags: &[String], provider: &str) -> bool {
        if self.names.iter().any(|n| n == name) {
            return true;
        }
        let filtered = !self.tags.is_empty() || !self.providers.is_empty();
        if !filtered {
            return self.all || self.names.is_empty();
        }
        (self.tags.is_empty() || tags.iter().any(|t| self.tags.contains(t)))
            && (self.providers.is_empty() || self.providers.iter().any(|p| p == provider))
    }

    /// The same scope with its lists sorted (how it is stored and compared).
    pub fn canonical(&self) -> Scope {
        let mut s = self.clone();
        s.names.sort();
        s.tags.sort();
        s.providers.sort();
        s
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
    /// The integrity MAC naming the secret's current version (absent in stores not yet
    /// upgraded, and when no process with the key wrote it).
    pub current_mac: Option<Vec<u8>>,
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
    /// The error of the rotation under way (its step is being tried again), else the last
    /// failed rotation's.
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
    pub reason: Reason,
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
    pub reason: Reason,
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

/// What start-up compares the config with: a stored secret's name, provider, tags and current
/// version.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The secret's name.
    pub name: String,
    /// Its provider kind.
    pub provider: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its current version, if it has one.
    pub version: Option<i64>,
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
    /// For issued credentials: where the credential stands upstream.
    pub upstream_state: Option<UpstreamState>,
}

/// A change to the lease table, applied in a batch with audit rows.
#[derive(Debug, Clone)]
pub enum LeaseOp {
    /// A new lease.
    Insert(Arc<LeaseRow>),
    /// A repeated fetch by the lease's holder of the lease's version: one more fetch counted
    /// on the lease (durably, before the value is handed out), its expiry moved to at least
    /// `expires_at`. Folded into the audit chain later by [`LeaseOp::FoldFetches`].
    Extend {
        /// Lease id.
        id: String,
        /// The expiry the fetch asked for (the lease keeps a later one).
        expires_at: Millis,
        /// Fetches to count (several in one batch are merged).
        fetches: u32,
    },
    /// Appends a `fetch.repeated` audit row for every lease with fetches the chain does not
    /// count yet, and marks them counted, in the same transaction.
    FoldFetches,
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
        /// Why.
        reason: LeaseEnd,
        /// For issued credentials: the upstream state now.
        upstream_state: Option<UpstreamState>,
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
    /// Which secrets it covers.
    pub scope: Scope,
    /// Whether old versions and leases were revoked without grace.
    pub assume_compromise: bool,
    /// What started it.
    pub trigger: Trigger,
    /// Leases it revoked.
    pub leases_revoked: i64,
    /// Who closed it by hand, if someone did (it is then never resumed).
    pub closed_by: Option<String>,
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
    /// What it is about.
    pub kind: AlertKind,
    /// The secret concerned.
    pub secret: Option<String>,
    /// What happened.
    pub message: String,
    /// The incident it started, if any.
    pub incident_id: Option<String>,
    /// When and by whom it was acknowledged, if it was.
    pub acked: Option<(Millis, String)>,
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
    /// When the data key itself is new: everything sealed under the old one, sealed anew.
    pub resealed: Option<SealedMaterial>,
}

/// Everything sealed under one secret's data key.
#[derive(Debug, Clone, Default)]
pub struct SealedMaterial {
    /// Versions: (version, ciphertext, meta).
    pub versions: Vec<(i64, Vec<u8>, serde_json::Map<String, serde_json::Value>)>,
    /// Proposed values of rotations: (rotation id, sealed value).
    pub proposed: Vec<(String, Vec<u8>)>,
    /// Credentials issued for leases: (lease id, sealed value, meta).
    pub issued: Vec<(String, Vec<u8>, serde_json::Map<String, serde_json::Value>)>,
}
