//! The broker socket (and each broker's loopback TCP listener): agents call provider APIs here
//! and keywarden adds the key on the way out (docs/broker.md).
//!
//! | request | reply |
//! |---|---|
//! | `ANY /v1/broker/{name}/{provider path}` | the provider's answer, streamed |
//! | `ANY /{name}/{provider path}` | the same (so an SDK needs only a base URL) |
//! | `GET /v1/health` | `{"status":"ok"}` |
//!
//! Per request: the peer (attested at connect, over TCP by finding the process that owns the
//! connection) needs a `[[policy]]` listing the broker; the method and path must be one the
//! broker's preset allows; the policy's budget must not be spent. The agent's own credential
//! headers are dropped. The request goes to `keywarden-broker`, which adds the route's key
//! (pushed to it, `broker/keys.rs`); the answer streams back through a meter that reads the
//! provider's usage, and when it ends one `broker.request` audit row records who called what,
//! the route, the status and the tokens (never a body or a header value).

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use keywarden_plugin_sdk::broker::relay::{Relayed, Source};
use keywarden_plugin_sdk::broker::{
    DROPPED_REQUEST_HEADERS, ROUTE_HEADER, UPSTREAM_MS_HEADER, VERSION_HEADER,
};
use serde_json::json;

use crate::attest::{Hasher, Peer, PeerIdentity, RecentOwners};
use crate::audit::AuditEvent;
use crate::broker::budget::Caller;
use crate::broker::usage::UsageMeter;
use crate::broker::{Broker, Brokers};
use crate::http::{self, Handler, REMOTE_PEER};
use crate::incident::signals::Signals;
use crate::policy::{self, Policy};
use crate::rejections::Rejections;
use crate::services::Services;

/// Per-connection state: the peer, attested once.
#[derive(Debug)]
pub struct BrokerConn {
    uid: u32,
    /// Over TCP: no process on this host could be found to own the connection.
    unknown: bool,
    identity: tokio::sync::Mutex<PeerIdentity>,
}

/// The broker API.
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
}

