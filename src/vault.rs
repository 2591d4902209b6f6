//! The vault: the key hierarchy on top of the store.
//!
//! ```text
//! passphrase ──Argon2id──► key-encryption key ──wraps──► root key ──wraps──► data key (per secret)
//!                                                          │                   └─seals─► each version
//!                                                          └─wraps──► fingerprint key (HMAC)
//! ```
//!
//! Associated data binds every wrapped key and sealed value to its place: a data key to its
//! secret's id, a value to its secret's id and version number. A ciphertext copied to another row
//! or version therefore fails to open, and the failure is reported as an integrity error naming
//! the secret, while every other secret still opens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::crypto::{self, CryptoError, FingerprintKey, IntegrityKey, KdfParams, SymmetricKey};
use crate::name::{self, InvalidName};
use crate::store::{
    Location, NewSecret, NewVersion, RewrappedKey, SealedMaterial, SealedSecret, SecretRecord,
    Stage, Store, StoreError, VaultHeader, VersionTarget,
};
use crate::value::SecretValue;

const ROOT_KEY_AAD: &[u8] = b"keywarden/root-key";
/// The fingerprint key's wrapping says the store keeps current-version MACs: a database writer
/// cannot turn that off (it would have to rewrap the key under the root key).
const FINGERPRINT_KEY_AAD: &[u8] = b"keywarden/fingerprint-key/current-macs";
/// How stores made before current-version MACs wrap it.
const LEGACY_FINGERPRINT_KEY_AAD: &[u8] = b"keywarden/fingerprint-key";
const CONFLICT_RETRIES: usize = 5;

fn data_key_aad(secret_id: &str) -> Vec<u8> {
    format!("keywarden/data-key/{secret_id}").into_bytes()
}

/// What a version's value was bound to before values had subkeys (still opened).
fn legacy_value_aad(secret_id: &str, version: i64) -> Vec<u8> {
    format!("keywarden/value/{secret_id}/{version}").into_bytes()
}

/// A version's value is bound to its secret, its number and its `meta`: a database writer who
/// swaps `meta` (to aim a revoke at another key id) makes the value fail to open.
fn value_aad(secret_id: &str, version: i64, meta: &Meta) -> Vec<u8> {
    format!(
        "keywarden/value-v2/{secret_id}/{version}/{}",
        canonical_meta(meta)
    )
    .into_bytes()
}

/// `meta` as JSON with its top-level keys sorted.
fn canonical_meta(meta: &Meta) -> String {
    let sorted: std::collections::BTreeMap<&String, &serde_json::Value> = meta.iter().collect();
    serde_json::to_string(&sorted).expect("meta serializes")
}

fn legacy_bound_aad(secret_id: &str, context: &Bound<'_>) -> Vec<u8> {
    match context {
        Bound::Proposed(rotation_id) => format!("keywarden/proposed/{secret_id}/{rotation_id}"),
        Bound::Issued(lease_id) => format!("keywarden/issued/{secret_id}/{lease_id}"),
    }
    .into_bytes()
}

/// A value sealed outside the versions table is bound to its rotation or lease and `meta`.
fn bound_aad(secret_id: &str, context: &Bound<'_>, meta: &Meta) -> Vec<u8> {
    let mut aad = b"v2/".to_vec();
    aad.extend(legacy_bound_aad(secret_id, context));
    aad.extend(b"/");
    aad.extend(canonical_meta(meta).into_bytes());
    aad
}

/// Everything in `material`, opened with the old data key and sealed under the new one.
fn reseal(
    name: &str,
    secret_id: &str,
    old: &SymmetricKey,
    new: &SymmetricKey,
    material: SealedMaterial,
) -> Result<SealedMaterial, VaultError> {
    let integrity = |version: Option<i64>| VaultError::Integrity {
        name: name.to_string(),
        version,
    };
    let mut out = SealedMaterial::default();
    for (version, ciphertext, meta) in material.versions {
        let aad = value_aad(secret_id, version, &meta);
        let plain = old
            .open_value(&aad, &legacy_value_aad(secret_id, version), &ciphertext)
            .map_err(|_| integrity(Some(version)))?;
        out.versions
            .push((version, new.seal_value(&aad, &plain)?, meta));
    }
    let empty = Meta::new();
    for (rotation_id, sealed) in material.proposed {
        let context = Bound::Proposed(&rotation_id);
        let aad = bound_aad(secret_id, &context, &empty);
        let plain = old
            .open_value(&aad, &legacy_bound_aad(secret_id, &context), &sealed)
            .map_err(|_| integrity(None))?;
        let sealed = new.seal_value(&aad, &plain)?;
        out.proposed.push((rotation_id, sealed));
    }
    for (lease_id, sealed, meta) in material.issued {
        let context = Bound::Issued(&lease_id);
        let aad = bound_aad(secret_id, &context, &meta);
        let plain = old
            .open_value(&aad, &legacy_bound_aad(secret_id, &context), &sealed)
            .map_err(|_| integrity(None))?;
        let sealed = new.seal_value(&aad, &plain)?;
        out.issued.push((lease_id, sealed, meta));
    }
    Ok(out)
}

