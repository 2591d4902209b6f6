//! The catalog: every configured plugin started (handshake included), and the providers,
//! consumers and secrets of the config resolved against them, every reference checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StartError;
use crate::config::{BUILTIN_PROVIDERS, Config, ConsumerConfig, SecretConfig};
use crate::consumer::{Consumer, FileConsumer, Template, resolve_id};
use crate::plugin_host::{PluginHost, PluginSpec, Redactor};
use crate::provider::Provider;
use crate::rotation::catalog::{Catalog, SecretSpec};
use crate::sandbox::{Confinement, Role};

/// Where plugins get their private working directories: one directory per store, so a daemon
/// that reaps the plugins its predecessor left never touches another store's. By default beside
/// the store's file; for a store in PostgreSQL (whose "path" is its address), in the default
/// store's directory.
pub fn work_dir(config: &Config, store_path: &Path) -> PathBuf {
    let base = match &config.daemon.work_dir {
        Some(dir) => dir.clone(),
        None if config.store.url.is_some() => crate::config::default_store_path()
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .join("plugin-work"),
        None => store_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("plugin-work"),
    };
    let store = store_path
        .canonicalize()
        .unwrap_or_else(|_| store_path.to_path_buf());
    let digest = crate::crypto::hex(&crate::crypto::sha256(store.as_os_str().as_encoded_bytes()));
    base.join(format!("store-{}", &digest[..16]))
}

/// The uids confined programs run as (when the daemon is root), other than root and the
/// daemon's own: the daemon's sockets refuse them.
pub fn confined_uids(config: &Config) -> HashSet<u32> {
    let me = rustix::process::getuid().as_raw();
    // Only what actually runs: a consumer without `after`, or no alert command, confines nothing.
    let sandboxes = (config.plugins.values().map(|p| (&p.sandbox, Role::Plugin)))
        .chain(
            config
                .consumers
                .values()
                .filter(|c| !c.after.is_empty())
                .map(|c| (&c.after_sandbox, Role::Command)),
        )
        .chain(
            (!config.signals.alert_command.is_empty())
                .then_some((&config.signals.alert_sandbox, Role::Command)),
        );
    sandboxes
        .filter_map(|(sandbox, role)| sandbox.resolve(&config.daemon.plugin_user, role).ok())
        .filter_map(|c| c.user.map(|u| u.uid))
        .filter(|uid| *uid != 0 && *uid != me)
        .collect()
}

/// Starts every configured plugin (handshake included) and builds the catalog of providers,
/// secrets and consumers, checking every reference.
pub async fn build_catalog(config: &Config, store_path: &Path) -> Result<Catalog, StartError> {
    let mut catalog = Catalog::default();
    catalog.providers.insert("random".into(), Provider::Random);
    catalog.providers.insert("manual".into(), Provider::Manual);
    start_plugins(config, &work_dir(config, store_path), &mut catalog).await?;
    for (name, c) in &config.consumers {
        let consumer = consumer(config, name, c, &catalog)?;
        catalog.consumers.insert(name.clone(), consumer);
    }
    for (name, s) in &config.secrets {
        if !catalog.providers.contains_key(&s.provider) {
            let known: Vec<&String> = catalog.providers.keys().collect();
            return Err(config
                .invalid(
                    "secrets",
                    name,
                    "provider",
                    format!("no provider {:?}; known: {known:?}", s.provider),
                )
                .into());
        }
        catalog
            .secrets
            .insert(name.clone(), secret_spec(config, name, s));
    }
    for (consumer, secrets) in shared_file_consumers(config) {
        tracing::warn!(
            consumer,
            ?secrets,
            "several secrets list this file consumer: its file holds whichever was delivered last; give each secret a file of its own"
        );
        catalog.shared_files.insert(consumer);
    }
    Ok(catalog)
}

/// File consumers that more than one secret lists, with those secrets.
fn shared_file_consumers(config: &Config) -> BTreeMap<String, Vec<String>> {
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, secret) in &config.secrets {
        for consumer in &secret.consumers {
            if config
                .consumers
                .get(consumer)
                .is_some_and(|c| c.kind == "file")
            {
                users
                    .entry(consumer.clone())
                    .or_default()
                    .push(name.clone());
            }
        }
    }
    users.retain(|_, secrets| secrets.len() > 1);
    users
}