impl BrokerApi {
    /// The API over `brokers`, admitting peers by `policies`.
    pub fn new(
        services: Services,
        brokers: Arc<Brokers>,
        policies: Vec<Policy>,
        refused_uids: HashSet<u32>,
        rejections: Arc<Rejections>,
        signals: Arc<Signals>,
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
        }
    }

    /// A refusal (403), audited once per cause and window.
    async fn deny(&self, who: &PeerIdentity, broker: &str, reason: &str) -> Response<BrokerBody> {
        let actor = who.actor();
        let text = format!("refused: {reason}");
        if self.rejections.first(
            "broker.denied",
            who.peer.uid,
            None,
            &format!("{broker}: {reason}"),
            &actor,
        ) {
            let event = AuditEvent::new(actor, "broker.denied")
                .detail(json!({ "broker": broker, "reason": reason }));
            if let Err(e) = self
                .services
                .audit_writer
                .write(Vec::new(), vec![event])
                .await
            {
                return http::ApiError::from(e).response().map(BrokerBody::from);
            }
        }
        error(StatusCode::FORBIDDEN, "forbidden", text)
    }

    async fn call(
        &self,
        conn: &BrokerConn,
        broker: &Broker,
        path: &str,
        request: Request<Bytes>,
    ) -> Response<BrokerBody> {
        let name = broker.name.as_str();
        if conn.unknown {
            let who = conn.identity.lock().await.clone();
            return self
                .deny(&who, name, "no process on this host owns the connection")
                .await;
        }
        let mut who = self.hasher.identity(&conn.identity, self.needs_hash).await;
        let Some(policy) = policy::decide_broker(&self.policies, &mut who, name, self.daemon_uid)
        else {
            return self
                .deny(&who, name, "no policy lets this peer use the broker")
                .await;
        };
        let method = request.method().as_str().to_string();
        if !broker.allows(&method, path) {
            return self
                .deny(
                    &who,
                    name,
                    &format!("{method} {path} is not an allowed call"),
                )
                .await;
        }
        if request.body().len() > broker.max_body_bytes {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body is larger than {} bytes",
                    broker.max_body_bytes
                ),
            );
        }
        if self.brokers.is_blocked(name) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "blocked",
                format!("broker {name} is blocked by an operator"),
            );
        }
        let exe = who
            .exe
            .as_ref()
            .map_or("unknown".to_string(), |e| e.display().to_string());
        let caller: Caller = (policy.name.clone(), who.peer.uid, exe);
        let now = self.services.clock.now();
        if let Err(spent) = self
            .brokers
            .budgets
            .admit(&policy.name, &policy.budget, &caller, now)
        {
            let mut response = http::json(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "error": {
                    "code": "budget",
                    "message": format!("policy {}: its {} budget is spent", policy.name, spent.budget()),
                    "budget": spent.budget(),
                    "retry_after": spent.retry_after(),
                }}),
            )
            .map(BrokerBody::from);
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(spent.retry_after()));
            return response;
        }
        self.forward(
            broker,
            path,
            request,
            Finish {
                services: self.services.clone(),
                brokers: self.brokers.clone(),
                signals: self.signals.clone(),
                secrets: broker.secrets().map(str::to_string).collect(),
                actor: who.actor(),
                caller,
                broker: name.to_string(),
                method,
                path: path.to_string(),
                route: None,
                status: 0,
                upstream_ms: None,
                started: Instant::now(),
                version: None,
            },
        )
        .await
    }

    /// Sends an admitted request to the broker process, which adds the route keys it holds.
    async fn forward(
        &self,
        broker: &Broker,
        path: &str,
        request: Request<Bytes>,
        mut finish: Finish,
    ) -> Response<BrokerBody> {
        let (parts, body) = request.into_parts();
        let query: Vec<&str> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("key="))
            .collect();
        let mut uri = format!("/v1/forward/{}{path}", broker.name);
        if !query.is_empty() {
            uri = format!("{uri}?{}", query.join("&"));
        }
        let mut forwarded = Request::builder().method(parts.method).uri(uri);
        let headers = forwarded.headers_mut().expect("a valid builder");
        copy_headers(&parts.headers, headers);
        headers.insert(hyper::header::HOST, HeaderValue::from_static("broker"));
        let forwarded = forwarded.body(Full::new(body)).expect("a valid request");
        let answer = match self.brokers.process.send(forwarded).await {
            Ok(a) => a,
            Err(e) => {
                finish.status = StatusCode::BAD_GATEWAY.as_u16();
                finish.record(None, true);
                return error(StatusCode::BAD_GATEWAY, "broker", e.to_string());
            }
        };
        let (mut parts, body) = answer.into_parts();
        finish.status = parts.status.as_u16();
        finish.route = parts
            .headers
            .get(ROUTE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        finish.upstream_ms = parts
            .headers
            .get(UPSTREAM_MS_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        finish.version = parts
            .headers
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let content_type = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        parts.headers.remove(UPSTREAM_MS_HEADER);
        parts.headers.remove(VERSION_HEADER);
        let body = Relayed::answer(&parts.headers, body, Source::Broker);
        Response::from_parts(
            parts,
            BrokerBody::Metered(Box::new(Metered {
                inner: body,
                meter: Some(UsageMeter::new(&content_type)),
                finish: Some(finish),
            })),
        )
    }
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        if DROPPED_REQUEST_HEADERS.contains(&n) || n.starts_with("x-keywarden-") {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// A JSON error in the shape of the other sockets.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<BrokerBody> {
    http::error(status, code, message).map(BrokerBody::from)
}

/// Splits `/v1/broker/{name}/{rest}` or `/{name}/{rest}` into the name and `/{rest}`, refusing
/// paths that could mean something else upstream than what was checked.
fn split_path(path: &str) -> Result<(&str, &str), &'static str> {
    if path.contains('%') || path.contains('\\') {
        return Err("percent-encoded or backslashed paths are not accepted");
    }
    // A CONNECT's authority-form target has an empty path, an OPTIONS `*` no slash.
    let rest = match path.strip_prefix("/v1/broker/") {
        Some(rest) => rest,
        None => path.strip_prefix('/').ok_or("the path must start with /")?,
    };
    let (name, rest) = rest
        .split_once('/')
        .ok_or("the path names no provider call")?;
    let rest = &path[path.len() - rest.len() - 1..];
    if rest
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err("empty, '.' and '..' path segments are not accepted");
    }
    Ok((name, rest))
}

