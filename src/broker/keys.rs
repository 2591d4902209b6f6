//! Pushing the route secrets' keys to `keywarden-broker` (`PUT /v1/keys`): every key when a
//! broker process starts, and a secret's new current version as soon as the store says it may
//! have changed (a rotation's promotion, a `put`, another daemon's write on PostgreSQL).
//!
//! The broker is a consumer of its keys: every version it may still use is held here like a
//! lease ([`Hold`]) until the broker answers a push of a newer one, which it does once no
//! request started on an older version is running. So a rotation's drain waits for the
//! brokered requests in flight on the old key, and revokes it upstream only after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use keywarden_plugin_sdk::broker::{Key, Keys, TOKEN_HEADER};
use tokio::sync::Notify;

use super::process::{BrokerError, BrokerProcess};
use crate::leases::{Hold, Leases};
use crate::vault::{Revealed, Vault, VaultError};

/// What the broker process has of each route secret.
#[derive(Default)]
struct State {
    /// Bumped for each new broker process: answers to an older one's pushes are ignored.
    generation: u64,
    /// The process died and has not started again: nothing to push to (its next start is
    /// given every key).
    down: bool,
    /// The latest version pushed, with its secret's id (`None`: the key was dropped).
    pushed: HashMap<String, Option<(String, i64)>>,
    /// The versions the broker may still be using, held.
    held: HashMap<String, Vec<(i64, Hold)>>,
}

/// The version `read` says is current, held: read, held, then read again until the version
/// held is still the current one. A version promoted away between its read and its hold may
/// already be drained (the drain found no hold) and revoked upstream; the broker must not be
/// given it.
async fn hold_current<F, Fut>(
    leases: &Arc<Leases>,
    mut read: F,
) -> Result<Option<(Revealed, Hold)>, VaultError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Revealed>, VaultError>>,
{
    let mut current = read().await?;
    loop {
        let Some(r) = current else {
            return Ok(None);
        };
        let hold = leases.hold(&r.secret_id, r.version);
        let again = read().await?;
        if again
            .as_ref()
            .is_some_and(|a| a.secret_id == r.secret_id && a.version == r.version)
        {
            return Ok(Some((r, hold)));
        }
        current = again;
    }
}

/// Keeps the broker process's keys current.
pub struct KeyPusher {
    vault: Arc<Vault>,
    leases: Arc<Leases>,
    /// The route secrets.
    secrets: Vec<String>,
    state: Mutex<State>,
    /// Notified when a key could not be read or pushed: the watcher tries again.
    failed: Notify,
}

impl std::fmt::Debug for KeyPusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPusher")
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

/// One push: the body, and per secret the version it carries (`None`: dropped).
struct Push {
    keys: Keys,
    versions: Vec<(String, Option<i64>)>,
    generation: u64,
}

impl KeyPusher {
    /// Pushes the values of `secrets` (read from `vault`), holding their versions in `leases`.
    pub fn new(vault: Arc<Vault>, leases: Arc<Leases>, mut secrets: Vec<String>) -> Self {
        secrets.sort();
        secrets.dedup();
        KeyPusher {
            vault,
            leases,
            secrets,
            state: Mutex::default(),
            failed: Notify::new(),
        }
    }

    /// Resolves when a key could not be read or pushed since the last call (then every key is
    /// read again and what differs pushed: [`KeyPusher::changed`] with `None`).
    pub async fn failed(&self) {
        self.failed.notified().await;
    }

    /// A new broker process has started: nothing the last one used is in use any more. Pushes
    /// every key and waits until the process has taken them (at once: nothing older runs).
    pub async fn start_over(&self, process: &BrokerProcess) -> Result<(), BrokerError> {
        self.reset(false);
        match self.prepare(None).await {
            Some(push) => self.send(process, push).await,
            None => Ok(()),
        }
    }

