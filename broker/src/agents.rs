//! Agents' connections, handed over by the daemon once it has attested their peer
//! (docs/broker.md). Per request: the daemon's decision for the peer must admit the broker
//! named in the path, the method and path must be one the broker allows, the body within its
//! limit, the broker not blocked, the daemon's audit log writable and the policy's budget not
//! spent. The agent's credential headers are dropped, the route's key added (`forward.rs`), the
//! answer streamed back through a meter that reads the provider's usage, and its end reported to
//! the daemon, which writes the audit row (`report.rs`); a request dropped before its answer
//! began (the agent hung up, a stop cut it) is reported too.
//!
//! | request | reply |
//! |---|---|
//! | `ANY /v1/broker/{name}/{provider path}` | the provider's answer, streamed |
//! | `ANY /{name}/{provider path}` | the same (so an SDK needs only a base URL) |
//! | `GET /v1/health` | `{"status":"ok"}` |

use std::convert::Infallible;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use keywarden_plugin_sdk::broker::budget::{Caller, Spent, estimate};
use keywarden_plugin_sdk::broker::{Decision, Denied, Ended, Handoff, passes_query_parameter};
use rustix::net::AddressFamily;
use serde_json::json;

use crate::State;
use crate::ask_usage::{HideUsageChunk, ask_for_usage, free, unmetered};
use crate::forward::Body;
use crate::stall::Unread;
use crate::usage::{Read, UsageMeter};

/// Longest path kept in a report (the rest is cut): reports travel in bounded records.
const MAX_REPORTED_PATH: usize = 1024;

/// A handed connection: the daemon's number for it and its decision about the peer.
struct Conn {
    id: u64,
    peer: Decision,
    /// How long a write to the agent may wait for it to read (milliseconds; stall.rs): the
    /// idle time-out of the broker its last request went through.
    unread_limit: Arc<AtomicU64>,
}

/// Serves a connection the daemon handed over until it closes, then reports that it closed.
pub async fn serve(state: Arc<State>, handoff: Handoff, fd: OwnedFd) {
    let conn = Arc::new(Conn {
        id: handoff.conn,
        peer: handoff.peer,
        unread_limit: Arc::new(AtomicU64::new(
            state.limits().body_timeout.as_millis() as u64
        )),
    });
    let id = conn.id;
    state.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let served = match rustix::net::sockopt::socket_domain(&fd) {
        Ok(AddressFamily::UNIX) => {
            let stream = std::os::unix::net::UnixStream::from(fd);
            match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream))
            {
                Ok(s) => serve_io(state.clone(), conn, s).await,
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(AddressFamily::INET | AddressFamily::INET6) => {
            let stream = std::net::TcpStream::from(fd);
            match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
            {
                Ok(s) => serve_io(state.clone(), conn, s).await,
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(other) => Err(format!("a socket of family {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = served {
        eprintln!("a handed connection could not be served: {e}");
    }
    state.reporter.closed(id);
    if state.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
        state.all_closed.notify_waiters();
    }
}

async fn serve_io<IO>(state: Arc<State>, conn: Arc<Conn>, io: IO) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = state.limits().header_timeout;
    let io = Unread::new(io, conn.unread_limit.clone());
    let mut finishing = state.finishing.subscribe();
    let mut cutting = state.cutting.subscribe();
    let service = hyper::service::service_fn(move |req| {
        let (state, conn) = (state.clone(), conn.clone());
        async move { Ok::<_, Infallible>(handle(&state, &conn, req).await) }
    });
    // Answers are copied into one buffer and written with one call when it fills (64 KiB) or
    // the upstream pauses: a streamed answer's chunks (three pieces each) otherwise go out
    // sixteen pieces per `writev`.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .writev(false)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { finishing.wait_for(|f| *f).await.is_ok() } => {
            // The daemon is stopping or reloading: the request in flight is answered, then
            // the connection closes (the agent reconnects to the next run); one still running
            // after FINISH_AT_MOST is cut (dropped here, its end reported).
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cutting.wait_for(|c| *c) => {}
            }
        }
    }
    Ok(())
}

