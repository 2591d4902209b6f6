//! Assume compromise (docs/design.md §10): rotate and revoke everything in a scope at once, safely,
//! and say what was done.
//!
//! A run is an *incident*: a row with its scope, and an id carried by every audit row and every
//! rotation the run writes. With `assume_compromise`, every lease in scope is revoked first
//! (credentials issued for leases are revoked upstream), then every secret in scope is rotated
//! as an emergency (its old version revoked right after promotion, without grace), with bounded
//! concurrency. Which secrets an incident has rotated is read from the rotations carrying its
//! id, so running the same scope again resumes only what is not finished, and a daemon killed
//! mid-run resumes the incident when it starts again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_plugin_sdk::{Credential, Op, Secret};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::leases::Leases;
use crate::rotation::engine::{Engine, EngineError};
use crate::store::{IncidentRecord, Scope, StoreError, Trigger};
use crate::store::{Reason, RotationState};

/// Most secrets one run rotates at once (`--concurrency`, the admin API's `concurrency`).
pub const MAX_CONCURRENCY: usize = 1024;
/// Secrets one run rotates at once unless told otherwise. A run is bounded by its own
/// concurrency (and its plugins' `max_concurrency`), never by the routine
/// `[daemon] max_concurrent_rotations`.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// How far back `status` looks for what incidents left to a person...
pub const PERSON_ACTIONS_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// ... in at most this many incidents, the newest.
pub const PERSON_ACTIONS_INCIDENTS: usize = 10;

/// What a run will do to one secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Rotate it through its provider.
    Rotate,
    /// Its provider cannot create credentials but can revoke: revoke (deactivate) the current
    /// one, and a person must create the replacement.
    Deactivate,
    /// Nothing automatic is possible; a person must replace it.
    NeedsPerson,
}

/// One secret in a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanItem {
    /// The secret.
    pub name: String,
    /// Its provider kind.
    pub provider: String,
    /// Its current version.
    pub version: Option<i64>,
    /// What will be done.
    pub action: Action,
    /// For `deactivate` and `needs-person`: what a person must do.
    pub reason: Option<String>,
    /// Consumers that will receive the new version.
    pub consumers: Vec<String>,
    /// Live leases on it.
    pub live_leases: usize,
}

/// What a run will do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The scope.
    pub scope: Scope,
    /// Secrets in scope.
    pub secrets: Vec<PlanItem>,
    /// Live leases in scope.
    pub live_leases: usize,
    /// The plugins that rotate secrets in scope, and how many requests each takes at once: a
    /// run's concurrency above a plugin's `max_concurrency` is bound by it for that plugin's
    /// secrets.
    #[serde(default)]
    pub plugins: Vec<PluginBound>,
}

/// A plugin in a plan: what bounds the rotations it serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PluginBound {
    /// The plugin's config name.
    pub plugin: String,
    /// Its `max_concurrency`.
    pub max_concurrency: usize,
    /// Secrets in scope it rotates.
    pub secrets: usize,
}

/// A secret that was not rotated, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// The secret.
    pub name: String,
    /// Why.
    pub error: String,
}

/// The incident report (the `rotate-all --json` shape, README "Assume compromise", plus `needs_person`,
/// `pending`, `finished`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The incident.
    pub incident_id: String,
    /// Secrets rotated.
    pub rotated: Vec<String>,
    /// Secrets not rotated (including those that need a person), with reasons.
    pub failed: Vec<Failure>,
    /// Leases revoked.
    pub leases_revoked: i64,
    /// The subset of `failed` that only a person can finish, with what to do.
    pub needs_person: Vec<Failure>,
    /// Secrets in scope that were left to a person and have since been given a new value
    /// (`keywarden put` after the incident started): no longer in `failed` or `needs_person`.
    #[serde(default)]
    pub resolved: Vec<String>,
    /// Secrets still in progress (a run stopped midway).
    pub pending: Vec<String>,
    /// Whether the run is over.
    pub finished: bool,
    /// Whether old versions and leases were revoked without grace.
    pub assume_compromise: bool,
}

