//! The rotation engine end to end: the real daemon, the real Python example plugin over its
//! protocol, files written by the file consumer, and the plugin's upstream state checked from
//! outside.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::Env;
use common::daemon::{
    Daemon, env_with_plugin, env_with_plugin_timeout, wait_for, wait_for_explained,
};

const SECRET: &str = r#"
[secrets."svc/api"]
provider = "example"
consumers = ["api-file", "api-push"]
grace = "10m"

[consumers.api-file]
kind = "file"
path = "out/api.env"
mode = "0640"
template = "API_KEY_ID={{meta.key_id}}\nAPI_KEY={{value}}\n"

[consumers.api-push]
kind = "example"
settings = { consumer_name = "mirror" }
"#;

fn rotate_json(env: &Env, name: &str) -> (Option<i32>, serde_json::Value) {
    let out = env.run(&["rotate", name, "--json"], None);
    let body = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "rotate printed no JSON: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), body)
}

/// Upstream invariants after convergence: exactly one live credential for the secret, it is
/// the provider's current one and keywarden's current version; everything else is revoked or
/// deleted (no orphan).
fn assert_converged(env: &Env, name: &str) -> String {
    let active = env.upstream_i64(&format!(
        "SELECT count(*) FROM creds WHERE secret = '{name}' AND status = 'active' AND issued = 0"
    ));
    assert_eq!(active, 1, "exactly one live credential upstream for {name}");
    let current = env.upstream_text(&format!(
        "SELECT key_id FROM creds WHERE secret = '{name}' AND status = 'active' AND issued = 0"
    ));
    let ours = env.ok(&["get", name, "--json"], None);
    let ours: serde_json::Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(
        ours["meta"]["key_id"], current,
        "keywarden's current version is the live one"
    );
    let value = env.upstream_text(&format!(
        "SELECT value FROM creds WHERE key_id = '{current}'"
    ));
    assert_eq!(ours["value"], value.as_str());
    let orphans = env.upstream_i64(&format!(
        "SELECT count(*) FROM creds WHERE secret = '{name}' AND status NOT IN ('active', 'revoked', 'deleted')"
    ));
    assert_eq!(orphans, 0);
    value
}

