//! Compromise signals end to end: a signed signal, badly signed ones, leaked-token reports that
//! match and that do not, a canary fetch and an access anomaly — each through the real daemon,
//! checked by its effects (rotations, alerts delivered to a command, audit rows, metrics).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{env_with_plugin, wait_for};
use common::{Env, curl, curl_with};

const KEY: &str = "signal-signing-key-for-tests-0123456789";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The v1 signature a sender computes (with Python's hmac, as an outside detector would).
fn sign(timestamp: i64, path: &str, body: &str, key: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import hmac, hashlib, sys; \
             msg = ('v1\\n%s\\nPOST\\n%s\\n' % (sys.argv[2], sys.argv[3])).encode() + sys.argv[4].encode(); \
             print('v1=' + hmac.new(sys.argv[1].encode(), msg, hashlib.sha256).hexdigest())",
            key,
            &timestamp.to_string(),
            path,
            body,
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// POSTs `body` with a timestamp and, if given, a signature header.
fn post_at(
    port: u16,
    path: &str,
    body: &str,
    timestamp: i64,
    signature: Option<String>,
) -> (u16, String) {
    let mut cmd = Command::new("/usr/bin/curl");
    cmd.args([
        "-s",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "--data-binary",
        body,
        "-H",
        &format!("X-Keywarden-Timestamp: {timestamp}"),
    ]);
    if let Some(sig) = signature {
        cmd.args(["-H", &format!("X-Keywarden-Signature: {sig}")]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// POSTs `body` signed now with `key`.
fn post_signed(port: u16, path: &str, body: &str, key: &str) -> (u16, String) {
    let t = now();
    post_at(port, path, body, t, Some(sign(t, path, body, key)))
}

fn fetch(bin: &Path, sock: &Path, name: &str) -> serde_json::Value {
    let (_, body) = curl_with(bin, sock, "GET", &format!("/v1/secrets/{name}"), &[]);
    serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"))
}

fn alerts(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.dir.path().join("alerts/alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup() -> (Env, u16, common::daemon::Daemon) {
    let port = keywarden_testkit::free_port();
    let env = env_with_plugin("");
    // The alert command runs confined: it may write only what its sandbox grants.
    let alerts_dir = env.dir.path().join("alerts");
    std::fs::create_dir(&alerts_dir).unwrap();
    std::fs::set_permissions(&alerts_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let alerts = alerts_dir.join("alerts.jsonl");
    let config = format!(
        r#"
[signals]
listen = "127.0.0.1:{port}"
hmac_secret = "signals/key"
on_signal = "compromise"
on_leak = "compromise"
on_canary = "alert"
on_anomaly = "alert"
alert_command = ["sh", "-c", "cat >> {alerts}; echo >> {alerts}"]
alert_sandbox = {{ write_paths = [{alerts_dir:?}] }}

[secrets."signals/key"]
provider = "manual"

[secrets."app/a"]
provider = "random"

[secrets."app/b"]
provider = "random"

[secrets."trap/canary"]
provider = "random"
canary = true

[[policy]]
name = "curl"
exe = ["/usr/bin/curl"]
secrets = ["app/*", "trap/*"]
"#,
        alerts = alerts.display(),
        alerts_dir = alerts_dir.display().to_string(),
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env.ok(&["init"], None);
    env.put("signals/key", KEY);
    let daemon = env.start_daemon();
    wait_for("first versions", Duration::from_secs(20), || {
        ["app/a", "app/b", "trap/canary"]
            .iter()
            .all(|n| env.entry(n)["version"] == 1)
            .then_some(())
    });
    (env, port, daemon)
}

#[test]
fn a_signed_signal_starts_a_compromise_run_and_bad_signatures_are_rejected_and_counted() {
    let (env, port, daemon) = setup();
    let body =
        r#"{"type":"compromise","scope":{"names":["app/a"]},"message":"EDR flagged the host"}"#;
    assert_eq!(
        post_signed(port, "/v1/signals", body, "not the key, though long enough").0,
        401
    );
    assert_eq!(post_at(port, "/v1/signals", body, now(), None).0, 401);
    assert_eq!(
        post_at(port, "/v1/signals", body, now(), Some("v1=zz".into())).0,
        401
    );
    assert_eq!(env.entry("app/a")["version"], 1, "nothing happened");

    let (code, reply) = post_signed(port, "/v1/signals", body, KEY);
    assert_eq!(code, 202, "{reply}");
    wait_for("app/a to be rotated", Duration::from_secs(20), || {
        (env.entry("app/a")["version"] == 2).then_some(())
    });
    assert_eq!(
        env.entry("app/b")["version"],
        1,
        "outside the signal's scope"
    );
    let alert = wait_for("the alert", Duration::from_secs(10), || {
        alerts(&env).into_iter().find(|a| a["kind"] == "signal")
    });
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("EDR flagged the host")
    );
    assert!(alert["incident_id"].is_string());

    let (_, metrics) = metrics(&env);
    assert!(
        metrics.contains("keywarden_signals_rejected_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keywarden_alerts_total{kind=\"signal\"} 1"),
        "{metrics}"
    );
    assert_eq!(daemon.terminate(), Some(0));
    let audit = env.ok(&["audit", "tail", "-n", "100", "--json"], None);
    assert_eq!(audit.matches("\"signal.rejected\"").count(), 3);
    assert!(audit.contains("\"signal.received\""));
}

fn metrics(env: &Env) -> (u16, String) {
    curl(&env.admin_socket(), "GET", "/metrics", &[])
}

#[test]
fn a_leaked_token_that_matches_rotates_its_secret_and_one_that_does_not_changes_nothing() {
    let (env, port, daemon) = setup();
    let leaked = fetch(Path::new("/usr/bin/curl"), &env.agent_socket(), "app/b");
    let value = leaked["value"].as_str().unwrap();
    let miss = r#"[{"token":"ghp_not_ours_at_all_0000000000","type":"github_pat","url":"https://example.com/a","source":"content"}]"#;
    let (code, reply) = post_signed(port, "/v1/signals/leak", miss, KEY);
    assert_eq!(code, 200);
    assert!(reply.contains("\"matched\":0"), "{reply}");

    let report = format!(
        r#"[{{"token":"{value}","type":"keywarden_api_key","url":"https://gist.example/leak","source":"gist"}}]"#
    );
    let (code, reply) = post_signed(port, "/v1/signals/leak", &report, KEY);
    assert_eq!(code, 200);
    assert!(reply.contains("\"matched\":1"), "{reply}");
    wait_for("app/b to be rotated", Duration::from_secs(20), || {
        (env.entry("app/b")["version"] == 2).then_some(())
    });
    let alert = wait_for("the alert", Duration::from_secs(10), || {
        alerts(&env).into_iter().find(|a| a["kind"] == "leak")
    });
    assert!(alert["message"].as_str().unwrap().contains("app/b"));
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("https://gist.example/leak")
    );
    assert!(
        !alert.to_string().contains(value),
        "the leaked value is not repeated in alerts"
    );
    assert_eq!(alerts(&env).len(), 1, "the unmatched report raised nothing");
    assert_eq!(env.entry("app/a")["version"], 1);
    drop(daemon);
}

#[test]
fn a_canary_fetch_and_a_new_caller_raise_alerts_with_the_callers_identity() {
    let (env, _port, daemon) = setup();
    let sock = env.agent_socket();
    // The canary is served like any secret: whoever fetches it must not notice.
    let v = fetch(Path::new("/usr/bin/curl"), &sock, "trap/canary");
    assert!(v["value"].is_string());
    let alert = wait_for("the canary alert", Duration::from_secs(10), || {
        alerts(&env).into_iter().find(|a| a["kind"] == "canary")
    });
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("exe=/usr/bin/curl"),
        "{alert}"
    );

    // app/a has a first caller (curl); a second executable fetching it is an anomaly. The
    // policy is widened to let the copy through, so only the anomaly detector can object.
    fetch(Path::new("/usr/bin/curl"), &sock, "app/a");
    wait_for(
        "the first caller to be remembered",
        Duration::from_secs(10),
        || {
            (env.sql_i64(
                "SELECT count(*) FROM access_seen a JOIN secrets s ON s.id = a.secret_id \
             WHERE s.name = 'app/a' AND a.exe = '/usr/bin/curl'",
            ) == 1)
                .then_some(())
        },
    );
    let learned = env.dir.path().join("curl-learned");
    let copy = env.dir.path().join("curl-two");
    std::fs::copy("/usr/bin/curl", &learned).unwrap();
    std::fs::copy("/usr/bin/curl", &copy).unwrap();
    drop(daemon);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(
            "exe = [\"/usr/bin/curl\"]",
            &format!(
                "exe = [\"/usr/bin/curl\", {:?}, {:?}]",
                learned.display().to_string(),
                copy.display().to_string()
            ),
        ),
    )
    .unwrap();
    // Within the learning period (an hour by default) a new caller is remembered silently.
    let daemon = env.start_daemon();
    fetch(&learned, &sock, "app/a");
    wait_for(
        "the learned caller to be remembered",
        Duration::from_secs(10),
        || {
            (env.sql_i64("SELECT count(*) FROM access_seen WHERE exe LIKE '%curl-learned'") == 1)
                .then_some(())
        },
    );
    assert!(
        alerts(&env).iter().all(|a| a["kind"] != "anomaly"),
        "{:?}",
        alerts(&env)
    );
    drop(daemon);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("[signals]\n", "[signals]\nanomaly_learning = \"0s\"\n"),
    )
    .unwrap();
    let daemon = env.start_daemon();
    fetch(&copy, &sock, "app/a");
    let alert = wait_for("the anomaly alert", Duration::from_secs(10), || {
        alerts(&env).into_iter().find(|a| a["kind"] == "anomaly")
    });
    assert!(
        alert["message"].as_str().unwrap().contains("curl-two"),
        "{alert}"
    );
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("never seen before"),
        "{alert}"
    );
    let status = env.ok(&["status"], None);
    assert!(
        status.contains("ALERT") && status.contains("anomaly"),
        "{status}"
    );
    // Acknowledged alerts leave `status`, stay in `alerts list`, and the ack is audited.
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["alerts", "list", "--json"], None)).unwrap();
    let open = listed.as_array().unwrap().len();
    assert!(open >= 2, "the canary and the anomaly: {listed}");
    let first = listed[0]["id"].to_string();
    assert!(
        env.ok(&["alerts", "ack", &first], None)
            .contains("acknowledged 1")
    );
    assert!(
        env.ok(&["alerts", "ack", "--all"], None)
            .contains(&format!("acknowledged {}", open - 1))
    );
    assert!(!env.ok(&["status"], None).contains("ALERT"));
    let listed = env.ok(&["alerts", "list"], None);
    assert!(listed.contains("acked by admin uid="), "{listed}");
    let out = env.run(&["alerts", "ack", "--all"], None);
    assert_eq!(out.status.code(), Some(1), "nothing left to acknowledge");
    drop(daemon);
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM audit WHERE action = 'alert.acked'"),
        2
    );
}

