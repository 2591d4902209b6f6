//! The broker: agents call model providers through keywarden, which adds the key on the way
//! out, so no agent process ever holds it (../shared/DESIGN.md §11, docs/broker.md).
//!
//! The daemon attests the caller, decides which brokers it may use under which policy, and
//! hands its connection with that decision to `keywarden-broker`, a separate confined process
//! and the only place a provider key meets an HTTP client (`process.rs`), which holds the route
//! keys the daemon pushes it (`keys.rs`) and checks, forwards and meters each request. This
//! module holds what the daemon knows of brokers: their config and presets, and the blocks and
//! budgets it gives the process.

pub mod keys;
pub mod presets;
pub mod process;

pub use keywarden_plugin_sdk::broker::budget;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_plugin_sdk::broker::{BrokerRoutes, FINISH_AT_MOST, RouteSpec, Routes, State};
use serde::Deserialize;

use crate::parse::duration;
pub use presets::{Allowed, Preset};

/// `[brokers.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The provider preset.
    pub preset: Preset,
    /// The secret whose value is injected.
    pub secret: String,
    /// Routes tried in order when the one before answers 429 or 5xx or cannot be reached.
    #[serde(default)]
    pub fallback: Vec<Fallback>,
    /// A loopback TCP address to listen on as well (`127.0.0.1:8788`).
    pub listen: Option<String>,
    /// The API's base URL, replacing the preset's.
    pub upstream: Option<String>,
    /// Extra CA certificates (PEM) to trust for the upstream: a private CA.
    pub ca_file: Option<PathBuf>,
    /// Allowed calls, `"METHOD /path"` (the path and everything under it) or `"METHOD = /path"`
    /// (that path alone), replacing the preset's (`bearer` needs them).
    pub paths: Option<Vec<String>>,
    /// Largest request body, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Longest wait for a connection to the upstream.
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for the head of the upstream's answer.
    #[serde(default = "default_first_byte_timeout", deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two pieces of an answer.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
}

fn default_max_body() -> usize {
    10 << 20
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}

/// A fallback route: another secret of the same provider, or a compatible API.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Fallback {
    /// `"openai/backup"`: the same preset and upstream with another key.
    Secret(String),
    /// `{ secret, preset, upstream }`: a compatible API elsewhere.
    Route {
        /// The key injected.
        secret: String,
        /// Its preset (default: the broker's).
        preset: Option<Preset>,
        /// Its base URL (default: the preset's).
        upstream: Option<String>,
    },
}

/// A broker as the daemon runs it.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Its name (`/v1/broker/{name}/…`).
    pub name: String,
    /// The loopback address, if any.
    pub listen: Option<std::net::SocketAddr>,
    /// What the broker process is told.
    pub routes: BrokerRoutes,
}

impl Broker {
    /// The secrets it injects, primary first.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.routes.routes.iter().map(|r| r.secret.as_str())
    }

    /// Whether an agent may call `method path`.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.routes.allowed.iter().any(|a| a.allows(method, path))
    }
}

/// A config error: the key and the message.
type Invalid = (&'static str, String);

/// Checks and resolves `[brokers.NAME]`; on error, the key and the message.
pub fn compile(
    name: &str,
    c: &BrokerConfig,
    secret_declared: impl Fn(&str) -> bool,
) -> Result<Broker, Invalid> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(("", "a broker's name is letters, digits, '-' and '_'".into()));
    }
    let routes = routes(c)?;
    if let Some(r) = routes.iter().find(|r| !secret_declared(&r.secret)) {
        return Err((
            "secret",
            format!("{:?} is not a declared [secrets] entry", r.secret),
        ));
    }
    let allowed = match &c.paths {
        Some(paths) => paths
            .iter()
            .map(|p| Allowed::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("paths", e))?,
        None => c.preset.allowed(),
    };
    if allowed.is_empty() {
        return Err((
            "paths",
            "list what agents may call, as \"METHOD /path\" or \"METHOD = /path\"".into(),
        ));
    }
    if c.max_body_bytes == 0 {
        return Err(("max_body_bytes", "must be more than zero".into()));
    }
    for (key, time) in [
        ("connect_timeout", c.connect_timeout),
        ("first_byte_timeout", c.first_byte_timeout),
        ("idle_timeout", c.idle_timeout),
    ] {
        if time.is_zero() {
            return Err((key, "must be more than zero".into()));
        }
    }
    Ok(Broker {
        name: name.to_string(),
        listen: c.listen.as_deref().map(loopback).transpose()?,
        routes: BrokerRoutes {
            routes,
            connect_timeout_ms: c.connect_timeout.as_millis() as u64,
            first_byte_timeout_ms: c.first_byte_timeout.as_millis() as u64,
            idle_timeout_ms: c.idle_timeout.as_millis() as u64,
            allowed,
            max_body_bytes: c.max_body_bytes,
            estimates: c.preset != Preset::Bearer,
        },
    })
}

