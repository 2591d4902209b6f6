//! The admin API on `admin.sock` (mode 0600, or 0666 with `admin_uids`; only root, the daemon's own uid and `admin_uids`):
//! `POST /v1/admin/rotate/{name}[?wait=SECS]`, `POST /v1/admin/compromise[?wait=SECS]` (body:
//! the scope), `POST /v1/admin/compromise/plan`, `GET /v1/admin/incidents/{id}` (and
//! `…/{id}/progress`: counts only),
//! `GET /v1/admin/status` and `GET /metrics`.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::watch;

use crate::attest::Peer;
use crate::audit::AuditEvent;
use crate::http::{self, Handler};
use crate::incident::compromise::{
    CompromiseError, DEFAULT_CONCURRENCY, MAX_CONCURRENCY, Progress,
};
use crate::rejections::Rejections;
use crate::rotation::engine::EngineError;
use crate::services::{RunEnd, Services, run_ended};
use crate::store::Reason;
use crate::store::{RotationRecord, RotationState};
use crate::store::{Scope, Trigger};

/// Longest a `rotate` request waits for the rotation to settle.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The admin API.
#[derive(Debug)]
pub struct AdminApi {
    services: Services,
    allowed_uids: HashSet<u32>,
    rejections: Arc<Rejections>,
    /// The KDF a new passphrase is wrapped with (`[store.kdf]`).
    kdf: crate::crypto::KdfParams,
    /// Set when this run of the services ends: waits answer with what they have.
    closing: watch::Receiver<Option<RunEnd>>,
}

/// The body of `POST /v1/admin/compromise` (and `…/plan`): the scope, and how to run.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CompromiseBody {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    providers: Vec<String>,
    /// Revoke leases and old versions without grace (the default for this endpoint).
    #[serde(default = "yes")]
    assume_compromise: bool,
    /// Secrets rotated at once (default [`DEFAULT_CONCURRENCY`]).
    concurrency: Option<usize>,
}

fn yes() -> bool {
    true
}

/// The body of `PUT /v1/admin/secrets/{name}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: String,
    #[serde(default)]
    meta: crate::vault::Meta,
}

/// The body of `POST /v1/admin/passwd`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswdBody {
    current: String,
    new: String,
}

/// The body of `POST /v1/admin/rekey`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RekeyBody {
    passphrase: String,
    #[serde(default)]
    data_keys: bool,
}

/// The body of `POST /v1/admin/audit/archive`: rows an admin has written to an archive file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchivedBody {
    first_seq: i64,
    last_seq: i64,
    rows: u64,
    head: String,
    file: String,
}

/// The body of `POST /v1/admin/copies`: candidate values found in plaintext (`scan`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CopiesBody {
    values: Vec<String>,
}

/// The body of `POST /v1/admin/alerts/ack`: these alerts, or all of them.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
}

impl CompromiseBody {
    fn scope(&self) -> Scope {
        Scope {
            all: self.all,
            names: self.names.clone(),
            tags: self.tags.clone(),
            providers: self.providers.clone(),
        }
    }
}

impl AdminApi {
    /// An API over `engine`, open to root, the daemon's uid and `extra_uids`, never to
    /// `refused_uids` (the users confined programs run as).
    pub fn new(
        services: Services,
        extra_uids: &[u32],
        refused_uids: &HashSet<u32>,
        rejections: Arc<Rejections>,
        kdf: crate::crypto::KdfParams,
        closing: watch::Receiver<Option<RunEnd>>,
    ) -> Self {
        let mut allowed_uids: HashSet<u32> = extra_uids.iter().copied().collect();
        allowed_uids.insert(0);
        allowed_uids.insert(rustix::process::getuid().as_raw());
        allowed_uids.retain(|uid| !refused_uids.contains(uid));
        AdminApi {
            services,
            allowed_uids,
            rejections,
            kdf,
            closing,
        }
    }

