//! A cache of sealed current versions, for the daemon's read path.
//!
//! It holds exactly what the database holds (ciphertexts and wrapped keys, never plaintext) and
//! is only enabled when this process holds the store lock exclusively, so every write passes
//! through this process and invalidates what it changed. A read that raced with a write does not
//! populate the cache: writers bump an epoch under the same lock, and a reader inserts only if
//! the epoch it saw before reading is still current.
//!
//! Every invalidation is also announced to [`SealedCache::watch`]ers, after the write
//! committed: whoever keeps a copy of a current version elsewhere (the broker process's keys)
//! learns that it may have changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::SealedSecret;

/// Entries beyond which the cache is simply cleared (a safety valve, not an LRU).
const MAX_ENTRIES: usize = 200_000;
/// Changes a slow watcher may fall behind by before it is told everything changed.
const WATCH_BACKLOG: usize = 1024;

#[derive(Debug)]
pub(crate) struct SealedCache {
    inner: Mutex<Inner>,
    changed: broadcast::Sender<Option<Arc<str>>>,
}

impl Default for SealedCache {
    fn default() -> Self {
        SealedCache {
            inner: Mutex::default(),
            changed: broadcast::channel(WATCH_BACKLOG).0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    current: HashMap<String, Arc<SealedSecret>>,
}

impl SealedCache {
    /// The cached current version of `name`, and otherwise the epoch to pass to `insert`.
    pub(crate) fn get(&self, name: &str) -> Result<Arc<SealedSecret>, u64> {
        let inner = self.inner.lock().expect("cache lock");
        inner.current.get(name).cloned().ok_or(inner.epoch)
    }

    /// Caches a row read from the database, unless a write happened since `epoch`.
    pub(crate) fn insert(&self, epoch: u64, name: &str, sealed: Arc<SealedSecret>) {
        let mut inner = self.inner.lock().expect("cache lock");
        if inner.epoch != epoch {
            return;
        }
        if inner.current.len() >= MAX_ENTRIES {
            inner.current.clear();
        }
        inner.current.insert(name.to_string(), sealed);
    }

    /// Forgets `name` (or everything) after a write, and tells the watchers.
    pub(crate) fn invalidate(&self, name: Option<&str>) {
        let mut inner = self.inner.lock().expect("cache lock");
        inner.epoch += 1;
        match name {
            Some(name) => {
                inner.current.remove(name);
            }
            None => inner.current.clear(),
        }
        drop(inner);
        // No watcher is no error.
        let _ = self.changed.send(name.map(Arc::from));
    }

    /// The names whose current version may have changed, as writes commit (`None`: any).
    pub(crate) fn watch(&self) -> broadcast::Receiver<Option<Arc<str>>> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Stage, VersionRecord};

    fn sealed(v: i64) -> Arc<SealedSecret> {
        Arc::new(SealedSecret {
            secret_id: "id".into(),
            wrapped_data_key: vec![],
            version: VersionRecord {
                version: v,
                stage: Stage::Current,
                ciphertext: vec![],
                meta: Default::default(),
                fingerprint: vec![],
                created_at: 0,
            },
            current_mac: None,
        })
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_cached() {
        let cache = SealedCache::default();
        let epoch = cache.get("a").unwrap_err();
        // A write lands between the reader's database read and its insert.
        cache.invalidate(Some("a"));
        cache.insert(epoch, "a", sealed(1));
        assert!(cache.get("a").is_err(), "stale row cached");
        let epoch = cache.get("a").unwrap_err();
        cache.insert(epoch, "a", sealed(2));
        assert_eq!(cache.get("a").unwrap().version.version, 2);
        cache.invalidate(None);
        assert!(cache.get("a").is_err());
    }

    #[test]
    fn watchers_hear_each_invalidation() {
        let cache = SealedCache::default();
        let mut watch = cache.watch();
        cache.invalidate(Some("a"));
        cache.invalidate(None);
        assert_eq!(watch.try_recv().unwrap().as_deref(), Some("a"));
        assert_eq!(watch.try_recv().unwrap(), None);
    }
}
