//! The database plugin through the real daemon against the real servers on this machine:
//! a PostgreSQL cluster the test starts with `scram-sha-256` (so a wrong password is really
//! refused), MariaDB (`KEYWARDEN_TEST_MYSQL_URL`) and Redis (`KEYWARDEN_TEST_REDIS_URL`).
//! Every login is checked with the command-line clients (`psql`, `mariadb`, `redis-cli`), and
//! each server is first shown to refuse a wrong password.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keywarden_testkit::daemon::{base_config, sha256_of, wait_for, wait_for_explained};
use keywarden_testkit::postgres::Postgres;
use keywarden_testkit::{Env, curl};
use serde_json::{Value, json};

// ---- servers ---------------------------------------------------------------------------------

/// A service URL from the environment, or `None` (with a note) outside CI.
fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{var} is not set (.ci/run sets it)"
            );
            eprintln!("skipping: {var} is not set");
            None
        }
    }
}

// ---- keywarden -------------------------------------------------------------------------------

fn plugin_config() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden-plugin-db"));
    format!(
        "[plugins.db]\ncommand = [{:?}]\nsha256 = \"{}\"\n",
        bin.display().to_string(),
        sha256_of(bin)
    )
}

/// A store with the plugin pinned, the admin URL stored as `admin`, and `secrets` declared;
/// `curl` (this uid) may fetch every secret over the agent socket.
fn env_with(admin_url: &str, secrets: &str) -> Env {
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n{}\n{secrets}\n\n[[policy]]\nname = \"tests\"\nuids = [0]\nsame_user = true\nsecrets = [\"**\"]\n",
            base_config("20s"),
            plugin_config(),
        ),
    )
    .unwrap();
    env.ok(&["init"], None);
    env.ok(&["put", "admin"], Some(admin_url.as_bytes()));
    env
}

/// `rotate NAME --json` through the daemon, then waits until the rotation is done; returns
/// the new version.
fn rotate(env: &Env, name: &str) -> i64 {
    let out = env.run(&["rotate", name, "--json"], None);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rotate {name}: {result} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = result["to_version"].as_i64().unwrap();
    wait_done(env, name, version);
    version
}

fn wait_done(env: &Env, name: &str, version: i64) {
    wait_for_explained(
        &format!("{name} v{version} done"),
        Duration::from_secs(30),
        || {
            let e = env.entry(name);
            (e["version"] == version
                && (e["rotation_state"].is_null() || e["rotation_state"] == "done"))
                .then_some(())
        },
        || env.entry(name).to_string(),
    );
}

/// The current value and `meta.username` of a secret, read with `get --admin` through the
/// daemon.
fn current(env: &Env, name: &str) -> (String, String) {
    let out = env.ok(&["get", name, "--json", "--admin"], None);
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v["value"].as_str().unwrap().to_string(),
        v["meta"]["username"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

// ---- PostgreSQL ------------------------------------------------------------------------------

#[test]
fn postgres_single_the_new_password_logs_in_and_the_old_is_refused() {
    let Some(pg) = Postgres::start() else { return };
    assert!(
        pg.psql("postgres", "not the password", "SELECT 1").is_err(),
        "this cluster must refuse a wrong password"
    );
    pg.admin("CREATE ROLE app LOGIN PASSWORD 'initial-password'");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = { admin = "admin" }
settings = { username = "app" }
grace = "0s"
"#,
    );
    let daemon = env.start_daemon();
    wait_done(&env, "pg/app", 1);
    let (v1, user) = current(&env, "pg/app");
    assert_eq!(user, "app");
    assert_eq!(pg.psql("app", &v1, "SELECT current_user").unwrap(), "app");
    assert!(pg.psql("app", "initial-password", "SELECT 1").is_err());
    rotate(&env, "pg/app");
    let (v2, _) = current(&env, "pg/app");
    assert_ne!(v1, v2);
    assert_eq!(pg.psql("app", &v2, "SELECT 1").unwrap(), "1");
    let refused = pg.psql("app", &v1, "SELECT 1").unwrap_err();
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(!log.contains(&v1) && !log.contains(&v2));
}

#[test]
fn postgres_alternating_takes_turns_and_the_user_not_in_use_cannot_log_in() {
    let Some(pg) = Postgres::start() else { return };
    pg.admin("CREATE ROLE app_a LOGIN PASSWORD 'initial-password'");
    pg.admin("CREATE TABLE notes (body text); GRANT SELECT ON notes TO app_a");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = { admin = "admin" }
settings = { strategy = "alternating", usernames = ["app_a", "app_b"] }
grace = "0s"
"#,
    );
    let _daemon = env.start_daemon();
    wait_done(&env, "pg/app", 1);
    // The first rotation creates app_b with app_a's rights.
    let (v1, user1) = current(&env, "pg/app");
    assert_eq!(user1, "app_b");
    assert_eq!(
        pg.psql("app_b", &v1, "SELECT count(*) FROM notes").unwrap(),
        "0"
    );
    rotate(&env, "pg/app");
    let (v2, user2) = current(&env, "pg/app");
    assert_eq!(user2, "app_a");
    assert_eq!(
        pg.psql("app_a", &v2, "SELECT count(*) FROM notes").unwrap(),
        "0"
    );
    // After the revoke, the user not in use has no password.
    assert!(pg.psql("app_b", &v1, "SELECT 1").is_err());
    rotate(&env, "pg/app");
    let (v3, user3) = current(&env, "pg/app");
    assert_eq!(user3, "app_b");
    assert_eq!(pg.psql("app_b", &v3, "SELECT 1").unwrap(), "1");
    assert!(pg.psql("app_a", &v2, "SELECT 1").is_err());
}

