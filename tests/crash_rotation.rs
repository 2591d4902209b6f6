//! Crash safety: the daemon is killed with SIGKILL at every boundary of the rotation journal
//! (the plugin holds the step there: before or after its upstream effect, never answering),
//! then restarted. Every time, the rotation must converge: exactly one current version,
//! consumers holding it, the old credential revoked exactly once, and nothing created upstream
//! that is neither current nor revoked.

mod common;

use std::time::Duration;

use common::Env;
use common::daemon::{env_with_plugin, wait_for};

fn config(secret_settings: &str, push_settings: &str) -> String {
    format!(
        r#"
[secrets."svc/crash"]
provider = "example"
consumers = ["crash-file", "crash-push"]
grace = "10m"
settings = {{ {secret_settings} }}

[consumers.crash-file]
kind = "file"
path = "out/crash"
template = "{{{{meta.key_id}}}}={{{{value}}}}"

[consumers.crash-push]
kind = "example"
settings = {{ consumer_name = "mirror"{push_settings} }}
"#
    )
}

fn events(env: &Env, op: &str) -> i64 {
    env.upstream_i64(&format!("SELECT count(*) FROM events WHERE op = '{op}'"))
}

/// Starts the daemon, lets the first version settle, asks for a rotation, waits until the
/// plugin reports `marker`, kills the daemon, restarts it, and checks convergence.
fn kill_at(secret_settings: &str, push_settings: &str, marker: &str) {
    let env = env_with_plugin(&config(secret_settings, push_settings));
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(30), || {
        (env.entry("svc/crash")["version"] == 1
            && env.entry("svc/crash")["rotation_state"] == "done")
            .then_some(())
    });
    let old_key = env.upstream_text("SELECT key_id FROM creds WHERE current = 1");
    env.ok(&["rotate", "svc/crash", "--no-wait"], None);
    wait_for(marker, Duration::from_secs(30), || {
        (events(&env, marker) == 1).then_some(())
    });
    daemon.kill9();

    let daemon = env.start_daemon();
    wait_for(
        "the rotation to converge after the restart",
        Duration::from_secs(60),
        || {
            let e = env.entry("svc/crash");
            assert_ne!(e["quarantined"], true, "quarantined: {e}");
            (e["rotation_state"] == "done" && e["version"] == 2).then_some(())
        },
    );
    assert_eq!(daemon.terminate(), Some(0));

    // Exactly one current version, and it is the one live upstream.
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM versions WHERE stage = 'current'"),
        1
    );
    let current: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "svc/crash", "--json"], None)).unwrap();
    let key = current["meta"]["key_id"].as_str().unwrap().to_string();
    let value = current["value"].as_str().unwrap().to_string();
    assert_eq!(
        env.upstream_text("SELECT key_id FROM creds WHERE current = 1"),
        key
    );
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM creds WHERE status = 'active' AND issued = 0"),
        1,
        "no orphan: only the current credential is live upstream"
    );
    // The old credential was revoked, exactly once.
    assert_eq!(
        env.upstream_text(&format!(
            "SELECT status FROM creds WHERE key_id = '{old_key}'"
        )),
        "revoked"
    );
    assert_eq!(
        env.upstream_i64(&format!(
            "SELECT count(*) FROM events WHERE op = 'revoke' AND detail = '{old_key}'"
        )),
        1
    );
    // Both consumers hold the current version.
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("out/crash")).unwrap(),
        format!("{key}={value}")
    );
    assert_eq!(
        env.upstream_text(
            "SELECT value FROM pushes WHERE version = (SELECT max(version) FROM pushes)"
        ),
        value
    );
    env.ok(&["audit", "verify"], None);
}

#[test]
fn killed_while_planned_before_create_reaches_upstream() {
    kill_at(
        "hang = { op = \"create\", once = true, skip = 1 }",
        "",
        "hung:create",
    );
}

#[test]
fn killed_after_create_reached_upstream_but_before_the_journal_said_created() {
    kill_at(
        "block = { op = \"create\", once = true, skip = 1 }",
        "",
        "blocked:create",
    );
}

#[test]
fn killed_while_created_during_verify() {
    kill_at(
        "block = { op = \"verify\", once = true, skip = 1 }",
        "",
        "blocked:verify",
    );
}

#[test]
fn killed_after_promote_reached_upstream_but_before_the_journal_said_promoted() {
    kill_at(
        "block = { op = \"promote\", once = true, skip = 1 }",
        "",
        "blocked:promote",
    );
}

#[test]
fn killed_while_promoted_during_a_consumer_push() {
    kill_at(
        "",
        ", block = { op = \"push\", once = true, skip = 1 }",
        "blocked:push",
    );
}

#[test]
fn killed_after_the_old_credential_was_revoked_but_before_the_journal_said_done() {
    kill_at(
        "block = { op = \"revoke\", once = true }",
        "",
        "blocked:revoke",
    );
}

