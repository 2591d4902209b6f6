//! `redis-acl`: an ACL user's password (`single`: the new one is added beside the old, which
//! `revoke` removes, so both work during the drain), two users taking turns (`alternating`),
//! and a user per lease (`issue`: `ACL SETUSER` with `settings.rules`, deleted with its clients
//! killed at revoke). After every change the ACL is persisted (`ACL SAVE` where an ACL file is
//! configured, else `CONFIG REWRITE`); when neither can, the reply's `meta.acl_persisted` is
//! false and a warning goes to the log, because a restart of Redis would bring back what was
//! revoked.
//!
//! Names and passwords are separate command arguments, never spliced into a command line.

use keywarden_plugin_sdk::{ErrReply, OkReply, Op, Request, Secret};
use redis::aio::MultiplexedConnection;
use serde_json::json;

use crate::common::{self, Revoked, Strategy};

/// Answers one request of kind `redis-acl`.
pub async fn handle(request: &Request, op: Op) -> Result<OkReply, ErrReply> {
    match op {
        Op::Create => create(request).await,
        Op::Verify => {
            let (candidate, user) =
                common::credential_user(request.candidate.as_ref(), "candidate")?;
            if !logs_in(request, user, &candidate.value).await? {
                return Err(ErrReply::fatal(format!(
                    "{user} cannot log in with the new password"
                )));
            }
            Ok(OkReply::default())
        }
        Op::Revoke => revoke(request).await,
        Op::Issue => issue(request).await,
        _ => Err(ErrReply::unsupported()),
    }
}

/// A connection to the server named by the admin URL, not yet authenticated.
async fn connect(request: &Request) -> Result<MultiplexedConnection, ErrReply> {
    let admin = common::admin(request)?;
    let client = redis::Client::open(admin.url.as_str())
        .map_err(|e| ErrReply::fatal(format!("the admin URL is not a Redis URL: {e}")))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| ErrReply::retryable(format!("connecting to Redis: {e}")))
}

/// A connection authenticated as the admin (by the URL's own credentials, or `AUTH` with the
/// admin password).
async fn connect_admin(request: &Request) -> Result<MultiplexedConnection, ErrReply> {
    let admin = common::admin(request)?;
    let mut conn = connect(request).await?;
    if !admin.password.expose().is_empty() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = &admin.user {
            auth.arg(user);
        }
        auth.arg(admin.password.expose())
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| error("authenticating as the admin", e))?;
    }
    Ok(conn)
}

/// Whether `user` logs in with `password` on a fresh connection (and answers `PING`).
async fn logs_in(request: &Request, user: &str, password: &Secret) -> Result<bool, ErrReply> {
    let mut conn = connect(request).await?;
    let auth = redis::cmd("AUTH")
        .arg(user)
        .arg(password.expose())
        .query_async::<()>(&mut conn)
        .await;
    match auth {
        Ok(()) => {
            // Logged in. A user whose rules do not allow PING (`+get` only) is still a user
            // that works: NOPERM proves the session is theirs.
            match redis::cmd("PING").query_async::<String>(&mut conn).await {
                Ok(pong) => Ok(pong == "PONG"),
                Err(e) if e.code() == Some("NOPERM") => Ok(true),
                Err(e) => Err(error(&format!("PING as {user}"), e)),
            }
        }
        Err(e)
            if e.kind() == redis::ErrorKind::AuthenticationFailed
                || e.code() == Some("WRONGPASS") =>
        {
            Ok(false)
        }
        Err(e) => Err(error(&format!("logging in as {user}"), e)),
    }
}

async fn acl_setuser(
    conn: &mut MultiplexedConnection,
    user: &str,
    rules: &[String],
) -> Result<(), ErrReply> {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(rules)
        .query_async::<()>(conn)
        .await
        .map_err(|e| error("ACL SETUSER", e))
}

/// Persists the ACL; says whether it could.
async fn persist(conn: &mut MultiplexedConnection) -> bool {
    let saved = redis::cmd("ACL").arg("SAVE").query_async::<()>(conn).await;
    if saved.is_ok() {
        return true;
    }
    let rewritten = redis::cmd("CONFIG")
        .arg("REWRITE")
        .query_async::<()>(conn)
        .await;
    if rewritten.is_ok() {
        return true;
    }
    eprintln!(
        "warning: the ACL change could not be persisted (no ACL file, and CONFIG REWRITE failed: \
         the server runs without a config file?); a restart of Redis would undo it"
    );
    false
}