/// What a value sealed outside the versions table is bound to.
#[derive(Debug, Clone, Copy)]
pub enum Bound<'a> {
    /// A rotation's proposed value, by rotation id.
    Proposed(&'a str),
    /// A credential issued for one lease, by lease id.
    Issued(&'a str),
}

/// Non-secret facts stored in plaintext beside a version.
pub type Meta = serde_json::Map<String, serde_json::Value>;

/// A passphrase, zeroized when dropped.
pub type Passphrase = Zeroizing<String>;

/// Errors from the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The passphrase does not unwrap the root key.
    #[error(
        "wrong passphrase for the store at {path} (or its key record is damaged); nothing was changed"
    )]
    WrongPassphrase {
        /// The store.
        path: String,
    },
    /// A wrapped key or sealed value failed to authenticate.
    #[error(
        "integrity check failed for secret {name:?}{}: its ciphertext does not authenticate \
         (edited, or moved from another secret or version); other secrets are unaffected",
        version.map(|v| format!(" version {v}")).unwrap_or_default()
    )]
    Integrity {
        /// The secret.
        name: String,
        /// The version, when the value (not the data key) failed.
        version: Option<i64>,
    },
    /// The vault's own key record failed to authenticate after the passphrase matched.
    #[error("the store's key record is damaged: {0}")]
    DamagedHeader(&'static str),
    /// No secret by that name.
    #[error("no secret named {0:?}")]
    NoSuchSecret(String),
    /// The secret exists but not that version.
    #[error("secret {name:?} has no version {version}")]
    NoSuchVersion {
        /// The secret.
        name: String,
        /// The version asked for.
        version: i64,
    },
    /// The secret exists but has no current version yet.
    #[error("secret {0:?} has no current version yet")]
    NoCurrentVersion(String),
    /// A stored value is not UTF-8 (values are strings by protocol).
    #[error("secret {0:?} holds a value that is not UTF-8")]
    NotUtf8(String),
    /// The passphrase is unusable.
    #[error("{0}")]
    BadPassphrase(&'static str),
    /// The name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Crypto failed for a reason other than authentication (randomness, KDF parameters).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// A decrypted version.
#[derive(Debug, Clone)]
pub struct Revealed {
    /// The secret's name.
    pub name: String,
    /// The secret's id.
    pub secret_id: String,
    /// The version number.
    pub version: i64,
    /// The version's stage.
    pub stage: Stage,
    /// The value.
    pub value: SecretValue,
    /// Non-secret facts.
    pub meta: Meta,
    /// Keyed fingerprint of the value.
    pub fingerprint: Vec<u8>,
}

impl Revealed {
    /// A short fingerprint for audit rows and logs.
    pub fn short_fingerprint(&self) -> String {
        short_fingerprint(&self.fingerprint)
    }
}

/// The first 8 bytes of a fingerprint, as hex: enough to tell versions apart in a log.
pub fn short_fingerprint(fingerprint: &[u8]) -> String {
    crypto::hex(&fingerprint[..fingerprint.len().min(8)])
}

/// The keys a `rekey` keeps.
struct Keyring {
    fingerprint: FingerprintKey,
    /// Derived from the fingerprint key: audit seals and current-version MACs.
    integrity: IntegrityKey,
    /// Whether this store keeps current-version MACs (a missing one is then tampering).
    current_macs: bool,
}

/// The root key, which wraps every data key, and its generation: `rekey` replaces both.
struct RootKey {
    key: SymmetricKey,
    generation: i64,
    /// Data keys unwrapped under this root, by secret id, with the wrapped form they came from
    /// (a data key rewrapped or replaced no longer matches). Holds nothing the root key does
    /// not already open; goes with it when `rekey` replaces it.
    data_keys: std::sync::Mutex<HashMap<String, UnwrappedKey>>,
}

/// A data key as wrapped in the store, and unwrapped.
type UnwrappedKey = (Vec<u8>, Arc<SymmetricKey>);

/// Unwrapped data keys kept at most (one per secret; more are unwrapped again as needed).
const DATA_KEYS_KEPT: usize = 100_000;

impl RootKey {
    fn new(key: SymmetricKey, generation: i64) -> RootKey {
        RootKey {
            key,
            generation,
            data_keys: Default::default(),
        }
    }
}

/// An unlocked vault.
pub struct Vault {
    store: Store,
    keys: Keyring,
    /// Read-held while values are sealed or opened (and, for a seal, until it is committed);
    /// write-held by `rekey` while it replaces the keys, so nothing sealed under a key it
    /// replaces is committed after it, and nothing is opened with a key it just replaced.
    root: tokio::sync::RwLock<RootKey>,
}

/// The vault's keys in use: hold it from reading a secret's record to committing what was
/// sealed under its data key (or to opening a value). A `rekey` waits for every holder and
/// keeps new ones out until it is done. Never take a second one while holding one: a waiting
/// `rekey` would block it forever.
pub struct KeysInUse<'a>(tokio::sync::RwLockReadGuard<'a, RootKey>);

impl std::fmt::Debug for KeysInUse<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysInUse")
            .field("generation", &self.0.generation)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

async fn derive_kek(
    passphrase: &Passphrase,
    salt: &[u8],
    params: KdfParams,
) -> Result<SymmetricKey, VaultError> {
    let passphrase = passphrase.clone();
    let salt = salt.to_vec();
    // Argon2id takes a noticeable fraction of a second by design: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        crypto::derive_key_encryption_key(passphrase.as_bytes(), &salt, &params)
    })
    .await
    .expect("the key derivation task panicked")
    .map_err(VaultError::from)
}

