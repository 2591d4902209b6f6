//! Compromise signals (docs/design.md §11): a signed webhook for outside detectors, leaked-value
//! reports matched by keyed fingerprint, canary secrets, and access anomalies. Each signal is
//! audited and answered as configured: an alert only, or an alert and a compromise run of the
//! signal's scope.
//!
//! The listener (`[signals] listen`, off by default) takes:
//! - `POST /v1/signals` — `{"type":"compromise"|"alert","scope":{...},"message":"..."}`;
//! - `POST /v1/signals/leak` — GitHub secret-scanning partner reports,
//!   `[{"token","type","url","source"}]`.
//!
//! Both are signed (docs/socket-api.md §4): `X-Keywarden-Timestamp: <Unix seconds>` and
//! `X-Keywarden-Signature: v1=<hex HMAC-SHA256>` over [`signed_bytes`] (the timestamp, method,
//! path and body), under the value of the secret `[signals] hmac_secret`, which must be at least
//! 32 bytes. A signal more than five minutes from now, or one already seen, is refused, so a
//! captured signal cannot be replayed. Refused requests get 401, an audit row and a counter.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::attest::Peer;
use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::crypto;
use crate::http::{self, Handler};
use crate::incident::alerts::Alerts;
use crate::incident::compromise::Incidents;
use crate::metrics::Metrics;
use crate::rotation::engine::Engine;
use crate::store::LeaseOp;
use crate::store::{AlertKind, Scope};

/// What a signal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reaction {
    /// Raise an alert only.
    Alert,
    /// Raise an alert and start a compromise run of the signal's scope.
    Compromise,
}

/// `[signals] tls`: the listener's certificate chain and private key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
}

/// `[signals]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// Address of the signal listener (`127.0.0.1:8787`); off when unset. A loopback address
    /// unless `tls` is set.
    pub listen: Option<String>,
    /// TLS for the listener: `{ cert = "chain.pem", key = "key.pem" }` (PEM files).
    pub tls: Option<ListenerTls>,
    /// The secret whose value is the HMAC-SHA256 key that signs signals.
    pub hmac_secret: Option<String>,
    /// A signed `POST /v1/signals`.
    pub on_signal: Reaction,
    /// A leaked value that matches a stored version (the scope is that secret).
    pub on_leak: Reaction,
    /// Any fetch of a canary secret (the scope is everything).
    pub on_canary: Reaction,
    /// A new caller of a secret, or a fetch rate far above its baseline (the scope is that
    /// secret).
    pub on_anomaly: Reaction,
    /// Fetches per minute above this many times a secret's baseline are an anomaly.
    pub anomaly_rate_factor: f64,
    /// ... and only above this many per minute.
    pub anomaly_min_rate: u32,
    /// Brokered tokens per minute of one caller (policy, uid, executable) above
    /// `anomaly_rate_factor` times its baseline, and above this floor, are an anomaly (the
    /// "strange token consumption" of a stolen key or a hijacked agent).
    pub anomaly_min_tokens: u64,
    /// For this long after a secret's first fetch, new callers of it are learned without an
    /// alert (a deployment starting its workers, a secret just added).
    #[serde(deserialize_with = "crate::parse::duration")]
    pub anomaly_learning: std::time::Duration,
    /// A command run for each alert, with the alert as JSON on stdin.
    #[serde(default)]
    pub alert_command: Vec<String>,
    /// What the confined alert command may do beyond the defaults.
    #[serde(default)]
    pub alert_sandbox: crate::sandbox::SandboxConfig,
    /// A consumer (a plugin kind with `push`) that receives each alert as JSON.
    pub alert_consumer: Option<String>,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        SignalsConfig {
            listen: None,
            tls: None,
            hmac_secret: None,
            on_signal: Reaction::Compromise,
            on_leak: Reaction::Compromise,
            on_canary: Reaction::Alert,
            on_anomaly: Reaction::Alert,
            anomaly_rate_factor: 10.0,
            anomaly_min_rate: 60,
            anomaly_min_tokens: 20_000,
            anomaly_learning: std::time::Duration::from_secs(3600),
            alert_command: Vec::new(),
            alert_sandbox: Default::default(),
            alert_consumer: None,
        }
    }
}

