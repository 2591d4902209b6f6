//! Sending an admitted request upstream with the route's key, falling back to the next route on
//! a connect error, a time-out, 429 or 5xx (nothing of the answer has reached the agent yet),
//! and streaming the answer back as it arrives.
//!
//! The client is hyper's own (`hyper_util`'s pooled client over `hyper-rustls`), TLS verified
//! against the system's roots and a route's private CA (`rustls-platform-verifier`), HTTP/1.1,
//! no proxy, no redirect followed. It takes the request as hyper builds it: no URL is parsed
//! again on the way out (reqwest, used before, parsed each request's URL three times).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use crate::relay::Relayed;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keywarden_plugin_sdk::broker::{
    Allowed, BrokerRoutes, Failure, ROUTE_HEADER, RouteSpec, Routes, passes_request_header,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::Sleep;

use crate::keys::{InUse, KeyTable};

/// A response body: the upstream's stream, or a short text.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How long an idle connection to an upstream is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// A route's HTTP client.
type Upstream = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Answer headers not passed back (hop-by-hop; the server sets its own framing).
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "trailer",
    "upgrade",
    "proxy-authenticate",
];

struct Route {
    spec: RouteSpec,
    header: HeaderName,
    client: Upstream,
}

/// One broker: its routes, time-outs, and what agents may send through it.
pub struct Broker {
    routes: Vec<Route>,
    first_byte: Duration,
    /// Longest silence of an answer: between two pieces from the upstream, and (stall.rs) an
    /// agent that reads nothing of it.
    pub idle: Duration,
    allowed: Vec<Allowed>,
    /// Largest request body an agent may send.
    pub max_body_bytes: usize,
    /// Whether answers without usage count an estimate (a model provider's).
    pub estimates: bool,
}

impl Broker {
    /// Whether an agent may call `method path`.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.allowed.iter().any(|a| a.allows(method, path))
    }
}

impl Route {
    /// The head of the request to this route's upstream: `path_and_query` appended to its base
    /// URL, the agent's `headers`, and `{header}: {prefix}{key}`; or why it cannot be made.
    fn request(
        &self,
        incoming: &http::request::Parts,
        path_and_query: &str,
        headers: &HeaderMap,
        key: &HeaderValue,
    ) -> Result<Request<()>, &'static str> {
        let mut auth = self.spec.prefix.as_bytes().to_vec();
        auth.extend_from_slice(key.as_bytes());
        let mut auth =
            HeaderValue::from_bytes(&auth).map_err(|_| "the key is not a valid header value")?;
        auth.set_sensitive(true);
        let uri = format!(
            "{}{path_and_query}",
            self.spec.upstream.trim_end_matches('/')
        )
        .parse::<Uri>()
        .map_err(|_| "the upstream and path make no valid URL")?;
        let mut request = Request::new(());
        *request.method_mut() = incoming.method.clone();
        *request.uri_mut() = uri;
        let h = request.headers_mut();
        h.clone_from(headers);
        h.insert(self.header.clone(), auth);
        h.insert(
            hyper::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        Ok(request)
    }
}

/// The configured brokers, each route with its own client.
pub struct Forwarder {
    brokers: HashMap<String, Broker>,
}

impl Forwarder {
    /// Builds the clients for `routes`.
    pub fn new(routes: Routes) -> Result<Forwarder, String> {
        let mut brokers = HashMap::new();
        for (name, b) in routes.brokers {
            brokers.insert(name.clone(), broker(&name, b)?);
        }
        Ok(Forwarder { brokers })
    }

    /// The broker named `name`.
    pub fn broker(&self, name: &str) -> Option<&Broker> {
        self.brokers.get(name)
    }

