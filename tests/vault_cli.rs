//! The store commands end to end, through the real binary: init, put, get, list, rm, passwd,
//! rekey, and what happens with bad input (wrong passphrase, tampered or moved ciphertexts, a
//! newer schema, a missing store).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Env, contains, store_bytes};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_a_private_store_and_refuses_to_overwrite() {
    let env = Env::new();
    let out = env.ok(&["init"], None);
    assert!(out.contains("created a store"), "{out}");
    assert_eq!(mode(&env.store), 0o600);
    assert_eq!(mode(env.store.parent().unwrap()), 0o700);
    let before = std::fs::read(&env.store).unwrap();
    let err = env.fails(1, &["init"], None);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&env.store).unwrap(), before);
    // The file of `init` is the file the rest of the CLI opens.
    env.put("a", "value-a");
    assert_eq!(env.get("a"), "value-a");
}

#[test]
fn init_without_any_passphrase_source_fails_clearly() {
    let env = Env::new();
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE");
    let out = common::run_with(cmd, &["init"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no passphrase"), "{err}");
    assert!(!env.store.exists());
}

#[test]
fn passphrase_from_env_and_systemd_credentials_directory() {
    let env = Env::new();
    let creds = env.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("passphrase"), common::PASSPHRASE).unwrap();
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
        .env("CREDENTIALS_DIRECTORY", &creds);
    assert!(common::run_with(cmd, &["init"], None).status.success());
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
        .env("KEYWARDEN_PASSPHRASE", common::PASSPHRASE);
    assert!(
        common::run_with(cmd, &["put", "x"], Some(b"v"))
            .status
            .success()
    );
    assert_eq!(env.get("x"), "v");
}

#[test]
fn put_get_versions_meta_and_json_shapes() {
    let env = Env::initialized();
    env.ok(
        &["put", "aws/rotator", "--meta", "access_key_id=AKIAEXAMPLE"],
        Some(b"first\n"),
    );
    env.put("aws/rotator", "second");
    assert_eq!(env.get("aws/rotator"), "second");
    let v1: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "aws/rotator", "--version", "1", "--json"], None))
            .unwrap();
    assert_eq!(v1["name"], "aws/rotator");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["value"], "first", "one trailing newline is stripped");
    assert_eq!(v1["meta"]["access_key_id"], "AKIAEXAMPLE");

    let file = env.dir.path().join("value.txt");
    std::fs::write(&file, "from-a-file\n").unwrap();
    env.ok(
        &[
            "put",
            "from/file",
            "--value-file",
            file.to_str().unwrap(),
            "--keep-newline",
        ],
        None,
    );
    assert_eq!(env.get("from/file"), "from-a-file\n");

    let list: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"], None)).unwrap();
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 2);
    let rot = items.iter().find(|i| i["name"] == "aws/rotator").unwrap();
    for key in [
        "name",
        "provider",
        "version",
        "updated_at",
        "next_rotation_at",
        "rotation_state",
        "quarantined",
        "tags",
    ] {
        assert!(rot.get(key).is_some(), "list --json lacks {key}: {rot}");
    }
    assert_eq!(rot["version"], 2);
    assert_eq!(rot["provider"], "manual");
    assert!(rot["updated_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn values_never_come_from_argv_and_bad_names_are_refused() {
    let env = Env::initialized();
    let err = env.fails(2, &["put", "x", "the-value"], None);
    assert!(err.contains("unexpected argument"), "{err}");
    let err = env.fails(1, &["put", "../etc/passwd"], Some(b"v"));
    assert!(err.contains("invalid secret name"), "{err}");
    let err = env.fails(1, &["put", "empty"], Some(b""));
    assert!(err.contains("empty"), "{err}");
    let err = env.fails(1, &["get", "nope"], None);
    assert!(err.contains("no secret named \"nope\""), "{err}");
    let err = env.fails(1, &["get", "empty", "--version", "1"], None);
    assert!(err.contains("no secret named"), "{err}");
}

#[test]
fn wrong_passphrase_is_a_clear_error_and_changes_nothing() {
    let env = Env::initialized();
    env.put("a", "value-a");
    let audit_rows = env.sql_i64("SELECT count(*) FROM audit");
    let wrong = env.dir.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase").unwrap();
    for args in [
        &["get", "a"][..],
        &["rekey"],
        &["passwd"],
        &["rm", "a", "--yes"],
    ] {
        let mut cmd = env.cmd();
        cmd.env("KEYWARDEN_PASSPHRASE_FILE", &wrong)
            .env("KEYWARDEN_NEW_PASSPHRASE", "another passphrase entirely");
        let out = common::run_with(cmd, args, Some(b"v2"));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("wrong passphrase"), "{args:?}: {err}");
        assert!(err.contains(env.store.to_str().unwrap()), "{err}");
    }
    assert_eq!(env.sql_i64("SELECT count(*) FROM audit"), audit_rows);
    assert_eq!(env.get("a"), "value-a");
}