/// The header carrying a signal's signature, `v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-keywarden-signature";
/// The header carrying the Unix time, in seconds, the signal was signed at.
pub const TIMESTAMP_HEADER: &str = "x-keywarden-timestamp";
/// How far a signal's timestamp may be from now, either way.
const MAX_SKEW_SECS: i64 = 300;
/// Shortest signing key accepted.
pub const MIN_KEY_BYTES: usize = 32;
/// Signatures remembered at most (each for the skew window) to refuse replays.
const MAX_REMEMBERED: usize = 100_000;

/// What a sender signs: `v1`, the timestamp, the method and the path, one per line, then the
/// body.
pub fn signed_bytes(timestamp: &str, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("v1\n{timestamp}\n{method}\n{path}\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}
/// Quiet time between two reactions to the same cause (one canary, one leaked secret, one
/// anomaly, one signal scope).
pub const QUIET: Millis = 10 * 60 * 1000;
/// Quiet time between two rate alerts for the same secret.
const RATE_ALERT_QUIET: Millis = 10 * 60 * 1000;

/// A signal from an outside detector: `{"type": "compromise"|"alert", "scope"?, "message"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// `compromise` or `alert` (anything else is refused by the handler).
    #[serde(rename = "type")]
    pub kind: String,
    /// What it concerns (everything when absent).
    #[serde(default)]
    pub scope: Option<Scope>,
    /// The detector's words.
    #[serde(default)]
    pub message: String,
}

/// One item of a GitHub secret-scanning partner report.
#[derive(Debug, Deserialize)]
pub struct LeakItem {
    /// The leaked token: possibly one of the store's values, so never repeated anywhere.
    pub token: String,
    /// The provider's name for the token's type.
    #[serde(rename = "type", default)]
    pub token_type: String,
    /// Where it was found.
    #[serde(default)]
    pub url: String,
    /// What kind of place that is.
    #[serde(default)]
    pub source: String,
}

/// A payload that does not parse, described by where, never by what it holds (serde's own
/// message repeats string values, and a leak report's strings are leaked keys).
#[derive(Debug, thiserror::Error)]
#[error("{what} (line {line}, column {column})")]
pub struct PayloadError {
    what: &'static str,
    line: usize,
    column: usize,
}

fn payload<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, PayloadError> {
    serde_json::from_slice(body).map_err(|e| PayloadError {
        what,
        line: e.line(),
        column: e.column(),
    })
}

/// Parses a `POST /v1/signals` body.
pub fn parse_signal(body: &[u8]) -> Result<SignalBody, PayloadError> {
    payload(
        body,
        r#"not a signal: {"type": "compromise"|"alert", "scope"?: {...}, "message"?: "..."}"#,
    )
}

/// Parses a `POST /v1/signals/leak` body (a JSON array of `{"token", "type", "url", "source"}`).
pub fn parse_leak(body: &[u8]) -> Result<Vec<LeakItem>, PayloadError> {
    payload(
        body,
        r#"not a leak report: [{"token": "...", "type"?, "url"?, "source"?}, ...]"#,
    )
}

/// Fetches (or brokered tokens) per minute, against a baseline (an exponential moving average
/// over minutes, idle minutes counting as zero).
#[derive(Debug, Default)]
struct Rate {
    minute: i64,
    count: u64,
    baseline: Option<f64>,
    last_alert: Millis,
}

impl Rate {
    /// Counts a fetch at `now`; returns (this minute's count, baseline) when it is a spike:
    /// above `factor` × baseline and above `min_rate`, at most once per quiet period.
    fn fetched(&mut self, now: Millis, factor: f64, min_rate: u64) -> Option<(u64, f64)> {
        self.add(now, 1, factor, min_rate)
    }

    /// Counts `amount` at `now`, like [`Rate::fetched`].
    fn add(&mut self, now: Millis, amount: u64, factor: f64, min_rate: u64) -> Option<(u64, f64)> {
        let minute = now / 60_000;
        if self.minute != minute {
            if self.count > 0 || self.baseline.is_some() {
                let idle = (minute - self.minute - 1).clamp(0, 60) as i32;
                let mut b = self.baseline.unwrap_or(self.count as f64);
                b = 0.8 * b + 0.2 * self.count as f64;
                b *= 0.8f64.powi(idle);
                self.baseline = Some(b);
            }
            self.minute = minute;
            self.count = 0;
        }
        self.count += amount;
        let baseline = self.baseline?;
        let spike = self.count as f64 > factor * baseline.max(1.0)
            && self.count > min_rate
            && now - self.last_alert > RATE_ALERT_QUIET;
        if spike {
            self.last_alert = now;
        }
        spike.then_some((self.count, baseline))
    }
}

/// Who has fetched what, and how often: the anomaly detector's memory.
#[derive(Debug, Default)]
struct Seen {
    callers: HashSet<(String, u32, String)>,
    /// Each secret ever fetched, and when it first was.
    secrets: HashMap<String, Millis>,
    rates: HashMap<String, Rate>,
    /// Brokered tokens per caller (policy, uid, executable).
    tokens: HashMap<(String, u32, String), Rate>,
}

/// A caller's brokered tokens this minute far above its baseline ([`Signals::note_tokens`]).
#[derive(Debug)]
pub struct TokenSpike {
    count: u64,
    baseline: f64,
}

/// What an allowed fetch revealed that needs acting on (see [`Signals::note_fetch`]).
#[derive(Debug)]
pub struct FetchNews {
    at: Millis,
    new_caller: bool,
    /// Within the secret's learning period: a new caller is recorded, not alerted on.
    learning: bool,
    rate_alert: Option<(u64, f64)>,
}

/// The fetch [`Signals::act_on_fetch`] acts on.
#[derive(Debug)]
pub struct FetchSeen {
    /// The secret's name.
    pub name: String,
    /// The secret's id.
    pub secret_id: String,
    /// The caller's uid.
    pub uid: u32,
    /// The caller's executable, or "unknown".
    pub exe: String,
    /// The caller as the audit log names it.
    pub caller: String,
}

/// Signal handling shared by the listener and the agent socket.
pub struct Signals {
    engine: Arc<Engine>,
    incidents: Arc<Incidents>,
    alerts: Arc<Alerts>,
    metrics: Arc<Metrics>,
    config: SignalsSettings,
    seen: Mutex<Seen>,
    /// Signatures of accepted signals, with the Unix second after which they are forgotten.
    replays: Mutex<HashMap<Vec<u8>, i64>>,
    /// When each cause was last reacted to.
    reacted: Mutex<HashMap<(AlertKind, String), Millis>>,
}

/// The parts of `[signals]` the handler needs.
#[derive(Debug, Clone)]
pub struct SignalsSettings {
    /// The secret holding the HMAC key.
    pub hmac_secret: Option<String>,
    /// Reaction to `POST /v1/signals` of type compromise.
    pub on_signal: Reaction,
    /// Reaction to a matched leak.
    pub on_leak: Reaction,
    /// Reaction to a canary fetch.
    pub on_canary: Reaction,
    /// Reaction to an anomaly.
    pub on_anomaly: Reaction,
    /// Rate anomaly factor over the baseline.
    pub rate_factor: f64,
    /// Rate anomaly floor, fetches per minute.
    pub min_rate: u32,
    /// Token rate anomaly floor, tokens per minute.
    pub min_tokens: u64,
    /// How long after its first fetch a secret's new callers are learned silently.
    pub learning: std::time::Duration,
}

impl From<&SignalsConfig> for SignalsSettings {
    fn from(c: &SignalsConfig) -> Self {
        SignalsSettings {
            hmac_secret: c.hmac_secret.clone(),
            on_signal: c.on_signal,
            on_leak: c.on_leak,
            on_canary: c.on_canary,
            on_anomaly: c.on_anomaly,
            rate_factor: c.anomaly_rate_factor,
            min_rate: c.anomaly_min_rate,
            min_tokens: c.anomaly_min_tokens,
            learning: c.anomaly_learning,
        }
    }
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

impl Signals {
    /// Signal handling over the engine, with callers already seen loaded from the store.
    pub async fn new(
        engine: Arc<Engine>,
        incidents: Arc<Incidents>,
        alerts: Arc<Alerts>,
        metrics: Arc<Metrics>,
        config: SignalsSettings,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let mut seen = Seen::default();
        for (secret_id, uid, exe, first) in engine.vault().store().access_seen().await? {
            let earliest = seen.secrets.entry(secret_id.clone()).or_insert(first);
            *earliest = (*earliest).min(first);
            seen.callers.insert((secret_id, uid, exe));
        }
        Ok(Arc::new(Signals {
            engine,
            incidents,
            alerts,
            metrics,
            config,
            seen: Mutex::new(seen),
            replays: Mutex::default(),
            reacted: Mutex::default(),
        }))
    }

    /// Raises an alert and, if `reaction` says so, starts a compromise run of `scope`; once per
    /// cause in [`QUIET`] (a canary fetched in a loop raises one alert, not thousands).
    pub async fn react(
        &self,
        kind: AlertKind,
        reaction: Reaction,
        scope: Scope,
        secret: Option<&str>,
        message: String,
    ) {
        let cause = match kind {
            AlertKind::Canary | AlertKind::Leak => secret.unwrap_or_default().to_string(),
            AlertKind::Anomaly => message.clone(),
            AlertKind::Signal => {
                serde_json::to_string(&scope.canonical()).expect("scopes serialize")
            }
        };
        if !self.claim(kind, &cause) {
            self.metrics
                .reactions_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let incident = match reaction {
            Reaction::Alert => None,
            Reaction::Compromise => match self.incidents.start(scope, true, 8, kind.into()).await {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::error!(%kind, error = %e, "could not start the compromise run a signal asked for");
                    None
                }
            },
        };
        self.alerts.raise(kind, secret, message, incident).await;
    }

    /// Whether `cause` of `kind` would be reacted to now (nothing the same in [`QUIET`]); cheap,
    /// so the fetch path can skip even spawning the reaction.
    pub fn is_news(&self, kind: AlertKind, cause: &str) -> bool {
        let now = self.engine.clock().now();
        let reacted = self.reacted.lock().expect("reacted lock");
        reacted
            .get(&(kind, cause.to_string()))
            .is_none_or(|at| now - at >= QUIET)
    }

    /// Records a reaction to `cause` of `kind` unless one happened in [`QUIET`]; says whether it
    /// did record (and so whether to react).
    fn claim(&self, kind: AlertKind, cause: &str) -> bool {
        let now = self.engine.clock().now();
        let mut reacted = self.reacted.lock().expect("reacted lock");
        if reacted.len() > 4096 {
            reacted.retain(|_, at| now - *at < QUIET);
        }
        match reacted.get(&(kind, cause.to_string())) {
            Some(at) if now - at < QUIET => false,
            _ => {
                reacted.insert((kind, cause.to_string()), now);
                true
            }
        }
    }

    /// A fetch of a canary secret (allowed or not): any such fetch means compromise.
    pub async fn canary(&self, secret: &str, caller: &str) {
        self.react(
            AlertKind::Canary,
            self.config.on_canary,
            Scope::everything(),
            Some(secret),
            format!("canary {secret} was fetched by {caller}"),
        )
        .await;
    }

    /// Notes an allowed fetch in memory. Returns what it calls for (recording a new caller,
    /// raising an anomaly), or `None` for a routine fetch, which is most of them: the fetch path
    /// spawns work only when there is some.
    pub fn note_fetch(&self, secret_id: &str, uid: u32, exe: &str) -> Option<FetchNews> {
        let now = self.engine.clock().now();
        let mut seen = self.seen.lock().expect("seen lock");
        let key = (secret_id.to_string(), uid, exe.to_string());
        let new_caller = !seen.callers.contains(&key);
        let first_fetch = *seen.secrets.entry(secret_id.to_string()).or_insert(now);
        let learning = now - first_fetch < self.config.learning.as_millis() as Millis;
        if new_caller {
            seen.callers.insert(key);
        }
        let rate = match seen.rates.get_mut(secret_id) {
            Some(rate) => rate,
            None => seen.rates.entry(secret_id.to_string()).or_default(),
        };
        let rate_alert = rate.fetched(now, self.config.rate_factor, self.config.min_rate.into());
        (new_caller || rate_alert.is_some()).then_some(FetchNews {
            at: now,
            new_caller,
            learning,
            rate_alert,
        })
    }

    /// Counts the tokens a brokered request of `caller` (policy, uid, executable) used, and
    /// says whether its rate this minute spiked far above its baseline (then
    /// [`Signals::act_on_tokens`]). No await: it runs as the answer ends.
    pub fn note_tokens(&self, caller: &(String, u32, String), tokens: u64) -> Option<TokenSpike> {
        let now = self.engine.clock().now();
        let mut seen = self.seen.lock().expect("seen lock");
        if seen.tokens.len() > 65_536 && !seen.tokens.contains_key(caller) {
            return None;
        }
        let (count, baseline) = seen.tokens.entry(caller.clone()).or_default().add(
            now,
            tokens,
            self.config.rate_factor,
            self.config.min_tokens,
        )?;
        Some(TokenSpike { count, baseline })
    }

    /// Raises the anomaly of a token spike of `caller` over `secrets` (the keys of the broker
    /// it called).
    pub async fn act_on_tokens(
        &self,
        spike: TokenSpike,
        caller: &(String, u32, String),
        secrets: &[String],
    ) {
        let TokenSpike { count, baseline } = spike;
        let (policy, uid, exe) = caller;
        self.react(
            AlertKind::Anomaly,
            self.config.on_anomaly,
            Scope::names(secrets),
            secrets.first().map(String::as_str),
            format!(
                "uid {uid} ({exe}) under policy {policy} used {count} brokered tokens this \
                 minute; its baseline is {baseline:.0} per minute"
            ),
        )
        .await;
    }

    /// Acts on what [`Signals::note_fetch`] found: records a new caller durably, raises an
    /// anomaly for a new caller of a secret that had callers before, or for a fetch rate far
    /// above the secret's baseline.
    pub async fn act_on_fetch(&self, fetch: FetchSeen, news: FetchNews) {
        let FetchSeen {
            name,
            secret_id,
            uid,
            exe,
            caller,
        } = fetch;
        if news.new_caller {
            let op = LeaseOp::AccessSeen {
                secret_id,
                uid,
                exe,
                at: news.at,
            };
            if let Err(e) = self
                .engine
                .vault()
                .store()
                .apply_lease_batch(&[op], &[])
                .await
            {
                tracing::warn!(error = %e, "could not record a new caller");
            }
        }
        let mut anomalies = Vec::new();
        if news.new_caller && !news.learning {
            anomalies.push(format!(
                "{name} was fetched by a caller never seen before: {caller}"
            ));
        }
        if let Some((count, baseline)) = news.rate_alert {
            anomalies.push(format!(
                "{name} was fetched {count} times this minute; its baseline is {baseline:.1} per minute"
            ));
        }
        for message in anomalies {
            self.react(
                AlertKind::Anomaly,
                self.config.on_anomaly,
                Scope::secret(&name),
                Some(&name),
                message,
            )
            .await;
        }
    }

    async fn verify(&self, request: &Request<Bytes>) -> Result<(), &'static str> {
        let Some(name) = &self.config.hmac_secret else {
            return Err("no signing key is configured");
        };
        let header = |name| {
            request
                .headers()
                .get(name)
                .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
        };
        let signature = header(SIGNATURE_HEADER).ok_or("missing signature")?;
        if signature.starts_with("sha256=") {
            return Err(
                "the body-only signature (sha256=) is no longer accepted: send X-Keywarden-Timestamp \
                 (Unix seconds) and X-Keywarden-Signature: v1=<hex HMAC-SHA256 of \
                 \"v1\\n<timestamp>\\n<METHOD>\\n<path>\\n<body>\">",
            );
        }
        let tag = signature
            .strip_prefix("v1=")
            .and_then(crypto::from_hex)
            .ok_or("malformed signature")?;
        let timestamp = header(TIMESTAMP_HEADER).ok_or("missing timestamp")?;
        let signed_at: i64 = timestamp.parse().map_err(|_| "malformed timestamp")?;
        let now = self.engine.clock().now() / 1000;
        if (now - signed_at).abs() > MAX_SKEW_SECS {
            return Err("the timestamp is more than five minutes from now");
        }
        let key = self
            .engine
            .vault()
            .read(name, None)
            .await
            .map_err(|_| "the signing key is unavailable")?;
        if key.value.expose().len() < MIN_KEY_BYTES {
            return Err("the signing key is shorter than 32 bytes; store a longer one");
        }
        let signed = signed_bytes(
            timestamp,
            request.method().as_str(),
            request.uri().path(),
            request.body(),
        );
        if !crypto::hmac_sha256_verify(key.value.expose().as_bytes(), &signed, &tag) {
            return Err("bad signature");
        }
        self.remember(tag, now)
    }

    /// Refuses a signature already accepted within the window (a replay); remembers this one.
    fn remember(&self, tag: Vec<u8>, now: i64) -> Result<(), &'static str> {
        let mut replays = self.replays.lock().expect("replays lock");
        replays.retain(|_, forget_at| *forget_at >= now);
        if replays.contains_key(&tag) {
            return Err("this signal was already received (a replay)");
        }
        if replays.len() >= MAX_REMEMBERED {
            return Err("too many signals in the last minutes; try again later");
        }
        replays.insert(tag, now + 2 * MAX_SKEW_SECS);
        Ok(())
    }

    async fn handle_signal(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let signal = match parse_signal(body) {
            Ok(s) => s,
            Err(e) => return http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        };
        let scope = signal.scope.unwrap_or_else(Scope::everything);
        let reaction = match signal.kind.as_str() {
            "compromise" => self.config.on_signal,
            "alert" => Reaction::Alert,
            other => {
                return http::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("unknown signal type {other:?}"),
                );
            }
        };
        let message = format!(
            "signal ({}): {}",
            signal.kind,
            signal.message.chars().take(500).collect::<String>()
        );
        self.react(AlertKind::Signal, reaction, scope, None, message)
            .await;
        http::json(
            StatusCode::ACCEPTED,
            &json!({ "accepted": true, "reaction": format!("{reaction:?}").to_lowercase() }),
        )
    }

    async fn handle_leak(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let items = match parse_leak(body) {
            Ok(i) => i,
            Err(e) => return http::error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        };
        let mut matched = 0;
        for item in &items {
            let fingerprint = self.engine.vault().fingerprint(item.token.as_bytes());
            let hits = match self
                .engine
                .vault()
                .store()
                .versions_by_fingerprint(&fingerprint)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    return http::error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string());
                }
            };
            if hits.is_empty() {
                tracing::info!(token_type = %item.token_type, url = %item.url, "leak report: the token matches no stored value");
                continue;
            }
            matched += 1;
            let mut secrets: Vec<&str> = hits.iter().map(|(name, _, _)| name.as_str()).collect();
            secrets.dedup();
            for secret in secrets {
                let versions: Vec<String> = hits
                    .iter()
                    .filter(|(n, _, _)| n == secret)
                    .map(|(_, v, stage)| format!("{v} ({})", stage.as_str()))
                    .collect();
                self.react(
                    AlertKind::Leak,
                    self.config.on_leak,
                    Scope::secret(secret),
                    Some(secret),
                    format!(
                        "a value of {secret} (version {}) was reported leaked: {} {} ({})",
                        versions.join(", "),
                        item.token_type,
                        item.url,
                        item.source
                    ),
                )
                .await;
            }
        }
        http::json(
            StatusCode::OK,
            &json!({ "reports": items.len(), "matched": matched }),
        )
    }
}

