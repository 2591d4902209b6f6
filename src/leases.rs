//! Leases: every fetch over the agent socket is a lease with a TTL, durable in the store and
//! tracked here in memory for renewals, deletions and expiry.
//!
//! A sweeper ends leases when they expire. A lease on a credential issued for it alone (a
//! provider with `issue`, such as STS) revokes that credential upstream when it ends, retrying
//! until the provider confirms. The rotation engine's draining step waits on the live leases of
//! the old version; ending a lease wakes it.
//!
//! Persistence and upstream revocation sit behind [`LeaseBackend`], so expiry, renewal and
//! revocation are unit-tested under paused time with an in-memory backend.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, watch};

use crate::audit::AuditEvent;
use crate::clock::Clock;
use crate::clock::Millis;
use crate::group_commit::WriteError;
use crate::rotation::engine::PluginCallError;
use crate::store::{LeaseEnd, LeaseOp, LeaseRow, StoreError, UpstreamState};

/// How long to wait before retrying a failed upstream revocation.
const REVOKE_RETRY: Duration = Duration::from_secs(5);
/// How long ended leases stay in the store before they are purged (the audit log keeps their
/// history).
const KEEP_ENDED: Millis = 3600 * 1000;
/// How often ended leases are purged.
const PURGE_EVERY: Millis = 600 * 1000;
/// How often repeated fetches counted on leases are folded into the audit chain: the interval
/// one `fetch.repeated` row covers.
pub const FOLD_EVERY: Millis = 10 * 1000;
/// When a repeated fetch moves a lease's expiry past what the store holds, the store is told
/// an expiry this fraction of the fetch's TTL further on, so the repeated fetches after it need
/// no write: their expiry is already durable (a quarter: one write per 75 s of a 5-minute TTL).
const RECORD_AHEAD_DIVISOR: Millis = 4;

/// Persistence and upstream effects of leases. Object-safe (boxed futures), so the daemon's
/// backend lives with the daemon's wiring and tests use an in-memory one.
pub trait LeaseBackend: Send + Sync + 'static {
    /// Applies lease changes with their audit rows and waits until they are committed: a lease
    /// is handed out, and an ended lease wakes a drain, only once it is durable.
    fn commit(
        &self,
        ops: Vec<LeaseOp>,
        audit: Vec<AuditEvent>,
    ) -> BoxFuture<'_, Result<(), WriteError>>;

    /// Revokes a credential issued for a lease, upstream.
    fn revoke_issued<'a>(
        &'a self,
        lease: &'a LeaseRow,
    ) -> BoxFuture<'a, Result<(), PluginCallError>>;

    /// Where other daemons share the store (PostgreSQL): which of `ids` are still open in it,
    /// with the expiry it holds (another daemon may have renewed or ended one). `None` where
    /// this table is the only one (SQLite).
    fn stored_expiries<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Option<HashMap<String, Millis>>, StoreError>> {
        let _ = ids;
        Box::pin(async { Ok(None) })
    }
}

/// Why a lease operation was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// No live lease by that id.
    #[error("no live lease with that id")]
    NotFound,
    /// The lease belongs to another uid.
    #[error("the lease belongs to another user")]
    Forbidden,
    /// The uid already holds as many live leases as allowed.
    #[error(
        "uid {uid} holds {max} live leases, the most [agent] max_leases_per_uid allows; release \
         some (DELETE /v1/leases/ID) or let them expire"
    )]
    TooMany {
        /// The uid.
        uid: u32,
        /// The limit.
        max: usize,
    },
    /// Persisting the change failed.
    #[error("the lease could not be recorded: {0}")]
    Store(#[from] WriteError),
}

/// Lease ids ordered by expiry.
type ByExpiry = BTreeSet<(Millis, String)>;

/// What makes two fetches the same for a lease: the same peer (uid, gid, executable) fetching
/// the same stored version. Such fetches share one lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's gid.
    pub gid: u32,
    /// The peer's executable.
    pub exe: Option<String>,
    /// The secret's id.
    pub secret_id: String,
    /// The stored version fetched.
    pub version: i64,
}

impl PeerKey {
    /// The key of a lease on a stored version; a credential issued for its lease has none (each
    /// is a credential of its own).
    fn of(lease: &LeaseRow) -> Option<PeerKey> {
        match (lease.version, &lease.issued) {
            (Some(version), None) => Some(PeerKey {
                uid: lease.uid,
                gid: lease.gid,
                exe: lease.exe.clone(),
                secret_id: lease.secret_id.clone(),
                version,
            }),
            _ => None,
        }
    }
}

/// The lease a fetch was granted: a new one, or the peer's live lease on the same version,
/// extended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// The lease's id.
    pub id: String,
    /// When it expires now.
    pub expires_at: Millis,
    /// Whether the fetch extended an existing lease (no audit row of its own: it is counted on
    /// the lease and folded into a `fetch.repeated` row).
    pub extended: bool,
}