async fn handle(state: &Arc<State>, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    match admit(state, conn, req).await {
        Ok(admitted) => forward(state, conn, admitted).await,
        Err(refused) => refused,
    }
}

/// A request that passed every check, its body read.
struct Admitted {
    forwarder: Arc<crate::forward::Forwarder>,
    broker: String,
    /// The provider path (after the broker's name).
    path: String,
    parts: http::request::Parts,
    body: Bytes,
    caller: Caller,
}

/// Checks a request against the browser marks, the path rules, the daemon's decision, the
/// broker's allowed calls and body limit, the blocks and the budget; or the answer refusing it
/// (a refusal the decision or the allowed calls make is reported to the daemon).
async fn admit(
    state: &Arc<State>,
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<Admitted, Response<Body>> {
    // A web page the user visits could otherwise make the browser call the loopback listener
    // (cross-site requests, DNS rebinding): browsers mark every request they send with these
    // headers; SDKs and agents send neither.
    if ["origin", "sec-fetch-site", "sec-fetch-mode"]
        .iter()
        .any(|h| req.headers().contains_key(*h))
    {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "requests from web browsers are refused",
        ));
    }
    let path = req.uri().path().to_string();
    if path == "/v1/health" {
        return Err(answer(StatusCode::OK, &json!({ "status": "ok" })));
    }
    let (name, rest) =
        split_path(&path).map_err(|why| error(StatusCode::BAD_REQUEST, "bad_request", why))?;
    let forwarder = state.forwarder();
    let Some(broker) = forwarder.broker(name) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown",
            format!("no broker named {name:?}"),
        ));
    };
    let deny = |reason: String| {
        state.reporter.denied(Denied {
            conn: conn.id,
            broker: name.to_string(),
            reason: cut(&reason),
        });
        error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("refused: {reason}"),
        )
    };
    if let Some(why) = &conn.peer.refused {
        return Err(deny(why.clone()));
    }
    let Some(admission) = conn.peer.admitted.get(name) else {
        return Err(deny("no policy lets this peer use the broker".into()));
    };
    let method = req.method().as_str().to_string();
    if !broker.allows(&method, rest) {
        return Err(deny(format!("{method} {rest} is not an allowed call")));
    }
    // A compressed body could not be read for its size or asked for usage.
    if req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(deny(
            "a compressed request body (content-encoding) is not accepted".into(),
        ));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, broker.max_body_bytes, state.limits().body_timeout).await?;
    if let Some(why) = unmetered(&parts.method, rest, &body) {
        return Err(deny(why.into()));
    }
    if let Some(paused) = paused(state, name) {
        return Err(paused);
    }
    let caller: Caller = (
        admission.policy.clone(),
        conn.peer.uid,
        conn.peer.exe.clone(),
    );
    state
        .budgets
        .admit(
            &admission.policy,
            &admission.budget,
            &caller,
            estimate(body.len(), 0),
            now_millis(),
        )
        .map_err(|spent| budget_spent(&admission.policy, &spent))?;
    Ok(Admitted {
        forwarder: forwarder.clone(),
        broker: name.to_string(),
        path: rest.to_string(),
        parts,
        body,
        caller,
    })
}

/// The answer (503) while requests through broker `name` are stopped: an operator blocked it,
/// or the audit log cannot take their rows.
fn paused(state: &State, name: &str) -> Option<Response<Body>> {
    if state.is_blocked(name) {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "blocked",
            format!("broker {name} is blocked by an operator"),
        ));
    }
    if state.audit_backlog() || state.reporter.backlogged() {
        let mut refused = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "keywarden cannot write its audit log now; brokered requests resume once it can",
        );
        // The SDKs wait this long before they try again.
        refused
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return Some(refused);
    }
    None
}

