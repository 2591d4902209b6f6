//! `aws-secretsmanager`: a secret in AWS Secrets Manager, rotated the way AWS's own rotation
//! protocol does it, and a consumer (`push`) that writes keywarden's versions into one.
//!
//! Settings: `secret_id`. Create stores the proposed value as a new version labelled
//! `AWSPENDING`, with the rotation id as `ClientRequestToken` (so a repeat is the same call); a
//! stray `AWSPENDING` an earlier run left on another version is removed first. Verify reads the
//! pending version back. Promote moves `AWSCURRENT` to it (AWS gives the old one `AWSPREVIOUS`)
//! and removes `AWSPENDING`. Revoke removes the old version's `AWSPREVIOUS` once it is drained
//! (or a rolled-back version's `AWSPENDING`).

use std::collections::HashMap;

use keywarden_plugin_sdk::{Credential, ErrReply, Meta, OkReply, Request, Secret};
use serde_json::Value;

use crate::{admin_config, required, sdk_error};

const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";
const PREVIOUS: &str = "AWSPREVIOUS";

async fn client(request: &Request) -> Result<aws_sdk_secretsmanager::Client, ErrReply> {
    Ok(aws_sdk_secretsmanager::Client::new(
        &admin_config(request).await?,
    ))
}

/// Version id → staging labels, or `None` if the secret does not exist.
async fn stages(
    sm: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
) -> Result<Option<HashMap<String, Vec<String>>>, ErrReply> {
    match sm.describe_secret().secret_id(secret_id).send().await {
        Ok(d) => Ok(Some(d.version_ids_to_stages().cloned().unwrap_or_default())),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(sdk_error("DescribeSecret", e)),
    }
}

async fn remove_label(
    sm: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
    label: &str,
    version: &str,
) -> Result<(), ErrReply> {
    sm.update_secret_version_stage()
        .secret_id(secret_id)
        .version_stage(label)
        .remove_from_version_id(version)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| sdk_error("UpdateSecretVersionStage", e))
}

fn version_id(meta: &Meta) -> Option<&str> {
    meta.get("version_id").and_then(Value::as_str)
}

pub(crate) async fn create(request: &Request) -> Result<OkReply, ErrReply> {
    let secret_id = required(request, "secret_id")?;
    let token = request
        .rotation_id
        .as_deref()
        .ok_or_else(|| ErrReply::fatal("no rotation_id"))?;
    let value = request
        .proposed
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no proposed value"))?;
    let sm = client(request).await?;
    let arn = match stages(&sm, secret_id).await? {
        Some(labels) => {
            for (version, labels) in &labels {
                if version != token
                    && labels.iter().any(|l| l == PENDING)
                    && !labels.iter().any(|l| l == CURRENT)
                {
                    remove_label(&sm, secret_id, PENDING, version).await?;
                }
            }
            sm.put_secret_value()
                .secret_id(secret_id)
                .client_request_token(token)
                .secret_string(value.expose())
                .version_stages(PENDING)
                .send()
                .await
                .map_err(|e| sdk_error("PutSecretValue", e))?
                .arn()
                .map(str::to_string)
        }
        // A secret that does not exist yet starts with this version as current.
        None => sm
            .create_secret()
            .name(secret_id)
            .client_request_token(token)
            .secret_string(value.expose())
            .send()
            .await
            .map_err(|e| sdk_error("CreateSecret", e))?
            .arn()
            .map(str::to_string),
    };
    let mut meta = Meta::new();
    meta.insert("secret_id".into(), secret_id.into());
    meta.insert("version_id".into(), token.into());
    if let Some(arn) = arn {
        meta.insert("arn".into(), arn.into());
    }
    Ok(OkReply::credential(value.clone(), meta))
}

/// The candidate credential and its AWS version id.
fn candidate(request: &Request) -> Result<(&Credential, &str), ErrReply> {
    let candidate = request
        .candidate
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no candidate"))?;
    let version = version_id(&candidate.meta)
        .ok_or_else(|| ErrReply::fatal("the candidate has no version_id"))?;
    Ok((candidate, version))
}

