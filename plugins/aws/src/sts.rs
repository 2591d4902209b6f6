//! `aws-sts`: short-lived credentials per lease, with `sts:AssumeRole`.
//!
//! Settings: `role_arn`; `max_session_seconds` (the role's maximum, default 3600);
//! `revoke_sessions` (default false). Each lease gets its own session, `DurationSeconds` = the
//! lease TTL clamped to AWS's 900 s minimum and the role's maximum. The value is the JSON that an
//! AWS SDK's `credential_process` expects (`Version` 1, `AccessKeyId`, `SecretAccessKey`,
//! `SessionToken`, `Expiration`). STS cannot revoke one session; with `revoke_sessions = true` a
//! revoke attaches AWS's "revoke older sessions" policy to the role (every session issued
//! before now stops working), otherwise a session simply ends at its expiry.

use aws_smithy_types::date_time::Format;
use keywarden_plugin_sdk::{ErrReply, Meta, OkReply, Request, Secret};
use serde_json::{Value, json};

use crate::{admin_config, required, sdk_error};

const MIN_SESSION: u64 = 900;

fn session_name(secret: &str) -> String {
    let clean: String = secret
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("keywarden-{clean}").chars().take(64).collect()
}

fn max_session(request: &Request) -> u64 {
    match request.settings.get("max_session_seconds") {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(3600),
        Some(Value::String(s)) => s.parse().unwrap_or(3600),
        _ => 3600,
    }
}

pub(crate) async fn issue(request: &Request) -> Result<OkReply, ErrReply> {
    let role = required(request, "role_arn")?;
    let max = max_session(request).max(MIN_SESSION);
    let duration = request
        .ttl_seconds
        .unwrap_or(MIN_SESSION)
        .clamp(MIN_SESSION, max);
    let sts = aws_sdk_sts::Client::new(&admin_config(request).await?);
    let out = sts
        .assume_role()
        .role_arn(role)
        .role_session_name(session_name(request.secret.as_deref().unwrap_or("lease")))
        .duration_seconds(duration as i32)
        .send()
        .await
        .map_err(|e| sdk_error("AssumeRole", e))?;
    let creds = out
        .credentials()
        .ok_or_else(|| ErrReply::retryable("AssumeRole returned no credentials"))?;
    let expiration = creds
        .expiration()
        .fmt(Format::DateTime)
        .map_err(|e| ErrReply::fatal(format!("bad expiration: {e}")))?;
    let document = json!({
        "Version": 1,
        "AccessKeyId": creds.access_key_id(),
        "SecretAccessKey": creds.secret_access_key(),
        "SessionToken": creds.session_token(),
        "Expiration": expiration,
    });
    let mut meta = Meta::new();
    meta.insert("access_key_id".into(), creds.access_key_id().into());
    meta.insert("role_arn".into(), role.into());
    Ok(OkReply {
        value: Some(Secret::new(document.to_string())),
        meta,
        expires_at: Some(expiration),
    })
}

pub(crate) async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    if request.settings.get("revoke_sessions") != Some(&Value::Bool(true)) {
        return Ok(OkReply::default()); // the session ends at its expiry
    }
    let role = required(request, "role_arn")?;
    let role_name = role.rsplit('/').next().unwrap_or(role);
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
        .fmt(Format::DateTime)
        .map_err(|e| ErrReply::fatal(e.to_string()))?;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Action": ["*"],
            "Resource": ["*"],
            "Condition": {"DateLessThan": {"aws:TokenIssueTime": now}}
        }]
    });
    aws_sdk_iam::Client::new(&admin_config(request).await?)
        .put_role_policy()
        .role_name(role_name)
        .policy_name("AWSRevokeOlderSessions")
        .policy_document(policy.to_string())
        .send()
        .await
        .map_err(|e| sdk_error("PutRolePolicy", e))?;
    Ok(OkReply::default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn session_names_are_valid() {
        assert_eq!(
            super::session_name("aws/deploy session"),
            "keywarden-aws-deploy-session"
        );
        assert!(super::session_name(&"x".repeat(100)).len() <= 64);
    }
}