#[test]
fn a_database_writer_who_swaps_a_versions_meta_makes_it_fail_to_open() {
    // meta is plaintext, and a revoke is aimed by it (`meta.access_key_id`): a writer who could
    // point version 2's meta at another key would have keywarden revoke that key instead.
    let env = Env::initialized();
    env.ok(
        &["put", "aws/ci", "--meta", "access_key_id=AKIAFIRST"],
        Some(b"secret-one"),
    );
    env.ok(
        &["put", "aws/ci", "--meta", "access_key_id=AKIASECOND"],
        Some(b"secret-two"),
    );
    env.sql(&["UPDATE versions SET meta = '{\"access_key_id\":\"AKIAOTHER\"}' WHERE version = 2"]);
    let err = env.fails(1, &["get", "aws/ci"], None);
    assert!(
        err.contains("integrity check failed for secret \"aws/ci\" version 2"),
        "{err}"
    );
    assert_eq!(
        env.ok(&["get", "aws/ci", "--version", "1"], None),
        "secret-one\n",
        "a newline ends the value, on a pipe too"
    );
}

#[test]
fn a_database_writer_who_rolls_current_back_or_swaps_names_is_caught() {
    // The old version is the one a provider revoked, or the one a thief holds: serving it again
    // as current, or serving one secret under another's name, must not go unnoticed.
    let env = Env::initialized();
    env.put("svc/key", "old-value");
    env.put("svc/key", "new-value");
    let id = "(SELECT id FROM secrets WHERE name = 'svc/key')";
    env.sql(&[
        &format!("UPDATE versions SET stage = 'revoked' WHERE version = 2 AND secret_id = {id}"),
        &format!("UPDATE versions SET stage = 'current' WHERE version = 1 AND secret_id = {id}"),
    ]);
    let err = env.fails(1, &["get", "svc/key"], None);
    assert!(
        err.contains("integrity check failed for secret \"svc/key\" version 1"),
        "{err}"
    );
    assert!(!err.contains("old-value"));
    // Removing the MAC does not help: the store says it keeps them.
    env.sql(&["UPDATE secrets SET current_mac = NULL WHERE name = 'svc/key'"]);
    let err = env.fails(1, &["get", "svc/key"], None);
    assert!(err.contains("integrity check failed"), "{err}");

    env.put("team/a", "value-a");
    env.put("team/b", "value-b");
    env.sql(&[
        "UPDATE secrets SET name = 'team/tmp' WHERE name = 'team/a'",
        "UPDATE secrets SET name = 'team/a' WHERE name = 'team/b'",
        "UPDATE secrets SET name = 'team/b' WHERE name = 'team/tmp'",
    ]);
    let err = env.fails(1, &["get", "team/a"], None);
    assert!(
        err.contains("integrity check failed for secret \"team/a\""),
        "{err}"
    );
    assert!(!err.contains("value-b"));
}

