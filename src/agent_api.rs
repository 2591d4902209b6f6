//! The agent socket API (docs/socket-api.md §2): peer-attested fetches with leases, watches, renewals.
//!
//! | request | reply |
//! |---|---|
//! | `GET /v1/secrets/{name}[?ttl=SECS]` | `{"name","version","value","meta","lease_id","expires_at"}` |
//! | `GET /v1/secrets/{name}?min_version=N&wait=SECS` | as above once version ≥ N, or 304 |
//! | `PUT /v1/leases/{id}/renew[?ttl=SECS]` | `{"lease_id","name","version","expires_at"}` |
//! | `DELETE /v1/leases/{id}` | 204 |
//! | `GET /v1/health` | `{"status":"ok"}` |
//!
//! Deny by default: a fetch needs a `[[policy]]` that admits the peer and covers the name.
//! Every allow and deny is an audit row, committed before the answer.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use keywarden_plugin_sdk::{Credential, Op, Request as PluginRequest, Secret};
use serde_json::json;
use tokio::sync::{broadcast, watch};
use zeroize::Zeroizing;

use crate::attest::Peer;
use crate::attest::{Hasher, PeerIdentity};
use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::http::{self, ApiError, Handler, Slots};
use crate::incident::signals::{FetchSeen, Signals};
use crate::leases::{Granted, LeaseError, PeerKey};
use crate::plugin_host::PluginHost;
use crate::policy::{self, Policy};
use crate::provider::Provider;
use crate::rejections::Rejections;
use crate::rotation::catalog::{Catalog, SecretSpec};
use crate::services::{RunEnd, Services, run_ended};
use crate::store::{AlertKind, LeaseRow, SecretRecord, UpstreamState};
use crate::value::SecretValue;
use crate::vault::{Bound, VaultError, short_fingerprint};

/// Longest TTL anyone may ask for; beyond it a request is malformed, not just clamped.
const MAX_TTL_SECS: u64 = 366 * 86_400;
/// How many times a fetch serves the current version again when it changed under it.
const SERVE_ATTEMPTS: usize = 3;

/// A fetch's answer (the shape of docs/socket-api.md §2).
#[derive(serde::Serialize)]
struct FetchReply<'a> {
    name: &'a str,
    version: Option<i64>,
    value: &'a str,
    meta: &'a crate::vault::Meta,
    lease_id: &'a str,
    expires_at: String,
}

/// The audit detail of an allowed fetch.
#[derive(serde::Serialize)]
struct AllowedDetail<'a> {
    policy: &'a str,
    version: Option<i64>,
    lease_id: &'a str,
    ttl_seconds: i64,
    fingerprint: &'a str,
    issued: bool,
}

/// Per-connection state: the peer, attested once.
#[derive(Debug)]
pub struct AgentConn {
    uid: u32,
    identity: tokio::sync::Mutex<PeerIdentity>,
}

/// A token bucket per uid.
#[derive(Debug)]
struct RateLimiter {
    per_second: f64,
    buckets: Mutex<HashMap<u32, (f64, Instant)>>,
}

