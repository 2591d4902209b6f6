//! The running components: the engine, the lease table and its group-commit writer, the
//! scheduler, compromise runs, and the tasks that feed them; started in order and stopped in
//! reverse.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::StartError;
use super::catalog::{build_catalog, work_dir};
use super::lease_backend::DaemonLeaseBackend;
use crate::clock::Clock;
use crate::config::Config;
use crate::consumer::{Consumer, FileConsumer};
use crate::group_commit::GroupCommit;
use crate::incident::compromise::Incidents;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::rotation::catalog::Catalog;
use crate::rotation::engine::{Engine, EngineSettings};
use crate::rotation::scheduler::{Entry, Scheduler};
use crate::store::{Reason, Registered};
use crate::vault::Vault;

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
    /// A command that only reads (`incident list|show|close` without a daemon): the engine
    /// and its catalog, nothing registered, resumed or rotated.
    Inspect,
    /// `serve` on a PostgreSQL store another daemon leads: leases and the audit writer, so the
    /// host's agents are served; nothing registered, resumed, scheduled or rotated (the leader
    /// does that).
    Follower,
}

/// The running components: engine, scheduler, leases, and the tasks that feed them.
#[derive(Debug)]
pub struct Runtime {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The lease table (daemon and maintenance modes).
    pub leases: Option<Arc<Leases>>,
    /// The group-commit writer of lease and audit rows (daemon and maintenance modes).
    pub audit_writer: Option<GroupCommit>,
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
    /// first versions to secrets that have none, brings lagging consumers up to date and, in
    /// daemon mode, resumes unfinished compromise runs and starts the scheduler.
    pub async fn start(
        config: &Config,
        vault: Arc<Vault>,
        clock: Clock,
        mode: Mode,
    ) -> Result<Runtime, StartError> {
        if mode == Mode::Daemon {
            reap_orphaned_plugins(config, &vault).await;
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
        // One read of what the store holds, so a restart with thousands of declared secrets
        // writes (and reads) only what changed.
        let known: HashMap<String, Registered> = vault
            .store()
            .registered()
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let changed: Vec<(&str, &str, &[String])> = catalog
            .secrets
            .values()
            .filter(|spec| {
                known
                    .get(&spec.name)
                    .is_none_or(|s| s.provider != spec.provider || s.tags != spec.tags)
            })
            .map(|spec| (spec.name.as_str(), spec.provider.as_str(), &spec.tags[..]))
            .collect();
        if !changed.is_empty() && !matches!(mode, Mode::Inspect | Mode::Follower) {
            vault.register(&changed, "daemon").await?;
        }
        let stored: HashMap<String, Option<i64>> = known
            .into_iter()
            .map(|(name, s)| (name, s.version))
            .collect();
        let mut tasks = Vec::new();
        if !matches!(mode, Mode::Inspect | Mode::Follower) {
            remove_leftovers(&catalog);
            engine.resume_all().await?;
            tasks = bring_declared_secrets_up_to_date(&engine, &stored).await?;
        }
        let (mut leases, mut audit_writer, mut writer) = (None, None, None);
        if !matches!(mode, Mode::OneShot | Mode::Inspect) {
            let (commit, writer_task) =
                GroupCommit::start(vault.store().clone(), shutdown_rx.clone());
            let open = vault.store().open_leases().await?;
            let table = Leases::new(
                DaemonLeaseBackend::new(commit.clone(), engine.clone()),
                clock.clone(),
                open,
                engine.lease_wake(),
                config.agent.max_leases_per_uid,
            );
            tasks.push(tokio::spawn(table.clone().run_sweeper(shutdown_rx.clone())));
            engine.set_lease_view(table.clone());
            (leases, audit_writer, writer) = (Some(table), Some(commit), Some(writer_task));
        }
        let incidents = Incidents::new(engine.clone(), leases.clone());
        if mode == Mode::Daemon {
            // Credentials minted for leases a crash kept from being granted: revoke them (in
            // the background: a slow plugin must not hold up the start).
            let revoking = engine.clone();
            tasks.push(tokio::spawn(async move {
                match revoking.revoke_orphaned_issues().await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        revoked = n,
                        "revoked credentials issued for leases a previous daemon never granted"
                    ),
                    Err(e) => tracing::error!(error = %e, "could not read the issue journal"),
                }
            }));
            incidents
                .resume_unfinished(config.daemon.max_concurrent_rotations)
                .await?;
            tasks.extend(start_scheduler(config, &engine, clock, shutdown_rx));
        }
        Ok(Runtime {
            engine,
            leases,
            audit_writer,
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
            // Everything handed to the writer is committed before the runtime ends: each of
            // those rows belongs to a request still waiting for its answer.
            let _ = writer.await;
            // Repeated fetches counted on leases since the last fold (those only in memory
            // too) reach the chain now rather than at the next start, or never.
            let mut fold = self
                .leases
                .as_ref()
                .map(|l| l.take_unwritten_counts())
                .unwrap_or_default();
            fold.push(crate::store::LeaseOp::FoldFetches);
            if let Err(e) = self
                .engine
                .vault()
                .store()
                .apply_lease_batch(&fold, &[])
                .await
            {
                tracing::warn!(error = %e, "could not fold repeated fetches into the audit log; the next start will");
            }
        }
        for plugin in &self.engine.catalog().plugins {
            plugin.shutdown().await;
        }
    }
}

