//! The plugin: four kinds over the same request engine.
//!
//! - `http`: create, verify, promote, revoke and issue by request templates (overlap: the old
//!   and the new credential may be valid at once);
//! - `http-exclusive`: the same, for providers whose create retires the old value at once;
//! - `http-manual`: verify and revoke only, for providers whose keys cannot be created through
//!   their API (keywarden reports that a person must create them, and deactivates on compromise);
//! - `http-lease`: issue and revoke only: a short-lived credential minted for each lease;
//! - `webhook`: push, a signed POST of each new version (or alert) to a URL.

use std::collections::BTreeMap;

use keywarden_plugin_sdk::{
    Credential, ErrReply, Hello, KindInfo, Meta, OkReply, Op, Plugin, Request, Secret,
};
use serde_json::{Map, Value, json};

use crate::client::Http;
use crate::spec::{self, OpSpec, Settings};
use crate::webhook;

/// The HTTP plugin.
#[derive(Debug, Default)]
pub struct HttpPlugin {
    http: Http,
}

fn kind(ops: &[&str], overlap: Option<bool>) -> KindInfo {
    KindInfo {
        ops: ops.iter().map(|s| s.to_string()).collect(),
        overlap,
    }
}

fn credential_json(c: &Credential) -> Value {
    json!({ "value": c.value.expose(), "meta": c.meta, "version": c.version })
}

/// The template context of a request.
fn context(request: &Request, settings: &Settings, subject: Option<&Credential>) -> Value {
    let mut ctx = settings.vars.clone();
    ctx.insert("settings".into(), Value::Object(settings.vars.clone()));
    ctx.insert("secret".into(), json!(request.secret));
    ctx.insert("rotation_id".into(), json!(request.rotation_id));
    ctx.insert("ttl_seconds".into(), json!(request.ttl_seconds));
    if let Some(p) = &request.proposed {
        ctx.insert("proposed".into(), json!(p.expose()));
    }
    let credentials: Map<String, Value> = request
        .credentials
        .iter()
        .map(|(role, c)| (role.clone(), credential_json(c)))
        .collect();
    ctx.insert("credentials".into(), Value::Object(credentials));
    for (name, c) in [
        ("current", &request.current),
        ("candidate", &request.candidate),
        ("target", &request.target),
    ] {
        if let Some(c) = c {
            ctx.insert(name.into(), credential_json(c));
        }
    }
    if let Some(s) = subject {
        ctx.insert("value".into(), json!(s.value.expose()));
        ctx.insert("meta".into(), Value::Object(s.meta.clone()));
    }
    Value::Object(ctx)
}

/// Reads `value`, `meta` and `expires_at` out of an answer as the spec says.
fn extract(spec: &OpSpec, answer: &Value, ctx: &Value, what: &str) -> Result<OkReply, ErrReply> {
    let mut reply = OkReply::default();
    if let Some(pointer) = &spec.value {
        let value = answer
            .pointer(pointer)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ErrReply::fatal(format!("{what}: the answer has no text at {pointer}"))
            })?;
        reply.value = Some(Secret::new(value));
    }
    let mut meta = Meta::new();
    for (name, source) in &spec.meta {
        let v = if source.starts_with('/') {
            answer.pointer(source).cloned().ok_or_else(|| {
                ErrReply::fatal(format!("{what}: the answer has nothing at {source}"))
            })?
        } else {
            Value::String(crate::template::render_str(source, ctx).map_err(ErrReply::fatal)?)
        };
        meta.insert(name.clone(), v);
    }
    reply.meta = meta;
    if let Some(pointer) = &spec.expires_at {
        reply.expires_at = answer
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    Ok(reply)
}

impl HttpPlugin {
    async fn run(
        &self,
        settings: &Settings,
        spec: &OpSpec,
        ctx: &Value,
        what: &str,
    ) -> Result<OkReply, ErrReply> {
        let answer = self.http.call(settings, spec, ctx, what).await?;
        if answer.nothing_to_read {
            return Ok(OkReply::default());
        }
        extract(spec, &answer.json, ctx, what)
    }

