//! The audit chain through the real binary: every store command leaves a row, and
//! `audit verify` finds rows edited, deleted from the middle or reordered in the SQLite file.

mod common;

use common::Env;

fn env_with_history() -> Env {
    let env = Env::initialized();
    env.put("a", "value-a");
    env.put("b", "value-b");
    env.get("a");
    env.ok(&["rm", "b", "--yes"], None);
    env.ok(&["rekey"], None);
    env
}

fn verify(env: &Env) -> (Option<i32>, String) {
    let out = env.run(&["audit", "verify", "--json"], None);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_command_appends_a_row_without_values() {
    let env = env_with_history();
    let rows: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "tail", "--json"], None)).unwrap();
    let actions: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "vault.init",
            "secret.put",
            "secret.put",
            "secret.get",
            "secret.remove",
            "vault.rekey"
        ]
    );
    let text = rows.to_string();
    assert!(!text.contains("value-a") && !text.contains("value-b"));
    assert_eq!(rows[3]["secret"], "a");
    assert_eq!(rows[3]["detail"]["version"], 1);
    assert!(rows[3]["actor"].as_str().unwrap().starts_with("cli uid="));

    let (code, out) = verify(&env);
    assert_eq!(code, Some(0), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["rows"], 6);
    assert_eq!(report["head"].as_str().unwrap().len(), 64);
    let text = env.ok(&["audit", "verify"], None);
    assert!(text.contains("audit chain intact: 6 rows"), "{text}");
}

#[test]
fn an_edited_row_is_named() {
    let env = env_with_history();
    env.sql(&["UPDATE audit SET actor = 'someone else' WHERE seq = 4"]);
    let (code, out) = verify(&env);
    assert_eq!(code, Some(1));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["first_bad_seq"], 4, "{out}");
    let err = env.fails(1, &["audit", "verify"], None);
    assert!(err.contains("broken at row 4"), "{err}");
}

#[test]
fn a_row_deleted_from_the_middle_is_found() {
    let env = env_with_history();
    env.sql(&["DELETE FROM audit WHERE seq = 3"]);
    let (code, out) = verify(&env);
    assert_eq!(code, Some(1));
    assert!(out.contains("\"first_bad_seq\": 4"), "{out}");
    // Renumbering to hide the gap does not help.
    env.sql(&["UPDATE audit SET seq = seq - 1 WHERE seq > 3"]);
    let (code, out) = verify(&env);
    assert_eq!(code, Some(1));
    assert!(out.contains("\"first_bad_seq\": 3"), "{out}");
}

#[test]
fn reordered_rows_are_found() {
    let env = env_with_history();
    env.sql(&[
        "UPDATE audit SET seq = -2 WHERE seq = 2",
        "UPDATE audit SET seq = 2 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = -2",
    ]);
    let (code, out) = verify(&env);
    assert_eq!(code, Some(1));
    assert!(out.contains("\"first_bad_seq\": 2"), "{out}");
}

#[test]
fn audit_tail_shows_a_hostile_executable_path_escaped_not_as_terminal_commands() {
    let env = Env::with_config(&common::daemon::base_config("3s"));
    let daemon = env.start_daemon();
    // A peer whose executable's name carries escape sequences (retitle the terminal, clear it).
    let evil = env.dir.path().join("curl\x1b]0;owned\x07\x1b[2J");
    std::fs::copy("/usr/bin/curl", &evil).unwrap();
    let (code, _) = common::curl_with(
        &evil,
        &env.agent_socket(),
        "GET",
        "/v1/secrets/any/thing",
        &[],
    );
    assert_eq!(code, 403);
    assert_eq!(daemon.terminate(), Some(0));
    let tail = env.ok(&["audit", "tail"], None);
    assert!(tail.contains("fetch.denied"), "{tail}");
    assert!(
        !tail.contains('\x1b') && !tail.contains('\x07'),
        "raw control characters: {tail:?}"
    );
    assert!(tail.contains("\\u{1b}]0;owned"), "{tail}");
}

/// Rewrites row `seq`'s detail and recomputes every hash from it on, as a database writer who
/// knows the (public) chain construction would.
fn rewrite_and_rehash(env: &Env, seq: i64, detail: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt.block_on(async {
        let store = keywarden::store::Store::open(&env.store, keywarden::store::Access::ReadOnly)
            .await
            .unwrap();
        store.audit_page(0, 10_000).await.unwrap()
    });
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut prev = rows[(seq - 2) as usize].hash.clone();
    let mut statements = Vec::new();
    for row in rows.iter().filter(|r| r.seq >= seq) {
        let mut forged = row.clone();
        forged.prev_hash = prev;
        if row.seq == seq {
            forged.detail = detail.to_string();
        }
        let hash = forged.expected_hash();
        statements.push(format!(
            "UPDATE audit SET detail = '{}', prev_hash = X'{}', hash = X'{}' WHERE seq = {}",
            forged.detail.replace('\'', "''"),
            hex(&forged.prev_hash),
            hex(&hash),
            row.seq
        ));
        prev = hash.to_vec();
    }
    let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
    env.sql(&statements);
}

#[test]
fn rows_rewritten_with_recomputed_hashes_or_cut_from_the_end_fail_the_keyed_check() {
    let env = env_with_history();
    let keyed = |env: &Env| {
        let out = env.run(&["audit", "verify", "--keyed", "--json"], None);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), report)
    };
    let (code, report) = keyed(&env);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["unsealed_tail"], 0, "every row is sealed: {report}");

    // The writer hides that `b` was fetched: the plain chain is fooled, the seals are not.
    rewrite_and_rehash(&env, 3, r#"{"version":1,"note":"nothing happened"}"#);
    assert_eq!(
        verify(&env).0,
        Some(0),
        "an unkeyed chain can be recomputed"
    );
    let fails_keyed = |env: &Env, says: &str| {
        let (code, report) = keyed(env);
        assert_eq!(code, Some(1), "{report}");
        assert!(
            report["reason"].as_str().unwrap().contains(says),
            "{report}"
        );
    };
    fails_keyed(&env, "keyed seal does not match");

    // Rows cut from the end: the plain chain still holds, a seal names a row that is gone.
    let env = env_with_history();
    env.sql(&["DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)"]);
    assert_eq!(verify(&env).0, Some(0));
    fails_keyed(&env, "deleted from its end");
}