    async fn compromise(
        &self,
        body: &Bytes,
        query: Option<&str>,
        peer: Peer,
        plan_only: bool,
    ) -> Response<Full<Bytes>> {
        let body: CompromiseBody =
            match serde_json::from_slice(if body.is_empty() { b"{}" } else { body }) {
                Ok(b) => b,
                Err(e) => {
                    return http::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("bad scope: {e}"),
                    );
                }
            };
        if body
            .concurrency
            .is_some_and(|c| !(1..=MAX_CONCURRENCY).contains(&c))
        {
            return http::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("concurrency must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
        let scope = body.scope();
        if plan_only {
            return match self.services.incidents.plan(&scope).await {
                Ok(plan) => http::json(
                    StatusCode::OK,
                    &serde_json::to_value(&plan).expect("plans serialize"),
                ),
                Err(e) => compromise_error(e),
            };
        }
        let mut wait = Duration::ZERO;
        for (k, v) in http::query_pairs(query) {
            match (k, v.parse::<u64>()) {
                ("wait", Ok(secs)) => {
                    wait = Duration::from_secs(secs).min(Duration::from_secs(3600))
                }
                _ => {
                    return http::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("unknown or bad query parameter {k:?}"),
                    );
                }
            }
        }
        let audit = AuditEvent::new(Self::actor(peer), "admin.compromise")
            .detail(json!({ "scope": scope, "assume_compromise": body.assume_compromise }));
        if let Err(e) = self.services.vault.store().append_audit(&[audit]).await {
            return http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string());
        }
        let id = match self
            .services
            .incidents
            .start(
                scope,
                body.assume_compromise,
                body.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
                Trigger::Admin,
            )
            .await
        {
            Ok(id) => id,
            Err(e) => return compromise_error(e),
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut closing = self.closing.clone();
        loop {
            if !self.services.incidents.is_running(&id) {
                return self.incident(&id).await;
            }
            // At a stop or a restart the run is left to finish (or to resume at the next
            // start) and the request is answered as if its wait had run out.
            let waited_out = tokio::time::Instant::now() >= deadline
                || tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => false,
                    _ = run_ended(&mut closing) => true,
                };
            if waited_out {
                return http::json(
                    StatusCode::ACCEPTED,
                    &json!({ "incident_id": id, "finished": false }),
                );
            }
        }
    }

    /// `GET /v1/admin/incidents/{id}/progress`: counts only, kept in memory while the run goes
    /// (what the CLI polls); from the full report once it is over or ran elsewhere.
    async fn progress(&self, id: &str) -> Response<Full<Bytes>> {
        let progress = match self.services.incidents.progress(id) {
            Some(p) => p,
            None => match self.services.incidents.report(id).await {
                Ok(report) => Progress {
                    total: report.rotated.len() + report.failed.len() + report.pending.len(),
                    done: report.rotated.len() + report.failed.len(),
                    failed: report.failed.len() - report.needs_person.len(),
                    finished: report.finished,
                },
                Err(e) => return compromise_error(e),
            },
        };
        http::json(
            StatusCode::OK,
            &serde_json::to_value(progress).expect("progress serializes"),
        )
    }

    async fn incident(&self, id: &str) -> Response<Full<Bytes>> {
        match self.services.incidents.report(id).await {
            Ok(report) => http::json(
                StatusCode::OK,
                &serde_json::to_value(&report).expect("reports serialize"),
            ),
            Err(e) => compromise_error(e),
        }
    }

    /// `/v1/admin/secrets/{name}`: `GET` its value (`?version=N` for another), `PUT`
    /// `{"value","meta"}` a new version, `DELETE` it (its data key destroyed); each audited as
    /// the admin's action, and the daemon serves the change at once.
    async fn secret(
        &self,
        method: &Method,
        name: &str,
        query: Option<&str>,
        body: &Bytes,
        peer: Peer,
    ) -> Response<Full<Bytes>> {
        if let Err(e) = crate::name::validate(name) {
            return http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
        }
        let actor = Self::actor(peer);
        let vault = &self.services.vault;
        match *method {
            Method::GET => {
                let mut version = None;
                for (k, v) in http::query_pairs(query) {
                    match (k, v.parse::<i64>()) {
                        ("version", Ok(n)) => version = Some(n),
                        _ => {
                            return http::error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("unknown or bad query parameter {k:?}"),
                            );
                        }
                    }
                }
                match vault.get(name, version, &actor).await {
                    Ok(r) => http::json(
                        StatusCode::OK,
                        &json!({
                            "name": r.name,
                            "version": r.version,
                            "value": r.value.expose(),
                            "meta": r.meta,
                        }),
                    ),
                    Err(e) => vault_error(e),
                }
            }
            Method::PUT => {
                // Never echo a parse error: it could quote the value.
                let Ok(body) = serde_json::from_slice::<PutBody>(body) else {
                    return http::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "the body must be {\"value\": STRING, \"meta\": {KEY: STRING, …}}",
                    );
                };
                let value = crate::value::SecretValue::new(body.value);
                match vault.put(name, "manual", &value, body.meta, &actor).await {
                    Ok(version) => {
                        self.services.engine.value_stored(name, version);
                        http::json(StatusCode::OK, &json!({ "name": name, "version": version }))
                    }
                    Err(e) => vault_error(e),
                }
            }
            Method::DELETE => match vault.remove(name, &actor).await {
                Ok(versions) => http::json(
                    StatusCode::OK,
                    &json!({ "name": name, "versions_destroyed": versions }),
                ),
                Err(e) => vault_error(e),
            },
            _ => http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method",
                "GET, PUT or DELETE",
            ),
        }
    }

    /// `POST /v1/admin/passwd` `{"current","new"}`: wraps the root key under a new passphrase,
    /// if `current` opens the store.
    async fn passwd(
        &self,
        body: &Bytes,
        peer: Peer,
        kdf: crate::crypto::KdfParams,
    ) -> Response<Full<Bytes>> {
        let Ok(body) = serde_json::from_slice::<PasswdBody>(body) else {
            return http::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body must be {\"current\": STRING, \"new\": STRING}",
            );
        };
        let (current, new) = (
            zeroize::Zeroizing::new(body.current),
            zeroize::Zeroizing::new(body.new),
        );
        let vault = &self.services.vault;
        if let Err(e) = vault.check_passphrase(&current).await {
            return vault_error(e);
        }
        match vault.change_passphrase(&new, kdf, &Self::actor(peer)).await {
            Ok(()) => http::json(StatusCode::OK, &json!({ "changed": true })),
            Err(e) => vault_error(e),
        }
    }

    /// `POST /v1/admin/rekey` `{"passphrase","data_keys"}`: a new root key (and with
    /// `data_keys`, new data keys and every value re-encrypted), if `passphrase` opens the
    /// store. Sealing and opening pause meanwhile; the daemon serves with the new keys after.
    async fn rekey(&self, body: &Bytes, peer: Peer) -> Response<Full<Bytes>> {
        let Ok(body) = serde_json::from_slice::<RekeyBody>(body) else {
            return http::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body must be {\"passphrase\": STRING, \"data_keys\": BOOL}",
            );
        };
        let passphrase = zeroize::Zeroizing::new(body.passphrase);
        match self
            .services
            .vault
            .rekey(&passphrase, &Self::actor(peer), body.data_keys)
            .await
        {
            Ok(count) => http::json(
                StatusCode::OK,
                &json!({ "data_keys": count, "data_keys_replaced": body.data_keys }),
            ),
            Err(e) => vault_error(e),
        }
    }

    /// `POST /v1/admin/backup`: a consistent copy of the store (values sealed), as the body
    /// (`application/octet-stream`), audited `vault.backup` with its size and SHA-256.
    async fn backup(&self, peer: Peer) -> Response<Full<Bytes>> {
        let store = self.services.vault.store();
        let copy = async {
            let partial =
                crate::backup::snapshot(store, crate::backup::parent(store.path())).await?;
            let bytes = std::fs::read(&partial);
            let _ = std::fs::remove_file(&partial);
            let bytes = bytes.map_err(|source| crate::backup::BackupError::Io {
                what: "cannot read",
                path: partial,
                source,
            })?;
            let audit = AuditEvent::new(Self::actor(peer), "vault.backup").detail(json!({
                "bytes": bytes.len(),
                "sha256": crate::crypto::hex(&crate::crypto::sha256(&bytes)),
            }));
            store.append_audit(&[audit]).await?;
            Ok::<_, crate::backup::BackupError>(bytes)
        };
        match copy.await {
            Ok(bytes) => {
                let mut response = Response::new(Full::new(Bytes::from(bytes)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/octet-stream"),
                );
                response
            }
            Err(e) => {
                tracing::error!(error = %e, "backup failed");
                http::error(StatusCode::INTERNAL_SERVER_ERROR, "backup", e.to_string())
            }
        }
    }

    /// `POST /v1/admin/audit/archive` `{"first_seq","last_seq","rows","head","file"}`: removes
    /// the rows `keywarden audit archive` wrote to its file, if the chain still starts at
    /// `first_seq` and row `last_seq` still has the hash `head`; that row becomes the chain's
    /// anchor under the vault's seal, and `audit.archived` is appended.
    async fn archive_audit(&self, body: &Bytes, peer: Peer) -> Response<Full<Bytes>> {
        let Ok(body) = serde_json::from_slice::<ArchivedBody>(body) else {
            return http::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body must be {\"first_seq\", \"last_seq\", \"rows\", \"head\", \"file\"}",
            );
        };
        let Some(head) = crate::crypto::from_hex(&body.head) else {
            return http::error(StatusCode::BAD_REQUEST, "bad_request", "head must be hex");
        };
        let vault = &self.services.vault;
        let anchor = match vault.store().audit_anchor().await {
            Ok(anchor) => anchor.map_or(0, |(seq, _)| seq),
            Err(e) => return vault_error(e.into()),
        };
        if anchor + 1 != body.first_seq || body.last_seq < body.first_seq {
            return http::error(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "the store's chain now starts at row {}, not {}: archive again",
                    anchor + 1,
                    body.first_seq
                ),
            );
        }
        let event = AuditEvent::new(Self::actor(peer), "audit.archived").detail(json!({
            "first_seq": body.first_seq,
            "last_seq": body.last_seq,
            "rows": body.rows,
            "head": body.head,
            "file": body.file,
        }));
        match vault.archive_audit(body.last_seq, &head, event).await {
            Ok(()) => http::json(StatusCode::OK, &json!({ "archived": body.rows })),
            Err(crate::vault::VaultError::Store(crate::store::StoreError::Conflict(what))) => {
                http::error(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("{what} is not the row that was archived: archive again"),
                )
            }
            Err(e) => vault_error(e),
        }
    }

    /// `POST /v1/admin/copies` `{"values":[…]}`: for each value, the stored versions it is a
    /// plaintext copy of (`[[{"secret","version","stage"}]]`), matched by keyed fingerprint.
    async fn copies(&self, body: &Bytes) -> Response<Full<Bytes>> {
        let Ok(body) = serde_json::from_slice::<CopiesBody>(body) else {
            return http::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body must be {\"values\": [STRING, …]}",
            );
        };
        let values: Vec<zeroize::Zeroizing<String>> = body
            .values
            .into_iter()
            .map(zeroize::Zeroizing::new)
            .collect();
        let refs: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
        match self.services.vault.copies_of(&refs).await {
            Ok(found) => http::json(StatusCode::OK, &copies_json(&found)),
            Err(e) => vault_error(e),
        }
    }

    /// `POST /v1/admin/alerts/ack`: acknowledges alerts as the admin (audited `alert.acked`).
    async fn ack_alerts(&self, body: &Bytes, peer: Peer) -> Response<Full<Bytes>> {
        let body: AckBody = match serde_json::from_slice(body) {
            Ok(b @ AckBody { all: true, .. }) => b,
            Ok(b) if !b.ids.is_empty() => b,
            Ok(_) => {
                return http::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "say which alerts: {\"ids\":[…]} or {\"all\":true}",
                );
            }
            Err(e) => {
                return http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
            }
        };
        let actor = Self::actor(peer);
        let audit = AuditEvent::new(actor.as_str(), "alert.acked");
        let ids = (!body.all).then_some(&body.ids[..]);
        match self
            .services
            .vault
            .store()
            .ack_alerts(ids, &actor, audit)
            .await
        {
            Ok(acked) => http::json(StatusCode::OK, &json!({ "acked": acked })),
            Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
        }
    }

    /// Whether the peer is root or the daemon's own user: who may read and write values.
    fn owns_the_store(peer: Peer) -> bool {
        peer.uid == 0 || peer.uid == rustix::process::getuid().as_raw()
    }

    /// `POST /v1/admin/brokers/{name}/block` (or `/unblock`): audited, then in effect at once;
    /// the audit row is what a restarted daemon reads back.
    async fn block_broker(&self, rest: &str, peer: Peer) -> Response<Full<Bytes>> {
        let (name, block) = match rest.rsplit_once('/') {
            Some((name, "block")) => (name, true),
            Some((name, "unblock")) => (name, false),
            _ => return http::error(StatusCode::NOT_FOUND, "unknown", "no such endpoint"),
        };
        let Some(brokers) = self
            .services
            .brokers
            .as_ref()
            .filter(|b| b.brokers.contains_key(name))
        else {
            return http::error(
                StatusCode::NOT_FOUND,
                "unknown",
                format!("no broker named {name:?} is configured"),
            );
        };
        let action = if block {
            "broker.blocked"
        } else {
            "broker.unblocked"
        };
        let event = AuditEvent::new(Self::actor(peer), action).detail(json!({ "broker": name }));
        if let Err(e) = self
            .services
            .audit_writer
            .write(Vec::new(), vec![event])
            .await
        {
            return http::ApiError::from(e).response();
        }
        brokers.enforced.set_blocked(name, block);
        // At once in the running process; a process that is down gets it when it starts.
        if let Err(e) = brokers.process.push_state().await {
            tracing::warn!(error = %e, broker = name, "the block reaches the broker process when it starts again");
        }
        http::json(StatusCode::OK, &json!({ "broker": name, "blocked": block }))
    }

    fn actor(peer: Peer) -> String {
        format!("admin uid={} pid={}", peer.uid, peer.pid.unwrap_or(0))
    }

    async fn rotate(&self, name: &str, query: Option<&str>, peer: Peer) -> Response<Full<Bytes>> {
        if let Err(e) = crate::name::validate(name) {
            return http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string());
        }
        let mut wait = Duration::ZERO;
        for (k, v) in http::query_pairs(query) {
            match (k, v.parse::<u64>()) {
                ("wait", Ok(secs)) => wait = Duration::from_secs(secs).min(MAX_WAIT),
                _ => {
                    return http::error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("unknown or bad query parameter {k:?}"),
                    );
                }
            }
        }
        let ticket = match self
            .services
            .engine
            .request(name, Reason::Manual, false, None)
            .await
        {
            Ok(t) => t,
            Err(EngineError::UnknownSecret(_)) => {
                return http::error(
                    StatusCode::NOT_FOUND,
                    "unknown",
                    format!("no secret named {name:?} is declared"),
                );
            }
            Err(e @ EngineError::NeedsPerson { .. }) => {
                return http::error(StatusCode::CONFLICT, "needs_person", e.to_string());
            }
            Err(e) => {
                return http::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
            }
        };
        // What the request did: started a rotation, or joined one already under way.
        let audit = AuditEvent::new(Self::actor(peer), "admin.rotate")
            .secret(name)
            .detail(json!({ "rotation": ticket.rotation_id, "joined": ticket.joined }));
        if let Err(e) = self.services.vault.store().append_audit(&[audit]).await {
            return http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string());
        }
        let record = if wait.is_zero() {
            self.services
                .vault
                .store()
                .rotation(&ticket.rotation_id)
                .await
        } else {
            // At a stop or a restart: the rotation as it stands.
            let mut closing = self.closing.clone();
            tokio::select! {
                record = self.services.engine.wait(&ticket.rotation_id, wait) => record,
                _ = run_ended(&mut closing) => {
                    self.services.vault.store().rotation(&ticket.rotation_id).await
                }
            }
        };
        let record = match record {
            Ok(Some(r)) => r,
            Ok(None) => {
                return http::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the rotation vanished",
                );
            }
            Err(e) => {
                return http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string());
            }
        };
        let quarantined = self
            .services
            .vault
            .store()
            .secret_summary(name)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.quarantined_at.map(|_| s.last_error.unwrap_or_default()));
        let mut outcome = rotation_outcome(&record, ticket.joined, quarantined);
        if record.state == RotationState::Draining {
            outcome["waiting_for"] = self.drain_wait(&record);
        }
        http::json(StatusCode::OK, &outcome)
    }

    /// What a draining rotation waits for: live leases on the version it replaces, and the
    /// end of its grace period, when it revokes that version regardless.
    fn drain_wait(&self, record: &RotationRecord) -> serde_json::Value {
        let leases = record
            .from_version
            .map_or(0, |v| self.services.leases.live_on(&record.secret_id, v).0);
        let grace = self
            .services
            .catalog
            .secrets
            .get(&record.secret_name)
            .map_or(0, |s| s.grace.as_millis() as i64);
        let until = record
            .draining_since
            .map(|since| crate::clock::rfc3339(since + grace));
        json!({ "leases": leases, "until": until })
    }
}