#[test]
fn tampered_or_moved_ciphertexts_fail_naming_the_secret_and_others_still_open() {
    let env = Env::initialized();
    env.put("alpha", "alpha-v1");
    env.put("alpha", "alpha-v2");
    env.put("beta", "beta-v1");
    env.put("gamma", "gamma-v1");

    // One flipped byte in alpha's current ciphertext.
    env.sql(&["UPDATE versions SET ciphertext = \
               substr(ciphertext, 1, 20) || CAST(X'FF' AS BLOB) || substr(ciphertext, 22) \
               WHERE version = 2 AND secret_id = (SELECT id FROM secrets WHERE name = 'alpha')"]);
    let err = env.fails(1, &["get", "alpha"], None);
    assert!(
        err.contains("integrity check failed for secret \"alpha\" version 2"),
        "{err}"
    );
    assert_eq!(env.get("beta"), "beta-v1");
    assert_eq!(
        env.ok(&["get", "alpha", "--version", "1", "-n"], None),
        "alpha-v1"
    );

    // alpha's version 1 ciphertext moved onto version... of another secret (beta).
    env.sql(&[
        "UPDATE versions SET ciphertext = (SELECT v.ciphertext FROM versions v JOIN secrets s \
               ON s.id = v.secret_id WHERE s.name = 'alpha' AND v.version = 1) \
               WHERE secret_id = (SELECT id FROM secrets WHERE name = 'beta')",
    ]);
    let err = env.fails(1, &["get", "beta"], None);
    assert!(
        err.contains("integrity check failed for secret \"beta\""),
        "{err}"
    );

    // A version's ciphertext moved to another version of the same secret.
    env.put("delta", "delta-v1");
    env.put("delta", "delta-v2");
    env.sql(&[
        "UPDATE versions SET ciphertext = (SELECT ciphertext FROM versions WHERE version = 1 \
               AND secret_id = (SELECT id FROM secrets WHERE name = 'delta')) \
               WHERE version = 2 AND secret_id = (SELECT id FROM secrets WHERE name = 'delta')",
    ]);
    let err = env.fails(1, &["get", "delta"], None);
    assert!(err.contains("\"delta\" version 2"), "{err}");

    // gamma's wrapped data key replaced by delta's.
    env.sql(&[
        "UPDATE secrets SET wrapped_data_key = (SELECT wrapped_data_key FROM secrets \
               WHERE name = 'delta') WHERE name = 'gamma'",
    ]);
    let err = env.fails(1, &["get", "gamma"], None);
    assert!(
        err.contains("integrity check failed for secret \"gamma\""),
        "{err}"
    );

    // Nothing secret in any of those messages.
    for v in ["alpha-v1", "alpha-v2", "beta-v1", "gamma-v1", "delta-v1"] {
        assert!(!err.contains(v));
    }
}

#[test]
fn a_store_from_a_newer_schema_is_refused() {
    let env = Env::initialized();
    env.sql(&[
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, \
               checksum, execution_time) VALUES (9999, 'future', CURRENT_TIMESTAMP, 1, X'00', 0)",
    ]);
    let err = env.fails(1, &["list"], None);
    assert!(err.contains("schema version 9999"), "{err}");
    assert!(err.contains("upgrade keywarden"), "{err}");
}

#[test]
fn missing_or_unusable_store_says_where_it_looked() {
    let env = Env::new();
    let err = env.fails(1, &["list"], None);
    assert!(
        err.contains(&format!("no store at {}", env.store.display())),
        "{err}"
    );
    assert!(err.contains("keywarden init"), "{err}");

    let garbage = env.dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let err = env.fails(1, &["--store", garbage.to_str().unwrap(), "list"], None);
    assert!(err.contains(garbage.to_str().unwrap()), "{err}");

    let dir_store = env.dir.path().join("a-directory");
    std::fs::create_dir(&dir_store).unwrap();
    let err = env.fails(1, &["--store", dir_store.to_str().unwrap(), "list"], None);
    assert!(err.contains(dir_store.to_str().unwrap()), "{err}");
}

