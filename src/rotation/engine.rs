//! The rotation engine: drives each rotation through the journal of docs/design.md §4, one store
//! transaction per step, so a daemon killed at any instant resumes where it stopped.
//!
//! Every plugin call is idempotent by construction: the rotation id and the proposed value are
//! stored (planned) before `create` is called, and a retried step sends the same request again.
//! Retryable failures back off exponentially with jitter; after `max_attempts` the secret is
//! quarantined and the rotation parks in its state until an operator resumes it. A rotation is
//! never abandoned while it may have created something upstream: non-retryable failures end it
//! only where nothing is left behind (`failed` before anything was created, `rolled-back` after
//! the new credential was revoked).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_plugin_sdk::{Credential, Op, Request};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, broadcast, watch};

use super::catalog::{Catalog, SecretSpec};
use super::drain::LeaseView;
use super::steps::Outcome;
use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::clock::Millis;
use crate::plugin_host::{PluginError, Settings};
use crate::provider::Provider;
use crate::store::{NewRotation, RotationRecord, SecretRecord, StoreError};
use crate::store::{Reason, RotationState};
use crate::vault::{Bound, Vault, VaultError};

/// The actor name engine steps write in the audit log.
pub(super) const ACTOR: &str = "engine";

/// The engine's limits and timings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Steps of routine rotations doing work at once (waits do not count; an incident's
    /// rotations are bounded by its own concurrency).
    pub max_concurrent: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// Something that happened to a rotation, for waiters and watchers.
#[derive(Debug, Clone)]
pub struct RotationEvent {
    /// The rotation; `None` for a value a person stored (`put` through the daemon).
    pub rotation_id: Option<String>,
    /// The secret.
    pub secret: String,
    /// Its state after the event.
    pub state: RotationState,
    /// The version now current, after a promotion.
    pub promoted_version: Option<i64>,
    /// Set when the rotation stopped for a person (quarantine) or failed.
    pub error: Option<String>,
}

/// Errors starting a rotation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such secret in the config.
    #[error("no secret named {0:?} is declared in the config")]
    UnknownSecret(String),
    /// The provider cannot create credentials.
    #[error("{name:?} cannot be rotated automatically: {reason}")]
    NeedsPerson {
        /// The secret.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// A consumer still lacks the current version after every attempt.
    #[error("the consumers of {name:?} could not be brought up to date: {reason}")]
    Undelivered {
        /// The secret.
        name: String,
        /// The last delivery error.
        reason: String,
    },
}

/// Why a plugin call made outside a rotation's steps failed (an `issue`, a lease's revocation,
/// a push of an alert, a deactivation in an incident).
#[derive(Debug, thiserror::Error)]
pub enum PluginCallError {
    /// The secret is not (or no longer) in the config.
    #[error("{0:?} is not declared in the config")]
    NotDeclared(String),
    /// Its provider is not a plugin that is running.
    #[error("provider {0:?} is not available")]
    NoPlugin(String),
    /// A credential the request must carry could not be read.
    #[error("credential {role} ({name}) is unavailable: {source}")]
    Credential {
        /// Its role in the request.
        role: String,
        /// The secret that holds it.
        name: String,
        /// Why.
        source: VaultError,
    },
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// A rotation that was started or found in progress.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The rotation id.
    pub rotation_id: String,
    /// Whether it was already running (so this request joined it).
    pub joined: bool,
}

/// A rotation's latest move, for [`Engine::wait`]: its state, and whether it stopped on an
/// error.
type MoveWatch = watch::Sender<Option<(RotationState, bool)>>;