/// Sends an admitted request upstream and streams the answer back through the usage meter;
/// its end is reported.
async fn forward(state: &Arc<State>, conn: &Conn, admitted: Admitted) -> Response<Body> {
    let Admitted {
        forwarder,
        broker: name,
        path,
        parts,
        body,
        caller,
    } = admitted;
    // A `key=` (the agent's placeholder) and parameters that would cut the usage out of the
    // answer are dropped.
    let query: Vec<&str> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && passes_query_parameter(p))
        .collect();
    let target = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    let broker = forwarder
        .broker(&name)
        .expect("admitted through a broker of this forwarder");
    conn.unread_limit
        .store(broker.idle.as_millis() as u64, Ordering::Relaxed);
    // Reported even if the agent hangs up (or a stop cuts the request) before an answer.
    let mut unanswered = Unanswered(Some(Finish {
        state: state.clone(),
        caller,
        ended: Ended {
            conn: conn.id,
            route: None,
            version: None,
            method: parts.method.as_str().to_string(),
            path: cut(&path),
            broker: name,
            status: NO_ANSWER,
            tokens_in: None,
            tokens_out: None,
            tokens_estimated: None,
            upstream_ms: None,
            ms: 0,
            complete: false,
        },
        started: Instant::now(),
        request_bytes: body.len(),
        lost_sends: 0,
        estimates: broker.estimates && !free(&path),
    }));
    // A streamed chat completion that does not ask for its usage is made to (ask_usage.rs).
    let (body, hide_usage) = match ask_for_usage(&parts.method, &path, &body) {
        Some(asked) => (asked, true),
        None => (body, false),
    };
    let forwarded = forwarder
        .send(broker, &parts, &target, body, &state.keys)
        .await;
    let (head, inner) = forwarded.response.into_parts();
    let content_type = head
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut finish = unanswered.0.take().expect("taken once");
    finish.ended.route = forwarded.route;
    finish.ended.version = forwarded.version;
    finish.ended.status = head.status.as_u16();
    finish.ended.upstream_ms = forwarded.upstream_ms;
    finish.lost_sends = forwarded.lost_sends;
    let streamed = content_type.starts_with("text/event-stream");
    let metered = Metered {
        meter: Some(UsageMeter::new(content_type)),
        hide: (hide_usage && streamed).then(HideUsageChunk::default),
        inner_ended: false,
        inner,
        finish: Some(finish),
    };
    Response::from_parts(head, metered.boxed())
}

/// A request's body, at most `limit` bytes within `timeout`; else the answer refusing it.
async fn read_body(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Response<Body>> {
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is larger than {limit} bytes"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {timeout:?}"),
        )),
    }
}

/// 429 for a spent budget of `policy`, with `Retry-After` and which budget.
fn budget_spent(policy: &str, spent: &Spent) -> Response<Body> {
    let mut response = answer(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({ "error": {
            "code": "budget",
            "message": format!("policy {policy}: its {} budget {}", spent.budget(), spent.message()),
            "budget": spent.budget(),
            "retry_after": spent.retry_after(),
        }}),
    );
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(spent.retry_after()));
    response
}

/// What the report of a request needs, sent when its answer ends.
struct Finish {
    state: Arc<State>,
    caller: Caller,
    ended: Ended,
    started: Instant,
    /// The request body's size, from which the budget's hold and estimates are made.
    request_bytes: usize,
    /// Routes sent the request that gave no answer ([`crate::forward::Forwarded`]).
    lost_sends: u64,
    /// Whether work without usage counts an estimate: a model provider's call that costs
    /// tokens (not a `bearer` API, not counting tokens).
    estimates: bool,
}