#[test]
fn malformed_config_names_the_key_and_line() {
    let env = Env::with_config("[store.kdf2]\nx = 1\n");
    let err = env.fails(1, &["list"], None);
    assert!(err.contains("line 9"), "{err}");
    assert!(err.contains("kdf2"), "{err}");
}

#[test]
fn rm_destroys_the_data_key_and_says_so() {
    let env = Env::initialized();
    env.put("doomed", "doomed-value-1");
    env.put("kept", "kept-value");
    let wrapped = env.sql_blob("SELECT wrapped_data_key FROM secrets WHERE name = 'doomed'");
    let ciphertext = env.sql_blob(
        "SELECT ciphertext FROM versions WHERE version = 1 AND \
                                   secret_id = (SELECT id FROM secrets WHERE name = 'doomed')",
    );
    let err = env.fails(1, &["rm", "doomed"], None);
    assert!(err.contains("--yes"), "{err}");
    let out = env.ok(&["rm", "doomed", "--yes"], None);
    assert!(out.contains("data key is destroyed"), "{out}");
    assert!(out.contains("1 version(s)"), "{out}");
    let err = env.fails(1, &["get", "doomed"], None);
    assert!(err.contains("no secret named"), "{err}");
    assert_eq!(env.get("kept"), "kept-value");
    assert!(
        !contains(&store_bytes(&env.store), &wrapped),
        "the wrapped data key is still on disk after rm"
    );
    assert!(
        !contains(&store_bytes(&env.store), &ciphertext),
        "the ciphertext is still on disk after rm"
    );
}

#[test]
fn passwd_rewraps_and_rekey_replaces_the_root_key_without_touching_values() {
    let env = Env::initialized();
    for i in 0..5 {
        env.put(&format!("s{i}"), &format!("value-{i}"));
    }
    let ciphertexts = env.sql_blob("SELECT group_concat(hex(ciphertext)) FROM versions");
    let root_before = env.sql_blob("SELECT wrapped_root_key FROM vault");

    let new_pass = env.dir.path().join("new-passphrase");
    std::fs::write(&new_pass, "a brand new passphrase\n").unwrap();
    let mut cmd = env.cmd();
    cmd.env("KEYWARDEN_NEW_PASSPHRASE_FILE", &new_pass);
    assert!(common::run_with(cmd, &["passwd"], None).status.success());
    let err = env.fails(1, &["get", "s1"], None);
    assert!(err.contains("wrong passphrase"), "{err}");
    std::fs::copy(&new_pass, &env.passphrase_file).unwrap();
    assert_eq!(env.get("s1"), "value-1");

    let out = env.ok(&["rekey"], None);
    assert!(out.contains("5 data key(s) rewrapped"), "{out}");
    assert_ne!(
        env.sql_blob("SELECT wrapped_root_key FROM vault"),
        root_before
    );
    assert_eq!(env.sql_i64("SELECT root_generation FROM vault"), 2);
    assert_eq!(
        env.sql_blob("SELECT group_concat(hex(ciphertext)) FROM versions"),
        ciphertexts,
        "rekey must not re-encrypt values"
    );
    for i in 0..5 {
        assert_eq!(env.get(&format!("s{i}")), format!("value-{i}"));
    }
    let actions = env.ok(&["audit", "tail", "--json"], None);
    assert!(actions.contains("vault.passwd") && actions.contains("vault.rekey"));
}

#[test]
fn a_running_daemon_keeps_cli_writers_out_but_not_readers() {
    let env = Env::initialized();
    env.put("a", "value-a");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Hold the store the way the daemon does.
    let daemon = rt
        .block_on(keywarden::store::Store::open(
            &env.store,
            keywarden::store::Access::Exclusive,
        ))
        .unwrap();
    // Held, but no admin socket answers: the command says so and writes nothing.
    let err = env.fails(1, &["put", "b"], Some(b"v"));
    assert!(err.contains("admin socket does not answer"), "{err}");
    let list = env.ok(&["list", "--json"], None);
    assert!(list.contains("\"a\""), "{list}");
    env.ok(&["audit", "verify"], None);
    // A second daemon is refused too.
    let second = rt.block_on(keywarden::store::Store::open(
        &env.store,
        keywarden::store::Access::Exclusive,
    ));
    assert!(matches!(
        second,
        Err(keywarden::store::StoreError::Locked { .. })
    ));
    drop(daemon);
    env.put("b", "v");
}

