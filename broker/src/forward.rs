//! Sending an admitted request upstream with the route's key, falling back to the next route on
//! a connect error, a time-out, 429 or 5xx (nothing of the answer has reached the agent yet),
//! and streaming the answer back as it arrives.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use keywarden_plugin_sdk::broker::relay::{Relayed, Source};
use keywarden_plugin_sdk::broker::{
    BrokerRoutes, DROPPED_REQUEST_HEADERS, Failure, KEY_HEADER_PREFIX, ROUTE_HEADER, RouteSpec,
    Routes, UPSTREAM_MS_HEADER,
};

use crate::plain;

/// A response body: the upstream's stream, or a short text.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Largest request body the daemon forwards (it enforces its own, smaller, limit first).
const MAX_FORWARDED_BYTES: usize = 64 << 20;

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
    client: reqwest::Client,
}

struct Broker {
    routes: Vec<Route>,
    first_byte: Duration,
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

    /// Forwards `/v1/forward/{broker}/{path}`.
    pub async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let rest = &parts.uri.path()["/v1/forward/".len()..];
        let (name, path) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(broker) = self.brokers.get(name) else {
            return plain(StatusCode::NOT_FOUND, "no such broker");
        };
        let body = match http_body_util::Limited::new(body, MAX_FORWARDED_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
        };
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let headers = upstream_headers(&parts.headers);
        let mut attempts = Vec::new();
        let last = broker.routes.len().saturating_sub(1);
        for (i, route) in broker.routes.iter().enumerate() {
            let Some(key) = parts
                .headers
                .get(format!("{KEY_HEADER_PREFIX}{i}").as_str())
            else {
                attempts.push(format!("{}: no value to inject", route.spec.secret));
                continue;
            };
            let mut auth = route.spec.prefix.as_bytes().to_vec();
            auth.extend_from_slice(key.as_bytes());
            let Ok(mut auth) = HeaderValue::from_bytes(&auth) else {
                attempts.push(format!(
                    "{}: the key is not a valid header value",
                    route.spec.secret
                ));
                continue;
            };
            auth.set_sensitive(true);
            let url = format!(
                "{}/{path}{query}",
                route.spec.upstream.trim_end_matches('/')
            );
            let request = route
                .client
                .request(parts.method.clone(), &url)
                .headers(headers.clone())
                .header(route.header.clone(), auth)
                .header("accept-encoding", "identity")
                .body(body.clone());
            let started = Instant::now();
            let answer = match tokio::time::timeout(broker.first_byte, request.send()).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    attempts.push(format!("{}: {}", route.spec.secret, describe(&e)));
                    continue;
                }
                Err(_) => {
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
            let upstream_ms = started.elapsed().as_millis();
            let answer: http::Response<reqwest::Body> = answer.into();
            let (mut parts, body) = answer.into_parts();
            for h in DROPPED_RESPONSE_HEADERS {
                parts.headers.remove(*h);
            }
            if let Ok(v) = HeaderValue::from_str(&route.spec.secret) {
                parts.headers.insert(ROUTE_HEADER, v);
            }
            parts
                .headers
                .insert(UPSTREAM_MS_HEADER, HeaderValue::from(upstream_ms as u64));
            let body = Relayed::answer(&parts.headers, body, Source::Provider);
            return Response::from_parts(parts, body.map_err(Into::into).boxed());
        }
        let mut response = Response::new(
            Full::new(Bytes::from(
                serde_json::to_string(&Failure { attempts }).expect("serializes"),
            ))
            .map_err(|never| match never {})
            .boxed(),
        );
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response
    }
}

/// What went wrong with a request, without its URL's query.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    let mut text = what.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn upstream_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in incoming {
        let n = name.as_str();
        if DROPPED_REQUEST_HEADERS.contains(&n)
            || n == "accept-encoding"
            || n.starts_with("x-keywarden-")
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    headers
}

fn broker(name: &str, b: BrokerRoutes) -> Result<Broker, String> {
    let mut routes = Vec::new();
    for spec in b.routes {
        let header = HeaderName::from_bytes(spec.header.as_bytes())
            .map_err(|e| format!("broker {name}: header {:?}: {e}", spec.header))?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(b.connect_timeout_ms))
            .read_timeout(Duration::from_millis(b.idle_timeout_ms))
            .no_proxy();
        if let Some(pem) = &spec.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("broker {name}: CA of {}: {e}", spec.secret))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("broker {name}: cannot build the HTTP client: {e}"))?;
        routes.push(Route {
            spec,
            header,
            client,
        });
    }
    Ok(Broker {
        routes,
        first_byte: Duration::from_millis(b.first_byte_timeout_ms),
    })
}