impl RateLimiter {
    fn allow(&self, uid: u32) -> bool {
        let mut buckets = self.buckets.lock().expect("rate lock");
        let now = Instant::now();
        let (tokens, last) = buckets.entry(uid).or_insert((self.per_second, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second)
            .min(self.per_second);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The agent API.
#[derive(Debug)]
pub struct AgentApi {
    services: Services,
    policies: Vec<Policy>,
    needs_hash: bool,
    default_ttl: Duration,
    max_wait: Duration,
    rate: Option<RateLimiter>,
    hasher: Hasher,
    daemon_uid: u32,
    refused_uids: HashSet<u32>,
    rejections: Arc<Rejections>,
    watches: Slots,
    closing: watch::Receiver<Option<RunEnd>>,
    signals: Option<Arc<Signals>>,
}

/// Settings of the agent API, from `[agent]` and `[[policy]]`.
#[derive(Debug)]
pub struct AgentSettings {
    /// Compiled policies, in order.
    pub policies: Vec<Policy>,
    /// TTL when a request names none.
    pub default_ttl: Duration,
    /// Longest watch.
    pub max_wait: Duration,
    /// Fetches per second per uid (0: no limit).
    pub max_fetches_per_second: u32,
    /// Uids that run confined programs (plugins, commands): refused outright.
    pub refused_uids: HashSet<u32>,
    /// Where repeated denials are counted.
    pub rejections: Arc<Rejections>,
    /// Watches (`wait=`) one uid may have open at once.
    pub max_watches_per_uid: usize,
}

struct FetchQuery {
    ttl: Option<u64>,
    min_version: Option<i64>,
    wait: Option<u64>,
}

impl FetchQuery {
    fn parse(query: Option<&str>) -> Result<FetchQuery, ApiError> {
        let q = parse_query(query, &["ttl", "min_version", "wait"])?;
        let ttl = q.get("ttl").copied();
        if ttl.is_some_and(|t| t == 0 || t > MAX_TTL_SECS) {
            return Err(bad_request(format!(
                "ttl must be between 1 and {MAX_TTL_SECS} seconds"
            )));
        }
        Ok(FetchQuery {
            ttl,
            min_version: q.get("min_version").map(|v| *v as i64),
            wait: q.get("wait").copied(),
        })
    }
}

/// The plugin that mints a credential per fetch of a secret.
struct Issuer<'a> {
    spec: &'a SecretSpec,
    host: &'a Arc<PluginHost>,
    kind: &'a String,
}

/// What a fetch hands out: a stored version, or a credential issued for this lease alone.
struct Served {
    secret_id: String,
    /// The stored version, or `None` for an issued credential.
    version: Option<i64>,
    value: SecretValue,
    meta: crate::vault::Meta,
    expires_at: Millis,
    /// An issued credential, sealed to its lease (kept to revoke it when the lease ends).
    sealed: Option<Vec<u8>>,
    fingerprint: String,
}

/// The secret's plugin, when each fetch of it mints a credential for its lease (the kind can
/// `issue` and cannot `create`).
fn issuer<'a>(catalog: &'a Catalog, name: &str) -> Option<Issuer<'a>> {
    let spec = catalog.secrets.get(name)?;
    match catalog.providers.get(&spec.provider)? {
        Provider::Plugin { host, kind, info }
            if info.supports(Op::Issue) && !info.supports(Op::Create) =>
        {
            Some(Issuer { spec, host, kind })
        }
        _ => None,
    }
}

/// Mints a credential for lease `lease_id` and grants the lease. The issue is journaled before
/// the plugin is called; if the call fails, or the lease cannot be committed, the credential
/// is revoked (by value when known, else by lease id) and the journal entry ended. An entry
/// whose revocation fails too stays, and the next start revokes it.
async fn issue_and_grant(
    services: &Services,
    who: &PeerIdentity,
    policy: &str,
    name: &str,
    lease_id: &str,
    ttl: Duration,
    now: Millis,
) -> Result<(Zeroizing<Vec<u8>>, String), ApiError> {
    let store = services.vault.store();
    let secret = store
        .secret(name)
        .await?
        .ok_or_else(|| VaultError::NoSuchSecret(name.to_string()))?;
    store
        .journal_issue(lease_id, &secret.id, name, now)
        .await
        .inspect_err(|e| services.audit_writer.health().failed(e))?;
    crash_point!("lease.issue-journaled");
    let revoke = |target: Option<Credential>| async move {
        match services
            .engine
            .revoke_credential(name, target, Some(lease_id))
            .await
        {
            Ok(()) => {
                let _ = store.end_issue(lease_id).await;
            }
            Err(e) => tracing::error!(
                secret = %name,
                lease = %lease_id,
                error = %e,
                "could not revoke a credential issued for a lease that was not granted; \
                 the next start tries again"
            ),
        }
    };
    let mut served = match issue(services, &secret, name, lease_id, ttl, now).await {
        Ok(served) => {
            crash_point!("lease.issued");
            served
        }
        Err(e) => {
            // The plugin may have issued before failing (a timeout, a crash).
            revoke(None).await;
            return Err(e);
        }
    };
    let target = Credential {
        version: None,
        value: Secret::new(served.value.expose()),
        meta: served.meta.clone(),
    };
    // Sealed to the lease and committed with it under the keys in use (see `KeysInUse`); the
    // record is read again under them, as a rekey may have replaced its data key.
    let keys = services.vault.keys_in_use().await;
    let granted = async {
        let secret = store
            .secret(name)
            .await?
            .filter(|s| s.id == served.secret_id)
            .ok_or_else(|| VaultError::NoSuchSecret(name.to_string()))?;
        let sealed = services.vault.seal_bound(
            &keys,
            &secret,
            Bound::Issued(lease_id),
            &served.value,
            &served.meta,
        )?;
        served.sealed = Some(sealed);
        grant(services, who, policy, name, Some(lease_id), served, now).await
    }
    .await;
    drop(keys);
    match granted {
        Ok((body, secret_id, _)) => Ok((body, secret_id)),
        Err(e) => {
            revoke(Some(target)).await;
            Err(e)
        }
    }
}