#[test]
fn a_plugin_rotation_creates_verifies_promotes_pushes_and_revokes() {
    let env = env_with_plugin(SECRET);
    let daemon = env.start_daemon();
    // The declared secret gets its first version at registration.
    let first = wait_for("the first version", Duration::from_secs(20), || {
        let e = env.entry("svc/api");
        (e["rotation_state"] == "done").then(|| e["version"].as_i64().unwrap())
    });
    assert_eq!(first, 1);
    let first_key = env.upstream_text("SELECT key_id FROM creds WHERE current = 1");

    let (code, result) = rotate_json(&env, "svc/api");
    assert_eq!(code, Some(0), "{result}");
    assert_eq!(
        result["state"], "done",
        "no leases: draining ends at once: {result}"
    );
    assert_eq!(result["from_version"], 1);
    assert_eq!(result["to_version"], 2);

    // Upstream: the old key revoked, the new one current.
    assert_eq!(
        env.upstream_text(&format!(
            "SELECT status FROM creds WHERE key_id = '{first_key}'"
        )),
        "revoked"
    );
    // Both consumers hold version 2.
    assert_eq!(
        env.upstream_i64("SELECT max(version) FROM pushes WHERE consumer = 'mirror'"),
        2
    );
    let file = std::fs::read_to_string(env.dir.path().join("out/api.env")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.dir.path().join("out/api.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM exits 0");

    let value = assert_converged(&env, "svc/api");
    let key_id = env.upstream_text("SELECT key_id FROM creds WHERE current = 1");
    assert_eq!(file, format!("API_KEY_ID={key_id}\nAPI_KEY={value}\n"));
    let pushed = env.upstream_text("SELECT value FROM pushes WHERE version = 2");
    assert_eq!(pushed, value);

    // Every step is in the audit chain, which still verifies.
    let audit = env.ok(&["audit", "tail", "-n", "100", "--json"], None);
    for step in [
        "rotation.planned",
        "rotation.created",
        "rotation.verified",
        "rotation.promoted",
        "rotation.pushed",
        "rotation.draining",
        "rotation.done",
        "consumer.delivered",
    ] {
        assert!(audit.contains(step), "{step} missing from the audit log");
    }
    assert!(!audit.contains(&value), "a value in the audit log");
    env.ok(&["audit", "verify"], None);
}

/// A `random` secret `demo/token` (24 hex digits, `schedule` added to its section) written
/// into `out/token` by a file consumer.
fn token_into_file(schedule: &str) -> Env {
    env_with_plugin(&format!(
        r#"
[secrets."demo/token"]
provider = "random"
{schedule}generate = {{ length = 24, charset = "hex" }}
consumers = ["token-file"]

[consumers.token-file]
kind = "file"
path = "out/token"
"#
    ))
}

/// Stops `daemon`, deletes `file` (as a reboot empties a tmpfs), starts the daemon again and
/// waits for the file to hold `name`'s current value again; the new daemon.
fn restart_having_lost(env: &Env, daemon: Daemon, name: &str, file: &Path) -> Daemon {
    assert_eq!(daemon.terminate(), Some(0));
    let value = env.get(name);
    std::fs::remove_file(file).unwrap();
    let daemon = env.start_daemon();
    wait_for_explained(
        "the file written again",
        Duration::from_secs(30),
        || (std::fs::read_to_string(file).ok()? == value).then_some(()),
        || daemon.log_text(),
    );
    daemon
}

#[test]
fn a_random_secret_rotates_on_schedule_into_a_file() {
    let env = token_into_file("rotate_every = \"1s\"\n");
    let daemon = env.start_daemon();
    let version = wait_for("three scheduled rotations", Duration::from_secs(30), || {
        let e = env.entry("demo/token");
        (e["version"].as_i64().unwrap_or(0) >= 3 && e["rotation_state"] == "done")
            .then(|| e["version"].as_i64().unwrap())
    });
    assert!(version >= 3);
    assert!(env.entry("demo/token")["next_rotation_at"].is_string());
    assert_eq!(daemon.terminate(), Some(0));
    let value = env.get("demo/token");
    assert_eq!(value.len(), 24);
    assert!(value.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("out/token")).unwrap(),
        value
    );
}

