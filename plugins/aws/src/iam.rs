//! `aws-iam`: IAM access keys (create, verify, revoke; old and new overlap).
//!
//! Settings: `user_name`. The IAM user is dedicated to the secret: keywarden owns its keys.
//! Create never deletes the current key; with one, it deletes the user's other key first (a key
//! an earlier try of this rotation made, or one left behind), which also keeps the user under
//! IAM's two-key limit. Each create tags the user with its rotation id and the keys that were
//! there before it, so a retried first create deletes only what its earlier try made. Verify
//! calls `sts:GetCallerIdentity` signed by the new key; revoke deactivates, then deletes.

use aws_sdk_iam::types::{StatusType, Tag};
use keywarden_plugin_sdk::{ErrReply, Meta, OkReply, Request, Secret};
use serde_json::Value;

use crate::{admin_config, config_for, error_code, required, sdk_error};

const ROTATION_TAG: &str = "keywarden-rotation";

fn key_id(meta: &Meta) -> Option<&str> {
    meta.get("access_key_id").and_then(Value::as_str)
}

async fn delete_key(iam: &aws_sdk_iam::Client, user: &str, key: &str) -> Result<(), ErrReply> {
    let deactivated = iam
        .update_access_key()
        .user_name(user)
        .access_key_id(key)
        .status(StatusType::Inactive)
        .send()
        .await;
    match deactivated {
        Err(e) if error_code(&e).as_deref() == Some("NoSuchEntity") => return Ok(()),
        other => {
            other.map_err(|e| sdk_error("UpdateAccessKey", e))?;
        }
    }
    match iam
        .delete_access_key()
        .user_name(user)
        .access_key_id(key)
        .send()
        .await
    {
        Err(e) if error_code(&e).as_deref() == Some("NoSuchEntity") => Ok(()),
        other => other
            .map(|_| ())
            .map_err(|e| sdk_error("DeleteAccessKey", e)),
    }
}

/// The tag reads "ROTATION_ID[.KEY_ID…]": this rotation, and the keys that were there before
/// its first try (not ours to delete). Dots need no escaping anywhere along the way.
/// `Some(keys)` when an earlier try of `rotation` left its tag.
async fn keys_before_earlier_try(
    iam: &aws_sdk_iam::Client,
    user: &str,
    rotation: &str,
) -> Result<Option<Vec<String>>, ErrReply> {
    let tags = iam
        .list_user_tags()
        .user_name(user)
        .send()
        .await
        .map_err(|e| sdk_error("ListUserTags", e))?;
    Ok(tags
        .tags()
        .iter()
        .filter(|t| t.key() == ROTATION_TAG)
        .find_map(|t| t.value().strip_prefix(rotation))
        .map(|rest| {
            rest.split('.')
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        }))
}

/// Records on the user that `rotation` is creating a key, and which keys were there before.
async fn tag_rotation(
    iam: &aws_sdk_iam::Client,
    user: &str,
    rotation: &str,
    before: &[&String],
) -> Result<(), ErrReply> {
    let mut tag_value = rotation.to_string();
    for key in before {
        tag_value.push('.');
        tag_value.push_str(key);
    }
    let tag = Tag::builder()
        .key(ROTATION_TAG)
        .value(tag_value)
        .build()
        .map_err(|e| ErrReply::fatal(e.to_string()))?;
    iam.tag_user()
        .user_name(user)
        .tags(tag)
        .send()
        .await
        .map_err(|e| sdk_error("TagUser", e))?;
    Ok(())
}