/// Mints a credential for lease `lease_id` through the secret's plugin (not sealed yet).
async fn issue(
    services: &Services,
    secret: &SecretRecord,
    name: &str,
    lease_id: &str,
    ttl: Duration,
    now: Millis,
) -> Result<Served, ApiError> {
    let issuer = issuer(&services.catalog, name)
        .ok_or_else(|| VaultError::NoSuchSecret(name.to_string()))?;
    let request = services
        .engine
        .plugin_request(
            Op::Issue,
            issuer.kind,
            Some(name),
            &issuer.spec.settings,
            &issuer.spec.credentials,
        )
        .await?;
    let request = PluginRequest {
        ttl_seconds: Some(ttl.as_secs()),
        lease_id: Some(lease_id.to_string()),
        ..request
    };
    let reply = issuer.host.call(request).await?;
    let value = reply.value.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream",
            "the plugin issued no value",
        )
    })?;
    let value = SecretValue::new(value.expose().to_string());
    let lease_end = now + ttl.as_millis() as Millis;
    let upstream_expiry = reply
        .expires_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis());
    let vault = &services.vault;
    Ok(Served {
        sealed: None,
        fingerprint: short_fingerprint(&vault.fingerprint(value.expose().as_bytes())),
        secret_id: secret.id.clone(),
        version: None,
        value,
        meta: reply.meta,
        expires_at: upstream_expiry.map_or(lease_end, |u| u.min(lease_end)),
    })
}

/// The secret's current stored version.
async fn stored(
    services: &Services,
    name: &str,
    ttl: Duration,
    now: Millis,
) -> Result<Served, ApiError> {
    let read = services.vault.read(name, None).await?;
    Ok(Served {
        // The stored version carries its fingerprint: no need to compute it again.
        fingerprint: read.short_fingerprint(),
        secret_id: read.secret_id,
        version: Some(read.version),
        value: read.value,
        meta: read.meta,
        expires_at: now + ttl.as_millis() as Millis,
        sealed: None,
    })
}