/// The primary route, then the fallbacks, each with its upstream, key header and the CA.
fn routes(c: &BrokerConfig) -> Result<Vec<RouteSpec>, Invalid> {
    let ca_pem = match &c.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| ("ca_file", format!("cannot read {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let route = |secret: &str, preset: Preset, url: String| {
        let (header, prefix) = preset.auth();
        RouteSpec {
            secret: secret.to_string(),
            upstream: url,
            header: header.into(),
            prefix: prefix.into(),
            ca_pem: ca_pem.clone(),
        }
    };
    let mut routes = vec![route(
        &c.secret,
        c.preset,
        upstream(c.preset, &c.upstream, "upstream")?,
    )];
    for f in &c.fallback {
        routes.push(match f {
            Fallback::Secret(s) => route(s, c.preset, routes[0].upstream.clone()),
            Fallback::Route {
                secret,
                preset,
                upstream: url,
            } => {
                let preset = preset.unwrap_or(c.preset);
                route(secret, preset, upstream(preset, url, "fallback")?)
            }
        });
    }
    Ok(routes)
}

/// The upstream URL given, else the preset's: https (or plain http to 127.0.0.1, for tests).
fn upstream(preset: Preset, given: &Option<String>, key: &'static str) -> Result<String, Invalid> {
    let url = given
        .clone()
        .or_else(|| preset.upstream().map(str::to_string))
        .ok_or((key, format!("preset {preset:?} needs an upstream URL")))?;
    if !(url.starts_with("https://") || plain_loopback(&url)) {
        return Err((
            key,
            format!("{url:?} must be an https:// URL (or http://127.0.0.1 for tests)"),
        ));
    }
    Ok(url)
}

/// Whether `url` is plain http to 127.0.0.1 itself, with a port or none: not a host whose name
/// only begins so (`http://127.0.0.1.example.com`), nor one behind user info
/// (`http://127.0.0.1@example.com`), which would carry the key in clear text to another host.
fn plain_loopback(url: &str) -> bool {
    url.strip_prefix("http://127.0.0.1").is_some_and(|rest| {
        let port = rest.split(['/', '?', '#']).next().unwrap_or("");
        port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `listen`: a loopback address (the broker only serves this host).
fn loopback(text: &str) -> Result<std::net::SocketAddr, Invalid> {
    let addr: std::net::SocketAddr = text
        .parse()
        .map_err(|e| ("listen", format!("{text:?}: {e}")))?;
    if !addr.ip().is_loopback() {
        return Err((
            "listen",
            format!("{addr} is not a loopback address: the broker only serves this host"),
        ));
    }
    Ok(addr)
}

/// The brokers as the daemon runs them: their settings, the process, and what the process
/// enforces besides its routes (blocks and budgets).
#[derive(Debug)]
pub struct Brokers {
    /// By name.
    pub brokers: BTreeMap<String, Broker>,
    /// `keywarden-broker`.
    pub process: Arc<process::BrokerProcess>,
    /// The keys pushed to it, and the versions still in use there.
    pub keys: Arc<keys::KeyPusher>,
    /// Blocks, and what each policy and caller spent.
    pub enforced: Arc<Enforced>,
    /// What the process reports, until the broker API takes it.
    reports: Mutex<Option<tokio::sync::mpsc::Receiver<process::FromBroker>>>,
    /// The task reading it.
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Brokers {
    /// The running brokers.
    pub fn new(
        brokers: BTreeMap<String, Broker>,
        (process, keys): (Arc<process::BrokerProcess>, Arc<keys::KeyPusher>),
        enforced: Arc<Enforced>,
        reports: tokio::sync::mpsc::Receiver<process::FromBroker>,
    ) -> Brokers {
        Brokers {
            brokers,
            process,
            keys,
            enforced,
            reports: Mutex::new(Some(reports)),
            reader: Mutex::new(None),
        }
    }

    /// What the broker process reports (once: the broker API reads it, in `reader`).
    pub fn read_reports<F>(
        &self,
        reader: impl FnOnce(tokio::sync::mpsc::Receiver<process::FromBroker>) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(reports) = self.reports.lock().expect("reports lock").take() {
            *self.reader.lock().expect("reader lock") = Some(tokio::spawn(reader(reports)));
        }
    }

    /// Lets the requests in flight through the broker process end, at most
    /// [`FINISH_AT_MOST`] (then they are cut, and reported); new ones are not taken (the
    /// daemon has stopped handing over).
    pub async fn finish(&self) {
        tracing::info!("broker: letting requests in flight finish");
        if tokio::time::timeout(FINISH_WAIT, self.process.finish())
            .await
            .is_err()
        {
            tracing::warn!(
                "the broker process did not finish within {FINISH_WAIT:?}: it is stopped, and what it still served ends unrecorded"
            );
        }
    }

    /// Resolves once the reports of every broker process of this run are read (after it
    /// stopped).
    pub async fn reports_read(&self) {
        let reader = self.reader.lock().expect("reader lock").take();
        if let Some(reader) = reader {
            let _ = reader.await;
        }
    }
}

/// How long a stop or a reload waits for the broker process to finish: it cuts what still runs
/// after [`FINISH_AT_MOST`] and sends its last reports; a process that has not answered by
/// then is stopped all the same.
const FINISH_WAIT: Duration = FINISH_AT_MOST.saturating_add(Duration::from_secs(2));

/// What the broker process enforces besides its routes and keys, as the daemon keeps it: the
/// blocks (read back from the audit log at start) and the budgets' counters (from the day's
/// audit rows at start, then from the process's reports). A process that starts is given both.
#[derive(Debug, Default)]
pub struct Enforced {
    /// What each policy and caller spent.
    pub budgets: budget::Budgets,
    blocked: Mutex<BTreeSet<String>>,
    /// Whether brokered requests' audit rows wait for a store that refuses them.
    audit_backlog: std::sync::atomic::AtomicBool,
}

impl Enforced {
    /// Blocks `blocked`.
    pub fn new(blocked: impl IntoIterator<Item = String>) -> Enforced {
        Enforced {
            budgets: budget::Budgets::default(),
            blocked: Mutex::new(blocked.into_iter().collect()),
            audit_backlog: Default::default(),
        }
    }

    /// Records whether brokered requests' audit rows wait for a store that refuses them;
    /// whether that changed anything.
    pub fn set_audit_backlog(&self, backlog: bool) -> bool {
        self.audit_backlog
            .swap(backlog, std::sync::atomic::Ordering::SeqCst)
            != backlog
    }

    /// Whether an operator blocked `name`.
    pub fn is_blocked(&self, name: &str) -> bool {
        self.blocked.lock().expect("blocked lock").contains(name)
    }

    /// Blocks (or unblocks) `name`; whether that changed anything.
    pub fn set_blocked(&self, name: &str, blocked: bool) -> bool {
        let mut set = self.blocked.lock().expect("blocked lock");
        if blocked {
            set.insert(name.to_string())
        } else {
            set.remove(name)
        }
    }

    /// What a broker process is told.
    pub fn state(&self, now: crate::clock::Millis) -> State {
        State {
            blocked: self
                .blocked
                .lock()
                .expect("blocked lock")
                .iter()
                .cloned()
                .collect(),
            audit_backlog: self.audit_backlog.load(std::sync::atomic::Ordering::SeqCst),
            spent: self.budgets.spent(now),
            at: now,
        }
    }
}

/// What the broker process is told about all brokers, and the time agents have to send a
/// request's head and body.
pub fn routes_of(
    brokers: &BTreeMap<String, Broker>,
    (header_timeout, body_timeout): (Duration, Duration),
) -> Routes {
    Routes {
        brokers: brokers
            .iter()
            .map(|(name, b)| (name.clone(), b.routes.clone()))
            .collect(),
        // Made for each broker process as it starts (`process.rs`).
        token: String::new(),
        header_timeout_ms: header_timeout.as_millis() as u64,
        body_timeout_ms: body_timeout.as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> BrokerConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_preset_fills_upstream_header_and_paths_and_fallbacks_keep_their_own() {
        let c = config(
            r#"preset = "openai"
               secret = "openai/prod"
               fallback = ["openai/backup", { secret = "azure/key", preset = "azure-openai", upstream = "https://x.openai.azure.com" }]
               listen = "127.0.0.1:8788""#,
        );
        let b = compile("openai", &c, |_| true).unwrap();
        let r = &b.routes.routes;
        assert_eq!(r[0].upstream, "https://api.openai.com");
        assert_eq!(
            (r[0].header.as_str(), r[0].prefix.as_str()),
            ("authorization", "Bearer ")
        );
        assert_eq!(r[1].secret, "openai/backup");
        assert_eq!(r[1].upstream, "https://api.openai.com");
        assert_eq!(
            (r[2].header.as_str(), r[2].prefix.as_str()),
            ("api-key", "")
        );
        assert!(b.allows("POST", "/v1/chat/completions"));
        assert!(!b.allows("GET", "/v1/chat/completions"));
        assert!(!b.allows("POST", "/v1/files"));
        assert!(!b.allows("DELETE", "/v1/models/x"));
        assert!(
            b.routes.estimates,
            "a model provider's work without usage is estimated"
        );
        let rest = config(
            r#"preset = "bearer"
               secret = "s"
               upstream = "https://api.example.com"
               paths = ["POST /v1/things"]"#,
        );
        assert!(!compile("rest", &rest, |_| true).unwrap().routes.estimates);
    }

    #[test]
    fn presets_refuse_calls_whose_answers_carry_no_usage() {
        let allows = |preset: Preset, method: &str, path: &str| {
            preset.allowed().iter().any(|a| a.allows(method, path))
        };
        assert!(allows(Preset::Anthropic, "POST", "/v1/messages"));
        assert!(allows(
            Preset::Anthropic,
            "POST",
            "/v1/messages/count_tokens"
        ));
        assert!(!allows(Preset::Anthropic, "POST", "/v1/messages/batches"));
        assert!(!allows(Preset::Openai, "POST", "/v1/chat/completionsX"));
        assert!(allows(Preset::Openai, "GET", "/v1/models/gpt-4o"));
        let model = "/v1beta/models/gemini-2.0-flash";
        assert!(allows(
            Preset::Gemini,
            "POST",
            &format!("{model}:generateContent")
        ));
        assert!(allows(
            Preset::Gemini,
            "POST",
            &format!("{model}:streamGenerateContent")
        ));
        assert!(!allows(
            Preset::Gemini,
            "POST",
            &format!("{model}:batchGenerateContent")
        ));
        assert!(!allows(
            Preset::Gemini,
            "POST",
            &format!("{model}:predictLongRunning")
        ));
        let deployment = "/openai/deployments/gpt-4o";
        assert!(allows(
            Preset::AzureOpenai,
            "POST",
            &format!("{deployment}/chat/completions")
        ));
        assert!(!allows(
            Preset::AzureOpenai,
            "POST",
            &format!("{deployment}/images/generations")
        ));
    }

    #[test]
    fn mistakes_name_the_key() {
        let bad = |text: &str| {
            compile("b", &config(text), |s| s != "missing")
                .unwrap_err()
                .0
        };
        assert_eq!(
            bad(r#"preset = "bearer"
                          secret = "s"
                          upstream = "https://api.example.com""#),
            "paths"
        );
        assert_eq!(
            bad(r#"preset = "bearer"
                          secret = "s""#),
            "upstream"
        );
        assert_eq!(
            bad(r#"preset = "openai"
                          secret = "missing""#),
            "secret"
        );
        assert_eq!(
            bad(r#"preset = "openai"
                          secret = "s"
                          listen = "0.0.0.0:8788""#),
            "listen"
        );
        assert_eq!(
            bad(r#"preset = "openai"
                          secret = "s"
                          idle_timeout = "0s""#),
            "idle_timeout"
        );
        for url in [
            "http://api.example.com",
            "http://127.0.0.1.example.com",
            "http://127.0.0.1@example.com",
            "http://127.0.0.1:@example.com",
        ] {
            let text = format!("preset = \"openai\"\nsecret = \"s\"\nupstream = {url:?}");
            assert_eq!(bad(&text), "upstream", "{url}");
        }
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1/v1",
            "https://api.example.com",
        ] {
            let text = format!("preset = \"openai\"\nsecret = \"s\"\nupstream = {url:?}");
            assert!(compile("b", &config(&text), |_| true).is_ok(), "{url}");
        }
    }
}