#[test]
fn replayed_stale_forged_and_old_style_signals_are_refused() {
    let (env, port, daemon) = setup();
    let body = r#"{"type":"alert","message":"probe"}"#;
    let path = "/v1/signals";
    // A captured signal sent again.
    let t = now();
    let signature = sign(t, path, body, KEY);
    assert_eq!(post_at(port, path, body, t, Some(signature.clone())).0, 202);
    let (code, reply) = post_at(port, path, body, t, Some(signature));
    assert_eq!(code, 401, "{reply}");
    assert!(reply.contains("replay"), "{reply}");
    // One signed ten minutes ago (or ahead), correctly.
    for skew in [-600, 600] {
        let t = now() + skew;
        let (code, reply) = post_at(port, path, body, t, Some(sign(t, path, body, KEY)));
        assert_eq!(code, 401, "{reply}");
        assert!(reply.contains("five minutes"), "{reply}");
    }
    // Signed for another path, or with the timestamp changed after signing.
    let t = now();
    let leak_signature = sign(t, "/v1/signals/leak", body, KEY);
    assert_eq!(post_at(port, path, body, t, Some(leak_signature)).0, 401);
    let signature = sign(t, path, body, KEY);
    assert_eq!(post_at(port, path, body, t + 1, Some(signature)).0, 401);
    // The old form (HMAC over the body alone) is refused, saying what to send instead.
    let old = Command::new("python3")
        .args([
            "-c",
            "import hmac, hashlib, sys; print(hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).hexdigest())",
            KEY,
            body,
        ])
        .output()
        .unwrap();
    let old = format!("sha256={}", String::from_utf8_lossy(&old.stdout).trim());
    let (code, reply) = post_at(port, path, body, now(), Some(old));
    assert_eq!(code, 401, "{reply}");
    assert!(reply.contains("X-Keywarden-Signature: v1="), "{reply}");
    // Only the one real signal was accepted; every refusal was audited and counted.
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM audit WHERE action = 'signal.received'"),
        1
    );
    // Repeats of one reason within 10 s share a row (written at the latest at a clean stop),
    // which counts them: every refusal is accounted for.
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        env.sql_i64(
            "SELECT sum(coalesce(json_extract(detail, '$.repeats'), 1)) FROM audit \
             WHERE action = 'signal.rejected'"
        ),
        6
    );
}

