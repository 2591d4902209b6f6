//! `backup` and `restore`: a backup taken while the daemon serves and rotates is consistent and
//! restores into a fresh store where every secret opens; a restore checks everything before it
//! replaces anything, and refuses a wrong passphrase, a tampered backup, a broken audit chain, a
//! running daemon and (without --force) an existing store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::Env;

const MANUAL: usize = 20;

fn env() -> Env {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/rotating\"]\nprovider = \"random\"\nrotate_every = \"1s\"\ngrace = \"0s\"\n\n\
         [[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\nmax_ttl = \"10m\"\n",
        common::daemon::base_config("5s")
    ));
    env.ok(&["init"], None);
    for i in 0..MANUAL {
        env.put(
            &format!("app/manual-{i}"),
            &format!("manual-value-{i}-plaintext"),
        );
    }
    env
}

/// `keywarden --store STORE args…` in `env`.
fn at_store(env: &Env, store: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = env.cmd();
    cmd.arg("--store").arg(store).args(args);
    cmd.output().unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_backup_taken_while_16_clients_fetch_and_rotations_run_restores_and_every_secret_opens() {
    let env = env();
    let daemon = env.start_daemon();
    let version = || env.entry("app/rotating")["version"].as_i64().unwrap_or(0);
    common::daemon::wait_for("a first version", Duration::from_secs(20), || {
        (version() >= 1).then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (stop, failed, sock) = (stop.clone(), failed.clone(), env.agent_socket());
            std::thread::spawn(move || {
                let path = format!("/v1/secrets/app/manual-{}", i % MANUAL);
                let mut served = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = common::curl(&sock, "GET", &path, &[]);
                    if code == 200 && body.contains("manual-value-") {
                        served += 1;
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                served
            })
        })
        .collect();
    let before = version();
    let file = env.dir.path().join("backup.kwb");
    let out = env.ok(&["backup", file.to_str().unwrap(), "--json"], None);
    let written: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(written["bytes"], std::fs::metadata(&file).unwrap().len());
    // Rotations went on meanwhile.
    common::daemon::wait_for(
        "a rotation after the backup",
        Duration::from_secs(20),
        || (version() > before).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    let served: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(served > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0);

    // The file is private, holds no value in plaintext, and is never overwritten silently.
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!common::contains(&bytes, b"-plaintext"));
    let err = env.fails(1, &["backup", file.to_str().unwrap()], None);
    assert!(err.contains("already exists"), "{err}");
    let audit = env.ok(&["audit", "tail", "-n", "2000", "--json"], None);
    let rows: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let backup_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "vault.backup")
        .expect("the backup is audited");
    assert!(
        backup_row["actor"]
            .as_str()
            .unwrap()
            .starts_with("admin uid=")
    );

    // A restore over the store the daemon holds is refused.
    let out = at_store(
        &env,
        &env.store,
        &["restore", file.to_str().unwrap(), "--force"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop the daemon first"));
    assert_eq!(daemon.terminate(), Some(0));

    // Into a fresh store (a new machine): every secret opens, the chain holds.
    let fresh = env.dir.path().join("fresh/vault.db");
    let out = at_store(&env, &fresh, &["restore", file.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["secrets"], MANUAL + 1);
    assert!(report["replaced_kept_as"].is_null());
    // Only the store and its lock are left in the directory.
    assert_eq!(
        files_in(fresh.parent().unwrap()),
        ["vault.db", "vault.db.lock"]
    );
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for i in 0..MANUAL {
        let out = at_store(&env, &fresh, &["get", &format!("app/manual-{i}"), "-n"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("manual-value-{i}-plaintext")
        );
    }
    assert!(
        at_store(&env, &fresh, &["get", "app/rotating"])
            .status
            .success()
    );
    assert!(
        at_store(&env, &fresh, &["audit", "verify"])
            .status
            .success()
    );

    // Over the existing store: only with --force, and the replaced one is kept.
    let err = env.fails(1, &["restore", file.to_str().unwrap()], None);
    assert!(err.contains("--force"), "{err}");
    env.put("app/after-backup", "not in the backup");
    let out = env.ok(
        &["restore", file.to_str().unwrap(), "--force", "--json"],
        None,
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kept = report["replaced_kept_as"].as_str().unwrap().to_string();
    let err = env.fails(1, &["get", "app/after-backup"], None);
    assert!(err.contains("app/after-backup"), "{err}");
    let out = at_store(&env, Path::new(&kept), &["get", "app/after-backup", "-n"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "not in the backup");
    let audit = env.ok(&["audit", "tail", "-n", "5", "--json"], None);
    assert!(audit.contains("vault.restored"), "{audit}");
}

#[test]
fn a_restore_checks_the_passphrase_every_value_and_the_audit_chain_before_it_replaces_anything() {
    let env = env();
    let file = env.dir.path().join("backup.kwb");
    // Without a daemon the command takes the copy itself; no passphrase is needed for it.
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
        .args(["backup", file.to_str().unwrap()]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_before = std::fs::read(&env.store).unwrap();
    let store_dir = env.store.parent().unwrap();
    let refused = |backup: &Path, passphrase: Option<&str>, expect: &str| {
        let dir_before = files_in(store_dir);
        let mut cmd = env.cmd();
        if let Some(p) = passphrase {
            cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
                .env("KEYWARDEN_PASSPHRASE", p);
        }
        let out = cmd
            .args(["restore", backup.to_str().unwrap(), "--force"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "{expect}: {err}");
        assert!(!err.contains("-plaintext"));
        assert_eq!(std::fs::read(&env.store).unwrap(), store_before, "{expect}");
        assert_eq!(files_in(store_dir), dir_before, "{expect}");
    };
    refused(&file, Some("not the passphrase at all"), "wrong passphrase");

    // One version's ciphertext changed in a copy of the backup.
    let tampered = env.dir.path().join("tampered.kwb");
    std::fs::copy(&file, &tampered).unwrap();
    common::sql(
        &tampered,
        &[
            "UPDATE versions SET ciphertext = randomblob(length(ciphertext)) \
           WHERE secret_id = (SELECT id FROM secrets WHERE name = 'app/manual-7')",
        ],
    );
    refused(&tampered, None, "app/manual-7");

    // An audit row rewritten in another copy.
    let rewritten = env.dir.path().join("rewritten.kwb");
    std::fs::copy(&file, &rewritten).unwrap();
    common::sql(
        &rewritten,
        &["UPDATE audit SET actor = 'someone else' WHERE seq = 2"],
    );
    refused(&rewritten, None, "audit chain is broken at row 2");

    // Not a store at all.
    let junk = env.dir.path().join("junk.kwb");
    std::fs::write(&junk, b"this is not a keywarden backup").unwrap();
    refused(&junk, None, "junk.kwb");

    // The untouched backup restores.
    env.ok(&["restore", file.to_str().unwrap(), "--force"], None);
    assert_eq!(env.get("app/manual-3"), "manual-value-3-plaintext");
}
