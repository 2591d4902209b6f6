//! Making one templated request safely: only to allowed hosts, only to public addresses (no
//! loopback, private, link-local such as a cloud metadata service, unless allowed), over
//! verified TLS (plain HTTP only when allowed), no redirects, a timeout, a cap on the response
//! size. Requests, headers
//! and bodies are never logged: they carry secrets.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
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

/// What makes two clients differ: CA file, timeout, private addresses allowed.
type ClientKey = (Option<String>, u64, bool);

/// HTTP clients, one per [`ClientKey`].
#[derive(Debug, Default)]
pub struct Http {
    clients: Mutex<HashMap<ClientKey, reqwest::Client>>,
}

/// Whether `ip` is a public unicast address: not loopback, private (RFC 1918, unique local),
/// link-local (169.254.0.0/16 holds cloud metadata services), shared (100.64.0.0/10),
/// unspecified, broadcast, multicast or documentation.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// A resolver that drops every address that is not public, and fails when none is left.
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (loopback, private or link-local \
                     addresses are refused unless allow_private_addresses = true)"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
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
    allow_private: bool,
    what: &str,
) -> Result<reqwest::Url, ErrReply> {
    let url = reqwest::Url::parse(text).map_err(|e| fatal(format!("{what}: bad URL: {e}")))?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(fatal(format!(
            "{what}: host {host:?} is not in allowed_hosts"
        )));
    }
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    if let Some(ip) = literal.filter(|ip| !allow_private && !is_public(*ip)) {
        return Err(fatal(format!(
            "{what}: {ip} is not a public address (loopback, private and link-local addresses \
             are refused unless allow_private_addresses = true)"
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
    /// A client with no redirects, the timeout and the extra CA of these settings, that
    /// connects only to public addresses unless `allow_private`.
    pub fn client(
        &self,
        ca_file: Option<&str>,
        timeout_seconds: u64,
        allow_private: bool,
    ) -> Result<reqwest::Client, ErrReply> {
        let key = (ca_file.map(str::to_string), timeout_seconds, allow_private);
        if let Some(c) = self.clients.lock().expect("client lock").get(&key) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(timeout_seconds))
            .connect_timeout(Duration::from_secs(timeout_seconds.min(10)))
            .no_proxy();
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
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
            settings.allow_private_addresses,
            what,
        )?;
        let host = url.host_str().unwrap_or_default().to_string();
        let method = reqwest::Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| fatal(format!("{what}: bad method {:?}", spec.method)))?;
        let client = self.client(
            settings.ca_file.as_deref(),
            settings.timeout_seconds,
            settings.allow_private_addresses,
        )?;
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
