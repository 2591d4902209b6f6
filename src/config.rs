//! The configuration file: one TOML document, typed, unknown keys rejected.
//!
//! Every default is written once, here. Relative paths are resolved against the directory of
//! the config file, so a config means the same thing whatever the working directory. Errors name
//! the line and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::broker::{Broker, BrokerConfig};
use crate::consumer::Template;
use crate::crypto::KdfParams;
use crate::generate::GeneratePolicy;
use crate::incident::signals::SignalsConfig;
use crate::parse::{duration, octal_mode, opt_duration, opt_octal_mode};
use crate::plugin_host::Settings;
use crate::policy::PolicyConfig;
use crate::rotation::scheduler::Schedule;
use crate::sandbox::SandboxConfig;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema. The message names the line and key.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line, column and the offending key.
        message: String,
    },
    /// A value parses but makes no sense (a bad cron line, a consumer that does not exist).
    #[error("invalid config file {path}, line {line}, {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line of the table that holds the key.
        line: usize,
        /// The key, dotted (`secrets."openai/prod".schedule`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// No store path is configured and no home directory is known.
    #[error("no store path: pass --store, set [store] path in the config, or set HOME")]
    NoStorePath,
    /// A command that works on a store's file, on a store in PostgreSQL.
    #[error(
        "the store is in PostgreSQL ({0}), not in a file: this command works on a SQLite store; \
         PostgreSQL's own tools (pg_dump, base backups) do its part"
    )]
    NotAFile(String),
}

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[store]`
    #[serde(default)]
    pub store: StoreConfig,
    /// `[daemon]`
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// `[agent]`
    #[serde(default)]
    pub agent: AgentConfig,
    /// `[plugins.NAME]`
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// `[secrets."NAME"]`
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretConfig>,
    /// `[consumers.NAME]`
    #[serde(default)]
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// `[[policy]]`: who may fetch what over the agent socket (deny by default).
    #[serde(default)]
    pub policy: Vec<PolicyConfig>,
    /// `[signals]`: compromise signals, leak reports, canaries, anomalies and alerts.
    #[serde(default)]
    pub signals: SignalsConfig,
    /// `[brokers.NAME]`: provider APIs agents call through keywarden, which adds the key.
    #[serde(default)]
    pub brokers: BTreeMap<String, BrokerConfig>,
    /// The directory of the config file, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
    /// The file it was read from, for messages.
    #[serde(skip)]
    pub source_path: Option<PathBuf>,
    #[serde(skip)]
    source_text: SourceText,
}

/// The config file's text, kept to name lines in messages; `Debug` shows only its length (it
/// may hold a database password in `[store] url`).
#[derive(Default)]
struct SourceText(String);

impl std::fmt::Debug for SourceText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceText({} bytes)", self.0.len())
    }
}

/// `[store]`: where the vault lives and how its passphrase is stretched. `Debug` shows `url`
/// without its password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file. Default: `$XDG_DATA_HOME/keywarden/vault.db`, else
    /// `~/.local/share/keywarden/vault.db`.
    pub path: Option<PathBuf>,
    /// A PostgreSQL database instead of a file (`postgres://user@host:port/db`, with
    /// `?sslmode=verify-full&sslrootcert=…` for TLS; the password best in `PGPASSWORD` or a
    /// systemd credential rather than here). Several daemons may share it: one leads.
    pub url: Option<String>,
    /// How long a leader's lease on a PostgreSQL store lasts without a renewal (a follower
    /// takes over at most about this long after the leader dies). Default 10 s.
    #[serde(deserialize_with = "duration", default = "default_leader_lease")]
    pub leader_lease: Duration,
    /// Argon2id parameters for `init` and `passwd` (RFC 9106's second recommendation by default;
    /// never below [`KDF_FLOOR`] unless `weak_kdf_for_tests` says so).
    #[serde(default)]
    pub kdf: KdfParams,
    /// Allows KDF parameters below the floor: for tests and benchmarks only, where a real
    /// Argon2id cost would dominate every run.
    #[serde(default)]
    pub weak_kdf_for_tests: bool,
}

