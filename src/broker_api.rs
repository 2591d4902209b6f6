//! The broker socket (and each broker's loopback TCP listener): agents call provider APIs there
//! and keywarden adds the key on the way out (docs/broker.md).
//!
//! The daemon accepts each connection and attests its peer (over TCP by finding the process
//! that owns the connection's other end), decides once which brokers that peer may use and
//! under which `[[policy]]`, and hands the connection with that decision to `keywarden-broker`
//! (`SCM_RIGHTS`), which serves its requests (`broker/src/agents.rs`: the paths, checks,
//! budgets, the key, the usage). The broker reports each request's end and each refusal; the
//! daemon writes the `broker.request` and `broker.denied` audit rows, the metrics, the budgets'
//! counters and the token-spike signal from those reports, taking the caller from its own
//! record of the connection, never from the report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_plugin_sdk::broker::{Admission, Decision, Handoff, Reports};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinSet;

use crate::attest::{Hasher, Peer, PeerIdentity, RecentOwners};
use crate::audit::AuditEvent;
use crate::broker::Brokers;
use crate::broker::budget::Caller;
use crate::broker::process::FromBroker;
use crate::http::{self, Gate, REMOTE_PEER, Slot};
use crate::incident::signals::Signals;
use crate::policy::{self, Policy};
use crate::rejections::Rejections;
use crate::services::Services;

/// More tokens than any one request uses: a larger count (an upstream or a broker process that
/// lies) is cut to it, so a day's sum of `broker.request` rows stays within the store's 64-bit
/// integers (it is read back at every start).
const MAX_REQUEST_TOKENS: u64 = 1_000_000_000;

/// A connection handed to the broker process, as the daemon decided it; its slots are given
/// back when the process reports it closed (or dies).
#[derive(Debug)]
struct Handed {
    /// The broker process that took it.
    generation: u64,
    actor: String,
    uid: u32,
    exe: String,
    /// The policy admitting the peer to each broker.
    policies: BTreeMap<String, String>,
    _slot: Slot,
    _permit: OwnedSemaphorePermit,
}

/// The broker API: admission, hand-off, and what the broker process reports.
#[derive(Debug)]
pub struct BrokerApi {
    services: Services,
    brokers: Arc<Brokers>,
    policies: Vec<Policy>,
    needs_hash: bool,
    hasher: Hasher,
    daemon_uid: u32,
    refused_uids: HashSet<u32>,
    rejections: Arc<Rejections>,
    signals: Arc<Signals>,
    /// Connections at once and per uid, over all the broker's listeners (a handed connection
    /// holds its place until the broker reports it closed).
    gate: Gate,
    handed: Mutex<HashMap<u64, Handed>>,
    next: AtomicU64,
}

impl BrokerApi {
    /// The API over `brokers`, admitting peers by `policies`, at most `max_connections`
    /// connections at once and `per_uid` per uid.
    pub fn new(
        (services, brokers): (Services, Arc<Brokers>),
        policies: Vec<Policy>,
        refused_uids: HashSet<u32>,
        (rejections, signals): (Arc<Rejections>, Arc<Signals>),
        (max_connections, per_uid): (usize, usize),
    ) -> BrokerApi {
        BrokerApi {
            needs_hash: policies.iter().any(Policy::checks_hash),
            services,
            brokers,
            policies,
            hasher: Hasher::default(),
            daemon_uid: rustix::process::geteuid().as_raw(),
            refused_uids,
            rejections,
            signals,
            gate: Gate::new(max_connections, per_uid),
            handed: Mutex::default(),
            next: AtomicU64::new(1),
        }
    }

    /// What the daemon decides about a connection's peer: which brokers it may use, under
    /// which policy; the actor its audit rows name.
    async fn decide(
        &self,
        peer: Peer,
        pidfd: Option<OwnedFd>,
        accepted: f64,
    ) -> (Decision, String) {
        let identity = tokio::sync::Mutex::new(PeerIdentity::attest(
            peer,
            pidfd,
            accepted,
            self.hasher.cache(),
        ));
        let refused = if peer == REMOTE_PEER {
            Some("no process on this host owns the connection")
        } else if self.refused_uids.contains(&peer.uid) {
            Some("this uid runs keywarden's plugins and may not use the broker")
        } else {
            None
        };
        if let Some(why) = refused {
            let who = identity.lock().await.clone();
            let decision = Decision {
                refused: Some(why.to_string()),
                uid: peer.uid,
                exe: "unknown".to_string(),
                admitted: BTreeMap::new(),
            };
            return (decision, who.actor());
        }
        let mut who = self.hasher.identity(&identity, self.needs_hash).await;
        let mut admitted = BTreeMap::new();
        for name in self.brokers.brokers.keys() {
            if let Some(policy) =
                policy::decide_broker(&self.policies, &mut who, name, self.daemon_uid)
            {
                let admission = Admission {
                    policy: policy.name.clone(),
                    budget: policy.budget,
                };
                admitted.insert(name.clone(), admission);
            }
        }
        let exe = who
            .exe
            .as_ref()
            .map_or("unknown".to_string(), |e| e.display().to_string());
        let decision = Decision {
            refused: None,
            uid: peer.uid,
            exe,
            admitted,
        };
        (decision, who.actor())
    }

