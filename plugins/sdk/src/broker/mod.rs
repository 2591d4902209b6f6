//! The broker protocol between the daemon and `keywarden-broker` (docs/broker.md):
//! HTTP/1.1 over a Unix socket the daemon binds in a private directory and hands to the broker
//! as its standard input. Only the daemon connects to it.
//!
//! | request | reply |
//! |---|---|
//! | `PUT /v1/routes` with [`Routes`] | 204, once: a second `PUT` is refused (409) |
//! | `PUT /v1/keys` with [`Keys`] and [`TOKEN_HEADER`] | 204 once no request that started on an older version of those secrets is still running |
//! | `PUT /v1/state` with [`State`] and [`TOKEN_HEADER`] | 204 |
//! | `GET /v1/attach` | never answers; when this connection closes the broker exits |
//! | `ANY /v1/forward/{broker}/{path}?{query}` | the upstream's answer, streamed (the broker benchmark's way in) |
//!
//! Agents' connections reach the broker on its standard output, a `SOCK_SEQPACKET` socket: each
//! record from the daemon is a [`Handoff`] with the connection as `SCM_RIGHTS`; the broker
//! serves it (the checks, budgets and usage of docs/broker.md) and sends back [`Reports`].
//!
//! The daemon pushes each route secret's current version with `PUT /v1/keys` when the broker
//! starts and whenever it changes. The broker uses a new version for every request that starts
//! after it arrived, while requests already running finish on the key they started with; the
//! `PUT` is answered when the last of those has ended, and until then the daemon keeps the older
//! version in use (so a rotation revokes it upstream only after). A version never replaces a
//! newer one of the same secret, so pushes may arrive in any order.

pub mod budget;
#[cfg(feature = "handoff")]
pub mod channel;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Request headers an agent may not pass on to a provider: its own credentials (a placeholder,
/// or worse a real key), cookies, headers asking for another method than the one checked or
/// another organization or project to bill than the key's own, and hop-by-hop headers
/// ([`passes_request_header`] drops them and more).
pub const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
    "cookie",
    // Asking the upstream to take the request as another method than the one checked.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    // Choosing which of the key's organizations or projects pays (OpenAI): the key decides.
    "openai-organization",
    "openai-project",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a request header goes upstream: not one of [`DROPPED_REQUEST_HEADERS`], keywarden's
/// own (`x-keywarden-*`), nor Google's system headers (`x-goog-*`: `X-Goog-FieldMask` cuts the
/// usage out of an answer, `X-Goog-User-Project` picks who pays).
pub fn passes_request_header(name: &str) -> bool {
    !(DROPPED_REQUEST_HEADERS.contains(&name)
        || name.starts_with("x-keywarden-")
        || name.starts_with("x-goog-"))
}

/// Whether a query parameter (`name=value`, as sent) goes upstream. Dropped: a `key` (Gemini's
/// way to pass a key: the agent's placeholder), Google's system parameters that cut the usage
/// out of an answer or change its format (`fields`, `alt` but `alt=sse`/`alt=json`,
/// `prettyPrint`, `callback`, …, and every `$name` form), credentials (`access_token`,
/// `oauth_token`), and names that are not plain once `%`-decoded (as the upstream reads them:
/// `%24fields` is `$fields`; the SDKs' `include%5B%5D` is `include[]` and passes).
pub fn passes_query_parameter(pair: &str) -> bool {
    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
    let (Some(name), Some(value)) = (percent_decoded(name), percent_decoded(value)) else {
        return false;
    };
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']'));
    plain
        && match name.as_str() {
            "alt" => value == "sse" || value == "json",
            "key" | "fields" | "prettyPrint" | "callback" | "access_token" | "oauth_token"
            | "quotaUser" | "userIp" | "upload_protocol" | "uploadType" => false,
            _ => true,
        }
}