impl Handler for BrokerApi {
    type Conn = BrokerConn;
    type Body = BrokerBody;

    fn connect(&self, peer: Peer, pidfd: Option<OwnedFd>, accepted: f64) -> BrokerConn {
        BrokerConn {
            uid: peer.uid,
            unknown: peer == REMOTE_PEER,
            identity: tokio::sync::Mutex::new(PeerIdentity::attest(
                peer,
                pidfd,
                accepted,
                self.hasher.cache(),
            )),
        }
    }

    async fn handle(&self, conn: &BrokerConn, request: Request<Bytes>) -> Response<BrokerBody> {
        if self.refused_uids.contains(&conn.uid) {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this uid runs keywarden's plugins and may not use the broker",
            );
        }
        // A web page the user visits could otherwise make the browser call the loopback
        // listener (cross-site requests, DNS rebinding): browsers mark every request they send
        // with these headers; SDKs and agents send neither.
        if ["origin", "sec-fetch-site", "sec-fetch-mode"]
            .iter()
            .any(|h| request.headers().contains_key(*h))
        {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "requests from web browsers are refused",
            );
        }
        let path = request.uri().path().to_string();
        if path == "/v1/health" {
            return http::json(StatusCode::OK, &json!({ "status": "ok" })).map(BrokerBody::from);
        }
        let (name, rest) = match split_path(&path) {
            Ok(split) => split,
            Err(why) => return error(StatusCode::BAD_REQUEST, "bad_request", why),
        };
        let Some(broker) = self.brokers.brokers.get(name) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown",
                format!("no broker named {name:?}"),
            );
        };
        self.call(conn, broker, rest, request).await
    }
}

/// What the audit row of a brokered request needs, written when its answer ends.
#[derive(Debug)]
struct Finish {
    services: Services,
    brokers: Arc<Brokers>,
    signals: Arc<Signals>,
    /// The broker's secrets: the scope of an anomaly it causes.
    secrets: Vec<String>,
    actor: String,
    caller: Caller,
    broker: String,
    method: String,
    path: String,
    route: Option<String>,
    status: u16,
    upstream_ms: Option<u64>,
    started: Instant,
    /// The version of the key the answering route injected.
    version: Option<i64>,
}

impl Finish {
    /// Counts the tokens and piles up the audit row (it shares a later commit: nothing waits
    /// for it). No await: it runs as the answer ends.
    fn record(self, usage: Option<crate::broker::usage::Usage>, complete: bool) {
        let tokens = usage.map_or(0, |u| u.total());
        let now = self.services.clock.now();
        self.brokers.budgets.spend(&self.caller, tokens, now);
        let version = self.version;
        let event = AuditEvent::new(self.actor.clone(), "broker.request").detail(json!({
            "policy": self.caller.0,
            "uid": self.caller.1,
            "exe": self.caller.2,
            "broker": self.broker,
            "route": self.route,
            "version": version,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "tokens_in": usage.map(|u| u.input),
            "tokens_out": usage.map(|u| u.output),
            "tokens": tokens,
            "upstream_ms": self.upstream_ms,
            "ms": self.started.elapsed().as_millis() as u64,
            "complete": complete,
        }));
        let event = match &self.route {
            Some(secret) => event.secret(secret),
            None => event,
        };
        self.services.metrics.count_brokered(
            &self.broker,
            &self.caller.0,
            self.status,
            tokens,
            self.started.elapsed(),
        );
        self.services.audit_writer.defer(vec![event]);
        if tokens > 0
            && let Some(spike) = self.signals.note_tokens(&self.caller, tokens)
        {
            let (signals, caller, secrets) = (self.signals, self.caller, self.secrets);
            tokio::spawn(async move { signals.act_on_tokens(spike, &caller, &secrets).await });
        }
    }
}