/// Records the lease and its `fetch.allowed` audit row (a repeated fetch by the same peer of
/// the same stored version extends the lease it holds instead); returns the reply body and
/// the secret's id. `lease_id` is the id of an issued credential's lease; a stored version's
/// new lease gets a new one.
async fn grant(
    services: &Services,
    who: &PeerIdentity,
    policy: &str,
    name: &str,
    lease_id: Option<&str>,
    served: Served,
    now: Millis,
) -> Result<(Zeroizing<Vec<u8>>, String, Granted), ApiError> {
    let exe = who.exe.as_ref().map(|e| e.display().to_string());
    let repeated = match served.version.filter(|_| served.sealed.is_none()) {
        Some(version) => {
            let peer = PeerKey {
                uid: who.peer.uid,
                gid: who.peer.gid,
                exe: exe.clone(),
                secret_id: served.secret_id.clone(),
                version,
            };
            services.leases.repeat(&peer, served.expires_at).await?
        }
        None => None,
    };
    let granted = match repeated {
        Some(granted) => granted,
        None => {
            let lease_id = lease_id.map_or_else(new_lease_id, str::to_string);
            let audit = || {
                AuditEvent::new(who.actor(), "fetch.allowed")
                    .secret(name)
                    .detail(AllowedDetail {
                        policy,
                        version: served.version,
                        lease_id: &lease_id,
                        ttl_seconds: (served.expires_at - now) / 1000,
                        fingerprint: &served.fingerprint,
                        issued: served.version.is_none(),
                    })
            };
            let lease = LeaseRow {
                id: lease_id.clone(),
                secret_id: served.secret_id.clone(),
                secret_name: name.to_string(),
                version: served.version,
                issued_meta: served.sealed.as_ref().map(|_| served.meta.clone()),
                upstream_state: served.sealed.as_ref().map(|_| UpstreamState::Live),
                issued: served.sealed,
                uid: who.peer.uid,
                gid: who.peer.gid,
                pid: who.peer.pid.unwrap_or(0),
                exe,
                created_at: now,
                expires_at: served.expires_at,
                ended_at: None,
            };
            services.leases.grant(lease, audit).await?
        }
    };
    crash_point!("lease.granted");
    let reply = FetchReply {
        name,
        version: served.version,
        value: served.value.expose(),
        meta: &served.meta,
        lease_id: &granted.id,
        expires_at: crate::clock::rfc3339(granted.expires_at),
    };
    let body = Zeroizing::new(serde_json::to_vec(&reply).expect("replies serialize"));
    Ok((body, served.secret_id, granted))
}

/// Whether this process was started with failpoints configured (`FAILPOINTS`), read once: the
/// `fetch.served` failpoint's blocking section is taken only then (benchmarks run test builds).
#[cfg(feature = "failpoints")]
static FAILPOINTS_SET: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("FAILPOINTS").is_some());