/// Kills plugin processes that a crashed predecessor left running (before anything resumes).
async fn reap_orphaned_plugins(config: &Config, vault: &Vault) {
    let work = work_dir(config, vault.store().path());
    let reaped = crate::plugin_host::reap_orphans(&work).await;
    if reaped > 0 {
        tracing::warn!(
            count = reaped,
            "killed plugin processes that a previous daemon left running"
        );
    }
}

/// Gives a first version to each declared secret that has none and whose provider can create
/// one, and brings the consumers of the others up to date (in background tasks, returned).
/// `stored` is each stored secret's current version, read at start.
async fn bring_declared_secrets_up_to_date(
    engine: &Arc<Engine>,
    stored: &HashMap<String, Option<i64>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    let catalog = engine.catalog();
    let mut tasks = Vec::new();
    let mut initial = Vec::new();
    for spec in catalog.secrets.values() {
        let has_value = stored.get(&spec.name).is_some_and(Option::is_some);
        let provider = &catalog.providers[&spec.provider];
        if !has_value {
            if provider.can(keywarden_plugin_sdk::Op::Create) {
                initial.push(spec.name.clone());
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
    // Planned side by side, so thousands of new secrets share the journal's commits.
    let mut planned = futures_util::stream::iter(initial)
        .map(|name| {
            let engine = engine.clone();
            async move { engine.request(&name, Reason::Initial, false, None).await }
        })
        .buffer_unordered(INITIAL_PLANS_AT_ONCE);
    while let Some(result) = planned.next().await {
        result?;
    }
    Ok(tasks)
}

/// Removes the temporary files that writes a killed daemon interrupted left beside its file
/// consumers' files (each holds a value), before anything is delivered.
fn remove_leftovers(catalog: &Catalog) {
    let files: Vec<&FileConsumer> = catalog
        .consumers
        .values()
        .filter_map(|c| match c {
            Consumer::File(file) => Some(file),
            _ => None,
        })
        .collect();
    let (removed, failed) = crate::consumer::remove_leftovers(&files);
    for path in removed {
        tracing::warn!(path = %path.display(), "removed a temporary file an interrupted write left beside a consumer's file");
    }
    for e in failed {
        tracing::warn!(error = %e, "could not look for what interrupted writes left beside consumers' files");
    }
}

/// How many first rotations start-up plans at once.
const INITIAL_PLANS_AT_ONCE: usize = 256;

/// Starts the scheduler over every scheduled secret whose provider can create, and the task
/// that turns what comes due into rotation requests.
fn start_scheduler(
    config: &Config,
    engine: &Arc<Engine>,
    clock: Clock,
    shutdown: watch::Receiver<bool>,
) -> [tokio::task::JoinHandle<()>; 2] {
    let catalog = engine.catalog();
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
        engine.vault().store().clone(),
        clock,
        due_tx,
        engine.scheduler_wake(),
    );
    let feeder = engine.clone();
    [
        tokio::spawn(scheduler.run(shutdown)),
        tokio::spawn(async move {
            while let Some(name) = due_rx.recv().await {
                if let Err(e) = feeder.request(&name, Reason::Schedule, false, None).await {
                    tracing::error!(secret = %name, error = %e, "scheduled rotation could not start");
                }
            }
        }),
    ]
}
