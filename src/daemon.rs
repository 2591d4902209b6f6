//! `keywarden serve`: wires the unlocked vault, the plugins, the engine, the scheduler and the
//! sockets together, and takes them down again on SIGTERM/SIGINT.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::clock::Clock;
use crate::config::{BUILTIN_PROVIDERS, Config, ConfigError};
use crate::consumer::{Consumer, FileConsumer, resolve_id};
use crate::group_commit::GroupCommit;
use crate::incident::compromise::Incidents;
use crate::leases::{DaemonLeaseBackend, Leases};
use crate::metrics::Metrics;
use crate::plugin_host::{PluginError, PluginHost, PluginSpec, Redactor};
use crate::provider::Provider;
use crate::rotation::engine::{Catalog, Engine, EngineSettings, SecretSpec};
use crate::rotation::scheduler::{Entry, Scheduler};
use crate::store::Reason;
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

/// Where plugins get their private working directories: one directory per store, so a daemon
/// that reaps the plugins its predecessor left never touches another store's.
pub fn work_dir(config: &Config, store_path: &Path) -> PathBuf {
    let base = match &config.daemon.work_dir {
        Some(dir) => dir.clone(),
        None => store_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("plugin-work"),
    };
    let store = store_path
        .canonicalize()
        .unwrap_or_else(|_| store_path.to_path_buf());
    let digest = crate::crypto::hex(&crate::crypto::sha256(store.as_os_str().as_encoded_bytes()));
    base.join(format!("store-{}", &digest[..16]))
}

/// Starts every configured plugin (handshake included) and builds the catalog of providers,
/// secrets and consumers, checking every reference.
pub async fn build_catalog(config: &Config, store_path: &Path) -> Result<Catalog, StartError> {
    let redactor = Arc::new(Redactor::default());
    let work = work_dir(config, store_path);
    let mut catalog = Catalog::default();
    catalog.providers.insert("random".into(), Provider::Random);
    catalog.providers.insert("manual".into(), Provider::Manual);
    let mut owners: HashMap<String, String> = HashMap::new();
    for (name, plugin) in &config.plugins {
        let spec = PluginSpec {
            name: name.clone(),
            command: plugin.command.clone(),
            sha256: plugin.sha256.clone(),
            env: plugin.env.clone(),
            timeout: plugin.timeout.unwrap_or(config.daemon.plugin_timeout),
            max_concurrency: plugin.max_concurrency,
            work_dir: work.clone(),
        };
        let host = Arc::new(PluginHost::new(spec, redactor.clone()));
        let hello = host.start().await?;
        for (kind, info) in hello.kinds {
            if BUILTIN_PROVIDERS.contains(&kind.as_str()) || kind == "file" {
                return Err(config
                    .invalid(
                        "plugins",
                        name,
                        "",
                        format!("it claims the built-in kind {kind:?}"),
                    )
                    .into());
            }
            if let Some(first) = owners.insert(kind.clone(), name.clone()) {
                return Err(StartError::DuplicateKind {
                    kind,
                    first,
                    second: name.clone(),
                });
            }
            catalog.providers.insert(
                kind.clone(),
                Provider::Plugin {
                    host: host.clone(),
                    kind,
                    info,
                },
            );
        }
        catalog.plugins.push(host);
    }
    for (name, c) in &config.consumers {
        let consumer = if c.kind == "file" {
            let owner = c
                .owner
                .as_deref()
                .map(|o| resolve_id(o, "/etc/passwd"))
                .transpose()
                .map_err(|e| config.invalid("consumers", name, "owner", e))?;
            let group = c
                .group
                .as_deref()
                .map(|g| resolve_id(g, "/etc/group"))
                .transpose()
                .map_err(|e| config.invalid("consumers", name, "group", e))?;
            Consumer::File(FileConsumer {
                path: c.path.clone().expect("checked at parse"),
                mode: c.mode.unwrap_or(0o600),
                owner,
                group,
                template: c.template.clone().unwrap_or_else(|| "{{value}}".into()),
                after: c.after.clone(),
                after_timeout: c.after_timeout,
            })
        } else {
            match catalog.providers.get(&c.kind) {
                Some(Provider::Plugin { host, kind, info })
                    if info.supports(keywarden_plugin_sdk::Op::Push) =>
                {
                    Consumer::Plugin {
                        host: host.clone(),
                        kind: kind.clone(),
                        settings: c.settings.clone(),
                        credentials: c.credentials.clone(),
                    }
                }
                Some(_) => {
                    return Err(config
                        .invalid(
                            "consumers",
                            name,
                            "kind",
                            format!("kind {:?} does not support push", c.kind),
                        )
                        .into());
                }
                None => {
                    return Err(config
                        .invalid(
                            "consumers",
                            name,
                            "kind",
                            format!(
                                "no plugin serves kind {:?} (and it is not \"file\")",
                                c.kind
                            ),
                        )
                        .into());
                }
            }
        };
        catalog.consumers.insert(name.clone(), consumer);
    }
    for (name, s) in &config.secrets {
        if !catalog.providers.contains_key(&s.provider) {
            let known: Vec<&String> = catalog.providers.keys().collect();
            return Err(config
                .invalid(
                    "secrets",
                    name,
                    "provider",
                    format!("no provider {:?}; known: {known:?}", s.provider),
                )
                .into());
        }
        catalog.secrets.insert(
            name.clone(),
            SecretSpec {
                name: name.clone(),
                provider: s.provider.clone(),
                credentials: s.credentials.clone(),
                settings: s.settings.clone(),
                grace: s.grace,
                tags: s.tags.clone(),
                consumers: s.consumers.clone(),
                max_attempts: s.max_attempts.unwrap_or(config.daemon.max_attempts),
                generate: s.generate,
                schedule: config.schedule_of(s),
                canary: s.canary,
            },
        );
    }
    Ok(catalog)
}

