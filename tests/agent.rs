//! The agent socket end to end: real peers (curl, a copied binary, another uid through
//! `setpriv`, Python and Node), policies, leases, issued credentials, watches, hostile input,
//! `get` and `exec` through the socket, metrics, and safe socket creation.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::{env_with_plugin, sha256_of, wait_for};
use common::{Env, curl, curl_with};

fn canonical(path: &str) -> PathBuf {
    std::fs::canonicalize(path).unwrap()
}

/// `curl --unix-socket` with extra args; returns (status, body).
fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

const APP: &str = r#"
[secrets."app/token"]
provider = "random"
grace = "1m"
"#;

fn policy_exe(name: &str, exe: &Path, secrets: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\nexe = [{:?}]\nsecrets = [\"{secrets}\"]\nmax_ttl = \"10m\"\n",
        exe.display().to_string()
    )
}

/// Adds a line to the `[agent]` table of the environment's config.
fn set_agent(env: &Env, line: &str) {
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replacen(
            "default_ttl = \"5m\"",
            &format!("default_ttl = \"5m\"\n{line}"),
            1,
        ),
    )
    .unwrap();
}

fn started(extra: &str) -> (Env, common::daemon::Daemon) {
    let env = env_with_plugin(&format!("{APP}\n{extra}"));
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    (env, daemon)
}

#[test]
fn an_allowed_executable_is_served_and_a_copy_elsewhere_is_denied() {
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let sock = env.agent_socket();
    let (code, body) = curl(&sock, "GET", "/v1/secrets/app/token?ttl=120", &[]);
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    for key in ["name", "version", "value", "meta", "lease_id", "expires_at"] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    assert_eq!(v["name"], "app/token");
    assert_eq!(v["version"], 1);
    let lease_id = v["lease_id"].as_str().unwrap();
    wait_for(
        "the lease to reach the store",
        Duration::from_secs(10),
        || {
            (env.sql_i64(&format!(
            "SELECT count(*) FROM leases WHERE id = '{lease_id}' AND exe = '/usr/bin/curl' AND ended_at IS NULL"
        )) == 1)
            .then_some(())
        },
    );

    let copy = env.dir.path().join("curl-copy");
    std::fs::copy("/usr/bin/curl", &copy).unwrap();
    let (code, body) = curl_with(&copy, &sock, "GET", "/v1/secrets/app/token", &[]);
    assert_eq!(code, 403, "{body}");
    assert_eq!(json(&body)["error"]["code"], "forbidden");
    assert!(!body.contains(v["value"].as_str().unwrap()));

    // A TTL beyond the policy's max is clamped to it.
    let (_, body) = curl(&sock, "GET", "/v1/secrets/app/token?ttl=86400", &[]);
    let expires =
        chrono::DateTime::parse_from_rfc3339(json(&body)["expires_at"].as_str().unwrap()).unwrap();
    assert!(expires.timestamp() <= chrono::Utc::now().timestamp() + 601);
    // Known-good endpoints still answer; unknown secrets are 404 once allowed.
    assert_eq!(
        curl(&sock, "GET", "/v1/health", &[]),
        (200, "{\"status\":\"ok\"}".into())
    );
    assert_eq!(curl(&sock, "GET", "/v1/secrets/app/nothing", &[]).0, 404);

    // A clean shutdown commits every queued audit row.
    assert_eq!(daemon.terminate(), Some(0));
    let audit = env.ok(&["audit", "tail", "-n", "50", "--json"], None);
    let rows: serde_json::Value = json(&audit);
    let allowed = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "fetch.allowed")
        .count();
    let denied: Vec<_> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "fetch.denied")
        .collect();
    // The second fetch, by the same peer of the same version, extended the first one's lease
    // and is counted in a `fetch.repeated` row, folded at the clean stop at the latest.
    assert_eq!(allowed, 1, "{audit}");
    let repeated: Vec<_> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "fetch.repeated")
        .collect();
    assert_eq!(repeated.len(), 1, "{audit}");
    assert_eq!(repeated[0]["detail"]["count"], 1);
    assert_eq!(repeated[0]["detail"]["lease_id"], lease_id);
    // Each allowed fetch names the fingerprint recorded when version 1 was created.
    let created = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "rotation.created" && r["detail"]["to_version"] == 1)
        .unwrap_or_else(|| panic!("no rotation.created row: {audit}"));
    assert!(created["detail"]["fingerprint"].is_string(), "{created}");
    for row in rows.as_array().unwrap() {
        if row["action"] == "fetch.allowed" {
            assert_eq!(
                row["detail"]["fingerprint"], created["detail"]["fingerprint"],
                "{row}"
            );
        }
    }
    assert_eq!(denied.len(), 1);
    assert!(
        denied[0]["actor"].as_str().unwrap().contains("curl-copy"),
        "{audit}"
    );
    assert!(
        !audit.contains(v["value"].as_str().unwrap()),
        "a value in the audit log"
    );
}