fn default_leader_lease() -> Duration {
    Duration::from_secs(10)
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field(
                "url",
                &self
                    .url
                    .as_ref()
                    .map(|u| crate::store::Location::Postgres(u.clone()).to_string()),
            )
            .field("leader_lease", &self.leader_lease)
            .field("kdf", &self.kdf)
            .field("weak_kdf_for_tests", &self.weak_kdf_for_tests)
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            url: None,
            leader_lease: default_leader_lease(),
            kdf: KdfParams::default(),
            weak_kdf_for_tests: false,
        }
    }
}

/// The least Argon2id cost accepted for a passphrase (OWASP's minimum: 19 MiB, 2 passes).
pub const KDF_FLOOR: KdfParams = KdfParams {
    memory_kib: 19 * 1024,
    iterations: 2,
    parallelism: 1,
};

/// `[daemon]`: the rotation engine's limits and timings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Rotations in flight at once, across all secrets.
    pub max_concurrent_rotations: usize,
    /// First retry delay of a failed step; doubles per attempt, with jitter.
    #[serde(deserialize_with = "duration")]
    pub retry_base: Duration,
    /// Longest retry delay.
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// Failed attempts before a secret is quarantined (per secret: `max_attempts`).
    pub max_attempts: u32,
    /// How long a plugin may take to answer one request (per plugin: `timeout`).
    #[serde(deserialize_with = "duration")]
    pub plugin_timeout: Duration,
    /// How long `serve` waits for steps in flight when asked to stop.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long `serve` waits at start for commands that hold the store (a daemon-less
    /// `rotate`, a `put`) to finish.
    #[serde(deserialize_with = "duration")]
    pub lock_wait: Duration,
    /// Where plugins get their private working directories (default: beside the store).
    pub work_dir: Option<PathBuf>,
    /// The user plugins, `after` commands and the alert command run as when the daemon runs
    /// as root (a name or `UID:GID`); each may name its own in its `sandbox`.
    pub plugin_user: String,
    /// The `keywarden-broker` executable (default: beside `keywarden`).
    pub broker: Option<PathBuf>,
    /// Its SHA-256 (default: what the file hashes to when the daemon starts).
    pub broker_sha256: Option<String>,
    /// What the broker process may do beyond the defaults (its user, a private CA's path).
    pub broker_sandbox: SandboxConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_concurrent_rotations: 8,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            max_attempts: 5,
            plugin_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            lock_wait: Duration::from_secs(30),
            work_dir: None,
            plugin_user: "keywarden-plugin".into(),
            broker: None,
            broker_sha256: None,
            broker_sandbox: SandboxConfig::default(),
        }
    }
}

/// `[agent]`: the sockets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent socket.
    pub socket: PathBuf,
    /// Its mode, octal.
    #[serde(deserialize_with = "octal_mode")]
    pub socket_mode: u32,
    /// The admin socket (0600; 0666 when `admin_uids` are set, the API checking the uid).
    pub admin_socket: PathBuf,
    /// Uids allowed on the admin socket besides the daemon's own (root always is); others
    /// that connect get 403. They may rotate, run and close incidents, acknowledge alerts and
    /// read status; reading or writing values and the passphrase stays with root and the
    /// daemon's own user.
    pub admin_uids: Vec<u32>,
    /// Lease length when a request names none.
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// Connections served at once on each socket.
    pub max_connections: usize,
    /// Connections one uid may hold at once on each socket; more are closed at once.
    pub max_connections_per_uid: usize,
    /// Watches (`wait=`) one uid may have open at once; more get 429.
    pub max_watches_per_uid: usize,
    /// Time a client has to send a request body once its head arrived (slow clients get 408).
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Fetches per second allowed to one uid (0: no limit); more get 429.
    pub max_fetches_per_second: u32,
    /// Live leases one uid may hold at once; a fetch beyond it gets 429.
    pub max_leases_per_uid: usize,
    /// Longest a watch (`wait=`) may wait.
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Time a client has to send a complete request head (slow clients are cut off).
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// The broker socket (`/v1/broker/{name}/…`), when `[brokers]` are configured; its mode
    /// is `socket_mode`.
    pub broker_socket: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from("/run/keywarden/agent.sock"),
            socket_mode: 0o660,
            admin_socket: PathBuf::from("/run/keywarden/admin.sock"),
            admin_uids: Vec::new(),
            default_ttl: Duration::from_secs(300),
            max_connections: 256,
            max_connections_per_uid: 128,
            max_watches_per_uid: 64,
            body_timeout: Duration::from_secs(10),
            max_fetches_per_second: 0,
            max_leases_per_uid: 100_000,
            max_wait: Duration::from_secs(300),
            header_timeout: Duration::from_secs(5),
            broker_socket: PathBuf::from("/run/keywarden/broker.sock"),
        }
    }
}