impl Finish {
    /// Counts the tokens (letting go of those held since the request was admitted) and
    /// reports the request. Where the provider may have done work its answer does not count,
    /// an estimate is added: a successful answer without usage (a stream cut before its last
    /// chunk, where OpenAI puts usage), one cut after a first usage (Anthropic's
    /// `message_start`: at least an output token per event), a request the agent gave up on
    /// before its answer, and each route that was sent it and never answered (then another
    /// route was tried). A `GET` reads what was made before (a stored response and its usage)
    /// and spends nothing.
    fn record(mut self, mut read: Read, complete: bool) {
        let held = estimate(self.request_bytes, 0);
        let estimated = if self.ended.method == "GET" {
            read = Read::default();
            0
        } else if !self.estimates {
            0
        } else {
            let answer = match read.usage {
                None if (200..300).contains(&self.ended.status) => {
                    estimate(self.request_bytes, read.events)
                }
                None if self.ended.status == NO_ANSWER => held,
                Some(usage) if !complete => read.events.saturating_sub(usage.output),
                _ => 0,
            };
            answer.saturating_add(held.saturating_mul(self.lost_sends))
        };
        let tokens = read
            .usage
            .map_or(0, |u| u.total())
            .saturating_add(estimated);
        self.state
            .budgets
            .spend(&self.caller, tokens, held, now_millis());
        self.ended.tokens_in = read.usage.map(|u| u.input);
        self.ended.tokens_out = read.usage.map(|u| u.output);
        self.ended.tokens_estimated = (estimated > 0).then_some(estimated);
        self.ended.ms = self.started.elapsed().as_millis() as u64;
        self.ended.complete = complete;
        self.state.reporter.ended(self.ended);
    }
}

/// The status reported for a request that ended before any answer reached the agent.
const NO_ANSWER: u16 = 0;

/// A request forwarded and not yet answered: reported ([`NO_ANSWER`]) if dropped so.
struct Unanswered(Option<Finish>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(finish) = self.0.take() {
            finish.record(Read::default(), false);
        }
    }
}

/// An answer streaming back to the agent through the usage meter (and, for a stream whose
/// usage the broker asked for, without the chunk that carries it).
struct Metered {
    inner: Body,
    meter: Option<UsageMeter>,
    hide: Option<HideUsageChunk>,
    /// The upstream's answer has ended (what `hide` held back may still be sent).
    inner_ended: bool,
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
        // Hyper stops polling an answer whose length says it has ended: that is its end too.
        // Otherwise the agent went away before the end, or the stream failed.
        let complete = hyper::body::Body::is_end_stream(self);
        self.end(complete);
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if this.inner_ended {
                this.end(true);
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    if let Some(meter) = this.meter.as_mut() {
                        meter.feed(data);
                    }
                    let Some(hide) = this.hide.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let shown = hide.filter(data);
                    if !shown.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(shown))));
                    }
                }
                None => {
                    this.inner_ended = true;
                    let rest = this.hide.as_mut().map(HideUsageChunk::finish);
                    if let Some(rest) = rest.filter(|rest| !rest.is_empty()) {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
                Some(Err(e)) => {
                    this.end(false);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_ended
            || (self.inner.is_end_stream()
                && self.hide.as_ref().is_none_or(HideUsageChunk::is_empty))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Splits `/v1/broker/{name}/{rest}` or `/{name}/{rest}` into the name and `/{rest}`, refusing
/// paths that could mean something else upstream than what was checked.
fn split_path(path: &str) -> Result<(&str, &str), &'static str> {
    // `;` starts path parameters some servers strip (`..;/`).
    if path.contains(['%', '\\', ';']) {
        return Err("percent-encoded, backslashed or ';' paths are not accepted");
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

/// `text`, cut at [`MAX_REPORTED_PATH`] bytes (on a character boundary).
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_REPORTED_PATH);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A JSON answer.
fn answer(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An error answer `{"error":{"code","message"}}`, in the shape of the daemon's sockets.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    answer(
        status,
        &json!({ "error": { "code": code, "message": message.into() } }),
    )
}

/// How long an agent has to send a request's head and body.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a complete request head.
    pub header_timeout: Duration,
    /// Time allowed for a request's body once its head arrived.
    pub body_timeout: Duration,
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

    #[test]
    fn a_reported_path_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_REPORTED_PATH);
        let c = cut(&long);
        assert!(c.len() <= MAX_REPORTED_PATH && c.chars().all(|ch| ch == 'é'));
        assert_eq!(cut("/v1/models"), "/v1/models");
    }
}
