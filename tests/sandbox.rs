//! Confinement of what the daemon runs (plugins, `after` commands): a hostile plugin tries to
//! take what the daemon holds and fails at every step, run by the real daemon; the launcher
//! alone (no change of user, as under a daemon that is not root) still stops it; the agent
//! socket refuses the plugins' user; `after` commands run confined.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Env;
use common::daemon::{base_config, env_with_plugin, sha256_of, wait_for};
use keywarden::sandbox::{Confinement, LAUNCHER_ARG, Launch};
use serde_json::Value;

fn hostile_plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile-plugin.py")
}

/// GET `path` on `socket` with curl run as `uid` (and its gid); the body, then the status.
fn curl_as(uid: &str, socket: &Path, path: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            "curl",
            "-s",
        ])
        .args(["-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Asserts every attack in `report` was denied for a reason other than a missing file, and the
/// controls (writing its own directory, reading /etc/hosts) worked; returns the report's fds.
fn assert_all_denied(report: &Value, min_attacks: usize) -> BTreeMap<String, String> {
    let entries = report.as_object().expect("a report object");
    let mut attacks = 0;
    for (name, outcome) in entries {
        let Some(outcome) = outcome.as_str() else {
            continue;
        };
        if name.starts_with("control:") {
            assert_eq!(outcome, "allowed", "{name}: {report:#}");
        } else {
            attacks += 1;
            assert!(
                outcome.starts_with("denied"),
                "{name} was allowed: {report:#}"
            );
            assert!(
                !outcome.contains("FileNotFoundError"),
                "{name} proves nothing (no such file): {report:#}"
            );
        }
    }
    assert!(attacks >= min_attacks, "the attacks ran: {report:#}");
    serde_json::from_value(report["fds"].clone()).unwrap()
}

#[test]
fn a_hostile_plugin_can_take_nothing_from_the_daemon() {
    let env = env_with_plugin("[secrets.\"svc/ok\"]\nprovider = \"example\"\n");
    let planted = [
        env.dir.path().join("planted"),
        PathBuf::from(format!("/tmp/keywarden-planted-{}", std::process::id())),
    ];
    let join = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let store_wal = PathBuf::from(format!("{}-wal", env.store.display()));
    let plugin = hostile_plugin();
    let config = format!(
        "[plugins.hostile]\ncommand = [{:?}]\nsha256 = \"{}\"\n\
         env = {{ HOSTILE_READ = {:?}, HOSTILE_SOCKETS = {:?}, HOSTILE_WRITE = {:?} }}\n",
        plugin.display().to_string(),
        sha256_of(&plugin),
        join(&[
            env.store.clone(),
            store_wal.clone(),
            env.passphrase_file.clone(),
            env.config.clone()
        ]),
        join(&[env.agent_socket(), env.admin_socket()]),
        join(&planted),
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    let daemon = env.start_daemon();
    let line = wait_for(
        "the hostile plugin's report",
        Duration::from_secs(20),
        || {
            daemon
                .log_text()
                .lines()
                .find_map(|l| l.split_once("HOSTILE-REPORT ").map(|(_, r)| r.to_string()))
        },
    );
    // The log line goes on after the JSON (` plugin=hostile`).
    let report: Value = serde_json::from_str(&line[..=line.rfind('}').unwrap()]).unwrap();
    assert!(store_wal.exists(), "the WAL was there to steal");
    assert_eq!(report["target_pid"], daemon.pid(), "it attacked the daemon");
    if is_root() {
        assert_eq!(report["uid"], 65534, "it ran as the plugin user");
    }
    let fds = assert_all_denied(&report, 14);
    // Only stdio, the listing's own descriptor and the script itself (its interpreter reads
    // it from the descriptor the launcher hashed).
    for (fd, target) in &fds {
        assert!(
            ["0", "1", "2"].contains(&fd.as_str())
                || target.ends_with("hostile-plugin.py")
                || target.starts_with("/proc/"),
            "fd {fd} -> {target} was inherited: {fds:?}"
        );
    }
    for path in &planted {
        assert!(!path.exists(), "{} was written", path.display());
    }

    // A well-behaved plugin next to it works: the example plugin rotates a secret.
    env.ok(&["rotate", "svc/ok", "--json"], None);
    drop(daemon);
}

#[test]
fn the_launcher_alone_confines_a_program_that_keeps_the_daemons_user() {
    // What a daemon that is not root applies: no change of user, so Landlock and seccomp alone
    // must stop the attacks. The target is this test process (the launcher's parent), which
    // runs as the same user and is not protected by being non-dumpable.
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let secret = dir.path().join("vault.db");
    std::fs::write(&secret, "the store").unwrap();
    let socket_path = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let planted = dir.path().join("planted");
    let launch = Launch {
        confinement: Confinement::default().granting(&[&hostile_plugin()], &[&work]),
        cwd: work.clone(),
        program: "/usr/bin/python3".into(),
        sha256: None,
        args: vec![hostile_plugin().display().to_string(), "--probe".into()],
    };
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .arg(LAUNCHER_ARG)
        .arg(serde_json::to_string(&launch).unwrap())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOSTILE_READ", &secret)
        .env("HOSTILE_SOCKETS", &socket_path)
        .env("HOSTILE_WRITE", &planted)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["target_pid"], std::process::id());
    assert_eq!(
        report["uid"],
        rustix::process::getuid().as_raw(),
        "same user"
    );
    assert_all_denied(&report, 9);
    assert!(!planted.exists());
}

#[test]
fn a_pinned_program_replaced_after_the_check_is_not_executed() {
    // The launcher hashes the descriptor it executes: a pin that does not match what is on
    // disk at launch time stops it, whatever was checked before.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("plugin.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pinned = sha256_of(&script);
    std::fs::write(&script, "#!/bin/sh\necho swapped\n").unwrap();
    let launch = |sha256: String| Launch {
        confinement: Confinement::default(),
        cwd: dir.path().to_path_buf(),
        program: script.display().to_string(),
        sha256: Some(sha256),
        args: Vec::new(),
    };
    let run = |launch: Launch| {
        Command::new(env!("CARGO_BIN_EXE_keywarden"))
            .arg(LAUNCHER_ARG)
            .arg(serde_json::to_string(&launch).unwrap())
            .output()
            .unwrap()
    };
    let out = run(launch(pinned));
    assert_eq!(out.status.code(), Some(126));
    assert!(out.stdout.is_empty(), "nothing ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keywarden-sandbox:") && err.contains("pins"),
        "{err}"
    );

    let out = run(launch(sha256_of(&script)));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "swapped\n");
}