#[test]
fn a_peer_with_another_uid_is_denied_with_403_and_an_audit_row() {
    let env = env_with_plugin(&format!(
        "{APP}\n[[policy]]\nname = \"root\"\nuids = [0]\nsecrets = [\"app/*\"]\n"
    ));
    set_agent(&env, "socket_mode = \"0666\"");
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    let sock = env.agent_socket();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o666
    );
    assert_eq!(curl(&sock, "GET", "/v1/secrets/app/token", &[]).0, 200);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
            "/usr/bin/curl",
            "-s",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(&sock)
        .arg("http://localhost/v1/secrets/app/token")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("403"), "{text}");
    // A clean shutdown commits every queued audit row.
    assert_eq!(daemon.terminate(), Some(0));
    let audit = env.ok(&["audit", "tail", "-n", "50", "--json"], None);
    assert!(
        json(&audit)
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "fetch.denied"
                && r["actor"].as_str().unwrap().contains("uid=65533")),
        "{audit}"
    );
}

/// A daemon whose only policy admits `<dir>/agent-bin` when its SHA-256 is curl's, with a copy
/// of curl there that has been served once (so its hash is known to the daemon).
fn pinned_to_curl() -> (Env, PathBuf, common::daemon::Daemon) {
    let env = Env::new();
    let agent = env.dir.path().join("agent-bin");
    let policy = format!(
        "[[policy]]\nname = \"pinned\"\nexe = [{:?}]\nexe_sha256 = [\"{}\"]\nsecrets = [\"app/*\"]\n",
        agent.display().to_string(),
        sha256_of(Path::new("/usr/bin/curl"))
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n{APP}\n{policy}",
            common::daemon::base_config("3s")
        ),
    )
    .unwrap();
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    std::fs::copy("/usr/bin/curl", &agent).unwrap();
    assert_eq!(
        curl_with(
            &agent,
            &env.agent_socket(),
            "GET",
            "/v1/secrets/app/token",
            &[]
        )
        .0,
        200
    );
    (env, agent, daemon)
}