#[derive(Debug, Default)]
struct State {
    live: HashMap<String, Arc<LeaseRow>>,
    expiry: ByExpiry,
    /// Live leases by (secret id, version), each ordered by expiry: what a drain asks about,
    /// answered without looking at every lease.
    by_version: HashMap<(String, Option<i64>), ByExpiry>,
    /// How many live leases each uid holds.
    per_uid: HashMap<u32, usize>,
    /// The live lease of each peer on each stored version: what a repeated fetch extends.
    by_peer: HashMap<PeerKey, String>,
    /// What the store holds of each live lease that memory has moved past.
    recorded: HashMap<String, Recorded>,
    revoke_pending: HashMap<String, LeaseRow>,
}

/// A live lease as the store records it: an expiry at least the one its holder was given, and
/// the repeated fetches counted in memory since its last write.
#[derive(Debug, Clone, Copy)]
struct Recorded {
    expires_at: Millis,
    fetches: u32,
}

impl State {
    fn insert(&mut self, lease: Arc<LeaseRow>) {
        let key = (lease.expires_at, lease.id.clone());
        self.expiry.insert(key.clone());
        self.by_version
            .entry((lease.secret_id.clone(), lease.version))
            .or_default()
            .insert(key);
        *self.per_uid.entry(lease.uid).or_default() += 1;
        if let Some(peer) = PeerKey::of(&lease) {
            self.by_peer.insert(peer, lease.id.clone());
        }
        self.recorded.entry(lease.id.clone()).or_insert(Recorded {
            expires_at: lease.expires_at,
            fetches: 0,
        });
        self.live.insert(lease.id.clone(), lease);
    }

    /// Takes the repeated fetches counted in memory and not yet written, as extension ops that
    /// leave the recorded expiry as it is.
    fn take_counts(&mut self, only: Option<&[LeaseRow]>) -> Vec<LeaseOp> {
        let mut ops = Vec::new();
        let mut take = |id: &String, r: &mut Recorded| {
            if r.fetches > 0 {
                ops.push(LeaseOp::Extend {
                    id: id.clone(),
                    expires_at: r.expires_at,
                    fetches: std::mem::take(&mut r.fetches),
                });
            }
        };
        match only {
            Some(leases) => {
                for l in leases {
                    if let Some(r) = self.recorded.get_mut(&l.id) {
                        take(&l.id, r);
                    }
                }
            }
            None => self.recorded.iter_mut().for_each(|(id, r)| take(id, r)),
        }
        ops
    }

    /// Puts back counts taken by [`State::take_counts`] whose write failed.
    fn restore_counts(&mut self, ops: &[LeaseOp]) {
        for op in ops {
            if let LeaseOp::Extend { id, fetches, .. } = op {
                if let Some(r) = self.recorded.get_mut(id) {
                    r.fetches += fetches;
                }
            }
        }
    }

    /// Forgets a lease that ended (after its counts were written).
    fn end(&mut self, id: &str) -> Option<Arc<LeaseRow>> {
        self.recorded.remove(id);
        self.remove(id)
    }

    /// Takes a lease out of the indexes (to end it, or to put it back with a new expiry).
    fn remove(&mut self, id: &str) -> Option<Arc<LeaseRow>> {
        let lease = self.live.remove(id)?;
        let key = (lease.expires_at, lease.id.clone());
        self.expiry.remove(&key);
        let version = (lease.secret_id.clone(), lease.version);
        if let Some(set) = self.by_version.get_mut(&version) {
            set.remove(&key);
            if set.is_empty() {
                self.by_version.remove(&version);
            }
        }
        if let Some(n) = self.per_uid.get_mut(&lease.uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&lease.uid);
            }
        }
        if let Some(peer) = PeerKey::of(&lease) {
            if self.by_peer.get(&peer) == Some(&lease.id) {
                self.by_peer.remove(&peer);
            }
        }
        Some(lease)
    }
}

/// The lease table in memory.
pub struct Leases {
    backend: Box<dyn LeaseBackend>,
    max_per_uid: usize,
    clock: Clock,
    state: Mutex<State>,
    sweeper: Notify,
    ended: Arc<Notify>,
    /// Set when a fetch was counted on a lease and not yet folded into the audit chain.
    unfolded: std::sync::atomic::AtomicBool,
    /// Versions the broker process may still use, which drain like leases.
    in_use: Mutex<HashMap<(String, i64), usize>>,
}

/// A version in use outside the lease table (one the broker process may still use): until it
/// is dropped, a rotation drains it like a lease and revokes the old credential only after.
#[derive(Debug)]
pub struct Hold {
    leases: Arc<Leases>,
    key: (String, i64),
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut in_use = self.leases.in_use.lock().expect("in-use lock");
        if let Some(n) = in_use.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.key);
            }
        }
        drop(in_use);
        self.leases.ended.notify_waiters();
        self.leases.ended.notify_one();
    }
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").finish_non_exhaustive()
    }
}