impl AdminApi {
    /// `GET /v1/admin/alerts`: the 100 latest alerts not acknowledged.
    async fn alerts(&self) -> Response<Full<Bytes>> {
        match self.services.vault.store().recent_alerts(100, false).await {
            Ok(alerts) => http::json(
                StatusCode::OK,
                &serde_json::Value::Array(alerts.iter().map(crate::status::alert_entry).collect()),
            ),
            Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
        }
    }

    /// `GET /v1/admin/incidents`: every incident, newest first.
    async fn incidents(&self) -> Response<Full<Bytes>> {
        match self.services.incidents.list().await {
            Ok(list) => http::json(StatusCode::OK, &serde_json::Value::Array(list)),
            Err(e) => compromise_error(e),
        }
    }

    /// `POST /v1/admin/incidents/{id}/close`: closes an incident by hand.
    async fn close_incident(&self, id: &str, peer: Peer) -> Response<Full<Bytes>> {
        match self.services.incidents.close(id, &Self::actor(peer)).await {
            Ok(closed) => http::json(
                StatusCode::OK,
                &json!({ "incident_id": id, "closed": closed }),
            ),
            Err(e) => compromise_error(e),
        }
    }

    /// `GET /v1/admin/status`: the store's report, what waits for a person, the brokers.
    async fn status(&self) -> Response<Full<Bytes>> {
        let services = &self.services;
        let report =
            crate::status::report(services.vault.store(), Some(&services.catalog.plugins)).await;
        let people = services.incidents.waiting_for_people().await;
        let brokers = match &services.brokers {
            Some(b) => crate::status::brokers(b, services.vault.store(), services.clock.now())
                .await
                .map(Some),
            None => Ok(None),
        };
        match (report, people, brokers) {
            (Ok(mut report), Ok(people), Ok(brokers)) => {
                report["needs_person"] = serde_json::Value::Array(people);
                report["store"] = crate::status::write_health(&services.audit_writer);
                if let Some(brokers) = brokers {
                    report["brokers"] = brokers;
                }
                http::json(StatusCode::OK, &report)
            }
            (_, _, Err(e)) | (Err(e), _, _) => {
                http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
            }
            (_, Err(e), _) => compromise_error(e),
        }
    }