#[test]
fn postgres_lease_users_appear_on_fetch_and_vanish_with_their_sessions_at_lease_end() {
    let Some(pg) = Postgres::start() else { return };
    pg.admin("CREATE ROLE readers NOLOGIN");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/lease"]
provider = "postgres-lease"
credentials = { admin = "admin" }
settings = { group_role = "readers" }
"#,
    );
    let _daemon = env.start_daemon();
    let (status, body) = curl(
        &env.agent_socket(),
        "GET",
        "/v1/secrets/pg/lease?ttl=3",
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let lease: Value = serde_json::from_str(&body).unwrap();
    let user = lease["meta"]["username"].as_str().unwrap().to_string();
    let password = lease["value"].as_str().unwrap().to_string();
    assert!(user.starts_with("kw_"), "{user}");
    assert_eq!(
        pg.psql(&user, &password, "SELECT pg_has_role('readers', 'member')")
            .unwrap(),
        "t"
    );
    // A session open when the lease ends is ended with it.
    let mut session = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-d",
            "postgres",
        ])
        .args(["-U", &user, "-XAtqc", "SELECT pg_sleep(120)"])
        .env("PGPASSWORD", &password)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the session", Duration::from_secs(10), || {
        (pg.admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"
        )) == "1")
            .then_some(())
    });
    wait_for(
        "the lease user to be dropped",
        Duration::from_secs(30),
        || {
            (pg.admin(&format!(
                "SELECT count(*) FROM pg_roles WHERE rolname = '{user}'"
            )) == "0")
                .then_some(())
        },
    );
    let ended = wait_for("the session to end", Duration::from_secs(10), || {
        session.try_wait().unwrap()
    });
    assert!(!ended.success());
    assert!(pg.psql(&user, &password, "SELECT 1").is_err());
}

/// The plugin speaking protocol v1 on its stdin/stdout, without the daemon: for requests the
/// daemon would never build (hostile names and passwords).
struct Plugin {
    child: Child,
    lines: BufReader<std::process::ChildStdout>,
    next: u64,
}