impl Leases {
    /// A lease table starting from `open` (from the store); `ended` is notified whenever a
    /// lease ends (the engine's drain waits on it).
    pub fn new(
        backend: impl LeaseBackend,
        clock: Clock,
        open: Vec<LeaseRow>,
        ended: Arc<Notify>,
        max_per_uid: usize,
    ) -> Arc<Self> {
        let mut state = State::default();
        for lease in open {
            if lease.ended_at.is_none() {
                state.insert(Arc::new(lease));
            } else {
                state.revoke_pending.insert(lease.id.clone(), lease);
            }
        }
        Arc::new(Leases {
            backend: Box::new(backend),
            max_per_uid,
            clock,
            state: Mutex::new(state),
            sweeper: Notify::new(),
            ended,
            // Fetches counted before a crash are folded at the first sweep.
            unfolded: std::sync::atomic::AtomicBool::new(true),
            in_use: Mutex::new(HashMap::new()),
        })
    }

    /// Live leases right now.
    pub fn live_count(&self) -> usize {
        self.state.lock().expect("lease state").live.len()
    }

    /// Live leases on one version of a secret, and the earliest of their expiries. A lease is
    /// live until the sweeper has ended it (and recorded that), even a moment past its expiry.
    /// Versions held ([`Hold`]) count as leases without an expiry.
    pub fn live_on(&self, secret_id: &str, version: i64) -> (i64, Option<Millis>) {
        let held = self
            .in_use
            .lock()
            .expect("in-use lock")
            .get(&(secret_id.to_string(), version))
            .copied()
            .unwrap_or(0) as i64;
        let state = self.state.lock().expect("lease state");
        match state
            .by_version
            .get(&(secret_id.to_string(), Some(version)))
        {
            Some(set) => (set.len() as i64 + held, set.first().map(|(t, _)| *t)),
            None => (held, None),
        }
    }

    /// Marks `version` of a secret in use until the returned [`Hold`] is dropped.
    pub fn hold(self: &Arc<Self>, secret_id: &str, version: i64) -> Hold {
        let key = (secret_id.to_string(), version);
        *self
            .in_use
            .lock()
            .expect("in-use lock")
            .entry(key.clone())
            .or_default() += 1;
        Hold {
            leases: self.clone(),
            key,
        }
    }

    /// Live leases on any version of a secret.
    pub fn live_for_secret(&self, secret_id: &str) -> usize {
        self.state
            .lock()
            .expect("lease state")
            .by_version
            .iter()
            .filter(|((secret, _), _)| secret == secret_id)
            .map(|(_, set)| set.len())
            .sum()
    }

    /// A live lease by id.
    pub fn get(&self, id: &str) -> Option<LeaseRow> {
        self.state
            .lock()
            .expect("lease state")
            .live
            .get(id)
            .map(|l| LeaseRow::clone(l))
    }

    /// Grants a lease for a fetch, durably. A fetch by a peer that already holds a live lease
    /// on the same stored version extends that lease and is counted on it (folded into the
    /// audit chain within [`FOLD_EVERY`]); any other fetch records `lease` with its audit row
    /// and starts its clock. A uid already holding the most live leases allowed gets no new
    /// one. `audit` makes the new lease's row (a repeated fetch needs none).
    pub async fn grant(
        &self,
        lease: LeaseRow,
        audit: impl FnOnce() -> AuditEvent,
    ) -> Result<Granted, LeaseError> {
        if let Some(peer) = PeerKey::of(&lease) {
            if let Some(granted) = self.repeat(&peer, lease.expires_at).await? {
                return Ok(granted);
            }
        }
        let held = self.holding(lease.uid);
        if held >= self.max_per_uid {
            return Err(LeaseError::TooMany {
                uid: lease.uid,
                max: self.max_per_uid,
            });
        }
        let lease = Arc::new(lease);
        self.backend
            .commit(vec![LeaseOp::Insert(lease.clone())], vec![audit()])
            .await?;
        let mut state = self.state.lock().expect("lease state");
        let earliest = state.expiry.first().map(|(t, _)| *t);
        if earliest.is_none_or(|e| lease.expires_at < e) {
            self.sweeper.notify_one();
        }
        let granted = Granted {
            id: lease.id.clone(),
            expires_at: lease.expires_at,
            extended: false,
        };
        state.insert(lease);
        Ok(granted)
    }