#[test]
fn a_hash_policy_catches_a_swapped_binary() {
    let (env, agent, daemon) = pinned_to_curl();
    // Same path, different program: the keywarden binary, asking through the socket.
    std::fs::remove_file(&agent).unwrap();
    std::fs::copy(common::keywarden_bin(), &agent).unwrap();
    let out = common::run_with(
        Command::new(&agent),
        &["--config", env.config.to_str().unwrap(), "get", "app/token"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no policy allows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);
}

#[test]
fn leases_expire_renew_and_delete() {
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let sock = env.agent_socket();
    let (_, body) = curl(&sock, "GET", "/v1/secrets/app/token?ttl=1", &[]);
    let short = json(&body)["lease_id"].as_str().unwrap().to_string();
    wait_for("the short lease to expire", Duration::from_secs(10), || {
        (env.sql_i64(&format!(
            "SELECT count(*) FROM leases WHERE id = '{short}' AND end_reason = 'expired'"
        )) == 1)
            .then_some(())
    });
    assert_eq!(
        curl(&sock, "PUT", &format!("/v1/leases/{short}/renew"), &[]).0,
        404,
        "an expired lease cannot be renewed"
    );

    let (_, body) = curl(&sock, "GET", "/v1/secrets/app/token?ttl=30", &[]);
    let lease = json(&body);
    let id = lease["lease_id"].as_str().unwrap().to_string();
    let (code, body) = curl(&sock, "PUT", &format!("/v1/leases/{id}/renew?ttl=300"), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(json(&body)["expires_at"].as_str().unwrap() > lease["expires_at"].as_str().unwrap());
    assert_eq!(
        curl(&sock, "DELETE", &format!("/v1/leases/{id}"), &[]).0,
        204
    );
    assert_eq!(
        curl(&sock, "DELETE", &format!("/v1/leases/{id}"), &[]).0,
        404
    );
    assert_eq!(
        env.sql_i64(&format!(
            "SELECT count(*) FROM leases WHERE id = '{id}' AND end_reason = 'deleted'"
        )),
        1
    );
    assert_eq!(curl(&sock, "DELETE", "/v1/leases/not-a-lease", &[]).0, 400);
    drop(daemon);
}

#[test]
fn a_fetch_overtaken_by_a_whole_rotation_is_served_the_new_version() {
    // The fetch is held between reading the current version and registering its lease (the
    // failpoint sleeps) while a whole rotation runs: its drain finds no lease on version 1 and
    // the rotation ends. Answering with version 1 then would hand out a retired value.
    let env = env_with_plugin(&format!(
        "{APP}\n{}",
        policy_exe("curl", Path::new("/usr/bin/curl"), "app/*")
    ));
    let daemon = env.start_daemon_with(&[("FAILPOINTS", "fetch.served=1*sleep(8000)")]);
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    let sock = env.agent_socket();
    let fetch = std::thread::spawn(move || curl(&sock, "GET", "/v1/secrets/app/token", &[]));
    wait_for("the fetch to be held", Duration::from_secs(20), || {
        daemon
            .log_text()
            .contains("serving; registering its lease")
            .then_some(())
    });
    env.ok(&["rotate", "app/token"], None);
    wait_for("the rotation to end", Duration::from_secs(20), || {
        let e = env.entry("app/token");
        (e["version"] == 2 && e["rotation_state"] == "done").then_some(())
    });
    let (status, body) = fetch.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["version"], 2, "{body}");
    assert_eq!(daemon.terminate(), Some(0));
    let rows = env.ok(&["audit", "tail", "-n", "100", "--json"], None);
    assert!(rows.contains("lease.superseded"), "{rows}");
}

#[test]
fn draining_waits_for_the_last_lease_on_the_old_version() {
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let sock = env.agent_socket();
    let (_, body) = curl(&sock, "GET", "/v1/secrets/app/token?ttl=5", &[]);
    let lease = json(&body)["lease_id"].as_str().unwrap().to_string();
    let out = env.ok(&["rotate", "app/token", "--json"], None);
    assert_eq!(
        json(&out)["state"],
        "draining",
        "a live lease holds the old version: {out}"
    );
    // Asked again while it drains: no new rotation, and the answer says what it waits for.
    let again = env.ok(&["rotate", "app/token"], None);
    assert!(
        again.contains(
            "app/token: a rotation was already under way (1 -> 2, draining); no new one was \
             started; it waits for 1 lease(s) on version 1 to end"
        ),
        "{again}"
    );
    let again = json(&env.ok(&["rotate", "app/token", "--json"], None));
    assert_eq!(again["joined"], true);
    assert_eq!(again["waiting_for"]["leases"], 1);
    assert!(again["waiting_for"]["until"].is_string());
    assert_eq!(
        env.entry("app/token")["version"],
        2,
        "the new version is served meanwhile"
    );
    wait_for(
        "the rotation to finish once the lease expires",
        Duration::from_secs(20),
        || (env.entry("app/token")["rotation_state"] == "done").then_some(()),
    );
    assert_eq!(daemon.terminate(), Some(0));
    let rows = json(&env.ok(&["audit", "tail", "-n", "100", "--json"], None));
    let seq_of = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| pred(r))
            .map(|r| r["seq"].as_i64().unwrap())
            .unwrap()
    };
    let asked: Vec<bool> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "admin.rotate")
        .map(|r| r["detail"]["joined"].as_bool().unwrap())
        .collect();
    assert_eq!(
        asked,
        [false, true, true],
        "each request is audited as what it did"
    );
    let expired =
        seq_of(&|r| r["action"] == "lease.expired" && r["detail"]["lease_id"] == lease.as_str());
    let done = seq_of(&|r| r["action"] == "rotation.done" && r["detail"]["revoked_version"] == 1);
    assert!(
        expired < done,
        "the old version was revoked only after its lease expired: {rows:#}"
    );
}