/// How far a run in progress is: counts kept as it goes, so asking costs the same for ten
/// secrets as for a hundred thousand.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Secrets in scope.
    pub total: usize,
    /// Secrets handled (rotated, deactivated, or left to a person), this run and earlier ones.
    pub done: usize,
    /// Secrets whose rotation failed.
    pub failed: usize,
    /// Whether the run is over (then the full report is final).
    pub finished: bool,
}

/// Errors starting a run.
#[derive(Debug, thiserror::Error)]
pub enum CompromiseError {
    /// A name in the scope is not a secret.
    #[error("no secret named {0:?}")]
    UnknownSecret(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs incidents; in the daemon, they outlive the request that started them.
pub struct Incidents {
    engine: Arc<Engine>,
    leases: Option<Arc<Leases>>,
    running: Mutex<HashSet<String>>,
    /// Progress of the runs started by this process, by incident id.
    progress: Mutex<HashMap<String, Progress>>,
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

impl std::fmt::Debug for Incidents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incidents").finish_non_exhaustive()
    }
}

const ACTOR: &str = "compromise";
/// The report's error for a secret with no rotation under the incident.
const NOT_ATTEMPTED: &str = "not attempted";

impl Incidents {
    /// A runner over the engine and (in the daemon) the lease table.
    pub fn new(engine: Arc<Engine>, leases: Option<Arc<Leases>>) -> Arc<Self> {
        Arc::new(Incidents {
            engine,
            leases,
            running: Mutex::new(HashSet::new()),
            progress: Mutex::new(HashMap::new()),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
        })
    }

    /// What a run of `scope` would do.
    pub async fn plan(&self, scope: &Scope) -> Result<Plan, CompromiseError> {
        let catalog = self.engine.catalog();
        let stored = self.engine.vault().store().list().await?;
        for name in &scope.names {
            if !stored.iter().any(|s| &s.name == name) {
                return Err(CompromiseError::UnknownSecret(name.clone()));
            }
        }
        let mut items = Vec::new();
        let mut total_leases = 0;
        let mut plugins: BTreeMap<String, PluginBound> = BTreeMap::new();
        for s in stored {
            let spec = catalog.secrets.get(&s.name);
            let provider_kind = spec.map_or(s.provider.clone(), |spec| spec.provider.clone());
            let tags = spec.map_or(s.tags.clone(), |spec| spec.tags.clone());
            if !scope.covers(&s.name, &tags, &provider_kind) {
                continue;
            }
            let provider = spec.and_then(|_| catalog.providers.get(&provider_kind));
            let console = spec
                .and_then(|spec| spec.settings.get("console_url"))
                .and_then(|v| v.as_str())
                .map(|u| format!(" at {u}"))
                .unwrap_or_default();
            let (action, reason) = match provider {
                Some(p) if p.can(Op::Create) || p.can(Op::Issue) => (Action::Rotate, None),
                Some(p) if p.can(Op::Revoke) && s.version.is_some() => (
                    Action::Deactivate,
                    Some(format!(
                        "provider {provider_kind} cannot create keys through its API: the current \
                         key is deactivated; create a replacement{console} and store it with \
                         `keywarden put {}`",
                        s.name
                    )),
                ),
                _ => (
                    Action::NeedsPerson,
                    Some(format!(
                        "keywarden cannot rotate {provider_kind:?} secrets: replace the credential \
                         upstream{console}, then store it with `keywarden put {}`",
                        s.name
                    )),
                ),
            };
            if let (Action::Rotate, Some(crate::provider::Provider::Plugin { host, .. })) =
                (action, provider)
            {
                plugins
                    .entry(host.name().to_string())
                    .or_insert_with(|| PluginBound {
                        plugin: host.name().to_string(),
                        max_concurrency: host.max_concurrency(),
                        secrets: 0,
                    })
                    .secrets += 1;
            }
            let live = self.live_leases(&s.id);
            total_leases += live;
            items.push(PlanItem {
                name: s.name,
                provider: provider_kind,
                version: s.version,
                action,
                reason,
                consumers: spec.map(|spec| spec.consumers.clone()).unwrap_or_default(),
                live_leases: live,
            });
        }
        Ok(Plan {
            scope: scope.clone(),
            secrets: items,
            live_leases: total_leases,
            plugins: plugins.into_values().collect(),
        })
    }

