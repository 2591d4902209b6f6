//! `mysql-password` (MariaDB and MySQL): a user's password (`single`), two users taking turns
//! (`alternating`, the second created with the first's grants), and a user per lease (`issue`:
//! `CREATE USER` with `settings.grants`, dropped with its connections killed at revoke).
//! MariaDB holds one password per user (MySQL 8.0.14+ could retain the old one, which this
//! plugin does not rely on): with `single` the old one stops working at `create`.
//!
//! Names and passwords are quoted by the server (`QUOTE()`), never concatenated raw; users are
//! `'name'@'settings.host'` (default `%`).

use keywarden_plugin_sdk::{ErrReply, OkReply, Op, Request, Secret};
use serde_json::json;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{Connection, Executor, Row};

use crate::common::{self, Revoked, Strategy};

/// Answers one request of kind `mysql-password`.
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

fn admin_options(request: &Request) -> Result<MySqlConnectOptions, ErrReply> {
    let admin = common::admin(request)?;
    let mut options: MySqlConnectOptions = admin
        .url
        .parse()
        .map_err(|e| ErrReply::fatal(format!("the admin URL is not a MySQL URL: {e}")))?;
    if let Some(user) = &admin.user {
        options = options.username(user);
    }
    if !admin.password.expose().is_empty() {
        options = options.password(admin.password.expose());
    }
    Ok(options)
}

async fn connect_admin(request: &Request) -> Result<MySqlConnection, ErrReply> {
    MySqlConnection::connect_with(&admin_options(request)?)
        .await
        .map_err(|e| error("connecting as the admin", e))
}

/// Logs in as `user` on a fresh connection to the admin's server: to `settings.database` when
/// set, else to no database (the admin's may not be the user's).
async fn login(request: &Request, user: &str, password: &Secret) -> Result<(), ErrReply> {
    let admin = admin_options(request)?;
    let mut options = MySqlConnectOptions::new()
        .host(admin.get_host())
        .port(admin.get_port())
        .username(user)
        .password(password.expose());
    if let Some(database) = common::setting(request, "database") {
        options = options.database(database);
    }
    let mut conn = MySqlConnection::connect_with(&options)
        .await
        .map_err(|e| error(&format!("logging in as {user}"), e))?;
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(|e| error(&format!("querying as {user}"), e))?;
    let _ = conn.close().await;
    Ok(())
}

/// `'value'` as the server quotes it.
async fn quote(conn: &mut MySqlConnection, value: &str) -> Result<String, ErrReply> {
    sqlx::query_scalar("SELECT QUOTE(?)")
        .bind(value)
        .fetch_one(conn)
        .await
        .map_err(|e| error("quoting", e))
}

/// `'name'@'host'`, quoted by the server.
async fn account(
    conn: &mut MySqlConnection,
    request: &Request,
    user: &str,
) -> Result<String, ErrReply> {
    let host = common::setting(request, "host").unwrap_or("%");
    Ok(format!(
        "{}@{}",
        quote(conn, user).await?,
        quote(conn, host).await?
    ))
}

async fn exists(
    conn: &mut MySqlConnection,
    request: &Request,
    user: &str,
) -> Result<bool, ErrReply> {
    let host = common::setting(request, "host").unwrap_or("%");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = ?")
        .bind(user)
        .bind(host)
        .fetch_one(conn)
        .await
        .map_err(|e| error("looking up a user", e))?;
    Ok(n > 0)
}

/// Runs a statement whose names and values were quoted by the server ([`quote`], [`account`])
/// or come from the operator's config (grants).
async fn run(conn: &mut MySqlConnection, statement: &str, what: &str) -> Result<(), ErrReply> {
    conn.execute(sqlx::AssertSqlSafe(statement.to_string()))
        .await
        .map_err(|e| error(what, e))?;
    Ok(())
}