fn check_new_passphrase(passphrase: &Passphrase) -> Result<(), VaultError> {
    if passphrase.is_empty() {
        return Err(VaultError::BadPassphrase(
            "the passphrase must not be empty",
        ));
    }
    if passphrase.chars().count() < 12 {
        tracing::warn!("the passphrase is shorter than 12 characters; consider a longer one");
    }
    Ok(())
}

impl Vault {
    /// Creates a store at `path` with a new random root key wrapped under `passphrase`.
    pub async fn init(
        path: &Path,
        passphrase: &Passphrase,
        kdf: KdfParams,
        actor: &str,
    ) -> Result<Vault, VaultError> {
        Vault::init_at(&Location::File(path.to_path_buf()), passphrase, kdf, actor).await
    }

    /// Creates a store at `location` (a file or a PostgreSQL database) with a new random root
    /// key wrapped under `passphrase`.
    pub async fn init_at(
        location: &Location,
        passphrase: &Passphrase,
        kdf: KdfParams,
        actor: &str,
    ) -> Result<Vault, VaultError> {
        check_new_passphrase(passphrase)?;
        let salt = crypto::random_bytes(crypto::SALT_LEN)?;
        let kek = derive_kek(passphrase, &salt, kdf).await?;
        let fingerprint = FingerprintKey::generate()?;
        let integrity = fingerprint.integrity_key();
        let keys = Keyring {
            fingerprint,
            integrity,
            current_macs: true,
        };
        let root = RootKey::new(SymmetricKey::generate()?, 1);
        let header = VaultHeader {
            kdf,
            salt: salt.to_vec(),
            wrapped_root_key: kek.wrap(ROOT_KEY_AAD, &root.key)?,
            wrapped_fingerprint_key: root
                .key
                .wrap_fingerprint_key(FINGERPRINT_KEY_AAD, &keys.fingerprint)?,
            root_generation: root.generation,
        };
        let audit = AuditEvent::new(actor, "vault.init").detail(json!({ "kdf": kdf.to_string() }));
        let store = Store::create_at(location, &header, audit).await?;
        store.set_integrity_key(keys.integrity.clone());
        Ok(Vault {
            store,
            keys,
            root: tokio::sync::RwLock::new(root),
        })
    }

    /// Unlocks an opened store with `passphrase`.
    pub async fn unlock(store: Store, passphrase: &Passphrase) -> Result<Vault, VaultError> {
        let header = store.header().await?;
        let kek = derive_kek(passphrase, &header.salt, header.kdf).await?;
        let root = kek
            .unwrap_key(ROOT_KEY_AAD, &header.wrapped_root_key)
            .map_err(|_| VaultError::WrongPassphrase {
                path: store.path().display().to_string(),
            })?;
        let wrapped = &header.wrapped_fingerprint_key;
        let (fingerprint, mut current_macs) =
            match root.unwrap_fingerprint_key(FINGERPRINT_KEY_AAD, wrapped) {
                Ok(key) => (key, true),
                Err(_) => (
                    root.unwrap_fingerprint_key(LEGACY_FINGERPRINT_KEY_AAD, wrapped)
                        .map_err(|_| {
                            VaultError::DamagedHeader("the fingerprint key does not authenticate")
                        })?,
                    false,
                ),
            };
        let integrity = fingerprint.integrity_key();
        // From here on every audit row this process appends is sealed, and every new current
        // version MACed, with the vault's key.
        store.set_integrity_key(integrity.clone());
        if !current_macs {
            // A store from before current-version MACs: record them once, now, if this process
            // may write (a read-only one leaves it to the next writer).
            let rewrapped = root.wrap_fingerprint_key(FINGERPRINT_KEY_AAD, &fingerprint)?;
            match store.install_current_macs(&integrity, &rewrapped).await {
                Ok(n) => {
                    tracing::info!(secrets = n, "recorded current-version MACs");
                    current_macs = true;
                }
                Err(e) => tracing::debug!(error = %e, "current-version MACs not recorded yet"),
            }
        }
        Ok(Vault {
            store,
            keys: Keyring {
                fingerprint,
                integrity,
                current_macs,
            },
            root: tokio::sync::RwLock::new(RootKey::new(root, header.root_generation)),
        })
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The keys, held until what is sealed under them is committed (see [`KeysInUse`]).
    pub async fn keys_in_use(&self) -> KeysInUse<'_> {
        KeysInUse(self.root.read().await)
    }