#[test]
fn issued_credentials_are_minted_per_fetch_and_revoked_when_their_lease_ends() {
    let (env, daemon) = started(&format!(
        "[secrets.\"app/sts\"]\nprovider = \"example-sts\"\n\n{}",
        policy_exe("curl", Path::new("/usr/bin/curl"), "app/*")
    ));
    let sock = env.agent_socket();
    let (code, a) = curl(&sock, "GET", "/v1/secrets/app/sts?ttl=60", &[]);
    assert_eq!(code, 200, "{a}");
    let (_, b) = curl(&sock, "GET", "/v1/secrets/app/sts?ttl=2", &[]);
    let (a, b) = (json(&a), json(&b));
    assert_ne!(
        a["value"], b["value"],
        "each fetch mints its own credential"
    );
    assert!(a["version"].is_null());
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM creds WHERE issued = 1 AND status = 'active'"),
        2
    );
    let key_a = a["meta"]["key_id"].as_str().unwrap();
    let key_b = b["meta"]["key_id"].as_str().unwrap();
    assert_eq!(
        curl(
            &sock,
            "PUT",
            &format!("/v1/leases/{}/renew", a["lease_id"].as_str().unwrap()),
            &[]
        )
        .0,
        409
    );
    assert_eq!(
        curl(
            &sock,
            "DELETE",
            &format!("/v1/leases/{}", a["lease_id"].as_str().unwrap()),
            &[]
        )
        .0,
        204
    );
    assert_eq!(
        env.upstream_text(&format!(
            "SELECT status FROM creds WHERE key_id = '{key_a}'"
        )),
        "revoked"
    );
    wait_for(
        "the short lease's credential to be revoked upstream",
        Duration::from_secs(15),
        || {
            (env.upstream_text(&format!(
                "SELECT status FROM creds WHERE key_id = '{key_b}'"
            )) == "revoked")
                .then_some(())
        },
    );
    drop(daemon);
}

#[test]
fn a_binary_bind_mounted_over_an_allowed_path_in_another_namespace_is_denied() {
    // A user namespace (here root's own unshare) mounts its own binary over /usr/bin/curl:
    // /proc/PID/exe then reads "/usr/bin/curl" from outside too. Only the daemon's own mount
    // namespace gives a path meaning.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to unshare a mount namespace");
        return;
    }
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let sock = env.agent_socket();
    assert_eq!(curl(&sock, "GET", "/v1/secrets/app/token", &[]).0, 200);
    let impostor = env.dir.path().join("impostor");
    std::fs::copy("/usr/bin/curl", &impostor).unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /usr/bin/curl && exec /usr/bin/curl -s -w '\n%{{http_code}}' \
             --unix-socket {} http://localhost/v1/secrets/app/token",
            impostor.display(),
            sock.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("403"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);
}