/// A new lease id: time-ordered, so lease inserts land at the end of the index.
fn new_lease_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An answer with a status and no body.
fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn bad(message: impl Into<String>) -> Response<Full<Bytes>> {
    bad_request(message).response()
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn parse_query(query: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, u64>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in http::query_pairs(query) {
        if !allowed.contains(&k) {
            return Err(bad_request(format!(
                "unknown query parameter {:?}",
                k.chars().take(40).collect::<String>()
            )));
        }
        let n: u64 = v.parse().map_err(|_| {
            bad_request(format!(
                "{k} must be a whole number, not {:?}",
                v.chars().take(40).collect::<String>()
            ))
        })?;
        if out.insert(k.to_string(), n).is_some() {
            return Err(bad_request(format!("{k} is given twice")));
        }
    }
    Ok(out)
}

impl AgentApi {
    /// An API over the engine's vault and the lease table.
    pub fn new(
        services: Services,
        settings: AgentSettings,
        closing: watch::Receiver<Option<RunEnd>>,
        signals: Option<Arc<Signals>>,
    ) -> Self {
        let needs_hash = settings.policies.iter().any(Policy::checks_hash);
        AgentApi {
            services,
            needs_hash,
            policies: settings.policies,
            default_ttl: settings.default_ttl,
            max_wait: settings.max_wait,
            rate: (settings.max_fetches_per_second > 0).then(|| RateLimiter {
                per_second: f64::from(settings.max_fetches_per_second),
                buckets: Mutex::new(HashMap::new()),
            }),
            hasher: Hasher::default(),
            daemon_uid: rustix::process::getuid().as_raw(),
            refused_uids: settings.refused_uids,
            rejections: settings.rejections,
            watches: Slots::new(settings.max_watches_per_uid),
            closing,
            signals,
        }
    }

    /// Any fetch of a canary, allowed or not, is a signal (answered as usual, so as not to
    /// warn whoever is fetching).
    fn note_canary(&self, name: &str, who: &PeerIdentity) {
        let canary = self
            .services
            .catalog
            .secrets
            .get(name)
            .is_some_and(|s| s.canary);
        if let (true, Some(signals)) = (canary, &self.signals) {
            if !signals.is_news(AlertKind::Canary, name) {
                self.services
                    .metrics
                    .reactions_suppressed
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            let (signals, name, actor) = (signals.clone(), name.to_string(), who.actor());
            tokio::spawn(async move { signals.canary(&name, &actor).await });
        }
    }

    /// The peer's identity, with its executable hashed when a policy needs it.
    async fn identity(&self, conn: &AgentConn) -> PeerIdentity {
        self.hasher.identity(&conn.identity, self.needs_hash).await
    }

    async fn audit(&self, events: Vec<AuditEvent>) -> Result<(), ApiError> {
        self.services
            .audit_writer
            .write(Vec::new(), events)
            .await
            .map_err(ApiError::from)
    }

    async fn deny(&self, who: &PeerIdentity, name: &str, reason: &str) -> Response<Full<Bytes>> {
        self.services
            .metrics
            .fetch_denied
            .fetch_add(1, Ordering::Relaxed);
        let forbidden = || {
            http::error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("no policy allows this peer to fetch {name:?}"),
            )
        };
        let actor = who.actor();
        if !self
            .rejections
            .first("fetch.denied", who.peer.uid, Some(name), reason, &actor)
        {
            // A repeat in this window: counted, written with the window's row.
            return forbidden();
        }
        let event = AuditEvent::new(actor, "fetch.denied")
            .secret(name)
            .detail(json!({ "reason": reason }));
        if let Err(e) = self.audit(vec![event]).await {
            return e.response();
        }
        forbidden()
    }

    async fn fetch(
        &self,
        conn: &AgentConn,
        name: &str,
        query: Option<&str>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let q = FetchQuery::parse(query)?;
        let mut who = self.identity(conn).await;
        self.note_canary(name, &who);
        let Some(policy) = policy::decide(&self.policies, &mut who, name, self.daemon_uid) else {
            return Ok(self.deny(&who, name, "no policy matches").await);
        };
        if self.rate.as_ref().is_some_and(|r| !r.allow(who.peer.uid)) {
            self.services
                .metrics
                .fetch_rate_limited
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many fetches; slow down",
            ));
        }
        if let Some(min) = q.min_version {
            // Watches hold a connection for long: they have their own cap per uid, so they
            // cannot crowd out fetches, nor fetches them.
            let _watch = match q.wait.filter(|w| *w > 0) {
                Some(_) => Some(self.watches.take(who.peer.uid).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_watches",
                        "this uid has too many watches open",
                    )
                })?),
                None => None,
            };
            if !self
                .wait_for_version(name, min, q.wait.unwrap_or(0))
                .await?
            {
                return Ok(status_only(StatusCode::NOT_MODIFIED));
            }
        }
        let ttl =
            Duration::from_secs(q.ttl.unwrap_or(self.default_ttl.as_secs())).min(policy.max_ttl);
        let now = self.services.clock.now();
        let (body, secret_id) = if issuer(&self.services.catalog, name).is_some() {
            // Minting runs in a task of its own: a client that hangs up mid-request cannot stop
            // it half way. Its lease is committed (and revoked at its end), or the credential
            // is revoked at once, whatever the client does.
            let (services, who, policy) = (self.services.clone(), who.clone(), policy.name.clone());
            let (name, lease_id) = (name.to_string(), new_lease_id());
            tokio::spawn(async move {
                issue_and_grant(&services, &who, &policy, &name, &lease_id, ttl, now).await
            })
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??
        } else {
            self.grant_current(&who, &policy.name, name, ttl, now)
                .await?
        };
        self.services
            .metrics
            .fetch_allowed
            .fetch_add(1, Ordering::Relaxed);
        self.note_fetch(
            &who,
            name,
            &secret_id,
            who.exe.as_ref().map(|e| e.display().to_string()),
        );
        let mut response = Response::new(Full::new(Bytes::copy_from_slice(&body)));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    /// Serves the current version under a lease. A rotation that made a newer version current
    /// before the lease was registered may have found no lease on the version served and gone
    /// on to retire it (an alternating database user reused, say): so the answer goes out only
    /// if the version is still current once its lease is in place (from then on the rotation's
    /// drain waits for it); otherwise the lease is ended and the fetch served again.
    async fn grant_current(
        &self,
        who: &PeerIdentity,
        policy: &str,
        name: &str,
        ttl: Duration,
        now: Millis,
    ) -> Result<(Zeroizing<Vec<u8>>, String), ApiError> {
        for _ in 0..SERVE_ATTEMPTS {
            let served = stored(&self.services, name, ttl, now).await?;
            let version = served.version;
            tracing::debug!(secret = name, version, "serving; registering its lease");
            // A test holds the fetch here (`FAILPOINTS=fetch.served=sleep(…)`) while the rest
            // of the daemon runs on.
            #[cfg(feature = "failpoints")]
            if *FAILPOINTS_SET {
                tokio::task::block_in_place(|| {
                    crash_point!("fetch.served");
                });
            }
            let (body, secret_id, granted) =
                grant(&self.services, who, policy, name, None, served, now).await?;
            let current = self.services.vault.store().sealed(name, None).await?;
            // An extended lease was in place before: a drain saw it.
            if granted.extended || current.map(|c| c.version.version) == version {
                return Ok((body, secret_id));
            }
            let audit = AuditEvent::new(who.actor(), "lease.superseded")
                .secret(name)
                .detail(json!({ "lease_id": granted.id, "version": version }));
            self.services
                .leases
                .delete(&granted.id, who.peer.uid, audit)
                .await?;
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rotating",
            "the secret changed version while it was served; try again",
        ))
    }

    /// Tells the anomaly detector of an allowed fetch; what is news to it is acted on in the
    /// background.
    fn note_fetch(&self, who: &PeerIdentity, name: &str, secret_id: &str, exe: Option<String>) {
        let Some(signals) = &self.signals else { return };
        let exe = exe.unwrap_or_else(|| "unknown".into());
        if let Some(news) = signals.note_fetch(secret_id, who.peer.uid, &exe) {
            let fetch = FetchSeen {
                name: name.to_string(),
                secret_id: secret_id.to_string(),
                uid: who.peer.uid,
                exe,
                caller: who.actor(),
            };
            let signals = signals.clone();
            tokio::spawn(async move { signals.act_on_fetch(fetch, news).await });
        }
    }

    /// Waits (up to `wait` seconds) until `name`'s current version is at least `min`.
    async fn wait_for_version(&self, name: &str, min: i64, wait: u64) -> Result<bool, ApiError> {
        let mut events = self.services.engine.subscribe();
        let current = || async {
            self.services
                .vault
                .store()
                .sealed(name, None)
                .await
                .map(|s| s.map(|s| s.version.version))
                .map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
                })
        };
        if current().await?.is_some_and(|v| v >= min) {
            return Ok(true);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait).min(self.max_wait);
        let mut closing = self.closing.clone();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(e) if e.secret == name && e.promoted_version.is_some_and(|v| v >= min) => return Ok(true),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if current().await?.is_some_and(|v| v >= min) {
                            return Ok(true);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(false),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.services.metrics.watch_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Ok(false);
                }
                end = run_ended(&mut closing) => {
                    // A restart cuts the wait short: answered as if it had run out (304), the
                    // client asks again of the next run.
                    if end == RunEnd::Restart {
                        return Ok(false);
                    }
                    return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sealed", "the daemon is stopping"));
                }
            }
        }
    }

    async fn renew(
        &self,
        conn: &AgentConn,
        id: &str,
        query: Option<&str>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let q = parse_query(query, &["ttl"])?;
        let mut who = self.identity(conn).await;
        let lease = self.services.leases.get(id).ok_or(LeaseError::NotFound)?;
        if lease.issued.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "issued",
                "a credential issued for a lease expires upstream and cannot be renewed; fetch a new one",
            ));
        }
        let Some(policy) = policy::decide(
            &self.policies,
            &mut who,
            &lease.secret_name,
            self.daemon_uid,
        )
        .cloned() else {
            return Ok(self
                .deny(&who, &lease.secret_name, "no policy matches the renewal")
                .await);
        };
        let ttl = match q.get("ttl") {
            Some(0) => return Err(bad_request("ttl must be at least 1 second")),
            Some(t) if *t > MAX_TTL_SECS => {
                return Err(bad_request(format!(
                    "ttl must be at most {MAX_TTL_SECS} seconds"
                )));
            }
            Some(t) => Duration::from_secs(*t),
            None => self.default_ttl,
        }
        .min(policy.max_ttl);
        let expires_at = self.services.clock.now() + ttl.as_millis() as Millis;
        let audit = AuditEvent::new(who.actor(), "lease.renewed")
            .secret(&lease.secret_name)
            .detail(json!({ "lease_id": id, "ttl_seconds": ttl.as_secs() }));
        let l = self
            .services
            .leases
            .renew(id, who.peer.uid, expires_at, audit)
            .await?;
        Ok(http::json(
            StatusCode::OK,
            &json!({ "lease_id": l.id, "name": l.secret_name, "version": l.version, "expires_at": crate::clock::rfc3339(l.expires_at) }),
        ))
    }

    async fn delete(&self, conn: &AgentConn, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let who = self.identity(conn).await;
        let lease = self.services.leases.get(id).ok_or(LeaseError::NotFound)?;
        let audit = AuditEvent::new(who.actor(), "lease.deleted")
            .secret(&lease.secret_name)
            .detail(json!({ "lease_id": id }));
        self.services.leases.delete(id, who.peer.uid, audit).await?;
        Ok(status_only(StatusCode::NO_CONTENT))
    }
}