pub(crate) async fn create(request: &Request) -> Result<OkReply, ErrReply> {
    let user = required(request, "user_name")?;
    let rotation = request
        .rotation_id
        .as_deref()
        .ok_or_else(|| ErrReply::fatal("no rotation_id"))?;
    let iam = aws_sdk_iam::Client::new(&admin_config(request).await?);
    let current = request
        .current
        .as_ref()
        .and_then(|c| key_id(&c.meta))
        .map(str::to_string);
    let keys = iam
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .map_err(|e| sdk_error("ListAccessKeys", e))?;
    let others: Vec<String> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id().map(str::to_string))
        .filter(|id| Some(id) != current.as_ref())
        .collect();
    let earlier_try = keys_before_earlier_try(&iam, user, rotation).await?;
    let (spent, unknown): (Vec<&String>, Vec<&String>) = match (&current, &earlier_try) {
        // The current key stays; the other is spent (IAM allows two).
        (Some(_), _) => (others.iter().collect(), Vec::new()),
        // A repeat: delete what the earlier try created, keep what was there before it.
        (None, Some(before)) => others.iter().partition(|k| !before.contains(*k)),
        (None, None) => (Vec::new(), others.iter().collect()),
    };
    for key in spent {
        delete_key(&iam, user, key).await?;
    }
    if unknown.len() >= 2 {
        return Err(ErrReply::fatal(format!(
            "IAM user {user} already has two access keys keywarden does not know; store the one in \
             use with `keywarden put NAME --meta access_key_id=…`, or delete one"
        )));
    }
    tag_rotation(&iam, user, rotation, &unknown).await?;
    let created = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| sdk_error("CreateAccessKey", e))?;
    let key = created
        .access_key()
        .ok_or_else(|| ErrReply::retryable("CreateAccessKey returned no key"))?;
    let mut meta = Meta::new();
    meta.insert("access_key_id".into(), key.access_key_id().into());
    meta.insert("user_name".into(), user.into());
    Ok(OkReply::credential(
        Secret::new(key.secret_access_key()),
        meta,
    ))
}

pub(crate) async fn verify(request: &Request) -> Result<OkReply, ErrReply> {
    let candidate = request
        .candidate
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no candidate"))?;
    let user = candidate
        .meta
        .get("user_name")
        .and_then(Value::as_str)
        .map_or_else(|| required(request, "user_name"), Ok)?;
    let sts = aws_sdk_sts::Client::new(&config_for(request, candidate)?);
    match sts.get_caller_identity().send().await {
        // Accepted is not enough: the key must sign as the user it was made for.
        Ok(identity) => match identity.arn() {
            Some(arn) if is_user_arn(arn, user) => Ok(OkReply::default()),
            other => Err(ErrReply::fatal(format!(
                "the new access key signs as {}, not as IAM user {user}",
                other.unwrap_or("nobody")
            ))),
        },
        // New IAM keys take a few seconds to be accepted everywhere: worth retrying.
        Err(e)
            if matches!(
                error_code(&e).as_deref(),
                Some("InvalidClientTokenId" | "SignatureDoesNotMatch")
            ) =>
        {
            Err(ErrReply::retryable(
                "the new access key is not accepted yet",
            ))
        }
        Err(e) => Err(sdk_error("GetCallerIdentity", e)),
    }
}

/// Whether `arn` names the IAM user `user` (under any path).
fn is_user_arn(arn: &str, user: &str) -> bool {
    arn.split_once(":user/")
        .is_some_and(|(_, path_and_name)| path_and_name.rsplit('/').next() == Some(user))
}

pub(crate) async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    let target = request
        .target
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("no target"))?;
    let Some(key) = key_id(&target.meta) else {
        return Ok(OkReply::default()); // nothing upstream to revoke
    };
    let user = target
        .meta
        .get("user_name")
        .and_then(Value::as_str)
        .map_or_else(|| required(request, "user_name"), Ok)?;
    let iam = aws_sdk_iam::Client::new(&admin_config(request).await?);
    delete_key(&iam, user, key).await?;
    Ok(OkReply::default())
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_arns_are_matched_by_name_under_any_path() {
        assert!(super::is_user_arn(
            "arn:aws:iam::123456789012:user/ci-deployer",
            "ci-deployer"
        ));
        assert!(super::is_user_arn(
            "arn:aws:iam::123456789012:user/teams/ci-deployer",
            "ci-deployer"
        ));
        assert!(!super::is_user_arn(
            "arn:aws:iam::123456789012:user/ci-deployer2",
            "ci-deployer"
        ));
        assert!(!super::is_user_arn(
            "arn:aws:sts::123456789012:assumed-role/ci-deployer/x",
            "ci-deployer"
        ));
    }
}
