//! All of keywarden's cryptography, and the only module that calls `ring` or `argon2`.
//!
//! - [`SymmetricKey`]: a 256-bit AES-256-GCM key that seals values and wraps other keys.
//!   Every sealed blob is `nonce (12 bytes) || ciphertext || tag (16 bytes)`, with a random nonce.
//! - [`derive_key_encryption_key`]: Argon2id from the passphrase to the key that wraps the root key.
//! - [`FingerprintKey`]: HMAC-SHA256 over a value, so a value can be recognised (a leaked token,
//!   an audit reference) without being stored.
//! - [`sha256`], [`random_bytes`]: the digest and randomness everything else uses.
//!
//! Failures to open collapse into one opaque [`CryptoError::DecryptionFailed`]: the caller says
//! *what* failed to open; this module never says *why*, so there is no oracle.

use std::fmt;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Length in bytes of every symmetric key keywarden uses.
pub const KEY_LEN: usize = 32;
/// Length in bytes of a SHA-256 digest and of a fingerprint.
pub const DIGEST_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// The first byte of a value sealed under a subkey of its own.
const SUBKEY_FORMAT: u8 = 2;
/// Bytes of random salt per subkey.
const SUBKEY_SALT_LEN: usize = 16;

/// Errors from the crypto module. Deliberately coarse.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A sealed blob did not authenticate under the key and associated data given.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    RandomFailed,
    /// The key-derivation parameters are out of range.
    #[error("invalid key-derivation parameters: {0}")]
    InvalidKdfParams(String),
}

/// Fills a new buffer of `len` bytes from the system CSPRNG.
pub fn random_bytes(len: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut buf = Zeroizing::new(vec![0u8; len]);
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| CryptoError::RandomFailed)?;
    Ok(buf)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; DIGEST_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(digest.as_ref());
    out
}

/// An incremental SHA-256, for data that arrives in parts (files, hash chains).
pub struct Sha256(ring::digest::Context);

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256")
    }
}

impl Sha256 {
    /// Starts a new digest.
    pub fn new() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feeds `data` into the digest.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Finishes the digest.
    pub fn finish(self) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

/// HMAC-SHA256 of `data` under `key`, for authenticating messages from outside (signals, webhooks).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; DIGEST_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, data);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks an HMAC-SHA256 `tag` over `data` in constant time.
pub fn hmac_sha256_verify(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::verify(&key, data, tag).is_ok()
}

/// A 256-bit AES-256-GCM key, zeroized when dropped.
pub struct SymmetricKey(Zeroizing<[u8; KEY_LEN]>);

impl SymmetricKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(key.as_mut())
            .map_err(|_| CryptoError::RandomFailed)?;
        Ok(Self(key))
    }

    fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    fn aead_key(&self) -> LessSafeKey {
        // The key length is fixed by the type, so this cannot fail.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("32-byte key"))
    }

    /// Encrypts and authenticates `plaintext`, binding `aad` (which is not stored).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CryptoError::RandomFailed)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead_key()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::RandomFailed)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a blob made by [`SymmetricKey::seal`] with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::DecryptionFailed)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let len = self
            .aead_key()
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::DecryptionFailed)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Seals a value under a key of its own: HKDF-SHA256 of this key with a random 128-bit
    /// salt and `aad` as info, then AES-256-GCM binding `aad`. Laid out as
    /// `2 ‖ salt ‖ nonce ‖ ciphertext ‖ tag`. A data key can so seal any number of values (a
    /// credential issued per fetch) with no nonce ever reused under one key.
    pub fn seal_value(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut salt = [0u8; SUBKEY_SALT_LEN];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| CryptoError::RandomFailed)?;
        let sealed = self.subkey(&salt, aad)?.seal(aad, plaintext)?;
        let mut out = Vec::with_capacity(1 + SUBKEY_SALT_LEN + sealed.len());
        out.push(SUBKEY_FORMAT);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value made by [`SymmetricKey::seal_value`] with `aad`, or one sealed directly
    /// under this key by an earlier version of keywarden (bound to `legacy_aad`).
    pub fn open_value(
        &self,
        aad: &[u8],
        legacy_aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.first() == Some(&SUBKEY_FORMAT) && sealed.len() > 1 + SUBKEY_SALT_LEN {
            let (salt, body) = sealed[1..].split_at(SUBKEY_SALT_LEN);
            if let Ok(plain) = self.subkey(salt, aad)?.open(aad, body) {
                return Ok(plain);
            }
        }
        // A legacy blob whose random nonce happens to start with the format byte lands here.
        self.open(legacy_aad, sealed)
    }

    fn subkey(&self, salt: &[u8], info: &[u8]) -> Result<SymmetricKey, CryptoError> {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(self.0.as_ref());
        let info = [info];
        let okm = prk
            .expand(&info, ring::hkdf::HKDF_SHA256)
            .map_err(|_| CryptoError::DecryptionFailed)?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        okm.fill(key.as_mut())
            .map_err(|_| CryptoError::DecryptionFailed)?;
        Ok(Self(key))
    }

    /// Wraps (seals) another key under this one.
    pub fn wrap(&self, aad: &[u8], key: &SymmetricKey) -> Result<Vec<u8>, CryptoError> {
        self.seal(aad, key.0.as_ref())
    }

    /// Unwraps a key made by [`SymmetricKey::wrap`].
    pub fn unwrap_key(&self, aad: &[u8], wrapped: &[u8]) -> Result<SymmetricKey, CryptoError> {
        SymmetricKey::from_slice(&self.open(aad, wrapped)?)
    }

    /// Unwraps a fingerprint key made by [`SymmetricKey::wrap_fingerprint_key`].
    pub fn unwrap_fingerprint_key(
        &self,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<FingerprintKey, CryptoError> {
        let raw = self.open(aad, wrapped)?;
        if raw.len() != KEY_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        Ok(FingerprintKey(hmac::Key::new(hmac::HMAC_SHA256, &raw), raw))
    }

    /// Wraps a fingerprint key under this one.
    pub fn wrap_fingerprint_key(
        &self,
        aad: &[u8],
        key: &FingerprintKey,
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal(aad, &key.1)
    }
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey([redacted])")
    }
}