/// `text` with its `%XX` escapes and `+` decoded, if that is UTF-8 and every escape whole.
fn percent_decoded(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Response header naming the route (secret) that answered.
pub const ROUTE_HEADER: &str = "x-keywarden-route";
/// Request header of `PUT /v1/keys` with the token given with the routes.
pub const TOKEN_HEADER: &str = "x-keywarden-token";

/// How long `POST /v1/finish` (a stop or a reload) lets requests in flight on handed
/// connections run, as the daemon's own sockets do; the broker then cuts them, reports each as
/// ended incomplete, and answers.
pub const FINISH_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything the broker serves: `PUT /v1/routes`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Routes {
    /// Brokers by name.
    pub brokers: BTreeMap<String, BrokerRoutes>,
    /// What every `PUT /v1/keys` must carry in [`TOKEN_HEADER`]: made by the daemon for each
    /// broker process and given with the routes (which are set once), so nothing else that
    /// reaches the socket can push a key.
    pub token: String,
    /// Time an agent has to send a complete request head, milliseconds.
    pub header_timeout_ms: u64,
    /// Time an agent has to send a request's body once its head arrived, milliseconds.
    pub body_timeout_ms: u64,
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
    /// What agents may call; anything else is refused (403) and never forwarded.
    pub allowed: Vec<Allowed>,
    /// Largest request body an agent may send, bytes.
    pub max_body_bytes: usize,
    /// Whether the upstream is a model provider, for whose work an answer that carries no
    /// usage counts an estimate (every preset but `bearer`; absent: none).
    #[serde(default)]
    pub estimates: bool,
}

/// An allowed method and path: the path and everything under it (`/v1/models` allows
/// `/v1/models/gpt-4o`, never `/v1/modelsX`), or with `exact` the path alone. A `*` stands for
/// one path segment, or the part of one before a `:` (`/v1beta/models/*:generateContent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowed {
    /// `GET`, `POST`, ….
    pub method: String,
    /// The path (`/v1/chat/completions`); called `prefix` on the wire, as it was before
    /// `exact` and `*` existed.
    #[serde(rename = "prefix")]
    pub path: String,
    /// The path alone, nothing under it.
    #[serde(default)]
    pub exact: bool,
}

impl Allowed {
    /// Parses `"POST /v1/models"` (the path and everything under it) or `"POST = /v1/messages"`
    /// (that path alone).
    pub fn parse(text: &str) -> Result<Allowed, String> {
        let malformed = || format!("{text:?} is not \"METHOD /path\" or \"METHOD = /path\"");
        let words: Vec<&str> = text.split_whitespace().collect();
        let (method, exact, path) = match words[..] {
            [method, path] => (method, false, path),
            [method, "=", path] => (method, true, path),
            _ => return Err(malformed()),
        };
        let method = method.to_ascii_uppercase();
        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
            return Err(format!("{text:?}: method {method:?} is not allowed"));
        }
        if !path.starts_with('/') || path.contains("..") || path.contains('%') {
            return Err(format!(
                "{text:?}: the path must be absolute, without '..' or '%'"
            ));
        }
        let bytes = path.as_bytes();
        let wild_ok = bytes.iter().enumerate().all(|(i, &b)| {
            b != b'*'
                || (bytes[i - 1] == b'/' && matches!(bytes.get(i + 1), None | Some(b'/' | b':')))
        });
        if !wild_ok {
            return Err(format!(
                "{text:?}: '*' stands for a whole segment, or the part of one before ':'"
            ));
        }
        if exact && path.ends_with('/') {
            return Err(format!("{text:?}: an exact path does not end with '/'"));
        }
        Ok(Allowed {
            method,
            path: path.to_string(),
            exact,
        })
    }

    /// Whether `method path` is one this allows.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        if self.method != method {
            return false;
        }
        let mut rest = path.as_bytes();
        for &b in self.path.as_bytes() {
            if b == b'*' {
                let n = rest
                    .iter()
                    .position(|&c| c == b'/' || c == b':')
                    .unwrap_or(rest.len());
                if n == 0 {
                    return false;
                }
                rest = &rest[n..];
            } else if rest.first() == Some(&b) {
                rest = &rest[1..];
            } else {
                return false;
            }
        }
        rest.is_empty() || (!self.exact && (rest[0] == b'/' || self.path.ends_with('/')))
    }
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