/// The signal listener's HTTP handler.
#[derive(Debug)]
pub struct SignalApi {
    /// The signal handling.
    pub signals: Arc<Signals>,
    /// Where repeated rejections are counted (one audit row per reason and window).
    pub rejections: Arc<crate::rejections::Rejections>,
}

impl Handler for SignalApi {
    type Conn = ();

    fn connect(&self, _peer: Peer, _pidfd: Option<std::os::fd::OwnedFd>, _accepted: f64) {}

    async fn handle(&self, _conn: &(), request: Request<Bytes>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        if request.method() != Method::POST
            || !matches!(path.as_str(), "/v1/signals" | "/v1/signals/leak")
        {
            return http::error(
                StatusCode::NOT_FOUND,
                "unknown",
                "POST /v1/signals or /v1/signals/leak",
            );
        }
        let signals = &self.signals;
        if let Err(why) = signals.verify(&request).await {
            signals
                .metrics
                .signals_rejected
                .fetch_add(1, Ordering::Relaxed);
            if self
                .rejections
                .first("signal.rejected", u32::MAX, None, why, "signals")
            {
                let audit = AuditEvent::new("signals", "signal.rejected")
                    .detail(json!({ "path": path, "reason": why }));
                let _ = signals.engine.vault().store().append_audit(&[audit]).await;
                tracing::warn!(path = %path, reason = why, "rejected a signal");
            }
            return http::error(StatusCode::UNAUTHORIZED, "unauthorized", why);
        }
        let audit = AuditEvent::new("signals", "signal.received").detail(json!({ "path": path }));
        let _ = signals.engine.vault().store().append_audit(&[audit]).await;
        if path == "/v1/signals" {
            signals.handle_signal(request.body()).await
        } else {
            signals.handle_leak(request.body()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_rate_far_above_the_baseline_is_a_spike_once() {
        let mut rate = Rate::default();
        let minute = 60_000;
        // A steady 20 per minute for ten minutes: no spike.
        for m in 0..10 {
            for i in 0..20 {
                assert!(rate.fetched(m * minute + i * 100, 10.0, 60).is_none());
            }
        }
        // Then 300 in a minute: one spike, when the count passes 10 × ~20.
        let spikes: Vec<_> = (0..300)
            .filter_map(|i| rate.fetched(10 * minute + i * 10, 10.0, 60))
            .collect();
        assert_eq!(spikes.len(), 1);
        assert!(spikes[0].0 > 190 && spikes[0].1 > 15.0, "{spikes:?}");
        // A quiet secret with a small burst under the floor is not a spike.
        let mut quiet = Rate::default();
        quiet.fetched(0, 10.0, 60);
        for i in 0..50 {
            assert!(quiet.fetched(minute + i, 10.0, 60).is_none());
        }
    }

    #[test]
    fn a_token_rate_far_above_a_callers_baseline_is_a_spike() {
        let mut rate = Rate::default();
        let minute = 60_000;
        // 2,000 tokens a minute for ten minutes, then 60,000 in one.
        for m in 0..10 {
            for i in 0..4 {
                assert!(rate.add(m * minute + i, 500, 10.0, 20_000).is_none());
            }
        }
        let spikes: Vec<_> = (0..30)
            .filter_map(|i| rate.add(10 * minute + i, 2_000, 10.0, 20_000))
            .collect();
        assert_eq!(spikes.len(), 1, "{spikes:?}");
        assert!(spikes[0].0 > 20_000, "{spikes:?}");
    }

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        let body = br#"{"type":"alert"}"#;
        let tag = crate::crypto::hmac_sha256(b"key", body);
        assert!(crate::crypto::hmac_sha256_verify(b"key", body, &tag));
        assert!(!crate::crypto::hmac_sha256_verify(b"other", body, &tag));
        assert_eq!(crate::crypto::hex(&tag).len(), 64);
    }
}
