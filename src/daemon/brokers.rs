//! Starting the brokers when `[brokers]` are configured: `keywarden-broker` (pinned and
//! confined), the budgets and blocks as the audit log left them, and the broker socket and
//! each broker's loopback listener.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::StartError;
use crate::broker::keys::KeyPusher;
use crate::broker::process::{BrokerProcess, BrokerSpec};
use crate::broker::{Brokers, Enforced};
use crate::broker_api::{self, BrokerApi, LoopbackListener};
use crate::clock::Millis;
use crate::config::Config;
use crate::incident::signals::Signals;
use crate::leases::Leases;
use crate::policy::Policy;
use crate::rejections::Rejections;
use crate::sandbox::Role;
use crate::services::{RunEnd, Services};
use crate::vault::Vault;

/// The executable the daemon runs as the broker: `[daemon] broker`, else `keywarden-broker`
/// beside this program.
fn program(config: &Config) -> PathBuf {
    config.daemon.broker.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|exe| exe.with_file_name("keywarden-broker"))
            .unwrap_or_else(|_| PathBuf::from("/usr/lib/keywarden/keywarden-broker"))
    })
}

/// Starts the broker process with its routes' keys (read from `vault`, their versions held in
/// `leases` while the broker may use them) and restores budgets and blocks, or `None` without
/// `[brokers]`.
pub(super) async fn start(
    config: &Config,
    (vault, leases): (&Arc<Vault>, &Arc<Leases>),
    work: &Path,
    stop: watch::Receiver<bool>,
) -> Result<Option<(Arc<Brokers>, JoinHandle<()>)>, StartError> {
    if config.brokers.is_empty() {
        return Ok(None);
    }
    let store = vault.store();
    let brokers = config.compile_brokers()?;
    let program = program(config);
    let sha256 = match &config.daemon.broker_sha256 {
        Some(pin) => pin.clone(),
        None => crate::crypto::file_sha256(&program).map_err(|e| {
            config.invalid_daemon("broker", format!("cannot read {}: {e}", program.display()))
        })?,
    };
    let confinement = config
        .daemon
        .broker_sandbox
        .resolve(&config.daemon.plugin_user, Role::Plugin)
        .map_err(|e| config.invalid_daemon("broker_sandbox", e.to_string()))?;
    let keys = Arc::new(KeyPusher::new(
        vault.clone(),
        leases.clone(),
        brokers
            .values()
            .flat_map(|b| b.secrets().map(str::to_string))
            .collect(),
    ));
    let enforced = Arc::new(Enforced::new(store.blocked_brokers().await?));
    let now = crate::clock::now_millis();
    let (day, minute): (Millis, Millis) = (now - now % 86_400_000, now - now % 60_000);
    enforced
        .budgets
        .restore(&store.broker_spending(day, minute).await?, now);
    let spec = BrokerSpec {
        program,
        sha256,
        confinement,
        dir: work.join("broker"),
        routes: crate::broker::routes_of(
            &brokers,
            (config.agent.header_timeout, body_timeout(config)),
        ),
        keys: keys.clone(),
        enforced: enforced.clone(),
    };
    // Watched before the first keys are read, so no change in between is missed.
    let versions = store.watch_versions().ok_or_else(|| {
        config.invalid_daemon(
            "broker",
            "this store does not tell of new versions in this process".to_string(),
        )
    })?;
    // Reports wait here while the broker API is busy; the process then waits to send more.
    let (reports, reported) = tokio::sync::mpsc::channel(1024);
    let (process, keeper) = BrokerProcess::start(spec, versions, reports, stop)
        .await
        .map_err(|e| config.invalid_daemon("broker", e.to_string()))?;
    let brokers = Brokers::new(brokers, (process, keys), enforced, reported);
    Ok(Some((Arc::new(brokers), keeper)))
}

/// Time an agent has to send a brokered request's body: `[agent] body_timeout`, at least a
/// minute (prompts can be large).
fn body_timeout(config: &Config) -> std::time::Duration {
    config
        .agent
        .body_timeout
        .max(std::time::Duration::from_secs(60))
}

/// Serves the broker API on the socket and the loopback listeners until `stop` (nothing
/// without `[brokers]`).
pub(super) fn serve(
    config: &Config,
    services: &Services,
    (socket, listeners): (Option<tokio::net::UnixListener>, Vec<LoopbackListener>),
    refused_uids: HashSet<u32>,
    rejections: Arc<Rejections>,
    signals: Arc<Signals>,
    stop: watch::Receiver<Option<RunEnd>>,
) -> Vec<JoinHandle<()>> {
    let Some(brokers) = services.brokers.clone() else {
        return Vec::new();
    };
    let agent = &config.agent;
    let api = Arc::new(BrokerApi::new(
        (services.clone(), brokers.clone()),
        config.policy.iter().map(Policy::compile).collect(),
        refused_uids,
        (rejections, signals),
        (agent.max_connections, agent.max_connections_per_uid),
    ));
    // Ends once the last broker process of this run is gone (after the run's stop).
    let reader = api.clone();
    brokers.read_reports(|reports| reader.read_reports(reports));
    let mut servers = vec![tokio::spawn(refuse_while_unrecorded(
        brokers.clone(),
        services.audit_writer.backlog(),
        stop.clone(),
    ))];
    if let Some(socket) = socket {
        servers.push(tokio::spawn(broker_api::serve(
            socket,
            api.clone(),
            stop.clone(),
        )));
    }
    for listener in listeners {
        tracing::info!(address = ?listener.local_addr().ok(), "broker listening");
        servers.push(tokio::spawn(broker_api::serve(
            listener,
            api.clone(),
            stop.clone(),
        )));
    }
    servers
}

/// Tells the broker process to refuse new requests (503) while rows of brokered requests wait
/// for a store that refuses them, and to take them again once they are written: what is served
/// unrecorded stays bounded by what was in flight. Ends at `stop`.
async fn refuse_while_unrecorded(
    brokers: Arc<Brokers>,
    mut backlog: watch::Receiver<bool>,
    mut stop: watch::Receiver<Option<RunEnd>>,
) {
    loop {
        let waiting = *backlog.borrow_and_update();
        if brokers.enforced.set_audit_backlog(waiting) {
            if waiting {
                tracing::error!(
                    "brokered requests are refused until the audit log takes their rows"
                );
            } else {
                tracing::info!("the audit log took the brokered requests' rows: they resume");
            }
            if let Err(e) = brokers.process.push_state().await {
                tracing::warn!(error = %e, "the broker process could not be told");
            }
        }
        tokio::select! {
            changed = backlog.changed() => if changed.is_err() { return },
            _ = stop.wait_for(Option::is_some) => return,
        }
    }
}