    fn live_leases(&self, secret_id: &str) -> usize {
        self.leases
            .as_ref()
            .map_or(0, |l| l.live_for_secret(secret_id))
    }

    /// Starts a run (or resumes the unfinished incident of the same scope) in the background.
    /// Returns the incident id.
    pub async fn start(
        self: &Arc<Self>,
        scope: Scope,
        assume_compromise: bool,
        concurrency: usize,
        trigger: Trigger,
    ) -> Result<String, CompromiseError> {
        let plan = self.plan(&scope).await?;
        let incident = self
            .open_incident(&scope, assume_compromise, trigger)
            .await?;
        self.spawn(incident.clone(), plan, concurrency);
        Ok(incident.id)
    }

    fn spawn(self: &Arc<Self>, incident: IncidentRecord, plan: Plan, concurrency: usize) {
        if !self
            .running
            .lock()
            .expect("running lock")
            .insert(incident.id.clone())
        {
            return;
        }
        self.progress.lock().expect("progress lock").insert(
            incident.id.clone(),
            Progress {
                total: plan.secrets.len(),
                ..Progress::default()
            },
        );
        let this = self.clone();
        self.tasks.lock().expect("tasks lock").spawn(async move {
            let id = incident.id.clone();
            if let Err(e) = this.execute(&incident, &plan, concurrency).await {
                tracing::error!(incident = %id, error = %e, "compromise run failed");
            }
            this.running.lock().expect("running lock").remove(&id);
        });
    }

    /// Runs to the end (the CLI without a daemon) and returns the report.
    pub async fn run(
        self: &Arc<Self>,
        scope: Scope,
        assume_compromise: bool,
        concurrency: usize,
        trigger: Trigger,
    ) -> Result<Report, CompromiseError> {
        let plan = self.plan(&scope).await?;
        let incident = self
            .open_incident(&scope, assume_compromise, trigger)
            .await?;
        self.execute(&incident, &plan, concurrency).await?;
        self.report(&incident.id).await
    }

    /// Resumes incidents a previous daemon left unfinished.
    pub async fn resume_unfinished(
        self: &Arc<Self>,
        concurrency: usize,
    ) -> Result<usize, CompromiseError> {
        let open = self.engine.vault().store().unfinished_incidents().await?;
        for incident in &open {
            match self.plan(&incident.scope).await {
                Ok(plan) => {
                    tracing::info!(incident = %incident.id, "resuming an unfinished compromise run");
                    self.spawn(incident.clone(), plan, concurrency);
                }
                Err(e) => {
                    tracing::error!(incident = %incident.id, error = %e, "cannot resume incident")
                }
            }
        }
        Ok(open.len())
    }

    /// Every incident, oldest first, with whether it is open, finished or closed by hand.
    pub async fn list(&self) -> Result<Vec<serde_json::Value>, CompromiseError> {
        Ok(self
            .engine
            .vault()
            .store()
            .all_incidents()
            .await?
            .into_iter()
            .map(|i| {
                json!({
                    "incident_id": i.id,
                    "started_at": crate::clock::rfc3339(i.started_at),
                    "finished_at": i.finished_at.map(crate::clock::rfc3339),
                    "closed_by": i.closed_by,
                    "scope": i.scope,
                    "assume_compromise": i.assume_compromise,
                    "trigger": i.trigger,
                    "leases_revoked": i.leases_revoked,
                })
            })
            .collect())
    }