#[test]
fn a_consumer_file_deleted_or_edited_is_written_again_at_start_and_reload() {
    let env = token_into_file("");
    let file = env.dir.path().join("out/token");
    let holds = |value: &str| std::fs::read_to_string(&file).is_ok_and(|c| c == value);
    let daemon = env.start_daemon();
    wait_for("the first version's file", Duration::from_secs(30), || {
        std::fs::read_to_string(&file)
            .is_ok_and(|c| c.len() == 24)
            .then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    let value = env.get("demo/token");
    assert!(holds(&value));

    // Deleted while the daemon was down (a tmpfs after a reboot), then edited.
    for damage in [None, Some("edited by hand\n")] {
        match damage {
            None => std::fs::remove_file(&file).unwrap(),
            Some(text) => std::fs::write(&file, text).unwrap(),
        }
        let daemon = env.start_daemon();
        wait_for_explained(
            &format!("the file written again after {damage:?}"),
            Duration::from_secs(30),
            || holds(&value).then_some(()),
            || daemon.log_text(),
        );
        assert_eq!(daemon.terminate(), Some(0));
    }
    // Deleted while it runs: a reload writes it again.
    let daemon = env.start_daemon();
    std::fs::remove_file(&file).unwrap();
    daemon.reload();
    wait_for_explained(
        "the file written again after a reload",
        Duration::from_secs(30),
        || holds(&value).then_some(()),
        || daemon.log_text(),
    );
    // The same version throughout: nothing was rotated to get there.
    assert_eq!(env.entry("demo/token")["version"], 1);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_consumer_file_deleted_while_a_rotation_drains_is_written_again_at_start() {
    // A lease on version 1 keeps the rotation to version 2 draining (grace 1h) across a
    // restart; the file is lost meanwhile (a tmpfs after a reboot).
    let env = env_with_plugin(
        r#"
[secrets."demo/token"]
provider = "random"
generate = { length = 24, charset = "hex" }
consumers = ["token-file"]
grace = "1h"

[consumers.token-file]
kind = "file"
path = "out/token"

[[policy]]
name = "me"
same_user = true
secrets = ["demo/*"]
"#,
    );
    let file = env.dir.path().join("out/token");
    let daemon = env.start_daemon();
    wait_for("the first version's file", Duration::from_secs(30), || {
        (env.entry("demo/token")["rotation_state"] == "done").then_some(())
    });
    let (code, body) = common::curl(&env.agent_socket(), "GET", "/v1/secrets/demo/token", &[]);
    assert_eq!(code, 200, "{body}");
    env.ok(&["rotate", "demo/token", "--no-wait"], None);
    wait_for("the rotation to drain", Duration::from_secs(30), || {
        (env.entry("demo/token")["rotation_state"] == "draining").then_some(())
    });
    let daemon = restart_having_lost(&env, daemon, "demo/token", &file);
    assert_eq!(env.entry("demo/token")["rotation_state"], "draining");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_rotation_that_starts_while_a_lost_file_is_written_again_pushes_its_version_after() {
    // At start the daemon writes again a file that lost its value. A failpoint holds that
    // write between reading the version to write and writing it, and a rotation is requested
    // meanwhile: its push must come after the old version's write, never before it (the file
    // would hold the old value, revoked once the rotation ends).
    let env = token_into_file("");
    let file = env.dir.path().join("out/token");
    let daemon = env.start_daemon();
    wait_for("the first version's file", Duration::from_secs(30), || {
        (env.entry("demo/token")["rotation_state"] == "done" && file.exists()).then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    std::fs::remove_file(&file).unwrap();

    let daemon = env.start_daemon_with(&[("FAILPOINTS", "consumers.rewrite=1*sleep(2000)")]);
    wait_for_explained(
        "the file's write to be held",
        Duration::from_secs(30),
        || daemon.log_text().contains("writing it again").then_some(()),
        || daemon.log_text(),
    );
    env.ok(&["rotate", "demo/token"], None);
    wait_for_explained(
        "the held write to end",
        Duration::from_secs(30),
        || {
            daemon
                .log_text()
                .lines()
                .any(|l| l.contains("delivered") && l.contains("version=1"))
                .then_some(())
        },
        || daemon.log_text(),
    );
    assert_eq!(env.entry("demo/token")["version"], 2);
    let log = daemon.log_text();
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        env.get("demo/token"),
        "the file holds an older version: {log}"
    );
}

#[test]
fn a_daemon_killed_while_writing_a_file_leaves_nothing_beside_it_after_the_next_start() {
    let env = token_into_file("");
    let out = env.dir.path().join("out");
    let file = out.join("token");
    let daemon = env.start_daemon();
    wait_for("the first version's file", Duration::from_secs(30), || {
        (env.entry("demo/token")["rotation_state"] == "done" && file.exists()).then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    let value = env.get("demo/token");
    std::fs::remove_file(&file).unwrap();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };

    // The start writes the file again and is stopped, as `kill -9` would stop it, between
    // writing the temporary file (which holds the value) and renaming it over the file.
    let crashed = env
        .cmd()
        .args(["serve", "--init"])
        .env("FAILPOINTS", "consumer.temp-written=return")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!crashed.success());
    let left = listing();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(".token.") && left[0].ends_with(".tmp"),
        "{left:?}"
    );

    let daemon = env.start_daemon();
    wait_for_explained(
        "the file written again",
        Duration::from_secs(30),
        || (std::fs::read_to_string(&file).ok()? == value).then_some(()),
        || daemon.log_text(),
    );
    assert_eq!(listing(), ["token"], "{}", daemon.log_text());
    assert!(
        daemon
            .log_text()
            .contains("removed a temporary file an interrupted write left")
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_lost_file_is_written_again_at_start_while_a_rotation_retries_before_its_push() {
    // The second rotation's verify keeps failing (a provider that is down) and retries an hour
    // later: the rotation stays `created` across a restart, and the file lost meanwhile must
    // not wait for it. It holds the current version, still the first.
    lost_file_while_a_rotation_retries(
        r#"settings = { fail = { op = "verify", retryable = true, skip = 1 } }"#,
        "",
        "created",
        "injected failure of verify",
    );
}

#[test]
fn a_lost_file_is_written_again_at_start_while_a_rotation_retries_its_push() {
    // The second rotation's push to another consumer keeps failing: the rotation stays
    // `promoted` (it never rolls back from there) across a restart, and the lost file gets
    // the promoted version, the current one.
    lost_file_while_a_rotation_retries(
        "",
        r#"settings = { consumer_name = "mirror", fail = { op = "push", retryable = true, skip = 1 } }"#,
        "promoted",
        "injected failure of push",
    );
}

/// A secret of the example plugin (`secret_settings`) with a file consumer and a plugin
/// consumer (`push_settings`), every retry an hour away: the second rotation stops in `state`
/// on `error`, the daemon stops, the file is lost, and the next start writes it again.
fn lost_file_while_a_rotation_retries(
    secret_settings: &str,
    push_settings: &str,
    state: &str,
    error: &str,
) {
    let env = env_with_plugin(&format!(
        r#"
[secrets."svc/key"]
provider = "example"
{secret_settings}
consumers = ["key-file", "key-push"]

[consumers.key-file]
kind = "file"
path = "out/key"

[consumers.key-push]
kind = "example"
{push_settings}
"#
    ));
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config
            .replace("retry_base = \"50ms\"", "retry_base = \"1h\"")
            .replace("retry_max = \"400ms\"", "retry_max = \"1h\""),
    )
    .unwrap();
    let file = env.dir.path().join("out/key");
    let daemon = env.start_daemon();
    wait_for("the first version's file", Duration::from_secs(30), || {
        (env.entry("svc/key")["rotation_state"] == "done" && file.exists()).then_some(())
    });
    env.ok(&["rotate", "svc/key", "--no-wait"], None);
    wait_for_explained(
        "the rotation to wait for its retry",
        Duration::from_secs(30),
        || {
            let e = env.entry("svc/key");
            (e["rotation_state"] == state
                && e["last_error"].as_str().is_some_and(|m| m.contains(error)))
            .then_some(())
        },
        || daemon.log_text(),
    );
    let daemon = restart_having_lost(&env, daemon, "svc/key", &file);
    assert_eq!(env.entry("svc/key")["rotation_state"], state);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_failed_verification_rolls_back_and_keeps_the_current_credential() {
    let env = env_with_plugin(
        r#"
[secrets."svc/fragile"]
provider = "example"
settings = { fail = { op = "verify", retryable = false, once = false } }
"#,
    );
    let daemon = env.start_daemon();
    let state = wait_for("the first rotation to end", Duration::from_secs(20), || {
        let e = env.entry("svc/fragile");
        e["rotation_state"]
            .as_str()
            .filter(|s| *s != "planned" && *s != "created")
            .map(str::to_string)
    });
    assert_eq!(state, "rolled-back");
    // Upstream, the credential it created was revoked.
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM creds WHERE status = 'active'"),
        0
    );
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM creds WHERE status = 'revoked'"),
        1
    );
    let (code, result) = rotate_json(&env, "svc/fragile");
    assert_eq!(code, Some(1), "{result}");
    assert_eq!(result["state"], "rolled-back");
    let e = env.entry("svc/fragile");
    assert!(e["version"].is_null(), "nothing became current: {e}");
    assert!(
        e["last_error"]
            .as_str()
            .unwrap()
            .contains("injected failure of verify"),
        "{e}"
    );
    drop(daemon);
}

#[test]
fn a_hanging_plugin_is_killed_restarted_and_the_rotation_finishes() {
    let env = env_with_plugin_timeout(
        r#"
[secrets."svc/slow"]
provider = "example"
settings = { hang = { op = "verify", once = true } }
"#,
        "1s",
    );
    let daemon = env.start_daemon();
    wait_for("the rotation to finish", Duration::from_secs(30), || {
        (env.entry("svc/slow")["rotation_state"] == "done").then_some(())
    });
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM events WHERE op = 'hung:verify'"),
        1
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"], None)).unwrap();
    assert!(
        status["daemon"]["plugins"][0]["restarts"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(daemon.log_text().contains("no reply to verify within 1s"));
    assert_eq!(daemon.terminate(), Some(0));
    assert_converged(&env, "svc/slow");
}

#[test]
fn a_plugin_crashing_mid_request_is_restarted_and_the_request_retried() {
    let env = env_with_plugin(
        r#"
[secrets."svc/crashy"]
provider = "example"
settings = { crash = { op = "create", once = true } }
"#,
    );
    let daemon = env.start_daemon();
    wait_for("the rotation to finish", Duration::from_secs(30), || {
        (env.entry("svc/crashy")["rotation_state"] == "done").then_some(())
    });
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM events WHERE op = 'crashed:create'"),
        1
    );
    assert!(
        daemon
            .log_text()
            .contains("plugin crashed; restarting it and retrying")
    );
    assert_eq!(daemon.terminate(), Some(0));
    assert_converged(&env, "svc/crashy");
}

#[test]
fn a_plugin_that_writes_garbage_or_lies_is_stopped_and_the_secret_quarantined() {
    for misbehaviour in ["garbage", "lie"] {
        let env = env_with_plugin(&format!(
            "[secrets.\"svc/bad\"]\nprovider = \"example\"\nsettings = {{ {misbehaviour} = {{ op = \"create\" }} }}\n"
        ));
        let daemon = env.start_daemon();
        let e = wait_for("quarantine", Duration::from_secs(30), || {
            let e = env.entry("svc/bad");
            (e["quarantined"] == true).then_some(e)
        });
        assert!(
            e["last_error"]
                .as_str()
                .unwrap()
                .contains("broke the protocol"),
            "{e}"
        );
        assert_eq!(
            e["rotation_state"], "planned",
            "the rotation keeps its place"
        );
        let status = env.ok(&["status"], None);
        assert!(status.contains("QUARANTINED svc/bad"), "{status}");
        assert!(daemon.log_text().contains("stopping the plugin"));
        drop(daemon);
    }
}

#[test]
fn a_plugin_whose_hash_does_not_match_its_pin_is_refused() {
    let env = Env::with_config(&format!(
        "{}\n[plugins.example]\ncommand = [{:?}]\nsha256 = \"{}\"\nenv = {{ EXAMPLE_STATE = \"x.db\" }}\n",
        common::daemon::base_config("2s"),
        common::daemon::example_plugin().display().to_string(),
        "ab".repeat(32)
    ));
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1));
    let actual = common::daemon::sha256_of(&common::daemon::example_plugin());
    assert!(
        err.contains(&"ab".repeat(32)) && err.contains(&actual),
        "{err}"
    );
    assert!(err.contains("refusing to run it"), "{err}");
    assert!(!env.upstream_db().exists(), "the plugin never ran");
}

#[test]
fn a_plugin_another_user_could_replace_is_refused_and_a_bare_command_name_too() {
    // The pinned file sits in a directory its group may write to: the file could be swapped
    // for another between the check and the next start.
    let env = Env::new();
    let shared = env.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let plugin = shared.join("example-plugin.py");
    std::fs::copy(common::daemon::example_plugin(), &plugin).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
    let plugin_config = format!(
        "[plugins.example]\ncommand = [{:?}]\nsha256 = \"{}\"\nenv = {{ EXAMPLE_STATE = \"x.db\" }}\n",
        plugin.display().to_string(),
        common::daemon::sha256_of(&plugin)
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n{plugin_config}",
            common::daemon::base_config("2s")
        ),
    )
    .unwrap();
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{} is writable by other users", shared.display())),
        "{err}"
    );
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o775)).unwrap();
    let (_, err) = env.serve_fails();
    assert!(
        err.contains(&format!("{} is writable by other users", plugin.display())),
        "{err}"
    );
    assert!(
        !env.dir.path().join("x.db").exists(),
        "the plugin never ran"
    );

    // A bare name: hashed relative to one directory, run from wherever PATH finds it.
    let config = std::fs::read_to_string(&env.config).unwrap();
    let bare = config.replace(
        &format!("command = [{:?}]", plugin.display().to_string()),
        "command = [\"python3\"]",
    );
    std::fs::write(&env.config, bare).unwrap();
    let err = env.fails(1, &["status"], None);
    assert!(
        err.contains("plugins.\"example\".command") && err.contains("not \"python3\""),
        "{err}"
    );
}