    /// A repeated fetch: extends the peer's live lease on the same version to at least
    /// `expires_at`, if it holds one that is not about to be swept, and counts the fetch on
    /// it. The store is written (and waited for) only when the new expiry passes the one it
    /// holds, and then a part of the TTL ahead; otherwise the fetch is counted in memory and
    /// written with the lease's next write, its end, or the next fold.
    pub async fn repeat(
        &self,
        peer: &PeerKey,
        expires_at: Millis,
    ) -> Result<Option<Granted>, LeaseError> {
        let now = self.clock.now();
        let (granted, write) = {
            let mut state = self.state.lock().expect("lease state");
            let Some(live) = state
                .by_peer
                .get(peer)
                .and_then(|id| state.live.get(id))
                .cloned()
            else {
                return Ok(None);
            };
            // A lease at its expiry may be ending in the sweeper right now: start a new one.
            if live.expires_at <= now {
                return Ok(None);
            }
            if expires_at > live.expires_at {
                state.remove(&live.id);
                let mut longer = LeaseRow::clone(&live);
                longer.expires_at = expires_at;
                state.insert(Arc::new(longer));
            }
            let granted = Granted {
                id: live.id.clone(),
                expires_at: live.expires_at.max(expires_at),
                extended: true,
            };
            let recorded = state
                .recorded
                .get_mut(&live.id)
                .expect("a live lease is recorded");
            let write = if recorded.expires_at >= granted.expires_at {
                recorded.fetches += 1;
                None
            } else {
                let ahead = (granted.expires_at - now) / RECORD_AHEAD_DIVISOR;
                Some((
                    granted.expires_at + ahead,
                    std::mem::take(&mut recorded.fetches) + 1,
                ))
            };
            (granted, write)
        };
        self.unfolded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let Some((target, fetches)) = write else {
            return Ok(Some(granted));
        };
        let op = LeaseOp::Extend {
            id: granted.id.clone(),
            expires_at: target,
            fetches,
        };
        let written = self.backend.commit(vec![op], Vec::new()).await;
        let mut state = self.state.lock().expect("lease state");
        // (A lease that ended meanwhile has no record left to update.)
        let recorded = state.recorded.get_mut(&granted.id);
        match written {
            Ok(()) => {
                if let Some(r) = recorded {
                    r.expires_at = r.expires_at.max(target);
                }
                Ok(Some(granted))
            }
            Err(e) => {
                // This fetch fails; the others counted with it are kept for the next write.
                if let Some(r) = recorded {
                    r.fetches += fetches - 1;
                }
                Err(e.into())
            }
        }
    }

    /// Takes the repeated fetches counted in memory and not yet written, as changes to write
    /// (at shutdown, when the sweeper no longer runs).
    pub fn take_unwritten_counts(&self) -> Vec<LeaseOp> {
        self.state.lock().expect("lease state").take_counts(None)
    }