    /// What incidents still wait for a person to do: each secret left to a person and not
    /// given a new value since, in the newest [`PERSON_ACTIONS_INCIDENTS`] incidents of the
    /// last [`PERSON_ACTIONS_FOR`] that no one closed by hand (each secret once).
    pub async fn waiting_for_people(&self) -> Result<Vec<serde_json::Value>, CompromiseError> {
        let since = self.engine.clock().now() - PERSON_ACTIONS_FOR.as_millis() as Millis;
        let mut seen = HashSet::new();
        let mut waiting = Vec::new();
        let incidents = self.engine.vault().store().all_incidents().await?;
        for incident in incidents
            .iter()
            .rev()
            .filter(|i| i.closed_by.is_none() && i.started_at >= since)
            .take(PERSON_ACTIONS_INCIDENTS)
        {
            for f in self.report(&incident.id).await?.needs_person {
                if seen.insert(f.name.clone()) {
                    waiting.push(json!({
                        "incident_id": incident.id,
                        "name": f.name,
                        "error": f.error,
                    }));
                }
            }
        }
        Ok(waiting)
    }

    /// Closes incident `id` by hand (`actor` is audited): it counts as finished and is never
    /// resumed or reopened. Returns whether it was not closed already.
    pub async fn close(&self, id: &str, actor: &str) -> Result<bool, CompromiseError> {
        let store = self.engine.vault().store();
        if store.incident(id).await?.is_none() {
            return Err(CompromiseError::UnknownSecret(format!("incident {id}")));
        }
        let audit = AuditEvent::new(actor, "compromise.closed").incident(Some(id.to_string()));
        Ok(store.close_incident(id, actor, audit).await?)
    }

    /// Whether a run of `id` is in progress here.
    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().expect("running lock").contains(id)
    }

    /// How far run `id` is, if this process ran it (cheap: no store read).
    pub fn progress(&self, id: &str) -> Option<Progress> {
        let mut progress = *self.progress.lock().expect("progress lock").get(id)?;
        progress.finished = !self.is_running(id);
        Some(progress)
    }

    fn note_progress(&self, id: &str, change: impl FnOnce(&mut Progress)) {
        if let Some(p) = self.progress.lock().expect("progress lock").get_mut(id) {
            change(p);
        }
    }

    async fn open_incident(
        &self,
        scope: &Scope,
        assume_compromise: bool,
        trigger: Trigger,
    ) -> Result<IncidentRecord, CompromiseError> {
        let store = self.engine.vault().store();
        let canonical = scope.canonical();
        // The latest incident of the same scope: resumed while unfinished, reopened when it
        // finished with rotations that failed (running it again retries them), unless a person
        // closed it.
        let latest = store
            .all_incidents()
            .await?
            .into_iter()
            .rev()
            .find(|i| i.scope == canonical && i.assume_compromise == assume_compromise);
        if let Some(latest) = latest.filter(|i| i.closed_by.is_none()) {
            let audit = AuditEvent::new(ACTOR, "compromise.resumed")
                .incident(Some(latest.id.clone()))
                .detail(json!({ "trigger": trigger }));
            if latest.finished_at.is_none() {
                store.append_audit(&[audit]).await?;
                return Ok(latest);
            }
            let report = self.report(&latest.id).await?;
            if report.failed.len() > report.needs_person.len()
                && store.reopen_incident(&latest.id, audit).await?
            {
                return Ok(IncidentRecord {
                    finished_at: None,
                    ..latest
                });
            }
        }
        let incident = IncidentRecord {
            id: uuid::Uuid::new_v4().to_string(),
            started_at: self.engine.clock().now(),
            finished_at: None,
            scope: canonical,
            assume_compromise,
            trigger,
            leases_revoked: 0,
            closed_by: None,
        };
        let audit = AuditEvent::new(ACTOR, "compromise.started")
            .incident(Some(incident.id.clone()))
            .detail(json!({ "scope": scope, "assume_compromise": assume_compromise, "trigger": trigger }));
        store.create_incident(&incident, audit).await?;
        Ok(incident)
    }

