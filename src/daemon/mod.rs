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
use std::path::{Path, PathBuf};
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

/// The agent, admin and broker sockets and the brokers' loopback listeners, bound once and
/// kept while the daemon's services stop and start again (a new config on SIGHUP, a change of
/// leader): a connection that arrives meanwhile waits in the kernel's queue and is answered by
/// the next run, instead of being refused.
#[derive(Debug)]
pub struct Sockets {
    agent: std::os::unix::net::UnixListener,
    admin: std::os::unix::net::UnixListener,
    /// The broker socket, with `[brokers]`.
    broker: Option<std::os::unix::net::UnixListener>,
    /// The brokers' `listen` addresses, each with what its listener keeps across reloads.
    loopback: Vec<(std::net::TcpListener, broker_api::Attestation)>,
    bound_for: Bound,
    /// The signal listener and its address, held while the daemon leads (see
    /// [`Sockets::signal_listener`]).
    signals: std::sync::Mutex<Option<(String, std::net::TcpListener)>>,
}

/// What in the config decides the sockets: a config that changes any of it binds them anew.
#[derive(Debug, PartialEq, Eq)]
struct Bound {
    agent: PathBuf,
    agent_mode: u32,
    admin: PathBuf,
    /// Whether admin uids were set (which decides the admin socket's mode).
    admin_open: bool,
    /// The broker socket, when `[brokers]` are configured.
    broker: Option<PathBuf>,
    loopback: Vec<String>,
}

impl Bound {
    fn of(config: &Config) -> Bound {
        let agent = &config.agent;
        Bound {
            agent: agent.socket.clone(),
            agent_mode: agent.socket_mode,
            admin: agent.admin_socket.clone(),
            admin_open: !agent.admin_uids.is_empty(),
            broker: (!config.brokers.is_empty()).then(|| agent.broker_socket.clone()),
            loopback: config
                .brokers
                .values()
                .filter_map(|b| b.listen.clone())
                .collect(),
        }
    }

