//! The daemon's wiring: what `keywarden serve` runs, in one place.
//!
//! [`serve`] binds the sockets, starts the [`Runtime`] (plugins, engine, leases, scheduler,
//! compromise runs), serves the agent and admin APIs and the signal listener until its
//! `shutdown` future resolves, then stops everything in reverse and joins every task and
//! connection. [`catalog`] resolves the config against the plugins; [`lease_backend`] connects
//! the lease table to the store and the plugins.

mod brokers;
mod catalog;
mod lease_backend;
pub mod notify;
mod runtime;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

pub use catalog::{build_catalog, confined_uids, work_dir};
pub use lease_backend::DaemonLeaseBackend;
pub use runtime::{Mode, Runtime};

use crate::admin::AdminApi;
use crate::agent_api::{AgentApi, AgentSettings};
use crate::broker_api;
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::http::{self, SocketError};
use crate::incident::alerts::Alerts;
use crate::incident::signals::{SignalApi, Signals, SignalsSettings};
use crate::plugin_host::PluginError;
use crate::policy::Policy;
use crate::rejections::Rejections;
use crate::sandbox::{Confinement, Role};
use crate::services::{RunEnd, Services};
use crate::store::StoreError;
use crate::vault::Vault;

/// Errors starting the daemon's components.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config refers to something that does not exist.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin could not be started.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Two plugins serve the same kind.
    #[error("kind {kind:?} is served by both plugin {first} and plugin {second}")]
    DuplicateKind {
        /// The kind.
        kind: String,
        /// One plugin.
        first: String,
        /// The other.
        second: String,
    },
    /// The store failed during registration.
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A first rotation could not be planned.
    #[error(transparent)]
    Engine(#[from] crate::rotation::engine::EngineError),
    /// An unfinished compromise run could not be resumed.
    #[error(transparent)]
    Compromise(#[from] crate::incident::compromise::CompromiseError),
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The signal listener could not listen.
    #[error("cannot listen for signals on {address}: {source}")]
    Listen {
        /// The configured address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The signal listener's TLS certificate or key is unusable.
    #[error("[signals] tls: {0}")]
    Tls(http::TlsError),
    /// The store failed while the APIs were being set up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServeError {
    /// Whether the services could not start because the store cannot be reached or written
    /// for now (its database refuses connections, its disk is full): worth another try, unlike
    /// a bad config.
    pub fn store_unavailable(&self) -> bool {
        use crate::incident::compromise::CompromiseError;
        use crate::rotation::engine::EngineError;
        use crate::vault::VaultError;
        match self {
            ServeError::Store(e)
            | ServeError::Start(StartError::Store(e))
            | ServeError::Start(StartError::Vault(VaultError::Store(e)))
            | ServeError::Start(StartError::Engine(EngineError::Store(e)))
            | ServeError::Start(StartError::Engine(EngineError::Vault(VaultError::Store(e))))
            | ServeError::Start(StartError::Compromise(CompromiseError::Store(e))) => {
                e.is_unavailable()
            }
            _ => false,
        }
    }
}

/// The agent and admin sockets, bound once and kept while the daemon's services stop and
/// start again on a new config (SIGHUP): a connection that arrives meanwhile waits in the
/// kernel's queue and is answered by the next run, instead of being refused.
#[derive(Debug)]
pub struct Sockets {
    agent: std::os::unix::net::UnixListener,
    admin: std::os::unix::net::UnixListener,
    /// The config they were bound for: agent path and mode, admin path, whether admin uids
    /// were set (which decides the admin socket's mode).
    bound_for: (PathBuf, u32, PathBuf, bool),
}

impl Sockets {
    /// Binds both (a conflict with another daemon fails here, before any work is done). The
    /// agent socket first: a directory it creates is 0755 so agents can reach it; the admin
    /// socket's own mode (0600 unless admin_uids are set) protects it even in a shared
    /// directory.
    pub fn bind(config: &Config) -> Result<Sockets, ServeError> {
        let agent = &config.agent;
        let agent_listener = http::bind_socket(&agent.socket, agent.socket_mode, 0o755)?;
        // With admin_uids the socket must be reachable by them: the API's uid check is the gate.
        let (admin_mode, admin_dir_mode) = if agent.admin_uids.is_empty() {
            (0o600, 0o700)
        } else {
            (0o666, 0o711)
        };
        let admin_listener =
            match http::bind_socket(&agent.admin_socket, admin_mode, admin_dir_mode) {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(&agent.socket);
                    return Err(e.into());
                }
            };
        let sockets = (agent_listener.into_std(), admin_listener.into_std());
        match sockets {
            (Ok(agent_l), Ok(admin_l)) => Ok(Sockets {
                agent: agent_l,
                admin: admin_l,
                bound_for: Self::key(config),
            }),
            (Err(source), _) | (_, Err(source)) => {
                let _ = std::fs::remove_file(&agent.socket);
                let _ = std::fs::remove_file(&agent.admin_socket);
                Err(SocketError::Io {
                    what: "cannot keep the socket",
                    path: agent.socket.clone(),
                    source,
                }
                .into())
            }
        }
    }

    fn key(config: &Config) -> (PathBuf, u32, PathBuf, bool) {
        let agent = &config.agent;
        (
            agent.socket.clone(),
            agent.socket_mode,
            agent.admin_socket.clone(),
            agent.admin_uids.is_empty(),
        )
    }

    /// Whether they are the sockets `config` asks for (else unbind and bind anew).
    pub fn fit(&self, config: &Config) -> bool {
        self.bound_for == Self::key(config)
    }

    /// Listeners for one run, on the same sockets (the sockets stay open when a run ends).
    fn listeners(
        &self,
    ) -> Result<(tokio::net::UnixListener, tokio::net::UnixListener), SocketError> {
        let run = |l: &std::os::unix::net::UnixListener, path: &PathBuf| {
            l.try_clone()
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(l)
                })
                .map_err(|source| SocketError::Io {
                    what: "cannot listen again on",
                    path: path.clone(),
                    source,
                })
        };
        Ok((
            run(&self.agent, &self.bound_for.0)?,
            run(&self.admin, &self.bound_for.2)?,
        ))
    }

    /// Removes their files (the sockets close when this is dropped).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.bound_for.2);
        let _ = std::fs::remove_file(&self.bound_for.0);
    }
}