/// Starts each plugin and registers the kinds it serves (no kind twice, none built in).
async fn start_plugins(
    config: &Config,
    work: &Path,
    catalog: &mut Catalog,
) -> Result<(), StartError> {
    let redactor = Arc::new(Redactor::default());
    let mut owners: HashMap<String, String> = HashMap::new();
    for (name, plugin) in &config.plugins {
        let confinement = plugin
            .sandbox
            .resolve(&config.daemon.plugin_user, Role::Plugin)
            .map_err(|e| config.invalid("plugins", name, "sandbox", e.to_string()))?;
        let spec = PluginSpec {
            name: name.clone(),
            command: plugin.command.clone(),
            sha256: plugin.sha256.clone(),
            env: plugin.env.clone(),
            timeout: plugin.timeout.unwrap_or(config.daemon.plugin_timeout),
            max_concurrency: plugin.max_concurrency,
            work_dir: work.to_path_buf(),
            confinement,
        };
        let host = Arc::new(PluginHost::new(spec, redactor.clone()));
        let hello = host.start().await?;
        for (kind, info) in hello.kinds {
            if BUILTIN_PROVIDERS.contains(&kind.as_str()) || kind == "file" {
                return Err(config
                    .invalid(
                        "plugins",
                        name,
                        "",
                        format!("it claims the built-in kind {kind:?}"),
                    )
                    .into());
            }
            if let Some(first) = owners.insert(kind.clone(), name.clone()) {
                return Err(StartError::DuplicateKind {
                    kind,
                    first,
                    second: name.clone(),
                });
            }
            catalog.providers.insert(
                kind.clone(),
                Provider::Plugin {
                    host: host.clone(),
                    kind,
                    info,
                },
            );
        }
        catalog.plugins.push(host);
    }
    Ok(())
}

/// A consumer: the built-in file consumer, or a plugin kind that can push.
fn consumer(
    config: &Config,
    name: &str,
    c: &ConsumerConfig,
    catalog: &Catalog,
) -> Result<Consumer, StartError> {
    if c.kind == "file" {
        let id = |key, value: Option<&String>, table| {
            value
                .map(|v| resolve_id(v, table))
                .transpose()
                .map_err(|e| config.invalid("consumers", name, key, e.to_string()))
        };
        return Ok(Consumer::File(FileConsumer {
            path: c.path.clone().expect("checked at parse"),
            mode: c.mode.unwrap_or(0o600),
            owner: id("owner", c.owner.as_ref(), "/etc/passwd")?,
            group: id("group", c.group.as_ref(), "/etc/group")?,
            template: c.template.clone().unwrap_or_else(Template::value_only),
            after: c.after.clone(),
            after_timeout: c.after_timeout,
            after_confinement: if c.after.is_empty() {
                Confinement::default()
            } else {
                c.after_sandbox
                    .resolve(&config.daemon.plugin_user, Role::Command)
                    .map_err(|e| {
                        config.invalid("consumers", name, "after_sandbox", e.to_string())
                    })?
            },
        }));
    }
    match catalog.providers.get(&c.kind) {
        Some(Provider::Plugin { host, kind, info })
            if info.supports(keywarden_plugin_sdk::Op::Push) =>
        {
            Ok(Consumer::Plugin {
                host: host.clone(),
                kind: kind.clone(),
                settings: c.settings.clone(),
                credentials: c.credentials.clone(),
            })
        }
        Some(_) => Err(config
            .invalid(
                "consumers",
                name,
                "kind",
                format!("kind {:?} does not support push", c.kind),
            )
            .into()),
        None => Err(config
            .invalid(
                "consumers",
                name,
                "kind",
                format!(
                    "no plugin serves kind {:?} (and it is not \"file\")",
                    c.kind
                ),
            )
            .into()),
    }
}

/// A declared secret as the engine manages it, with the daemon's defaults filled in.
fn secret_spec(config: &Config, name: &str, s: &SecretConfig) -> SecretSpec {
    SecretSpec {
        name: name.to_string(),
        provider: s.provider.clone(),
        credentials: s.credentials.clone(),
        settings: s.settings.clone(),
        grace: s.grace,
        tags: s.tags.clone(),
        consumers: s.consumers.clone(),
        max_attempts: s.max_attempts.unwrap_or(config.daemon.max_attempts),
        generate: s.generate,
        schedule: config.schedule_of(s),
        canary: s.canary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_consumer_several_secrets_list_is_found_and_a_plugin_consumer_is_not() {
        let config = Config::parse(
            r#"
[secrets."a"]
provider = "random"
consumers = ["shared-file", "own-file", "mirror"]
[secrets."b"]
provider = "random"
consumers = ["shared-file", "mirror"]
[consumers.shared-file]
kind = "file"
path = "shared.env"
[consumers.own-file]
kind = "file"
path = "a.env"
[consumers.mirror]
kind = "example"
"#,
            Path::new("k.toml"),
        )
        .unwrap();
        assert_eq!(
            shared_file_consumers(&config),
            BTreeMap::from([(
                "shared-file".to_string(),
                vec!["a".to_string(), "b".to_string()]
            )])
        );
    }
}