fn valid_lease_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Handler for AgentApi {
    type Conn = AgentConn;

    fn connect(&self, peer: Peer, pidfd: Option<OwnedFd>, accepted: f64) -> AgentConn {
        AgentConn {
            uid: peer.uid,
            identity: tokio::sync::Mutex::new(PeerIdentity::attest(
                peer,
                pidfd,
                accepted,
                self.hasher.cache(),
            )),
        }
    }

    async fn handle(&self, conn: &AgentConn, request: Request<Bytes>) -> Response<Full<Bytes>> {
        if self.refused_uids.contains(&conn.uid) {
            return http::error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this uid runs keywarden's plugins and may not use the agent socket",
            );
        }
        let path = request.uri().path();
        let query = request.uri().query();
        if path.contains('%') {
            return bad("percent-encoded paths are not accepted");
        }
        let method = request.method();
        if path == "/v1/health" {
            return http::json(StatusCode::OK, &json!({ "status": "ok" }));
        }
        if let Some(name) = path.strip_prefix("/v1/secrets/") {
            if method != Method::GET {
                return http::error(StatusCode::METHOD_NOT_ALLOWED, "method", "use GET");
            }
            if let Err(e) = crate::name::validate(name) {
                return bad(e.to_string());
            }
            return self
                .fetch(conn, name, query)
                .await
                .unwrap_or_else(|e| e.response());
        }
        if let Some(rest) = path.strip_prefix("/v1/leases/") {
            return match (method, rest.strip_suffix("/renew")) {
                (&Method::PUT, Some(id)) if valid_lease_id(id) => self
                    .renew(conn, id, query)
                    .await
                    .unwrap_or_else(|e| e.response()),
                (&Method::DELETE, None) if valid_lease_id(rest) => self
                    .delete(conn, rest)
                    .await
                    .unwrap_or_else(|e| e.response()),
                (&Method::PUT | &Method::DELETE, _) => bad("malformed lease id"),
                _ => http::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method",
                    "use PUT …/renew or DELETE",
                ),
            };
        }
        http::error(StatusCode::NOT_FOUND, "unknown", "no such endpoint")
    }
}