#[test]
fn a_script_whose_interpreter_another_user_could_replace_is_refused() {
    // The pin covers the script; its `#!` interpreter sits in a directory others may write to,
    // so what runs the pinned script could be swapped.
    let env = Env::new();
    let shared = env.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::copy("/bin/sh", shared.join("sh")).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let plugin = env.dir.path().join("plugin.sh");
    std::fs::write(&plugin, format!("#!{}/sh\nexit 0\n", shared.display())).unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n[plugins.shell]\ncommand = [{:?}]\nsha256 = \"{}\"\n",
            common::daemon::base_config("2s"),
            plugin.display().to_string(),
            common::daemon::sha256_of(&plugin)
        ),
    )
    .unwrap();
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("its interpreter")
            && err.contains(&format!("{} is writable by other users", shared.display())),
        "{err}"
    );
}

#[test]
fn the_same_secret_is_never_rotated_twice_at_once() {
    let env = env_with_plugin(
        r#"
[secrets."svc/busy"]
provider = "example"
settings = { block = { op = "verify", once = true } }
"#,
    );
    let daemon = env.start_daemon();
    wait_for(
        "the first rotation to block in verify",
        Duration::from_secs(20),
        || {
            (env.upstream_i64("SELECT count(*) FROM events WHERE op = 'blocked:verify'") == 1)
                .then_some(())
        },
    );
    let ids: Vec<String> = (0..5)
        .map(|_| {
            let out = env.ok(&["rotate", "svc/busy", "--no-wait", "--json"], None);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["joined"], true, "{v}");
            v["rotation_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(env.sql_i64("SELECT count(*) FROM rotations"), 1);
    assert_eq!(
        env.upstream_i64("SELECT count(*) FROM events WHERE op = 'create'"),
        1
    );
    drop(daemon);
}

#[test]
fn an_exclusive_provider_skips_draining() {
    let env = env_with_plugin(
        r#"
[secrets."svc/single"]
provider = "example-exclusive"
grace = "1h"
"#,
    );
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("svc/single")["rotation_state"] == "done").then_some(())
    });
    let (code, result) = rotate_json(&env, "svc/single");
    assert_eq!(code, Some(0), "{result}");
    assert_eq!(
        result["state"], "done",
        "overlap = false never drains: {result}"
    );
    drop(daemon);
    assert_converged(&env, "svc/single");
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM versions WHERE stage = 'revoked'"),
        1
    );
}

