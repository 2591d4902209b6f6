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
//! - [`rotation`]: the rotation engine (journaled state machine) and the scheduler.
//! - [`plugin_host`]: runs plugin processes and speaks protocol v1 to them.
//! - [`provider`], [`consumer`], [`generate`]: where values come from and where they go.
//! - [`agent_api`]: the agent socket (fetch, watch, leases); [`attest`]: who the peer is;
//!   [`policy`]: who may fetch what; [`leases`]: lease lifetimes; [`group_commit`]: batched
//!   audit and lease writes.
//! - [`daemon`]: `serve` wiring; [`admin`]: the admin API; [`metrics`]: `/metrics`;
//!   [`http`]: HTTP over Unix sockets.
//! - [`status`]: what `list` and `status` report; [`clock`]: time, pausable in tests.
//! - [`scan`]: what a credential harvester would find on this host (`keywarden scan`).
//! - [`cli`]: the `keywarden` command line.

// `unsafe` is denied everywhere; `sys` holds the only (audited) calls that need it.
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations)]

/// A point where the crash tests stop the process: with the `failpoints` feature (test builds
/// only) and `FAILPOINTS=NAME=return`, the process aborts here at once, as `kill -9` would stop
/// it. Without the feature it is nothing at all.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        (|| {
            fail::fail_point!($name, |_| std::process::abort());
        })();
    };
}

pub mod admin;
pub mod agent_api;
pub mod attest;
pub mod audit;
pub mod audit_archive;
pub mod backup;
pub mod broker;
pub mod broker_api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod crypto;
pub mod daemon;
pub mod generate;
pub mod group_commit;
pub mod hardening;
pub mod http;
pub mod incident;
pub mod leases;
pub mod metrics;
pub mod name;
pub mod parse;
pub mod passphrase;
pub mod plugin_host;
pub mod policy;
pub mod provider;
pub mod rejections;
pub mod rotation;
pub mod sandbox;
pub mod scan;
pub mod services;
pub mod status;
pub mod store;
pub mod sys;
pub mod value;
pub mod vault;