    /// `GET /metrics`: Prometheus text.
    async fn metrics(&self) -> Response<Full<Bytes>> {
        let services = &self.services;
        let rendered = crate::metrics::render(
            (services.vault.store(), &services.audit_writer),
            services.clock.now(),
            &services.catalog.plugins,
            &services.metrics,
            services.leases.live_count(),
        )
        .await;
        match rendered {
            Ok(text) => {
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
        }
    }
}

/// Whether `path` reads or writes values, keys, backups, the audit log or the passphrase: root's
/// and the daemon's own user's only, not every `admin_uids` operator (who may rotate, run
/// incidents and read status).
fn for_the_store_owner(path: &str) -> bool {
    path.starts_with("/v1/admin/secrets/")
        || matches!(
            path,
            "/v1/admin/passwd"
                | "/v1/admin/rekey"
                | "/v1/admin/backup"
                | "/v1/admin/audit/archive"
                | "/v1/admin/copies"
        )
}

impl AdminApi {
    /// 503 on a follower for what only the leader does, naming the leader.
    async fn not_the_leader(&self) -> Response<Full<Bytes>> {
        let leader = match self.services.vault.store().postgres() {
            Some(pg) => pg.live_leader().await.ok().flatten(),
            None => None,
        };
        let who = leader.map_or("no daemon leads it at this moment".to_string(), |l| {
            format!("the daemon on {} (pid {}) leads it", l.host, l.pid)
        });
        http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            format!(
                "this daemon follows another on a shared store and only answers reads; {who}: \
                 run the command there"
            ),
        )
    }
}

