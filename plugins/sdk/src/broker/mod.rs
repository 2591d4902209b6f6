//! The broker protocol between the daemon and `keywarden-broker` (docs/broker-protocol.md):
//! HTTP/1.1 over a Unix socket the daemon binds in a private directory and hands to the broker
//! as its standard input. Only the daemon connects to it.
//!
//! | request | reply |
//! |---|---|
//! | `PUT /v1/routes` with [`Routes`] | 204, once: a second `PUT` is refused (409) |
//! | `PUT /v1/keys` with [`Keys`] and [`TOKEN_HEADER`] | 204 once no request that started on an older version of those secrets is still running |
//! | `GET /v1/attach` | never answers; when this connection closes the broker exits |
//! | `ANY /v1/forward/{broker}/{path}?{query}` | the upstream's answer, streamed |
//!
//! The daemon pushes each route secret's current version with `PUT /v1/keys` when the broker
//! starts and whenever it changes. The broker uses a new version for every request that starts
//! after it arrived, while requests already running finish on the key they started with; the
//! `PUT` is answered when the last of those has ended, and until then the daemon keeps the older
//! version in use (so a rotation revokes it upstream only after). A version never replaces a
//! newer one of the same secret, so pushes may arrive in any order.

#[cfg(feature = "relay")]
pub mod relay;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Request headers an agent may not pass on to a provider: its own credentials (a placeholder,
/// or worse a real key), cookies, and hop-by-hop headers. Both the daemon and the broker drop
/// them (and every `x-keywarden-*` header).
pub const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Response header naming the route (secret) that answered.
pub const ROUTE_HEADER: &str = "x-keywarden-route";
/// Response header with the upstream's time to its answer's head, in milliseconds.
pub const UPSTREAM_MS_HEADER: &str = "x-keywarden-upstream-ms";
/// Response header with the version of the key the answering route injected.
pub const VERSION_HEADER: &str = "x-keywarden-version";
/// Request header of `PUT /v1/keys` with the token given with the routes.
pub const TOKEN_HEADER: &str = "x-keywarden-token";

/// Everything the broker serves: `PUT /v1/routes`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Routes {
    /// Brokers by name.
    pub brokers: BTreeMap<String, BrokerRoutes>,
    /// What every `PUT /v1/keys` must carry in [`TOKEN_HEADER`]: made by the daemon for each
    /// broker process and given with the routes (which are set once), so nothing else that
    /// reaches the socket can push a key.
    pub token: String,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("brokers", &self.brokers)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One broker: its routes in the order they are tried, and its time-outs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerRoutes {
    /// The primary route first, then the fallbacks.
    pub routes: Vec<RouteSpec>,
    /// Longest wait for the connection to the upstream, milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for the head of the upstream's answer, milliseconds.
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two pieces of the answer's body, milliseconds.
    pub idle_timeout_ms: u64,
}

/// Where a route sends requests and how it adds the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteSpec {
    /// The secret whose value is injected (also what `x-keywarden-route` says).
    pub secret: String,
    /// Base URL; the request's path is appended (`https://api.openai.com`).
    pub upstream: String,
    /// Header that carries the key (`authorization`).
    pub header: String,
    /// Text before the key in that header (`Bearer `).
    pub prefix: String,
    /// Extra CA certificates to trust, PEM (a private CA), besides the system's.
    pub ca_pem: Option<String>,
}

/// `PUT /v1/keys`: route secrets' current versions, by secret name; `None` where a secret has
/// no current version any more (its key is dropped at once).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Keys {
    /// Secrets by name.
    pub keys: BTreeMap<String, Option<Key>>,
}

/// One version of a route secret's value.
#[derive(Clone, Serialize, Deserialize)]
pub struct Key {
    /// The secret's id: a secret deleted and made again under the same name starts its
    /// versions again, and its key replaces the old one's whatever their numbers.
    pub id: String,
    /// The version number; versions of a secret only move forward.
    pub version: i64,
    /// The value injected upstream.
    pub value: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The reply when no route answered (status 502 or 504).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// What went wrong on each route tried, in order (never a key or a body).
    pub attempts: Vec<String>,
}
