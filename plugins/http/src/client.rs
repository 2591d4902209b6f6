//! Making one templated request safely: only to allowed hosts, over verified TLS (plain HTTP
//! only when allowed), no redirects, a timeout, a cap on the response size. Requests, headers
//! and bodies are never logged: they carry secrets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use keywarden_plugin_sdk::ErrReply;
use serde_json::Value;

use crate::spec::{OpSpec, Settings};
use crate::template::{render_json, render_str, render_url};

/// A request's answer: its status and its body as JSON (`Null` if empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    /// The body.
    pub json: Value,
    /// Whether the status was one of `ok_status` (success with nothing to read).
    pub nothing_to_read: bool,
}

/// HTTP clients, one per (CA file, timeout).
#[derive(Debug, Default)]
pub struct Http {
    clients: Mutex<HashMap<(Option<String>, u64), reqwest::Client>>,
}

fn fatal(message: impl Into<String>) -> ErrReply {
    ErrReply::fatal(message)
}

/// Parses a URL and checks it may be reached: its host is allowed, its scheme is https (or
/// http where allowed).
pub fn checked_url(
    text: &str,
    allowed_hosts: &[String],
    allow_http: bool,
    what: &str,
) -> Result<reqwest::Url, ErrReply> {
    let url = reqwest::Url::parse(text).map_err(|e| fatal(format!("{what}: bad URL: {e}")))?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(fatal(format!(
            "{what}: host {host:?} is not in allowed_hosts"
        )));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if allow_http => Ok(url),
        other => Err(fatal(format!(
            "{what}: scheme {other:?} is not allowed (https only unless allow_http)"
        ))),
    }
}

impl Http {
    /// A client with no redirects, the timeout and the extra CA of these settings.
    pub fn client(
        &self,
        ca_file: Option<&str>,
        timeout_seconds: u64,
    ) -> Result<reqwest::Client, ErrReply> {
        let key = (ca_file.map(str::to_string), timeout_seconds);
        if let Some(c) = self.clients.lock().expect("client lock").get(&key) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(timeout_seconds))
            .connect_timeout(Duration::from_secs(timeout_seconds.min(10)))
            .no_proxy();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| fatal(format!("cannot read ca_file {path}: {e}")))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| fatal(format!("ca_file {path} is not a PEM certificate: {e}")))?;
            builder = builder.tls_certs_merge([cert]);
        }
        let client = builder
            .build()
            .map_err(|e| fatal(format!("cannot build the HTTP client: {e}")))?;
        self.clients
            .lock()
            .expect("client lock")
            .insert(key, client.clone());
        Ok(client)
    }

    /// Renders `spec` against `ctx`, sends it, checks the answer.
    pub async fn call(
        &self,
        settings: &Settings,
        spec: &OpSpec,
        ctx: &Value,
        what: &str,
    ) -> Result<Answer, ErrReply> {
        let url_text = render_url(&spec.url, ctx).map_err(fatal)?;
        let url = checked_url(
            &url_text,
            &settings.allowed_hosts,
            settings.allow_http,
            what,
        )?;
        let host = url.host_str().unwrap_or_default().to_string();
        let method = reqwest::Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| fatal(format!("{what}: bad method {:?}", spec.method)))?;
        let client = self.client(settings.ca_file.as_deref(), settings.timeout_seconds)?;
        // What we say about the request in errors: method, host and path, never the query.
        let label = format!("{what}: {method} {host}{}", url.path());
        let mut request = client.request(method, url);
        for (name, template) in &spec.headers {
            request = request.header(name.as_str(), render_str(template, ctx).map_err(fatal)?);
        }
        if let Some(body) = &spec.body {
            let body = render_json(body, ctx).map_err(fatal)?;
            request = request
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).expect("JSON serializes"));
        }
        let mut response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            // The URL may carry secrets in its query: never repeat it.
            let e = e.without_url();
            ErrReply::retryable(format!("{label} {kind}: {}", error_chain(&e)))
        })?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(fatal(format!(
                "{label} answered a redirect ({status}); redirects are not followed"
            )));
        }
        let body = read_body(&mut response, &label, settings.max_response_bytes).await?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if spec.ok_status.contains(&status) {
            return Ok(Answer {
                json,
                nothing_to_read: true,
            });
        }
        judge(spec, status, &json, &label)?;
        Ok(Answer {
            json,
            nothing_to_read: false,
        })
    }
}

/// A provider's own error message, if the answer carries one in a usual place (truncated).
fn provider_message(json: &Value) -> String {
    let found = ["/error/message", "/errors/0/message", "/message", "/error"]
        .iter()
        .find_map(|p| json.pointer(p).and_then(Value::as_str));
    found.map_or(String::new(), |m| {
        format!(": {}", m.chars().take(200).collect::<String>())
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Reads an answer's body, up to `max` bytes.
async fn read_body(
    response: &mut reqwest::Response,
    label: &str,
    max: usize,
) -> Result<Vec<u8>, ErrReply> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ErrReply::retryable(format!("{label}: reading the answer failed: {e}")))?
    {
        if body.len() + chunk.len() > max {
            return Err(fatal(format!(
                "{label}: the answer is larger than {max} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Whether an answer is what `spec` expects: its status, and the JSON values it names.
fn judge(spec: &OpSpec, status: u16, json: &Value, label: &str) -> Result<(), ErrReply> {
    let expected = if spec.expect_status.is_empty() {
        (200..300).contains(&status)
    } else {
        spec.expect_status.contains(&status)
    };
    if !expected {
        let detail = provider_message(json);
        let message = format!("{label} answered {status}{detail}");
        return Err(if status == 429 || status >= 500 {
            ErrReply::retryable(message)
        } else {
            fatal(message)
        });
    }
    for (pointer, want) in &spec.expect_json {
        if json.pointer(pointer) != Some(want) {
            return Err(fatal(format!(
                "{label}: {pointer} is not {want} in the answer"
            )));
        }
    }
    Ok(())
}