#[test]
fn plugin_stderr_reaches_the_log_with_values_redacted() {
    let env = env_with_plugin(
        r#"
[secrets."svc/chatty"]
provider = "example"
settings = { chatty = true }
"#,
    );
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("svc/chatty")["rotation_state"] == "done").then_some(())
    });
    let (code, _) = rotate_json(&env, "svc/chatty");
    assert_eq!(code, Some(0));
    let log = daemon.log_text();
    assert_eq!(daemon.terminate(), Some(0));
    assert!(
        log.contains("chatty: verify got candidate [redacted]"),
        "{log}"
    );
    let value = env.get("svc/chatty");
    for v in [
        value.as_str(),
        &env.ok(&["get", "svc/chatty", "--version", "1", "-n"], None),
    ] {
        assert!(!log.contains(v), "a value reached the log");
    }
}

#[test]
fn serve_rejects_a_config_naming_an_unknown_provider_with_its_line() {
    let env = env_with_plugin("[secrets.\"x/y\"]\nprovider = \"nope\"\n");
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1));
    assert!(
        err.contains("secrets.\"x/y\".provider") && err.contains("no provider \"nope\""),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
}

#[test]
fn plugin_pin_prints_a_config_section_with_the_hash() {
    let env = Env::new();
    let plugin = common::daemon::example_plugin();
    let out = env.ok(&["plugin", "pin", plugin.to_str().unwrap()], None);
    assert!(out.starts_with("[plugins.example-plugin]\n"), "{out}");
    assert!(out.contains(&common::daemon::sha256_of(&plugin)), "{out}");
    assert!(
        out.contains(&format!("command = [{:?}]", plugin.display().to_string())),
        "{out}"
    );
}

