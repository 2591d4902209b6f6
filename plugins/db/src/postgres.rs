//! `postgres-password`: a role's password (`single`), two roles taking turns (`alternating`,
//! the second created as a member of the first so it has the same rights), and a role per lease
//! (`issue`: `LOGIN … VALID UNTIL … IN ROLE settings.group_role`, dropped with its sessions at
//! revoke). PostgreSQL holds one password per role: with `single` the old one stops working at
//! `create`, so clients retry a failed login once after fetching again.
//!
//! Statements with names or passwords are built by the server: `format('%I', '%L')`.

use keywarden_plugin_sdk::{ErrReply, OkReply, Op, Request, Secret};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor};

use crate::common::{self, Revoked, Strategy};

/// Answers one request of kind `postgres-password`.
pub async fn handle(request: &Request, op: Op) -> Result<OkReply, ErrReply> {
    match op {
        Op::Create => create(request).await,
        Op::Verify => {
            let (candidate, user) =
                common::credential_user(request.candidate.as_ref(), "candidate")?;
            login(request, user, &candidate.value).await?;
            Ok(OkReply::default())
        }
        Op::Revoke => revoke(request).await,
        Op::Issue => issue(request).await,
        _ => Err(ErrReply::unsupported()),
    }
}

/// The admin connection's options.
fn admin_options(request: &Request) -> Result<PgConnectOptions, ErrReply> {
    let admin = common::admin(request)?;
    let mut options: PgConnectOptions = admin
        .url
        .parse()
        .map_err(|e| ErrReply::fatal(format!("the admin URL is not a PostgreSQL URL: {e}")))?;
    if let Some(user) = &admin.user {
        options = options.username(user);
    }
    if !admin.password.expose().is_empty() {
        options = options.password(admin.password.expose());
    }
    Ok(options)
}

async fn connect_admin(request: &Request) -> Result<PgConnection, ErrReply> {
    PgConnection::connect_with(&admin_options(request)?)
        .await
        .map_err(|e| error("connecting as the admin", e))
}

/// Logs in as `user` with `password` on a fresh connection and runs `SELECT 1`.
async fn login(request: &Request, user: &str, password: &Secret) -> Result<(), ErrReply> {
    let options = admin_options(request)?
        .username(user)
        .password(password.expose());
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|e| error(&format!("logging in as {user}"), e))?;
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(|e| error(&format!("querying as {user}"), e))?;
    let _ = conn.close().await;
    Ok(())
}

/// Runs the statement `template` with its `%I`/`%L` placeholders filled in by the server.
async fn run(conn: &mut PgConnection, template: &str, args: &[&str]) -> Result<(), ErrReply> {
    let statement: String = sqlx::query_scalar("SELECT format($1, VARIADIC $2::text[])")
        .bind(template)
        .bind(args)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| error("preparing a statement", e))?;
    // Built by the server's own quoting from the template and the arguments, above.
    conn.execute(sqlx::AssertSqlSafe(statement))
        .await
        .map_err(|e| {
            error(
                template
                    .split(' ')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .as_str(),
                e,
            )
        })?;
    Ok(())
}

async fn role_exists(conn: &mut PgConnection, role: &str) -> Result<bool, ErrReply> {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(conn)
        .await
        .map_err(|e| error("looking up a role", e))
}

async fn create(request: &Request) -> Result<OkReply, ErrReply> {
    let target = common::rotating(request)?;
    let password = common::proposed(request)?;
    let mut conn = connect_admin(request).await?;
    match &target.other {
        Some(model) if !role_exists(&mut conn, &target.user).await? => {
            // The second user of an alternating pair: a member of the first, so it has the
            // same rights (what the first owns or was granted).
            run(
                &mut conn,
                "CREATE ROLE %I LOGIN PASSWORD %L IN ROLE %I",
                &[&target.user, password.expose(), model],
            )
            .await?;
        }
        _ => {
            if !role_exists(&mut conn, &target.user).await? {
                return Err(ErrReply::fatal(format!(
                    "role {:?} does not exist; create it (with its grants) first",
                    target.user
                )));
            }
            run(
                &mut conn,
                "ALTER ROLE %I WITH LOGIN PASSWORD %L",
                &[&target.user, password.expose()],
            )
            .await?;
        }
    }
    let _ = conn.close().await;
    let meta = json!({ "username": target.user });
    Ok(common::reply(password.clone(), meta, None))
}