    /// Deletes whatever an earlier try of this rotation created, so a retried create leaves no
    /// orphan behind.
    async fn cleanup(&self, settings: &Settings, ctx: &Value) -> Result<(), ErrReply> {
        let Some(cleanup) = &settings.cleanup else {
            return Ok(());
        };
        let listing = self
            .http
            .call(settings, &cleanup.list, ctx, "cleanup list")
            .await?;
        let items = listing
            .json
            .pointer(&cleanup.items)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let wanted: BTreeMap<&String, String> = cleanup
            .matches
            .iter()
            .map(|(p, t)| Ok((p, crate::template::render_str(t, ctx)?)))
            .collect::<Result<_, String>>()
            .map_err(ErrReply::fatal)?;
        for item in items {
            if wanted
                .iter()
                .all(|(p, v)| item.pointer(p).and_then(Value::as_str) == Some(v.as_str()))
            {
                let mut item_ctx = ctx.clone();
                item_ctx["item"] = item;
                self.http
                    .call(settings, &cleanup.delete, &item_ctx, "cleanup delete")
                    .await?;
            }
        }
        Ok(())
    }

    async fn rest(&self, request: Request, op: Op) -> Result<OkReply, ErrReply> {
        let settings = spec::load(&request.settings).map_err(ErrReply::fatal)?;
        let kind = request.kind.as_deref().unwrap_or("http");
        if let Some(overlap) = settings.overlap {
            let kind_overlaps = kind != "http-exclusive";
            if overlap != kind_overlaps && kind != "http-manual" {
                return Err(ErrReply::fatal(format!(
                    "settings.overlap = {overlap} needs the kind {}, not {kind}",
                    if overlap { "http" } else { "http-exclusive" }
                )));
            }
        }
        let subject = match op {
            Op::Create => request.current.as_ref(),
            Op::Verify | Op::Promote => request.candidate.as_ref(),
            Op::Revoke => request.target.as_ref(),
            _ => None,
        };
        let ctx = context(&request, &settings, subject);
        let (spec, required) = match op {
            Op::Create => (&settings.create, true),
            Op::Verify => (&settings.verify, false),
            Op::Promote => (&settings.promote, false),
            Op::Revoke => (&settings.revoke, true),
            Op::Issue => (&settings.issue, true),
            _ => return Err(ErrReply::unsupported()),
        };
        let Some(spec) = spec else {
            return if required {
                Err(ErrReply::fatal(format!(
                    "settings.{op} is not configured for this secret"
                )))
            } else {
                Ok(OkReply::default())
            };
        };
        if op == Op::Create {
            self.cleanup(&settings, &ctx).await?;
        }
        let reply = self.run(&settings, spec, &ctx, op.as_str()).await?;
        if matches!(op, Op::Create | Op::Issue) && reply.value.is_none() {
            return Err(ErrReply::fatal(format!(
                "settings.{op} has no `value` pointer"
            )));
        }
        Ok(reply)
    }
}

impl Plugin for HttpPlugin {
    fn hello(&self) -> Hello {
        let all = ["create", "verify", "promote", "revoke", "issue"];
        Hello {
            keywarden_plugin: keywarden_plugin_sdk::PROTOCOL_VERSION,
            name: "http".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: [
                ("http".to_string(), kind(&all, Some(true))),
                ("http-exclusive".to_string(), kind(&all, Some(false))),
                ("http-manual".to_string(), kind(&["verify", "revoke"], None)),
                ("http-lease".to_string(), kind(&["issue", "revoke"], None)),
                ("webhook".to_string(), kind(&["push"], None)),
            ]
            .into(),
        }
    }

    async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
        let Some(op) = request.op() else {
            return Err(ErrReply::unsupported());
        };
        match (request.kind.as_deref(), op) {
            (Some("webhook"), Op::Push) => webhook::push(&self.http, &request).await,
            (Some("webhook"), _) | (_, Op::Push) => Err(ErrReply::unsupported()),
            (Some("http-manual"), Op::Create | Op::Promote | Op::Issue)
            | (Some("http-lease"), Op::Create | Op::Verify | Op::Promote) => {
                Err(ErrReply::unsupported())
            }
            _ => self.rest(request, op).await,
        }
    }
}