    /// The keyed fingerprint of a value.
    pub fn fingerprint(&self, value: &[u8]) -> [u8; crypto::DIGEST_LEN] {
        self.keys.fingerprint.fingerprint(value)
    }

    /// Whether the store's MAC says `sealed` is the current version of the secret `name`.
    fn current_is_authentic(&self, name: &str, sealed: &SealedSecret) -> bool {
        match &sealed.current_mac {
            Some(mac) => {
                let expected = self.keys.integrity.current_version(
                    &sealed.secret_id,
                    name,
                    sealed.version.version,
                );
                crypto::constant_time_eq(&expected, mac)
            }
            None => !self.keys.current_macs,
        }
    }

    /// Removes the audit rows up to `through_seq` (already written to an archive; the row
    /// must still have `hash`), anchoring the chain there under this vault's seal.
    pub async fn archive_audit(
        &self,
        through_seq: i64,
        hash: &[u8],
        event: AuditEvent,
    ) -> Result<(), VaultError> {
        self.store
            .archive_audit(&self.keys.integrity, through_seq, hash, event)
            .await?;
        Ok(())
    }

    /// Whether `mac` is this vault's seal of row `seq` with hash `hash` (constant time).
    pub fn audit_seal_holds(&self, seq: i64, hash: &[u8], mac: &[u8]) -> bool {
        let expected = self.keys.integrity.audit_seal(seq, hash);
        crypto::constant_time_eq(&expected, mac)
    }

