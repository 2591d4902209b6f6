//! The configuration file: one TOML document, typed, unknown keys rejected.
//!
//! Every default is written once, here. Relative paths are resolved against the directory of
//! the config file, so a config means the same thing whatever the working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::crypto::KdfParams;

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
    /// No store path is configured and no home directory is known.
    #[error("no store path: pass --store, set [store] path in the config, or set HOME")]
    NoStorePath,
}

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[store]`
    #[serde(default)]
    pub store: StoreConfig,
    /// The directory of the config file, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[store]`: where the vault lives and how its passphrase is stretched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file. Default: `$XDG_DATA_HOME/keywarden/vault.db`, else
    /// `~/.local/share/keywarden/vault.db`.
    pub path: Option<PathBuf>,
    /// Argon2id parameters for `init` and `passwd` (RFC 9106's second recommendation by default).
    #[serde(default)]
    pub kdf: KdfParams,
}

impl Config {
    /// Parses a config document; `path` is used in messages and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.base_dir = path.parent().map(Path::to_path_buf);
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match &self.base_dir {
            Some(base) if path.is_relative() => base.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The store path: the `--store` override, else `[store] path`, else the default.
    pub fn store_path(&self, cli_override: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(path) = cli_override {
            return Ok(path.to_path_buf());
        }
        if let Some(path) = &self.store.path {
            return Ok(self.resolve(path));
        }
        default_store_path().ok_or(ConfigError::NoStorePath)
    }
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
        let c = Config::parse(
            "[store.kdf]\nmemory_kib = 8\niterations = 1\nparallelism = 1\n",
            Path::new("k.toml"),
        )
        .unwrap();
        assert_eq!(c.store.kdf.memory_kib, 8);
    }
}