#[test]
fn the_agent_socket_refuses_the_plugins_user() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    // The example plugin runs as 65534; a policy that names that uid does not let it in.
    let env = Env::new();
    let config = format!(
        "{}\n{}\n[secrets.\"demo/key\"]\nprovider = \"manual\"\n\n\
         [[policy]]\nname = \"agents\"\nuids = [65532, 65534]\nsecrets = [\"demo/*\"]\n",
        base_config("3s").replace("[agent]\n", "[agent]\nsocket_mode = \"0666\"\n"),
        common::daemon::example_plugin_config(env.dir.path(), "")
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env.ok(&["init"], None);
    env.put("demo/key", "agent-visible-value");
    let daemon = env.start_daemon();
    let fetch_as = |uid| curl_as(uid, &env.agent_socket(), "/v1/secrets/demo/key");
    let other = fetch_as("65532");
    assert!(other.ends_with("200"), "{other}");
    let plugin_user = fetch_as("65534");
    assert!(plugin_user.ends_with("403"), "{plugin_user}");
    assert!(
        plugin_user.contains("runs keywarden's plugins"),
        "{plugin_user}"
    );
    assert!(!plugin_user.contains("agent-visible-value"));
    drop(daemon);
}

#[test]
fn after_commands_run_confined_and_report_failures_without_the_value() {
    let env = Env::new();
    // Where the `after` command (the plugin user, under root) may write: its sandbox grants it.
    let out_dir = env.dir.path().join("marks");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = out_dir.join("marker");
    let config = format!(
        r#"{base}
[secrets."demo/ok"]
provider = "random"
consumers = ["ok-file"]

[secrets."demo/snoop"]
provider = "random"
consumers = ["snoop-file"]

[secrets."demo/leaky"]
provider = "random"
consumers = ["leaky-file"]

[secrets."demo/slow"]
provider = "random"
consumers = ["slow-file"]

[consumers.ok-file]
kind = "file"
path = "out/ok"
after = ["sh", "-c", "echo $KEYWARDEN_VERSION > {marker}"]
after_sandbox = {{ write_paths = [{out:?}] }}

[consumers.snoop-file]
kind = "file"
path = "out/snoop"
after = ["sh", "-c", "cat {passphrase}"]

[consumers.leaky-file]
kind = "file"
path = "out/leaky"
owner = "65534"
after = ["sh", "-c", "echo \"bad key: $(cat \"$KEYWARDEN_FILE\")\" >&2; exit 3"]

[consumers.slow-file]
kind = "file"
path = "out/slow"
after = ["sleep", "30"]
after_timeout = "300ms"
"#,
        base = base_config("3s"),
        marker = marker.display(),
        out = out_dir.display().to_string(),
        passphrase = env.passphrase_file.display(),
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env.ok(&["init"], None);

    let out = env.run(&["rotate", "demo/ok", "--json"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "1");

    let error_of = |name: &str| {
        let out = env.run(&["rotate", name, "--json"], None);
        assert!(!out.status.success(), "{name}: {out:?}");
        format!(
            "{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            env.entry(name)["last_error"]
        )
    };
    let snoop = error_of("demo/snoop");
    assert!(snoop.contains("Permission denied"), "{snoop}");
    assert!(!snoop.contains(common::PASSPHRASE), "{snoop}");

    // The command reads the file it follows (its sandbox grants it) and prints the value in its
    // complaint: what is kept of that is redacted.
    let leaky = error_of("demo/leaky");
    assert!(leaky.contains("bad key: [redacted]"), "{leaky}");

    let slow = error_of("demo/slow");
    assert!(slow.contains("was killed"), "{slow}");
}

#[test]
fn admin_uids_can_reach_the_admin_socket_and_other_uids_are_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to connect as other users");
        return;
    }
    let env = Env::with_config(
        &base_config("3s").replace("[agent]\n", "[agent]\nadmin_uids = [65533]\n"),
    );
    env.ok(&["init"], None);
    let daemon = env.start_daemon();
    let status_as = |uid| curl_as(uid, &env.admin_socket(), "/v1/admin/status");
    let admin = status_as("65533");
    assert!(admin.ends_with("200"), "{admin}");
    let other = status_as("65532");
    assert!(other.ends_with("403"), "{other}");
    // An operator allowed to rotate and read status is not thereby allowed to read or write
    // values: the attack reads a secret over the admin socket.
    env.ok(
        &["put", "app/key"],
        Some(b"a value an operator must not read"),
    );
    let read = curl_as("65533", &env.admin_socket(), "/v1/admin/secrets/app/key");
    assert!(read.ends_with("403"), "{read}");
    assert!(!read.contains("a value an operator"), "{read}");
    drop(daemon);
}