#[test]
fn serve_waits_for_a_command_that_holds_the_store_and_names_one_that_does_not_finish() {
    let env = Env::with_config(&common::daemon::base_config("3s"));
    env.ok(&["init"], None);
    // What a daemon-less `keywarden rotate` or `put` does while it runs: hold the lock shared.
    let lock_path = env.dir.path().join("data/vault.db.lock");
    let hold = || {
        let file = std::fs::File::open(&lock_path).unwrap();
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).unwrap();
        file
    };
    let held = hold();
    let log = env.dir.path().join("daemon-0.log");
    let releaser = std::thread::spawn(move || {
        common::daemon::wait_for(
            "the daemon to wait",
            std::time::Duration::from_secs(20),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("in use by a command; waiting")
                    .then_some(())
            },
        );
        drop(held);
    });
    let daemon = env.start_daemon();
    releaser.join().unwrap();
    assert_eq!(daemon.terminate(), Some(0));

    // A holder that does not let go within [daemon] lock_wait is named, pid and command.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace(
            "shutdown_timeout = \"5s\"",
            "shutdown_timeout = \"5s\"\nlock_wait = \"300ms\"",
        ),
    )
    .unwrap();
    let _held = hold();
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("still in use by") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
}

/// A copy of `env`'s store taken now, as a backup would be (same passphrase).
fn backup_of(env: &Env) -> Env {
    let backup = Env::new();
    std::fs::create_dir_all(backup.store.parent().unwrap()).unwrap();
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", env.store.display());
        if std::path::Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{suffix}", backup.store.display())).unwrap();
        }
    }
    backup
}

/// What a thief with an old backup and the old passphrase reads of `name` once they also get
/// the versions stored since (a later copy of the file, read without any passphrase).
fn read_later_versions_with_old_backup(
    env: &Env,
    backup: &Env,
    name: &str,
) -> std::process::Output {
    backup.sql(&[
        &format!("ATTACH '{}' AS later", env.store.display()),
        &format!(
            "DELETE FROM versions WHERE secret_id = (SELECT id FROM secrets WHERE name = '{name}')"
        ),
        &format!(
            "INSERT INTO versions SELECT * FROM later.versions \
             WHERE secret_id = (SELECT id FROM secrets WHERE name = '{name}')"
        ),
        &format!(
            "UPDATE secrets SET current_mac = \
             (SELECT current_mac FROM later.secrets WHERE name = '{name}') WHERE name = '{name}'"
        ),
    ]);
    backup.run(&["get", name, "-n"], None)
}

#[test]
fn after_rekey_with_data_keys_an_old_backup_opens_nothing_stored_later() {
    // Without --data-keys the data keys stay: the old backup still opens what comes later.
    let env = Env::initialized();
    env.put("svc/key", "before-1");
    let backup = backup_of(&env);
    env.ok(&["rekey"], None);
    env.put("svc/key", "after-rekey-2");
    let out = read_later_versions_with_old_backup(&env, &backup, "svc/key");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "after-rekey-2",
        "the weakness"
    );

    let env = Env::initialized();
    env.put("svc/key", "before-1");
    env.put("other", "other-1");
    let backup = backup_of(&env);
    let out = env.ok(&["rekey", "--data-keys"], None);
    assert!(out.contains("every value re-encrypted"), "{out}");
    env.put("svc/key", "after-rekey-2");
    assert_eq!(env.get("svc/key"), "after-rekey-2");
    assert_eq!(
        env.ok(&["get", "svc/key", "--version", "1", "-n"], None),
        "before-1"
    );
    assert_eq!(env.get("other"), "other-1");
    let out = read_later_versions_with_old_backup(&env, &backup, "svc/key");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("integrity check failed"), "{err}");
    assert!(!err.contains("after-rekey-2") && out.stdout.is_empty());
    env.ok(&["audit", "verify"], None);
}