async fn create(request: &Request) -> Result<OkReply, ErrReply> {
    let target = common::rotating(request)?;
    let password = common::proposed(request)?;
    let mut conn = connect_admin(request).await?;
    let exists: Option<redis::Value> = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&target.user)
        .query_async(&mut conn)
        .await
        .map_err(|e| error("ACL GETUSER", e))?;
    let exists = !matches!(exists, None | Some(redis::Value::Nil));
    let mut rules = vec!["on".to_string()];
    if request.current.is_none() {
        // The first version keywarden manages: passwords it does not know are removed.
        rules.push("resetpass".into());
    }
    rules.push(format!(">{}", password.expose()));
    match &target.other {
        Some(model) if !exists => {
            // The second user of an alternating pair: the first one's rules, its own password.
            let described: Vec<String> = redis::cmd("ACL")
                .arg("LIST")
                .query_async(&mut conn)
                .await
                .map_err(|e| error("ACL LIST", e))?;
            let line = described
                .iter()
                .find(|l| l.split(' ').nth(1) == Some(model.as_str()))
                .ok_or_else(|| ErrReply::fatal(format!("ACL user {model:?} does not exist")))?;
            rules.extend(
                line.split(' ')
                    .skip(2)
                    .filter(|r| {
                        !r.starts_with('#') && !r.starts_with('>') && *r != "on" && *r != "off"
                    })
                    .map(str::to_string),
            );
        }
        _ if !exists => {
            return Err(ErrReply::fatal(format!(
                "ACL user {:?} does not exist; create it (with its rules) first",
                target.user
            )));
        }
        _ => {}
    }
    acl_setuser(&mut conn, &target.user, &rules).await?;
    let persisted = persist(&mut conn).await;
    let meta = json!({ "username": target.user, "acl_persisted": persisted });
    Ok(common::reply(password.clone(), meta, None))
}

async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    let revoked = common::revoked(request)?;
    let mut conn = connect_admin(request).await?;
    match revoked {
        Revoked::LeaseUser(user) => {
            let _: redis::Value = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&user)
                .query_async(&mut conn)
                .await
                .map_err(|e| error("ACL DELUSER", e))?;
            let _: redis::Value = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg(&user)
                .query_async(&mut conn)
                .await
                .unwrap_or(redis::Value::Nil);
            persist(&mut conn).await;
        }
        Revoked::Rotated { credential, user } => {
            // Remove just the old password (the new one stays); alternating also turns the
            // user not in use off until its next turn.
            let mut rules = vec![format!("<{}", credential.value.expose())];
            if common::strategy(request)? == Strategy::Alternating {
                rules.push("off".into());
            }
            match acl_setuser(&mut conn, user, &rules).await {
                Ok(()) => {}
                // Removing a password the user no longer has: already revoked.
                Err(e)
                    if e.message.contains("no such password")
                        || e.message.contains("doesn't exist") => {}
                Err(e) => return Err(e),
            }
            persist(&mut conn).await;
            // Prove it: the old password no longer logs in.
            if logs_in(request, user, &credential.value).await? {
                return Err(ErrReply::retryable(format!(
                    "{user} still logs in with the revoked password"
                )));
            }
        }
    }
    Ok(OkReply::default())
}

async fn issue(request: &Request) -> Result<OkReply, ErrReply> {
    let extra = common::setting_list(request, "rules")?;
    if extra.is_empty() {
        return Err(ErrReply::fatal(
            "settings.rules is required to issue users (e.g. [\"~app:*\", \"+@read\"])",
        ));
    }
    let user = common::lease_user(request)?;
    let password = common::random_password();
    let mut conn = connect_admin(request).await?;
    let mut rules = vec![
        "reset".to_string(),
        "on".into(),
        format!(">{}", password.expose()),
    ];
    rules.extend(extra);
    acl_setuser(&mut conn, &user, &rules).await?;
    let persisted = persist(&mut conn).await;
    let meta = json!({ "username": user, "lease": true, "acl_persisted": persisted });
    Ok(common::reply(password, meta, None))
}

/// An error while `what`, never with the command's arguments (passwords).
fn error(what: &str, e: redis::RedisError) -> ErrReply {
    let message = format!(
        "{what}: {}",
        e.detail().map_or_else(
            || format!("{:?}", e.kind()),
            |d| format!("{:?}: {d}", e.kind())
        )
    );
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        ErrReply::retryable(message)
    } else {
        ErrReply::fatal(message)
    }
}