    async fn execute(
        &self,
        incident: &IncidentRecord,
        plan: &Plan,
        concurrency: usize,
    ) -> Result<(), CompromiseError> {
        let store = self.engine.vault().store();
        let id = incident.id.as_str();
        if incident.assume_compromise {
            if let Some(leases) = &self.leases {
                let ids: HashSet<String> = {
                    let stored = store.list().await?;
                    let names: HashSet<&str> =
                        plan.secrets.iter().map(|p| p.name.as_str()).collect();
                    stored
                        .into_iter()
                        .filter(|s| names.contains(s.name.as_str()))
                        .map(|s| s.id)
                        .collect()
                };
                let audit = vec![
                    AuditEvent::new(ACTOR, "compromise.leases-revoked")
                        .incident(Some(id.to_string())),
                ];
                // Only what was issued before the incident started: a resumed run leaves the
                // leases of new versions (fetched since) alone.
                let started = incident.started_at;
                match leases
                    .revoke_where(
                        |l| ids.contains(&l.secret_id) && l.created_at <= started,
                        audit,
                    )
                    .await
                {
                    Ok(revoked) => {
                        store.add_incident_leases(id, revoked.len() as i64).await?;
                        tracing::warn!(
                            incident = id,
                            leases = revoked.len(),
                            "revoked every lease in scope"
                        );
                    }
                    Err(e) => tracing::error!(incident = id, error = %e, "could not revoke leases"),
                }
            }
        }
        // Journaled and its leases revoked; no rotation of it started yet.
        crash_point!("incident.opened");
        let done: HashSet<String> = store
            .incident_rotations(id)
            .await?
            .into_iter()
            .filter(|r| r.state == RotationState::Done)
            .map(|r| r.secret)
            .collect();
        // A secret left to a person that has a new value since is not touched again (a
        // deactivation now would hit the replacement).
        let resolved: HashSet<String> = self.report(id).await?.resolved.into_iter().collect();
        let todo: Vec<PlanItem> = plan
            .secrets
            .iter()
            .filter(|i| !done.contains(&i.name) && !resolved.contains(&i.name))
            .cloned()
            .collect();
        let failures = self
            .act_on_each(incident, plan.secrets.len(), todo, concurrency)
            .await;
        // The run is over: what did not end now will not by itself (the report of a run in
        // progress would call it pending), and a secret whose request failed before any
        // rotation was written fails with that request's error.
        let mut report = self.report_as(id, false).await?;
        for f in &mut report.failed {
            if let Some(error) = failures.get(&f.name).filter(|_| f.error == NOT_ATTEMPTED) {
                f.error = error.clone();
            }
        }
        // Finished once every secret in scope is rotated, failed, or handed to a person: a
        // run of the same scope after this one is a new incident, and a later start of the
        // daemon does not resume (and revoke leases for) this one again.
        if report.pending.is_empty() {
            let audit = AuditEvent::new(ACTOR, "compromise.finished")
                .incident(Some(id.to_string()))
                .detail(json!({
                    "rotated": report.rotated.len(),
                    "failed": report.failed.len() - report.needs_person.len(),
                    "needs_person": report.needs_person.len(),
                    "leases_revoked": report.leases_revoked,
                }));
            store.finish_incident(id, audit).await?;
        } else {
            let audit = AuditEvent::new(ACTOR, "compromise.incomplete")
                .incident(Some(id.to_string()))
                .detail(json!({
                    "rotated": report.rotated.len(),
                    "failed": report.failed.len(),
                    "pending": report.pending.len(),
                }));
            store.append_audit(&[audit]).await?;
        }
        Ok(())
    }

