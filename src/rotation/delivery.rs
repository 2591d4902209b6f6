//! Consumer delivery: pushing a version to each consumer of a secret, recording each
//! acknowledgement, and bringing lagging consumers up to date at start.

use std::collections::HashMap;

use futures_util::future::join_all;
use keywarden_plugin_sdk::{Op, Request, Secret};
use serde_json::json;

use super::backoff;
use super::catalog::SecretSpec;
use super::engine::{ACTOR, Engine, EngineError};
use super::steps::StepError;
use crate::audit::AuditEvent;
use crate::consumer::{Consumer, Delivery, FileConsumer};
use crate::store::SecretRecord;
use crate::vault::Revealed;

impl Engine {
    /// Delivers `version` to every consumer of `spec` that has not acknowledged it, each
    /// retried with backoff on its own, and with `check_files` also to each file consumer whose
    /// file no longer holds it (deleted, emptied or edited since it was written). Fails (for the
    /// caller to retry) if any is still behind.
    pub(super) async fn deliver_all(
        &self,
        spec: &SecretSpec,
        version: i64,
        check_files: bool,
    ) -> Result<(), StepError> {
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
        let (mut pending, current): (Vec<&String>, Vec<&String>) = spec
            .consumers
            .iter()
            .partition(|c| acked.get(*c).is_none_or(|v| *v < version));
        // A file several secrets write holds whichever came last: it is not checked.
        let files: Vec<(&String, &FileConsumer)> = if check_files {
            current
                .into_iter()
                .filter(|name| !self.catalog.shared_files.contains(name.as_str()))
                .filter_map(|name| match self.catalog.consumers.get(name.as_str()) {
                    Some(Consumer::File(file)) => Some((name, file)),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        if pending.is_empty() && files.is_empty() {
            return Ok(());
        }
        let revealed = self.vault.read(&spec.name, Some(version)).await?;
        for (name, file) in files {
            if !file.holds(&Delivery::of(&revealed)) {
                tracing::warn!(secret = %spec.name, consumer = %name, path = %file.path.display(), version, "the file no longer holds the current version (deleted or changed since); writing it again");
                pending.push(name);
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        // A test holds a sync here, between reading what to write and writing it
        // (`FAILPOINTS=consumers.rewrite=sleep(…)`), while a rotation starts.
        #[cfg(feature = "failpoints")]
        if check_files && std::env::var_os("FAILPOINTS").is_some() {
            tokio::task::block_in_place(|| {
                crash_point!("consumers.rewrite");
            });
        }
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

    pub(super) async fn deliver_one(
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
        let delivery = Delivery::of(revealed);
        let result = match consumer {
            Consumer::File(file) => file.deliver(&delivery).await.map_err(|e| e.to_string()),
            Consumer::Plugin {
                host,
                kind,
                settings,
                credentials,
            } => {
                let request = self
                    .plugin_request(Op::Push, kind, Some(&spec.name), settings, credentials)
                    .await
                    .map_err(|e| e.to_string())?;
                let request = Request {
                    version: Some(revealed.version),
                    value: Some(Secret::new(revealed.value.expose())),
                    meta: Some(revealed.meta.clone()),
                    ..request
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
                let audit = AuditEvent::new(ACTOR, "consumer.delivered")
                    .secret(&spec.name)
                    .detail(json!({ "consumer": consumer_name, "version": revealed.version }));
                store
                    .record_delivery(&secret.id, consumer_name, revealed.version, Ok(audit))
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

    /// Delivers the current version to consumers that lag behind it (a consumer added to the
    /// config) and writes again a file consumer's file that no longer holds it (deleted, emptied
    /// or edited while the daemon was down or since). Runs at start and reload, and after a
    /// `put`. Retries with backoff.
    ///
    /// It holds the secret's delivery lock from reading the current version to the last write,
    /// as a rotation's push does, so a rotation that moves on meanwhile pushes its version
    /// after these writes, never before them. It need not wait for a rotation under way: before
    /// its promotion the current version is still the one consumers must hold, and from then on
    /// the current version is the rotation's own (a promoted rotation never rolls back), which
    /// this delivers as its push would.
    pub async fn sync_consumers(&self, name: &str) -> Result<(), EngineError> {
        let spec = self.spec(name)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let delivered = {
                let _delivering = self.delivery_lock(name).await;
                let Some(current) = self.vault.store().sealed(name, None).await? else {
                    return Ok(());
                };
                self.deliver_all(spec, current.version.version, true).await
            };
            match delivered {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= spec.max_attempts => {
                    return Err(EngineError::Undelivered {
                        name: name.to_string(),
                        reason: e.message,
                    });
                }
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

    /// Takes `name`'s delivery lock (see [`Engine::sync_consumers`]). Only secrets with
    /// consumers take one, so the locks are as many as they.
    pub(super) async fn delivery_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .delivering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}
