//! The catalog: every secret, consumer, provider and plugin the engine can reach, resolved
//! from the config at start (see `crate::daemon`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::consumer::Consumer;
use crate::generate::GeneratePolicy;
use crate::plugin_host::PluginHost;
use crate::plugin_host::Settings;
use crate::provider::Provider;
use crate::rotation::scheduler::Schedule;

/// A secret as the engine manages it (from `[secrets."NAME"]`).
#[derive(Debug, Clone)]
pub struct SecretSpec {
    /// Its name.
    pub name: String,
    /// Its provider kind.
    pub provider: String,
    /// Other secrets its plugin may see, by role.
    pub credentials: BTreeMap<String, String>,
    /// Settings sent to its plugin.
    pub settings: Settings,
    /// Longest the old version stays valid while leases drain.
    pub grace: Duration,
    /// Labels.
    pub tags: Vec<String>,
    /// Consumers of each new version.
    pub consumers: Vec<String>,
    /// Failed attempts before quarantine.
    pub max_attempts: u32,
    /// How proposed values are generated.
    pub generate: GeneratePolicy,
    /// Its schedule, if it rotates automatically.
    pub schedule: Option<Schedule>,
    /// A canary: any fetch is a compromise signal.
    pub canary: bool,
}

/// Everything the engine can reach: secrets, consumers, providers and plugins.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Declared secrets by name.
    pub secrets: BTreeMap<String, SecretSpec>,
    /// Declared consumers by name.
    pub consumers: BTreeMap<String, Consumer>,
    /// File consumers that several secrets list: their file holds whichever secret was
    /// delivered last, so start-up does not check it against any one of them.
    pub shared_files: HashSet<String>,
    /// Providers by kind.
    pub providers: HashMap<String, Provider>,
    /// Every plugin host.
    pub plugins: Vec<Arc<PluginHost>>,
}