    /// How many live leases `uid` holds.
    pub fn holding(&self, uid: u32) -> usize {
        let state = self.state.lock().expect("lease state");
        state.per_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Extends a lease of `uid` to `expires_at`.
    pub async fn renew(
        &self,
        id: &str,
        uid: u32,
        expires_at: Millis,
        audit: AuditEvent,
    ) -> Result<LeaseRow, LeaseError> {
        let lease = self.owned(id, uid)?;
        self.backend
            .commit(
                vec![LeaseOp::Renew {
                    id: id.to_string(),
                    expires_at,
                }],
                vec![audit],
            )
            .await?;
        let mut state = self.state.lock().expect("lease state");
        let Some(live) = state.remove(id) else {
            return Err(LeaseError::NotFound);
        };
        let mut renewed = LeaseRow::clone(&live);
        renewed.expires_at = expires_at;
        state.insert(Arc::new(renewed.clone()));
        if let Some(recorded) = state.recorded.get_mut(id) {
            recorded.expires_at = expires_at;
        }
        drop(state);
        drop(lease);
        self.sweeper.notify_one();
        Ok(renewed)
    }

    fn owned(&self, id: &str, uid: u32) -> Result<LeaseRow, LeaseError> {
        let state = self.state.lock().expect("lease state");
        let lease = state.live.get(id).ok_or(LeaseError::NotFound)?;
        if lease.uid != uid && uid != 0 {
            return Err(LeaseError::Forbidden);
        }
        Ok(LeaseRow::clone(lease))
    }

    /// Ends a lease of `uid` now (the holder is done with it).
    pub async fn delete(&self, id: &str, uid: u32, audit: AuditEvent) -> Result<(), LeaseError> {
        let lease = self.owned(id, uid)?;
        self.end(vec![lease], LeaseEnd::Deleted, vec![audit]).await
    }

    /// Ends every live lease matching `filter` (a compromise revokes leases in scope). Returns
    /// the leases ended.
    pub async fn revoke_where(
        &self,
        filter: impl Fn(&LeaseRow) -> bool,
        audit: Vec<AuditEvent>,
    ) -> Result<Vec<LeaseRow>, LeaseError> {
        let leases: Vec<LeaseRow> = self
            .state
            .lock()
            .expect("lease state")
            .live
            .values()
            .filter(|l| filter(l))
            .map(|l| LeaseRow::clone(l))
            .collect();
        self.end(leases.clone(), LeaseEnd::Revoked, audit).await?;
        Ok(leases)
    }

    async fn end(
        &self,
        leases: Vec<LeaseRow>,
        reason: LeaseEnd,
        audit: Vec<AuditEvent>,
    ) -> Result<(), LeaseError> {
        if leases.is_empty() && audit.is_empty() {
            return Ok(());
        }
        let at = self.clock.now();
        // Fetches counted on the leases and not yet written go with their end.
        let counts = self
            .state
            .lock()
            .expect("lease state")
            .take_counts(Some(&leases));
        let ops = counts
            .iter()
            .cloned()
            .chain(leases.iter().map(|l| LeaseOp::End {
                id: l.id.clone(),
                at,
                reason,
                upstream_state: l.issued.as_ref().map(|_| UpstreamState::RevokePending),
            }))
            .collect();
        if let Err(e) = self.backend.commit(ops, audit).await {
            self.state
                .lock()
                .expect("lease state")
                .restore_counts(&counts);
            return Err(e.into());
        }
        {
            let mut state = self.state.lock().expect("lease state");
            for l in &leases {
                state.end(&l.id);
                if l.issued.is_some() {
                    let mut ended = l.clone();
                    ended.ended_at = Some(at);
                    state.revoke_pending.insert(l.id.clone(), ended);
                }
            }
        }
        self.ended.notify_waiters();
        self.ended.notify_one();
        self.revoke_pending().await;
        Ok(())
    }

    /// Revokes upstream every issued credential whose lease ended; failures stay pending.
    async fn revoke_pending(&self) {
        let pending: Vec<LeaseRow> = self
            .state
            .lock()
            .expect("lease state")
            .revoke_pending
            .values()
            .cloned()
            .collect();
        for lease in pending {
            match self.backend.revoke_issued(&lease).await {
                Ok(()) => {
                    let audit = AuditEvent::new("leases", "lease.upstream-revoked")
                        .secret(&lease.secret_name)
                        .detail(serde_json::json!({ "lease_id": lease.id }));
                    if self
                        .backend
                        .commit(
                            vec![LeaseOp::UpstreamRevoked {
                                id: lease.id.clone(),
                            }],
                            vec![audit],
                        )
                        .await
                        .is_ok()
                    {
                        self.state
                            .lock()
                            .expect("lease state")
                            .revoke_pending
                            .remove(&lease.id);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %lease.id, secret = %lease.secret_name, error = %e, "revoking an issued credential failed; will retry");
                }
            }
        }
    }

    /// Folds the fetches counted on leases since the last fold into the audit chain, if any.
    async fn fold(&self) {
        if !self
            .unfolded
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let mut ops = self.state.lock().expect("lease state").take_counts(None);
        ops.push(LeaseOp::FoldFetches);
        if let Err(e) = self.backend.commit(ops.clone(), Vec::new()).await {
            self.state.lock().expect("lease state").restore_counts(&ops);
            self.unfolded
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "could not fold repeated fetches into the audit log; retrying");
        }
    }

