//! `scan` and `import` against a planted home: every kind found with its severity, no value
//! printed, the copy of a stored secret recognised, and after `import --shred` the plaintext gone
//! and the app still running through `exec`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::Env;

// Fake values in the shapes the patterns know; none is a real credential.
const OPENAI: &str = "sk-proj-Zq3fakeFAKEfake0123456789abcdefABCDEFghij";
const ANTHROPIC: &str = "sk-ant-api03-fakeFAKEfake0123456789abcdefABCDEF";
const AWS_ID: &str = "AKIAFAKEFAKEFAKE1234";
const AWS_SECRET: &str = "fakeFAKEfake/0123456789+abcdefABCDEFfake1";
const GITHUB: &str = "ghp_fakeFAKEfake0123456789abcdefABCDEF12";
const DB_PASSWORD: &str = "not-a-real-db-password";
const KEY_BODY: &str = "MC4CAQAwBQYDK2VwBCIEINOTAREALKEYNOTAREALKEYNOTAREALKEY0000";

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn plant(home: &Path) {
    write(
        &home.join("app/.env"),
        &format!(
            "# the app\nPORT=8080\nOPENAI_API_KEY={OPENAI}\nDATABASE_URL=postgres://app:{DB_PASSWORD}@db:5432/app\n"
        ),
    );
    write(
        &home.join(".aws/credentials"),
        &format!("[default]\naws_access_key_id = {AWS_ID}\naws_secret_access_key = {AWS_SECRET}\n"),
    );
    write(
        &home.join(".ssh/id_ed25519"),
        &format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{KEY_BODY}\n-----END OPENSSH PRIVATE KEY-----\n"
        ),
    );
    write(&home.join(".ssh/known_hosts"), "host ssh-ed25519 AAAA\n");
    write(
        &home.join(".git-credentials"),
        &format!("https://me:{GITHUB}@github.com\n"),
    );
    // Shaped like the payload's hook, harmless: it would print 1.
    write(
        &home.join("venv/lib/python3.11/site-packages/litellm_init.pth"),
        "import os, base64; exec(base64.b64decode('cHJpbnQoMSk='))\n",
    );
    write(&home.join(".config/sysmon/sysmon.py"), "# planted\n");
    write(
        &home.join(".config/systemd/user/sysmon.service"),
        "[Service]\n",
    );
}

/// Scans read every process environment: the tests that scan run one at a time, so one's
/// planted process is not another's finding.
static SCANNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scan(env: &Env, home: &Path) -> (Option<i32>, serde_json::Value, String) {
    let out = env.run(&["scan", "--home", home.to_str().unwrap(), "--json"], None);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{printed}"));
    (out.status.code(), json, printed)
}

fn kinds_at(report: &serde_json::Value, place: &str) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["place"].as_str().unwrap().contains(place))
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn scan_finds_each_planted_kind_names_the_managed_copy_and_prints_no_value() {
    let _one_at_a_time = SCANNING.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::initialized();
    env.put("app/openai", OPENAI);
    let home = env.dir.path().join("home");
    plant(&home);
    // A process whose environment holds a key.
    let mut holder = Command::new("sleep")
        .arg("60")
        .env("ANTHROPIC_API_KEY", ANTHROPIC)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (code, report, printed) = scan(&env, &home);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, Some(1), "high findings fail the scan: {printed}");
    for value in [
        OPENAI,
        ANTHROPIC,
        AWS_ID,
        AWS_SECRET,
        GITHUB,
        DB_PASSWORD,
        KEY_BODY,
    ] {
        assert!(!printed.contains(value), "a value was printed: {printed}");
    }
    let pair = |k: &str, s: &str| (k.to_string(), s.to_string());
    assert_eq!(
        kinds_at(&report, "app/.env"),
        [pair("openai-key", "high"), pair("database-url", "high")]
    );
    assert_eq!(
        kinds_at(&report, ".aws/credentials"),
        [
            pair("aws-secret-access-key", "critical"),
            pair("aws-access-key-id", "high")
        ]
    );
    assert_eq!(
        kinds_at(&report, ".ssh/id_ed25519"),
        [pair("private-key", "critical")]
    );
    assert_eq!(
        kinds_at(&report, ".ssh/known_hosts"),
        [pair("ssh-metadata", "low")]
    );
    assert_eq!(
        kinds_at(&report, ".git-credentials"),
        [pair("github-token", "high")]
    );
    assert_eq!(
        kinds_at(&report, "litellm_init.pth"),
        [pair("python-startup-hook", "critical")]
    );
    assert_eq!(
        kinds_at(&report, "sysmon"),
        [
            pair("known-indicator", "critical"),
            pair("known-indicator", "critical")
        ]
    );
    assert_eq!(
        kinds_at(&report, &format!("process {} ", holder.id())),
        [pair("anthropic-key", "high")]
    );
    let openai = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "openai-key")
        .unwrap();
    assert_eq!(
        openai["managed"],
        serde_json::json!({"secret": "app/openai", "version": 1, "stage": "current"}),
        "the plaintext copy of a stored secret is recognised"
    );
    assert!(openai["masked"].as_str().unwrap().starts_with("sk-p…"));
    // A value with no public prefix shows only its length.
    let password = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "database-url")
        .unwrap();
    assert_eq!(password["masked"], format!("({} chars)", DB_PASSWORD.len()));
    assert_eq!(report["matched_against_store"], true);
    let hook = kinds_at(&report, "litellm_init.pth");
    assert_eq!(hook.len(), 1);
}