#[test]
fn rotate_without_a_daemon_runs_the_rotation_in_the_cli() {
    let env = env_with_plugin(
        r#"
[secrets."svc/offline"]
provider = "example"
consumers = ["offline-file"]

[secrets."svc/by-hand"]
provider = "manual"

[consumers.offline-file]
kind = "file"
path = "out/offline"
"#,
    );
    env.ok(&["init"], None);
    let (code, first) = rotate_json(&env, "svc/offline");
    assert_eq!(code, Some(0), "{first}");
    assert_eq!(first["state"], "done");
    let (code, second) = rotate_json(&env, "svc/offline");
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second["from_version"], first["to_version"]);
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("out/offline")).unwrap(),
        env.get("svc/offline")
    );
    assert_converged(&env, "svc/offline");

    let err = env.fails(1, &["rotate", "svc/by-hand"], None);
    assert!(
        err.contains("cannot be rotated automatically")
            && err.contains("keywarden put svc/by-hand"),
        "{err}"
    );
    let err = env.fails(1, &["rotate", "svc/undeclared"], None);
    assert!(
        err.contains("no secret named \"svc/undeclared\" is declared"),
        "{err}"
    );
}

#[test]
fn a_plugin_that_stops_reading_its_input_times_out_instead_of_hanging_the_rotation() {
    // Says hello, then never reads another byte: a request larger than the pipe's buffer
    // cannot even be written to it.
    let env = Env::new();
    let mute = env.dir.path().join("mute-plugin.py");
    std::fs::write(
        &mute,
        "#!/usr/bin/env python3\nimport json, time\n\
         print(json.dumps({'keywarden_plugin': 1, 'name': 'mute', 'version': '0', \
         'kinds': {'mute': {'ops': ['create', 'verify', 'revoke'], 'overlap': True}}}), flush=True)\n\
         time.sleep(3600)\n",
    )
    .unwrap();
    std::fs::set_permissions(&mute, std::fs::Permissions::from_mode(0o755)).unwrap();
    let blob = "x".repeat(256 * 1024);
    let config = format!(
        "{}\n[plugins.mute]\ncommand = [{:?}]\nsha256 = \"{}\"\n\n\
         [secrets.\"svc/mute\"]\nprovider = \"mute\"\nsettings = {{ blob = \"{blob}\" }}\n",
        common::daemon::base_config("2s"),
        mute.display().to_string(),
        common::daemon::sha256_of(&mute),
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    let daemon = env.start_daemon();
    let error = wait_for(
        "the rotation to fail on a timeout",
        Duration::from_secs(60),
        || {
            env.entry("svc/mute")["last_error"]
                .as_str()
                .filter(|e| e.contains("no reply to create within"))
                .map(str::to_string)
        },
    );
    assert!(error.contains("plugin mute"), "{error}");
    assert_eq!(daemon.terminate(), Some(0));
}