/// The key of the keyed fingerprints (HMAC-SHA256) stored beside each version.
///
/// It is its own random key, wrapped by the root key, so `rekey` does not change fingerprints.
pub struct FingerprintKey(hmac::Key, Zeroizing<Vec<u8>>);

impl FingerprintKey {
    /// A fresh random fingerprint key.
    pub fn generate() -> Result<Self, CryptoError> {
        let raw = random_bytes(KEY_LEN)?;
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, &raw), raw))
    }

    /// The fingerprint of `value`.
    pub fn fingerprint(&self, value: &[u8]) -> [u8; DIGEST_LEN] {
        let tag = hmac::sign(&self.0, value);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The key of the store's integrity MACs (audit seals, current versions), derived from this
    /// one by HKDF (not by HMAC, whose outputs are the fingerprints stored beside every version).
    pub fn integrity_key(&self) -> IntegrityKey {
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"keywarden-audit-seal")
            .extract(&self.1);
        let info = [b"v1".as_slice()];
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        prk.expand(&info, ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(key.as_mut()))
            .expect("32 bytes from HKDF-SHA256");
        IntegrityKey(hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()))
    }
}

/// MACs over what the store keeps in plaintext and a database writer would want to change:
/// the audit chain's head, and which version of a secret (under which name) is current.
#[derive(Clone)]
pub struct IntegrityKey(hmac::Key);

impl IntegrityKey {
    fn mac(&self, domain: &[u8], message: &[u8]) -> [u8; DIGEST_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(domain);
        ctx.update(&[0]);
        ctx.update(message);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// The seal of audit row `seq` whose chain hash is `hash`.
    pub fn audit_seal(&self, seq: i64, hash: &[u8]) -> [u8; DIGEST_LEN] {
        let mut message = seq.to_be_bytes().to_vec();
        message.extend_from_slice(hash);
        self.mac(b"audit-seal", &message)
    }

    /// The MAC saying that version `version` of secret `secret_id` named `name` is current.
    pub fn current_version(&self, secret_id: &str, name: &str, version: i64) -> [u8; DIGEST_LEN] {
        let message = serde_json::to_vec(&(secret_id, name, version))
            .expect("strings and an integer serialize");
        self.mac(b"current-version", &message)
    }
}

impl fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IntegrityKey([redacted])")
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey([redacted])")
    }
}

/// Argon2id cost parameters, stored beside the wrapped root key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Degree of parallelism (lanes).
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option: t=3, p=4, m=64 MiB.
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 4,
        }
    }
}

impl fmt::Display for KdfParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "argon2id m={} KiB t={} p={}",
            self.memory_kib, self.iterations, self.parallelism
        )
    }
}

/// Length of the Argon2id salt stored with the vault.
pub const SALT_LEN: usize = 16;

/// Derives the key-encryption key (which wraps the root key) from a passphrase with Argon2id.
pub fn derive_key_encryption_key(
    passphrase: &[u8],
    salt: &[u8],
    params: &KdfParams,
) -> Result<SymmetricKey, CryptoError> {
    let argon_params = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(KEY_LEN),
    )
    .map_err(|e| CryptoError::InvalidKdfParams(e.to_string()))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| CryptoError::InvalidKdfParams(e.to_string()))?;
    Ok(SymmetricKey(key))
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Parses lower- or upper-case hexadecimal.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Compares two byte strings in constant time (for their common length).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    reader_sha256(std::fs::File::open(path)?)
}

