//! `aws-sts`: short-lived credentials per lease, with `sts:AssumeRole`.
//!
//! Settings: `role_arn`; `max_session_seconds` (the role's maximum, default 3600);
//! `revoke_sessions` (default false). Each lease gets its own session, named uniquely,
//! `DurationSeconds` = the lease TTL clamped to AWS's 900 s minimum and the role's maximum. The
//! value is the JSON that an AWS SDK's `credential_process` expects (`Version` 1,
//! `AccessKeyId`, `SecretAccessKey`, `SessionToken`, `Expiration`).
//!
//! STS cannot revoke one session. Without `revoke_sessions`, a session ends at its expiry. With
//! it, revoke adds a statement to the role's inline policy `keywarden-revoked-sessions` that
//! denies everything to that one session (`aws:userid` is `ROLEID:SESSION-NAME`); statements
//! whose session has expired are pruned on the way. Should the policy outgrow IAM's size limit,
//! the revoke falls back to denying every session issued before now (AWS's "revoke older
//! sessions"), which cuts off other live leases too: safe, not gentle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_smithy_types::date_time::Format;
use keywarden_plugin_sdk::{ErrReply, Meta, OkReply, Request, Secret};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{admin_config, error_code, required, sdk_error};

const MIN_SESSION: u64 = 900;
/// The role's inline policy that lists revoked sessions.
const REVOKED_POLICY: &str = "keywarden-revoked-sessions";
/// IAM's limit on a role's inline policies, in characters (less some headroom).
const MAX_POLICY_CHARS: usize = 10_000;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A session name unique to this lease: the secret's name (as far as it fits) and a suffix
/// from the clock and a counter, within AWS's 64 characters of `[\w+=,.@-]`.
fn session_name(secret: &str, lease_id: Option<&str>) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Named after its lease when there is one, so the session can be revoked by lease alone.
    let suffix = match lease_id {
        Some(lease) => lease.replace('-', ""),
        None => format!(
            "{nanos:x}{:x}{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let clean: String = secret
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64 - "kw-".len() - 1 - suffix.len())
        .collect();
    format!("kw-{clean}.{suffix}")
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
    let name = session_name(
        request.secret.as_deref().unwrap_or("lease"),
        request.lease_id.as_deref(),
    );
    let sts = aws_sdk_sts::Client::new(&admin_config(request).await?);
    let out = sts
        .assume_role()
        .role_arn(role)
        .role_session_name(&name)
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
    meta.insert("session_name".into(), name.into());
    meta.insert("expires_epoch".into(), creds.expiration().secs().into());
    Ok(OkReply {
        value: Some(Secret::new(document.to_string())),
        meta,
        expires_at: Some(expiration),
    })
}

/// Decodes the RFC 3986 percent-encoding IAM applies to policy documents it returns.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The deny statement for one session, its expiry in the `Sid` so it can be pruned later.
fn deny_session(session: &str, expires_epoch: u64) -> Value {
    let tag: String = session
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    json!({
        "Sid": format!("Until{expires_epoch}{tag}"),
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {"StringLike": {"aws:userid": format!("*:{session}")}}
    })
}

/// The expiry a statement's `Sid` carries, if it is one of ours.
fn statement_expiry(statement: &Value) -> Option<u64> {
    let sid = statement.get("Sid")?.as_str()?.strip_prefix("Until")?;
    sid.get(..10)?.parse().ok()
}

