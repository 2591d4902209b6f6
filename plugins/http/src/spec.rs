//! Settings of an `http` secret: request templates per operation, the hosts they may reach,
//! and presets shipped as data (`presets/*.toml`) that fill in the templates of well-known
//! providers. The secret's own settings override a preset's, key by key.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The presets shipped with the plugin, by name.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "openai-service-account",
        include_str!("../presets/openai-service-account.toml"),
    ),
    (
        "cloudflare-token",
        include_str!("../presets/cloudflare-token.toml"),
    ),
    (
        "anthropic-admin-deactivate",
        include_str!("../presets/anthropic-admin-deactivate.toml"),
    ),
    ("bearer-token", include_str!("../presets/bearer-token.toml")),
];

/// One HTTP request and what to make of its answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSpec {
    /// GET, POST, PUT, PATCH or DELETE.
    pub method: String,
    /// The URL template.
    pub url: String,
    /// Header templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body template.
    pub body: Option<Value>,
    /// Statuses that mean success (default: any 2xx).
    #[serde(default)]
    pub expect_status: Vec<u16>,
    /// Statuses that also mean success but carry nothing to read (404 on a revoke: already gone).
    #[serde(default)]
    pub ok_status: Vec<u16>,
    /// JSON pointers whose values must equal these.
    #[serde(default)]
    pub expect_json: BTreeMap<String, Value>,
    /// JSON pointer to the new secret value.
    pub value: Option<String>,
    /// JSON pointers to non-secret facts, by meta name.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// JSON pointer to an RFC 3339 expiry.
    pub expires_at: Option<String>,
}

/// Deletes what an earlier try of the same rotation created (providers that show a new key
/// only once), so a retried `create` never leaves an orphan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupSpec {
    /// Lists the candidates.
    pub list: OpSpec,
    /// JSON pointer to the array of items in the list's answer.
    pub items: String,
    /// Item JSON pointers and the templates they must equal (e.g. the name holding the rotation id).
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, String>,
    /// Deletes one item (`{{item.…}}` is the item).
    pub delete: OpSpec,
}

/// The settings of one secret, preset merged in.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Hosts requests may go to (required).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Allow plain `http://` URLs (tests, loopback services).
    #[serde(default)]
    pub allow_http: bool,
    /// Allow loopback, private and link-local addresses (a provider on the local network).
    #[serde(default)]
    pub allow_private_addresses: bool,
    /// A PEM file of extra trusted CA certificates.
    pub ca_file: Option<String>,
    /// Per-request timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Largest response body read, in bytes.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Whether old and new credentials can be valid at once (must agree with the kind).
    pub overlap: Option<bool>,
    /// `create`.
    pub create: Option<OpSpec>,
    /// Run before `create`.
    pub cleanup: Option<CleanupSpec>,
    /// `verify`.
    pub verify: Option<OpSpec>,
    /// `promote`.
    pub promote: Option<OpSpec>,
    /// `revoke`.
    pub revoke: Option<OpSpec>,
    /// `issue`.
    pub issue: Option<OpSpec>,
    /// Everything else: template variables (`base_url`, `project_id`, …).
    #[serde(flatten)]
    pub vars: Map<String, Value>,
}

fn default_timeout() -> u64 {
    30
}

fn default_max_response() -> usize {
    1 << 20
}

/// Merges the preset named in `settings` (if any) under `settings`, then parses them.
pub fn load(settings: &Map<String, Value>) -> Result<Settings, String> {
    let mut merged = Map::new();
    if let Some(name) = settings.get("preset") {
        let name = name.as_str().ok_or("settings.preset must be a string")?;
        let text = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                format!("unknown preset {name:?}; known: {known:?}")
            })?;
        let preset: Value =
            toml::from_str(text).map_err(|e| format!("preset {name} is broken: {e}"))?;
        if let Value::Object(map) = preset {
            merged.extend(map);
        }
    }
    merged.extend(settings.clone());
    let parsed: Settings =
        serde_json::from_value(Value::Object(merged)).map_err(|e| format!("bad settings: {e}"))?;
    if parsed.allowed_hosts.is_empty() {
        return Err(
            "settings.allowed_hosts must list the hosts this secret's requests may reach".into(),
        );
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_preset_parses_and_user_settings_override_it() {
        for (name, _) in PRESETS {
            let s = load(
                json!({"preset": name, "allowed_hosts": ["x"]})
                    .as_object()
                    .unwrap(),
            )
            .unwrap();
            assert!(s.vars.contains_key("base_url"), "{name} sets base_url");
            assert!(s.revoke.is_some() || s.create.is_some(), "{name}");
        }
        let s = load(json!({"preset": "openai-service-account", "base_url": "http://127.0.0.1:1", "allowed_hosts": ["127.0.0.1"], "project_id": "p1"}).as_object().unwrap()).unwrap();
        assert_eq!(s.vars["base_url"], "http://127.0.0.1:1");
        assert_eq!(s.vars["project_id"], "p1");
        assert!(s.create.is_some() && s.cleanup.is_some());
    }

    #[test]
    fn hosts_must_be_listed_and_presets_must_exist() {
        assert!(
            load(
                json!({"create": {"method": "GET", "url": "https://x"}})
                    .as_object()
                    .unwrap()
            )
            .unwrap_err()
            .contains("allowed_hosts")
        );
        assert!(
            load(
                json!({"preset": "nope", "allowed_hosts": ["x"]})
                    .as_object()
                    .unwrap()
            )
            .unwrap_err()
            .contains("unknown preset")
        );
    }
}