#[test]
fn a_short_signing_key_or_a_plain_listener_beyond_loopback_is_refused_and_tls_allows_it() {
    let (env, port, daemon) = setup();
    assert_eq!(daemon.terminate(), Some(0));
    env.put("signals/key", "too-short-a-key");
    let daemon = env.start_daemon();
    let (code, reply) = post_signed(
        port,
        "/v1/signals",
        r#"{"type":"alert"}"#,
        "too-short-a-key",
    );
    assert_eq!(code, 401, "{reply}");
    assert!(reply.contains("shorter than 32 bytes"), "{reply}");
    assert_eq!(daemon.terminate(), Some(0));

    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(&format!("127.0.0.1:{port}"), &format!("0.0.0.0:{port}")),
    )
    .unwrap();
    let err = env.fails(1, &["status"], None);
    assert!(
        err.contains("signals.listen") && err.contains("not a loopback address"),
        "{err}"
    );

    // With TLS it may listen beyond loopback; signals then come over HTTPS only.
    let cert = env.dir.path().join("signals-cert.pem");
    let key = env.dir.path().join("signals-key.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replacen(
            "[signals]\n",
            &format!(
                "[signals]\ntls = {{ cert = {:?}, key = {:?} }}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
            1,
        ),
    )
    .unwrap();
    env.put("signals/key", KEY);
    let daemon = env.start_daemon();
    let body = r#"{"type":"alert"}"#;
    let t = now();
    let https = |scheme: &str| {
        Command::new("/usr/bin/curl")
            .args(["-s", "-w", "\n%{http_code}", "-X", "POST", "--cacert"])
            .arg(&cert)
            .args(["--data-binary", body])
            .args(["-H", &format!("X-Keywarden-Timestamp: {t}")])
            .args([
                "-H",
                &format!(
                    "X-Keywarden-Signature: {}",
                    sign(t, "/v1/signals", body, KEY)
                ),
            ])
            .arg(format!("{scheme}://127.0.0.1:{port}/v1/signals"))
            .output()
            .unwrap()
    };
    let out = String::from_utf8_lossy(&https("https").stdout).into_owned();
    assert!(out.ends_with("202"), "{out}");
    let plain = String::from_utf8_lossy(&https("http").stdout).into_owned();
    assert!(!plain.ends_with("202"), "plain HTTP is not spoken: {plain}");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_canary_fetched_in_a_loop_raises_one_alert_not_fifty() {
    let (env, _port, daemon) = setup();
    let sock = env.agent_socket();
    for _ in 0..50 {
        fetch(Path::new("/usr/bin/curl"), &sock, "trap/canary");
    }
    let suppressed = |env: &Env| {
        let (_, metrics) = curl(&env.admin_socket(), "GET", "/metrics", &[]);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("keywarden_reactions_suppressed_total "))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .unwrap_or(0)
    };
    wait_for("the repeats to be counted", Duration::from_secs(20), || {
        (suppressed(&env) == 49).then_some(())
    });
    wait_for("the one alert", Duration::from_secs(20), || {
        (alerts(&env)
            .iter()
            .filter(|a| a["kind"] == "canary")
            .count()
            == 1)
            .then_some(())
    });
    assert_eq!(
        env.sql_i64(
            "SELECT count(*) FROM audit WHERE action = 'alert.raised' \
             AND json_extract(detail, '$.kind') = 'canary'"
        ),
        1
    );
    drop(daemon);
}

#[test]
fn the_signal_listener_stays_open_across_a_reload() {
    // A detector's signal must not be refused because the daemon was reloading: the listener
    // stays open while SIGHUP restarts the services, and a connection made meanwhile waits in
    // its backlog for the next run.
    let (env, port, daemon) = setup();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connects = keywarden_testkit::connect_every_millisecond(port, stop.clone());
    daemon.reload();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, refused) = connects.join().unwrap();
    assert_eq!(
        refused, 0,
        "connections refused across the reload ({made} made)"
    );
    // And the run after the reload answers on it.
    let body = r#"{"type":"compromise","scope":{"names":["app/a"]},"message":"after the reload"}"#;
    let (code, reply) = post_signed(port, "/v1/signals", body, KEY);
    assert_eq!(code, 202, "{reply}");
    wait_for("app/a to be rotated", Duration::from_secs(20), || {
        (env.entry("app/a")["version"] == 2).then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
}
