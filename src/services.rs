//! What the API handlers work with: the daemon's shared components, each reached directly
//! (the store through the vault, the catalog, the leases) rather than through the engine.
//! [`crate::daemon`] builds it once; the agent and admin APIs each hold a clone.

use std::sync::Arc;

use crate::broker::Brokers;
use crate::clock::Clock;
use crate::group_commit::GroupCommit;
use crate::incident::compromise::Incidents;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::rotation::catalog::Catalog;
use crate::rotation::engine::Engine;
use crate::vault::Vault;

/// The daemon's shared components.
#[derive(Debug, Clone)]
pub struct Services {
    /// The unlocked vault (and through it the store).
    pub vault: Arc<Vault>,
    /// Providers, secrets and consumers as configured.
    pub catalog: Arc<Catalog>,
    /// The rotation engine.
    pub engine: Arc<Engine>,
    /// The lease table.
    pub leases: Arc<Leases>,
    /// The group-commit writer of lease and audit rows.
    pub audit_writer: GroupCommit,
    /// In-memory counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Compromise runs.
    pub incidents: Arc<Incidents>,
    /// Time.
    pub clock: Clock,
    /// The brokers, when `[brokers]` are configured.
    pub brokers: Option<Arc<Brokers>>,
    /// This daemon follows another on a shared PostgreSQL store: it serves fetches and reads,
    /// and refuses what only the leader does (rotations, incidents, writes through the admin
    /// API).
    pub follower: bool,
}

/// Why a run of the services ends: the daemon stops, or it starts them again at once (a
/// reloaded config, a change of leadership on PostgreSQL) on the same sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The daemon exits.
    Stop,
    /// The next run takes over the sockets as soon as this one has stopped.
    Restart,
}

/// Resolves with why the run ends once `closing` says it does ([`RunEnd::Stop`] if its sender
/// is gone).
pub async fn run_ended(closing: &mut tokio::sync::watch::Receiver<Option<RunEnd>>) -> RunEnd {
    match closing.wait_for(Option::is_some).await {
        Ok(end) => end.unwrap_or(RunEnd::Stop),
        Err(_) => RunEnd::Stop,
    }
}
