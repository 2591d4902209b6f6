//! The rotation engine: drives each rotation through the journal of DESIGN.md §4, one store
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

use futures_util::future::join_all;
use keywarden_plugin_sdk::{Credential, Op, Request, Secret};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, broadcast, watch};

use super::backoff;
use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::clock::Millis;
use crate::consumer::{Consumer, Delivery};
use crate::generate::GeneratePolicy;
use crate::plugin_host::Settings;
use crate::plugin_host::{PluginError, PluginHost};
use crate::provider::Provider;
use crate::rotation::scheduler::Schedule;
use crate::store::{NewRotation, RotationRecord, SecretRecord, StepChange, StoreError};
use crate::store::{Reason, RotationState};
use crate::value::SecretValue;
use crate::vault::{Bound, Meta, Revealed, Vault, VaultError, short_fingerprint};

/// The actor name engine steps write in the audit log.
const ACTOR: &str = "engine";

/// A secret as the engine manages it (from `[secrets."NAME"]`).
#[derive(Debug, Clone)]
pub struct SecretSpec {
    /// Its name.
    pub name: String,
    /// Its provider kind.
    pub provider: String,
    /// Other secrets its plugin may see, by role.
    pub credentials: BTreeMap<String, String>,
    /// Settings sent to its plugin.
    pub settings: Settings,
    /// Longest the old version stays valid while leases drain.
    pub grace: Duration,
    /// Labels.
    pub tags: Vec<String>,
    /// Consumers of each new version.
    pub consumers: Vec<String>,
    /// Failed attempts before quarantine.
    pub max_attempts: u32,
    /// How proposed values are generated.
    pub generate: GeneratePolicy,
    /// Its schedule, if it rotates automatically.
    pub schedule: Option<Schedule>,
    /// A canary: any fetch is a compromise signal.
    pub canary: bool,
}

/// Everything the engine can reach: secrets, consumers, providers and plugins.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Declared secrets by name.
    pub secrets: BTreeMap<String, SecretSpec>,
    /// Declared consumers by name.
    pub consumers: BTreeMap<String, Consumer>,
    /// Providers by kind.
    pub providers: HashMap<String, Provider>,
    /// Every plugin host.
    pub plugins: Vec<Arc<PluginHost>>,
}

/// The engine's limits and timings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Rotation steps doing work at once (waits do not count).
    pub max_concurrent: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// Something that happened to a rotation, for waiters and watchers.
#[derive(Debug, Clone)]
pub struct RotationEvent {
    /// The rotation.
    pub rotation_id: String,
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
}

/// A rotation that was started or found in progress.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The rotation id.
    pub rotation_id: String,
    /// Whether it was already running (so this request joined it).
    pub joined: bool,
}

/// A step's failure.
#[derive(Debug)]
struct StepError {
    retryable: bool,
    message: String,
}

impl StepError {
    fn fatal(message: impl Into<String>) -> Self {
        StepError {
            retryable: false,
            message: message.into(),
        }
    }
}