    /// Of the leases this table sees expired at `now`, those the store agrees have. On a store
    /// other daemons share, one of them may have renewed a lease (it is put back here with the
    /// stored expiry) or ended it (it is forgotten here, nothing written); without an answer
    /// from the store, this table decides.
    async fn expired_in_store(&self, expired: Vec<LeaseRow>, now: Millis) -> Vec<LeaseRow> {
        if expired.is_empty() {
            return expired;
        }
        let ids: Vec<String> = expired.iter().map(|l| l.id.clone()).collect();
        let stored = match self.backend.stored_expiries(&ids).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return expired,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the stored leases; ending them as seen here");
                return expired;
            }
        };
        let mut state = self.state.lock().expect("lease state");
        expired
            .into_iter()
            .filter(|lease| match stored.get(&lease.id) {
                None => {
                    state.end(&lease.id);
                    false
                }
                Some(&expires_at) if expires_at > now => {
                    if let Some(old) = state.remove(&lease.id) {
                        let mut renewed = LeaseRow::clone(&old);
                        renewed.expires_at = expires_at;
                        if let Some(r) = state.recorded.get_mut(&lease.id) {
                            r.expires_at = expires_at;
                        }
                        state.insert(Arc::new(renewed));
                    }
                    false
                }
                Some(_) => true,
            })
            .collect()
    }

    /// Ends leases as they expire, retries pending upstream revocations, and folds repeated
    /// fetches into the audit chain, until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next_purge = self.clock.now();
        let mut next_fold = self.clock.now();
        loop {
            let now = self.clock.now();
            if now >= next_fold {
                next_fold = now + FOLD_EVERY;
                self.fold().await;
            }
            if now >= next_purge {
                next_purge = now + PURGE_EVERY;
                let purge = LeaseOp::PurgeEnded {
                    before: now - KEEP_ENDED,
                };
                if let Err(e) = self.backend.commit(vec![purge], Vec::new()).await {
                    tracing::warn!(error = %e, "could not purge old leases");
                }
            }
            let expired: Vec<LeaseRow> = {
                let state = self.state.lock().expect("lease state");
                state
                    .expiry
                    .iter()
                    .take_while(|(t, _)| *t <= now)
                    .filter_map(|(_, id)| state.live.get(id).map(|l| LeaseRow::clone(l)))
                    .collect()
            };
            let expired = self.expired_in_store(expired, now).await;
            if !expired.is_empty() {
                let audit = expired
                    .iter()
                    .map(|l| {
                        AuditEvent::new("leases", "lease.expired")
                            .secret(&l.secret_name)
                            .detail(serde_json::json!({ "lease_id": l.id, "version": l.version, "uid": l.uid }))
                    })
                    .collect();
                if let Err(e) = self.end(expired, LeaseEnd::Expired, audit).await {
                    tracing::error!(error = %e, "could not record expired leases; retrying");
                }
            } else if !self
                .state
                .lock()
                .expect("lease state")
                .revoke_pending
                .is_empty()
            {
                self.revoke_pending().await;
            }
            let (next, pending) = {
                let state = self.state.lock().expect("lease state");
                (
                    state.expiry.first().map(|(t, _)| *t),
                    !state.revoke_pending.is_empty(),
                )
            };
            let retry_at = pending.then(|| self.clock.now() + REVOKE_RETRY.as_millis() as Millis);
            let wake_at = match (next, retry_at) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => self.clock.now() + 60_000,
            }
            .min(next_fold);
            tokio::select! {
                _ = self.clock.sleep_until(wake_at) => {}
                _ = self.sweeper.notified() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

impl crate::rotation::drain::LeaseView for Leases {
    fn live_on(&self, secret_id: &str, version: i64, _now: Millis) -> (i64, Option<Millis>) {
        Leases::live_on(self, secret_id, version)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000;

    /// A lease table over a backend in memory (for other modules' tests).
    pub(crate) fn in_memory() -> Arc<Leases> {
        Leases::new(
            Arc::new(Memory::default()),
            Clock::tokio(T0),
            vec![],
            Arc::new(Notify::new()),
            100,
        )
    }

    #[derive(Default)]
    struct Memory {
        ops: Mutex<Vec<LeaseOp>>,
        audit: Mutex<Vec<String>>,
        revoked: Mutex<Vec<String>>,
        fail_revokes: Mutex<u32>,
        /// A store other daemons share: its open leases and their expiries.
        shared: Mutex<Option<HashMap<String, Millis>>>,
    }

    impl LeaseBackend for Arc<Memory> {
        fn commit(
            &self,
            ops: Vec<LeaseOp>,
            audit: Vec<AuditEvent>,
        ) -> BoxFuture<'_, Result<(), WriteError>> {
            self.ops.lock().unwrap().extend(ops);
            self.audit
                .lock()
                .unwrap()
                .extend(audit.into_iter().map(|a| a.action));
            Box::pin(async { Ok(()) })
        }

        fn revoke_issued<'a>(
            &'a self,
            lease: &'a LeaseRow,
        ) -> BoxFuture<'a, Result<(), PluginCallError>> {
            let mut fail = self.fail_revokes.lock().unwrap();
            let result = if *fail > 0 {
                *fail -= 1;
                Err(PluginCallError::NoPlugin("sts".into()))
            } else {
                self.revoked.lock().unwrap().push(lease.id.clone());
                Ok(())
            };
            Box::pin(async move { result })
        }

        fn stored_expiries<'a>(
            &'a self,
            ids: &'a [String],
        ) -> BoxFuture<'a, Result<Option<HashMap<String, Millis>>, StoreError>> {
            let stored = self.shared.lock().unwrap().as_ref().map(|open| {
                ids.iter()
                    .filter_map(|id| open.get(id).map(|e| (id.clone(), *e)))
                    .collect()
            });
            Box::pin(async move { Ok(stored) })
        }
    }

    fn lease(id: &str, uid: u32, ttl_s: i64, issued: bool) -> LeaseRow {
        LeaseRow {
            id: id.into(),
            secret_id: "sid".into(),
            secret_name: "s".into(),
            version: if issued { None } else { Some(1) },
            issued: issued.then(|| vec![1, 2, 3]),
            issued_meta: None,
            uid,
            gid: uid,
            pid: 1,
            // Each test lease is its own peer unless a test says otherwise.
            exe: Some(format!("/usr/bin/{id}")),
            created_at: T0,
            expires_at: T0 + ttl_s * 1000,
            ended_at: None,
            upstream_state: issued.then_some(UpstreamState::Live),
        }
    }

    fn setup() -> (Arc<Memory>, Arc<Leases>, watch::Sender<bool>) {
        setup_with_cap(1000)
    }

    fn setup_with_cap(max_per_uid: usize) -> (Arc<Memory>, Arc<Leases>, watch::Sender<bool>) {
        let memory = Arc::new(Memory::default());
        let leases = Leases::new(
            memory.clone(),
            Clock::tokio(T0),
            vec![],
            Arc::new(Notify::new()),
            max_per_uid,
        );
        let (tx, rx) = watch::channel(false);
        tokio::spawn(leases.clone().run_sweeper(rx));
        (memory, leases, tx)
    }

    fn ev() -> AuditEvent {
        AuditEvent::new("t", "lease.granted")
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_on_time() {
        let (memory, leases, _stop) = setup();
        leases.grant(lease("a", 1000, 60, false), ev).await.unwrap();
        leases
            .grant(lease("b", 1000, 300, false), ev)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(leases.live_count(), 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(leases.live_count(), 1);
        assert!(leases.get("a").is_none());
        assert_eq!(leases.live_on("sid", 1), (1, Some(T0 + 300_000)));
        tokio::time::sleep(Duration::from_secs(240)).await;
        assert_eq!(leases.live_count(), 0);
        assert_eq!(
            memory
                .audit
                .lock()
                .unwrap()
                .iter()
                .filter(|a| *a == "lease.expired")
                .count(),
            2
        );
    }

    /// On a shared store, another daemon renewed one lease and ended another: at their old
    /// expiry here, the first is put back with the stored expiry and the second is forgotten;
    /// neither is ended (nor its credential revoked) by this daemon.
    #[tokio::test(start_paused = true)]
    async fn on_a_shared_store_a_lease_another_daemon_renewed_or_ended_is_not_ended_here() {
        let (memory, leases, _stop) = setup();
        leases
            .grant(lease("renewed", 1000, 60, true), ev)
            .await
            .unwrap();
        leases
            .grant(lease("ended", 1000, 60, true), ev)
            .await
            .unwrap();
        leases
            .grant(lease("expired", 1000, 60, true), ev)
            .await
            .unwrap();
        *memory.shared.lock().unwrap() = Some(HashMap::from([
            ("renewed".to_string(), T0 + 600_000),
            ("expired".to_string(), T0 + 60_000),
        ]));
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(*memory.revoked.lock().unwrap(), ["expired"]);
        assert!(leases.get("ended").is_none(), "forgotten");
        assert_eq!(leases.get("renewed").unwrap().expires_at, T0 + 600_000);
        let expired_rows = memory
            .audit
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == "lease.expired")
            .count();
        assert_eq!(expired_rows, 1, "only the lease that did expire");
        tokio::time::sleep(Duration::from_secs(540)).await;
        assert_eq!(*memory.revoked.lock().unwrap(), ["expired", "renewed"]);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_extends_and_delete_ends_only_for_the_owner() {
        let (_memory, leases, _stop) = setup();
        leases.grant(lease("a", 1000, 60, false), ev).await.unwrap();
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(matches!(
            leases.renew("a", 1001, T0 + 200_000, ev()).await,
            Err(LeaseError::Forbidden)
        ));
        leases.renew("a", 1000, T0 + 200_000, ev()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(
            leases.get("a").is_some(),
            "renewed lease outlives its first expiry"
        );
        assert!(matches!(
            leases.delete("a", 1001, ev()).await,
            Err(LeaseError::Forbidden)
        ));
        leases.delete("a", 1000, ev()).await.unwrap();
        assert!(leases.get("a").is_none());
        assert!(matches!(
            leases.delete("a", 1000, ev()).await,
            Err(LeaseError::NotFound)
        ));
        assert!(matches!(
            leases.renew("a", 1000, T0 + 300_000, ev()).await,
            Err(LeaseError::NotFound)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn issued_credentials_are_revoked_upstream_at_expiry_and_on_delete_with_retries() {
        let (memory, leases, _stop) = setup();
        leases
            .grant(lease("sts-1", 1000, 900, true), ev)
            .await
            .unwrap();
        leases
            .grant(lease("sts-2", 1000, 900, true), ev)
            .await
            .unwrap();
        leases.delete("sts-2", 1000, ev()).await.unwrap();
        assert_eq!(*memory.revoked.lock().unwrap(), ["sts-2"]);
        *memory.fail_revokes.lock().unwrap() = 2;
        tokio::time::sleep(Duration::from_secs(901)).await;
        assert!(leases.get("sts-1").is_none(), "expired");
        assert_eq!(
            memory.revoked.lock().unwrap().len(),
            1,
            "the provider failed twice so far"
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(*memory.revoked.lock().unwrap(), ["sts-2", "sts-1"]);
        let ops = memory.ops.lock().unwrap();
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, LeaseOp::UpstreamRevoked { .. }))
                .count(),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_fetches_by_one_peer_of_one_version_extend_one_lease_and_are_folded() {
        let (memory, leases, _stop) = setup_with_cap(1);
        let first = leases.grant(lease("a", 1000, 60, false), ev).await.unwrap();
        assert_eq!(
            first,
            Granted {
                id: "a".into(),
                expires_at: T0 + 60_000,
                extended: false
            }
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        let folds = || {
            memory
                .ops
                .lock()
                .unwrap()
                .iter()
                .filter(|o| matches!(o, LeaseOp::FoldFetches))
                .count()
        };
        let folds_before = folds();
        // A fetch loop: the same peer, the same version, a thousand times, within the cap of 1.
        for i in 0..1000 {
            let mut again = lease(&format!("b{i}"), 1000, 60, false);
            again.exe = Some("/usr/bin/a".into());
            again.created_at = T0 + 30_000;
            again.expires_at = T0 + 90_000;
            let granted = leases.grant(again, ev).await.unwrap();
            assert_eq!(
                granted,
                Granted {
                    id: "a".into(),
                    expires_at: T0 + 90_000,
                    extended: true
                }
            );
        }
        assert_eq!(leases.live_count(), 1);
        assert_eq!(leases.live_on("sid", 1), (1, Some(T0 + 90_000)));
        let extensions = || {
            memory
                .ops
                .lock()
                .unwrap()
                .iter()
                .filter_map(|o| match o {
                    LeaseOp::Extend {
                        id,
                        expires_at,
                        fetches,
                    } if id == "a" => Some((*expires_at, *fetches)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // One write for the loop: the first repeated fetch records an expiry a quarter of the
        // TTL past the one it was given; the others are covered by it and counted in memory.
        assert_eq!(extensions(), vec![(T0 + 90_000 + 15_000, 1)]);
        assert_eq!(
            memory.audit.lock().unwrap().len(),
            1,
            "one audit row for the first fetch"
        );
        // Folded into the chain within the fold interval, with every fetch counted.
        tokio::time::sleep(Duration::from_millis(FOLD_EVERY as u64)).await;
        assert_eq!(folds(), folds_before + 1);
        let counted: u32 = extensions().iter().map(|(_, n)| n).sum();
        assert_eq!(counted, 1000, "every repeated fetch is counted");
        // Fetches counted after the fold are written with the lease's end.
        let mut more = lease("b1000", 1000, 60, false);
        more.exe = Some("/usr/bin/a".into());
        more.expires_at = T0 + 90_000;
        assert!(leases.grant(more, ev).await.unwrap().extended);
        assert_eq!(
            extensions().len(),
            2,
            "covered by the recorded expiry: not written yet"
        );
        // The extended lease outlives its first expiry, then ends at the extended one.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(leases.live_count(), 1);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(leases.live_count(), 0);
        let counted: u32 = extensions().iter().map(|(_, n)| n).sum();
        assert_eq!(counted, 1001, "the last count went with the lease's end");
        // Another executable, another version, or an issued credential: a lease of its own.
        let mut other = lease("c", 1000, 60, false);
        other.exe = Some("/usr/bin/other".into());
        assert!(!leases.grant(other, ev).await.unwrap().extended);
        let mut newer = lease("d", 1001, 60, false);
        newer.version = Some(2);
        assert!(!leases.grant(newer, ev).await.unwrap().extended);
        let (_m, issued_only, _s) = setup();
        issued_only
            .grant(lease("e", 1000, 60, true), ev)
            .await
            .unwrap();
        let second = issued_only
            .grant(lease("f", 1000, 60, true), ev)
            .await
            .unwrap();
        assert!(!second.extended);
        assert_eq!(issued_only.live_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_uid_holds_at_most_its_cap_of_live_leases_and_drains_see_them_by_version() {
        let (_memory, leases, _stop) = setup_with_cap(2);
        leases.grant(lease("a", 1000, 60, false), ev).await.unwrap();
        leases.grant(lease("b", 1000, 90, false), ev).await.unwrap();
        // A fetch loop of one uid cannot grow the table without bound.
        assert!(matches!(
            leases.grant(lease("c", 1000, 60, false), ev).await,
            Err(LeaseError::TooMany { uid: 1000, max: 2 })
        ));
        leases.grant(lease("d", 1001, 30, false), ev).await.unwrap();
        assert_eq!(leases.live_on("sid", 1), (3, Some(T0 + 30_000)));
        assert_eq!(leases.live_for_secret("sid"), 3);
        leases.delete("a", 1000, ev()).await.unwrap();
        leases.grant(lease("c", 1000, 60, false), ev).await.unwrap();
        leases.renew("d", 1001, T0 + 120_000, ev()).await.unwrap();
        assert_eq!(leases.live_on("sid", 1), (3, Some(T0 + 60_000)));
        assert_eq!(leases.holding(1000), 2);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(leases.live_on("sid", 1), (1, Some(T0 + 120_000)));
        assert_eq!(leases.holding(1000), 0);
    }
}