    /// The version of `secret` the broker process serves new requests with, and the older
    /// ones requests there still use (held until they end), oldest first.
    pub fn in_use(&self, secret: &str) -> (Option<i64>, Vec<i64>) {
        let state = self.state.lock().expect("key state");
        let serving = state.pushed.get(secret).cloned().flatten().map(|(_, v)| v);
        let mut draining: Vec<i64> = state
            .held
            .get(secret)
            .map(|h| h.iter().map(|(v, _)| *v).collect())
            .unwrap_or_default();
        draining.retain(|v| Some(*v) != serving);
        draining.sort_unstable();
        draining.dedup();
        (serving, draining)
    }

    /// The broker process is gone, and with it every request that used a key: lets go of
    /// every version held, and ignores what the pushes to it still in flight get back.
    pub fn forget(&self) {
        self.reset(true);
    }

    /// A new generation: nothing pushed, nothing held.
    fn reset(&self, down: bool) {
        let mut state = self.state.lock().expect("key state");
        let generation = state.generation + 1;
        *state = State {
            generation,
            down,
            ..State::default()
        };
    }

    /// The current version of `name` (`None`: of any secret) may have changed: pushes what did
    /// change, and lets go of older versions once the broker has no request left on them.
    pub async fn changed(self: &Arc<Self>, process: &Arc<BrokerProcess>, name: Option<&str>) {
        if name.is_some_and(|n| {
            self.secrets
                .binary_search_by(|s| s.as_str().cmp(n))
                .is_err()
        }) || self.state.lock().expect("key state").down
        {
            return;
        }
        let Some(push) = self.prepare(name).await else {
            return;
        };
        // The broker answers once older requests have ended: that may be minutes away, and
        // other secrets' versions must not wait behind it.
        let (this, process) = (self.clone(), process.clone());
        tokio::spawn(async move {
            if let Err(e) = this.send(&process, push).await {
                tracing::warn!(error = %e, "the broker process did not take a new key");
            }
        });
    }