    /// The data key `wrapped` holds, unwrapped under `root` (once per wrapped form).
    fn data_key(
        root: &RootKey,
        name: &str,
        secret_id: &str,
        wrapped: &[u8],
    ) -> Result<Arc<SymmetricKey>, VaultError> {
        let lock = || root.data_keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, key)) = lock().get(secret_id) {
            if seen[..] == *wrapped {
                return Ok(key.clone());
            }
        }
        let key = root
            .key
            .unwrap_key(&data_key_aad(secret_id), wrapped)
            .map(Arc::new)
            .map_err(|_| VaultError::Integrity {
                name: name.to_string(),
                version: None,
            })?;
        let mut kept = lock();
        if kept.len() >= DATA_KEYS_KEPT {
            kept.clear();
        }
        kept.insert(secret_id.to_string(), (wrapped.to_vec(), key.clone()));
        Ok(key)
    }

    /// Stores `value` as a new current version of `name` (creating the secret, provider
    /// `provider`, if it does not exist). Returns the new version number.
    pub async fn put(
        &self,
        name: &str,
        provider: &str,
        value: &SecretValue,
        meta: Meta,
        actor: &str,
    ) -> Result<i64, VaultError> {
        name::validate(name)?;
        let fingerprint = self.fingerprint(value.expose().as_bytes());
        let root = self.root.read().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (target, data_key, version) = match self.store.secret(name).await? {
                Some(secret) => {
                    let key = Self::data_key(&root, name, &secret.id, &secret.wrapped_data_key)?;
                    let next = secret.latest_version.unwrap_or(0) + 1;
                    let target = VersionTarget::Existing {
                        secret_id: secret.id,
                        expected_latest: secret.latest_version,
                    };
                    (target, key, next)
                }
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    let key = SymmetricKey::generate()?;
                    let wrapped = root.key.wrap(&data_key_aad(&id), &key)?;
                    let target = VersionTarget::New(NewSecret {
                        id,
                        name: name.to_string(),
                        provider: provider.to_string(),
                        wrapped_data_key: wrapped,
                        tags: Vec::new(),
                    });
                    (target, Arc::new(key), 1)
                }
            };
            let secret_id = match &target {
                VersionTarget::New(s) => s.id.as_str(),
                VersionTarget::Existing { secret_id, .. } => secret_id.as_str(),
            };
            let new_version = NewVersion {
                version,
                ciphertext: data_key.seal_value(
                    &value_aad(secret_id, version, &meta),
                    value.expose().as_bytes(),
                )?,
                meta: meta.clone(),
                fingerprint: fingerprint.to_vec(),
            };
            let audit = AuditEvent::new(actor, "secret.put")
                .secret(name)
                .detail(json!({
                    "version": version,
                    "fingerprint": short_fingerprint(&fingerprint),
                    "meta_keys": meta.keys().collect::<Vec<_>>(),
                }));
            match self
                .store
                .put_version(name, root.generation, &target, &new_version, audit)
                .await
            {
                Err(StoreError::Conflict(_)) if attempt < CONFLICT_RETRIES => continue,
                other => {
                    other?;
                    return Ok(version);
                }
            }
        }
    }

    /// Decrypts the current version of `name` (or `version`), without writing an audit row.
    /// Callers that reveal the value to someone audit it themselves; see [`Vault::get`].
    pub async fn read(&self, name: &str, version: Option<i64>) -> Result<Revealed, VaultError> {
        name::validate(name)?;
        let root = self.root.read().await;
        let Some(sealed) = self.store.sealed(name, version).await? else {
            return Err(self.missing(name, version).await);
        };
        self.open_sealed(&root, name, &sealed)
    }

    /// Decrypts a version fetched from the store.
    fn open_sealed(
        &self,
        root: &RootKey,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<Revealed, VaultError> {
        let key = Self::data_key(root, name, &sealed.secret_id, &sealed.wrapped_data_key)?;
        let v = &sealed.version;
        if v.stage == Stage::Current && !self.current_is_authentic(name, sealed) {
            // An old version made current again, or two secrets' names swapped, in the file.
            return Err(VaultError::Integrity {
                name: name.to_string(),
                version: Some(v.version),
            });
        }
        let plain = key
            .open_value(
                &value_aad(&sealed.secret_id, v.version, &v.meta),
                &legacy_value_aad(&sealed.secret_id, v.version),
                &v.ciphertext,
            )
            .map_err(|_| VaultError::Integrity {
                name: name.to_string(),
                version: Some(v.version),
            })?;
        let value =
            SecretValue::from_utf8(plain).map_err(|_| VaultError::NotUtf8(name.to_string()))?;
        Ok(Revealed {
            name: name.to_string(),
            secret_id: sealed.secret_id.clone(),
            version: v.version,
            stage: v.stage,
            value,
            meta: v.meta.clone(),
            fingerprint: v.fingerprint.clone(),
        })
    }

    async fn missing(&self, name: &str, version: Option<i64>) -> VaultError {
        match self.store.secret(name).await {
            Ok(None) => VaultError::NoSuchSecret(name.to_string()),
            Ok(Some(_)) => match version {
                Some(version) => VaultError::NoSuchVersion {
                    name: name.to_string(),
                    version,
                },
                None => VaultError::NoCurrentVersion(name.to_string()),
            },
            Err(e) => e.into(),
        }
    }

    /// Decrypts a version for `actor` and records that in the audit chain before returning it.
    pub async fn get(
        &self,
        name: &str,
        version: Option<i64>,
        actor: &str,
    ) -> Result<Revealed, VaultError> {
        let revealed = self.read(name, version).await?;
        let audit = AuditEvent::new(actor, "secret.get")
            .secret(name)
            .detail(json!({
                "version": revealed.version,
                "fingerprint": revealed.short_fingerprint(),
            }));
        self.store.append_audit(&[audit]).await?;
        Ok(revealed)
    }

    /// Deletes a secret and destroys its data key. Returns how many versions became unreadable.
    pub async fn remove(&self, name: &str, actor: &str) -> Result<i64, VaultError> {
        name::validate(name)?;
        let audit = AuditEvent::new(actor, "secret.remove").secret(name);
        self.store
            .remove_secret(name, audit)
            .await?
            .ok_or_else(|| VaultError::NoSuchSecret(name.to_string()))
    }

    /// For each value, the stored versions it is a copy of (secret, version, stage), by keyed
    /// fingerprint: no value is decrypted or kept.
    pub async fn copies_of(
        &self,
        values: &[&str],
    ) -> Result<Vec<Vec<(String, i64, crate::store::Stage)>>, VaultError> {
        let mut found = Vec::with_capacity(values.len());
        for value in values {
            let fingerprint = self.fingerprint(value.as_bytes());
            found.push(self.store.versions_by_fingerprint(&fingerprint).await?);
        }
        Ok(found)
    }

    /// Fails with [`VaultError::WrongPassphrase`] unless `passphrase` opens this store.
    pub async fn check_passphrase(&self, passphrase: &Passphrase) -> Result<(), VaultError> {
        let header = self.store.header().await?;
        derive_kek(passphrase, &header.salt, header.kdf)
            .await?
            .unwrap_key(ROOT_KEY_AAD, &header.wrapped_root_key)
            .map_err(|_| VaultError::WrongPassphrase {
                path: self.store.path().display().to_string(),
            })?;
        Ok(())
    }

    /// Wraps the root key under a new passphrase (and the configured KDF parameters).
    pub async fn change_passphrase(
        &self,
        new_passphrase: &Passphrase,
        kdf: KdfParams,
        actor: &str,
    ) -> Result<(), VaultError> {
        check_new_passphrase(new_passphrase)?;
        let mut header = self.store.header().await?;
        let salt = crypto::random_bytes(crypto::SALT_LEN)?;
        let kek = derive_kek(new_passphrase, &salt, kdf).await?;
        header.kdf = kdf;
        header.salt = salt.to_vec();
        let root = self.root.read().await;
        header.wrapped_root_key = kek.wrap(ROOT_KEY_AAD, &root.key)?;
        header.root_generation = root.generation;
        let audit =
            AuditEvent::new(actor, "vault.passwd").detail(json!({ "kdf": kdf.to_string() }));
        self.store.replace_root_wrapping(&header, audit).await?;
        Ok(())
    }

    /// Replaces the root key with a new random one and rewraps every data key and the
    /// fingerprint key under it, in one transaction. With `data_keys`, every data key is
    /// replaced too and everything sealed under it (versions, proposed values, issued
    /// credentials) re-encrypted, so an old backup and the old passphrase open nothing stored
    /// from now on. Returns the number of data keys installed.
    ///
    /// It waits for every value being sealed or opened (see [`KeysInUse`]) and holds new ones
    /// back until it is done, so a running daemon can rekey while it serves.
    pub async fn rekey(
        &self,
        passphrase: &Passphrase,
        actor: &str,
        data_keys: bool,
    ) -> Result<usize, VaultError> {
        self.check_passphrase(passphrase).await?;
        let old_header = self.store.header().await?;
        let salt = crypto::random_bytes(crypto::SALT_LEN)?;
        let kek = derive_kek(passphrase, &salt, old_header.kdf).await?;
        let mut root = self.root.write().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let new_root = SymmetricKey::generate()?;
            let mut rewrapped = Vec::new();
            let mut resealed_values = 0;
            for (secret_id, name, wrapped) in self.store.all_data_keys().await? {
                let aad = data_key_aad(&secret_id);
                let key = Self::data_key(&root, &name, &secret_id, &wrapped)?;
                let (key, resealed) = if data_keys {
                    let new_key = SymmetricKey::generate()?;
                    let material = self.store.sealed_material(&secret_id).await?;
                    let material = reseal(&name, &secret_id, &key, &new_key, material)?;
                    resealed_values +=
                        material.versions.len() + material.proposed.len() + material.issued.len();
                    (Arc::new(new_key), Some(material))
                } else {
                    (key, None)
                };
                rewrapped.push(RewrappedKey {
                    wrapped_data_key: new_root.wrap(&aad, &key)?,
                    secret_id,
                    resealed,
                });
            }
            let header = VaultHeader {
                kdf: old_header.kdf,
                salt: salt.to_vec(),
                wrapped_root_key: kek.wrap(ROOT_KEY_AAD, &new_root)?,
                wrapped_fingerprint_key: new_root
                    .wrap_fingerprint_key(FINGERPRINT_KEY_AAD, &self.keys.fingerprint)?,
                root_generation: root.generation + 1,
            };
            let audit = AuditEvent::new(actor, "vault.rekey").detail(json!({
                "data_keys": rewrapped.len(),
                "data_keys_replaced": data_keys,
                "values_resealed": resealed_values,
                "root_generation": header.root_generation,
            }));
            match self
                .store
                .rekey(root.generation, &header, &rewrapped, audit)
                .await
            {
                Err(StoreError::Conflict(_)) if attempt < CONFLICT_RETRIES => continue,
                Err(e) => return Err(e.into()),
                Ok(()) => {
                    *root = RootKey::new(new_root, header.root_generation);
                    return Ok(rewrapped.len());
                }
            }
        }
    }

    /// Opens every value the store holds sealed — each version, proposed value and issued
    /// credential of each secret — and checks each current version's MAC; fails naming the
    /// first that does not open. Returns (secrets, values) checked.
    pub async fn check_every_value(&self) -> Result<(usize, usize), VaultError> {
        let secrets = self.store.all_data_keys().await?;
        let mut values = 0;
        {
            let root = self.root.read().await;
            for (secret_id, name, wrapped) in &secrets {
                let key = Self::data_key(&root, name, secret_id, wrapped)?;
                let material = self.store.sealed_material(secret_id).await?;
                values += material.versions.len() + material.proposed.len() + material.issued.len();
                // Opening each is the check; what it seals again is dropped.
                reseal(name, secret_id, &key, &key, material)?;
            }
        }
        for (_, name, _) in &secrets {
            match self.read(name, None).await {
                Ok(_) | Err(VaultError::NoCurrentVersion(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((secrets.len(), values))
    }

    /// Makes sure each declared secret (name, provider, tags) exists with this provider and
    /// tags, creating it with a new data key where needed, all in one transaction. Returns how
    /// many secrets were created or changed.
    pub async fn register(
        &self,
        secrets: &[(&str, &str, &[String])],
        actor: &str,
    ) -> Result<usize, VaultError> {
        let root = self.root.read().await;
        let mut rows = Vec::with_capacity(secrets.len());
        for &(name, provider, tags) in secrets {
            name::validate(name)?;
            let id = uuid::Uuid::new_v4().to_string();
            let key = SymmetricKey::generate()?;
            let secret = NewSecret {
                wrapped_data_key: root.key.wrap(&data_key_aad(&id), &key)?,
                id,
                name: name.to_string(),
                provider: provider.to_string(),
                tags: tags.to_vec(),
            };
            let audit = AuditEvent::new(actor, "secret.register")
                .secret(name)
                .detail(json!({ "provider": provider, "tags": tags }));
            rows.push((secret, audit));
        }
        Ok(self.store.register_secrets(root.generation, rows).await?)
    }

    /// Seals a value that is not a version (a rotation's proposed value, a credential issued
    /// for a lease) under the secret's data key, bound to its rotation or lease and to `meta`
    /// (an issued credential's, kept beside it in plaintext).
    pub fn seal_bound(
        &self,
        keys: &KeysInUse<'_>,
        secret: &SecretRecord,
        context: Bound<'_>,
        value: &SecretValue,
        meta: &Meta,
    ) -> Result<Vec<u8>, VaultError> {
        let key = Self::data_key(&keys.0, &secret.name, &secret.id, &secret.wrapped_data_key)?;
        Ok(key.seal_value(
            &bound_aad(&secret.id, &context, meta),
            value.expose().as_bytes(),
        )?)
    }

    /// Opens a value sealed by [`Vault::seal_bound`] with the same context and `meta`.
    pub fn open_bound(
        &self,
        keys: &KeysInUse<'_>,
        secret: &SecretRecord,
        context: Bound<'_>,
        sealed: &[u8],
        meta: &Meta,
    ) -> Result<SecretValue, VaultError> {
        let key = Self::data_key(&keys.0, &secret.name, &secret.id, &secret.wrapped_data_key)?;
        let integrity = || VaultError::Integrity {
            name: secret.name.clone(),
            version: None,
        };
        let plain = key
            .open_value(
                &bound_aad(&secret.id, &context, meta),
                &legacy_bound_aad(&secret.id, &context),
                sealed,
            )
            .map_err(|_| integrity())?;
        SecretValue::from_utf8(plain).map_err(|_| integrity())
    }

    /// Seals `value` as version `version` of `secret`, with its fingerprint.
    pub fn seal_version(
        &self,
        keys: &KeysInUse<'_>,
        secret: &SecretRecord,
        version: i64,
        value: &SecretValue,
        meta: Meta,
    ) -> Result<NewVersion, VaultError> {
        let key = Self::data_key(&keys.0, &secret.name, &secret.id, &secret.wrapped_data_key)?;
        Ok(NewVersion {
            version,
            ciphertext: key.seal_value(
                &value_aad(&secret.id, version, &meta),
                value.expose().as_bytes(),
            )?,
            meta,
            fingerprint: self.fingerprint(value.expose().as_bytes()).to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Access;
    use std::time::Duration;

    /// Argon2id at its cheapest: these tests are about the key hierarchy, not the KDF.
    const TEST_KDF: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    #[tokio::test]
    async fn a_store_from_before_current_macs_is_upgraded_at_unlock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.db");
        let passphrase = Zeroizing::new("a passphrase for this test".to_string());
        let kdf = TEST_KDF;
        let vault = Vault::init(&path, &passphrase, kdf, "test").await.unwrap();
        let value = SecretValue::new("v1".into());
        vault
            .put("s", "manual", &value, Meta::new(), "test")
            .await
            .unwrap();
        // As an older keywarden left it: the legacy wrapping, no MACs.
        let legacy = vault
            .root
            .read()
            .await
            .key
            .wrap_fingerprint_key(LEGACY_FINGERPRINT_KEY_AAD, &vault.keys.fingerprint)
            .unwrap();
        drop(vault);
        let hex: String = legacy.iter().map(|b| format!("{b:02x}")).collect();
        let sql = format!(
            "UPDATE secrets SET current_mac = NULL; \
             UPDATE vault SET wrapped_fingerprint_key = X'{hex}';"
        );
        let ok = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg(sql)
            .status()
            .unwrap();
        assert!(ok.success());

        let store = Store::open(&path, Access::Shared).await.unwrap();
        let vault = Vault::unlock(store, &passphrase).await.unwrap();
        assert!(vault.keys.current_macs, "upgraded");
        assert_eq!(vault.read("s", None).await.unwrap().value.expose(), "v1");
        let sealed = vault.store().sealed("s", None).await.unwrap().unwrap();
        assert!(sealed.current_mac.is_some());
        drop(vault);
        // From now on a missing MAC is tampering.
        let store = Store::open(&path, Access::Shared).await.unwrap();
        let vault = Vault::unlock(store, &passphrase).await.unwrap();
        assert!(vault.keys.current_macs);
    }

    #[tokio::test]
    async fn registering_declared_secrets_writes_only_what_changed_with_one_audit_row_each() {
        let dir = tempfile::tempdir().unwrap();
        let passphrase = Zeroizing::new("a passphrase for this test".to_string());
        let kdf = TEST_KDF;
        let vault = Vault::init(&dir.path().join("vault.db"), &passphrase, kdf, "test")
            .await
            .unwrap();
        let (none, prod) = (Vec::new(), vec!["prod".to_string()]);
        let declared = [
            ("a", "random", &none[..]),
            ("b", "random", &none[..]),
            ("c", "manual", &prod[..]),
        ];
        assert_eq!(vault.register(&declared, "daemon").await.unwrap(), 3);
        assert_eq!(vault.register(&declared, "daemon").await.unwrap(), 0);
        let changed = [("a", "random", &prod[..]), ("b", "random", &none[..])];
        assert_eq!(vault.register(&changed, "daemon").await.unwrap(), 1);

        let store = vault.store();
        let secrets = store.list().await.unwrap();
        let tags: Vec<(&str, &[String])> = secrets
            .iter()
            .map(|s| (s.name.as_str(), &s.tags[..]))
            .collect();
        assert_eq!(tags, [("a", &prod[..]), ("b", &none[..]), ("c", &prod[..])]);
        let registered: Vec<String> = store
            .audit_tail(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.action == "secret.register")
            .filter_map(|r| r.secret)
            .collect();
        assert_eq!(registered.len(), 4, "{registered:?}");
        // A bad name in the batch writes nothing of it.
        let bad = [("d", "random", &none[..]), ("../e", "random", &none[..])];
        assert!(vault.register(&bad, "daemon").await.is_err());
        assert_eq!(store.list().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_rekey_waits_for_a_value_being_sealed_so_it_is_resealed_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let passphrase = Zeroizing::new("a passphrase for this test".to_string());
        let kdf = TEST_KDF;
        let vault = std::sync::Arc::new(
            Vault::init(&dir.path().join("vault.db"), &passphrase, kdf, "test")
                .await
                .unwrap(),
        );
        vault
            .put(
                "s",
                "manual",
                &SecretValue::new("v1".into()),
                Meta::new(),
                "t",
            )
            .await
            .unwrap();
        // A rotation seals version 2 under the secret's data key ...
        let keys = vault.keys_in_use().await;
        let secret = vault.store().secret("s").await.unwrap().unwrap();
        let sealed = vault
            .seal_version(
                &keys,
                &secret,
                2,
                &SecretValue::new("v2".into()),
                Meta::new(),
            )
            .unwrap();
        // ... while a rekey that replaces every data key starts: it must not finish before
        // that version is committed, or the version would stay sealed under a dropped key.
        let mut rekey = tokio::spawn({
            let (vault, passphrase) = (vault.clone(), passphrase.clone());
            async move { vault.rekey(&passphrase, "test", true).await }
        });
        let early = tokio::time::timeout(Duration::from_secs(2), &mut rekey).await;
        assert!(
            early.is_err(),
            "the rekey did not wait for the seal in flight"
        );
        let generation = keys.0.generation;
        let target = crate::store::VersionTarget::Existing {
            secret_id: secret.id.clone(),
            expected_latest: Some(1),
        };
        vault
            .store()
            .put_version(
                "s",
                generation,
                &target,
                &sealed,
                AuditEvent::new("t", "secret.put"),
            )
            .await
            .unwrap();
        drop(keys);
        rekey.await.unwrap().unwrap();
        assert_eq!(vault.read("s", Some(1)).await.unwrap().value.expose(), "v1");
        assert_eq!(vault.read("s", None).await.unwrap().value.expose(), "v2");
    }
}