/// The SHA-256 of everything `reader` yields, as lowercase hex.
pub fn reader_sha256(mut reader: impl std::io::Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: KdfParams = KdfParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let key = SymmetricKey::generate().unwrap();
        let sealed = key.seal(b"secret-a/1", b"hello").unwrap();
        assert_eq!(&key.open(b"secret-a/1", &sealed).unwrap()[..], b"hello");
        assert!(matches!(
            key.open(b"secret-a/2", &sealed),
            Err(CryptoError::DecryptionFailed)
        ));
        let other = SymmetricKey::generate().unwrap();
        assert!(other.open(b"secret-a/1", &sealed).is_err());
    }

    #[test]
    fn values_get_a_subkey_each_and_legacy_blobs_still_open() {
        let key = SymmetricKey::generate().unwrap();
        let a = key.seal_value(b"v2/x", b"hello").unwrap();
        let b = key.seal_value(b"v2/x", b"hello").unwrap();
        assert_eq!(a[0], SUBKEY_FORMAT);
        assert_ne!(
            a[1..17],
            b[1..17],
            "a fresh salt, so a fresh key, per value"
        );
        assert_eq!(&key.open_value(b"v2/x", b"v1/x", &a).unwrap()[..], b"hello");
        assert!(
            key.open_value(b"v2/y", b"v1/x", &a).is_err(),
            "bound to its aad"
        );
        // Values sealed before subkeys open with their old binding, and only with it.
        let legacy = key.seal(b"v1/x", b"old").unwrap();
        assert_eq!(
            &key.open_value(b"v2/x", b"v1/x", &legacy).unwrap()[..],
            b"old"
        );
        assert!(key.open_value(b"v2/x", b"v1/y", &legacy).is_err());
        // A value sealed under a subkey does not open under the data key itself.
        assert!(key.open(b"v2/x", &a[17..]).is_err());
    }

    #[test]
    fn any_flipped_bit_fails_to_open() {
        let key = SymmetricKey::generate().unwrap();
        let sealed = key.seal(b"aad", b"some value").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(key.open(b"aad", &bad).is_err(), "flip at byte {i} opened");
        }
        assert!(key.open(b"aad", &sealed[..10]).is_err());
    }

    #[test]
    fn nonces_differ_between_seals() {
        let key = SymmetricKey::generate().unwrap();
        let a = key.seal(b"", b"x").unwrap();
        let b = key.seal(b"", b"x").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wrapped_keys_unwrap_only_with_their_aad() {
        let root = SymmetricKey::generate().unwrap();
        let data = SymmetricKey::generate().unwrap();
        let wrapped = root.wrap(b"dk:1", &data).unwrap();
        let unwrapped = root.unwrap_key(b"dk:1", &wrapped).unwrap();
        let sealed = data.seal(b"v", b"payload").unwrap();
        assert_eq!(&unwrapped.open(b"v", &sealed).unwrap()[..], b"payload");
        assert!(root.unwrap_key(b"dk:2", &wrapped).is_err());
    }

    #[test]
    fn kdf_is_deterministic_per_salt_and_passphrase() {
        let a = derive_key_encryption_key(b"pass", b"0123456789abcdef", &SMALL).unwrap();
        let b = derive_key_encryption_key(b"pass", b"0123456789abcdef", &SMALL).unwrap();
        let c = derive_key_encryption_key(b"pasS", b"0123456789abcdef", &SMALL).unwrap();
        let d = derive_key_encryption_key(b"pass", b"fedcba9876543210", &SMALL).unwrap();
        let sealed = a.seal(b"", b"x").unwrap();
        assert!(b.open(b"", &sealed).is_ok());
        assert!(c.open(b"", &sealed).is_err());
        assert!(d.open(b"", &sealed).is_err());
    }

    #[test]
    fn kdf_rejects_absurd_parameters() {
        let bad = KdfParams {
            memory_kib: 1,
            iterations: 1,
            parallelism: 1,
        };
        assert!(matches!(
            derive_key_encryption_key(b"p", b"0123456789abcdef", &bad),
            Err(CryptoError::InvalidKdfParams(_))
        ));
    }

    #[test]
    fn fingerprints_are_keyed() {
        let a = FingerprintKey::generate().unwrap();
        let b = FingerprintKey::generate().unwrap();
        assert_eq!(a.fingerprint(b"v"), a.fingerprint(b"v"));
        assert_ne!(a.fingerprint(b"v"), b.fingerprint(b"v"));
        assert_ne!(a.fingerprint(b"v"), a.fingerprint(b"w"));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00ABff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = SymmetricKey::generate().unwrap();
        assert_eq!(format!("{key:?}"), "SymmetricKey([redacted])");
    }
}