/// The rotation engine.
pub struct Engine {
    pub(super) vault: Arc<Vault>,
    pub(super) catalog: Arc<Catalog>,
    pub(super) clock: Clock,
    pub(super) settings: EngineSettings,
    pub(super) permits: Semaphore,
    pub(super) driving: Mutex<HashSet<String>>,
    /// Rotations a request joined (escalated, attempts reset) since their driver last read them.
    pub(super) joined: Mutex<HashSet<String>>,
    pub(super) tasks: Mutex<tokio::task::JoinSet<()>>,
    pub(super) events: broadcast::Sender<RotationEvent>,
    /// What [`Engine::wait`] watches: one channel per rotation someone waits on, told only
    /// that rotation's moves (state, and whether it stopped on an error), so a thousand waits
    /// do not each wake on every other rotation's steps.
    pub(super) waiters: Mutex<HashMap<String, MoveWatch>>,
    /// One lock per secret that its deliveries take (a rotation's push, a consumer sync), so
    /// that an older version is never written over a newer one (see `delivery.rs`).
    pub(super) delivering: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) scheduler_wake: Arc<Notify>,
    pub(super) lease_wake: Arc<Notify>,
    pub(super) lease_view: std::sync::OnceLock<Arc<dyn LeaseView>>,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over an unlocked vault and a catalog.
    pub fn new(
        vault: Arc<Vault>,
        catalog: Arc<Catalog>,
        clock: Clock,
        settings: EngineSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Engine> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Engine {
            permits: Semaphore::new(settings.max_concurrent.max(1)),
            vault,
            catalog,
            clock,
            settings,
            driving: Mutex::new(HashSet::new()),
            joined: Mutex::new(HashSet::new()),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            events,
            waiters: Mutex::new(HashMap::new()),
            delivering: Mutex::new(HashMap::new()),
            scheduler_wake: Arc::new(Notify::new()),
            lease_wake: Arc::new(Notify::new()),
            lease_view: std::sync::OnceLock::new(),
            shutdown,
        })
    }

    /// The vault.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The catalog.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Rotation events (state changes, promotions, parks).
    pub fn subscribe(&self) -> broadcast::Receiver<RotationEvent> {
        self.events.subscribe()
    }

    /// Notified when the engine moves a due time (the scheduler re-reads).
    pub fn scheduler_wake(&self) -> Arc<Notify> {
        self.scheduler_wake.clone()
    }

    /// Makes draining consult the daemon's lease table instead of the store.
    pub fn set_lease_view(&self, view: Arc<dyn LeaseView>) {
        let _ = self.lease_view.set(view);
    }

    /// Live leases on a version: from the lease table when the daemon runs, else the store.
    /// On a PostgreSQL store both: other daemons' agents hold leases this daemon's table does
    /// not know of (the larger count and the earliest expiry of the two).
    pub(super) async fn live_leases(
        &self,
        secret_id: &str,
        version: i64,
        now: Millis,
    ) -> Result<(i64, Option<Millis>), StoreError> {
        let store = self.vault.store();
        match self.lease_view.get() {
            Some(view) if store.postgres().is_none() => Ok(view.live_on(secret_id, version, now)),
            Some(view) => {
                let (here, here_first) = view.live_on(secret_id, version, now);
                let (all, all_first) = store.live_leases(secret_id, version, now).await?;
                let first = match (here_first, all_first) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Ok((here.max(all), first))
            }
            None => store.live_leases(secret_id, version, now).await,
        }
    }

    /// Notify this when a lease ends, so draining re-checks at once.
    pub fn lease_wake(&self) -> Arc<Notify> {
        self.lease_wake.clone()
    }

    pub(super) fn emit(
        &self,
        rotation: &RotationRecord,
        state: RotationState,
        error: Option<String>,
    ) {
        if let Some(waiting) = self.waiters.lock().expect("waiters lock").get(&rotation.id) {
            waiting.send_replace(Some((state, error.is_some())));
        }
        let _ = self.events.send(RotationEvent {
            rotation_id: Some(rotation.id.clone()),
            secret: rotation.secret_name.clone(),
            state,
            promoted_version: (state == RotationState::Promoted)
                .then_some(rotation.to_version)
                .flatten(),
            error,
        });
    }

    /// Tells watchers that a person stored `version` of `name` (a `put` through the daemon),
    /// and brings its consumers up to date in the background.
    pub fn value_stored(self: &Arc<Self>, name: &str, version: i64) {
        let _ = self.events.send(RotationEvent {
            rotation_id: None,
            secret: name.to_string(),
            state: RotationState::Done,
            promoted_version: Some(version),
            error: None,
        });
        if self
            .catalog
            .secrets
            .get(name)
            .is_some_and(|s| !s.consumers.is_empty())
        {
            let engine = self.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                if let Err(e) = engine.sync_consumers(&name).await {
                    tracing::warn!(secret = %name, error = %e, "could not push the stored value to its consumers");
                }
            });
        }
    }

    pub(super) fn provider(&self, spec: &SecretSpec) -> Option<&Provider> {
        self.catalog.providers.get(&spec.provider)
    }

    pub(super) fn spec(&self, name: &str) -> Result<&SecretSpec, EngineError> {
        self.catalog
            .secrets
            .get(name)
            .ok_or_else(|| EngineError::UnknownSecret(name.to_string()))
    }

    /// Starts a rotation of `name`, or joins the one in progress. An operator's request lifts a
    /// quarantine. An emergency request escalates a rotation in progress.
    pub async fn request(
        self: &Arc<Self>,
        name: &str,
        reason: Reason,
        emergency: bool,
        incident_id: Option<&str>,
    ) -> Result<Ticket, EngineError> {
        let spec = self.spec(name)?;
        self.check_can_create(spec)?;
        let store = self.vault.store();
        let secret = store
            .secret(name)
            .await?
            .ok_or_else(|| EngineError::UnknownSecret(name.to_string()))?;
        if matches!(reason, Reason::Manual | Reason::Compromise) {
            let audit = AuditEvent::new(ACTOR, "secret.unquarantine")
                .secret(name)
                .incident(incident_id.map(str::to_string));
            store.unquarantine(&secret.id, audit).await?;
        }
        for _ in 0..3 {
            let latest = store.latest_rotation(&secret.id).await?;
            // A rotation this incident planned already finished (the daemon resumed it at
            // start-up while the incident's run was being planned): rotating again would only
            // add a version. A rotation escalated into the incident keeps its own reason.
            if let Some(done) = latest.as_ref().filter(|r| {
                r.state == RotationState::Done
                    && r.reason == Reason::Compromise
                    && incident_id.is_some()
                    && r.incident_id.as_deref() == incident_id
            }) {
                return Ok(Ticket {
                    rotation_id: done.id.clone(),
                    joined: true,
                });
            }
            if let Some(active) = latest.filter(|r| !r.state.is_terminal()) {
                return self.join(name, active, emergency, incident_id).await;
            }
            match self
                .plan(spec, &secret, reason, emergency, incident_id)
                .await
            {
                Ok(rotation_id) => {
                    return Ok(Ticket {
                        rotation_id,
                        joined: false,
                    });
                }
                // Another request planned one first, or the version moved: look again.
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Store(StoreError::Conflict(format!(
            "rotations of {name:?}"
        ))))
    }

    /// Refuses a rotation its provider cannot perform, saying what a person must do instead.
    fn check_can_create(&self, spec: &SecretSpec) -> Result<(), EngineError> {
        let name = &spec.name;
        let provider = self
            .provider(spec)
            .ok_or_else(|| EngineError::NeedsPerson {
                name: name.clone(),
                reason: format!("its provider {:?} is not available", spec.provider),
            })?;
        if provider.can(Op::Create) {
            return Ok(());
        }
        let console = spec
            .settings
            .get("console_url")
            .and_then(|v| v.as_str())
            .map(|u| format!(" (create it at {u})"))
            .unwrap_or_default();
        Err(EngineError::NeedsPerson {
            name: name.clone(),
            reason: format!(
                "provider {:?} cannot create credentials{console}; store a new value with \
                 `keywarden put {name}`",
                spec.provider
            ),
        })
    }

    /// Joins the rotation in progress (escalating it when this request is an emergency and it
    /// is not), and makes sure it is being driven.
    async fn join(
        self: &Arc<Self>,
        name: &str,
        active: RotationRecord,
        emergency: bool,
        incident_id: Option<&str>,
    ) -> Result<Ticket, EngineError> {
        let store = self.vault.store();
        if emergency && !active.emergency {
            let audit = AuditEvent::new(ACTOR, "rotation.escalated")
                .secret(name)
                .incident(incident_id.map(str::to_string))
                .detail(json!({ "rotation_id": active.id }));
            store
                .escalate_rotation(&active.id, incident_id, audit)
                .await?;
        }
        store.reset_rotation_attempts(&active.id).await?;
        // Its driver reads the journal again before its next step.
        self.joined
            .lock()
            .expect("joined lock")
            .insert(active.id.clone());
        self.spawn(active.id.clone());
        Ok(Ticket {
            rotation_id: active.id,
            joined: true,
        })
    }

    /// Plans a new rotation: its id and proposed value are stored before any plugin is called.
    /// Returns the rotation id, or [`StoreError::Conflict`] when another plan got there first.
    async fn plan(
        self: &Arc<Self>,
        spec: &SecretSpec,
        secret: &SecretRecord,
        reason: Reason,
        emergency: bool,
        incident_id: Option<&str>,
    ) -> Result<String, EngineError> {
        let name = spec.name.as_str();
        let store = self.vault.store();
        let current = store.sealed(name, None).await?.map(|s| s.version.version);
        let rotation_id = uuid::Uuid::new_v4().to_string();
        let proposed = spec.generate.generate().map_err(VaultError::from)?;
        // Sealed and committed under the keys in use; the record is read again under them, as
        // a rekey may have replaced its data key since.
        let keys = self.vault.keys_in_use().await;
        let secret = match store.secret(name).await? {
            Some(s) if s.id == secret.id => s,
            _ => return Err(StoreError::Conflict(format!("secret {name} was replaced")).into()),
        };
        let sealed = self.vault.seal_bound(
            &keys,
            &secret,
            Bound::Proposed(&rotation_id),
            &proposed,
            &Default::default(),
        )?;
        let plan = NewRotation {
            id: rotation_id.clone(),
            secret_id: secret.id.clone(),
            from_version: current,
            proposed: Some(sealed),
            reason,
            emergency,
            incident_id: incident_id.map(str::to_string),
        };
        let audit = AuditEvent::new(ACTOR, "rotation.planned")
            .secret(name)
            .incident(incident_id.map(str::to_string))
            .detail(json!({
                "rotation_id": rotation_id,
                "from_version": current,
                "reason": reason.as_str(),
                "emergency": emergency,
            }));
        store.plan_rotation(&plan, audit).await?;
        drop(keys);
        tracing::info!(secret = name, rotation = %rotation_id, reason = reason.as_str(), "rotation planned");
        self.spawn(rotation_id.clone());
        Ok(rotation_id)
    }

    /// Drives every rotation left active by a previous run.
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        let active = self.vault.store().active_rotations().await?;
        for r in &active {
            tracing::info!(secret = %r.secret_name, rotation = %r.id, state = %r.state, "resuming rotation");
            self.spawn(r.id.clone());
        }
        Ok(active.len())
    }

    /// Starts driving a rotation unless it is already being driven.
    pub fn spawn(self: &Arc<Self>, rotation_id: String) {
        if !self
            .driving
            .lock()
            .expect("driving lock")
            .insert(rotation_id.clone())
        {
            return;
        }
        let engine = self.clone();
        self.tasks.lock().expect("tasks lock").spawn(async move {
            engine.drive(&rotation_id).await;
            engine
                .driving
                .lock()
                .expect("driving lock")
                .remove(&rotation_id);
        });
    }

    /// Waits for the tasks driving rotations to finish or park, up to `timeout`.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        let all = async { while tasks.join_next().await.is_some() {} };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    pub(super) async fn drive(self: &Arc<Self>, id: &str) {
        let mut shutdown = self.shutdown.clone();
        // The record the last step left, when nothing else touched the rotation since.
        let mut next: Option<RotationRecord> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let joined = self.joined.lock().expect("joined lock").remove(id);
            let read = match next.take().filter(|_| !joined) {
                Some(r) => Ok(Some(r)),
                None => self.vault.store().rotation(id).await,
            };
            let rotation = match read {
                Ok(Some(r)) if !r.state.is_terminal() => r,
                Ok(_) => {
                    self.joined.lock().expect("joined lock").remove(id);
                    return;
                }
                Err(e) => {
                    tracing::error!(rotation = id, error = %e, "cannot read the rotation; retrying");
                    self.clock.sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            let Some(spec) = self.catalog.secrets.get(&rotation.secret_name) else {
                tracing::warn!(secret = %rotation.secret_name, rotation = id, "the secret is no longer declared; leaving its rotation as it is");
                return;
            };
            if let Some(at) = rotation.next_attempt_at.filter(|at| *at > self.clock.now()) {
                tokio::select! {
                    _ = self.clock.sleep_until(at) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Draining only waits for leases: it holds none of the permits that bound the
            // steps doing work at once. A rotation of an incident (`rotate-all`) is bounded by
            // the incident's own concurrency instead: it never queues behind routine ones.
            let _permit = match rotation.state {
                RotationState::Draining => None,
                _ if rotation.incident_id.is_some() => None,
                _ => Some(
                    self.permits
                        .acquire()
                        .await
                        .expect("semaphore never closed"),
                ),
            };
            match self.step(&rotation, spec).await {
                Ok(Outcome::Next(moved)) => next = Some(*moved),
                Ok(Outcome::Moved | Outcome::Reread) => continue,
                Ok(Outcome::Stop) => return,
                Err(e) => match self.step_failed(&rotation, spec, e).await {
                    Ok(Outcome::Next(moved)) => next = Some(*moved),
                    Ok(Outcome::Moved | Outcome::Reread) => continue,
                    Ok(Outcome::Stop) => return,
                    Err(e) => {
                        tracing::error!(rotation = id, error = %e.message, "cannot record a step failure; retrying");
                        self.clock.sleep(Duration::from_secs(5)).await;
                    }
                },
            }
        }
    }

    /// Revokes a credential upstream through secret `name`'s plugin, outside a rotation:
    /// `target` when the daemon knows it; for a credential issued for lease `lease_id` without
    /// a target, whatever the plugin issued for that lease (an issue journaled before a crash,
    /// whose reply never arrived).
    pub async fn revoke_credential(
        &self,
        name: &str,
        target: Option<Credential>,
        lease_id: Option<&str>,
    ) -> Result<(), PluginCallError> {
        let spec = self
            .catalog
            .secrets
            .get(name)
            .ok_or_else(|| PluginCallError::NotDeclared(name.to_string()))?;
        let Some(Provider::Plugin { host, kind, .. }) = self.catalog.providers.get(&spec.provider)
        else {
            return Err(PluginCallError::NoPlugin(spec.provider.clone()));
        };
        let request = self
            .plugin_request(
                Op::Revoke,
                kind,
                Some(name),
                &spec.settings,
                &spec.credentials,
            )
            .await?;
        host.call(Request {
            target,
            lease_id: lease_id.map(str::to_string),
            ..request
        })
        .await?;
        Ok(())
    }

    /// Revokes what was being issued for leases that were never committed (the daemon died
    /// between journaling an issue and granting its lease), each with an audit row; an entry
    /// whose revocation fails stays for the next start. Returns how many were revoked.
    pub async fn revoke_orphaned_issues(&self) -> Result<usize, StoreError> {
        let store = self.vault.store();
        let mut revoked = 0;
        for (lease_id, name) in store.orphaned_issues().await? {
            match self.revoke_credential(&name, None, Some(&lease_id)).await {
                Ok(()) => {
                    let audit = AuditEvent::new("daemon", "lease.orphan_revoked")
                        .secret(&name)
                        .detail(json!({ "lease_id": lease_id }));
                    store.append_audit(&[audit]).await?;
                    store.end_issue(&lease_id).await?;
                    revoked += 1;
                }
                Err(e) => tracing::error!(
                    secret = %name,
                    lease = %lease_id,
                    error = %e,
                    "could not revoke a credential issued for a lease that was never granted; \
                     it will be tried again at the next start"
                ),
            }
        }
        Ok(revoked)
    }

    /// A request for `op` to a plugin `kind`, on behalf of `secret` (or of a consumer) with its
    /// `settings`, carrying the current values of the credentials `roles` names, read now, so
    /// a self-rotating admin key always signs with the key valid at this moment. Every plugin
    /// request is built here: each carries exactly what its config lets the plugin see.
    pub async fn plugin_request(
        &self,
        op: Op,
        kind: &str,
        secret: Option<&str>,
        settings: &Settings,
        roles: &BTreeMap<String, String>,
    ) -> Result<Request, PluginCallError> {
        let mut credentials = BTreeMap::new();
        for (role, name) in roles {
            let revealed = self.vault.read(name, None).await.map_err(|source| {
                PluginCallError::Credential {
                    role: role.clone(),
                    name: name.clone(),
                    source,
                }
            })?;
            credentials.insert(role.clone(), Credential::from(&revealed));
        }
        Ok(Request {
            op: op.as_str().into(),
            kind: Some(kind.to_string()),
            secret: secret.map(str::to_string),
            settings: settings.clone(),
            credentials,
            ..Request::default()
        })
    }

    /// The moves of rotation `rotation_id` (state, and whether it stopped on an error), and a
    /// guard that forgets its channel when the last watcher is gone. Bind both in one `let`
    /// (`let (moves, _unwatch) = …`): the guard is then dropped before the receiver.
    fn watch_moves<'a>(
        &'a self,
        rotation_id: &'a str,
    ) -> (watch::Receiver<Option<(RotationState, bool)>>, Unwatch<'a>) {
        let moves = self
            .waiters
            .lock()
            .expect("waiters lock")
            .entry(rotation_id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        (
            moves,
            Unwatch {
                engine: self,
                rotation_id,
            },
        )
    }

    /// Waits until the rotation is over, parked, or draining behind live leases; returns its
    /// last record.
    pub async fn wait(
        &self,
        rotation_id: &str,
        timeout: Duration,
    ) -> Result<Option<RotationRecord>, StoreError> {
        let (mut moves, _unwatch) = self.watch_moves(rotation_id);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let record = self.vault.store().rotation(rotation_id).await?;
            let Some(r) = record else { return Ok(None) };
            let parked = self.vault.store().is_quarantined(&r.secret_name).await?;
            let waiting_on_leases = match (r.state, r.from_version) {
                (RotationState::Draining, Some(from)) => {
                    self.live_leases(&r.secret_id, from, self.clock.now())
                        .await?
                        .0
                        > 0
                }
                _ => false,
            };
            if r.state.is_terminal() || waiting_on_leases || parked {
                return Ok(Some(r));
            }
            // Read the store again only when the rotation ends, drains or stops on an error.
            let event = tokio::time::timeout_at(deadline, async {
                while moves.changed().await.is_ok() {
                    if let Some((state, stopped)) = *moves.borrow_and_update() {
                        if state.is_terminal() || state == RotationState::Draining || stopped {
                            return;
                        }
                    }
                }
            })
            .await;
            if event.is_err() {
                return self.vault.store().rotation(rotation_id).await;
            }
        }
    }
}

/// Forgets a rotation's wait channel when its last waiter is gone.
struct Unwatch<'a> {
    engine: &'a Engine,
    rotation_id: &'a str,
}

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        let mut waiters = self.engine.waiters.lock().expect("waiters lock");
        // The receiver of this wait is dropped after this guard (declared before it), so one
        // receiver left means this was the last wait.
        if waiters
            .get(self.rotation_id)
            .is_some_and(|w| w.receiver_count() <= 1)
        {
            waiters.remove(self.rotation_id);
        }
    }
}