    /// Reads the current versions of `name` (or every route secret) and notes, with holds, those
    /// that differ from what was pushed; `None` when nothing changed.
    async fn prepare(&self, name: Option<&str>) -> Option<Push> {
        let names: Vec<&str> = match name {
            Some(n) => vec![n],
            None => self.secrets.iter().map(String::as_str).collect(),
        };
        let mut read = Vec::with_capacity(names.len());
        for name in names {
            let current = hold_current(&self.leases, || async {
                match self.vault.read(name, None).await {
                    Ok(r) => Ok(Some(r)),
                    Err(VaultError::NoSuchSecret(_) | VaultError::NoCurrentVersion(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            });
            match current.await {
                // A value no header can carry (a line break in it) is no key: the route is
                // skipped, as for a secret without a value.
                Ok(Some((r, _)))
                    if hyper::header::HeaderValue::from_str(r.value.expose()).is_err() =>
                {
                    tracing::warn!(
                        secret = name,
                        version = r.version,
                        "the value cannot be sent in an HTTP header; the broker skips this route"
                    );
                    read.push((name, None));
                }
                Ok(Some((r, hold))) => {
                    read.push((name, Some((r.secret_id, r.version, r.value, hold))));
                }
                Ok(None) => read.push((name, None)),
                // The store could not be read: the broker keeps what it has until a retry.
                Err(e) => {
                    tracing::warn!(secret = name, error = %e, "cannot read a route's key");
                    self.failed.notify_one();
                }
            }
        }
        let mut state = self.state.lock().expect("key state");
        let mut push = Push {
            keys: Keys::default(),
            versions: Vec::new(),
            generation: state.generation,
        };
        for (name, current) in read {
            let pushed = state.pushed.get(name).cloned();
            match current {
                Some((secret_id, version, value, hold)) => {
                    if matches!(&pushed, Some(Some((id, p))) if *id == secret_id && *p >= version) {
                        continue;
                    }
                    state
                        .held
                        .entry(name.to_string())
                        .or_default()
                        .push((version, hold));
                    state
                        .pushed
                        .insert(name.to_string(), Some((secret_id.clone(), version)));
                    push.keys.keys.insert(
                        name.to_string(),
                        Some(Key {
                            id: secret_id,
                            version,
                            value: value.expose().to_string(),
                        }),
                    );
                    push.versions.push((name.to_string(), Some(version)));
                }
                None => {
                    if matches!(pushed, Some(None)) {
                        continue;
                    }
                    state.pushed.insert(name.to_string(), None);
                    push.keys.keys.insert(name.to_string(), None);
                    push.versions.push((name.to_string(), None));
                }
            }
        }
        (!push.versions.is_empty()).then_some(push)
    }

    /// Sends `push` and, once the broker answered, lets go of the versions it replaced.
    async fn send(&self, process: &BrokerProcess, push: Push) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(&push.keys).expect("keys serialize");
        drop(push.keys);
        // A push lost on its way (tests: `FAILPOINTS=broker.key-push=…`).
        #[cfg(feature = "failpoints")]
        let lost = (|| {
            fail::fail_point!("broker.key-push", |_| true);
            false
        })();
        #[cfg(not(feature = "failpoints"))]
        let lost = false;
        let answer = if lost {
            Err(BrokerError::Unavailable("the push was lost".into()))
        } else {
            process
                .send(
                    Request::put("/v1/keys")
                        .header("host", "broker")
                        .header(TOKEN_HEADER, process.token())
                        .body(Full::new(Bytes::from(body)))
                        .expect("a valid request"),
                )
                .await
        };
        let mut state = self.state.lock().expect("key state");
        if state.generation != push.generation {
            return Ok(()); // that process is gone, and its holds with it
        }
        let taken = match &answer {
            Ok(a) => a.status().is_success(),
            Err(_) => false,
        };
        for (name, version) in push.versions {
            let held = state.held.entry(name.clone()).or_default();
            match (taken, version) {
                // Nothing older is in use: only this version (and any newer) stays held.
                (true, Some(v)) => held.retain(|(h, _)| *h >= v),
                (true, None) => held.clear(),
                // Not taken: this version is not in use, and is pushed again at the retry.
                (false, v) => {
                    held.retain(|(h, _)| Some(*h) != v);
                    state.pushed.remove(&name);
                }
            }
        }
        drop(state);
        if !taken {
            self.failed.notify_one();
        }
        match answer {
            Ok(a) if a.status().is_success() => Ok(()),
            Ok(a) => Err(BrokerError::Unavailable(format!(
                "it refused the keys ({})",
                a.status()
            ))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(version: i64) -> Revealed {
        Revealed {
            name: "openai/prod".into(),
            secret_id: "s1".into(),
            version,
            stage: crate::store::Stage::Current,
            value: crate::value::SecretValue::new(format!("sk-v{version}")),
            meta: crate::vault::Meta::new(),
            fingerprint: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_version_promoted_away_between_its_read_and_its_hold_is_not_the_one_held() {
        let leases = crate::leases::tests::in_memory();
        // Version 1 is read; version 2 is promoted before the hold (whose drain of version 1
        // found nothing held); then version 2 is what the store says.
        let mut reads = vec![Some(version(1)), Some(version(2)), Some(version(2))].into_iter();
        let (held, hold) = hold_current(&leases, || std::future::ready(Ok(reads.next().unwrap())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held.version, 2);
        assert_eq!(leases.live_on("s1", 2).0, 1);
        assert_eq!(
            leases.live_on("s1", 1).0,
            0,
            "the drained version is still held"
        );
        drop(hold);
        assert_eq!(leases.live_on("s1", 2).0, 0);

        // Unchanged between the two reads: held at once; gone: nothing held.
        let mut reads = vec![Some(version(3)), Some(version(3))].into_iter();
        let (held, _hold) = hold_current(&leases, || std::future::ready(Ok(reads.next().unwrap())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(held.version, 3);
        let mut reads = vec![Some(version(3)), None].into_iter();
        let none = hold_current(&leases, || std::future::ready(Ok(reads.next().unwrap())))
            .await
            .unwrap();
        assert!(none.is_none());
        assert_eq!(leases.live_on("s1", 3).0, 1);
    }
}