impl Handler for AdminApi {
    type Conn = Peer;

    fn connect(&self, peer: Peer, _pidfd: Option<OwnedFd>, _accepted: f64) -> Peer {
        peer
    }

    async fn handle(&self, peer: &Peer, request: Request<Bytes>) -> Response<Full<Bytes>> {
        let peer = *peer;
        if !self.allowed_uids.contains(&peer.uid) {
            let actor = Self::actor(peer);
            let reason = "this uid may not use the admin socket";
            if self
                .rejections
                .first("admin.denied", peer.uid, None, reason, &actor)
            {
                let audit = AuditEvent::new(actor, "admin.denied")
                    .detail(json!({ "path": request.uri().path(), "reason": reason }));
                let _ = self.services.vault.store().append_audit(&[audit]).await;
            }
            return http::error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this uid may not use the admin socket",
            );
        }
        let path = request.uri().path().to_string();
        let query = request.uri().query().map(str::to_string);
        if self.services.follower && request.method() != Method::GET {
            return self.not_the_leader().await;
        }
        match (request.method(), path.as_str()) {
            (&Method::POST, p) if p.starts_with("/v1/admin/rotate/") => {
                self.rotate(&p["/v1/admin/rotate/".len()..], query.as_deref(), peer)
                    .await
            }
            (&Method::POST, "/v1/admin/compromise") => {
                self.compromise(request.body(), query.as_deref(), peer, false)
                    .await
            }
            (&Method::POST, "/v1/admin/compromise/plan") => {
                self.compromise(request.body(), query.as_deref(), peer, true)
                    .await
            }
            (_, p) if for_the_store_owner(p) && !Self::owns_the_store(peer) => http::error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "values, keys, backups and the passphrase are for root and the daemon's user only",
            ),
            (method, p) if p.starts_with("/v1/admin/secrets/") => {
                let name = &p["/v1/admin/secrets/".len()..];
                self.secret(method, name, query.as_deref(), request.body(), peer)
                    .await
            }
            (&Method::POST, "/v1/admin/passwd") => {
                self.passwd(request.body(), peer, self.kdf).await
            }
            (&Method::POST, "/v1/admin/rekey") => self.rekey(request.body(), peer).await,
            (&Method::POST, "/v1/admin/backup") => self.backup(peer).await,
            (&Method::POST, "/v1/admin/audit/archive") => {
                self.archive_audit(request.body(), peer).await
            }
            (&Method::POST, "/v1/admin/copies") => self.copies(request.body()).await,
            (&Method::GET, "/v1/admin/alerts") => self.alerts().await,
            (&Method::POST, "/v1/admin/alerts/ack") => self.ack_alerts(request.body(), peer).await,
            (&Method::POST, p) if p.starts_with("/v1/admin/brokers/") => {
                self.block_broker(&p["/v1/admin/brokers/".len()..], peer)
                    .await
            }
            (&Method::GET, "/v1/admin/incidents") => self.incidents().await,
            (&Method::POST, p)
                if p.starts_with("/v1/admin/incidents/") && p.ends_with("/close") =>
            {
                let id = &p["/v1/admin/incidents/".len()..p.len() - "/close".len()];
                self.close_incident(id, peer).await
            }
            (&Method::GET, p) if p.starts_with("/v1/admin/incidents/") => {
                let rest = &p["/v1/admin/incidents/".len()..];
                match rest.strip_suffix("/progress") {
                    Some(id) => self.progress(id).await,
                    None => self.incident(rest).await,
                }
            }
            (&Method::GET, "/v1/admin/status") => self.status().await,
            (&Method::GET, "/metrics") => self.metrics().await,
            _ => http::error(
                StatusCode::NOT_FOUND,
                "unknown",
                format!("no endpoint {} {path}", request.method()),
            ),
        }
    }
}