    /// Acts on each secret still to do, `concurrency` at a time, counting progress as each
    /// finishes. Returns why each that failed did (by secret name).
    async fn act_on_each(
        &self,
        incident: &IncidentRecord,
        total: usize,
        todo: Vec<PlanItem>,
        concurrency: usize,
    ) -> HashMap<String, String> {
        let id = incident.id.as_str();
        let permits = Arc::new(Semaphore::new(concurrency.clamp(1, MAX_CONCURRENCY)));
        self.progress.lock().expect("progress lock").insert(
            id.to_string(),
            Progress {
                total,
                done: total - todo.len(),
                failed: 0,
                finished: false,
            },
        );
        let mut work = tokio::task::JoinSet::new();
        for item in todo {
            let permits = permits.clone();
            let engine = self.engine.clone();
            let incident = incident.clone();
            work.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore never closed");
                let result = act(&engine, &incident, &item).await;
                if let Err(e) = &result {
                    tracing::warn!(incident = %incident.id, secret = %item.name, error = %e, "not rotated");
                }
                (item.name, result.err())
            });
        }
        let mut failures = HashMap::new();
        while let Some(done) = work.join_next().await {
            let failed = match done {
                Ok((_, None)) => false,
                Ok((name, Some(error))) => {
                    failures.insert(name, error);
                    true
                }
                Err(_) => true,
            };
            self.note_progress(id, |p| {
                p.done += 1;
                p.failed += usize::from(failed);
            });
        }
        failures
    }

    /// The report of an incident, from the store (consistent across restarts).
    pub async fn report(&self, id: &str) -> Result<Report, CompromiseError> {
        self.report_as(id, self.is_running(id)).await
    }

    /// The report, as of a run that is (`running`) or is not in progress.
    async fn report_as(&self, id: &str, running: bool) -> Result<Report, CompromiseError> {
        let store = self.engine.vault().store();
        let incident = store
            .incident(id)
            .await?
            .ok_or_else(|| CompromiseError::UnknownSecret(format!("incident {id}")))?;
        let plan = self.plan(&incident.scope).await?;
        let rotations: HashMap<String, (RotationState, Option<String>)> = store
            .incident_rotations(id)
            .await?
            .into_iter()
            .map(|r| (r.secret, (r.state, r.last_error)))
            .collect();
        let stored = store.list().await?;
        let quarantine: HashMap<&str, Option<String>> = stored
            .iter()
            .filter(|s| s.quarantined_at.is_some())
            .map(|s| (s.name.as_str(), s.last_error.clone()))
            .collect();
        // A new value stored since the incident started (rotations carry the incident's id;
        // this is a person's `put`).
        let replaced: HashSet<&str> = stored
            .iter()
            .filter(|s| s.version.is_some() && s.updated_at > incident.started_at)
            .map(|s| s.name.as_str())
            .collect();
        let mut report = Report {
            incident_id: id.to_string(),
            rotated: Vec::new(),
            failed: Vec::new(),
            leases_revoked: incident.leases_revoked,
            needs_person: Vec::new(),
            resolved: Vec::new(),
            pending: Vec::new(),
            finished: !running,
            assume_compromise: incident.assume_compromise,
        };
        for item in &plan.secrets {
            if item.action == Action::Rotate && is_issue_only(&self.engine, &item.name) {
                // Only per-lease credentials, all revoked with the leases.
                report.rotated.push(item.name.clone());
                continue;
            }
            match (&item.action, rotations.get(&item.name)) {
                (Action::Deactivate | Action::NeedsPerson, _)
                    if replaced.contains(item.name.as_str()) =>
                {
                    report.resolved.push(item.name.clone())
                }
                (Action::Deactivate | Action::NeedsPerson, _) => {
                    let f = Failure {
                        name: item.name.clone(),
                        error: format!("needs a person: {}", item.reason.as_deref().unwrap_or("")),
                    };
                    report.needs_person.push(f.clone());
                    report.failed.push(f);
                }
                (Action::Rotate, Some((RotationState::Done, _))) => {
                    report.rotated.push(item.name.clone())
                }
                (Action::Rotate, Some((RotationState::Draining, _)))
                    if !incident.assume_compromise =>
                {
                    report.rotated.push(item.name.clone())
                }
                (
                    Action::Rotate,
                    Some((state @ (RotationState::Failed | RotationState::RolledBack), error)),
                ) => report.failed.push(Failure {
                    name: item.name.clone(),
                    error: error.clone().unwrap_or_else(|| state.to_string()),
                }),
                (Action::Rotate, _) if quarantine.contains_key(item.name.as_str()) => {
                    report.failed.push(Failure {
                        name: item.name.clone(),
                        error: quarantine[item.name.as_str()]
                            .clone()
                            .unwrap_or_else(|| "quarantined".into()),
                    })
                }
                (Action::Rotate, Some(_)) if !running => report.failed.push(Failure {
                    name: item.name.clone(),
                    error: "the rotation did not finish (it resumes in the daemon)".into(),
                }),
                (Action::Rotate, None) if !running => report.failed.push(Failure {
                    name: item.name.clone(),
                    error: NOT_ATTEMPTED.into(),
                }),
                (Action::Rotate, _) => report.pending.push(item.name.clone()),
            }
        }
        Ok(report)
    }

    /// Waits for background runs to finish (daemon shutdown), up to `timeout`.
    pub async fn wait_idle(&self, timeout: Duration) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        let _ = tokio::time::timeout(timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Does what the plan says for one secret.
async fn act(
    engine: &Arc<Engine>,
    incident: &IncidentRecord,
    item: &PlanItem,
) -> Result<(), String> {
    let id = Some(incident.id.as_str());
    match &item.action {
        Action::NeedsPerson => Ok(()),
        Action::Deactivate => deactivate(engine, incident, &item.name).await,
        Action::Rotate => {
            if is_issue_only(engine, &item.name) {
                // Nothing stored to rotate: every credential was per lease, and those leases
                // were revoked above. Record the secret as handled for the incident.
                return Ok(());
            }
            for round in 0..2 {
                let ticket = match engine
                    .request(
                        &item.name,
                        Reason::Compromise,
                        incident.assume_compromise,
                        id,
                    )
                    .await
                {
                    Ok(t) => t,
                    Err(EngineError::NeedsPerson { reason, .. }) => return Err(reason),
                    Err(e) => return Err(e.to_string()),
                };
                let record = engine
                    .wait(&ticket.rotation_id, Duration::from_secs(24 * 3600))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the rotation vanished")?;
                // A rotation that was already under way may have promoted a value minted before
                // the incident began (and so possibly exposed): rotate once more.
                let fresh = current_created_at(engine, &item.name)
                    .await
                    .is_some_and(|t| t >= incident.started_at);
                if record.state == RotationState::Done && !fresh && round == 0 {
                    continue;
                }
                return match record.state {
                    RotationState::Failed | RotationState::RolledBack => Err(record
                        .last_error
                        .unwrap_or_else(|| record.state.to_string())),
                    _ => Ok(()),
                };
            }
            Ok(())
        }
    }
}

fn is_issue_only(engine: &Engine, name: &str) -> bool {
    let catalog = engine.catalog();
    catalog
        .secrets
        .get(name)
        .and_then(|s| catalog.providers.get(&s.provider))
        .is_some_and(|p| p.can(Op::Issue) && !p.can(Op::Create))
}

async fn current_created_at(engine: &Engine, name: &str) -> Option<Millis> {
    engine
        .vault()
        .store()
        .sealed(name, None)
        .await
        .ok()
        .flatten()
        .map(|s| s.version.created_at)
}

/// For providers that cannot create keys: revoke (deactivate) the current one upstream.
async fn deactivate(
    engine: &Arc<Engine>,
    incident: &IncidentRecord,
    name: &str,
) -> Result<(), String> {
    let vault = engine.vault();
    let Ok(current) = vault.read(name, None).await else {
        return Ok(()); // nothing current: nothing to deactivate
    };
    let target = Credential {
        version: Some(current.version),
        value: Secret::new(current.value.expose()),
        meta: current.meta.clone(),
    };
    engine
        .revoke_credential(name, Some(target), None)
        .await
        .map_err(|e| e.to_string())?;
    let audit = AuditEvent::new(ACTOR, "secret.deactivated")
        .secret(name)
        .incident(Some(incident.id.clone()))
        .detail(json!({ "version": current.version }));
    vault
        .store()
        .revoke_version(name, &current.secret_id, current.version, audit)
        .await
        .map_err(|e| e.to_string())?;
    tracing::warn!(
        secret = name,
        version = current.version,
        "deactivated; a person must create the replacement"
    );
    Ok(())
}

/// A one-line summary per secret for the plan printout.
pub fn describe_plan(plan: &Plan, concurrency: usize) -> Vec<String> {
    let mut by_action: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = Vec::new();
    for item in &plan.secrets {
        let what = match item.action {
            Action::Rotate => "rotate",
            Action::Deactivate => "deactivate",
            Action::NeedsPerson => "needs a person",
        };
        let why = item.reason.as_ref();
        *by_action.entry(what).or_default() += 1;
        lines.push(format!(
            "  {:<14} {} (provider {}, version {}, {} consumer(s), {} live lease(s)){}",
            what,
            item.name,
            item.provider,
            item.version.map_or("-".into(), |v| v.to_string()),
            item.consumers.len(),
            item.live_leases,
            why.map(|w| format!(": {w}")).unwrap_or_default()
        ));
    }
    let summary = by_action
        .iter()
        .map(|(what, n)| match *what {
            "needs a person" => format!("{n} left to a person"),
            _ => format!("{n} to {what}"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    lines.insert(
        0,
        format!(
            "plan: {} secret(s) in scope ({summary}); {} live lease(s)",
            plan.secrets.len(),
            plan.live_leases
        ),
    );
    let rotating = plan
        .secrets
        .iter()
        .filter(|i| i.action == Action::Rotate)
        .count();
    lines.insert(
        1,
        format!(
            "concurrency: {} rotation(s) at once",
            concurrency.min(rotating.max(1))
        ),
    );
    for bound in plan
        .plugins
        .iter()
        .filter(|b| b.max_concurrency < concurrency.min(b.secrets))
    {
        lines.insert(
            2,
            format!(
                "  bound: plugin {} takes {} request(s) at once, so its {} secret(s) rotate at \
                 most {} at a time (raise [plugins.{}] max_concurrency to lift it)",
                bound.plugin,
                bound.max_concurrency,
                bound.secrets,
                bound.max_concurrency,
                bound.plugin
            ),
        );
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scopes_select_by_name_tag_and_provider() {
        let all = Scope::default();
        assert!(all.covers("a", &[], "random"));
        let names = Scope::secret("a");
        assert!(names.covers("a", &[], "x") && !names.covers("b", &[], "x"));
        let prod_aws = Scope {
            tags: tags(&["prod"]),
            providers: tags(&["aws-iam"]),
            ..Scope::default()
        };
        assert!(prod_aws.covers("x", &tags(&["prod", "aws"]), "aws-iam"));
        assert!(!prod_aws.covers("x", &tags(&["prod"]), "random"));
        assert!(!prod_aws.covers("x", &tags(&["dev"]), "aws-iam"));
        let with_name = Scope {
            names: tags(&["special"]),
            ..prod_aws.clone()
        };
        assert!(with_name.covers("special", &[], "manual"));
        assert_eq!(
            Scope {
                names: tags(&["b", "a"]),
                ..Scope::default()
            }
            .canonical(),
            Scope {
                names: tags(&["a", "b"]),
                ..Scope::default()
            }
            .canonical()
        );
    }
}