/// Runs the daemon on an unlocked `vault` until `shutdown` resolves; then stops the scheduler,
/// lets steps and requests in flight finish (bounded by `[daemon] shutdown_timeout`), commits
/// what is queued, stops the plugins and removes the sockets.
pub async fn serve(
    config: &Config,
    vault: Arc<Vault>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let sockets = Sockets::bind(config)?;
    let stop = async {
        shutdown.await;
        RunEnd::Stop
    };
    let served = serve_on(config, vault, &sockets, Mode::Daemon, stop).await;
    sockets.remove();
    served
}

/// [`serve`] on agent and admin sockets bound by the caller, which it leaves bound, until `end`
/// says why this run ends; `mode` is [`Mode::Daemon`], or [`Mode::Follower`] on a PostgreSQL
/// store another daemon leads (no scheduler, no rotations, no signal listener; the admin API
/// only answers reads).
///
/// The servers stop before the services they call: a request in flight, or arriving on a
/// connection already accepted, is answered by this run; connections made meanwhile wait in
/// the sockets' backlog for the next run (or are refused once the daemon has stopped).
pub async fn serve_on(
    config: &Config,
    vault: Arc<Vault>,
    sockets: &Sockets,
    mode: Mode,
    end: impl Future<Output = RunEnd>,
) -> Result<(), ServeError> {
    let agent = &config.agent;
    let (agent_listener, admin_listener) = sockets.listeners()?;
    let remove_broker_socket = || {
        if !config.brokers.is_empty() {
            let _ = std::fs::remove_file(&agent.broker_socket);
        }
    };
    let (broker_listeners, signal_listener) = match bind_per_run(config, mode).await {
        Ok(listeners) => listeners,
        Err(e) => {
            remove_broker_socket();
            return Err(e);
        }
    };
    let runtime = match Runtime::start(config, vault.clone(), Clock::System, mode).await {
        Ok(r) => r,
        Err(e) => {
            remove_broker_socket();
            return Err(e.into());
        }
    };
    let store_path = vault.store().path().to_path_buf();
    let brokers = match brokers::start(
        config,
        vault.store(),
        &work_dir(config, &store_path),
        runtime.shutdown_signal(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            runtime.stop(config.daemon.shutdown_timeout).await;
            remove_broker_socket();
            return Err(e.into());
        }
    };
    let services = Services {
        vault,
        catalog: runtime.engine.catalog().clone(),
        engine: runtime.engine.clone(),
        leases: runtime.leases.clone().expect("daemon mode has leases"),
        audit_writer: runtime
            .audit_writer
            .clone()
            .expect("daemon mode has a writer"),
        metrics: runtime.metrics.clone(),
        incidents: runtime.incidents.clone(),
        clock: Clock::System,
        brokers: brokers.as_ref().map(|(b, _)| b.clone()),
        follower: mode == Mode::Follower,
    };
    let (close, closing) = watch::channel(None);
    let rejections = Arc::new(Rejections::default());
    let flusher = tokio::spawn({
        let (rejections, store) = (rejections.clone(), services.vault.store().clone());
        let stop = runtime.shutdown_signal();
        async move { rejections.run_flusher(store, stop).await }
    });
    let servers = match start_servers(
        config,
        &services,
        (closing, rejections),
        signal_listener,
        agent_listener,
        admin_listener,
        broker_listeners,
    )
    .await
    {
        Ok(servers) => servers,
        Err(e) => {
            runtime.stop(config.daemon.shutdown_timeout).await;
            remove_broker_socket();
            return Err(e);
        }
    };
    // Start-up read every secret's rows, as does a `status` or `list` of them all: memory freed
    // after such a read goes back to the system, so what stays resident follows the number of
    // secrets, not the largest request served.
    crate::sys::release_free_memory();
    let trimmer = tokio::spawn(release_memory_periodically(runtime.shutdown_signal()));
    tracing::info!(
        store = %services.vault.store().path().display(),
        agent_socket = %agent.socket.display(),
        admin_socket = %agent.admin_socket.display(),
        secrets = config.secrets.len(),
        "keywarden is serving"
    );
    notify::ready(&format!(
        "serving {} declared secrets",
        config.secrets.len()
    ));
    let end = end.await;
    let _ = close.send(Some(end));
    for server in servers {
        let _ = server.await;
    }
    tracing::info!("stopping: finishing or parking steps in flight");
    runtime.stop(config.daemon.shutdown_timeout).await;
    let _ = flusher.await;
    if let Some((_, keeper)) = brokers {
        let _ = keeper.await;
    }
    let _ = trimmer.await;
    flush(services.vault.store()).await;
    remove_broker_socket();
    tracing::info!("stopped");
    Ok(())
}