/// `PUT /v1/state` (with [`TOKEN_HEADER`]): what the broker process enforces besides the
/// routes, sent right after the keys when it starts and again whenever a block or the audit
/// backlog changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Brokers an operator blocked: every new request through them is refused (503).
    pub blocked: Vec<String>,
    /// The daemon cannot write its audit log and rows of brokered requests wait: every new
    /// request is refused (503) until they are written.
    #[serde(default)]
    pub audit_backlog: bool,
    /// What each caller spent so far ([`budget::Budgets::restore`]'s rows: the policy, uid
    /// and executable, requests this minute, requests and tokens today), so a process that
    /// starts again counts on from there. Only the first `PUT` of a process seeds them.
    pub spent: Vec<(budget::Caller, u64, u64, u64)>,
    /// The moment `spent` was read, milliseconds since the Unix epoch.
    pub at: budget::Millis,
}

/// A record on the hand-off channel from the daemon: an agent's connection, attested by the
/// daemon, passed with it as `SCM_RIGHTS`, and what the daemon decided about its peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    /// The daemon's number for this connection; reports about it carry it.
    pub conn: u64,
    /// The decision, made once for the connection.
    pub peer: Decision,
}

/// What the daemon decided about a connection's peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Decision {
    /// Every request is refused (403) for this reason: no process on this host owns the
    /// connection, or its uid runs keywarden's plugins.
    pub refused: Option<String>,
    /// Who the peer is, for the budgets' counters: its uid…
    pub uid: u32,
    /// …and executable.
    pub exe: String,
    /// The brokers it may use, each with the policy that admits it there; any other is
    /// refused (403).
    pub admitted: BTreeMap<String, Admission>,
}

/// The policy that lets a peer use a broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admission {
    /// The policy's name.
    pub policy: String,
    /// Its budget.
    pub budget: budget::Budget,
}

/// A record on the hand-off channel from the broker: what happened on handed connections
/// since the last one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reports {
    /// Requests whose answer ended.
    #[serde(default)]
    pub ended: Vec<Ended>,
    /// Requests refused because the peer may not make them.
    #[serde(default)]
    pub denied: Vec<Denied>,
    /// Connections that closed.
    #[serde(default)]
    pub closed: Vec<u64>,
}

/// A brokered request that ended (never a body, a query or a header value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ended {
    /// The connection it came on.
    pub conn: u64,
    /// The broker.
    pub broker: String,
    /// The route (secret) that answered.
    pub route: Option<String>,
    /// The version of the key that route injected.
    pub version: Option<i64>,
    /// The method.
    pub method: String,
    /// The provider path called.
    pub path: String,
    /// The status the agent got.
    pub status: u16,
    /// Input tokens, as the provider counted them.
    pub tokens_in: Option<u64>,
    /// Output tokens.
    pub tokens_out: Option<u64>,
    /// Tokens counted by estimate ([`budget::estimate`]) for work a model provider may have
    /// done that its answer does not count: a successful answer without usage (the agent hung
    /// up before a stream's last chunk, an endpoint that reports none), events of a stream cut
    /// after its first usage, a request given up before its answer, each route sent it that
    /// never answered.
    pub tokens_estimated: Option<u64>,
    /// Time to the upstream's answer head.
    pub upstream_ms: Option<u64>,
    /// Time from the request's head to the answer's end.
    pub ms: u64,
    /// Whether the answer reached its end (not cut by the agent or the upstream).
    pub complete: bool,
}

/// A request refused because the peer may not make it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Denied {
    /// The connection it came on.
    pub conn: u64,
    /// The broker named.
    pub broker: String,
    /// Why.
    pub reason: String,
}

