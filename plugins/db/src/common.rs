//! What every engine reads from a request: the strategy, the user(s), the admin connection, the
//! new password, and a lease user's name.

use keywarden_plugin_sdk::{Credential, ErrReply, OkReply, Request, Secret};
use serde_json::Value;

/// How a secret's password rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One user; its password changes.
    Single,
    /// Two users with the same rights; the one not in use changes.
    Alternating,
}

/// A string setting.
pub fn setting<'a>(request: &'a Request, key: &str) -> Option<&'a str> {
    request.settings.get(key).and_then(Value::as_str)
}

/// A list-of-strings setting (empty when absent).
pub fn setting_list(request: &Request, key: &str) -> Result<Vec<String>, ErrReply> {
    match request.settings.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ErrReply::fatal(format!("settings.{key} must list strings")))
            })
            .collect(),
        Some(_) => Err(ErrReply::fatal(format!("settings.{key} must be a list"))),
    }
}

/// `settings.strategy` (default `single`).
pub fn strategy(request: &Request) -> Result<Strategy, ErrReply> {
    match setting(request, "strategy").unwrap_or("single") {
        "single" => Ok(Strategy::Single),
        "alternating" => Ok(Strategy::Alternating),
        other => Err(ErrReply::fatal(format!(
            "settings.strategy {other:?}: use \"single\" or \"alternating\""
        ))),
    }
}

/// The user whose password a `create` changes, and (alternating) the user it copies rights
/// from when that user does not exist yet.
pub struct Rotating {
    /// The user to change.
    pub user: String,
    /// Alternating: the other user (current now).
    pub other: Option<String>,
}

/// Which user a `create` changes: `settings.username` (single), or the one of
/// `settings.usernames` that `current.meta.username` does not name (alternating).
pub fn rotating(request: &Request) -> Result<Rotating, ErrReply> {
    match strategy(request)? {
        Strategy::Single => Ok(Rotating {
            user: setting(request, "username")
                .ok_or_else(|| ErrReply::fatal("settings.username is required"))?
                .to_string(),
            other: None,
        }),
        Strategy::Alternating => {
            let users = setting_list(request, "usernames")?;
            let [a, b] = <[String; 2]>::try_from(users).map_err(|_| {
                ErrReply::fatal("settings.usernames must name two users for strategy alternating")
            })?;
            let current = request
                .current
                .as_ref()
                .and_then(|c| c.meta.get("username"))
                .and_then(Value::as_str);
            Ok(if current == Some(b.as_str()) {
                Rotating {
                    user: a,
                    other: Some(b),
                }
            } else {
                // The first rotation (or one from `a`) moves to `b`, created from `a` if need be.
                Rotating {
                    user: b,
                    other: Some(a),
                }
            })
        }
    }
}

/// The new password: `proposed`.
pub fn proposed(request: &Request) -> Result<&Secret, ErrReply> {
    request
        .proposed
        .as_ref()
        .ok_or_else(|| ErrReply::fatal("the request has no proposed value"))
}

/// The credential a `verify` or `revoke` is about, with its user.
pub fn credential_user<'a>(
    credential: Option<&'a Credential>,
    what: &str,
) -> Result<(&'a Credential, &'a str), ErrReply> {
    let c = credential.ok_or_else(|| ErrReply::fatal(format!("the request has no {what}")))?;
    let user = c
        .meta
        .get("username")
        .and_then(Value::as_str)
        .ok_or_else(|| ErrReply::fatal(format!("the {what} has no meta.username")))?;
    Ok((c, user))
}

/// What a `revoke` ends.
pub enum Revoked<'a> {
    /// A user issued for one lease: dropped.
    LeaseUser(String),
    /// An earlier password of the secret's own user.
    Rotated {
        /// The credential to revoke.
        credential: &'a Credential,
        /// Its user.
        user: &'a str,
    },
}

/// What a `revoke` request ends: the lease user its target names (`meta.lease`), or the one
/// its lease id names when it has no target (the daemon died between journaling an `issue`
/// and learning its answer, and revokes by lease id at its next start), or a rotated password.
pub fn revoked(request: &Request) -> Result<Revoked<'_>, ErrReply> {
    match request.target.as_ref() {
        None if request.lease_id.is_some() => Ok(Revoked::LeaseUser(lease_user(request)?)),
        target => {
            let (credential, user) = credential_user(target, "target")?;
            if credential.meta.get("lease").and_then(Value::as_bool) == Some(true) {
                Ok(Revoked::LeaseUser(user.to_string()))
            } else {
                Ok(Revoked::Rotated { credential, user })
            }
        }
    }
}

