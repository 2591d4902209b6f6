//! The end state every drill checks, with its daemon running: nothing lost, nothing orphaned.

use std::path::Path;

use keywarden_testkit::Env;

use crate::kit::{self, Violations};

/// Everything a drill checks at its end, its daemon (`pid`) running: [`stored_secrets`],
/// [`audit_verifies`], and the hygiene sweep for every value the example plugin's upstream ever
/// held and `handed_out`. The number of secrets checked, and the sweep's summary.
pub fn end_state(
    env: &Env,
    pid: u32,
    secrets: &[(String, String)],
    handed_out: &[String],
    violations: &mut Violations,
) -> (usize, String) {
    let store = kit::open_db(&env.store);
    let upstream = kit::open_db(&env.upstream_db());
    let checked = stored_secrets(env, &store, &upstream, secrets, violations);
    audit_verifies(env, violations);
    let known: Vec<String> = kit::rows(&upstream, "SELECT value FROM creds")
        .into_iter()
        .map(|r| r.0)
        .chain(handed_out.iter().cloned())
        .collect();
    (checked, crate::hygiene::sweep(env, pid, &known, violations))
}

/// Each `(secret, consumer file)`: one current version, its credential the only one live at
/// the example plugin's upstream, the file holding it; no secret quarantined. The number of
/// secrets checked.
fn stored_secrets(
    env: &Env,
    store: &rusqlite::Connection,
    upstream: &rusqlite::Connection,
    secrets: &[(String, String)],
    violations: &mut Violations,
) -> usize {
    let mut checked = 0;
    for (name, file) in secrets {
        let Ok((200, body)) = kit::request(
            &env.admin_socket(),
            "GET",
            &format!("/v1/admin/secrets/{name}"),
            None,
        ) else {
            violations.check(false, || format!("{name}: the admin API did not answer"));
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let value = v["value"].as_str().unwrap().to_string();
        let key = v["meta"]["key_id"].as_str().unwrap_or_default().to_string();
        let live = kit::rows(
            upstream,
            &format!(
                "SELECT key_id, value FROM creds WHERE secret = '{name}' AND issued = 0 AND status = 'active'"
            ),
        );
        violations.check(live == vec![(key.clone(), value.clone())], || {
            format!(
                "{name}: live upstream {:?}, current {key}",
                live.iter().map(|l| &l.0).collect::<Vec<_>>()
            )
        });
        let held = std::fs::read_to_string(env.dir.path().join(file));
        violations.check(held.as_deref().ok() == Some(value.as_str()), || {
            format!("{name}: {file} does not hold the current version")
        });
        checked += 1;
    }
    // A daemon killed mid-write leaves a temporary file (holding a value) beside a consumer's
    // file; the next start removes it.
    let directories: std::collections::BTreeSet<_> = secrets
        .iter()
        .filter_map(|(_, file)| env.dir.path().join(file).parent().map(Path::to_path_buf))
        .collect();
    for dir in directories {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            violations.check(!(name.starts_with('.') && name.ends_with(".tmp")), || {
                format!("{}: an interrupted write's {name} is left", dir.display())
            });
        }
    }
    violations.check(
        kit::one(
            store,
            "SELECT count(*) FROM (SELECT secret_id FROM versions WHERE stage = 'current' \
             GROUP BY secret_id HAVING count(*) > 1)",
        ) == 0,
        || "a secret has two current versions".into(),
    );
    let quarantined = kit::rows(
        store,
        "SELECT name FROM secrets WHERE quarantined_at IS NOT NULL",
    );
    violations.check(quarantined.is_empty(), || {
        format!("quarantined: {quarantined:?}")
    });
    checked
}

/// `keywarden audit verify` passes.
pub fn audit_verifies(env: &Env, violations: &mut Violations) {
    let verify = env.run(&["audit", "verify"], None);
    violations.check(verify.status.success(), || {
        format!(
            "audit verify: {}",
            String::from_utf8_lossy(&verify.stderr).trim()
        )
    });
}