/// An answer streaming back to the agent through the usage meter.
#[derive(Debug)]
pub struct Metered {
    inner: Relayed<Incoming>,
    meter: Option<UsageMeter>,
    finish: Option<Finish>,
}

impl Metered {
    fn end(&mut self, complete: bool) {
        if let (Some(meter), Some(finish)) = (self.meter.take(), self.finish.take()) {
            finish.record(meter.finish(), complete);
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // The agent went away before the end, or the stream failed.
        self.end(false);
    }
}

/// The broker API's response body: a short JSON answer, or a provider's answer streaming.
pub enum BrokerBody {
    /// An answer keywarden wrote.
    Full(Full<Bytes>),
    /// The provider's answer.
    Metered(Box<Metered>),
}

impl From<Full<Bytes>> for BrokerBody {
    fn from(body: Full<Bytes>) -> Self {
        BrokerBody::Full(body)
    }
}

impl Body for BrokerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            BrokerBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never| match never {}))),
            BrokerBody::Metered(m) => {
                let polled = Pin::new(&mut m.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(meter)) = (frame.data_ref(), m.meter.as_mut()) {
                            meter.feed(data);
                        }
                    }
                    Poll::Ready(None) => m.end(true),
                    Poll::Ready(Some(Err(_))) => m.end(false),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BrokerBody::Full(full) => full.is_end_stream(),
            BrokerBody::Metered(m) => m.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            BrokerBody::Full(full) => full.size_hint(),
            BrokerBody::Metered(m) => m.inner.size_hint(),
        }
    }
}

impl std::fmt::Debug for BrokerBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerBody")
    }
}

/// The broker's loopback TCP listener: each connection is attributed to the process on this
/// host that owns its other end; when none can be found the connection is served only a 403.
#[derive(Debug)]
pub struct LoopbackListener {
    listener: tokio::net::TcpListener,
    recent: Arc<RecentOwners>,
}

impl LoopbackListener {
    /// Attributes the connections `listener` accepts.
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        LoopbackListener {
            listener,
            recent: Arc::default(),
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
        let (stream, remote) = self.listener.accept().await?;
        // Streamed answers are written as their events arrive: each goes out at once instead
        // of waiting for the agent to acknowledge the one before (Nagle's algorithm).
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr()?;
        let recent = self.recent.clone();
        let found =
            tokio::task::spawn_blocking(move || crate::attest::tcp_peer(local, remote, &recent))
                .await
                .ok()
                .flatten();
        Ok(match found {
            Some((peer, pidfd)) => (stream, Some(peer), pidfd),
            None => (stream, Some(REMOTE_PEER), None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_that_is_no_path_is_refused_not_a_panic() {
        // `CONNECT host:443` (an empty path) used to panic the connection's task.
        assert!(split_path("").is_err());
        assert!(split_path("*").is_err());
        assert!(split_path("é/v1/x").is_err());
    }

    #[test]
    fn paths_split_into_broker_and_call_and_tricks_are_refused() {
        assert_eq!(
            split_path("/v1/broker/openai/v1/chat/completions"),
            Ok(("openai", "/v1/chat/completions"))
        );
        assert_eq!(
            split_path("/openai/v1/chat/completions"),
            Ok(("openai", "/v1/chat/completions"))
        );
        for bad in [
            "/openai/v1/chat/../files",
            "/openai/v1//chat/completions",
            "/openai/v1/chat/%2e%2e/files",
            "/openai",
            "/openai/v1/./models",
        ] {
            assert!(split_path(bad).is_err(), "{bad}");
        }
    }
}
