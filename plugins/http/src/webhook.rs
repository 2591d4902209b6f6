//! The `webhook` consumer kind: each new version (or alert) is POSTed to a URL as JSON, signed
//! with HMAC-SHA256 in `X-Keywarden-Signature: sha256=<hex>`; a 2xx answer is the
//! acknowledgement. Failures are retried with backoff, then reported as retryable so keywarden
//! retries the delivery later. The value itself is sent only when `include_value = true`.
//!
//! Settings: `url`, `allowed_hosts`, `allow_http`, `allow_private_addresses`, `include_value`, `ca_file`,
//! `timeout_seconds`, `retries`. Credentials: `hmac`, the signing key.

use std::time::Duration;

use keywarden_plugin_sdk::{ErrReply, OkReply, Request};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{Http, checked_url};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookSettings {
    url: String,
    allowed_hosts: Vec<String>,
    #[serde(default)]
    allow_http: bool,
    #[serde(default)]
    allow_private_addresses: bool,
    #[serde(default)]
    include_value: bool,
    ca_file: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    #[serde(default = "default_retries")]
    retries: u32,
}

fn default_timeout() -> u64 {
    10
}

fn default_retries() -> u32 {
    3
}

/// The signature header of a body under a key: `sha256=<hex>`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Delivers one push.
pub async fn push(http: &Http, request: &Request) -> Result<OkReply, ErrReply> {
    let settings: WebhookSettings = serde_json::from_value(Value::Object(request.settings.clone()))
        .map_err(|e| ErrReply::fatal(format!("bad webhook settings: {e}")))?;
    let key = request
        .credentials
        .get("hmac")
        .ok_or_else(|| ErrReply::fatal("a webhook needs credentials.hmac, the signing key"))?;
    let url = checked_url(
        &settings.url,
        &settings.allowed_hosts,
        settings.allow_http,
        settings.allow_private_addresses,
        "webhook",
    )?;
    let meta = request.meta.clone().unwrap_or_default();
    let is_alert = meta.get("alert") == Some(&Value::Bool(true));
    let body = if is_alert {
        let alert: Value = request
            .value
            .as_ref()
            .and_then(|v| serde_json::from_str(v.expose()).ok())
            .unwrap_or(Value::Null);
        json!({ "event": "keywarden.alert", "alert": alert })
    } else {
        let mut b = json!({
            "event": "keywarden.rotated",
            "secret": request.secret,
            "version": request.version,
            "meta": meta,
        });
        if settings.include_value {
            b["value"] = json!(request.value.as_ref().map(|v| v.expose()));
        }
        b
    };
    let body = serde_json::to_vec(&body).expect("JSON serializes");
    let signature = signature(key.value.expose().as_bytes(), &body);
    let client = http.client(
        settings.ca_file.as_deref(),
        settings.timeout_seconds,
        settings.allow_private_addresses,
    )?;
    let host = url.host_str().unwrap_or_default().to_string();
    let mut last = String::new();
    for attempt in 0..settings.retries.max(1) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(6))).await;
        }
        let sent = client
            .post(url.clone())
            .header("content-type", "application/json")
            .header("x-keywarden-signature", &signature)
            .header(
                "x-keywarden-event",
                if is_alert { "alert" } else { "rotated" },
            )
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(OkReply::default()),
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                return Err(ErrReply::fatal(format!(
                    "webhook {host} refused the delivery: {}",
                    r.status()
                )));
            }
            Ok(r) => last = format!("webhook {host} answered {}", r.status()),
            Err(e) => last = format!("webhook {host} failed: {}", e.without_url()),
        }
    }
    Err(ErrReply::retryable(last))
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