/// Largest record on the hand-off channel, either way.
pub const MAX_RECORD: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::Allowed;

    fn allows(rule: &str, method: &str, path: &str) -> bool {
        Allowed::parse(rule).unwrap().allows(method, path)
    }

    #[test]
    fn a_path_allows_itself_and_what_is_under_it_never_a_longer_name() {
        assert!(allows("GET /v1/models", "GET", "/v1/models"));
        assert!(allows("GET /v1/models", "GET", "/v1/models/gpt-4o"));
        assert!(!allows("GET /v1/models", "GET", "/v1/modelsX"));
        assert!(!allows("GET /v1/models", "GET", "/v1/models:x"));
        assert!(!allows("GET /v1/models", "POST", "/v1/models"));
        assert!(allows("GET /v1/responses/", "GET", "/v1/responses/r1"));
        assert!(!allows("GET /v1/responses/", "GET", "/v1/responses"));
    }

    #[test]
    fn an_exact_path_allows_nothing_under_it() {
        assert!(allows("POST = /v1/messages", "POST", "/v1/messages"));
        assert!(!allows(
            "POST = /v1/messages",
            "POST",
            "/v1/messages/batches"
        ));
        assert!(!allows("post = /v1/messages", "POST", "/v1/messagesX"));
    }

    #[test]
    fn a_star_is_one_segment_or_the_part_before_a_colon() {
        let rule = "POST = /v1beta/models/*:generateContent";
        assert!(allows(
            rule,
            "POST",
            "/v1beta/models/gemini-2.0:generateContent"
        ));
        assert!(!allows(
            rule,
            "POST",
            "/v1beta/models/g:batchGenerateContent"
        ));
        assert!(!allows(rule, "POST", "/v1beta/models/a/b:generateContent"));
        assert!(!allows(rule, "POST", "/v1beta/models/:generateContent"));
        assert!(!allows(rule, "POST", "/v1beta/models/x:generateContent:y"));
        let rule = "POST = /openai/deployments/*/chat/completions";
        assert!(allows(
            rule,
            "POST",
            "/openai/deployments/gpt-4o/chat/completions"
        ));
        assert!(!allows(
            rule,
            "POST",
            "/openai/deployments/gpt-4o/images/generations"
        ));
    }

    #[test]
    fn malformed_rules_are_refused_with_the_reason() {
        for (rule, why) in [
            ("POST", "is not"),
            ("POST == /v1", "is not"),
            ("TRACE /v1", "method"),
            ("POST v1", "absolute"),
            ("POST /v1/../admin", "absolute"),
            ("POST /v1/%2e", "absolute"),
            ("POST /v1/gpt*", "'*'"),
            ("POST /v1/*x", "'*'"),
            ("POST = /v1/", "exact"),
        ] {
            let e = Allowed::parse(rule).unwrap_err();
            assert!(e.contains(why), "{rule}: {e}");
        }
    }

    #[test]
    fn query_parameters_that_cut_usage_out_of_an_answer_do_not_pass() {
        use super::passes_query_parameter as passes;
        for kept in [
            "alt=sse",
            "alt=json",
            "api-version=2024-10-21",
            "limit=20",
            "beta=true",
            "include%5B%5D=file_search_call.results",
        ] {
            assert!(passes(kept), "{kept}");
        }
        for dropped in [
            "key=placeholder",
            "fields=candidates",
            "$fields=candidates",
            "%24fields=candidates",
            "%66ields=candidates",
            "alt=%70roto",
            "f%2=x",
            "alt=proto",
            "$alt=proto",
            "prettyPrint=false",
            "access_token=x",
            "=x",
        ] {
            assert!(!passes(dropped), "{dropped}");
        }
        assert!(!super::passes_request_header("x-goog-fieldmask"));
        assert!(!super::passes_request_header("x-keywarden-route"));
        assert!(super::passes_request_header("anthropic-version"));
    }

    #[test]
    fn rules_sent_before_exact_existed_still_read() {
        let old: Allowed = serde_json::from_str(r#"{"method":"GET","prefix":"/v1"}"#).unwrap();
        assert_eq!(old, Allowed::parse("GET /v1").unwrap());
    }
}