/// What a [`Runtime`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `serve`: scheduler, leases and the audit writer run too, and unfinished compromise runs
    /// resume.
    Daemon,
    /// `rotate-all` without a daemon: leases and the audit writer, no scheduler.
    Maintenance,
    /// A one-shot command (`rotate` without a daemon): the engine alone.
    OneShot,
}

/// The running components: engine, scheduler, leases, and the tasks that feed them.
#[derive(Debug)]
pub struct Runtime {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The lease table (daemon mode).
    pub leases: Option<Arc<Leases<DaemonLeaseBackend>>>,
    /// In-memory counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Compromise runs.
    pub incidents: Arc<Incidents>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Runtime {
    /// Builds the catalog, registers declared secrets, resumes unfinished rotations, gives
    /// first versions to secrets that have none, brings lagging consumers up to date and, if
    /// `schedule` is set, starts the scheduler.
    pub async fn start(
        config: &Config,
        vault: Arc<Vault>,
        clock: Clock,
        mode: Mode,
    ) -> Result<Runtime, StartError> {
        if mode == Mode::Daemon {
            let work = work_dir(config, vault.store().path());
            let reaped = crate::plugin_host::reap_orphans(&work).await;
            if reaped > 0 {
                tracing::warn!(
                    count = reaped,
                    "killed plugin processes that a previous daemon left running"
                );
            }
        }
        let catalog = Arc::new(build_catalog(config, vault.store().path()).await?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let engine = Engine::new(
            vault.clone(),
            catalog.clone(),
            clock.clone(),
            EngineSettings {
                max_concurrent: config.daemon.max_concurrent_rotations,
                retry_base: config.daemon.retry_base,
                retry_max: config.daemon.retry_max,
            },
            shutdown_rx.clone(),
        );
        for spec in catalog.secrets.values() {
            vault
                .register(&spec.name, &spec.provider, &spec.tags, "daemon")
                .await?;
        }
        engine.resume_all().await?;
        let mut tasks = Vec::new();
        for spec in catalog.secrets.values() {
            let has_value = vault.store().sealed(&spec.name, None).await?.is_some();
            let provider = &catalog.providers[&spec.provider];
            if !has_value {
                if provider.can(keywarden_plugin_sdk::Op::Create) {
                    engine
                        .request(&spec.name, Reason::Initial, false, None)
                        .await?;
                } else if spec.provider == "manual" {
                    tracing::warn!(secret = %spec.name, "no value yet; store one with `keywarden put {}`", spec.name);
                }
            } else if !spec.consumers.is_empty() {
                let engine = engine.clone();
                let name = spec.name.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = engine.sync_consumers(&name).await {
                        tracing::warn!(secret = %name, error = %e, "could not bring consumers up to date");
                    }
                }));
            }
        }
        let mut leases = None;
        let mut writer = None;
        if mode != Mode::OneShot {
            let (commit, writer_task) =
                GroupCommit::start(vault.store().clone(), shutdown_rx.clone());
            writer = Some(writer_task);
            let open = vault.store().open_leases().await?;
            let table = Leases::new(
                DaemonLeaseBackend::new(commit, engine.clone()),
                clock.clone(),
                open,
                engine.lease_wake(),
            );
            tasks.push(tokio::spawn(table.clone().run_sweeper(shutdown_rx.clone())));
            engine.set_lease_view(table.clone());
            leases = Some(table);
        }
        let incidents = Incidents::new(engine.clone(), leases.clone());
        if mode == Mode::Daemon {
            incidents
                .resume_unfinished(config.daemon.max_concurrent_rotations)
                .await?;
            let entries: BTreeMap<String, Entry> = catalog
                .secrets
                .values()
                .filter(|s| catalog.providers[&s.provider].can(keywarden_plugin_sdk::Op::Create))
                .filter_map(|s| {
                    let schedule = s.schedule.clone()?;
                    let jitter = config.secrets[&s.name].jitter;
                    Some((s.name.clone(), Entry { schedule, jitter }))
                })
                .collect();
            let (due_tx, mut due_rx) = mpsc::channel::<String>(1024);
            let scheduler = Scheduler::new(
                entries,
                vault.store().clone(),
                clock,
                due_tx,
                engine.scheduler_wake(),
            );
            tasks.push(tokio::spawn(scheduler.run(shutdown_rx.clone())));
            let feeder = engine.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(name) = due_rx.recv().await {
                    if let Err(e) = feeder.request(&name, Reason::Schedule, false, None).await {
                        tracing::error!(secret = %name, error = %e, "scheduled rotation could not start");
                    }
                }
            }));
        }
        Ok(Runtime {
            engine,
            leases,
            metrics: Arc::default(),
            incidents,
            shutdown,
            tasks,
            writer,
        })
    }

    /// A receiver that turns true when the runtime stops.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops the scheduler, lets steps in flight finish or park (up to `timeout`), and shuts
    /// the plugins down.
    pub async fn stop(self, timeout: std::time::Duration) {
        let _ = self.shutdown.send(true);
        self.incidents
            .wait_idle(std::time::Duration::from_millis(200))
            .await;
        if !self.engine.wait_idle(timeout).await {
            tracing::warn!(
                ?timeout,
                "steps still in flight at shutdown; they resume on the next start"
            );
        }
        for task in self.tasks {
            task.abort();
        }
        if let Some(writer) = self.writer {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), writer).await;
        }
        for plugin in &self.engine.catalog().plugins {
            plugin.shutdown().await;
        }
    }
}
