//! Nothing secret at rest or in output: a known value is stored and then looked for in the raw
//! bytes of the database, its WAL and shared-memory files, and everything the CLI printed.
//! Also: the process runs with core dumps disabled.

mod common;

use std::io::Read;

use common::{Env, contains, store_bytes};

const KNOWN: &str = "kw-test-Z8x1Q4v7N2m5B0c3L6k9J1h4G7f0D2s5"; // 40 characters

#[test]
fn a_known_value_never_appears_at_rest_or_in_logs() {
    assert_eq!(KNOWN.len(), 40);
    let env = Env::initialized();
    let mut printed = Vec::new();
    let run_logged = |args: &[&str], stdin: Option<&[u8]>, printed: &mut Vec<u8>| {
        let mut cmd = env.cmd();
        cmd.env("KEYWARDEN_LOG", "trace");
        let out = common::run_with(cmd, args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed.extend_from_slice(&out.stderr);
        out.stdout
    };
    run_logged(
        &["put", "openai/prod", "--meta", "key_id=k-1"],
        Some(KNOWN.as_bytes()),
        &mut printed,
    );
    run_logged(
        &["put", "openai/prod"],
        Some(b"a second value"),
        &mut printed,
    );
    let stdout = run_logged(
        &["get", "openai/prod", "--version", "1", "--no-newline"],
        None,
        &mut printed,
    );
    assert_eq!(stdout, KNOWN.as_bytes(), "get must print the value");
    let list = run_logged(&["list", "--json"], None, &mut printed);
    let tail = run_logged(&["audit", "tail", "--json"], None, &mut printed);
    run_logged(&["rekey"], None, &mut printed);

    assert!(!contains(&printed, KNOWN.as_bytes()), "value on stderr");
    assert!(!contains(&list, KNOWN.as_bytes()), "value in list --json");
    assert!(!contains(&tail, KNOWN.as_bytes()), "value in the audit log");
    let at_rest = store_bytes(&env.store);
    assert!(at_rest.len() > 10_000, "the store files were read");
    assert!(
        !contains(&at_rest, KNOWN.as_bytes()),
        "value in the store files"
    );
    // Nor a recognisable part of it.
    assert!(!contains(&at_rest, &KNOWN.as_bytes()[10..26]));
    // The passphrase is not stored either.
    assert!(!contains(&at_rest, common::PASSPHRASE.as_bytes()));
}

#[test]
fn the_process_runs_without_core_dumps() {
    let env = Env::initialized();
    // `put` blocks reading stdin: a live keywarden process to inspect.
    let mut child = env
        .cmd()
        .args(["put", "waiting"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let limits_path = format!("/proc/{}/limits", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let limits = loop {
        let limits = std::fs::read_to_string(&limits_path).unwrap_or_default();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or("");
        let hard_zero = core.split_whitespace().nth(5) == Some("0");
        if hard_zero || std::time::Instant::now() > deadline {
            break limits;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(child.stdin.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}