#[test]
fn a_root_daemon_needs_its_plugin_user_only_for_what_it_runs() {
    if !is_root() {
        eprintln!("skipped: the plugin user matters only to a root daemon");
        return;
    }
    // No plugin, no `after`, no alert command: nothing to confine, so no user to have.
    let sockets = "[agent]\nsocket = \"run/agent.sock\"\nadmin_socket = \"run/admin.sock\"\n";
    let env = Env::with_config(&format!(
        "[daemon]\nplugin_user = \"no-such-user-kw\"\n{sockets}\n\
         [secrets.\"demo/x\"]\nprovider = \"random\"\nconsumers = [\"f\"]\n\
         [consumers.f]\nkind = \"file\"\npath = \"out/x\"\n"
    ));
    let daemon = env.start_daemon();
    drop(daemon);
    // A plugin with a missing user: refused at start, naming the user and how to create it.
    let plugin = hostile_plugin();
    let env = Env::with_config(&format!(
        "[daemon]\nplugin_user = \"no-such-user-kw\"\n{sockets}\n\
         [plugins.p]\ncommand = [{:?}]\nsha256 = \"{}\"\n",
        plugin.display().to_string(),
        sha256_of(&plugin)
    ));
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no-such-user-kw") && err.contains("useradd --system"),
        "{err}"
    );
}

/// Attack: a daemon run as a dedicated user that switches users with ambient CAP_SETUID and
/// CAP_SETGID (as the systemd unit gives it) must not hand those capabilities to the plugin,
/// which could otherwise make itself root.
#[test]
fn a_plugin_started_by_a_daemon_holding_ambient_setuid_keeps_no_capability_and_cannot_become_root()
{
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = "grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; id -u; \
                 python3 -c 'import os; os.setuid(0)' 2>/dev/null && echo BECAME-ROOT; true";
    let launch = Launch {
        confinement: Confinement {
            user: Some(keywarden::sandbox::Account {
                name: "65534:65534".into(),
                uid: 65534,
                gid: 65534,
            }),
            read: vec!["/proc".into()],
            ..Confinement::default()
        },
        cwd: dir.path().to_path_buf(),
        program: "/bin/sh".into(),
        sha256: None,
        args: vec!["-c".into(), probe.into()],
    };
    // The launcher as uid 65533 holding ambient CAP_SETUID and CAP_SETGID.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid",
            "--ambient-caps=+setuid,+setgid",
        ])
        .arg(env!("CARGO_BIN_EXE_keywarden"))
        .arg(LAUNCHER_ARG)
        .arg(serde_json::to_string(&launch).unwrap())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.lines().any(|l| l == "65534"), "switched: {report}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let line = report.lines().find(|l| l.starts_with(set)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}\n{report}");
    }
    assert!(!report.contains("BECAME-ROOT"), "{report}");
}
