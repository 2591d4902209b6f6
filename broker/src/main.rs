//! `keywarden-broker`: the only process where a provider key meets an HTTP client. The daemon
//! starts it confined like a plugin, hands it a listening Unix socket as its standard input
//! (the daemon's private control socket) and a hand-off channel as its standard output, pushes
//! it the current key of each route secret (and each new version), and hands it each agent
//! connection it has attested, with its decision about the peer (`agents.rs`). The broker
//! checks each request, adds the key on the way out, tries the fallbacks on a connect error,
//! 429 or 5xx, streams the answer back and reports its end to the daemon. It reads no file.
//! The protocol: `keywarden_plugin_sdk::broker` and docs/broker.md.

#![forbid(unsafe_code)]

mod agents;
mod ask_usage;
mod forward;
mod keys;
mod relay;
mod report;
mod stall;
mod usage;

use std::collections::HashSet;
use std::convert::Infallible;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use keywarden_plugin_sdk::broker::budget::Budgets;
use keywarden_plugin_sdk::broker::channel::Channel;
use keywarden_plugin_sdk::broker::{FINISH_AT_MOST, Handoff, Keys, Routes, TOKEN_HEADER};

use crate::agents::Limits;
use crate::forward::{Body, Forwarder};
use crate::keys::KeyTable;
use crate::report::Reporter;

/// How long the broker waits for the daemon to attach before it gives up.
const ATTACH_DEADLINE: Duration = Duration::from_secs(30);
/// Largest `PUT` body from the daemon.
const MAX_PUT_BYTES: usize = 4 << 20;

fn main() -> ExitCode {
    // TLS through rustls with ring: one well-known crypto library, no C toolchain needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: each request is a few microseconds of parsing and TLS between waits, and a
    // second worker would mostly be woken to take tasks from the first (measured in the
    // broker benchmark: less CPU per request, lower latency).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keywarden-broker: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywarden-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What every connection shares.
pub(crate) struct State {
    forwarder: RwLock<Arc<Forwarder>>,
    limits: RwLock<Limits>,
    /// Routes are set once, by the daemon, right after start: a later `PUT /v1/routes` (from
    /// anything else that reached the socket) could point a route's keys elsewhere.
    routes_set: std::sync::atomic::AtomicBool,
    /// The token `PUT /v1/keys` carries, given with the routes.
    token: std::sync::OnceLock<String>,
    /// The route secrets' keys, as the daemon pushed them.
    keys: Arc<KeyTable>,
    /// Sent once the daemon's attach connection closed.
    detached: tokio::sync::mpsc::Sender<()>,
    attached: tokio::sync::Notify,
    /// Brokers an operator blocked (`PUT /v1/state`).
    blocked: RwLock<HashSet<String>>,
    /// The daemon's audit log takes no rows now (`PUT /v1/state`): no request is forwarded.
    audit_backlog: std::sync::atomic::AtomicBool,
    /// What each policy and caller spent, seeded by the daemon's first `PUT /v1/state`.
    budgets: Budgets,
    seeded: std::sync::atomic::AtomicBool,
    /// Reports to the daemon.
    reporter: Reporter,
    /// Set by `POST /v1/finish`: handed connections end after their request in flight.
    finishing: tokio::sync::watch::Sender<bool>,
    /// Set when requests still run [`FINISH_AT_MOST`] after the finish: they are cut.
    cutting: tokio::sync::watch::Sender<bool>,
    /// Handed connections open, and a wake when the last one closes.
    open: std::sync::atomic::AtomicUsize,
    all_closed: tokio::sync::Notify,
}

impl State {
    fn forwarder(&self) -> Arc<Forwarder> {
        self.forwarder.read().expect("routes lock").clone()
    }

    fn limits(&self) -> Limits {
        *self.limits.read().expect("limits lock")
    }

    fn is_blocked(&self, broker: &str) -> bool {
        self.blocked.read().expect("blocked lock").contains(broker)
    }

    /// Resolves once no handed connection is open.
    async fn all_closed(&self) {
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }

    fn audit_backlog(&self) -> bool {
        self.audit_backlog.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn run() -> Result<(), String> {
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("standard input: {e}"))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("standard input is not a listening Unix socket: {e}"))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| format!("standard input is not a listening Unix socket: {e}"))?;
    let handoffs = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(Channel::new)
        .map_err(|e| format!("standard output is not the daemon's hand-off channel: {e}"))?;
    let (detached, mut gone) = tokio::sync::mpsc::channel(1);
    let state = Arc::new(State {
        forwarder: RwLock::new(Arc::new(Forwarder::new(Routes::default())?)),
        limits: RwLock::new(Limits {
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(60),
        }),
        routes_set: std::sync::atomic::AtomicBool::new(false),
        token: std::sync::OnceLock::new(),
        keys: Arc::default(),
        detached,
        attached: tokio::sync::Notify::new(),
        blocked: RwLock::default(),
        audit_backlog: Default::default(),
        budgets: Budgets::default(),
        seeded: Default::default(),
        reporter: Reporter::default(),
        finishing: tokio::sync::watch::Sender::new(false),
        cutting: tokio::sync::watch::Sender::new(false),
        open: Default::default(),
        all_closed: tokio::sync::Notify::new(),
    });
    let handoffs = Arc::new(handoffs);
    let reports = {
        let (state, handoffs) = (state.clone(), handoffs.clone());
        async move { state.reporter.run(&handoffs).await }
    };
    tokio::pin!(reports);
    let deadline = tokio::time::sleep(ATTACH_DEADLINE);
    tokio::pin!(deadline);
    let mut attached = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| format!("accept: {e}"))?;
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    // Answers are copied into one buffer and written with one call when it
                    // fills (64 KiB) or the upstream pauses: a streamed answer's chunks (three
                    // pieces each) otherwise go out sixteen pieces per `writev`.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .writev(false)
                        .max_buf_size(64 << 10)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            received = handoffs.recv() => match received {
                Ok(Some((record, Some(fd)))) => match serde_json::from_slice::<Handoff>(&record) {
                    Ok(handoff) => {
                        tokio::spawn(agents::serve(state.clone(), handoff, fd));
                    }
                    Err(e) => eprintln!("a hand-off record that is not one: {e}"),
                },
                Ok(Some((_, None))) => eprintln!("a hand-off record without a connection"),
                // The daemon is gone.
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("the hand-off channel: {e}")),
            },
            sent = &mut reports => {
                return Err(format!("the hand-off channel: {}", sent.err().map_or("closed".into(), |e| e.to_string())));
            }
            _ = state.attached.notified() => attached = true,
            _ = gone.recv() => return Ok(()),
            _ = &mut deadline, if !attached => {
                return Err("the daemon did not attach; exiting".into());
            }
        }
    }
}