/// The revoked-sessions policy with `session` added and expired statements dropped.
fn with_session_denied(existing: Option<&str>, session: &str, expires: u64, now: u64) -> Value {
    let mut statements: Vec<Value> = existing
        .and_then(|doc| serde_json::from_str::<Value>(&percent_decode(doc)).ok())
        .and_then(|doc| doc.get("Statement").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| statement_expiry(s).is_some_and(|until| until > now))
        .collect();
    let new = deny_session(session, expires);
    if !statements.contains(&new) {
        statements.push(new);
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

pub(crate) async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    if request.settings.get("revoke_sessions") != Some(&Value::Bool(true)) {
        return Ok(OkReply::default()); // the session ends at its expiry
    }
    let now = now_secs();
    let (session, expires) = match (&request.target, &request.lease_id) {
        (Some(target), _) => {
            let (Some(session), Some(expires)) = (
                target.meta.get("session_name").and_then(Value::as_str),
                target.meta.get("expires_epoch").and_then(Value::as_u64),
            ) else {
                return Ok(OkReply::default()); // not a session this plugin issued
            };
            (session.to_string(), expires)
        }
        // Issued for this lease, its reply lost: the session is named after the lease and
        // lives at most the role's maximum.
        (None, Some(lease)) => (
            session_name(request.secret.as_deref().unwrap_or("lease"), Some(lease)),
            now + max_session(request),
        ),
        (None, None) => return Err(ErrReply::fatal("no target and no lease_id")),
    };
    let session = session.as_str();
    if expires <= now {
        return Ok(OkReply::default()); // already over
    }
    let role = required(request, "role_arn")?;
    let role_name = role.rsplit('/').next().unwrap_or(role);
    let iam = aws_sdk_iam::Client::new(&admin_config(request).await?);

    // One read-modify-write of the policy at a time in this process.
    static POLICY: Mutex<()> = Mutex::const_new(());
    let _one_at_a_time = POLICY.lock().await;
    let existing = match iam
        .get_role_policy()
        .role_name(role_name)
        .policy_name(REVOKED_POLICY)
        .send()
        .await
    {
        Ok(out) => Some(out.policy_document().to_string()),
        Err(e) if error_code(&e).as_deref() == Some("NoSuchEntity") => None,
        Err(e) => return Err(sdk_error("GetRolePolicy", e)),
    };
    let mut policy = with_session_denied(existing.as_deref(), session, expires, now);
    if policy.to_string().len() > MAX_POLICY_CHARS {
        // Too many live revoked sessions to list: deny every session issued before now.
        let cutoff = aws_smithy_types::DateTime::from_secs(now as i64 + 1)
            .fmt(Format::DateTime)
            .map_err(|e| ErrReply::fatal(e.to_string()))?;
        policy = json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": format!("Until{}AllOlder", now + max_session(request)),
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": cutoff}}
            }]
        });
    }
    iam.put_role_policy()
        .role_name(role_name)
        .policy_name(REVOKED_POLICY)
        .policy_document(policy.to_string())
        .send()
        .await
        .map_err(|e| sdk_error("PutRolePolicy", e))?;
    Ok(OkReply::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_valid_and_unique() {
        let a = session_name("aws/deploy session", None);
        assert!(a.starts_with("kw-aws-deploy-session."), "{a}");
        assert_ne!(a, session_name("aws/deploy session", None));
        let lease = "0193f3c2-7d1e-7abc-8def-0123456789ab";
        assert_eq!(
            session_name("aws/x", Some(lease)),
            session_name("aws/x", Some(lease)),
            "a lease's session name can be found again"
        );
        let long = session_name(&"x".repeat(100), Some(lease));
        assert!(long.len() <= 64, "{long}");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || "=,.@-_".contains(c))
        );
    }

    #[test]
    fn revoked_sessions_accumulate_and_expired_ones_are_pruned() {
        let first = with_session_denied(None, "kw-a.1", 2_000_000_000, 1_900_000_000);
        let encoded: String = first
            .to_string()
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect();
        // IAM returns the document percent-encoded.
        let second = with_session_denied(Some(&encoded), "kw-b.2", 2_000_000_100, 1_900_000_000);
        let statements = second["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 2);
        assert_eq!(
            statements[1]["Condition"]["StringLike"]["aws:userid"],
            "*:kw-b.2"
        );
        // Once the first session has expired, its statement goes.
        let later = with_session_denied(
            Some(&second.to_string()),
            "kw-c.3",
            2_000_000_500,
            2_000_000_050,
        );
        let sessions: Vec<&str> = later["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["Condition"]["StringLike"]["aws:userid"].as_str().unwrap())
            .collect();
        assert_eq!(sessions, ["*:kw-b.2", "*:kw-c.3"]);
        // Revoking the same session twice is one statement.
        let again = with_session_denied(
            Some(&later.to_string()),
            "kw-c.3",
            2_000_000_500,
            2_000_000_050,
        );
        assert_eq!(again["Statement"].as_array().unwrap().len(), 2);
    }
}