#[test]
fn store_commands_work_through_the_running_daemon_and_it_serves_the_change_at_once() {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/manual\"]\nprovider = \"manual\"\nconsumers = [\"out\"]\n\n\
         [consumers.out]\nkind = \"file\"\npath = \"out/manual.key\"\n\n\
         [[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\nmax_ttl = \"10m\"\n",
        common::daemon::base_config("5s")
    ));
    env.ok(&["init"], None);
    let daemon = env.start_daemon();
    let consumer = env.dir.path().join("out/manual.key");

    // put: no passphrase asked (the admin socket authenticates the caller), audited as the
    // admin, and the consumer gets the value.
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE");
    let out = common::run_with(cmd, &["put", "app/manual"], Some(b"first-value"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::daemon::wait_for(
        "the consumer file",
        std::time::Duration::from_secs(10),
        || (std::fs::read_to_string(&consumer).ok()? == "first-value").then_some(()),
    );

    // A watch for the next version wakes on the next put.
    let sock = env.agent_socket();
    let watcher = std::thread::spawn(move || {
        common::curl(
            &sock,
            "GET",
            "/v1/secrets/app/manual?min_version=2&wait=30",
            &[],
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    env.ok(&["put", "app/manual"], Some(b"second-value"));
    let (code, body) = watcher.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("second-value"), "{body}");

    // get of another version, or as an admin, goes through the admin socket.
    assert_eq!(
        env.ok(&["get", "app/manual", "--version", "1", "-n"], None),
        "first-value"
    );
    assert_eq!(
        env.ok(&["get", "app/manual", "--admin", "-n"], None),
        "second-value"
    );
    let actors: Vec<String> = env
        .ok(&["audit", "tail", "-n", "50", "--json"], None)
        .parse::<serde_json::Value>()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "secret.put")
        .map(|r| r["actor"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actors.len(), 2);
    assert!(
        actors.iter().all(|a| a.starts_with("admin uid=")),
        "{actors:?}"
    );

    // passwd: the daemon checks the current passphrase first.
    let mut cmd = env.cmd();
    cmd.env(
        "KEYWARDEN_NEW_PASSPHRASE",
        "a brand new passphrase for this store",
    )
    .env_remove("KEYWARDEN_PASSPHRASE_FILE")
    .env("KEYWARDEN_PASSPHRASE", "not the passphrase");
    let out = common::run_with(cmd, &["passwd"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    let mut cmd = env.cmd();
    cmd.env(
        "KEYWARDEN_NEW_PASSPHRASE",
        "a brand new passphrase for this store",
    );
    let out = common::run_with(cmd, &["passwd"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // rm: the data key is destroyed, and the daemon serves nothing of it.
    env.ok(&["rm", "app/manual", "--yes"], None);
    let (code, _) = common::curl(&env.agent_socket(), "GET", "/v1/secrets/app/manual", &[]);
    assert_ne!(code, 200);
    assert_eq!(daemon.terminate(), Some(0));

    // The new passphrase opens the store; the old one does not.
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE").env(
        "KEYWARDEN_PASSPHRASE",
        "a brand new passphrase for this store",
    );
    let out = common::run_with(cmd, &["audit", "verify"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = env.fails(1, &["put", "x"], Some(b"v"));
    assert!(err.contains("wrong passphrase"), "{err}");
}

#[test]
fn audit_tail_follow_prints_rows_as_they_are_appended() {
    use std::io::BufRead;
    let env = Env::initialized();
    env.put("a", "value-a");
    let mut follow = env
        .cmd()
        .args(["audit", "tail", "-n", "0", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = std::io::BufReader::new(stdout).lines().next();
        let _ = tx.send(line);
    });
    // Puts until the follower prints one: it may not have read the chain's head yet when the
    // first put commits (that row is then "before" it and rightly not printed).
    let mut line = None;
    for i in 0..100 {
        env.put(&format!("b{i}"), "value-b");
        if let Ok(got) = rx.recv_timeout(std::time::Duration::from_millis(300)) {
            line = Some(got.unwrap().unwrap());
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let row: serde_json::Value = serde_json::from_str(&line.expect("a row")).unwrap();
    assert_eq!(
        row["action"], "secret.put",
        "only rows appended since: {row}"
    );
    assert!(row["secret"].as_str().unwrap().starts_with('b'), "{row}");
}

#[test]
fn rekey_runs_through_the_daemon_while_it_serves_and_rotates_and_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/rotating\"]\nprovider = \"random\"\nrotate_every = \"1s\"\ngrace = \"0s\"\n\n\
         [[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\nmax_ttl = \"10m\"\n",
        common::daemon::base_config("5s")
    ));
    env.ok(&["init"], None);
    env.put("app/manual", "manual-value");
    let daemon = env.start_daemon();
    let entry_version = || env.entry("app/rotating")["version"].as_i64().unwrap_or(0);
    common::daemon::wait_for("a first version", Duration::from_secs(20), || {
        (entry_version() >= 1).then_some(())
    });

    // Agents fetch throughout; every fetch must be answered with the right value.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fetchers: Vec<_> = (0..2)
        .map(|i| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            let sock = env.agent_socket();
            std::thread::spawn(move || {
                let path = ["/v1/secrets/app/manual", "/v1/secrets/app/rotating"][i];
                while !stop.load(Ordering::Relaxed) {
                    let (code, body) = common::curl(&sock, "GET", path, &[]);
                    if code == 200 && (i == 1 || body.contains("manual-value")) {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("{path}: {code} {body}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let before = entry_version();
    for args in [
        &["rekey"][..],
        &["rekey", "--data-keys"],
        &["rekey"],
        &["rekey", "--data-keys"],
    ] {
        // No passphrase prompt beyond the environment's; the daemon checks it.
        let out = env.ok(args, None);
        assert!(out.contains("new root key"), "{out}");
    }
    // Rotations go on after the rekeys, sealed under the new keys.
    common::daemon::wait_for("two more rotations", Duration::from_secs(30), || {
        (entry_version() >= before + 2).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for f in fetchers {
        f.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    // A wrong passphrase is refused by the daemon and changes nothing.
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
        .env("KEYWARDEN_PASSPHRASE", "not the passphrase");
    let out = common::run_with(cmd, &["rekey"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    assert_eq!(daemon.terminate(), Some(0));

    // Every version the daemon sealed, before, during and after the rekeys, opens with the
    // passphrase; the chain holds; each rekey is the admin's.
    assert_eq!(env.get("app/manual"), "manual-value");
    let (first, last) = (
        env.sql_i64(
            "SELECT min(version) FROM versions v JOIN secrets s ON s.id = v.secret_id \
             WHERE s.name = 'app/rotating'",
        ),
        env.sql_i64(
            "SELECT max(version) FROM versions v JOIN secrets s ON s.id = v.secret_id \
             WHERE s.name = 'app/rotating'",
        ),
    );
    assert!(last >= before + 2);
    for version in first..=last {
        let value = env.ok(
            &["get", "app/rotating", "--version", &version.to_string()],
            None,
        );
        assert_eq!(value.trim().len(), 32, "version {version}");
    }
    env.ok(&["audit", "verify"], None);
    let rekeys: Vec<serde_json::Value> = env
        .ok(&["audit", "tail", "-n", "500", "--json"], None)
        .parse::<serde_json::Value>()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "vault.rekey")
        .cloned()
        .collect();
    assert_eq!(rekeys.len(), 4);
    assert!(
        rekeys
            .iter()
            .all(|r| r["actor"].as_str().unwrap().starts_with("admin uid=")),
        "{rekeys:?}"
    );
}
