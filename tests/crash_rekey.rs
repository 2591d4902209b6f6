//! `rekey` and `passwd` are single transactions: a process killed at any instant leaves the
//! store either fully before or fully after, never half-rewrapped.

mod common;

use std::time::Duration;

use common::Env;
use keywarden::store::{Access, Store};
use keywarden::value::SecretValue;
use keywarden::vault::Vault;
use zeroize::Zeroizing;

const SECRETS: usize = 1500;

fn populate(env: &Env) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(&env.store, Access::Shared).await.unwrap();
        let vault = Vault::unlock(store, &Zeroizing::new(common::PASSPHRASE.to_string()))
            .await
            .unwrap();
        for i in 0..SECRETS {
            let value = SecretValue::new(format!("value-{i}"));
            vault
                .put(
                    &format!("bulk/{i}"),
                    "manual",
                    &value,
                    Default::default(),
                    "test",
                )
                .await
                .unwrap();
        }
    });
}

fn assert_consistent(env: &Env) {
    let generation = env.sql_i64("SELECT root_generation FROM vault");
    assert!(generation >= 1);
    for i in [0, SECRETS / 2, SECRETS - 1] {
        assert_eq!(
            env.get(&format!("bulk/{i}")),
            format!("value-{i}"),
            "generation {generation}"
        );
    }
    env.ok(&["audit", "verify"], None);
}

#[test]
fn rekey_killed_at_any_instant_loses_nothing() {
    let env = Env::initialized();
    populate(&env);
    let mut generations = std::collections::BTreeSet::new();
    for delay_ms in [0u64, 5, 10, 20, 30, 45, 60, 80, 110, 150, 250] {
        let mut child = env
            .cmd()
            .arg("rekey")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        assert_consistent(&env);
        generations.insert(env.sql_i64("SELECT root_generation FROM vault"));
    }
    // A rekey that is let finish still works after all those interruptions.
    let out = env.ok(&["rekey"], None);
    assert!(
        out.contains(&format!("{SECRETS} data key(s) rewrapped")),
        "{out}"
    );
    assert_consistent(&env);
}

#[test]
fn passwd_killed_at_any_instant_leaves_one_working_passphrase() {
    let env = Env::initialized();
    env.put("a", "value-a");
    let new_pass = env.dir.path().join("new");
    std::fs::write(&new_pass, "the replacement passphrase").unwrap();
    for (round, delay_ms) in [0u64, 5, 10, 20, 40, 80, 120].into_iter().enumerate() {
        let mut cmd = env.cmd();
        cmd.arg("passwd")
            .env("KEYWARDEN_NEW_PASSPHRASE_FILE", &new_pass)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let with_old = env.run(&["get", "a"], None);
        let mut cmd = env.cmd();
        cmd.env("KEYWARDEN_PASSPHRASE_FILE", &new_pass);
        let with_new = common::run_with(cmd, &["get", "a"], None);
        // Exactly one of the two passphrases opens the store, and it yields the value.
        assert!(
            with_old.status.success() ^ with_new.status.success(),
            "delay {delay_ms}: old {:?} {} / new {:?} {}",
            with_old.status,
            String::from_utf8_lossy(&with_old.stderr),
            with_new.status,
            String::from_utf8_lossy(&with_new.stderr)
        );
        let out = if with_old.status.success() {
            with_old
        } else {
            with_new
        };
        assert_eq!(out.stdout, b"value-a");
        if !env.run(&["get", "a"], None).status.success() {
            std::fs::copy(&new_pass, &env.passphrase_file).unwrap();
            std::fs::write(&new_pass, format!("replacement passphrase {round}")).unwrap();
        }
    }
}