async fn create(request: &Request) -> Result<OkReply, ErrReply> {
    let target = common::rotating(request)?;
    let password = common::proposed(request)?;
    let mut conn = connect_admin(request).await?;
    let who = account(&mut conn, request, &target.user).await?;
    let secret = quote(&mut conn, password.expose()).await?;
    match &target.other {
        Some(model) if !exists(&mut conn, request, &target.user).await? => {
            // The second user of an alternating pair gets the first one's grants.
            let model_account = account(&mut conn, request, model).await?;
            let grants: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SHOW GRANTS FOR {model_account}"
            )))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| error("reading the first user's grants", e))?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| error("reading the first user's grants", e))?;
            run(
                &mut conn,
                &format!("CREATE USER {who} IDENTIFIED BY {secret}"),
                "CREATE USER",
            )
            .await?;
            for grant in grants {
                // `GRANT … TO 'a'@'%' [IDENTIFIED BY PASSWORD '…']`: the same grant, to the
                // new user, without the first one's password hash.
                let Some(privileges) = grant.split(" TO ").next() else {
                    continue;
                };
                if privileges.starts_with("GRANT USAGE ON *.*") {
                    continue;
                }
                let with_grant = if grant.ends_with("WITH GRANT OPTION") {
                    " WITH GRANT OPTION"
                } else {
                    ""
                };
                run(
                    &mut conn,
                    &format!("{privileges} TO {who}{with_grant}"),
                    "GRANT",
                )
                .await?;
            }
        }
        _ => {
            if !exists(&mut conn, request, &target.user).await? {
                return Err(ErrReply::fatal(format!(
                    "user {who} does not exist; create it (with its grants) first"
                )));
            }
            // An alternating user locked at its last revoke is unlocked for its turn.
            let unlock = if target.other.is_some() {
                " ACCOUNT UNLOCK"
            } else {
                ""
            };
            run(
                &mut conn,
                &format!("ALTER USER {who} IDENTIFIED BY {secret}{unlock}"),
                "ALTER USER",
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
        Revoked::LeaseUser(user) => drop_user(&mut conn, request, &user).await?,
        Revoked::Rotated { user, .. }
            if common::strategy(request)? == Strategy::Alternating
                && exists(&mut conn, request, user).await? =>
        {
            // The user not in use keeps its grants but cannot log in until its next turn.
            let who = account(&mut conn, request, user).await?;
            run(
                &mut conn,
                &format!("ALTER USER {who} ACCOUNT LOCK"),
                "ALTER USER",
            )
            .await?;
        }
        Revoked::Rotated { .. } => {}
    }
    let _ = conn.close().await;
    Ok(OkReply::default())
}

/// Kills a lease user's connections and drops it.
async fn drop_user(
    conn: &mut MySqlConnection,
    request: &Request,
    user: &str,
) -> Result<(), ErrReply> {
    if !exists(conn, request, user).await? {
        return Ok(());
    }
    let who = account(conn, request, user).await?;
    run(
        conn,
        &format!("ALTER USER {who} ACCOUNT LOCK"),
        "ALTER USER",
    )
    .await?;
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE USER = ?",
    )
    .bind(user)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| error("listing the lease user's connections", e))?;
    for id in ids {
        // A connection may end by itself meanwhile: "unknown thread" is fine.
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
            .await;
    }
    run(conn, &format!("DROP USER IF EXISTS {who}"), "DROP USER").await
}

async fn issue(request: &Request) -> Result<OkReply, ErrReply> {
    let grants = common::setting_list(request, "grants")?;
    if grants.is_empty() {
        return Err(ErrReply::fatal(
            "settings.grants is required to issue users (e.g. [\"SELECT ON app.*\"])",
        ));
    }
    let user = common::lease_user(request)?;
    let password = common::random_password();
    let mut conn = connect_admin(request).await?;
    let who = account(&mut conn, request, &user).await?;
    let secret = quote(&mut conn, password.expose()).await?;
    if exists(&mut conn, request, &user).await? {
        run(
            &mut conn,
            &format!("ALTER USER {who} IDENTIFIED BY {secret} ACCOUNT UNLOCK"),
            "ALTER USER",
        )
        .await?;
    } else {
        run(
            &mut conn,
            &format!("CREATE USER {who} IDENTIFIED BY {secret}"),
            "CREATE USER",
        )
        .await?;
    }
    for grant in &grants {
        // Grants come from the operator's config, not from a request's caller.
        run(&mut conn, &format!("GRANT {grant} TO {who}"), "GRANT").await?;
    }
    let expires_at: String = sqlx::query_scalar(
        "SELECT DATE_FORMAT(UTC_TIMESTAMP() + INTERVAL ? SECOND, '%Y-%m-%dT%H:%i:%sZ')",
    )
    .bind(common::ttl_seconds(request) as i64)
    .fetch_one(&mut conn)
    .await
    .map_err(|e| error("computing the expiry", e))?;
    let _ = conn.close().await;
    let meta = json!({ "username": user, "lease": true });
    Ok(common::reply(password, meta, Some(expires_at)))
}

/// An error while `what`. A refused login or a password the server's policy rejects fails
/// again with the same value; lost connections and lock waits may pass.
fn error(what: &str, e: sqlx::Error) -> ErrReply {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let message = format!("{what}: {} ({code})", db.message());
            match code.as_str() {
                // Lock wait timeout, deadlock, too many connections.
                "HY000" if db.message().contains("Lock wait") => ErrReply::retryable(message),
                "40001" | "08004" => ErrReply::retryable(message),
                _ => ErrReply::fatal(message),
            }
        }
        _ => ErrReply::retryable(format!("{what}: {e}")),
    }
}
