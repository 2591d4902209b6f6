//! The steps of a rotation, one journal move each (docs/design.md §4): create, verify (or
//! roll back), promote, push, drain, revoke; and what happens when a step fails (retry with
//! backoff, quarantine, or an end that leaves nothing behind upstream).

use std::time::Duration;

use keywarden_plugin_sdk::{Credential, Op, Request, Secret};
use serde_json::json;

use super::backoff;
use super::catalog::SecretSpec;
use super::drain::{DrainEnd, drain};
use super::engine::{ACTOR, Engine, PluginCallError};
use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::plugin_host::PluginError;
use crate::provider::Provider;
use crate::rotation::scheduler::Schedule;
use crate::store::RotationState;
use crate::store::{RotationRecord, SecretRecord, StepChange, StoreError};
use crate::value::SecretValue;
use crate::vault::{Bound, Meta, Revealed, VaultError, short_fingerprint};

/// A step's failure.
#[derive(Debug)]
pub(super) struct StepError {
    pub(super) retryable: bool,
    pub(super) message: String,
}

impl StepError {
    pub(super) fn fatal(message: impl Into<String>) -> Self {
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
pub(super) enum Outcome {
    /// The journal moved to this record; run its next step (no need to read it again).
    Next(Box<RotationRecord>),
    /// The journal moved (a retry was scheduled); read it again and go on.
    Moved,
    /// The journal was no longer in the state this step started from (another driver moved
    /// it first): nothing was written; re-read it and go on from where it is.
    Reread,
    /// The rotation ended or parked; stop driving it.
    Stop,
}

fn new_version(rotation: &RotationRecord) -> Result<i64, StepError> {
    rotation
        .to_version
        .ok_or_else(|| StepError::fatal("the rotation has no new version"))
}

impl From<&Revealed> for Credential {
    fn from(revealed: &Revealed) -> Credential {
        Credential {
            version: Some(revealed.version),
            value: Secret::new(revealed.value.expose()),
            meta: revealed.meta.clone(),
        }
    }
}

impl From<PluginCallError> for StepError {
    fn from(e: PluginCallError) -> Self {
        match e {
            PluginCallError::Plugin(e) => e.into(),
            PluginCallError::Store(e) => e.into(),
            PluginCallError::Vault(e) => e.into(),
            e @ (PluginCallError::Credential { .. }
            | PluginCallError::NotDeclared(_)
            | PluginCallError::NoPlugin(_)) => StepError::fatal(e.to_string()),
        }
    }
}

impl Engine {
    pub(super) fn audit(
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

    pub(super) async fn advance(
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
                // The crash tests stop the daemon right after each step's commit.
                match change.to {
                    RotationState::Created => {
                        crash_point!("rotation.created");
                    }
                    RotationState::Verified => {
                        crash_point!("rotation.verified");
                    }
                    RotationState::Promoted => {
                        crash_point!("rotation.promoted");
                    }
                    RotationState::Pushed => {
                        crash_point!("rotation.pushed");
                    }
                    RotationState::Draining => {
                        crash_point!("rotation.draining");
                    }
                    _ => {}
                }
                // The record as the journal now holds it (the store's UPDATE, applied here).
                let mut moved = rotation.clone();
                if let Some(v) = &change.insert_pending {
                    moved.to_version = Some(v.version);
                }
                self.emit(&moved, change.to, None);
                moved.state = change.to;
                moved.attempts = 0;
                moved.last_error = change.error.clone();
                moved.next_attempt_at = None;
                moved.draining_since = change.draining_since.or(moved.draining_since);
                moved.updated_at = self.clock.now();
                Ok(Outcome::Next(Box::new(moved)))
            }
            Err(StoreError::Conflict(_)) => {
                tracing::warn!(secret = %rotation.secret_name, rotation = %rotation.id, from = %change.from, to = %change.to, "the rotation moved under this step (another driver); re-reading the journal");
                Ok(Outcome::Reread)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn secret_record(&self, name: &str) -> Result<SecretRecord, StepError> {
        self.vault
            .store()
            .secret(name)
            .await?
            .ok_or_else(|| StepError::fatal(format!("secret {name:?} disappeared from the store")))
    }

    pub(super) async fn credential(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Credential, StepError> {
        let revealed = self.vault.read(name, Some(version)).await?;
        Ok(Credential::from(&revealed))
    }

    pub(super) async fn request_for(
        &self,
        op: Op,
        rotation: &RotationRecord,
        spec: &SecretSpec,
    ) -> Result<Request, StepError> {
        let mut request = self
            .plugin_request(
                op,
                &spec.provider,
                Some(&spec.name),
                &spec.settings,
                &spec.credentials,
            )
            .await?;
        request.rotation_id = Some(rotation.id.clone());
        Ok(request)
    }

    pub(super) async fn call(
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

    pub(super) async fn step(
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

    pub(super) async fn create(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
    ) -> Result<Outcome, StepError> {
        let proposed = match &rotation.proposed {
            Some(sealed) => {
                let keys = self.vault.keys_in_use().await;
                let secret = self.secret_record(&spec.name).await?;
                self.vault.open_bound(
                    &keys,
                    &secret,
                    Bound::Proposed(&rotation.id),
                    sealed,
                    &Default::default(),
                )?
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
        // Sealed and committed under the keys in use (see `KeysInUse`).
        let keys = self.vault.keys_in_use().await;
        let secret = self.secret_record(&spec.name).await?;
        let version = secret.latest_version.unwrap_or(0) + 1;
        let sealed = self
            .vault
            .seal_version(&keys, &secret, version, &value, meta)?;
        let fingerprint = short_fingerprint(&sealed.fingerprint);
        let change = StepChange {
            insert_pending: Some(sealed),
            ..StepChange::to(RotationState::Planned, RotationState::Created)
        };
        let outcome = self
            .advance(
                rotation,
                change,
                json!({ "to_version": version, "fingerprint": fingerprint }),
            )
            .await;
        drop(keys);
        outcome
    }

    pub(super) async fn verify(
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
    pub(super) async fn roll_back(
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
        if let Outcome::Reread = outcome {
            return Ok(outcome);
        }
        tracing::error!(secret = %spec.name, rotation = %rotation.id, error = why, "verification failed; the new credential was revoked and the current one stays");
        self.count_failure(rotation, spec, why).await?;
        self.emit(rotation, RotationState::RolledBack, Some(why.to_string()));
        Ok(Outcome::Stop)
    }

    pub(super) async fn promote(
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

    pub(super) async fn push(
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
        if !spec.consumers.is_empty() {
            let _delivering = self.delivery_lock(&spec.name).await;
            self.deliver_all(spec, to, false).await?;
        }
        let outcome = self
            .advance(
                rotation,
                StepChange::to(RotationState::Promoted, RotationState::Pushed),
                json!({ "version": to, "consumers": spec.consumers }),
            )
            .await?;
        Ok(outcome)
    }

    /// Emergency: revoke the old version right after promotion, without waiting for leases.
    pub(super) async fn revoke_old_now(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
        from: i64,
    ) -> Result<(), StepError> {
        if !self.revoke_upstream(rotation, spec, provider, from).await? {
            return Ok(());
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

    /// Revokes version `from` upstream, unless the store already has it revoked (then returns
    /// false: an earlier step did it).
    async fn revoke_upstream(
        &self,
        rotation: &RotationRecord,
        spec: &SecretSpec,
        provider: &Provider,
        from: i64,
    ) -> Result<bool, StepError> {
        let old = self.vault.read(&spec.name, Some(from)).await?;
        if old.stage == crate::store::Stage::Revoked {
            return Ok(false);
        }
        if provider.can(Op::Revoke) && provider.overlaps() {
            let mut request = self.request_for(Op::Revoke, rotation, spec).await?;
            request.target = Some(Credential::from(&old));
            self.call(provider, request).await?;
        }
        Ok(true)
    }

    pub(super) async fn after_push(
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
                // Escalated after its promotion began, N may still be live upstream: an
                // emergency revokes it now, without waiting for leases.
                self.revoke_upstream(rotation, spec, provider, from).await?;
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

    pub(super) async fn drain_step(
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
    pub(super) async fn finished(&self, spec: &SecretSpec) -> Result<(), StepError> {
        if let Some(Schedule::Every(every)) = &spec.schedule {
            let secret = self.secret_record(&spec.name).await?;
            self.reschedule(&secret.id, *every).await?;
        }
        Ok(())
    }

    /// The scheduler next rotates the secret `after` from now.
    async fn reschedule(&self, secret_id: &str, after: Duration) -> Result<(), StepError> {
        let next = self.clock.now() + after.as_millis() as Millis;
        self.vault
            .store()
            .set_next_rotation(secret_id, Some(next))
            .await?;
        self.scheduler_wake.notify_one();
        Ok(())
    }

    pub(super) async fn count_failure(
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
            self.reschedule(&rotation.secret_id, delay).await?;
        }
        Ok(())
    }

    pub(super) async fn park(
        &self,
        rotation: &RotationRecord,
        why: &str,
    ) -> Result<Outcome, StepError> {
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

    pub(super) async fn step_failed(
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
                    if let Outcome::Reread = outcome {
                        return Ok(outcome);
                    }
                    tracing::error!(secret = %spec.name, rotation = %rotation.id, error = %error.message, "rotation failed");
                    self.count_failure(rotation, spec, &error.message).await?;
                    self.emit(rotation, RotationState::Failed, Some(error.message.clone()));
                    Ok(Outcome::Stop)
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
}