/// An environment with an `app/sts` secret of the example plugin's `example-sts` kind (with
/// `settings`), the plugin started with `plugin_env`, curl allowed.
fn sts_env(settings: &str, plugin_env: &str) -> Env {
    let env = Env::new();
    let config = format!(
        "{}\n{}\n[secrets.\"app/sts\"]\nprovider = \"example-sts\"\nsettings = {{ {settings} }}\n\n{}",
        common::daemon::base_config("5s"),
        common::daemon::example_plugin_config(env.dir.path(), plugin_env),
        policy_exe("curl", Path::new("/usr/bin/curl"), "app/*")
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env
}

/// Waits until the example plugin holds `n` live issued credentials upstream.
fn wait_live_issued(env: &Env, what: &str, n: i64) {
    wait_for(what, Duration::from_secs(20), || {
        (env.upstream_i64("SELECT count(*) FROM creds WHERE issued = 1 AND status = 'active'") == n)
            .then_some(())
    });
}

/// Stops the daemon and asserts the audit log has a row with `action` for `app/sts`.
fn assert_sts_audited(env: &Env, daemon: common::daemon::Daemon, action: &str) {
    assert_eq!(daemon.terminate(), Some(0));
    let audit = env.ok(&["audit", "tail", "-n", "50", "--json"], None);
    assert!(
        json(&audit)
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == action && r["secret"] == "app/sts"),
        "no {action} row: {audit}"
    );
}

#[test]
fn a_client_that_hangs_up_while_its_credential_is_minted_leaves_nothing_live() {
    // Every plugin op takes 1.5 s; the client gives up after 0.3 s. The credential is minted
    // anyway: its lease must be granted (and revoked at its end), or the credential revoked.
    let env = sts_env("", ", EXAMPLE_DELAY_MS = \"1500\"");
    let daemon = env.start_daemon();
    let out = Command::new("curl")
        .args(["-s", "--max-time", "0.3", "--unix-socket"])
        .arg(env.agent_socket())
        .arg("http://localhost/v1/secrets/app/sts?ttl=1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(28), "curl gave up (timeout)");
    wait_for(
        "the credential to be minted",
        Duration::from_secs(15),
        || (env.upstream_i64("SELECT count(*) FROM creds WHERE issued = 1") == 1).then_some(()),
    );
    wait_live_issued(
        &env,
        "the hung-up client's credential to be revoked upstream",
        0,
    );
    // Its lease was granted and audited.
    assert_sts_audited(&env, daemon, "fetch.allowed");
}

#[test]
fn a_daemon_killed_while_a_credential_is_minted_revokes_it_at_restart() {
    // The plugin mints the credential upstream, then never answers; the daemon dies before it
    // could grant a lease. The journaled issue makes the next daemon revoke it by lease id.
    let env = sts_env("block = { op = \"issue\", once = true }", "");
    let daemon = env.start_daemon();
    let sock = env.agent_socket();
    let fetch = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-s", "--max-time", "20", "--unix-socket"])
            .arg(sock)
            .arg("http://localhost/v1/secrets/app/sts")
            .output()
    });
    wait_live_issued(&env, "the credential to be minted", 1);
    daemon.kill9();
    let _ = fetch.join();
    let daemon = env.start_daemon();
    wait_live_issued(&env, "the orphaned credential to be revoked upstream", 0);
    // The revocation's audit row follows the plugin's answer.
    wait_for("the revocation audited", Duration::from_secs(20), || {
        (env.sql_i64("SELECT count(*) FROM audit WHERE action = 'lease.orphan_revoked'") == 1)
            .then_some(())
    });
    assert_sts_audited(&env, daemon, "lease.orphan_revoked");
}

#[test]
fn a_watch_wakes_on_promotion_and_times_out_with_304() {
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let sock = env.agent_socket();
    assert_eq!(
        curl(
            &sock,
            "GET",
            "/v1/secrets/app/token?min_version=9&wait=1",
            &[]
        )
        .0,
        304
    );
    let watcher = Command::new("/usr/bin/curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/v1/secrets/app/token?min_version=2&wait=60")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Whether the rotation lands before or after the watch arrives, the answer is version 2.
    env.ok(&["rotate", "app/token", "--no-wait"], None);
    let out = watcher.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{text}");
    assert_eq!(json(body)["version"], 2);
    drop(daemon);
}

fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn hostile_requests_get_their_4xx_and_everyone_else_is_still_served() {
    let (env, daemon) = started(&format!(
        "{}\n",
        policy_exe("curl", Path::new("/usr/bin/curl"), "app/*")
    ));
    // Tighten the limits for this test: restart with a short header timeout and few connections.
    drop(daemon);
    set_agent(&env, "header_timeout = \"1s\"\nmax_connections = 6");
    let _daemon = env.start_daemon();
    let sock = env.agent_socket();

    for (path, why) in [
        ("/v1/secrets/app/..%2Fetc", "percent-encoded"),
        ("/v1/secrets/app/../token", "dot segments"),
        ("/v1/secrets//app/token", "empty segment"),
        ("/v1/secrets/app/token?ttl=0", "ttl zero"),
        ("/v1/secrets/app/token?ttl=abc", "ttl not a number"),
        ("/v1/secrets/app/token?ttl=99999999999", "absurd ttl"),
        ("/v1/secrets/app/token?ttl=5&ttl=6", "repeated parameter"),
        ("/v1/secrets/app/token?sneaky=1", "unknown parameter"),
    ] {
        let (code, body) = curl(&sock, "GET", path, &[]);
        assert_eq!(code, 400, "{why}: {body}");
        assert_eq!(json(&body)["error"]["code"], "bad_request", "{why}");
    }
    assert_eq!(curl(&sock, "POST", "/v1/secrets/app/token", &[]).0, 405);
    let big_header = format!("X-Junk: {}", "a".repeat(40_000));
    assert_eq!(
        curl(&sock, "GET", "/v1/health", &["-H", &big_header]).0,
        431
    );
    let big_body = "b".repeat(100_000);
    assert_eq!(
        curl(&sock, "GET", "/v1/health", &["--data-binary", &big_body]).0,
        413
    );
    assert!(raw(&sock, b"\x00\x01\x02 not http at all\r\n\r\n").starts_with("HTTP/1.1 400"));

    // Slow clients hold connections only until the header timeout; others are served meanwhile.
    let slow: Vec<UnixStream> = (0..6)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let (code, _) = curl(&sock, "GET", "/v1/secrets/app/token", &["--max-time", "15"]);
    assert_eq!(code, 200, "served once a slot frees up");
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert_eq!(curl(&sock, "GET", "/v1/health", &[]).0, 200);
}

