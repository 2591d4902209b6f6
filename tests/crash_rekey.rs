//! `rekey` and `passwd` are single transactions: a process killed at any instant leaves the
//! store either fully before or fully after, never half-rewrapped. The process is stopped at
//! its crash points (`FAILPOINTS=NAME=return` aborts it there, as `kill -9` would), so every
//! instant that matters is hit on every run: half-way through the rewrapped keys, just before
//! the commit, just after it.

mod common;

use std::os::unix::process::ExitStatusExt;

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

/// Runs `args` with the crash point `point` armed and checks that the process died there.
fn crash_at(mut cmd: std::process::Command, args: &[&str], point: &str) {
    let status = cmd
        .args(args)
        .env("FAILPOINTS", format!("{point}=return"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(6),
        "{args:?} should have aborted at {point}: {status:?}"
    );
}

#[test]
fn rekey_killed_at_any_instant_loses_nothing() {
    let env = Env::initialized();
    populate(&env);
    let mut generation = env.sql_i64("SELECT root_generation FROM vault");
    for (point, committed) in [
        ("rekey.half-rewrapped", false),
        ("rekey.before-commit", false),
        ("rekey.committed", true),
    ] {
        crash_at(env.cmd(), &["rekey"], point);
        assert_consistent(&env);
        let now = env.sql_i64("SELECT root_generation FROM vault");
        assert_eq!(
            now,
            generation + i64::from(committed),
            "after a crash at {point}"
        );
        generation = now;
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
    for (round, (point, committed)) in [("passwd.before-commit", false), ("passwd.committed", true)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&new_pass, format!("replacement passphrase {round}")).unwrap();
        let mut cmd = env.cmd();
        cmd.env("KEYWARDEN_NEW_PASSPHRASE_FILE", &new_pass);
        crash_at(cmd, &["passwd"], point);
        let with_old = env.run(&["get", "a", "-n"], None);
        let mut cmd = env.cmd();
        cmd.env("KEYWARDEN_PASSPHRASE_FILE", &new_pass);
        let with_new = common::run_with(cmd, &["get", "a", "-n"], None);
        // Exactly one of the two passphrases opens the store, and it yields the value.
        assert_eq!(
            (with_old.status.success(), with_new.status.success()),
            (!committed, committed),
            "{point}: old {:?} {} / new {:?} {}",
            with_old.status,
            String::from_utf8_lossy(&with_old.stderr),
            with_new.status,
            String::from_utf8_lossy(&with_new.stderr)
        );
        let out = if committed { with_new } else { with_old };
        assert_eq!(out.stdout, b"value-a");
        if committed {
            std::fs::copy(&new_pass, &env.passphrase_file).unwrap();
        }
    }
}