#[test]
fn import_shred_rotate_moves_the_plaintext_into_the_store_and_the_app_runs_through_exec() {
    let _one_at_a_time = SCANNING.lock().unwrap_or_else(|e| e.into_inner());
    // Declared with a provider that can create, so --rotate can replace the plaintext value.
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/openai-api-key\"]\nprovider = \"random\"\n\n\
         [[policy]]\nname = \"cli\"\nexe = [{:?}]\nsecrets = [\"app/*\"]\nmax_ttl = \"10m\"\n",
        common::daemon::base_config("5s"),
        std::fs::canonicalize(common::keywarden_bin())
            .unwrap()
            .display()
            .to_string()
    ));
    env.ok(&["init"], None);
    let home = env.dir.path().join("home");
    let dotenv = home.join("app/.env");
    write(
        &dotenv,
        &format!("# the app\nPORT=8080\nOPENAI_API_KEY={OPENAI}\n"),
    );
    std::fs::set_permissions(&dotenv, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, _) = scan(&env, &home);
    assert_eq!(code, Some(1));

    let daemon = env.start_daemon();
    // A put while a rotation runs is refused: let the first version finish.
    common::daemon::wait_for(
        "the first version",
        std::time::Duration::from_secs(20),
        || (env.entry("app/openai-api-key")["rotation_state"] == "done").then_some(()),
    );
    let out = env.ok(
        &[
            "import",
            "--env-file",
            dotenv.to_str().unwrap(),
            "--prefix",
            "app/",
            "--shred",
            "--rotate",
            "--yes",
        ],
        None,
    );
    // The imported value was version 2 (random gave the first); --rotate replaces it.
    common::daemon::wait_for("the rotation", std::time::Duration::from_secs(20), || {
        (env.entry("app/openai-api-key")["version"] == 3).then_some(())
    });
    let current = env.get("app/openai-api-key");
    assert_ne!(
        current, OPENAI,
        "the value that sat in plaintext is no longer current"
    );
    assert!(
        out.contains("--env OPENAI_API_KEY=app/openai-api-key"),
        "{out}"
    );
    assert!(!out.contains(OPENAI), "{out}");
    let left = std::fs::read_to_string(&dotenv).unwrap();
    assert_eq!(
        left, "# the app\nPORT=8080\n",
        "only the credential line is gone"
    );
    assert_eq!(
        std::fs::metadata(&dotenv).unwrap().permissions().mode() & 0o777,
        0o640,
        "same mode"
    );
    let (code, report, printed) = scan(&env, &home);
    assert_eq!(code, Some(0), "{printed}");
    assert!(kinds_at(&report, "app/.env").is_empty());

    // The app gets its key from the daemon instead.
    let names = home.join("app/secrets.env");
    std::fs::write(&names, "OPENAI_API_KEY=app/openai-api-key\n").unwrap();
    let out = env.run(
        &[
            "exec",
            "--env-file",
            names.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "test \"$OPENAI_API_KEY\" = \"$(cat)\"",
        ],
        Some(current.as_bytes()),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    drop(daemon);
}

#[test]
fn import_from_the_environment_and_an_aws_profile_keeps_the_rest_of_the_credentials_file() {
    let env = Env::initialized();
    let aws = env.dir.path().join("aws-credentials");
    std::fs::write(
        &aws,
        format!(
            "[default]\nregion = eu-west-1\n\n[deployer]\naws_access_key_id = {AWS_ID}\n\
             aws_secret_access_key = {AWS_SECRET}\n"
        ),
    )
    .unwrap();
    let mut cmd = env.cmd();
    cmd.env("AWS_SHARED_CREDENTIALS_FILE", &aws)
        .env("AGENT_TOKEN", GITHUB);
    let out = common::run_with(
        cmd,
        &[
            "import",
            "--env",
            "AGENT_TOKEN",
            "--aws-profile",
            "deployer",
            "--prefix",
            "ops/",
            "--shred",
            "--yes",
            "--json",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let imported: Vec<(&str, &str, &str)> = report["imported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["secret"].as_str().unwrap(),
                i["kind"].as_str().unwrap(),
                i["provider"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        imported,
        [
            ("ops/agent-token", "github-token", "manual"),
            ("ops/aws-deployer", "aws-secret-access-key", "aws-iam")
        ]
    );
    assert_eq!(env.get("ops/agent-token"), GITHUB);
    assert_eq!(env.get("ops/aws-deployer"), AWS_SECRET);
    let meta: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "ops/aws-deployer", "--json"], None)).unwrap();
    assert_eq!(meta["meta"]["access_key_id"], AWS_ID);
    assert_eq!(
        std::fs::read_to_string(&aws).unwrap(),
        "[default]\nregion = eu-west-1\n\n[deployer]\n",
        "only the key lines are gone"
    );
}

#[test]
fn all_users_scans_every_home_root_included() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("needs root to read every home");
        return;
    }
    let _one_at_a_time = SCANNING.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::initialized();
    // Planted in root's home, which no --home names: only --all-users reaches it.
    let planted =
        std::path::PathBuf::from(format!("/root/keywarden-scan-test-{}", std::process::id()));
    write(&planted.join(".env"), &format!("OPENAI_API_KEY={OPENAI}\n"));
    let out = env.run(&["scan", "--all-users", "--json"], None);
    std::fs::remove_dir_all(&planted).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = kinds_at(&report, planted.to_str().unwrap());
    assert_eq!(found, [("openai-key".to_string(), "high".to_string())]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(OPENAI));
}