async fn revoke(request: &Request) -> Result<OkReply, ErrReply> {
    let revoked = common::revoked(request)?;
    let mut conn = connect_admin(request).await?;
    match revoked {
        Revoked::LeaseUser(user) => drop_role(&mut conn, &user).await?,
        Revoked::Rotated { user, .. }
            if common::strategy(request)? == Strategy::Alternating
                && role_exists(&mut conn, user).await? =>
        {
            // The user not in use keeps its rights for the next turn but no password.
            run(&mut conn, "ALTER ROLE %I WITH PASSWORD NULL", &[user]).await?;
        }
        Revoked::Rotated { .. } => {}
    }
    // `single`: the old password was replaced at `create`; nothing is left to revoke.
    let _ = conn.close().await;
    Ok(OkReply::default())
}

/// Ends a lease user's sessions and drops it (and what it owns in this database).
async fn drop_role(conn: &mut PgConnection, user: &str) -> Result<(), ErrReply> {
    if !role_exists(conn, user).await? {
        return Ok(());
    }
    run(conn, "ALTER ROLE %I NOLOGIN", &[user]).await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(user)
        .execute(&mut *conn)
        .await
        .map_err(|e| error("ending the lease user's sessions", e))?;
    run(conn, "DROP OWNED BY %I", &[user]).await?;
    run(conn, "DROP ROLE IF EXISTS %I", &[user]).await
}

async fn issue(request: &Request) -> Result<OkReply, ErrReply> {
    let group = common::setting(request, "group_role")
        .ok_or_else(|| ErrReply::fatal("settings.group_role is required to issue users"))?;
    let user = common::lease_user(request)?;
    let password = common::random_password();
    let mut conn = connect_admin(request).await?;
    let (until, expires_at): (String, String) = sqlx::query_as(
        "SELECT (now() + make_interval(secs => $1))::text, \
                to_char((now() + make_interval(secs => $1)) AT TIME ZONE 'UTC', \
                        'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    )
    .bind(common::ttl_seconds(request) as f64)
    .fetch_one(&mut conn)
    .await
    .map_err(|e| error("computing the expiry", e))?;
    if role_exists(&mut conn, &user).await? {
        // A repeated issue of the same lease: a new password for the same user.
        run(
            &mut conn,
            "ALTER ROLE %I WITH LOGIN PASSWORD %L VALID UNTIL %L",
            &[&user, password.expose(), &until],
        )
        .await?;
    } else {
        run(
            &mut conn,
            "CREATE ROLE %I LOGIN PASSWORD %L VALID UNTIL %L IN ROLE %I",
            &[&user, password.expose(), &until, group],
        )
        .await?;
    }
    let _ = conn.close().await;
    let meta = json!({ "username": user, "lease": true });
    Ok(common::reply(password, meta, Some(expires_at)))
}

/// An error while `what`: refused logins and policy rejections are not worth retrying with the
/// same value; lost connections are.
fn error(what: &str, e: sqlx::Error) -> ErrReply {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let message = format!("{what}: {} (SQLSTATE {code})", db.message());
            match code.as_str() {
                // Out of memory, too many connections, shutting down, serialization failures.
                "53200" | "53300" | "57P01" | "57P03" | "40001" | "40P01" => {
                    ErrReply::retryable(message)
                }
                // 28P01 password refused, 42501 insufficient privilege, 22023 a password
                // policy (passwordcheck), 42704 no such role…: the same request fails again.
                _ => ErrReply::fatal(message),
            }
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => {
            ErrReply::retryable(format!("{what}: {e}"))
        }
        _ => ErrReply::retryable(format!("{what}: {e}")),
    }
}
