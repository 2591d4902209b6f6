//! keywarden: a secrets vault and automatic key-rotation daemon.
//!
//! Where things are:
//! - [`crypto`]: every cryptographic operation (AES-256-GCM, Argon2id, HMAC, SHA-256). Nothing
//!   else calls `ring` or `argon2`.
//! - [`vault`]: the key hierarchy (passphrase → root key → data keys → values) over the store.
//! - [`store`]: persistence, one transaction per state change; SQLite today.
//! - [`audit`]: the hash-chained audit log and its verifier.
//! - [`config`]: the TOML configuration.
//! - [`passphrase`]: where the passphrase comes from.
//! - [`name`]: what a valid secret name is.
//! - [`value`]: the zeroizing, never-printed secret value type.
//! - [`hardening`]: process hardening at start (no core dumps).
//! - [`cli`]: the `keywarden` command line.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod audit;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod hardening;
pub mod name;
pub mod passphrase;
pub mod store;
pub mod value;
pub mod vault;