/// Dropped when the attach request ends: the daemon is gone.
struct Detach(tokio::sync::mpsc::Sender<()>);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/attach") => {
            let _detach = Detach(state.detached.clone());
            state.attached.notify_one();
            std::future::pending::<()>().await;
            unreachable!("pending never resolves")
        }
        (&Method::PUT, "/v1/routes") => {
            if state.routes_set.load(std::sync::atomic::Ordering::SeqCst) {
                return plain(StatusCode::CONFLICT, "the routes are set once, at start");
            }
            let routes: Routes = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("routes: {e}")),
            };
            if routes.token.len() < 32 {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "routes: a token of 32 characters or more",
                );
            }
            let token = routes.token.clone();
            let limits = Limits {
                header_timeout: Duration::from_millis(routes.header_timeout_ms),
                body_timeout: Duration::from_millis(routes.body_timeout_ms),
            };
            match Forwarder::new(routes) {
                Ok(f) => {
                    if state
                        .routes_set
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        return plain(StatusCode::CONFLICT, "the routes are set once, at start");
                    }
                    let _ = state.token.set(token);
                    *state.forwarder.write().expect("routes lock") = Arc::new(f);
                    *state.limits.write().expect("limits lock") = limits;
                    plain(StatusCode::NO_CONTENT, "")
                }
                Err(e) => plain(StatusCode::BAD_REQUEST, &e),
            }
        }
        (&Method::PUT, "/v1/keys") => {
            if let Some(refused) = unless_from_the_daemon(state, &req) {
                return refused;
            }
            let keys: Keys = match read_json(req).await {
                Ok(k) => k,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("keys: {e}")),
            };
            match state.keys.set(keys).await {
                Ok(()) => plain(StatusCode::NO_CONTENT, ""),
                Err(e) => plain(StatusCode::BAD_REQUEST, &e),
            }
        }
        (&Method::PUT, "/v1/state") => {
            if let Some(refused) = unless_from_the_daemon(state, &req) {
                return refused;
            }
            let pushed: keywarden_plugin_sdk::broker::State = match read_json(req).await {
                Ok(s) => s,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("state: {e}")),
            };
            *state.blocked.write().expect("blocked lock") = pushed.blocked.into_iter().collect();
            state
                .audit_backlog
                .store(pushed.audit_backlog, std::sync::atomic::Ordering::SeqCst);
            if !state.seeded.swap(true, std::sync::atomic::Ordering::SeqCst) {
                state.budgets.restore(&pushed.spent, pushed.at);
            }
            plain(StatusCode::NO_CONTENT, "")
        }
        (&Method::POST, "/v1/finish") => {
            if let Some(refused) = unless_from_the_daemon(state, &req) {
                return refused;
            }
            state.finishing.send_replace(true);
            if tokio::time::timeout(FINISH_AT_MOST, state.all_closed())
                .await
                .is_err()
            {
                // Cut: each request's end is reported as it is dropped.
                eprintln!("requests still in flight after {FINISH_AT_MOST:?} are cut");
                state.cutting.send_replace(true);
                state.all_closed().await;
            }
            state.reporter.wake();
            state.reporter.drained().await;
            plain(StatusCode::NO_CONTENT, "")
        }
        _ => plain(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// The refusal of a request that does not carry the token: only the daemon, which gave it with
/// the routes, may say which key a route injects or what the broker enforces (anything else
/// that reached the socket could pin a key of its own).
fn unless_from_the_daemon(state: &State, req: &Request<Incoming>) -> Option<Response<Body>> {
    let carried = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes());
    let Some(token) = state.token.get() else {
        return Some(plain(StatusCode::CONFLICT, "keys come after the routes"));
    };
    if !carried.is_some_and(|c| same(c, token.as_bytes())) {
        return Some(plain(
            StatusCode::FORBIDDEN,
            "keys are pushed by the daemon only",
        ));
    }
    None
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A `PUT` body of at most [`MAX_PUT_BYTES`], parsed; the error names no value.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_PUT_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    // Only the position: serde_json's message may quote what it read, and a push holds keys.
    serde_json::from_slice(&body).map_err(|e| {
        format!(
            "not the expected JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// A short text answer.
pub(crate) fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}
