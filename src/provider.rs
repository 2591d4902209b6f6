//! Providers: where new credentials come from. The built-in `random` (a generated value, no
//! upstream) and `manual` (values arrive by `keywarden put`), and every kind a plugin serves.

use std::sync::Arc;

use keywarden_plugin_sdk::{KindInfo, Op};

use crate::plugin_host::PluginHost;

/// A credential kind and who serves it.
#[derive(Debug, Clone)]
pub enum Provider {
    /// Generates a value from the secret's `generate` policy; nothing upstream.
    Random,
    /// A person supplies values with `keywarden put`; keywarden cannot rotate it.
    Manual,
    /// A plugin kind.
    Plugin {
        /// The plugin serving it.
        host: Arc<PluginHost>,
        /// The kind's name.
        kind: String,
        /// What the kind supports.
        info: KindInfo,
    },
}

impl Provider {
    /// Whether the provider supports `op`.
    pub fn can(&self, op: Op) -> bool {
        match self {
            Provider::Random => op == Op::Create,
            Provider::Manual => false,
            Provider::Plugin { info, .. } => info.supports(op),
        }
    }

    /// Whether old and new credentials may be valid at the same time.
    pub fn overlaps(&self) -> bool {
        match self {
            Provider::Plugin { info, .. } => info.overlaps(),
            _ => true,
        }
    }

    /// The kind name, as configured.
    pub fn kind(&self) -> &str {
        match self {
            Provider::Random => "random",
            Provider::Manual => "manual",
            Provider::Plugin { kind, .. } => kind,
        }
    }
}