    /// Sends an admitted request (`method`, `target`: the provider path and query, the agent's
    /// `headers`, `body`) through `broker`'s routes with each route's current key from `keys`.
    pub async fn send(
        &self,
        broker: &Broker,
        head: &http::request::Parts,
        target: &str,
        body: Bytes,
        keys: &Arc<KeyTable>,
    ) -> Forwarded {
        let headers = upstream_headers(&head.headers);
        let mut attempts = Vec::new();
        let mut lost_sends = 0;
        let last = broker.routes.len().saturating_sub(1);
        for (i, route) in broker.routes.iter().enumerate() {
            let Some(key) = keys.take(&route.spec.secret) else {
                attempts.push(format!("{}: no value to inject", route.spec.secret));
                continue;
            };
            let request = match route.request(head, target, &headers, &key.value) {
                Ok(request) => request.map(|()| Full::new(body.clone())),
                Err(why) => {
                    attempts.push(format!("{}: {why}", route.spec.secret));
                    continue;
                }
            };
            let send = route.client.request(request);
            let started = Instant::now();
            let answer = match tokio::time::timeout(broker.first_byte, send).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    lost_sends += u64::from(!e.is_connect());
                    attempts.push(format!("{}: {}", route.spec.secret, describe(&e)));
                    continue;
                }
                Err(_) => {
                    lost_sends += 1;
                    attempts.push(format!(
                        "{}: no answer within {:?}",
                        route.spec.secret, broker.first_byte
                    ));
                    continue;
                }
            };
            let status = answer.status();
            if i < last && (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()) {
                attempts.push(format!("{}: upstream answered {status}", route.spec.secret));
                continue;
            }
            let upstream_ms = started.elapsed().as_millis() as u64;
            let (mut parts, body) = answer.into_parts();
            let version = key.version;
            let body = Idle::new(body, broker.idle, key);
            for h in DROPPED_RESPONSE_HEADERS {
                parts.headers.remove(*h);
            }
            if let Ok(v) = HeaderValue::from_str(&route.spec.secret) {
                parts.headers.insert(ROUTE_HEADER, v);
            }
            let body = Relayed::answer(&parts.headers, body);
            return Forwarded {
                response: Response::from_parts(parts, body.map_err(Into::into).boxed()),
                route: Some(route.spec.secret.clone()),
                version: Some(version),
                upstream_ms: Some(upstream_ms),
                lost_sends,
            };
        }
        let mut response = Response::new(
            Full::new(Bytes::from(
                serde_json::to_string(&Failure { attempts }).expect("serializes"),
            ))
            .map_err(|never| match never {})
            .boxed(),
        );
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        Forwarded {
            response,
            route: None,
            version: None,
            upstream_ms: None,
            lost_sends,
        }
    }
}

/// The answer to a forwarded request, and what its report says of it.
pub struct Forwarded {
    /// The upstream's answer (streaming), or 502 when no route answered.
    pub response: Response<Body>,
    /// The route (secret) that answered.
    pub route: Option<String>,
    /// The version of the key it injected.
    pub version: Option<i64>,
    /// Time to the answer's head.
    pub upstream_ms: Option<u64>,
    /// Routes the request was sent to that gave no answer (a time-out, a connection lost
    /// after sending): each may have done, and billed, the work.
    pub lost_sends: u64,
}

/// What went wrong with a request (hyper's errors name no URL, so no query is repeated).
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// An answer's body that fails when the upstream sends nothing for `idle` between two pieces
/// (a stalled stream ends instead of holding the agent and the key's version forever). It keeps
/// the key its request was sent with in use until it ends or is dropped.
struct Idle {
    body: Incoming,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    _key: InUse,
}

impl Idle {
    fn new(body: Incoming, idle: Duration, key: InUse) -> Idle {
        Idle {
            body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _key: key,
        }
    }
}

impl hyper::body::Body for Idle {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            let deadline = tokio::time::Instant::now() + this.idle;
            this.timer.as_mut().reset(deadline);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        ready!(this.timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(format!(
            "the upstream sent nothing for {:?}",
            this.idle
        )
        .into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn upstream_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in incoming {
        if !passes_request_header(name.as_str()) || name == "accept-encoding" {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    headers
}

fn broker(name: &str, b: BrokerRoutes) -> Result<Broker, String> {
    let connect = Duration::from_millis(b.connect_timeout_ms);
    let mut routes = Vec::new();
    for spec in b.routes {
        let header = HeaderName::from_bytes(spec.header.as_bytes())
            .map_err(|e| format!("broker {name}: header {:?}: {e}", spec.header))?;
        let client = client(connect, spec.ca_pem.as_deref())
            .map_err(|e| format!("broker {name}: route {}: {e}", spec.secret))?;
        routes.push(Route {
            spec,
            header,
            client,
        });
    }
    Ok(Broker {
        routes,
        first_byte: Duration::from_millis(b.first_byte_timeout_ms),
        idle: Duration::from_millis(b.idle_timeout_ms),
        allowed: b.allowed,
        max_body_bytes: b.max_body_bytes,
        estimates: b.estimates,
    })
}

/// A pooled HTTP/1.1 client that verifies the upstream against the system's roots and `ca_pem`,
/// giving up on a connection after `connect`.
fn client(connect: Duration, ca_pem: Option<&str>) -> Result<Upstream, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra = match ca_pem {
        Some(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("its CA: {e}"))?,
        None => Vec::new(),
    };
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| format!("cannot load the trusted roots: {e}"))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(https))
}