/// The admin connection: `credentials.admin` is a URL with its password, or a password for the
/// URL in `settings.url` (its user from the URL or the credential's `meta.username`).
pub struct Admin {
    /// The URL (its password, if any, is replaced by `password`).
    pub url: String,
    /// The user, when not in the URL.
    pub user: Option<String>,
    /// The password.
    pub password: Secret,
}

/// Reads the admin connection of a request.
pub fn admin(request: &Request) -> Result<Admin, ErrReply> {
    let c = request.credentials.get("admin").ok_or_else(|| {
        ErrReply::fatal("credentials.admin is required (a secret holding a URL or a password)")
    })?;
    let user = c
        .meta
        .get("username")
        .and_then(Value::as_str)
        .map(str::to_string);
    if c.value.expose().contains("://") {
        return Ok(Admin {
            url: c.value.expose().to_string(),
            user,
            password: Secret::default(),
        });
    }
    let url = setting(request, "url").ok_or_else(|| {
        ErrReply::fatal("settings.url is required when credentials.admin holds a password")
    })?;
    Ok(Admin {
        url: url.to_string(),
        user,
        password: c.value.clone(),
    })
}

/// The name of the user issued for `lease_id`: `settings.lease_prefix` (default `kw_`) and the
/// lease id's first 16 hex digits, so a repeated `issue` of one lease finds its user.
pub fn lease_user(request: &Request) -> Result<String, ErrReply> {
    let lease = request
        .lease_id
        .as_deref()
        .ok_or_else(|| ErrReply::fatal("issue needs a lease_id"))?;
    let hex: String = lease
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    if hex.len() < 16 {
        return Err(ErrReply::fatal("the lease id is not a UUID"));
    }
    Ok(format!(
        "{}{}",
        setting(request, "lease_prefix").unwrap_or("kw_"),
        hex.to_ascii_lowercase()
    ))
}

/// A random password for an issued user: 32 characters every engine and URL accept.
pub fn random_password() -> Secret {
    use ring::rand::SecureRandom;
    const CHARSET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 64];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    // 64 bytes, each kept only below the largest multiple of the charset's size: no bias.
    let limit = 256 - 256 % CHARSET.len();
    let password: String = bytes
        .iter()
        .filter(|b| usize::from(**b) < limit)
        .take(32)
        .map(|b| CHARSET[usize::from(*b) % CHARSET.len()] as char)
        .collect();
    if password.len() < 32 {
        return random_password();
    }
    Secret::new(password)
}

/// A reply with a credential: its value, `meta` (a JSON object) and, for an issued one, when
/// it expires.
pub fn reply(value: Secret, meta: Value, expires_at: Option<String>) -> OkReply {
    OkReply {
        value: Some(value),
        meta: meta.as_object().cloned().unwrap_or_default(),
        expires_at,
    }
}

/// The lease's time to live, seconds (at least one).
pub fn ttl_seconds(request: &Request) -> u64 {
    request.ttl_seconds.unwrap_or(300).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(settings: Value, current_user: Option<&str>) -> Request {
        Request {
            settings: settings.as_object().unwrap().clone(),
            current: current_user.map(|u| Credential {
                version: Some(1),
                value: Secret::new("x"),
                meta: serde_json::json!({ "username": u })
                    .as_object()
                    .unwrap()
                    .clone(),
            }),
            ..Request::default()
        }
    }

    #[test]
    fn alternating_changes_the_user_not_in_use() {
        let settings =
            serde_json::json!({ "strategy": "alternating", "usernames": ["app_a", "app_b"] });
        assert_eq!(
            rotating(&request(settings.clone(), None)).unwrap().user,
            "app_b"
        );
        assert_eq!(
            rotating(&request(settings.clone(), Some("app_b")))
                .unwrap()
                .user,
            "app_a"
        );
        assert_eq!(
            rotating(&request(settings, Some("app_a"))).unwrap().user,
            "app_b"
        );
        let single = serde_json::json!({ "username": "app" });
        assert_eq!(rotating(&request(single, Some("app"))).unwrap().user, "app");
        let bad = serde_json::json!({ "strategy": "alternating", "usernames": ["only"] });
        assert!(rotating(&request(bad, None)).is_err());
    }

    #[test]
    fn lease_users_are_named_by_the_lease_and_passwords_are_plain() {
        let r = Request {
            lease_id: Some("0190A2B3-C4D5-7E6F-8091-A2B3C4D5E6F7".into()),
            ..Request::default()
        };
        assert_eq!(lease_user(&r).unwrap(), "kw_0190a2b3c4d57e6f");
        let p = random_password();
        assert_eq!(p.expose().len(), 32);
        assert!(p.expose().bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