pub(crate) async fn verify(request: &Request) -> Result<OkReply, ErrReply> {
    let secret_id = required(request, "secret_id")?;
    let (candidate, version) = candidate(request)?;
    let got = client(request)
        .await?
        .get_secret_value()
        .secret_id(secret_id)
        .version_id(version)
        .send()
        .await
        .map_err(|e| sdk_error("GetSecretValue", e))?;
    if got.secret_string() == Some(candidate.value.expose()) {
        Ok(OkReply::default())
    } else {
        Err(ErrReply::fatal(format!(
            "version {version} of {secret_id} does not hold the new value"
        )))
    }
}

pub(crate) async fn promote(request: &Request) -> Result<OkReply, ErrReply> {
    let secret_id = required(request, "secret_id")?;
    let (_, version) = candidate(request)?;
    let sm = client(request).await?;
    let labels = stages(&sm, secret_id)
        .await?
        .ok_or_else(|| ErrReply::fatal(format!("{secret_id} does not exist")))?;
    let current = labels
        .iter()
        .find(|(_, l)| l.iter().any(|x| x == CURRENT))
        .map(|(v, _)| v.clone());
    if current.as_deref() != Some(version) {
        let mut call = sm
            .update_secret_version_stage()
            .secret_id(secret_id)
            .version_stage(CURRENT)
            .move_to_version_id(version);
        if let Some(current) = &current {
            call = call.remove_from_version_id(current);
        }
        call.send()
            .await
            .map_err(|e| sdk_error("UpdateSecretVersionStage", e))?;
    }
    if labels
        .get(version)
        .is_some_and(|l| l.iter().any(|x| x == PENDING))
    {
        remove_label(&sm, secret_id, PENDING, version).await?;
    }
    Ok(OkReply::default())
}

pub(crate) async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    let secret_id = required(request, "secret_id")?;
    let target = request
        .target
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no target"))?;
    let Some(version) = version_id(&target.meta) else {
        return Ok(OkReply::default()); // a value stored by hand: no AWS version of ours
    };
    let sm = client(request).await?;
    let Some(labels) = stages(&sm, secret_id).await? else {
        return Ok(OkReply::default());
    };
    let Some(on_version) = labels.get(version) else {
        return Ok(OkReply::default());
    };
    if on_version.iter().any(|l| l == CURRENT) {
        return Err(ErrReply::fatal(format!(
            "refusing to revoke version {version} of {secret_id}: AWS serves it as {CURRENT}"
        )));
    }
    for label in [PREVIOUS, PENDING] {
        if on_version.iter().any(|l| l == label) {
            remove_label(&sm, secret_id, label, version).await?;
        }
    }
    Ok(OkReply::default())
}

/// A client request token for pushing `version` of `secret`: the same for a retried push.
fn push_token(secret: &str, version: i64) -> String {
    // FNV-1a: stable across runs and platforms, no dependency needed.
    let hash = secret.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("keywarden-{hash:016x}-{version:016}")
}

pub(crate) async fn push(request: &Request) -> Result<OkReply, ErrReply> {
    let secret_id = required(request, "secret_id")?;
    let value: &Secret = request
        .value
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no value"))?;
    let version = request.version.unwrap_or(0);
    let token = push_token(request.secret.as_deref().unwrap_or(""), version);
    let sm = client(request).await?;
    let put = sm
        .put_secret_value()
        .secret_id(secret_id)
        .client_request_token(&token)
        .secret_string(value.expose())
        .send()
        .await;
    match put {
        Ok(_) => Ok(OkReply::default()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            sm.create_secret()
                .name(secret_id)
                .client_request_token(&token)
                .secret_string(value.expose())
                .send()
                .await
                .map(|_| OkReply::default())
                .map_err(|e| sdk_error("CreateSecret", e))
        }
        Err(e) => Err(sdk_error("PutSecretValue", e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn push_tokens_are_stable_and_long_enough() {
        let t = super::push_token("app/db", 7);
        assert_eq!(t, super::push_token("app/db", 7));
        assert_ne!(t, super::push_token("app/db", 8));
        assert!((32..=64).contains(&t.len()), "{t}");
    }
}
