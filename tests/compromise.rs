//! Assume compromise end to end, through the real daemon and the Python example plugin: 200
//! secrets with file consumers and live leases rotated and revoked at once, an exact report,
//! failures retried by a second run, a daemon killed in the middle, and a rotation already under
//! way when the incident starts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, env_with_plugin, wait_for, wait_for_explained};
use common::{Env, curl};

const FLEET: usize = 200;

fn fleet_config(settings: &str) -> String {
    let mut config = String::from(
        "[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"fleet/*\", \"other/*\"]\nmax_ttl = \"1h\"\n\n\
         [secrets.\"other/untouched\"]\nprovider = \"example\"\ntags = [\"dev\"]\n\n",
    );
    for i in 0..FLEET {
        config.push_str(&format!(
            "[secrets.\"fleet/{i:03}\"]\nprovider = \"example\"\ntags = [\"prod\"]\nconsumers = [\"file-{i:03}\"]\ngrace = \"1h\"\n{settings}\n\
             [consumers.file-{i:03}]\nkind = \"file\"\npath = \"out/{i:03}.key\"\n\n"
        ));
    }
    config
}

/// The fleet secrets not yet at `expected` and idle.
fn behind(env: &Env, expected: i64) -> Vec<serde_json::Value> {
    env.list()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("fleet/"))
        .filter(|e| e["version"].as_i64() != Some(expected) || e["rotation_state"] != "done")
        .cloned()
        .collect()
}

/// Waits until every fleet secret is at `expected` and idle; on timeout, names the ones that are
/// not and shows the daemon's log.
fn settle(env: &Env, daemon: &Daemon, expected: i64) {
    wait_for_explained(
        &format!("every secret to reach version {expected}"),
        Duration::from_secs(120),
        || behind(env, expected).is_empty().then_some(()),
        || {
            let behind = behind(env, expected);
            format!(
                "{} behind: {:?}\n{}",
                behind.len(),
                &behind[..behind.len().min(5)],
                daemon.log_text()
            )
        },
    );
}

fn curl_lease(sock: &Path, name: &str) -> String {
    let (_, body) = curl(sock, "GET", &format!("/v1/secrets/{name}?ttl=3600"), &[]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["lease_id"].as_str().unwrap().to_string()
}

fn renew_status(sock: &Path, lease: &str) -> u16 {
    curl(sock, "PUT", &format!("/v1/leases/{lease}/renew"), &[]).0
}

fn rotate_all(env: &Env, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["rotate-all"];
    all.extend_from_slice(args);
    let out = env.run(&all, None);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON report: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

fn names(v: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn assume_compromise_rotates_and_revokes_two_hundred_secrets_and_reports_exactly() {
    let env = env_with_plugin(&fleet_config(""));
    let daemon = env.start_daemon();
    settle(&env, &daemon, 1);
    let old_keys = env.upstream_i64("SELECT count(*) FROM creds WHERE status = 'active'");
    assert_eq!(old_keys, FLEET as i64 + 1);
    let sock = env.agent_socket();
    let leases: Vec<String> = (0..FLEET)
        .map(|i| curl_lease(&sock, &format!("fleet/{i:03}")))
        .collect();
    let other_lease = curl_lease(&sock, "other/untouched");

    // The plan first; without --yes and a terminal it refuses.
    let (code, plan) = rotate_all(
        &env,
        &[
            "--assume-compromise",
            "--tag",
            "prod",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(code, Some(0));
    assert_eq!(plan["secrets"].as_array().unwrap().len(), FLEET);
    assert_eq!(plan["live_leases"], FLEET);
    let err = env.fails(
        1,
        &["rotate-all", "--assume-compromise", "--tag", "prod"],
        None,
    );
    assert!(err.contains("refusing to run without --yes"), "{err}");

    let (code, report) = rotate_all(
        &env,
        &[
            "--assume-compromise",
            "--tag",
            "prod",
            "--yes",
            "--json",
            "--concurrency",
            "16",
        ],
    );
    assert_eq!(code, Some(0), "{report}");
    let expected: Vec<String> = (0..FLEET).map(|i| format!("fleet/{i:03}")).collect();
    assert_eq!(
        names(&report["rotated"]),
        expected,
        "the report lists exactly the secrets in scope"
    );
    assert_eq!(report["failed"], serde_json::json!([]));
    assert_eq!(report["leases_revoked"], FLEET);
    let incident = report["incident_id"].as_str().unwrap().to_string();

    // Upstream: every old key revoked, one live key per fleet secret (the new current one).
    assert_eq!(
        env.upstream_i64(
            "SELECT count(*) FROM creds WHERE secret LIKE 'fleet/%' AND status = 'active'"
        ),
        FLEET as i64
    );
    assert_eq!(
        env.upstream_i64(
            "SELECT count(*) FROM creds WHERE secret LIKE 'fleet/%' AND status = 'revoked'"
        ),
        FLEET as i64
    );
    // No old lease still works; the lease outside the scope does.
    for lease in leases.iter().step_by(17) {
        assert_eq!(
            renew_status(&sock, lease),
            404,
            "a revoked lease was renewed"
        );
    }
    assert_eq!(renew_status(&sock, &other_lease), 200);
    assert_eq!(daemon.terminate(), Some(0));

    for i in (0..FLEET).step_by(23) {
        let name = format!("fleet/{i:03}");
        let current = env.ok(&["get", &name, "--no-newline"], None);
        assert_eq!(
            std::fs::read_to_string(env.dir.path().join(format!("out/{i:03}.key"))).unwrap(),
            current
        );
        assert_eq!(env.entry(&name)["version"], 2);
    }
    assert_eq!(env.entry("other/untouched")["version"], 1, "out of scope");
    // Every audit row of the run carries the incident id.
    let tagged = env.sql_i64(&format!(
        "SELECT count(*) FROM audit WHERE incident_id = '{incident}'"
    ));
    assert!(tagged > FLEET as i64 * 5, "{tagged}");
    let untagged_rotation_rows = env.sql_i64(&format!(
        "SELECT count(*) FROM audit WHERE action LIKE 'rotation.%' AND incident_id IS NULL \
         AND seq > (SELECT min(seq) FROM audit WHERE incident_id = '{incident}')"
    ));
    assert_eq!(untagged_rotation_rows, 0);
    env.ok(&["audit", "verify"], None);
}

fn failed_upstream(env: &Env) -> Vec<String> {
    let out = Command::new("python3")
        .args(["-c", "import sqlite3,sys; print('\\n'.join(r[0] for r in sqlite3.connect(sys.argv[1]).execute(\"SELECT secret FROM events WHERE op = 'failed:create' ORDER BY secret\")))"])
        .arg(env.upstream_db())
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn failures_are_reported_exactly_and_a_second_run_finishes_only_them() {
    // About one secret in ten fails its second create (the first built version 1).
    let env = env_with_plugin(&fleet_config(
        "settings = { fail_pct = { op = \"create\", pct = 10, skip = 1 } }\n",
    ));
    let daemon = env.start_daemon();
    settle(&env, &daemon, 1);
    let (code, first) = rotate_all(
        &env,
        &["--assume-compromise", "--tag", "prod", "--yes", "--json"],
    );
    assert_eq!(code, Some(1), "a failure means exit 1: {first}");
    let failed = failed_upstream(&env);
    assert!(
        failed.len() > 5 && failed.len() < 40,
        "about 10 %: {}",
        failed.len()
    );
    let mut reported: Vec<String> = first["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(
                f["error"]
                    .as_str()
                    .unwrap()
                    .contains("injected failure of create"),
                "{f}"
            );
            f["name"].as_str().unwrap().to_string()
        })
        .collect();
    reported.sort();
    assert_eq!(
        reported, failed,
        "the report lists exactly the secrets whose create failed"
    );
    assert_eq!(
        first["rotated"].as_array().unwrap().len(),
        FLEET - failed.len()
    );
    for name in &failed {
        assert_eq!(
            env.entry(name)["version"],
            1,
            "{name} kept its current version"
        );
    }

    let (code, second) = rotate_all(
        &env,
        &["--assume-compromise", "--tag", "prod", "--yes", "--json"],
    );
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(
        second["incident_id"], first["incident_id"],
        "the same incident resumes"
    );
    assert_eq!(second["rotated"].as_array().unwrap().len(), FLEET);
    assert_eq!(second["failed"], serde_json::json!([]));
    // Only the failed ones were rotated again: every secret is at version 2, none at 3.
    let versions: Vec<i64> = env
        .list()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("fleet/"))
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert!(versions.iter().all(|v| *v == 2), "{versions:?}");
    drop(daemon);
}

#[test]
fn a_daemon_killed_in_the_middle_finishes_after_restart_and_a_rerun_converges() {
    let env = Env::new();
    let config = format!(
        "{}\n{}\n{}",
        common::daemon::base_config("5s"),
        common::daemon::example_plugin_config(env.dir.path(), ", EXAMPLE_DELAY_MS = \"25\""),
        fleet_config("")
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    let daemon = env.start_daemon();
    settle(&env, &daemon, 1);
    let mut run = env
        .cmd()
        .args([
            "rotate-all",
            "--assume-compromise",
            "--tag",
            "prod",
            "--yes",
            "--json",
            "--concurrency",
            "4",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("some rotations to finish", Duration::from_secs(60), || {
        let done = env
            .list()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["version"] == 2 && e["name"].as_str().unwrap().starts_with("fleet/"))
            .count();
        (done >= 20).then_some(())
    });
    daemon.kill9();
    let _ = run.wait();
    let not_yet = env
        .list()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["version"] == 1 && e["name"].as_str().unwrap().starts_with("fleet/"))
        .count();
    assert!(not_yet > 0, "the kill landed mid-run");

    // On restart the daemon resumes the incident by itself.
    let daemon = env.start_daemon();
    settle(&env, &daemon, 2);
    let (code, report) = rotate_all(
        &env,
        &["--assume-compromise", "--tag", "prod", "--yes", "--json"],
    );
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["rotated"].as_array().unwrap().len(), FLEET);
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        env.upstream_i64(
            "SELECT count(*) FROM creds WHERE secret LIKE 'fleet/%' AND status = 'active'"
        ),
        FLEET as i64,
        "exactly one live key per secret"
    );
    for i in (0..FLEET).step_by(19) {
        let name = format!("fleet/{i:03}");
        let current: serde_json::Value =
            serde_json::from_str(&env.ok(&["get", &name, "--json"], None)).unwrap();
        let key = current["meta"]["key_id"].as_str().unwrap();
        assert_eq!(
            env.upstream_text(&format!("SELECT status FROM creds WHERE key_id = '{key}'")),
            "active"
        );
        assert_eq!(
            std::fs::read_to_string(env.dir.path().join(format!("out/{i:03}.key"))).unwrap(),
            current["value"].as_str().unwrap()
        );
    }
    env.ok(&["audit", "verify"], None);
}

#[test]
fn a_rotation_under_way_is_joined_and_its_pre_incident_value_rotated_once_more() {
    // A manual rotation minted its new value before the incident began, so that value may be
    // exposed: the incident joins the rotation (escalated to an emergency) and, once it is done,
    // rotates the secret once more.
    let env = common::daemon::env_with_plugin_timeout(
        r#"
[secrets."app/slow"]
provider = "example"
settings = { hang = { op = "verify", once = true, skip = 1 } }
"#,
        "3s",
    );
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(30), || {
        let e = env.entry("app/slow");
        (e["version"] == 1 && e["rotation_state"] == "done").then_some(())
    });
    env.ok(&["rotate", "app/slow", "--no-wait"], None);
    wait_for(
        "the manual rotation to hang in verify",
        Duration::from_secs(30),
        || {
            (env.upstream_i64("SELECT count(*) FROM events WHERE op = 'hung:verify'") == 1)
                .then_some(())
        },
    );
    let (code, report) = rotate_all(
        &env,
        &["app/slow", "--assume-compromise", "--yes", "--json"],
    );
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(names(&report["rotated"]), vec!["app/slow"], "{report}");
    let e = env.entry("app/slow");
    assert_eq!(e["version"], 3, "joined version 2, then one more: {e}");
    assert_eq!(e["rotation_state"], "done", "{e}");
    assert_eq!(
        env.upstream_i64(
            "SELECT count(*) FROM creds WHERE secret = 'app/slow' AND status = 'active'"
        ),
        1,
        "only the newest key is live"
    );
    let audit: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "tail", "-n", "500", "--json"], None)).unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "rotation.escalated")
            .count(),
        1,
        "{actions:?}"
    );
    drop(daemon);
}

#[test]
fn a_rotation_escalated_after_its_promotion_revokes_the_old_credential_upstream() {
    let env = env_with_plugin("[secrets.\"svc/late\"]\nprovider = \"example\"\ngrace = \"1h\"\n");
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(30), || {
        (env.entry("svc/late")["rotation_state"] == "done").then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    let old_key = env.upstream_text("SELECT key_id FROM creds WHERE current = 1");
    // A rotation stopped right after its journal said `pushed`, then escalated into an
    // incident: the compromise landed while the step ran, so the step never saw it.
    let mut rotate = env.cmd();
    rotate.env("FAILPOINTS", "rotation.pushed=return");
    let out = common::run_with(rotate, &["rotate", "svc/late"], None);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(6),
        "the rotation stops at its crash point"
    );
    env.sql(&["UPDATE rotations SET emergency = 1 WHERE state = 'pushed'"]);

    let daemon = env.start_daemon();
    wait_for("the resumed rotation", Duration::from_secs(30), || {
        (env.entry("svc/late")["rotation_state"] == "done").then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
    // The store says the old version is revoked, and so does the provider: no grace, no
    // credential left live that keywarden believes dead.
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM versions WHERE version = 1 AND stage = 'revoked'"),
        1
    );
    assert_eq!(
        env.upstream_text(&format!(
            "SELECT status FROM creds WHERE key_id = '{old_key}'"
        )),
        "revoked"
    );
}

#[test]
fn an_absurd_concurrency_is_refused_before_anything_starts() {
    let env = env_with_plugin("[secrets.\"svc/a\"]\nprovider = \"example\"\n");
    let daemon = env.start_daemon();
    // Once a panic in the runner that left the incident "running" forever.
    let (code, body) = curl(
        &env.admin_socket(),
        "POST",
        "/v1/admin/compromise",
        &[
            "-d",
            r#"{"all": true, "concurrency": 18446744073709551615}"#,
        ],
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("concurrency must be between 1 and 1024"),
        "{body}"
    );
    assert_eq!(env.sql_i64("SELECT count(*) FROM incidents"), 0);
    let (code, _) = curl(&env.admin_socket(), "GET", "/v1/admin/status", &[]);
    assert_eq!(code, 200);
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn an_incident_runs_at_its_own_concurrency_past_the_routine_cap_and_the_plan_names_a_binding_plugin()
 {
    const N: usize = 6;
    let mut secrets = String::new();
    for i in 0..N {
        // The first verify of each secret (its first version) passes; the incident's hangs,
        // so its rotations stay `created` and can be counted while they are all in flight.
        secrets.push_str(&format!(
            "[secrets.\"busy/{i}\"]\nprovider = \"example\"\nsettings = {{ hang = {{ op = \"verify\", skip = 1 }} }}\n"
        ));
    }
    // A hung verify holds its routine permit until the (long) plugin timeout.
    let env = common::daemon::env_with_plugin_timeout(&secrets, "60s");
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replacen("[daemon]\n", "[daemon]\nmax_concurrent_rotations = 1\n", 1)
        .replacen(
            "[plugins.example]\n",
            "[plugins.example]\nmax_concurrency = 4\n",
            1,
        );
    std::fs::write(&env.config, config).unwrap();
    let daemon = env.start_daemon();
    wait_for("every first version", Duration::from_secs(60), || {
        env.list()
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["version"] == 1 && s["rotation_state"] == "done")
            .then_some(())
    });
    // The plan says what binds before anything starts.
    let out = env.run(&["rotate-all", "--dry-run", "--concurrency", "32"], None);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("bound: plugin example takes 4 request(s) at once"),
        "{plan}"
    );
    let out = env.run(&["rotate-all", "--dry-run", "--json"], None);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["plugins"],
        serde_json::json!([{ "plugin": "example", "max_concurrency": 4, "secrets": N }])
    );
    // Under the routine cap of 1, one verify would hang holding the only permit and no other
    // rotation could reach its plugin; the incident's own concurrency of 3 lets three in.
    let mut cmd = env.cmd();
    cmd.args([
        "rotate-all",
        "--assume-compromise",
        "--yes",
        "--concurrency",
        "3",
    ]);
    let mut run = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "three incident verifies in flight at once",
        Duration::from_secs(30),
        || {
            // The plugin counts each verify of a secret; the second is the incident's.
            (common::sql_one::<i64>(
                &env.upstream_db(),
                "SELECT count(*) FROM counts WHERE tag LIKE 'skip:hang:verify:%' AND n = 2",
            ) == 3)
                .then_some(())
        },
    );
    let _ = run.kill();
    let _ = run.wait();
    drop(daemon);
}

#[test]
fn an_incident_with_a_secret_left_to_a_person_finishes_is_not_resumed_and_a_put_resolves_it() {
    let env = Env::initialized();
    env.ok(&["put", "ops/manual"], Some(b"typed-by-a-person-1"));
    let config = "[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"ops/*\"]\nmax_ttl = \"1h\"\n\n\
         [secrets.\"ops/auto\"]\nprovider = \"random\"\n\n\
         [secrets.\"ops/manual\"]\nprovider = \"manual\"\n";
    let base = std::fs::read_to_string(&env.config).unwrap();
    let daemon_config = common::daemon::base_config("5s");
    std::fs::write(&env.config, format!("{base}\n{daemon_config}\n{config}")).unwrap();
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("ops/auto")["version"] == 1).then_some(())
    });
    let sock = env.agent_socket();
    let before = curl_lease(&sock, "ops/auto");
    let plan = env.ok(&["rotate-all", "--assume-compromise", "--dry-run"], None);
    assert!(
        plan.contains("2 secret(s) in scope (1 left to a person, 1 to rotate)"),
        "{plan}"
    );

    let (code, report) = rotate_all(&env, &["--assume-compromise", "--yes", "--json"]);
    assert_eq!(
        code,
        Some(1),
        "a secret left to a person is a failure: {report}"
    );
    assert_eq!(report["rotated"], serde_json::json!(["ops/auto"]));
    assert_eq!(report["needs_person"][0]["name"], "ops/manual");
    assert_eq!(report["finished"], true);
    let id = report["incident_id"].as_str().unwrap().to_string();
    assert_ne!(renew_status(&sock, &before), 200, "revoked by the incident");
    let after = curl_lease(&sock, "ops/auto");
    let status = json_of(&env.ok(&["status", "--json"], None));
    assert_eq!(
        status["incidents"],
        serde_json::json!([]),
        "nothing is open: {status}"
    );
    let screen = env.ok(&["status"], None);
    assert!(
        screen.contains(&format!("NEEDS A PERSON ops/manual (incident {id})")),
        "status shows what is left to a person: {screen}"
    );

    // A restart neither resumes the incident nor revokes what was fetched since.
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = env.start_daemon();
    assert_eq!(
        renew_status(&sock, &after),
        200,
        "a lease issued after the incident survives"
    );
    assert!(
        !daemon
            .log_text()
            .contains("resuming an unfinished compromise run"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(), Some(0));

    // The person stores the replacement: the incident records the resolution.
    env.ok(&["put", "ops/manual"], Some(b"typed-by-a-person-2"));
    let shown = json_of(&env.ok(&["incident", "show", &id, "--json"], None));
    assert_eq!(
        shown["resolved"],
        serde_json::json!(["ops/manual"]),
        "{shown}"
    );
    assert_eq!(shown["needs_person"], serde_json::json!([]));
    let resolved = env.sql_i64(&format!(
        "SELECT count(*) FROM audit WHERE action = 'compromise.resolved' AND incident_id = '{id}' \
         AND secret = 'ops/manual'"
    ));
    assert_eq!(resolved, 1);
    let listed = env.ok(&["incident", "list"], None);
    assert!(
        listed.contains(&id) && listed.contains("finished"),
        "{listed}"
    );
    let daemon = env.start_daemon();
    let screen = env.ok(&["status"], None);
    assert!(!screen.contains("NEEDS A PERSON"), "resolved: {screen}");
    assert_eq!(daemon.terminate(), Some(0));

    // Closing by hand is audited, and a closed incident is never reopened.
    assert!(env.ok(&["incident", "close", &id], None).contains("closed"));
    let listed = json_of(&env.ok(&["incident", "list", "--json"], None));
    assert!(
        listed[0]["closed_by"].as_str().unwrap().starts_with("cli"),
        "{listed}"
    );
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}