impl Plugin {
    fn start() -> Plugin {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keywarden-plugin-db"))
            .arg("--keywarden-plugin=1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut hello = String::new();
        lines.read_line(&mut hello).unwrap();
        assert!(hello.contains("postgres-password"), "{hello}");
        Plugin {
            child,
            lines,
            next: 1,
        }
    }

    fn call(&mut self, mut request: Value) -> Value {
        request["id"] = json!(self.next);
        self.next += 1;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{request}").unwrap();
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const HOSTILE_NAME: &str = "ro'le \"x\"; DROP TABLE t; -- \\ 100% é";
const HOSTILE_PASSWORD: &str = "p'a\"s s;w\\o%r--d é ' OR '1'='1";

#[test]
fn postgres_names_and_passwords_with_quotes_and_semicolons_stay_data() {
    let Some(pg) = Postgres::start() else { return };
    pg.admin("CREATE TABLE t (x int)");
    // The role is created by the admin with psql's own quoting.
    let quoted_name = format!("\"{}\"", HOSTILE_NAME.replace('"', "\"\""));
    pg.admin(&format!("CREATE ROLE {quoted_name} LOGIN"));
    let mut plugin = Plugin::start();
    let admin = json!({ "admin": { "value": pg.admin_url(), "meta": {} } });
    let created = plugin.call(json!({
        "op": "create", "kind": "postgres-password", "secret": "pg/hostile",
        "rotation_id": "r1", "settings": { "username": HOSTILE_NAME },
        "credentials": admin, "proposed": HOSTILE_PASSWORD,
    }));
    assert!(created["ok"].is_object(), "{created}");
    assert_eq!(
        pg.psql(HOSTILE_NAME, HOSTILE_PASSWORD, "SELECT current_user")
            .unwrap(),
        HOSTILE_NAME
    );
    let verified = plugin.call(json!({
        "op": "verify", "kind": "postgres-password", "secret": "pg/hostile",
        "settings": { "username": HOSTILE_NAME }, "credentials": admin,
        "candidate": { "value": HOSTILE_PASSWORD, "meta": { "username": HOSTILE_NAME } },
    }));
    assert!(verified["ok"].is_object(), "{verified}");
    assert_eq!(
        pg.admin("SELECT count(*) FROM t"),
        "0",
        "the table survived"
    );
}

// ---- MariaDB ---------------------------------------------------------------------------------

fn mariadb(user: &str, password: &str, sql: &str) -> Result<String, String> {
    let url = std::env::var("KEYWARDEN_TEST_MYSQL_URL").unwrap();
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap_or("3306");
    let out = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            port,
            "-u",
            user,
            "-N",
            "-B",
            "-e",
            sql,
        ])
        .env("MYSQL_PWD", password)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn mariadb_single_the_new_password_logs_in_and_the_old_is_refused() {
    let Some(url) = service("KEYWARDEN_TEST_MYSQL_URL") else {
        return;
    };
    let user = format!("kwtest_{}", std::process::id());
    mariadb("root", "", &format!("DROP USER IF EXISTS '{user}'@'%'; CREATE USER '{user}'@'%' IDENTIFIED BY 'initial-password'")).unwrap();
    assert!(
        mariadb(&user, "not the password", "SELECT 1").is_err(),
        "MariaDB must refuse a wrong password"
    );
    let env = env_with(
        &url,
        &format!(
            r#"[secrets."my/app"]
provider = "mysql-password"
credentials = {{ admin = "admin" }}
settings = {{ username = "{user}" }}
grace = "0s"
"#
        ),
    );
    let _daemon = env.start_daemon();
    wait_done(&env, "my/app", 1);
    let (v1, _) = current(&env, "my/app");
    assert_eq!(
        mariadb(&user, &v1, "SELECT CURRENT_USER()").unwrap(),
        format!("{user}@%")
    );
    rotate(&env, "my/app");
    let (v2, _) = current(&env, "my/app");
    assert_eq!(mariadb(&user, &v2, "SELECT 1").unwrap(), "1");
    assert!(mariadb(&user, &v1, "SELECT 1").is_err());
    mariadb("root", "", &format!("DROP USER '{user}'@'%'")).unwrap();
}

// ---- Redis -----------------------------------------------------------------------------------

/// `redis-cli` as `user` with `password`: `Ok(output)` when it logged in, `Err(why)` when the
/// server refused the login. (A refused `AUTH` does not end redis-cli's session: where the
/// default user needs no password its commands would still answer, so the login itself is what
/// is checked.)
fn redis_cli(user: &str, password: &str, args: &[&str]) -> Result<String, String> {
    let url = std::env::var("KEYWARDEN_TEST_REDIS_URL").unwrap();
    let out = Command::new("redis-cli")
        .args([
            "-u",
            &url,
            "--user",
            user,
            "--pass",
            password,
            "--no-auth-warning",
        ])
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if stderr.contains("AUTH failed") || stdout.contains("WRONGPASS") {
        Err(format!("{stderr}{stdout}"))
    } else {
        Ok(stdout)
    }
}

#[test]
fn redis_single_keeps_both_passwords_until_revoke_then_refuses_the_old() {
    let Some(url) = service("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    let user = format!("kwtest_{}", std::process::id());
    let admin = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-u", &url])
            .args(args)
            .output()
            .unwrap()
    };
    admin(&[
        "ACL",
        "SETUSER",
        &user,
        "reset",
        "on",
        ">initial-password",
        "~*",
        "+@all",
    ]);
    let refused = redis_cli(&user, "not the password", &["PING"]).unwrap_err();
    assert!(refused.contains("WRONGPASS"), "{refused}");
    let env = env_with(
        &url,
        &format!(
            r#"[secrets."redis/app"]
provider = "redis-acl"
credentials = {{ admin = "admin" }}
settings = {{ username = "{user}" }}
grace = "0s"
"#
        ),
    );
    let _daemon = env.start_daemon();
    wait_done(&env, "redis/app", 1);
    let (v1, _) = current(&env, "redis/app");
    assert_eq!(redis_cli(&user, &v1, &["ACL", "WHOAMI"]).unwrap(), user);
    // The first version replaced the password the user had before keywarden.
    assert!(redis_cli(&user, "initial-password", &["PING"]).is_err());
    rotate(&env, "redis/app");
    let (v2, _) = current(&env, "redis/app");
    assert_eq!(redis_cli(&user, &v2, &["ACL", "WHOAMI"]).unwrap(), user);
    assert!(redis_cli(&user, &v1, &["PING"]).is_err());
    // This Redis has no ACL file and no config file: status says the change is not persisted.
    let persisted = admin(&["CONFIG", "GET", "aclfile"]);
    if String::from_utf8_lossy(&persisted.stdout)
        .lines()
        .nth(1)
        .unwrap_or("")
        .is_empty()
    {
        let status: Value = serde_json::from_str(&env.ok(&["status", "--json"], None)).unwrap();
        assert!(
            status["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["secret"] == "redis/app"),
            "{}",
            status["warnings"]
        );
    }
    admin(&["ACL", "DELUSER", &user]);
}

#[test]
fn mariadb_and_redis_names_and_passwords_with_quotes_and_semicolons_stay_data() {
    let (Some(my_url), Some(redis_url)) = (
        service("KEYWARDEN_TEST_MYSQL_URL"),
        service("KEYWARDEN_TEST_REDIS_URL"),
    ) else {
        return;
    };
    let mut plugin = Plugin::start();

    // MariaDB: the user is created by root with the client's own escaping.
    let name = format!(
        "kw'\"; DROP USER root; -- \\ %é{}",
        std::process::id() % 1000
    );
    let escaped = name.replace('\\', "\\\\").replace('\'', "\\'");
    mariadb(
        "root",
        "",
        &format!("CREATE USER '{escaped}'@'%' IDENTIFIED BY 'x'"),
    )
    .unwrap();
    let admin = json!({ "admin": { "value": my_url, "meta": {} } });
    let created = plugin.call(json!({
        "op": "create", "kind": "mysql-password", "secret": "my/hostile", "rotation_id": "r1",
        "settings": { "username": name }, "credentials": admin, "proposed": HOSTILE_PASSWORD,
    }));
    assert!(created["ok"].is_object(), "{created}");
    assert_eq!(mariadb(&name, HOSTILE_PASSWORD, "SELECT 1").unwrap(), "1");
    assert!(mariadb("root", "", "SELECT 1").is_ok(), "root survived");
    mariadb("root", "", &format!("DROP USER '{escaped}'@'%'")).unwrap();

    // Redis: names and passwords are arguments of their own.
    let name = format!("kw'\";%é\\{}", std::process::id() % 1000);
    let admin_cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-u", &redis_url])
            .args(args)
            .output()
            .unwrap()
    };
    admin_cli(&["ACL", "SETUSER", &name, "on", ">x", "~*", "+@all"]);
    let admin = json!({ "admin": { "value": redis_url, "meta": {} } });
    let created = plugin.call(json!({
        "op": "create", "kind": "redis-acl", "secret": "redis/hostile", "rotation_id": "r1",
        "settings": { "username": name }, "credentials": admin, "proposed": HOSTILE_PASSWORD,
    }));
    assert!(created["ok"].is_object(), "{created}");
    assert_eq!(
        redis_cli(&name, HOSTILE_PASSWORD, &["ACL", "WHOAMI"]).unwrap(),
        name
    );
    admin_cli(&["ACL", "DELUSER", &name]);
}

#[test]
fn postgres_alternating_a_client_reconnecting_in_a_loop_never_fails_a_login_across_20_rotations() {
    let Some(pg) = Postgres::start() else { return };
    pg.admin("CREATE ROLE app_a LOGIN PASSWORD 'initial-password'");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = { admin = "admin" }
settings = { strategy = "alternating", usernames = ["app_a", "app_b"] }
grace = "1m"
"#,
    );
    let _daemon = env.start_daemon();
    wait_done(&env, "pg/app", 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The client: fetch (a lease), log in with what it got, end the lease; again.
    let client = {
        let (socket, port, stop) = (env.agent_socket(), pg.port, stop.clone());
        std::thread::spawn(move || {
            let (mut logins, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, body) = curl(&socket, "GET", "/v1/secrets/pg/app?ttl=30", &[]);
                assert_eq!(status, 200, "{body}");
                let got: Value = serde_json::from_str(&body).unwrap();
                let out = Command::new("psql")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-d", "postgres"])
                    .args([
                        "-U",
                        got["meta"]["username"].as_str().unwrap(),
                        "-XAtqc",
                        "SELECT 1",
                    ])
                    .env("PGPASSWORD", got["value"].as_str().unwrap())
                    .output()
                    .unwrap();
                logins += 1;
                if !out.status.success() {
                    failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                let lease = got["lease_id"].as_str().unwrap();
                curl(&socket, "DELETE", &format!("/v1/leases/{lease}"), &[]);
            }
            (logins, failures)
        })
    };
    for _ in 0..20 {
        rotate(&env, "pg/app");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (logins, failures) = client.join().unwrap();
    assert!(logins >= 20, "the client logged in {logins} times");
    assert!(
        failures.is_empty(),
        "{} failed logins of {logins}: {failures:?}",
        failures.len()
    );
    assert_eq!(env.entry("pg/app")["version"], 21);
}

/// A MariaDB user `{tag}_a` (password `initial-password`, SELECT on `test.*`) and none named
/// `{tag}_b`; an env whose `my/app` alternates between them and whose `my/lease` issues users
/// named `{tag}_l…` with the same grant.
fn mariadb_pair(url: &str, tag: &str) -> (String, String, Env) {
    let (a, b) = (format!("{tag}_a"), format!("{tag}_b"));
    for u in [&a, &b] {
        mariadb("root", "", &format!("DROP USER IF EXISTS '{u}'@'%'")).unwrap();
    }
    mariadb("root", "", &format!("CREATE USER '{a}'@'%' IDENTIFIED BY 'initial-password'; GRANT SELECT ON test.* TO '{a}'@'%'")).unwrap();
    let env = env_with(
        url,
        &format!(
            r#"[secrets."my/app"]
provider = "mysql-password"
credentials = {{ admin = "admin" }}
settings = {{ strategy = "alternating", usernames = ["{a}", "{b}"] }}
grace = "0s"

[secrets."my/lease"]
provider = "mysql-lease"
credentials = {{ admin = "admin" }}
settings = {{ grants = ["SELECT ON test.*"], lease_prefix = "{tag}_l" }}
"#
        ),
    );
    (a, b, env)
}

/// `redis-cli` as the server's default (admin) user; its output.
fn redis_admin(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", url])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis ACL user `{tag}_a` (password `initial-password`, GET on `app:*`) and none named
/// `{tag}_b`; an env whose `redis/app` alternates between them and whose `redis/lease` issues
/// users named `{tag}_l…` with the same rules.
fn redis_pair(url: &str, tag: &str) -> (String, String, Env) {
    let (a, b) = (format!("{tag}_a"), format!("{tag}_b"));
    redis_admin(url, &["ACL", "DELUSER", &a, &b]);
    redis_admin(
        url,
        &[
            "ACL",
            "SETUSER",
            &a,
            "reset",
            "on",
            ">initial-password",
            "~app:*",
            "+get",
        ],
    );
    let env = env_with(
        url,
        &format!(
            r#"[secrets."redis/app"]
provider = "redis-acl"
credentials = {{ admin = "admin" }}
settings = {{ strategy = "alternating", usernames = ["{a}", "{b}"] }}
grace = "0s"

[secrets."redis/lease"]
provider = "redis-lease"
credentials = {{ admin = "admin" }}
settings = {{ rules = ["~app:*", "+get"], lease_prefix = "{tag}_l" }}
"#
        ),
    );
    (a, b, env)
}

#[test]
fn mariadb_alternating_and_lease_users_through_the_daemon() {
    let Some(url) = service("KEYWARDEN_TEST_MYSQL_URL") else {
        return;
    };
    let (a, b, env) = mariadb_pair(&url, &format!("kw{}", std::process::id()));
    let _daemon = env.start_daemon();
    wait_done(&env, "my/app", 1);
    let (v1, user1) = current(&env, "my/app");
    assert_eq!(user1, b);
    // b was created with a's grants.
    let grants = mariadb(&b, &v1, "SHOW GRANTS").unwrap();
    assert!(grants.contains("SELECT ON `test`.*"), "{grants}");
    rotate(&env, "my/app");
    let (v2, user2) = current(&env, "my/app");
    assert_eq!(user2, a);
    assert_eq!(mariadb(&a, &v2, "SELECT 1").unwrap(), "1");
    assert!(
        mariadb(&b, &v1, "SELECT 1").is_err(),
        "the user not in use is locked"
    );

    // A user per lease, gone (with its connection) when the lease ends.
    let (status, body) = curl(
        &env.agent_socket(),
        "GET",
        "/v1/secrets/my/lease?ttl=3",
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let lease: Value = serde_json::from_str(&body).unwrap();
    let (user, password) = (
        lease["meta"]["username"].as_str().unwrap().to_string(),
        lease["value"].as_str().unwrap().to_string(),
    );
    assert_eq!(mariadb(&user, &password, "SELECT 1").unwrap(), "1");
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap_or("3306")
        .to_string();
    let mut session = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            &user,
            "-e",
            "SELECT SLEEP(120)",
        ])
        .env("MYSQL_PWD", &password)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the lease user to be dropped",
        Duration::from_secs(30),
        || {
            (mariadb(
                "root",
                "",
                &format!("SELECT COUNT(*) FROM mysql.user WHERE User = '{user}'"),
            )
            .unwrap()
                == "0")
                .then_some(())
        },
    );
    let ended = wait_for("the session to end", Duration::from_secs(10), || {
        session.try_wait().unwrap()
    });
    assert!(!ended.success());
    assert!(mariadb(&user, &password, "SELECT 1").is_err());
    for u in [&a, &b] {
        mariadb("root", "", &format!("DROP USER IF EXISTS '{u}'@'%'")).unwrap();
    }
}

#[test]
fn redis_alternating_and_lease_users_through_the_daemon() {
    let Some(url) = service("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    let (a, b, env) = redis_pair(&url, &format!("kw{}", std::process::id()));
    let admin = |args: &[&str]| redis_admin(&url, args);
    let _daemon = env.start_daemon();
    wait_done(&env, "redis/app", 1);
    let (v1, user1) = current(&env, "redis/app");
    assert_eq!(user1, b);
    // b got a's rules: GET on app:* and nothing else.
    assert!(redis_cli(&b, &v1, &["GET", "app:x"]).is_ok());
    assert!(
        redis_cli(&b, &v1, &["SET", "app:x", "1"])
            .unwrap()
            .contains("NOPERM")
    );
    rotate(&env, "redis/app");
    let (v2, user2) = current(&env, "redis/app");
    assert_eq!(user2, a);
    assert!(redis_cli(&a, &v2, &["GET", "app:x"]).is_ok());
    assert!(
        redis_cli(&b, &v1, &["PING"]).is_err(),
        "the user not in use is off"
    );

    let (status, body) = curl(
        &env.agent_socket(),
        "GET",
        "/v1/secrets/redis/lease?ttl=3",
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let lease: Value = serde_json::from_str(&body).unwrap();
    let (user, password) = (
        lease["meta"]["username"].as_str().unwrap().to_string(),
        lease["value"].as_str().unwrap().to_string(),
    );
    assert!(redis_cli(&user, &password, &["GET", "app:x"]).is_ok());
    assert!(
        redis_cli(&user, &password, &["GET", "other:x"])
            .unwrap()
            .contains("NOPERM")
    );
    wait_for(
        "the lease user to be deleted",
        Duration::from_secs(30),
        || {
            redis_cli(&user, &password, &["PING"])
                .is_err()
                .then_some(())
        },
    );
    admin(&["ACL", "DELUSER", &a, &b]);
}

/// Whether the `keywarden` under test has its crash points (built by `cargo test`, not by a
/// plain `cargo build`).
fn has_crash_points() -> bool {
    let bin = std::fs::read(keywarden_testkit::keywarden_bin()).unwrap();
    keywarden_testkit::contains(&bin, b"rotation.verified")
}

#[test]
fn postgres_a_daemon_killed_at_each_step_of_a_rotation_converges_to_one_valid_password() {
    let Some(pg) = Postgres::start() else { return };
    if !crash_points_built() {
        return;
    }
    for (i, point) in [
        "rotation.created",
        "rotation.verified",
        "rotation.promoted",
        "rotation.pushed",
        "rotation.draining",
    ]
    .iter()
    .enumerate()
    {
        let (a, b) = (format!("crash{i}_a"), format!("crash{i}_b"));
        pg.admin(&format!(
            "CREATE ROLE {a} LOGIN PASSWORD 'initial-password'"
        ));
        let env = env_with(
            &pg.admin_url(),
            &format!(
                r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = {{ admin = "admin" }}
settings = {{ strategy = "alternating", usernames = ["{a}", "{b}"] }}
grace = "2s"
"#
            ),
        );
        let daemon = env.start_daemon();
        wait_done(&env, "pg/app", 1);
        daemon.terminate();
        // Killed (abort, like kill -9) right after the step's commit.
        let daemon = env.start_daemon_with(&[("FAILPOINTS", &format!("{point}=return"))]);
        env.ok(&["rotate", "pg/app", "--no-wait"], None);
        assert!(daemon.wait_crash(Duration::from_secs(30)), "{point}");
        let _daemon = env.start_daemon();
        wait_done(&env, "pg/app", 2);
        let (value, user) = current(&env, "pg/app");
        assert_eq!(user, a, "{point}");
        assert_eq!(pg.psql(&a, &value, "SELECT 1").unwrap(), "1", "{point}");
        // The other user, not in use, has no password left once the rotation is done.
        wait_for(
            &format!("{b} without a password after {point}"),
            Duration::from_secs(30),
            || {
                (pg.admin(&format!(
                    "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = '{b}'"
                )) == "t")
                    .then_some(())
            },
        );
    }
}

#[test]
fn postgres_a_daemon_killed_while_issuing_a_lease_user_leaves_no_user_behind() {
    let Some(pg) = Postgres::start() else { return };
    if !crash_points_built() {
        return;
    }
    pg.admin("CREATE ROLE readers NOLOGIN");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/lease"]
provider = "postgres-lease"
credentials = { admin = "admin" }
settings = { group_role = "readers" }
"#,
    );
    let lease_users = || pg.admin("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'kw\\_%'");
    crash_while_issuing(&env, "pg/lease", &|| lease_users().parse().unwrap());
}

#[test]
fn postgres_a_password_the_servers_policy_rejects_is_not_retried_and_the_next_rotation_proposes_another()
 {
    // passwordcheck refuses a password that contains the user's name; `log_statement` shows
    // each password the plugin sent.
    let Some(pg) = Postgres::start_with(&[
        "shared_preload_libraries=passwordcheck",
        "log_statement=ddl",
    ]) else {
        return;
    };
    pg.admin("CREATE ROLE e LOGIN PASSWORD 'initial-pw-1234'");
    // Every hex password of 4,096 characters contains "e".
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = { admin = "admin" }
settings = { username = "e" }
generate = { length = 4096, charset = "hex" }
grace = "0s"
"#,
    );
    let daemon = env.start_daemon();
    let first = wait_for(
        "the first rotation to fail",
        Duration::from_secs(30),
        || {
            let e = env.entry("pg/app");
            // The failure is counted against the secret just after the rotation ends.
            (e["rotation_state"] == "failed" && e["last_error"].is_string()).then_some(e)
        },
    );
    let error = first["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("password must not contain user name") && error.contains("22023"),
        "the error names the rule: {first}"
    );
    let out = env.run(&["rotate", "pg/app", "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["state"], "failed", "{result}");
    // One statement per rotation, never a rejected value sent again, each rotation its own.
    let sent: Vec<String> = pg
        .log()
        .lines()
        .filter_map(|l| {
            l.split("statement: ALTER ROLE e WITH LOGIN PASSWORD '")
                .nth(1)
        })
        .map(|p| p.trim_end_matches('\'').to_string())
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_ne!(sent[0], sent[1]);
    assert!(sent.iter().all(|p| p.len() == 4096 && p.contains('e')));
    // Nothing changed upstream, and no rejected value reached the log or `status`.
    assert_eq!(pg.psql("e", "initial-pw-1234", "SELECT 1").unwrap(), "1");
    let status = env.ok(&["status", "--json"], None);
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    for value in &sent {
        assert!(!log.contains(value.as_str()) && !status.contains(value.as_str()));
    }
}

/// Kills the daemon (abort, like kill -9) right after each step of a rotation of `name`,
/// restarting it each time: the rotation finishes, the current credential logs in
/// (`logs_in(user, password)`) and the one it replaced does not.
fn crash_at_each_rotation_step(env: &Env, name: &str, logs_in: &dyn Fn(&str, &str) -> bool) {
    let daemon = env.start_daemon();
    wait_done(env, name, 1);
    daemon.terminate();
    for (i, point) in [
        "rotation.created",
        "rotation.verified",
        "rotation.promoted",
        "rotation.pushed",
        "rotation.draining",
    ]
    .iter()
    .enumerate()
    {
        let (old_value, old_user) = current(env, name);
        let daemon = env.start_daemon_with(&[("FAILPOINTS", &format!("{point}=return"))]);
        env.ok(&["rotate", name, "--no-wait"], None);
        assert!(daemon.wait_crash(Duration::from_secs(30)), "{point}");
        let daemon = env.start_daemon();
        wait_done(env, name, i as i64 + 2);
        let (value, user) = current(env, name);
        assert!(logs_in(&user, &value), "{name} after {point}");
        wait_for(
            &format!("{name}: the replaced credential refused after {point}"),
            Duration::from_secs(30),
            || (!logs_in(&old_user, &old_value)).then_some(()),
        );
        daemon.terminate();
    }
}

/// Kills the daemon right after it journals an issue (nothing upstream yet), after the plugin
/// made the lease user (no lease yet: the next start revokes it by lease id), and after the
/// lease is committed (its end, after the restart, drops the user): no lease user is left
/// (`lease_users()` counts them) once the restarted daemon has caught up.
fn crash_while_issuing(env: &Env, name: &str, lease_users: &dyn Fn() -> usize) {
    for (point, users_at_crash) in [
        ("lease.issue-journaled", 0),
        ("lease.issued", 1),
        ("lease.granted", 1),
    ] {
        let daemon = env.start_daemon_with(&[("FAILPOINTS", &format!("{point}=return"))]);
        let (status, _) = curl(
            &env.agent_socket(),
            "GET",
            &format!("/v1/secrets/{name}?ttl=2"),
            &[],
        );
        assert_ne!(status, 200, "{point}: the daemon answered");
        assert!(daemon.wait_crash(Duration::from_secs(30)), "{point}");
        assert_eq!(lease_users(), users_at_crash, "{name} at {point}");
        let daemon = env.start_daemon();
        wait_for(
            &format!("no lease user of {name} left after {point}"),
            Duration::from_secs(30),
            || (lease_users() == 0).then_some(()),
        );
        daemon.terminate();
    }
    let audit = env.ok(&["audit", "tail", "-n", "500", "--json"], None);
    assert!(audit.contains("lease.orphan_revoked"), "{audit}");
}

/// Skips (outside CI) when the `keywarden` under test was built without crash points.
fn crash_points_built() -> bool {
    if has_crash_points() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "keywarden was built without crash points"
    );
    eprintln!(
        "skipping: keywarden was built without crash points (run through cargo test --workspace)"
    );
    false
}

#[test]
fn mariadb_a_daemon_killed_at_each_step_of_a_rotation_or_a_lease_issue_converges() {
    let Some(url) = service("KEYWARDEN_TEST_MYSQL_URL") else {
        return;
    };
    if !crash_points_built() {
        return;
    }
    let tag = format!("kwc{}", std::process::id());
    let (a, b, env) = mariadb_pair(&url, &tag);
    crash_at_each_rotation_step(&env, "my/app", &|user, password| {
        mariadb(user, password, "SELECT 1").is_ok()
    });
    crash_while_issuing(&env, "my/lease", &|| {
        mariadb(
            "root",
            "",
            &format!("SELECT COUNT(*) FROM mysql.user WHERE User LIKE '{tag}\\_l%'"),
        )
        .unwrap()
        .parse()
        .unwrap()
    });
    for u in [&a, &b] {
        mariadb("root", "", &format!("DROP USER IF EXISTS '{u}'@'%'")).unwrap();
    }
}

#[test]
fn redis_a_daemon_killed_at_each_step_of_a_rotation_or_a_lease_issue_converges() {
    let Some(url) = service("KEYWARDEN_TEST_REDIS_URL") else {
        return;
    };
    if !crash_points_built() {
        return;
    }
    let tag = format!("kwc{}", std::process::id());
    let (a, b, env) = redis_pair(&url, &tag);
    let admin = |args: &[&str]| redis_admin(&url, args);
    // The users may run GET only; a refused login is an `Err`.
    crash_at_each_rotation_step(&env, "redis/app", &|user, password| {
        redis_cli(user, password, &["GET", "app:x"]).is_ok()
    });
    crash_while_issuing(&env, "redis/lease", &|| {
        admin(&["ACL", "USERS"])
            .lines()
            .filter(|u| u.starts_with(&format!("{tag}_l")))
            .count()
    });
    admin(&["ACL", "DELUSER", &a, &b]);
}

#[test]
fn postgres_single_a_client_that_refetches_and_retries_with_backoff_never_fails_across_10_rotations()
 {
    let Some(pg) = Postgres::start() else { return };
    pg.admin("CREATE ROLE app LOGIN PASSWORD 'initial-password'");
    let env = env_with(
        &pg.admin_url(),
        r#"[secrets."pg/app"]
provider = "postgres-password"
credentials = { admin = "admin" }
settings = { username = "app" }
grace = "0s"
"#,
    );
    let _daemon = env.start_daemon();
    wait_done(&env, "pg/app", 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    // What the README tells clients of `single` to do: a refused login means the password
    // changed and its new version is not served yet (it is verified first); fetch again and
    // retry, backing off, for a few seconds.
    let client = {
        let (socket, port, stop) = (env.agent_socket(), pg.port, stop.clone());
        let attempts = attempts.clone();
        std::thread::spawn(move || {
            let login = |password: &str| {
                Command::new("psql")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-d", "postgres"])
                    .args(["-U", "app", "-XAtqc", "SELECT 1"])
                    .env("PGPASSWORD", password)
                    .output()
                    .unwrap()
                    .status
                    .success()
            };
            let fetch = || {
                let (status, body) = curl(&socket, "GET", "/v1/secrets/pg/app?ttl=30", &[]);
                assert_eq!(status, 200, "{body}");
                let got: Value = serde_json::from_str(&body).unwrap();
                got["value"].as_str().unwrap().to_string()
            };
            let (mut logins, mut refused, mut failed) = (0u32, 0u32, 0u32);
            let mut longest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                logins += 1;
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if login(&fetch()) {
                    continue;
                }
                refused += 1;
                let since = std::time::Instant::now();
                let mut pause = Duration::from_millis(20);
                loop {
                    // The client's own backoff between retries.
                    std::thread::sleep(pause);
                    if login(&fetch()) {
                        longest = longest.max(since.elapsed());
                        break;
                    }
                    if since.elapsed() > Duration::from_secs(5) {
                        failed += 1;
                        break;
                    }
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
            (logins, refused, failed, longest)
        })
    };
    for _ in 0..10 {
        // The client logs in between any two rotations, however slow this machine is.
        let seen = attempts.load(std::sync::atomic::Ordering::SeqCst);
        wait_for("the client's next login", Duration::from_secs(30), || {
            (attempts.load(std::sync::atomic::Ordering::SeqCst) > seen).then_some(())
        });
        rotate(&env, "pg/app");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (logins, refused, failed, longest) = client.join().unwrap();
    eprintln!(
        "single: {logins} logins, {refused} refused, {failed} failed after 5 s of retries, \
         longest wait for the new version {longest:?}"
    );
    assert!(logins >= 10);
    assert_eq!(
        failed, 0,
        "a login still failed after 5 s of fetching again"
    );
}