/// What each run binds anew: the brokers' sockets and (but on a follower) the signal listener.
async fn bind_per_run(
    config: &Config,
    mode: Mode,
) -> Result<
    (
        (
            Option<tokio::net::UnixListener>,
            Vec<broker_api::LoopbackListener>,
        ),
        Option<tokio::net::TcpListener>,
    ),
    ServeError,
> {
    let brokers = brokers::bind(config).await?;
    let signals = match &config.signals.listen {
        Some(address) if mode != Mode::Follower => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::Listen {
                    address: address.clone(),
                    source,
                })?,
        ),
        _ => None,
    };
    Ok((brokers, signals))
}

/// Commits what stopped tasks queued, then (SQLite) folds the write-ahead log into the store, so
/// none is left behind and the next start opens a compact file.
async fn flush(store: &crate::store::Store) {
    if let Err(e) = store.flush_writes().await {
        tracing::warn!(error = %e, "could not commit the last queued writes");
    }
    if let Some(Err(e)) = match store.sqlite() {
        Some(file) => Some(file.truncate_wal().await),
        None => None,
    } {
        tracing::warn!(error = %e, "could not fold the write-ahead log into the store");
    }
}

/// How often the daemon hands freed heap pages back to the system.
const RELEASE_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands freed heap pages back to the system every [`RELEASE_MEMORY_EVERY`] until `stop`.
async fn release_memory_periodically(mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RELEASE_MEMORY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => crate::sys::release_free_memory(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Starts the agent and admin APIs and, when configured, the brokers' and the signal
/// listener; each stops when `closing` says why.
async fn start_servers(
    config: &Config,
    services: &Services,
    (closing, rejections): (watch::Receiver<Option<RunEnd>>, Arc<Rejections>),
    signal_listener: Option<tokio::net::TcpListener>,
    agent_listener: tokio::net::UnixListener,
    admin_listener: tokio::net::UnixListener,
    broker_listeners: (
        Option<tokio::net::UnixListener>,
        Vec<broker_api::LoopbackListener>,
    ),
) -> Result<Vec<tokio::task::JoinHandle<()>>, ServeError> {
    let agent = &config.agent;
    let limits = http::Limits {
        max_connections: agent.max_connections,
        max_connections_per_peer: agent.max_connections_per_uid,
        body_timeout: agent.body_timeout,
        header_timeout: agent.header_timeout,
        ..http::Limits::default()
    };
    let mut servers = Vec::new();
    let signal_cfg = &config.signals;
    let alert_confinement = if signal_cfg.alert_command.is_empty() {
        Confinement::default()
    } else {
        signal_cfg
            .alert_sandbox
            .resolve(&config.daemon.plugin_user, Role::Command)
            .map_err(|e| StartError::from(config.invalid_signals("alert_sandbox", e.to_string())))?
    };
    let alerts = Alerts::new(
        services.engine.clone(),
        services.metrics.clone(),
        signal_cfg.alert_command.clone(),
        alert_confinement,
        signal_cfg.alert_consumer.clone(),
    );
    let signals = Signals::new(
        services.engine.clone(),
        services.incidents.clone(),
        alerts,
        services.metrics.clone(),
        SignalsSettings::from(signal_cfg),
    )
    .await?;
    if let Some(listener) = signal_listener {
        tracing::info!(address = ?listener.local_addr().ok(), "listening for signals");
        let api = Arc::new(SignalApi {
            signals: signals.clone(),
            rejections: rejections.clone(),
        });
        let limits = http::Limits {
            max_body_bytes: 1 << 20,
            ..http::Limits::default()
        };
        let stop = closing.clone();
        servers.push(match &signal_cfg.tls {
            Some(tls) => {
                let listener = http::TlsListener::new(listener, &tls.cert, &tls.key)
                    .map_err(ServeError::Tls)?;
                tokio::spawn(http::serve(listener, api, limits, stop))
            }
            None => tokio::spawn(http::serve(listener, api, limits, stop)),
        });
    }
    // The users confined programs run as: neither socket serves them.
    let refused_uids = confined_uids(config);
    let agent_api = Arc::new(AgentApi::new(
        services.clone(),
        AgentSettings {
            policies: config.policy.iter().map(Policy::compile).collect(),
            default_ttl: agent.default_ttl,
            max_wait: agent.max_wait,
            max_fetches_per_second: agent.max_fetches_per_second,
            refused_uids: refused_uids.clone(),
            rejections: rejections.clone(),
            max_watches_per_uid: agent.max_watches_per_uid,
        },
        closing.clone(),
        Some(signals.clone()),
    ));
    servers.push(tokio::spawn(http::serve(
        agent_listener,
        agent_api,
        limits.clone(),
        closing.clone(),
    )));
    servers.extend(brokers::serve(
        config,
        services,
        broker_listeners,
        refused_uids.clone(),
        rejections.clone(),
        signals,
        closing.clone(),
    ));
    let admin_api = Arc::new(AdminApi::new(
        services.clone(),
        &agent.admin_uids,
        &refused_uids,
        rejections,
        config.store.kdf,
        closing.clone(),
    ));
    // Bodies carry values (`put`, up to 256 KiB) and what `scan` found (`copies`).
    let admin_limits = http::Limits {
        max_body_bytes: 4 << 20,
        ..limits
    };
    servers.push(tokio::spawn(http::serve(
        admin_listener,
        admin_api,
        admin_limits,
        closing,
    )));
    Ok(servers)
}
