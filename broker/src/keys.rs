//! The route secrets' current keys, as the daemon pushes them (`PUT /v1/keys`), and which
//! versions requests in flight still use.
//!
//! A request takes the key of each route it tries when it tries it ([`KeyTable::take`]) and
//! keeps the one that answered until its answer has ended. A pushed version serves every
//! request that starts after it; the push is answered once no request started on an older
//! version of its secret is still running, which is when the daemon lets a rotation revoke
//! that older key upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hyper::header::HeaderValue;
use keywarden_plugin_sdk::broker::Keys;
use tokio::sync::Notify;

/// A secret's current key.
struct Current {
    id: String,
    version: i64,
    value: HeaderValue,
}

#[derive(Default)]
struct Inner {
    current: HashMap<String, Current>,
    /// Requests in flight per (secret, version).
    in_use: HashMap<(String, i64), usize>,
}

/// The keys and their use.
#[derive(Default)]
pub struct KeyTable {
    inner: Mutex<Inner>,
    /// Notified whenever a request lets go of a key.
    released: Notify,
}

/// A key in use by a request, until dropped.
pub struct InUse {
    table: Arc<KeyTable>,
    secret: String,
    /// The version.
    pub version: i64,
    /// The value to inject (marked sensitive).
    pub value: HeaderValue,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().expect("key table lock");
        let key = (std::mem::take(&mut self.secret), self.version);
        if let Some(n) = inner.in_use.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                inner.in_use.remove(&key);
            }
        }
        drop(inner);
        self.table.released.notify_waiters();
    }
}

impl KeyTable {
    /// The current key of `secret`, in use until the returned guard is dropped; `None` when
    /// the daemon has pushed none.
    pub fn take(self: &Arc<Self>, secret: &str) -> Option<InUse> {
        let mut inner = self.inner.lock().expect("key table lock");
        let current = inner.current.get(secret)?;
        let (version, value) = (current.version, current.value.clone());
        *inner
            .in_use
            .entry((secret.to_string(), version))
            .or_default() += 1;
        Some(InUse {
            table: self.clone(),
            secret: secret.to_string(),
            version,
            value,
        })
    }

    /// Takes in `keys` (a version never replaces a newer one of the same secret; `None` drops a
    /// secret's key), then waits until no request that started on an older version of those
    /// secrets (on any version, for a dropped key) is still running. A key that is no valid
    /// header value is refused, and nothing of the push is taken in.
    pub async fn set(&self, keys: Keys) -> Result<(), String> {
        let mut parsed = Vec::with_capacity(keys.keys.len());
        for (secret, key) in keys.keys {
            let key = match key {
                Some(k) => {
                    let mut value = HeaderValue::from_str(&k.value).map_err(|_| {
                        format!("the key of {secret:?} is not a valid header value")
                    })?;
                    value.set_sensitive(true);
                    Some(Current {
                        id: k.id,
                        version: k.version,
                        value,
                    })
                }
                None => None,
            };
            parsed.push((secret, key));
        }
        let mut waits = Vec::new();
        {
            let mut inner = self.inner.lock().expect("key table lock");
            for (secret, key) in parsed {
                match key {
                    Some(key) => {
                        waits.push((secret.clone(), key.version));
                        if inner
                            .current
                            .get(&secret)
                            .is_none_or(|c| c.id != key.id || c.version < key.version)
                        {
                            inner.current.insert(secret, key);
                        }
                    }
                    None => {
                        // Answered once no request uses any version of it.
                        waits.push((secret.clone(), i64::MAX));
                        inner.current.remove(&secret);
                    }
                }
            }
        }
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.older_in_use(&waits) {
                return Ok(());
            }
            released.await;
        }
    }

    /// Whether a request uses a version older than one of `versions` of its secret.
    fn older_in_use(&self, versions: &[(String, i64)]) -> bool {
        let inner = self.inner.lock().expect("key table lock");
        inner.in_use.keys().any(|(secret, version)| {
            versions
                .iter()
                .any(|(s, newer)| s == secret && version < newer)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keywarden_plugin_sdk::broker::Key;

    use super::*;

    fn push(secret: &str, version: i64, value: &str) -> Keys {
        let mut keys = Keys::default();
        keys.keys.insert(
            secret.to_string(),
            Some(Key {
                id: "id-1".into(),
                version,
                value: value.to_string(),
            }),
        );
        keys
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_switches_new_requests_at_once_and_is_answered_when_older_ones_end() {
        let table = Arc::new(KeyTable::default());
        table.set(push("s", 1, "k1")).await.unwrap();
        let streaming = table.take("s").unwrap();
        assert_eq!(streaming.version, 1);

        let pushing = tokio::spawn({
            let table = table.clone();
            async move { table.set(push("s", 2, "k2")).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !pushing.is_finished(),
            "answered under a request on version 1"
        );
        let next = table.take("s").unwrap();
        assert_eq!((next.version, next.value.as_bytes()), (2, &b"k2"[..]));
        assert!(next.value.is_sensitive());
        drop(next);
        assert!(!pushing.is_finished());

        drop(streaming);
        pushing.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_push_never_replaces_a_newer_key_and_a_dropped_key_waits_for_every_request() {
        let table = Arc::new(KeyTable::default());
        table.set(push("s", 3, "k3")).await.unwrap();
        table.set(push("s", 2, "k2")).await.unwrap();
        assert_eq!(table.take("s").unwrap().version, 3);
        assert!(table.take("other").is_none());

        // The same name, a secret made again: its version 1 is its key.
        let mut again = push("s", 1, "k-again");
        again.keys.get_mut("s").unwrap().as_mut().unwrap().id = "id-2".into();
        table.set(again).await.unwrap();
        assert_eq!(table.take("s").unwrap().value.as_bytes(), b"k-again");

        let streaming = table.take("s").unwrap();
        let dropping = tokio::spawn({
            let table = table.clone();
            async move {
                let mut gone = Keys::default();
                gone.keys.insert("s".into(), None);
                table.set(gone).await
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(table.take("s").is_none(), "a dropped key is used");
        assert!(
            !dropping.is_finished(),
            "answered under a request on the key"
        );
        drop(streaming);
        dropping.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_key_that_is_no_header_value_is_refused_whole() {
        let table = Arc::new(KeyTable::default());
        let mut keys = push("a", 1, "fine");
        keys.keys.insert(
            "b".into(),
            Some(Key {
                id: "id-b".into(),
                version: 1,
                value: "bad\nkey".into(),
            }),
        );
        let err = table.set(keys).await.unwrap_err();
        assert!(!err.contains("bad"), "the key in the error: {err}");
        assert!(table.take("a").is_none());
    }
}
