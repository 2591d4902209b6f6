//! Bounded by design, through the real binaries: a fetch loop shares one lease and every fetch
//! is still counted in the audit chain; a clean stop leaves no write-ahead log; `audit archive`
//! moves old rows out with the chain intact, and a forged archive anchor is found.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{env_with_plugin, wait_for};
use common::{Env, curl};

const APP: &str = r#"
[secrets."app/token"]
provider = "random"
grace = "1m"

[[policy]]
name = "curl"
exe = ["/usr/bin/curl"]
secrets = ["app/*"]
max_ttl = "10m"
"#;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

fn verify(env: &Env, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["audit", "verify", "--json"];
    args.extend_from_slice(extra);
    let out = env.run(&args, None);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON: {text} (stderr: {stderr})"));
    (out.status.code(), report)
}

fn wal_bytes(store: &Path) -> u64 {
    let mut wal = store.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

#[test]
fn a_fetch_loop_shares_one_lease_and_every_fetch_is_counted_in_the_chain() {
    let env = env_with_plugin(APP);
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    let sock = env.agent_socket();
    const FETCHES: i64 = 60;
    let mut lease_ids = std::collections::BTreeSet::new();
    let mut last_expiry = String::new();
    for _ in 0..FETCHES {
        // Every curl is a new process (a new pid) of the same executable: the same peer.
        let (code, body) = curl(&sock, "GET", "/v1/secrets/app/token", &[]);
        assert_eq!(code, 200, "{body}");
        let reply = json(&body);
        lease_ids.insert(reply["lease_id"].as_str().unwrap().to_string());
        let expiry = reply["expires_at"].as_str().unwrap().to_string();
        assert!(expiry >= last_expiry, "the shared lease only ever extends");
        last_expiry = expiry;
    }
    assert_eq!(lease_ids.len(), 1, "one lease for the whole loop");
    assert_eq!(env.sql_i64("SELECT count(*) FROM leases"), 1);
    let told = chrono::DateTime::parse_from_rfc3339(&last_expiry)
        .unwrap()
        .timestamp_millis();
    assert!(
        env.sql_i64("SELECT expires_at FROM leases") >= told,
        "the store's expiry covers every expiry handed out before it is answered"
    );
    assert_eq!(
        env.sql_i64("SELECT count(*) FROM audit WHERE action = 'fetch.allowed'"),
        1
    );
    // The repeated fetches reach the chain within the fold interval.
    wait_for(
        "the fetches folded into the chain",
        Duration::from_secs(30),
        || {
            (env.sql_i64(
                "SELECT coalesce(sum(json_extract(detail, '$.count')), 0) FROM audit \
             WHERE action = 'fetch.repeated'",
            ) == FETCHES - 1)
                .then_some(())
        },
    );
    assert_eq!(env.sql_i64("SELECT fetches FROM leases"), FETCHES);
    let lease = lease_ids.first().unwrap();
    assert_eq!(
        env.sql_i64(&format!(
            "SELECT count(*) FROM audit WHERE action = 'fetch.repeated' \
             AND json_extract(detail, '$.lease_id') = '{lease}'"
        )),
        env.sql_i64("SELECT count(*) FROM audit WHERE action = 'fetch.repeated'"),
    );
    // Fetches covered by the expiry the store holds are counted in memory: a clean stop writes
    // them and folds them into the chain.
    const MORE: i64 = 3;
    for _ in 0..MORE {
        let (code, body) = curl(&sock, "GET", "/v1/secrets/app/token", &[]);
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(
        env.sql_i64(
            "SELECT coalesce(sum(json_extract(detail, '$.count')), 0) FROM audit \
             WHERE action = 'fetch.repeated'"
        ),
        FETCHES - 1 + MORE,
        "the counts only in memory reach the chain at a clean stop"
    );
    assert_eq!(
        wal_bytes(&env.store),
        0,
        "a clean stop leaves no write-ahead log"
    );
    let (code, report) = verify(&env, &[]);
    assert_eq!(code, Some(0), "{report}");
}

/// Every row of the audit table, oldest first: (seq, action).
fn actions(env: &Env) -> Vec<String> {
    let rows: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "tail", "-n", "100000", "--json"], None)).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn audit_archive_moves_old_rows_out_and_the_chain_still_verifies() {
    let env = Env::initialized();
    env.put("a", "value-a");
    env.put("b", "value-b");
    env.get("a");
    let total_before = actions(&env).len() as i64;
    let first = env.dir.path().join("audit-1.jsonl");
    let out = env.ok(
        &[
            "audit",
            "archive",
            "--before",
            "2999-01-01",
            "--json",
            first.to_str().unwrap(),
        ],
        None,
    );
    let summary = json(&out);
    assert_eq!(summary["rows"], total_before);
    assert_eq!(summary["first_seq"], 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&first).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let archived = std::fs::read_to_string(&first).unwrap();
    assert!(!archived.contains("value-a") && !archived.contains("value-b"));
    // The store keeps only the archive row; its chain goes on from the anchor.
    assert_eq!(actions(&env), ["audit.archived"]);
    let (code, report) = verify(&env, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["archived_through"], total_before);
    let (code, report) = verify(&env, &["--archive", first.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["rows"], total_before + 1);

    // More history, a second archive: both files and the store verify as one chain.
    env.put("c", "value-c");
    let second = env.dir.path().join("audit-2.jsonl");
    env.ok(
        &[
            "audit",
            "archive",
            "--before",
            "2999-01-01",
            second.to_str().unwrap(),
        ],
        None,
    );
    let files = [
        "--archive",
        first.to_str().unwrap(),
        "--archive",
        second.to_str().unwrap(),
    ];
    let (code, report) = verify(&env, &files);
    assert_eq!(code, Some(0), "{report}");
    let (code, report) = verify(&env, &[&["--keyed"][..], &files[..]].concat());
    assert_eq!(code, Some(0), "{report}");
    // Out of order, or the second alone, does not join.
    let (code, _) = verify(&env, &["--archive", second.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    // An existing file is never overwritten.
    let err = env.fails(
        1,
        &[
            "audit",
            "archive",
            "--before",
            "2999-01-01",
            first.to_str().unwrap(),
        ],
        None,
    );
    assert!(err.contains("exists"), "{err}");

    // An edited archive is found, naming the row.
    let edited = archived.replacen("\"secret.put\"", "\"secret.get\"", 1);
    std::fs::write(&first, edited).unwrap();
    let (code, report) = verify(&env, &files);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["first_bad_seq"], 2);
    // A truncated one too.
    let lines: Vec<&str> = archived.lines().collect();
    std::fs::write(&first, lines[..lines.len() - 1].join("\n")).unwrap();
    let (code, report) = verify(&env, &files);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("trailer"),
        "{report}"
    );
}

#[test]
fn a_forged_anchor_hiding_deleted_rows_fails_the_keyed_verify() {
    let env = Env::initialized();
    env.put("a", "value-a");
    env.get("a");
    env.put("a", "value-a2");
    // The attack: someone with write access to the database deletes the oldest rows (the
    // evidence of the first get) and writes an anchor so the rest still chains.
    env.sql(&[
        "INSERT INTO audit_anchor (id, seq, hash, archived_at) \
         SELECT 1, seq, hash, 0 FROM audit WHERE seq = 3",
        "DELETE FROM audit WHERE seq <= 3",
        "DELETE FROM audit_seals WHERE seq <= 3",
    ]);
    let (code, report) = verify(&env, &[]);
    assert_eq!(
        code,
        Some(0),
        "the chain alone cannot tell a forged anchor from a real one: {report}"
    );
    let (code, report) = verify(&env, &["--keyed"]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("seal"),
        "{report}"
    );
}

#[test]
fn audit_archive_runs_while_the_daemon_serves_and_the_chain_goes_on() {
    let env = env_with_plugin(APP);
    let daemon = env.start_daemon();
    wait_for("a fetch", Duration::from_secs(20), || {
        let (code, _) = curl(&env.agent_socket(), "GET", "/v1/secrets/app/token", &[]);
        (code == 200).then_some(())
    });
    let file = env.dir.path().join("audit-live.jsonl");
    // No passphrase is asked: the daemon, which holds the key, anchors the chain.
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE").args([
        "audit",
        "archive",
        "--before",
        "2999-01-01",
        "--json",
        file.to_str().unwrap(),
    ]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(summary["first_seq"], 1);
    // The daemon goes on appending after the anchor; files and store verify as one chain.
    let (code, _) = curl(
        &env.agent_socket(),
        "GET",
        "/v1/secrets/app/token?ttl=1",
        &[],
    );
    assert_eq!(code, 200);
    let (code, report) = verify(&env, &["--archive", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report}");
    let archived_row = {
        let rows: serde_json::Value =
            serde_json::from_str(&env.ok(&["audit", "tail", "-n", "100", "--json"], None)).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["action"] == "audit.archived")
            .cloned()
            .expect("the archive is audited")
    };
    assert!(
        archived_row["actor"]
            .as_str()
            .unwrap()
            .starts_with("admin uid="),
        "{archived_row}"
    );
    // A request naming rows that are no longer the chain's start is refused.
    let (code, body) = curl(
        &env.admin_socket(),
        "POST",
        "/v1/admin/audit/archive",
        &[
            "-d",
            &serde_json::json!({
                "first_seq": 1, "last_seq": 2, "rows": 2,
                "head": "00".repeat(32), "file": "forged"
            })
            .to_string(),
        ],
    );
    assert_eq!(code, 409, "{body}");
    let (code, report) = verify(&env, &["--archive", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(daemon.terminate(), Some(0));
}