impl From<PluginError> for StepError {
    fn from(e: PluginError) -> Self {
        StepError {
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError {
            retryable: true,
            message: e.to_string(),
        }
    }
}

impl From<VaultError> for StepError {
    fn from(e: VaultError) -> Self {
        let retryable = matches!(e, VaultError::Store(_));
        StepError {
            retryable,
            message: e.to_string(),
        }
    }
}

/// What a step did.
enum Outcome {
    /// The journal moved; run the next step.
    Moved,
    /// The rotation ended or parked; stop driving it.
    Stop,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// No live lease is left on the old version.
    Drained,
    /// The grace period ran out first.
    GraceElapsed,
    /// The daemon is stopping; the rotation stays in `draining`.
    Shutdown,
}

/// Waits until `live()` reports no live leases or `deadline` passes, waking early when `wake`
/// is notified (a lease ended) and at each lease's expiry.
pub async fn drain<F, Fut>(
    clock: &Clock,
    deadline: Millis,
    mut live: F,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<DrainEnd, StoreError>
where
    F: FnMut(Millis) -> Fut,
    Fut: std::future::Future<Output = Result<(i64, Option<Millis>), StoreError>>,
{
    loop {
        let now = clock.now();
        let (count, next_expiry) = live(now).await?;
        if count == 0 {
            return Ok(DrainEnd::Drained);
        }
        if now >= deadline {
            return Ok(DrainEnd::GraceElapsed);
        }
        // A lease past its expiry is still live until the sweeper ends it (and wakes us).
        let until = next_expiry
            .map_or(deadline, |e| e.min(deadline))
            .max(now + 100);
        tokio::select! {
            _ = clock.sleep_until(until) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Ok(DrainEnd::Shutdown);
        }
    }
}

/// Live leases as the daemon's lease table sees them (authoritative while it runs).
pub trait LeaseView: Send + Sync {
    /// Live leases on a version at `now`, and the earliest of their expiries.
    fn live_on(&self, secret_id: &str, version: i64, now: Millis) -> (i64, Option<Millis>);
}

/// The rotation engine.
pub struct Engine {
    vault: Arc<Vault>,
    catalog: Arc<Catalog>,
    clock: Clock,
    settings: EngineSettings,
    permits: Semaphore,
    driving: Mutex<HashSet<String>>,
    tasks: Mutex<tokio::task::JoinSet<()>>,
    events: broadcast::Sender<RotationEvent>,
    scheduler_wake: Arc<Notify>,
    lease_wake: Arc<Notify>,
    lease_view: std::sync::OnceLock<Arc<dyn LeaseView>>,
    shutdown: watch::Receiver<bool>,
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
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            events,
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
    async fn live_leases(
        &self,
        secret_id: &str,
        version: i64,
        now: Millis,
    ) -> Result<(i64, Option<Millis>), StoreError> {
        match self.lease_view.get() {
            Some(view) => Ok(view.live_on(secret_id, version, now)),
            None => {
                self.vault
                    .store()
                    .live_leases(secret_id, version, now)
                    .await
            }
        }
    }

    /// Notify this when a lease ends, so draining re-checks at once.
    pub fn lease_wake(&self) -> Arc<Notify> {
        self.lease_wake.clone()
    }

    fn emit(&self, rotation: &RotationRecord, state: RotationState, error: Option<String>) {
        let _ = self.events.send(RotationEvent {
            rotation_id: rotation.id.clone(),
            secret: rotation.secret_name.clone(),
            state,
            promoted_version: (state == RotationState::Promoted)
                .then_some(rotation.to_version)
                .flatten(),
            error,
        });
    }

    fn provider(&self, spec: &SecretSpec) -> Option<&Provider> {
        self.catalog.providers.get(&spec.provider)
    }

    fn spec(&self, name: &str) -> Result<&SecretSpec, EngineError> {
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
        let provider = self
            .provider(spec)
            .ok_or_else(|| EngineError::NeedsPerson {
                name: name.to_string(),
                reason: format!("its provider {:?} is not available", spec.provider),
            })?;
        if !provider.can(Op::Create) {
            let console = spec
                .settings
                .get("console_url")
                .and_then(|v| v.as_str())
                .map(|u| format!(" (create it at {u})"))
                .unwrap_or_default();
            return Err(EngineError::NeedsPerson {
                name: name.to_string(),
                reason: format!(
                    "provider {:?} cannot create credentials{console}; store a new value with \
                     `keywarden put {name}`",
                    spec.provider
                ),
            });
        }
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
                self.spawn(active.id.clone());
                return Ok(Ticket {
                    rotation_id: active.id,
                    joined: true,
                });
            }
            let current = store.sealed(name, None).await?.map(|s| s.version.version);
            let rotation_id = uuid::Uuid::new_v4().to_string();
            let proposed = spec.generate.generate().map_err(VaultError::from)?;
            let sealed =
                self.vault
                    .seal_bound(&secret, Bound::Proposed(&rotation_id), &proposed)?;
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
            match store.plan_rotation(&plan, audit).await {
                Ok(()) => {
                    tracing::info!(secret = name, rotation = %rotation_id, reason = reason.as_str(), "rotation planned");
                    self.spawn(rotation_id.clone());
                    return Ok(Ticket {
                        rotation_id,
                        joined: false,
                    });
                }
                // Another request planned one first, or the version moved: look again.
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Store(StoreError::Conflict(format!(
            "rotations of {name:?}"
        ))))
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

    async fn drive(self: &Arc<Self>, id: &str) {
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let rotation = match self.vault.store().rotation(id).await {
                Ok(Some(r)) if !r.state.is_terminal() => r,
                Ok(_) => return,
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
            let result = if rotation.state == RotationState::Draining {
                self.drain_step(&rotation, spec).await
            } else {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("semaphore never closed");
                self.step(&rotation, spec).await
            };
            match result {
                Ok(Outcome::Moved) => continue,
                Ok(Outcome::Stop) => return,
                Err(e) => match self.step_failed(&rotation, spec, e).await {
                    Ok(Outcome::Moved) => continue,
                    Ok(Outcome::Stop) => return,
                    Err(e) => {
                        tracing::error!(rotation = id, error = %e.message, "cannot record a step failure; retrying");
                        self.clock.sleep(Duration::from_secs(5)).await;
                    }
                },
            }
        }
    }

    fn audit(
        &self,
        rotation: &RotationRecord,
        action: &str,
        detail: serde_json::Value,
    ) -> AuditEvent {
        let mut detail = detail;
        if let serde_json::Value::Object(map) = &mut detail {
            map.insert("rotation_id".into(), rotation.id.clone().into());
        }
        AuditEvent::new(ACTOR, action)
            .secret(&rotation.secret_name)
            .incident(rotation.incident_id.clone())
            .detail(detail)
    }

    async fn advance(
        &self,
        rotation: &RotationRecord,
        change: StepChange,
        detail: serde_json::Value,
    ) -> Result<Outcome, StepError> {
        let action = format!("rotation.{}", change.to.as_str());
        let audit = self.audit(rotation, &action, detail);
        match self
            .vault
            .store()
            .advance_rotation(rotation, &change, audit)
            .await
        {
            Ok(()) => {
                tracing::info!(secret = %rotation.secret_name, rotation = %rotation.id, from = %change.from, to = %change.to, "rotation step");
                let mut moved = rotation.clone();
                if let Some(v) = &change.insert_pending {
                    moved.to_version = Some(v.version);
                }
                self.emit(&moved, change.to, None);
                Ok(Outcome::Moved)
            }
            // Someone else moved it (a second driver after a race): re-read and go on.
            Err(StoreError::Conflict(_)) => Ok(Outcome::Moved),
            Err(e) => Err(e.into()),
        }
    }

    async fn secret_record(&self, name: &str) -> Result<SecretRecord, StepError> {
        self.vault
            .store()
            .secret(name)
            .await?
            .ok_or_else(|| StepError::fatal(format!("secret {name:?} disappeared from the store")))
    }

    async fn credential(&self, name: &str, version: i64) -> Result<Credential, StepError> {
        let revealed = self.vault.read(name, Some(version)).await?;
        Ok(to_credential(&revealed))
    }

    /// The current versions of the secrets `spec` names as credentials, read at call time so
    /// a self-rotating admin key always signs with the key valid at this step.
    async fn credentials(
        &self,
        roles: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Credential>, StepError> {
        let mut out = BTreeMap::new();
        for (role, name) in roles {
            let revealed = self.vault.read(name, None).await.map_err(|e| {
                StepError::fatal(format!("credential {role} ({name}) is unavailable: {e}"))
            })?;
            out.insert(role.clone(), to_credential(&revealed));
        }
        Ok(out)
    }

    /// The current versions of secrets named as credentials, by role (for plugin requests made
    /// outside rotations: `issue`, lease revocations).
    pub async fn credentials_for(
        &self,
        roles: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Credential>, String> {
        self.credentials(roles).await.map_err(|e| e.message)
    }

    async fn request_for(
        &self,
        op: Op,
        rotation: &RotationRecord,
        spec: &SecretSpec,
    ) -> Result<Request, StepError> {
        Ok(Request {
            op: op.as_str().into(),
            kind: Some(spec.provider.clone()),
            secret: Some(spec.name.clone()),
            rotation_id: Some(rotation.id.clone()),
            settings: spec.settings.clone(),
            credentials: self.credentials(&spec.credentials).await?,
            ..Request::default()
        })
    }

    async fn call(
        &self,
        provider: &Provider,
        request: Request,
    ) -> Result<keywarden_plugin_sdk::OkReply, StepError> {
        match provider {
            Provider::Plugin { host, .. } => Ok(host.call(request).await?),
            _ => Err(StepError::fatal(format!(
                "provider {} has no {}",
                provider.kind(),
                request.op
            ))),
        }
    }

    async fn step(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
    ) -> Result<Outcome, StepError> {
        let provider = self.provider(spec).ok_or_else(|| {
            StepError::fatal(format!("provider {:?} is not available", spec.provider))
        })?;
        match rotation.state {
            RotationState::Planned => self.create(rotation, spec, provider).await,
            RotationState::Created => self.verify(rotation, spec, provider).await,
            RotationState::Verified => self.promote(rotation, spec, provider).await,
            RotationState::Promoted => self.push(rotation, spec, provider).await,
            RotationState::Pushed => self.after_push(rotation, spec, provider).await,
            RotationState::Draining => self.drain_step(rotation, spec).await,
            RotationState::Done | RotationState::Failed | RotationState::RolledBack => {
                Ok(Outcome::Stop)
            }
        }
    }

    async fn create(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let secret = self.secret_record(&spec.name).await?;
        let proposed = match &rotation.proposed {
            Some(sealed) => {
                self.vault
                    .open_bound(&secret, Bound::Proposed(&rotation.id), sealed)?
            }
            None => spec.generate.generate().map_err(VaultError::from)?,
        };
        let (value, meta) = match provider {
            Provider::Random => (proposed, Meta::new()),
            _ => {
                let mut request = self.request_for(Op::Create, rotation, spec).await?;
                if let Some(from) = rotation.from_version {
                    request.current = Some(self.credential(&spec.name, from).await?);
                }
                request.proposed = Some(Secret::new(proposed.expose()));
                let reply = self.call(provider, request).await?;
                let value = reply
                    .value
                    .ok_or_else(|| StepError::fatal("the plugin's create reply has no value"))?;
                if value.expose().is_empty() {
                    return Err(StepError::fatal(
                        "the plugin's create reply has an empty value",
                    ));
                }
                (SecretValue::new(value.expose().to_string()), reply.meta)
            }
        };
        let version = secret.latest_version.unwrap_or(0) + 1;
        let sealed = self.vault.seal_version(&secret, version, &value, meta)?;
        let fingerprint = short_fingerprint(&sealed.fingerprint);
        let change = StepChange {
            insert_pending: Some(sealed),
            ..StepChange::to(RotationState::Planned, RotationState::Created)
        };
        self.advance(
            rotation,
            change,
            json!({ "to_version": version, "fingerprint": fingerprint }),
        )
        .await
    }

    async fn verify(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let to = new_version(rotation)?;
        if provider.can(Op::Verify) {
            let mut request = self.request_for(Op::Verify, rotation, spec).await?;
            request.candidate = Some(self.credential(&spec.name, to).await?);
            if let Err(e) = self.call(provider, request).await {
                if e.retryable {
                    return Err(e);
                }
                return self.roll_back(rotation, spec, provider, &e.message).await;
            }
        }
        self.advance(
            rotation,
            StepChange::to(RotationState::Created, RotationState::Verified),
            json!({ "to_version": to, "verified_upstream": provider.can(Op::Verify) }),
        )
        .await
    }

    /// Verification failed for good: revoke the new credential upstream, keep the current one.
    async fn roll_back(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
        why: &str,
    ) -> Result<Outcome, StepError> {
        let to = new_version(rotation)?;
        if provider.can(Op::Revoke) {
            let mut request = self.request_for(Op::Revoke, rotation, spec).await?;
            request.target = Some(self.credential(&spec.name, to).await?);
            self.call(provider, request).await?;
        }
        let change = StepChange {
            revoke_version: Some(to),
            error: Some(why.to_string()),
            ..StepChange::to(RotationState::Created, RotationState::RolledBack)
        };
        let outcome = self
            .advance(
                rotation,
                change,
                json!({ "revoked_version": to, "error": why }),
            )
            .await?;
        tracing::error!(secret = %spec.name, rotation = %rotation.id, error = why, "verification failed; the new credential was revoked and the current one stays");
        self.count_failure(rotation, spec, why).await?;
        self.emit(rotation, RotationState::RolledBack, Some(why.to_string()));
        Ok(match outcome {
            Outcome::Moved => Outcome::Stop,
            other => other,
        })
    }

    async fn promote(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let to = new_version(rotation)?;
        if provider.can(Op::Promote) {
            let mut request = self.request_for(Op::Promote, rotation, spec).await?;
            request.candidate = Some(self.credential(&spec.name, to).await?);
            if let Some(from) = rotation.from_version {
                request.current = Some(self.credential(&spec.name, from).await?);
            }
            self.call(provider, request).await?;
        }
        let change = StepChange {
            promote: true,
            ..StepChange::to(RotationState::Verified, RotationState::Promoted)
        };
        self.advance(
            rotation,
            change,
            json!({ "from_version": rotation.from_version, "to_version": to }),
        )
        .await
    }

    async fn push(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let to = new_version(rotation)?;
        if rotation.emergency {
            if let Some(from) = rotation.from_version {
                self.revoke_old_now(rotation, spec, provider, from).await?;
            }
        }
        self.deliver_all(spec, to).await?;
        self.advance(
            rotation,
            StepChange::to(RotationState::Promoted, RotationState::Pushed),
            json!({ "version": to, "consumers": spec.consumers }),
        )
        .await
    }

    /// Emergency: revoke the old version right after promotion, without waiting for leases.
    async fn revoke_old_now(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
        from: i64,
    ) -> Result<(), StepError> {
        let old = self.vault.read(&spec.name, Some(from)).await?;
        if old.stage == crate::store::Stage::Revoked {
            return Ok(());
        }
        if provider.can(Op::Revoke) && provider.overlaps() {
            let mut request = self.request_for(Op::Revoke, rotation, spec).await?;
            request.target = Some(to_credential(&old));
            self.call(provider, request).await?;
        }
        let change = StepChange {
            revoke_version: Some(from),
            ..StepChange::to(RotationState::Promoted, RotationState::Promoted)
        };
        let audit = self.audit(
            rotation,
            "rotation.revoked-early",
            json!({ "revoked_version": from }),
        );
        self.vault
            .store()
            .advance_rotation(rotation, &change, audit)
            .await?;
        Ok(())
    }

    /// Delivers `version` to every consumer of `spec` that has not acknowledged it, each
    /// retried with backoff on its own. Fails (for the caller to retry) if any is still behind.
    async fn deliver_all(&self, spec: &SecretSpec, version: i64) -> Result<(), StepError> {
        if spec.consumers.is_empty() {
            return Ok(());
        }
        let secret = self.secret_record(&spec.name).await?;
        let acked: HashMap<String, i64> = self
            .vault
            .store()
            .deliveries(&secret.id)
            .await?
            .into_iter()
            .filter(|d| d.acked_at.is_some())
            .map(|d| (d.consumer, d.version))
            .collect();
        let pending: Vec<&String> = spec
            .consumers
            .iter()
            .filter(|c| acked.get(*c).is_none_or(|v| *v < version))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let revealed = self.vault.read(&spec.name, Some(version)).await?;
        let mut failures = Vec::new();
        let results = join_all(
            pending
                .iter()
                .map(|c| self.deliver_one(spec, &secret, c, &revealed)),
        );
        for (consumer, result) in pending.iter().zip(results.await) {
            if let Err(message) = result {
                failures.push(format!("consumer {consumer}: {message}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(StepError {
                retryable: true,
                message: failures.join("; "),
            })
        }
    }

    async fn deliver_one(
        &self,
        spec: &SecretSpec,
        secret: &SecretRecord,
        consumer_name: &str,
        revealed: &Revealed,
    ) -> Result<(), String> {
        let consumer = self
            .catalog
            .consumers
            .get(consumer_name)
            .ok_or_else(|| format!("consumer {consumer_name:?} is not declared"))?;
        let delivery = Delivery {
            secret: &spec.name,
            version: revealed.version,
            value: &revealed.value,
            meta: &revealed.meta,
        };
        let result = match consumer {
            Consumer::File(file) => file.deliver(&delivery).await,
            Consumer::Plugin {
                host,
                kind,
                settings,
                credentials,
            } => {
                let request = Request {
                    op: Op::Push.as_str().into(),
                    kind: Some(kind.clone()),
                    secret: Some(spec.name.clone()),
                    settings: settings.clone(),
                    credentials: self.credentials(credentials).await.map_err(|e| e.message)?,
                    version: Some(revealed.version),
                    value: Some(Secret::new(revealed.value.expose())),
                    meta: Some(revealed.meta.clone()),
                    ..Request::default()
                };
                host.call(request)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        let store = self.vault.store();
        match &result {
            Ok(()) => {
                store
                    .record_delivery(&secret.id, consumer_name, revealed.version, Ok(()))
                    .await
                    .map_err(|e| e.to_string())?;
                let audit = AuditEvent::new(ACTOR, "consumer.delivered")
                    .secret(&spec.name)
                    .detail(json!({ "consumer": consumer_name, "version": revealed.version }));
                store
                    .append_audit(&[audit])
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(secret = %spec.name, consumer = consumer_name, version = revealed.version, "delivered");
            }
            Err(message) => {
                tracing::warn!(secret = %spec.name, consumer = consumer_name, version = revealed.version, error = %message, "delivery failed");
                let _ = store
                    .record_delivery(&secret.id, consumer_name, revealed.version, Err(message))
                    .await;
            }
        }
        result
    }

    async fn after_push(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let done = |revoke| StepChange {
            revoke_version: revoke,
            succeeded: true,
            ..StepChange::to(RotationState::Pushed, RotationState::Done)
        };
        let outcome = match rotation.from_version {
            None => {
                self.advance(rotation, done(None), json!({ "first_version": true }))
                    .await?
            }
            Some(from) if !provider.overlaps() => {
                // `create` already retired the old credential upstream.
                self.advance(
                    rotation,
                    done(Some(from)),
                    json!({ "revoked_version": from, "overlap": false }),
                )
                .await?
            }
            Some(from) if rotation.emergency => {
                self.advance(
                    rotation,
                    done(Some(from)),
                    json!({ "revoked_version": from, "emergency": true }),
                )
                .await?
            }
            Some(_) => {
                let change = StepChange {
                    draining_since: Some(self.clock.now()),
                    ..StepChange::to(RotationState::Pushed, RotationState::Draining)
                };
                return self
                    .advance(
                        rotation,
                        change,
                        json!({ "grace_seconds": spec.grace.as_secs() }),
                    )
                    .await;
            }
        };
        self.finished(spec).await?;
        Ok(outcome)
    }

    async fn drain_step(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
    ) -> Result<Outcome, StepError> {
        let from = rotation
            .from_version
            .ok_or_else(|| StepError::fatal("draining a rotation without an old version"))?;
        let since = rotation.draining_since.unwrap_or_else(|| self.clock.now());
        let deadline = since + spec.grace.as_millis() as Millis;
        let mut shutdown = self.shutdown.clone();
        let end = drain(
            &self.clock,
            deadline,
            |now| self.live_leases(&rotation.secret_id, from, now),
            &self.lease_wake,
            &mut shutdown,
        )
        .await?;
        if end == DrainEnd::Shutdown {
            return Ok(Outcome::Stop);
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let provider = self.provider(spec).ok_or_else(|| {
            StepError::fatal(format!("provider {:?} is not available", spec.provider))
        })?;
        if provider.can(Op::Revoke) {
            let mut request = self.request_for(Op::Revoke, rotation, spec).await?;
            request.target = Some(self.credential(&spec.name, from).await?);
            self.call(provider, request).await?;
        }
        let change = StepChange {
            revoke_version: Some(from),
            succeeded: true,
            ..StepChange::to(RotationState::Draining, RotationState::Done)
        };
        let outcome = self
            .advance(
                rotation,
                change,
                json!({ "revoked_version": from, "drain": if end == DrainEnd::Drained { "leases expired" } else { "grace elapsed" } }),
            )
            .await?;
        self.finished(spec).await?;
        Ok(outcome)
    }

    /// After a successful rotation: an interval schedule counts from now.
    async fn finished(&self, spec: &SecretSpec) -> Result<(), StepError> {
        if let Some(Schedule::Every(every)) = &spec.schedule {
            let secret = self.secret_record(&spec.name).await?;
            let next = self.clock.now() + every.as_millis() as Millis;
            self.vault
                .store()
                .set_next_rotation(&secret.id, Some(next))
                .await?;
            self.scheduler_wake.notify_one();
        }
        Ok(())
    }

    async fn count_failure(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        why: &str,
    ) -> Result<(), StepError> {
        let store = self.vault.store();
        let quarantine = {
            let summary = store.secret_summary(&spec.name).await?;
            summary.is_some_and(|s| s.failed_attempts + 1 >= i64::from(spec.max_attempts))
        };
        let audit = self.audit(
            rotation,
            if quarantine {
                "secret.quarantined"
            } else {
                "rotation.failure-counted"
            },
            json!({ "error": why }),
        );
        let count = store
            .record_secret_failure(&rotation.secret_id, why, quarantine, audit)
            .await?;
        if !quarantine && spec.schedule.is_some() {
            let delay = backoff::delay(
                count as u32,
                self.settings.retry_base,
                self.settings.retry_max,
            );
            let next = self.clock.now() + delay.as_millis() as Millis;
            store
                .set_next_rotation(&rotation.secret_id, Some(next))
                .await?;
            self.scheduler_wake.notify_one();
        }
        Ok(())
    }

    async fn park(&self, rotation: &RotationRecord, why: &str) -> Result<Outcome, StepError> {
        let audit = self.audit(
            rotation,
            "secret.quarantined",
            json!({ "state": rotation.state.as_str(), "error": why }),
        );
        self.vault
            .store()
            .record_secret_failure(&rotation.secret_id, why, true, audit)
            .await?;
        tracing::error!(secret = %rotation.secret_name, rotation = %rotation.id, state = %rotation.state, error = why,
            "rotation stopped: the secret is quarantined until an operator runs `keywarden rotate {}`", rotation.secret_name);
        self.emit(rotation, rotation.state, Some(why.to_string()));
        Ok(Outcome::Stop)
    }

    async fn step_failed(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        error: StepError,
    ) -> Result<Outcome, StepError> {
        let store = self.vault.store();
        if !error.retryable {
            return match rotation.state {
                // The plugin says create failed for good: nothing exists upstream.
                RotationState::Planned => {
                    let outcome = self
                        .advance(
                            rotation,
                            StepChange {
                                error: Some(error.message.clone()),
                                ..StepChange::to(RotationState::Planned, RotationState::Failed)
                            },
                            json!({ "error": error.message }),
                        )
                        .await?;
                    tracing::error!(secret = %spec.name, rotation = %rotation.id, error = %error.message, "rotation failed");
                    self.count_failure(rotation, spec, &error.message).await?;
                    self.emit(rotation, RotationState::Failed, Some(error.message.clone()));
                    Ok(match outcome {
                        Outcome::Moved => Outcome::Stop,
                        other => other,
                    })
                }
                // Anything else needs a person: the journal keeps its place.
                _ => self.park(rotation, &error.message).await,
            };
        }
        let now = self.clock.now();
        let attempts = rotation.attempts as u32 + 1;
        let delay = backoff::delay(attempts, self.settings.retry_base, self.settings.retry_max);
        store
            .retry_rotation_later(
                &rotation.id,
                &error.message,
                now + delay.as_millis() as Millis,
            )
            .await?;
        if attempts >= spec.max_attempts {
            return self.park(rotation, &error.message).await;
        }
        tracing::warn!(secret = %spec.name, rotation = %rotation.id, state = %rotation.state, attempt = attempts,
            retry_in = ?delay, error = %error.message, "rotation step failed; will retry");
        Ok(Outcome::Moved)
    }

    /// Delivers the current version to consumers that lag behind it (a consumer added to the
    /// config, a file deleted while the daemon was down). Retries with backoff.
    pub async fn sync_consumers(&self, name: &str) -> Result<(), String> {
        let spec = self.spec(name).map_err(|e| e.to_string())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let store = self.vault.store();
            let secret = store.secret(name).await.map_err(|e| e.to_string())?;
            let active = match &secret {
                Some(s) => store
                    .latest_rotation(&s.id)
                    .await
                    .map_err(|e| e.to_string())?,
                None => None,
            };
            if active.is_some_and(|r| !r.state.is_terminal()) {
                return Ok(()); // the rotation in progress pushes
            }
            let Some(current) = store.sealed(name, None).await.map_err(|e| e.to_string())? else {
                return Ok(());
            };
            match self.deliver_all(spec, current.version.version).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= spec.max_attempts => return Err(e.message),
                Err(_) => {
                    let delay =
                        backoff::delay(attempt, self.settings.retry_base, self.settings.retry_max);
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = self.clock.sleep(delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Waits until the rotation is over, parked, or draining behind live leases; returns its
    /// last record.
    pub async fn wait(
        &self,
        rotation_id: &str,
        timeout: Duration,
    ) -> Result<Option<RotationRecord>, StoreError> {
        let mut events = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let record = self.vault.store().rotation(rotation_id).await?;
            let Some(r) = record else { return Ok(None) };
            let parked = self
                .vault
                .store()
                .secret_summary(&r.secret_name)
                .await?
                .is_some_and(|s| s.quarantined_at.is_some());
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
            let event = tokio::time::timeout_at(deadline, async {
                loop {
                    match events.recv().await {
                        Ok(e) if e.rotation_id == rotation_id => return,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
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

fn new_version(rotation: &RotationRecord) -> Result<i64, StepError> {
    rotation
        .to_version
        .ok_or_else(|| StepError::fatal("the rotation has no new version"))
}

fn to_credential(revealed: &Revealed) -> Credential {
    Credential {
        version: Some(revealed.version),
        value: Secret::new(revealed.value.expose()),
        meta: revealed.meta.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000;

    /// Leases that expire at given times (ms after T0).
    fn leases(
        expiries: Vec<Millis>,
    ) -> impl FnMut(Millis) -> std::future::Ready<Result<(i64, Option<Millis>), StoreError>> {
        move |now| {
            let live: Vec<_> = expiries
                .iter()
                .map(|e| T0 + e)
                .filter(|e| *e > now)
                .collect();
            std::future::ready(Ok((live.len() as i64, live.iter().min().copied())))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ends_when_the_last_lease_expires() {
        let clock = Clock::tokio(T0);
        let (_tx, mut rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let end = drain(
            &clock,
            T0 + 3_600_000,
            leases(vec![60_000, 300_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Drained);
        assert_eq!(start.elapsed(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_is_bounded_by_grace() {
        let clock = Clock::tokio(T0);
        let (_tx, mut rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![7_200_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::GraceElapsed);
        assert_eq!(start.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_with_no_leases_is_immediate_and_shutdown_parks_it() {
        let clock = Clock::tokio(T0);
        let (tx, mut rx) = watch::channel(false);
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Drained);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(true).unwrap();
        });
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![500_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Shutdown);
        stopper.await.unwrap();
    }
}