#[test]
fn the_python_and_node_snippets_of_the_readme_fetch_from_the_real_daemon() {
    let python = String::from_utf8(
        Command::new("python3")
            .args([
                "-c",
                "import sys, os; print(os.path.realpath(sys.executable))",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let python = PathBuf::from(python.trim());
    let node = canonical("/usr/bin/node");
    let (env, daemon) = started(&format!(
        "{}\n{}",
        policy_exe("python", &python, "app/*"),
        policy_exe("node", &node, "app/*")
    ));
    let sock = env.agent_socket();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for file in ["deploy/examples/fetch.py", "deploy/examples/fetch.js"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            readme.contains(text.trim()),
            "README.md must show {file} verbatim"
        );
    }
    let run = |interpreter: &Path, snippet: &str| {
        let out = Command::new(interpreter)
            .arg(root.join(snippet))
            .arg(&sock)
            .arg("app/token")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{snippet}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let py = run(&python, "deploy/examples/fetch.py");
    let js = run(&node, "deploy/examples/fetch.js");
    drop(daemon);
    let value = env.get("app/token");
    assert!(py.starts_with("1 ") && py.ends_with(&value), "{py}");
    assert!(js.starts_with("1 ") && js.ends_with(&value), "{js}");
}

/// Whether process `pid` has ended (gone, or a zombie waiting for init to reap it).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn cli_get_uses_the_socket_and_exec_restarts_the_command_on_rotation() {
    let cli = canonical(common::keywarden_bin().to_str().unwrap());
    let (env, daemon) = started(&format!(
        "{}\n{}",
        policy_exe("cli", &cli, "app/*"),
        policy_exe("curl", Path::new("/usr/bin/curl"), "app/*")
    ));
    let via_socket = env.ok(&["get", "app/token", "--no-newline"], None);
    let (_, body) = curl(&env.agent_socket(), "GET", "/v1/secrets/app/token", &[]);
    assert_eq!(via_socket, json(&body)["value"].as_str().unwrap());
    let full = json(&env.ok(&["get", "app/token", "--json"], None));
    assert!(full["lease_id"].is_string() && full["expires_at"].is_string());

    // exec: the child sees the value; a rotation restarts it with the new one. The command
    // starts a process that ignores SIGTERM: a restart must not leave it running with the old
    // value (it is killed after --stop-timeout), nor must a SIGTERM to exec.
    let starts = env.dir.path().join("starts.txt");
    let kids = env.dir.path().join("kids.txt");
    let script = format!(
        "echo \"$TOKEN\" >> {}; (trap '' TERM; exec sleep 600) & echo $! >> {}; wait",
        starts.display(),
        kids.display()
    );
    let mut exec = env
        .cmd()
        .args([
            "exec",
            "--stop-timeout",
            "1",
            "--env",
            "TOKEN=app/token",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_for("the command to start", Duration::from_secs(10), || {
        (lines(&kids).len() == 1).then_some(())
    });
    assert_eq!(lines(&starts)[0], via_socket);
    let first_kid = lines(&kids)[0].clone();
    assert!(!gone(&first_kid), "the command's own child runs");
    env.ok(&["rotate", "app/token", "--no-wait"], None);
    wait_for("the command to restart", Duration::from_secs(20), || {
        (lines(&kids).len() == 2).then_some(())
    });
    assert!(
        gone(&first_kid),
        "what the old command started, holding the old value, is gone after the restart"
    );
    let (_, body) = curl(&env.agent_socket(), "GET", "/v1/secrets/app/token", &[]);
    let starts_now = lines(&starts);
    assert_eq!(starts_now[1], json(&body)["value"].as_str().unwrap());
    assert_ne!(starts_now[0], starts_now[1]);
    let second_kid = lines(&kids)[1].clone();
    Command::new("kill")
        .args(["-TERM", &exec.id().to_string()])
        .status()
        .unwrap();
    let status = exec.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "exec exits with the child's status (killed by SIGTERM)"
    );
    assert!(gone(&second_kid), "a SIGTERM to exec stops the whole group");

    let missing = env.run(
        &[
            "exec",
            "--env",
            "TOKEN=app/token",
            "--",
            "no-such-command-here",
        ],
        None,
    );
    assert_eq!(missing.status.code(), Some(127), "like a shell");
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no-such-command-here: command not found")
    );

    let out = env.run(
        &[
            "exec",
            "--env",
            "TOKEN=app/token",
            "--",
            "sh",
            "-c",
            "test -n \"$TOKEN\" && exit 7",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(7));

    // An env file names secrets, not values; a bad line is named.
    let names = env.dir.path().join("app.secrets");
    std::fs::write(&names, "# the app's secrets\n\nexport TOKEN=app/token\n").unwrap();
    let names_arg = names.to_str().unwrap();
    let current = env.ok(&["get", "app/token", "-n"], None);
    let script = "test \"$TOKEN\" = \"$(cat)\" && exit 7";
    let out = env.run(
        &["exec", "--env-file", names_arg, "--", "sh", "-c", script],
        Some(current.as_bytes()),
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    std::fs::write(&names, "TOKEN=app/token\nnot a line\n").unwrap();
    let out = env.run(&["exec", "--env-file", names_arg, "--", "true"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("app.secrets line 2"), "{err}");
    // Pointed at a .env of values by mistake: the values are neither printed nor sent.
    let key = "sk-proj-Zq3fakeFAKEfake0123456789abcdefABCDEFghij";
    for (line, value) in [
        (format!("OPENAI_API_KEY={key}\n"), key),
        ("PASSWORD=\"p4ss+w=rd\"\n".to_string(), "p4ss+w=rd"),
    ] {
        std::fs::write(&names, line).unwrap();
        let out = env.run(&["exec", "--env-file", names_arg, "--", "true"], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(err.contains("app.secrets line 1"), "{err}");
        assert!(!err.contains(value), "{err}");
    }
    let audit = env.ok(&["audit", "tail", "-n", "200", "--json"], None);
    assert!(!audit.contains(key), "never sent to the daemon");
    drop(daemon);
}

#[test]
fn sockets_are_created_safely_and_metrics_are_served() {
    let (env, daemon) = started(&policy_exe("curl", Path::new("/usr/bin/curl"), "app/*"));
    let run = env.dir.path().join("run");
    assert_eq!(
        std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(env.admin_socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(env.agent_socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o660
    );
    curl(&env.agent_socket(), "GET", "/v1/secrets/app/token", &[]);
    let (code, metrics) = curl(&env.admin_socket(), "GET", "/metrics", &[]);
    assert_eq!(code, 200);
    for line in [
        "keywarden_active_leases 1",
        "keywarden_store_writes_failing 0",
        "keywarden_audit_rows_waiting 0",
        "keywarden_fetch_decisions_total{decision=\"allow\"} 1",
        "keywarden_rotations_total{result=\"done\"} 1",
        "keywarden_secret_age_seconds{secret=\"app/token\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    // A second daemon (another store) never steals the live sockets.
    let other = Env::new();
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &other.config,
        config.replace(
            "\"run/agent.sock\"",
            &format!("{:?}", env.agent_socket().display().to_string()),
        ),
    )
    .unwrap();
    let (code, err) = other.serve_fails();
    assert_eq!(code, Some(1));
    assert!(err.contains("in use by a running process"), "{err}");

    // A stale socket from a killed daemon is replaced.
    daemon.kill9();
    assert!(env.agent_socket().exists());
    let daemon = env.start_daemon();
    assert_eq!(curl(&env.agent_socket(), "GET", "/v1/health", &[]).0, 200);
    drop(daemon);
}

#[test]
fn exec_runs_the_command_with_the_users_umask_and_core_limit() {
    let cli = canonical(common::keywarden_bin().to_str().unwrap());
    let (env, daemon) = started(&policy_exe("cli", &cli, "app/*"));
    let hard_core_limit = Command::new("sh")
        .args(["-c", "ulimit -H -c"])
        .output()
        .unwrap()
        .stdout;
    let core = if hard_core_limit.starts_with(b"0") {
        "0"
    } else {
        "1000"
    };
    // A user's shell with its own umask and core limit runs `keywarden exec`.
    let bin = common::keywarden_bin();
    let inner = "umask; ulimit -c; test -n \"$TOKEN\" && echo token";
    let script = format!(
        "umask 027; ulimit -S -c {core}; exec \"$0\" exec --env TOKEN=app/token -- sh -c '{inner}'"
    );
    let mut shell = Command::new("sh");
    shell
        .args(["-c", &script, bin.to_str().unwrap()])
        .env("KEYWARDEN_CONFIG", &env.config)
        .env("KEYWARDEN_PASSPHRASE_FILE", &env.passphrase_file)
        .current_dir(env.dir.path());
    let out = common::run_with(shell, &[], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!("0027\n{core}\ntoken\n"),
        "keywarden's 077 and 0 leaked into the command"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_binary_rewritten_in_place_with_its_mtime_restored_is_hashed_again() {
    let (env, agent, daemon) = pinned_to_curl();
    let sock = env.agent_socket();

    // The attack: the same file (same inode, same size) rewritten with another program, and
    // its modification time set back, as any user can do to their own file.
    let mtime = std::fs::metadata(&agent).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&agent).unwrap();
    let at = bytes
        .windows(11)
        .position(|w| w == b"Usage: curl")
        .expect("curl's usage text");
    bytes[at + 7..at + 11].copy_from_slice(b"CURL");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&agent)
        .unwrap();
    std::io::Write::write_all(&mut file, &bytes).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);
    assert_eq!(
        std::fs::metadata(&agent).unwrap().modified().unwrap(),
        mtime
    );

    let (code, body) = curl_with(&agent, &sock, "GET", "/v1/secrets/app/token", &[]);
    assert_eq!(
        code, 403,
        "a program that is not the pinned one was served: {body}"
    );
    drop(daemon);
}