#[test]
fn killed_at_random_instants_during_many_rotations_converges() {
    let env = env_with_plugin(
        r#"
[secrets."svc/a"]
provider = "example"
rotate_every = "1s"

[secrets."svc/b"]
provider = "example"
rotate_every = "1s"
consumers = ["b-file"]

[secrets."svc/c"]
provider = "example-exclusive"
rotate_every = "1s"

[consumers.b-file]
kind = "file"
path = "out/b"
"#,
    );
    // Each kill comes after a different number of further upstream operations (create,
    // verify, promote, push, revoke of any of the three secrets), so the crashes fall at
    // different steps of different rotations, and never wait on the clock.
    let mut daemon = Some(env.start_daemon());
    let all_ops = "SELECT count(*) FROM events";
    for further_ops in [1, 4, 2, 7, 3, 11] {
        let target = env.upstream_i64(all_ops) + further_ops;
        wait_for("more upstream operations", Duration::from_secs(30), || {
            (env.upstream_i64(all_ops) >= target).then_some(())
        });
        daemon.take().unwrap().kill9();
        daemon = Some(env.start_daemon());
    }
    wait_for(
        "rotations to continue after the crashes",
        Duration::from_secs(60),
        || {
            ["svc/a", "svc/b", "svc/c"]
                .iter()
                .all(|n| env.entry(n)["version"].as_i64().unwrap_or(0) >= 3)
                .then_some(())
        },
    );
    // One last crash, then a calm restart (rotations hourly) to let everything settle.
    daemon.take().unwrap().kill9();
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("rotate_every = \"1s\"", "rotate_every = \"1h\""),
    )
    .unwrap();
    // Due times persist: without this, a secret that fell due under the 1 s schedule while the
    // daemon was down would rotate once more at start, racing the checks below.
    let in_an_hour = (chrono::Utc::now().timestamp() + 3600) * 1000;
    env.sql(&[&format!(
        "UPDATE secrets SET next_rotation_at = {in_an_hour}"
    )]);
    let daemon = env.start_daemon();
    wait_for("every rotation to settle", Duration::from_secs(60), || {
        ["svc/a", "svc/b", "svc/c"]
            .iter()
            .all(|n| env.entry(n)["rotation_state"] == "done")
            .then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    for name in ["svc/a", "svc/b", "svc/c"] {
        let live = env.upstream_i64(&format!(
            "SELECT count(*) FROM creds WHERE secret = '{name}' AND status = 'active'"
        ));
        let active_rotation = env.sql_i64(&format!(
            "SELECT count(*) FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE s.name = '{name}' \
             AND r.state NOT IN ('done', 'failed', 'rolled-back')"
        ));
        assert_eq!(
            active_rotation,
            0,
            "{name}: {}",
            common::sql_one::<String>(
                &env.store,
                &format!(
                    "SELECT group_concat(r.state || ' ' || ifnull(r.from_version, '-') || '->' || ifnull(r.to_version, '-') || ' ' || r.created_at || ' ' || r.reason, '; ') \
                     FROM rotations r JOIN secrets s ON s.id = r.secret_id WHERE s.name = '{name}'"
                )
            )
        );
        assert_eq!(
            live, 1,
            "{name}: only the current credential is live upstream"
        );
        let current: serde_json::Value =
            serde_json::from_str(&env.ok(&["get", name, "--json"], None)).unwrap();
        let key = current["meta"]["key_id"].as_str().unwrap();
        assert_eq!(
            env.upstream_text(&format!("SELECT status FROM creds WHERE key_id = '{key}'")),
            "active",
            "{name}: keywarden's current credential is live upstream"
        );
        assert_eq!(
            env.sql_i64(&format!(
                "SELECT count(*) FROM versions v JOIN secrets s ON s.id = v.secret_id \
                 WHERE s.name = '{name}' AND v.stage = 'current'"
            )),
            1
        );
    }
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("out/b")).unwrap(),
        env.get("svc/b")
    );
    env.ok(&["audit", "verify"], None);
}

/// The plugin processes whose working directory is under the environment's directory (a
/// script runs as `python3 /proc/self/fd/N --keywarden-plugin=1`: its interpreter reads it from
/// the descriptor the launcher hashed).
fn plugin_processes(env: &Env) -> Vec<u32> {
    let dir = env.dir.path().canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            common::contains(&cmdline, b"--keywarden-plugin=1")
                && std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[test]
fn a_plugin_that_outlives_a_killed_daemon_is_killed_at_restart() {
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n{}\n[secrets.\"svc/linger\"]\nprovider = \"example\"\n",
            common::daemon::base_config("3s"),
            common::daemon::example_plugin_config(env.dir.path(), ", EXAMPLE_LINGER = \"1\"")
        ),
    )
    .unwrap();
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(30), || {
        (env.entry("svc/linger")["rotation_state"] == "done").then_some(())
    });
    let before = plugin_processes(&env);
    assert_eq!(before.len(), 1, "{before:?}");
    daemon.kill9();
    // This plugin ignores its closed stdin and stays.
    assert_eq!(plugin_processes(&env), before);

    let daemon = env.start_daemon();
    let after = plugin_processes(&env);
    assert!(!after.contains(&before[0]), "the orphan still runs");
    assert!(
        daemon
            .log_text()
            .contains("killed plugin processes that a previous daemon left running")
    );
    // The new daemon's own plugin works.
    env.ok(&["rotate", "svc/linger"], None);
    assert_eq!(env.entry("svc/linger")["version"], 2);
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        plugin_processes(&env),
        Vec::<u32>::new(),
        "a clean stop ends the plugin"
    );
}