    /// Attests `stream`'s peer and hands the connection to the broker process; when the
    /// process cannot take it, answers 503 and closes it.
    async fn take<S>(
        &self,
        stream: S,
        (peer, pidfd, accepted): (Peer, Option<OwnedFd>, f64),
        (slot, permit): (Slot, OwnedSemaphorePermit),
    ) where
        S: AsFd + tokio::io::AsyncWrite + Unpin,
    {
        let (decision, actor) = self.decide(peer, pidfd, accepted).await;
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let policies = decision
            .admitted
            .iter()
            .map(|(broker, a)| (broker.clone(), a.policy.clone()))
            .collect();
        let (uid, exe) = (decision.uid, decision.exe.clone());
        let handoff = Handoff {
            conn,
            peer: decision,
        };
        // Recorded before it is sent: the process may report about the connection at once.
        let recorded = |generation| {
            let handed = Handed {
                generation,
                actor,
                uid,
                exe,
                policies,
                _slot: slot,
                _permit: permit,
            };
            self.handed
                .lock()
                .expect("handed lock")
                .insert(conn, handed);
        };
        if let Err(e) = self
            .brokers
            .process
            .hand_off(&handoff, stream.as_fd(), recorded)
            .await
        {
            self.handed.lock().expect("handed lock").remove(&conn);
            tracing::warn!(error = %e, "a broker connection could not be handed over");
            refuse_unavailable(stream, &e.to_string()).await;
        }
    }

    /// Acts on what the broker process says until it is gone for good.
    pub async fn read_reports(self: Arc<Self>, mut from: tokio::sync::mpsc::Receiver<FromBroker>) {
        while let Some(said) = from.recv().await {
            match said {
                FromBroker::Reports(generation, reports) => self.reported(generation, reports),
                FromBroker::Gone(generation) => {
                    self.handed
                        .lock()
                        .expect("handed lock")
                        .retain(|_, h| h.generation != generation);
                }
            }
        }
    }

    fn reported(&self, generation: u64, reports: Reports) {
        let now = self.services.clock.now();
        for ended in reports.ended {
            let Some((caller, actor)) = self.caller(generation, ended.conn, &ended.broker) else {
                continue;
            };
            let tokens = [ended.tokens_in, ended.tokens_out, ended.tokens_estimated]
                .into_iter()
                .flatten()
                .fold(0, u64::saturating_add)
                .min(MAX_REQUEST_TOKENS);
            self.brokers.enforced.budgets.count(&caller, tokens, now);
            let event = AuditEvent::new(actor, "broker.request").detail(json!({
                "policy": caller.0,
                "uid": caller.1,
                "exe": caller.2,
                "broker": ended.broker,
                "route": ended.route,
                "version": ended.version,
                "method": ended.method,
                "path": ended.path,
                "status": ended.status,
                "tokens_in": ended.tokens_in,
                "tokens_out": ended.tokens_out,
                "tokens_estimated": ended.tokens_estimated,
                "tokens": tokens,
                "upstream_ms": ended.upstream_ms,
                "ms": ended.ms,
                "complete": ended.complete,
            }));
            let event = match &ended.route {
                Some(secret) => event.secret(secret),
                None => event,
            };
            self.services.metrics.count_brokered(
                &ended.broker,
                &caller.0,
                ended.status,
                tokens,
                Duration::from_millis(ended.ms),
            );
            // Nothing waits for it: it shares a later commit.
            self.services.audit_writer.defer(vec![event]);
            if tokens > 0
                && let Some(spike) = self.signals.note_tokens(&caller, tokens)
            {
                let secrets: Vec<String> = self
                    .brokers
                    .brokers
                    .get(&ended.broker)
                    .map(|b| b.secrets().map(str::to_string).collect())
                    .unwrap_or_default();
                let signals = self.signals.clone();
                tokio::spawn(async move { signals.act_on_tokens(spike, &caller, &secrets).await });
            }
        }
        for denied in reports.denied {
            let handed = self.handed.lock().expect("handed lock");
            let Some(h) = handed
                .get(&denied.conn)
                .filter(|h| h.generation == generation)
            else {
                continue;
            };
            let (uid, actor) = (h.uid, h.actor.clone());
            drop(handed);
            if self.rejections.first(
                "broker.denied",
                uid,
                None,
                &format!("{}: {}", denied.broker, denied.reason),
                &actor,
            ) {
                let event = AuditEvent::new(actor, "broker.denied")
                    .detail(json!({ "broker": denied.broker, "reason": denied.reason }));
                self.services.audit_writer.defer(vec![event]);
            }
        }
        let mut handed = self.handed.lock().expect("handed lock");
        for conn in reports.closed {
            if handed
                .get(&conn)
                .is_some_and(|h| h.generation == generation)
            {
                handed.remove(&conn);
            }
        }
    }