/// The answer of `POST /v1/admin/copies` (and what `scan` builds the same way without a
/// daemon).
pub fn copies_json(found: &[Vec<(String, i64, crate::store::Stage)>]) -> serde_json::Value {
    serde_json::Value::Array(
        found
            .iter()
            .map(|hits| {
                serde_json::Value::Array(
                    hits.iter()
                        .map(|(secret, version, stage)| {
                            json!({ "secret": secret, "version": version, "stage": stage.as_str() })
                        })
                        .collect(),
                )
            })
            .collect(),
    )
}

/// A vault error as an answer: unknown secrets 404, bad input 400, a wrong passphrase 403.
fn vault_error(e: crate::vault::VaultError) -> Response<Full<Bytes>> {
    use crate::vault::VaultError;
    match e {
        VaultError::NoSuchSecret(_)
        | VaultError::NoSuchVersion { .. }
        | VaultError::NoCurrentVersion(_) => {
            http::error(StatusCode::NOT_FOUND, "unknown", e.to_string())
        }
        VaultError::InvalidName(_) | VaultError::BadPassphrase(_) => {
            http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
        }
        VaultError::WrongPassphrase { .. } => {
            http::error(StatusCode::FORBIDDEN, "wrong_passphrase", e.to_string())
        }
        _ => http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

fn compromise_error(e: CompromiseError) -> Response<Full<Bytes>> {
    match e {
        CompromiseError::UnknownSecret(_) => {
            http::error(StatusCode::NOT_FOUND, "unknown", e.to_string())
        }
        CompromiseError::Store(_) => {
            http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
        }
    }
}

/// The reply to `POST /v1/admin/rotate/{name}` (and `keywarden rotate --json` without a daemon):
/// where the rotation stands and whether the secret was quarantined.
pub fn rotation_outcome(
    record: &RotationRecord,
    joined: bool,
    quarantine_reason: Option<String>,
) -> serde_json::Value {
    json!({
        "rotation_id": record.id,
        "secret": record.secret_name,
        "joined": joined,
        "state": record.state.as_str(),
        "from_version": record.from_version,
        "to_version": record.to_version,
        "last_error": record.last_error,
        "quarantined": quarantine_reason.is_some(),
        "quarantine_reason": quarantine_reason,
    })
}