/// `[plugins.NAME]`: a plugin executable, pinned by hash.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The executable and its arguments; `command[0]` is the pinned file.
    pub command: Vec<String>,
    /// SHA-256 of `command[0]`, hex.
    pub sha256: String,
    /// Environment the plugin gets (besides `PATH` and `LANG=C`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per-request timeout (default `[daemon] plugin_timeout`).
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Requests in flight to this plugin at once (default 64: above an incident's default
    /// concurrency, so a `rotate-all` is not silently bound by it).
    #[serde(default = "default_plugin_concurrency")]
    pub max_concurrency: usize,
    /// What the confined plugin may do beyond the defaults (read a CA file, ...).
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

fn default_plugin_concurrency() -> usize {
    64
}

/// `[secrets."NAME"]`: a secret keywarden manages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// A kind from a plugin, or `random` / `manual`.
    pub provider: String,
    /// Other secrets this one's plugin may see, by role (`admin = "aws/rotator"`).
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
    /// Settings for the plugin.
    #[serde(default)]
    pub settings: Settings,
    /// A 6-field cron line (sec min hour day month weekday), UTC.
    pub schedule: Option<String>,
    /// Or: rotate this long after the last rotation.
    #[serde(default, deserialize_with = "opt_duration")]
    pub rotate_every: Option<Duration>,
    /// Random delay added to each scheduled time, up to this much.
    #[serde(default, deserialize_with = "opt_duration")]
    pub jitter: Option<Duration>,
    /// Longest the old version stays valid after promotion while leases drain.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub grace: Duration,
    /// Labels for scoping (`rotate-all --tag`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Consumers that receive each new version.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Failed attempts before quarantine (default `[daemon] max_attempts`).
    pub max_attempts: Option<u32>,
    /// How proposed (and `random`) values are generated.
    #[serde(default)]
    pub generate: GeneratePolicy,
    /// A canary: no one legitimate fetches it, so any fetch is a compromise signal.
    #[serde(default)]
    pub canary: bool,
}

fn default_grace() -> Duration {
    Duration::from_secs(3600)
}

/// `[consumers.NAME]`: where new versions are delivered.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// `file`, or a plugin kind that supports `push`.
    pub kind: String,
    /// file: the path written.
    pub path: Option<PathBuf>,
    /// file: its mode, octal (default 0600).
    #[serde(default, deserialize_with = "opt_octal_mode")]
    pub mode: Option<u32>,
    /// file: owner (user name or uid).
    pub owner: Option<String>,
    /// file: group (group name or gid).
    pub group: Option<String>,
    /// file: the content, over `{{value}}`, `{{version}}`, `{{name}}`, `{{meta.KEY}}` (parsed
    /// while the file is read).
    pub template: Option<Template>,
    /// file: a command run after each write.
    #[serde(default)]
    pub after: Vec<String>,
    /// file: how long `after` may run.
    #[serde(default = "default_after_timeout", deserialize_with = "duration")]
    pub after_timeout: Duration,
    /// file: what the confined `after` command may do beyond the defaults.
    #[serde(default)]
    pub after_sandbox: SandboxConfig,
    /// plugin: settings sent with `push`.
    #[serde(default)]
    pub settings: Settings,
    /// plugin: other secrets the push may use, by role.
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
}

fn default_after_timeout() -> Duration {
    Duration::from_secs(30)
}

/// One step into the parsed document, to find a line: a key of a table, or an element of an
/// array of tables.
#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The names the built-in providers answer to.
pub const BUILTIN_PROVIDERS: [&str; 2] = ["random", "manual"];