    /// The caller of a request on `conn` through `broker`, and the actor of its audit row, as
    /// the daemon recorded them when it handed the connection over.
    fn caller(&self, generation: u64, conn: u64, broker: &str) -> Option<(Caller, String)> {
        let handed = self.handed.lock().expect("handed lock");
        let h = handed.get(&conn).filter(|h| h.generation == generation)?;
        let policy = h.policies.get(broker)?;
        Some(((policy.clone(), h.uid, h.exe.clone()), h.actor.clone()))
    }
}

/// Answers 503 on a connection the broker process could not take, and closes it.
async fn refuse_unavailable<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, why: &str) {
    let body = json!({ "error": { "code": "broker", "message": why } }).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accepts on `listener` and hands each connection over until `shutdown` changes.
pub async fn serve<L, S>(mut listener: L, api: Arc<BrokerApi>, mut shutdown: watch::Receiver<S>)
where
    L: http::Listener,
    L::Stream: AsFd,
    S: Send + Sync + 'static,
{
    let mut taking = JoinSet::new();
    loop {
        while taking.try_join_next().is_some() {}
        let Some(a) = api.gate.accept(&mut listener, &mut shutdown).await else {
            break;
        };
        let api = api.clone();
        taking.spawn(async move {
            api.take(a.stream, (a.peer, a.pidfd, a.accepted), (a.slot, a.permit))
                .await;
        });
    }
    while taking.join_next().await.is_some() {}
}

/// The broker's loopback TCP listener: each connection is attributed to the process on this
/// host that owns its other end; when none can be found, every request on it is refused.
/// Owners are looked for side by side, so one that takes long to find (a walk of every
/// process's descriptors, which any local user can cause) holds up no other connection.
#[derive(Debug)]
pub struct LoopbackListener {
    listener: tokio::net::TcpListener,
    attestation: Attestation,
}

/// What a loopback listener keeps across reloads: the owners of its last connections, and the
/// connections whose owners are being looked for, which a reload hands to the next run's
/// listener instead of dropping them.
#[derive(Debug, Clone, Default)]
pub struct Attestation {
    recent: Arc<RecentOwners>,
    pending: Arc<tokio::sync::Mutex<tokio::task::JoinSet<Attested>>>,
}

/// A connection and its owner, if found.
type Attested = (tokio::net::TcpStream, Option<(Peer, Option<OwnedFd>)>);

/// Connections whose owners are looked for at once, at most (each look a blocking task).
const ATTESTING_AT_MOST: usize = 64;

impl LoopbackListener {
    /// Attributes the connections `listener` accepts, keeping `attestation` between runs.
    pub fn new(listener: tokio::net::TcpListener, attestation: Attestation) -> Self {
        LoopbackListener {
            listener,
            attestation,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

impl http::Listener for LoopbackListener {
    type Stream = tokio::net::TcpStream;

    async fn accept_peer(
        &mut self,
    ) -> std::io::Result<(tokio::net::TcpStream, Option<Peer>, Option<OwnedFd>)> {
        // Only this run's listener takes it (the last run's let go when it stopped accepting).
        let mut pending = self.attestation.pending.lock().await;
        loop {
            tokio::select! {
                Some(done) = pending.join_next(), if !pending.is_empty() => {
                    // A look that panicked: its connection is closed with it.
                    let Ok((stream, found)) = done else { continue };
                    return Ok(match found {
                        Some((peer, pidfd)) => (stream, Some(peer), pidfd),
                        None => (stream, Some(REMOTE_PEER), None),
                    });
                }
                accepted = self.listener.accept(), if pending.len() < ATTESTING_AT_MOST => {
                    let (stream, remote) = accepted?;
                    // Streamed answers are written as their events arrive: each goes out at
                    // once instead of waiting for the agent to acknowledge the one before
                    // (Nagle's algorithm).
                    let _ = stream.set_nodelay(true);
                    let local = stream.local_addr()?;
                    let recent = self.attestation.recent.clone();
                    pending.spawn(async move {
                        let found = tokio::task::spawn_blocking(move || {
                            crate::attest::tcp_peer(local, remote, &recent)
                        })
                        .await
                        .ok()
                        .flatten();
                        (stream, found)
                    });
                }
            }
        }
    }
}