    /// Removes the socket files.
    fn remove(&self) {
        for path in [Some(&self.admin), Some(&self.agent), self.broker.as_ref()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One run's listeners on the [`Sockets`].
struct Listeners {
    agent: tokio::net::UnixListener,
    admin: tokio::net::UnixListener,
    broker: Option<tokio::net::UnixListener>,
    loopback: Vec<broker_api::LoopbackListener>,
}

impl Sockets {
    /// Binds them all (a conflict with another daemon fails here, before any work is done). The
    /// agent socket first: a directory it creates is 0755 so agents can reach it; the admin
    /// socket's own mode (0600 unless admin_uids are set) protects it even in a shared
    /// directory. On an error, the socket files it made are removed.
    pub fn bind(config: &Config) -> Result<Sockets, ServeError> {
        // The socket files this call made, removed again if a later one fails (never one it
        // found in use: that is another daemon's).
        let mut made = Vec::new();
        let bound = Self::bind_all(config, Bound::of(config), &mut made);
        if bound.is_err() {
            for path in made {
                let _ = std::fs::remove_file(path);
            }
        }
        bound
    }

    fn bind_all(
        config: &Config,
        bound_for: Bound,
        made: &mut Vec<PathBuf>,
    ) -> Result<Sockets, ServeError> {
        let mut unix = |path: &Path, mode: u32, dir_mode: u32| {
            let listener = http::bind_socket(path, mode, dir_mode)?;
            made.push(path.to_path_buf());
            listener.into_std().map_err(|source| SocketError::Io {
                what: "cannot keep the socket",
                path: path.to_path_buf(),
                source,
            })
        };
        let agent = &config.agent;
        let agent_listener = unix(&agent.socket, agent.socket_mode, 0o755)?;
        // With admin_uids the socket must be reachable by them: the API's uid check is the gate.
        let (admin_mode, admin_dir_mode) = if agent.admin_uids.is_empty() {
            (0o600, 0o700)
        } else {
            (0o666, 0o711)
        };
        let admin_listener = unix(&agent.admin_socket, admin_mode, admin_dir_mode)?;
        let broker = match &bound_for.broker {
            Some(path) => Some(unix(path, agent.socket_mode, 0o755)?),
            None => None,
        };
        let loopback = bound_for
            .loopback
            .iter()
            .map(|address| {
                std::net::TcpListener::bind(address)
                    .map(|l| (l, broker_api::Attestation::default()))
                    .map_err(|source| ServeError::Listen {
                        address: address.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Sockets {
            agent: agent_listener,
            admin: admin_listener,
            broker,
            loopback,
            bound_for,
            signals: std::sync::Mutex::new(None),
        })
    }

    /// Whether they are the sockets `config` asks for (else unbind and bind anew).
    pub fn fit(&self, config: &Config) -> bool {
        self.bound_for == Bound::of(config)
    }

    /// Listeners for one run, on the same sockets (the sockets stay open when a run ends).
    fn listeners(&self) -> Result<Listeners, ServeError> {
        let again = |source, path: &Path| SocketError::Io {
            what: "cannot listen again on",
            path: path.to_path_buf(),
            source,
        };
        let unix = |l: &std::os::unix::net::UnixListener, path: &Path| {
            l.try_clone()
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(l)
                })
                .map_err(|e| again(e, path))
        };
        let broker = match (&self.broker, &self.bound_for.broker) {
            (Some(l), Some(path)) => Some(unix(l, path)?),
            _ => None,
        };
        let loopback = self
            .loopback
            .iter()
            .zip(&self.bound_for.loopback)
            .map(|((l, attestation), address)| {
                l.try_clone()
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(l)
                    })
                    .map(|l| broker_api::LoopbackListener::new(l, attestation.clone()))
                    .map_err(|source| ServeError::Listen {
                        address: address.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Listeners {
            agent: unix(&self.agent, &self.bound_for.agent)?,
            admin: unix(&self.admin, &self.bound_for.admin)?,
            broker,
            loopback,
        })
    }

    /// The signal listener for one run in `mode`. While the daemon leads it stays open from run
    /// to run, so a detector's signal sent during a reload waits in the backlog for the next
    /// run instead of being refused; it is bound anew when `[signals] listen` changes, and
    /// closed while the daemon follows (a follower does not listen for signals: a detector is
    /// refused at once and can go to the leader).
    fn signal_listener(
        &self,
        config: &Config,
        mode: Mode,
    ) -> Result<Option<tokio::net::TcpListener>, ServeError> {
        let mut held = self.signals.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = config.signals.listen.as_ref();
        let Some(address) = wanted.filter(|_| mode != Mode::Follower) else {
            *held = None;
            return Ok(None);
        };
        let listen_error = |source| ServeError::Listen {
            address: address.clone(),
            source,
        };
        if held.as_ref().is_none_or(|(bound, _)| bound != address) {
            // The old address is freed first: the new one may be the same port elsewhere.
            *held = None;
            let listener = std::net::TcpListener::bind(address).map_err(listen_error)?;
            *held = Some((address.clone(), listener));
        }
        let (_, listener) = held.as_ref().expect("bound above");
        listener
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map(Some)
            .map_err(listen_error)
    }

    /// Removes their files (the sockets close when this is dropped).
    pub fn remove(&self) {
        self.bound_for.remove();
    }

    /// Removes their files and closes the TCP listeners, so that binding for a new config can
    /// take the same paths and addresses.
    pub fn release(&mut self) {
        self.remove();
        self.loopback.clear();
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

/// [`serve`] on sockets bound by the caller, which it leaves bound, until `end`
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
    let listeners = sockets.listeners()?;
    let signal_listener = sockets.signal_listener(config, mode)?;
    let runtime = Runtime::start(config, vault.clone(), Clock::System, mode).await?;
    let store_path = vault.store().path().to_path_buf();
    // The broker process stops before the runtime (its last reports become audit rows).
    let (broker_stop, broker_stopping) = watch::channel(false);
    let brokers = match brokers::start(
        config,
        (
            &vault,
            runtime.leases.as_ref().expect("daemon mode has leases"),
        ),
        &work_dir(config, &store_path),
        broker_stopping,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            runtime.stop(config.daemon.shutdown_timeout).await;
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
        listeners,
    )
    .await
    {
        Ok(servers) => servers,
        Err(e) => {
            runtime.stop(config.daemon.shutdown_timeout).await;
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
    if let Some((brokers, keeper)) = brokers {
        // Requests in flight through the broker process are answered (within a bound), and
        // what it reported is read, before the audit writer stops.
        brokers.finish().await;
        let _ = broker_stop.send(true);
        let _ = keeper.await;
        brokers.reports_read().await;
    }
    tracing::info!("stopping: finishing or parking steps in flight");
    runtime.stop(config.daemon.shutdown_timeout).await;
    let _ = flusher.await;
    let _ = trimmer.await;
    flush(services.vault.store()).await;
    tracing::info!("stopped");
    Ok(())
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
    listeners: Listeners,
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
    let signals = start_signals(config, services).await?;
    if let Some(listener) = signal_listener {
        servers.push(serve_signals(
            listener,
            config,
            &signals,
            &rejections,
            closing.clone(),
        )?);
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
        listeners.agent,
        agent_api,
        limits.clone(),
        closing.clone(),
    )));
    servers.extend(brokers::serve(
        config,
        services,
        (listeners.broker, listeners.loopback),
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
        listeners.admin,
        admin_api,
        admin_limits,
        closing,
    )));
    Ok(servers)
}

/// What handles compromise signals, leak reports, canaries and anomalies this run, and the
/// alerts they raise.
async fn start_signals(config: &Config, services: &Services) -> Result<Arc<Signals>, ServeError> {
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
    Ok(Signals::new(
        services.engine.clone(),
        services.incidents.clone(),
        alerts,
        services.metrics.clone(),
        SignalsSettings::from(signal_cfg),
    )
    .await?)
}

/// Serves the signal listener (over TLS when `[signals] tls` is set) until `closing` says why.
fn serve_signals(
    listener: tokio::net::TcpListener,
    config: &Config,
    signals: &Arc<Signals>,
    rejections: &Arc<Rejections>,
    closing: watch::Receiver<Option<RunEnd>>,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    tracing::info!(address = ?listener.local_addr().ok(), "listening for signals");
    let api = Arc::new(SignalApi {
        signals: signals.clone(),
        rejections: rejections.clone(),
    });
    let limits = http::Limits {
        max_body_bytes: 1 << 20,
        ..http::Limits::default()
    };
    Ok(match &config.signals.tls {
        Some(tls) => {
            let listener =
                http::TlsListener::new(listener, &tls.cert, &tls.key).map_err(ServeError::Tls)?;
            tokio::spawn(http::serve(listener, api, limits, closing))
        }
        None => tokio::spawn(http::serve(listener, api, limits, closing)),
    })
}