impl Config {
    /// Parses a config document; `path` is used in messages and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.base_dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        config.source_path = Some(path.to_path_buf());
        config.source_text = SourceText(text.to_string());
        config.validate()?;
        config.resolve_paths();
        Ok(config)
    }

    /// Makes every path in the config absolute, against the config file's directory.
    fn resolve_paths(&mut self) {
        let resolve = |p: &mut PathBuf, base: &Option<PathBuf>| {
            if let Some(base) = base.as_ref().filter(|_| p.is_relative()) {
                *p = base.join(&*p);
            }
        };
        let base = self.base_dir.clone();
        if let Some(p) = self.store.path.as_mut() {
            resolve(p, &base);
        }
        resolve(&mut self.agent.socket, &base);
        resolve(&mut self.agent.admin_socket, &base);
        resolve(&mut self.agent.broker_socket, &base);
        if let Some(p) = self.daemon.work_dir.as_mut() {
            resolve(p, &base);
        }
        if let Some(base) = base.as_deref() {
            for plugin in self.plugins.values_mut() {
                plugin.sandbox.resolve_paths(base);
            }
            for consumer in self.consumers.values_mut() {
                consumer.after_sandbox.resolve_paths(base);
            }
            self.signals.alert_sandbox.resolve_paths(base);
            self.daemon.broker_sandbox.resolve_paths(base);
            if let Some(tls) = self.signals.tls.as_mut() {
                for p in [&mut tls.cert, &mut tls.key] {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
        }
        for plugin in self.plugins.values_mut() {
            if plugin.command[0].contains('/') {
                let mut p = PathBuf::from(&plugin.command[0]);
                resolve(&mut p, &base);
                plugin.command[0] = p.display().to_string();
            }
        }
        for consumer in self.consumers.values_mut() {
            if let Some(p) = consumer.path.as_mut() {
                resolve(p, &base);
            }
        }
        for broker in self.brokers.values_mut() {
            if let Some(p) = broker.ca_file.as_mut() {
                resolve(p, &base);
            }
        }
        if let Some(p) = self.daemon.broker.as_mut() {
            resolve(p, &base);
        }
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Where the store is: the `--store` override (a file), else `[store] url` (PostgreSQL),
    /// else the file of [`Config::store_path`].
    pub fn store_location(
        &self,
        cli_override: Option<&Path>,
    ) -> Result<crate::store::Location, ConfigError> {
        match (&self.store.url, cli_override) {
            (Some(url), None) => Ok(crate::store::Location::Postgres(url.clone())),
            _ => Ok(crate::store::Location::File(self.store_path(cli_override)?)),
        }
    }

    /// The store's file: the `--store` override, else `[store] path`, else the default. With
    /// `[store] url` and no override there is none ([`ConfigError::NotAFile`]).
    pub fn store_path(&self, cli_override: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(path) = cli_override {
            return Ok(path.to_path_buf());
        }
        if let Some(url) = &self.store.url {
            return Err(ConfigError::NotAFile(
                crate::store::Location::Postgres(url.clone()).to_string(),
            ));
        }
        if let Some(path) = &self.store.path {
            return Ok(path.clone());
        }
        default_store_path().ok_or(ConfigError::NoStorePath)
    }

    /// The line of `key` in the table `[section.name]` (or of the table itself when the key is
    /// not written there), from the parsed document's spans.
    pub fn line_of(&self, section: &str, name: &str, key: &str) -> usize {
        let mut path = vec![Step::Key(section), Step::Key(name)];
        path.extend(key.split('.').filter(|k| !k.is_empty()).map(Step::Key));
        self.line_at(&path)
    }

    /// The line where the deepest element of `path` that the document has starts (1 when the
    /// document has none of it).
    fn line_at(&self, path: &[Step<'_>]) -> usize {
        let Ok(doc) = toml::de::DeTable::parse(&self.source_text.0) else {
            return 1;
        };
        let mut start = 0;
        let mut value = Some(doc.get_ref());
        let mut array = None;
        for step in path {
            let found = match (step, value, array) {
                (Step::Key(k), Some(table), _) => table
                    .iter()
                    .find(|(key, _)| key.get_ref().as_ref() == *k)
                    .map(|(key, v)| (key.span().start, v.get_ref())),
                (Step::Index(i), _, Some(items)) => {
                    let items: &toml::de::DeArray<'_> = items;
                    items.get(*i).map(|v| (v.span().start, v.get_ref()))
                }
                _ => None,
            };
            let Some((at, next)) = found else { break };
            start = at;
            (value, array) = match next {
                toml::de::DeValue::Table(t) => (Some(t), None),
                toml::de::DeValue::Array(a) => (None, Some(a)),
                _ => (None, None),
            };
        }
        self.source_text.0[..start].matches('\n').count() + 1
    }

    /// An [`ConfigError::Invalid`] for `key` of the table `[section.name]`.
    pub fn invalid(&self, section: &str, name: &str, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source_path.clone().unwrap_or_default(),
            line: self.line_of(section, name, key),
            key: if key.is_empty() {
                format!("{section}.\"{name}\"")
            } else {
                format!("{section}.\"{name}\".{key}")
            },
            message,
        }
    }

    /// Checks what deserializing cannot: values that must agree with each other, and every
    /// reference between sections.
    fn validate(&self) -> Result<(), ConfigError> {
        let kdf = self.store.kdf;
        if !self.store.weak_kdf_for_tests
            && (kdf.memory_kib < KDF_FLOOR.memory_kib || kdf.iterations < KDF_FLOOR.iterations)
        {
            return Err(ConfigError::Invalid {
                path: self.source_path.clone().unwrap_or_default(),
                line: self.line_at(&[Step::Key("store"), Step::Key("kdf")]),
                key: "store.kdf".into(),
                message: format!(
                    "memory_kib = {}, iterations = {} is below the floor of {} KiB and {} passes: \
                     an offline guess at the passphrase would be too cheap (tests may set \
                     [store] weak_kdf_for_tests = true)",
                    kdf.memory_kib, kdf.iterations, KDF_FLOOR.memory_kib, KDF_FLOOR.iterations
                ),
            });
        }
        if let Some(url) = &self.store.url {
            let invalid = |message: String| ConfigError::Invalid {
                path: self.source_path.clone().unwrap_or_default(),
                line: self.line_at(&[Step::Key("store"), Step::Key("url")]),
                key: "store.url".into(),
                message,
            };
            if self.store.path.is_some() {
                return Err(invalid(
                    "[store] path and url are both set: a store is a file or a PostgreSQL \
                     database, not both"
                        .into(),
                ));
            }
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid("must be a postgres:// address".into()));
            }
            if let Err(e) = url.parse::<sqlx::postgres::PgConnectOptions>() {
                // sqlx's message names the part that does not parse, never the password.
                return Err(invalid(format!("does not parse: {e}")));
            }
        }
        if self.store.leader_lease < Duration::from_millis(600) {
            return Err(ConfigError::Invalid {
                path: self.source_path.clone().unwrap_or_default(),
                line: self.line_at(&[Step::Key("store"), Step::Key("leader_lease")]),
                key: "store.leader_lease".into(),
                message: "must be at least 600ms (a leader renews six times per lease)".into(),
            });
        }
        self.validate_plugins()?;
        self.validate_secrets()?;
        self.validate_consumers()?;
        self.validate_signals()?;
        for (i, policy) in self.policy.iter().enumerate() {
            crate::policy::check(policy)
                .map_err(|(key, message)| self.invalid_policy(i, key, message))?;
            if let Some(b) = policy
                .brokers
                .iter()
                .find(|b| !self.brokers.contains_key(*b))
            {
                return Err(self.invalid_policy(
                    i,
                    "brokers",
                    format!("no broker {b:?} is configured ([brokers.{b}])"),
                ));
            }
        }
        self.compile_brokers()?;
        Ok(())
    }

    /// The `[brokers]`, checked and resolved.
    pub fn compile_brokers(&self) -> Result<BTreeMap<String, Broker>, ConfigError> {
        let mut brokers = BTreeMap::new();
        for (name, c) in &self.brokers {
            let b = crate::broker::compile(name, c, |s| self.secrets.contains_key(s))
                .map_err(|(key, message)| self.invalid("brokers", name, key, message))?;
            brokers.insert(name.clone(), b);
        }
        Ok(brokers)
    }

    /// `[plugins.NAME]`: a command, a well-formed pin, a positive concurrency.
    fn validate_plugins(&self) -> Result<(), ConfigError> {
        for (name, plugin) in &self.plugins {
            if plugin.command.is_empty() {
                return Err(self.invalid(
                    "plugins",
                    name,
                    "command",
                    "must name the executable".into(),
                ));
            }
            if !plugin.command[0].contains('/') {
                return Err(self.invalid(
                    "plugins",
                    name,
                    "command",
                    format!(
                        "command[0] must be the plugin file's path (absolute, or relative to this \
                         config file), not {:?}: a name looked up in PATH is not the file whose \
                         hash was checked",
                        plugin.command[0]
                    ),
                ));
            }
            if crate::crypto::from_hex(&plugin.sha256).is_none_or(|h| h.len() != 32) {
                return Err(self.invalid(
                    "plugins",
                    name,
                    "sha256",
                    "must be 64 hex digits; `keywarden plugin pin PATH` prints it".into(),
                ));
            }
            if plugin.max_concurrency == 0 {
                return Err(self.invalid(
                    "plugins",
                    name,
                    "max_concurrency",
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }

    /// `[secrets."NAME"]`: names, one schedule, known consumers, credentials and limits.
    fn validate_secrets(&self) -> Result<(), ConfigError> {
        for (name, secret) in &self.secrets {
            crate::name::validate(name)
                .map_err(|e| self.invalid("secrets", name, "", e.to_string()))?;
            if secret.schedule.is_some() && secret.rotate_every.is_some() {
                return Err(self.invalid(
                    "secrets",
                    name,
                    "schedule",
                    "set either schedule or rotate_every, not both".into(),
                ));
            }
            if let Some(line) = &secret.schedule {
                Schedule::cron(line)
                    .map_err(|e| self.invalid("secrets", name, "schedule", e.to_string()))?;
            }
            if secret
                .rotate_every
                .is_some_and(|d| d < Duration::from_secs(1))
            {
                return Err(self.invalid(
                    "secrets",
                    name,
                    "rotate_every",
                    "must be at least 1s".into(),
                ));
            }
            for consumer in &secret.consumers {
                if !self.consumers.contains_key(consumer) {
                    return Err(self.invalid(
                        "secrets",
                        name,
                        "consumers",
                        format!("no consumer named {consumer:?} is declared under [consumers]"),
                    ));
                }
            }
            for (role, other) in &secret.credentials {
                crate::name::validate(other).map_err(|e| {
                    self.invalid(
                        "secrets",
                        name,
                        &format!("credentials.{role}"),
                        e.to_string(),
                    )
                })?;
            }
            secret
                .generate
                .check()
                .map_err(|e| self.invalid("secrets", name, "generate", e.to_string()))?;
            if secret.max_attempts == Some(0) {
                return Err(self.invalid(
                    "secrets",
                    name,
                    "max_attempts",
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }

    /// `[consumers.NAME]`: a file consumer's path and template; no file keys on plugin kinds.
    fn validate_consumers(&self) -> Result<(), ConfigError> {
        for (name, consumer) in &self.consumers {
            if consumer.kind == "file" {
                if consumer.path.is_none() {
                    return Err(self.invalid(
                        "consumers",
                        name,
                        "path",
                        "a file consumer needs a path".into(),
                    ));
                }
            } else if consumer.path.is_some()
                || consumer.template.is_some()
                || !consumer.after.is_empty()
            {
                return Err(self.invalid(
                    "consumers",
                    name,
                    "kind",
                    format!(
                        "path, template and after apply to kind = \"file\", not {:?}",
                        consumer.kind
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[signals]`: a listener needs its key; the alert consumer exists; sane anomaly limits.
    fn validate_signals(&self) -> Result<(), ConfigError> {
        let signals = &self.signals;
        if let Some(listen) = &signals.listen {
            match listen.parse::<std::net::SocketAddr>() {
                Err(_) => {
                    return Err(self.invalid_signals(
                        "listen",
                        format!("{listen:?} is not an address such as \"127.0.0.1:8787\""),
                    ));
                }
                Ok(address) if !address.ip().is_loopback() && signals.tls.is_none() => {
                    return Err(self.invalid_signals(
                        "listen",
                        format!(
                            "{listen:?} is not a loopback address: without `tls` the listener \
                             speaks plain HTTP, so it listens on 127.0.0.1 or [::1] only (set \
                             `tls = {{ cert = \"…\", key = \"…\" }}` to take signals from \
                             elsewhere)"
                        ),
                    ));
                }
                Ok(_) => {}
            }
            if signals.hmac_secret.is_none() {
                return Err(self.invalid_signals(
                    "hmac_secret",
                    "the listener needs the secret that holds its HMAC key".into(),
                ));
            }
        }
        if let Some(name) = &signals.hmac_secret {
            crate::name::validate(name)
                .map_err(|e| self.invalid_signals("hmac_secret", e.to_string()))?;
        }
        if let Some(consumer) = &signals.alert_consumer {
            if !self.consumers.contains_key(consumer) {
                return Err(self
                    .invalid_signals("alert_consumer", format!("no consumer named {consumer:?}")));
            }
        }
        if signals.anomaly_rate_factor < 1.0 {
            return Err(self.invalid_signals("anomaly_rate_factor", "must be at least 1".into()));
        }
        Ok(())
    }

    fn invalid_policy(&self, index: usize, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source_path.clone().unwrap_or_default(),
            line: self.line_at(&[Step::Key("policy"), Step::Index(index), Step::Key(key)]),
            key: format!("policy[{index}].{key}"),
            message,
        }
    }

    /// An error about `[signals] KEY`, naming its line.
    pub fn invalid_signals(&self, key: &str, message: String) -> ConfigError {
        self.invalid_in("signals", key, message)
    }

    /// An [`ConfigError::Invalid`] for `key` of `[daemon]`.
    pub fn invalid_daemon(&self, key: &str, message: String) -> ConfigError {
        self.invalid_in("daemon", key, message)
    }

    fn invalid_in(&self, section: &str, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source_path.clone().unwrap_or_default(),
            line: self.line_at(&[Step::Key(section), Step::Key(key)]),
            key: format!("{section}.{key}"),
            message,
        }
    }

    /// The schedule of a secret, if it has one.
    pub fn schedule_of(&self, secret: &SecretConfig) -> Option<Schedule> {
        match (&secret.schedule, secret.rotate_every) {
            (Some(line), _) => Schedule::cron(line).ok(),
            (None, Some(every)) => Some(Schedule::Every(every)),
            (None, None) => None,
        }
    }
}

/// The config file used when neither `--config` nor `KEYWARDEN_CONFIG` names one: the first
/// that exists of `/etc/keywarden/keywarden.toml` (the service's) and the user's
/// `$XDG_CONFIG_HOME/keywarden/keywarden.toml` (else `$HOME/.config/keywarden/keywarden.toml`).
pub fn default_config_path() -> Option<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|dir| dir.join("keywarden").join("keywarden.toml"));
    [Some(PathBuf::from("/etc/keywarden/keywarden.toml")), user]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// `$XDG_DATA_HOME/keywarden/vault.db`, else `$HOME/.local/share/keywarden/vault.db`.
pub fn default_store_path() -> Option<PathBuf> {
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data_home.join("keywarden").join("vault.db"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = Config::parse(
            "[store]\npath = \"x.db\"\npaht = 1\n",
            Path::new("/etc/kw.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("paht"), "{err}");
        assert!(err.contains("/etc/kw.toml"), "{err}");
    }

    #[test]
    fn a_database_password_in_the_store_url_shows_in_no_debug_or_display() {
        let c = Config::parse(
            "[store]\nurl = \"postgres://kw:hunter2-db-pass@db:5432/kw\"\n",
            Path::new("/etc/keywarden/keywarden.toml"),
        )
        .unwrap();
        let location = c.store_location(None).unwrap();
        let shown = format!("{c:?} {location:?} {location}");
        assert!(!shown.contains("hunter2-db-pass"), "{shown}");
        assert!(shown.contains("postgres://kw@db:5432/kw"), "{shown}");
    }

    #[test]
    fn relative_store_path_is_resolved_against_the_config_dir() {
        let c = Config::parse(
            "[store]\npath = \"data/v.db\"\n",
            Path::new("/srv/kw/kw.toml"),
        )
        .unwrap();
        assert_eq!(
            c.store_path(None).unwrap(),
            PathBuf::from("/srv/kw/data/v.db")
        );
        assert_eq!(
            c.store_path(Some(Path::new("/tmp/o.db"))).unwrap(),
            PathBuf::from("/tmp/o.db")
        );
    }

    #[test]
    fn kdf_defaults_to_rfc9106_second_option_and_can_be_lowered() {
        let c = Config::parse("", Path::new("k.toml")).unwrap();
        assert_eq!(c.store.kdf, KdfParams::default());
        assert_eq!(
            (
                c.store.kdf.memory_kib,
                c.store.kdf.iterations,
                c.store.kdf.parallelism
            ),
            (65536, 3, 4)
        );
        let weak = "[store.kdf]\nmemory_kib = 8\niterations = 1\nparallelism = 1\n";
        let err = Config::parse(weak, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1, store.kdf") && err.contains("below the floor"),
            "{err}"
        );
        let c = Config::parse(
            &format!("[store]\nweak_kdf_for_tests = true\n{weak}"),
            Path::new("k.toml"),
        )
        .unwrap();
        assert_eq!(c.store.kdf.memory_kib, 8);
    }

    const FULL: &str = r#"
[store]
path = "/var/lib/keywarden/vault.db"

[agent]
socket = "/run/keywarden/agent.sock"
socket_mode = "0660"
admin_socket = "/run/keywarden/admin.sock"
default_ttl = "5m"

[plugins.aws]
command = ["/usr/libexec/keywarden/keywarden-plugin-aws"]
sha256 = "9f2c000000000000000000000000000000000000000000000000000000000000"
env = { AWS_REGION = "eu-west-1" }

[secrets."aws/ci-deployer"]
provider = "aws-iam"
credentials = { admin = "aws/rotator" }
settings = { user_name = "ci-deployer" }
schedule = "0 0 3 * * *"
grace = "1h"
tags = ["prod", "aws"]
consumers = ["deploy-env"]

[consumers.deploy-env]
kind = "file"
path = "/etc/deploy/aws.env"
mode = "0640"
template = "AWS_ACCESS_KEY_ID={{meta.access_key_id}}\nAWS_SECRET_ACCESS_KEY={{value}}\n"
after = ["systemctl", "reload", "deploy-agent"]
"#;

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(FULL, Path::new("/etc/keywarden/keywarden.toml")).unwrap();
        let s = &c.secrets["aws/ci-deployer"];
        assert_eq!(s.provider, "aws-iam");
        assert_eq!(s.grace, Duration::from_secs(3600));
        assert_eq!(s.settings["user_name"], "ci-deployer");
        assert_eq!(c.consumers["deploy-env"].mode, Some(0o640));
        assert_eq!(c.agent.default_ttl, Duration::from_secs(300));
        assert!(matches!(c.schedule_of(s), Some(Schedule::Cron(_))));
    }

    #[test]
    fn semantic_errors_name_the_key_and_line() {
        let bad = FULL.replace("schedule = \"0 0 3 * * *\"", "schedule = \"every tuesday\"");
        let err = Config::parse(&bad, Path::new("kw.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 20"), "{err}");
        assert!(
            err.contains("secrets.\"aws/ci-deployer\".schedule"),
            "{err}"
        );

        let bad = FULL.replace("consumers = [\"deploy-env\"]", "consumers = [\"nope\"]");
        let err = Config::parse(&bad, Path::new("kw.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no consumer named \"nope\""), "{err}");

        let bad = FULL.replace("grace = \"1h\"", "grace = \"soon\"");
        let err = Config::parse(&bad, Path::new("kw.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 21") && err.contains("invalid duration"),
            "{err}"
        );

        let bad = FULL.replace("sha256 = \"9f2c", "sha256 = \"zz2c");
        let err = Config::parse(&bad, Path::new("kw.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugins.\"aws\".sha256"), "{err}");

        let bad = FULL.replace("{{meta.access_key_id}}", "{{meta.}}");
        let err = Config::parse(&bad, Path::new("kw.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("template"), "{err}");
    }

    #[test]
    fn lines_come_from_the_parsed_document() {
        let line = |text: &str| {
            let err = Config::parse(text, Path::new("kw.toml"))
                .unwrap_err()
                .to_string();
            let at = err.find("line ").expect("a line") + 5;
            err[at..]
                .split(',')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        };
        // The second element of an array of tables, at the key that is wrong.
        let policies = "[[policy]]\nname = \"a\"\nsame_user = true\nsecrets = [\"x/*\"]\n\n\
                        [[policy]]\nname = \"b\"\nsame_user = true\n# a comment\nsecrets = []\n";
        assert_eq!(line(policies), 10);
        // A key of [signals], wherever the table starts.
        let signals = "[agent]\ndefault_ttl = \"5m\"\n\n[signals]\nlisten = \"127.0.0.1:1\"\n\
                       hmac_secret = \"s/k\"\nalert_consumer = \"x\"\n";
        assert_eq!(line(signals), 7);
        // A key that is not written: the line of its table.
        let unwritten = "[agent]\ndefault_ttl = \"5m\"\n\n[signals]\nlisten = \"127.0.0.1:1\"\n";
        assert_eq!(line(unwritten), 4);
        // A dotted key inside an inline table.
        let credentials = "[secrets.\"a/b\"]\nprovider = \"manual\"\n\
                           credentials = { admin = \"not a name!\" }\n";
        assert_eq!(line(credentials), 3);
    }
}
