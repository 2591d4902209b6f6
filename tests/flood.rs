//! A hostile local user floods the agent socket: 300 slowloris connections and 10,000 denied
//! requests. Another uid's fetches keep working (their latency is printed), the flood costs a
//! handful of audit rows (repeats are counted per window), and no denial goes unrecorded.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use common::daemon::{base_config, wait_for};

/// The attacker, run as another uid: opens 300 connections that never finish their request
/// head, then sends N requests it is denied, reconnecting when closed; prints what it got.
const ATTACKER: &str = r#"
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
slow = []
for _ in range(300):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.send(b"GET /v1/secrets/app/token HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    except OSError:
        pass
req = b"GET /v1/secrets/app/token HTTP/1.1\r\nHost: x\r\n\r\n"
denied = closed = 0
s = f = None
deadline = time.time() + 120
while denied < n and time.time() < deadline:
    try:
        if s is None:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            f = s.makefile("rb")
        s.sendall(req)
        status = f.readline()
        if not status:
            raise OSError("closed")
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
        if b" 403 " in status:
            denied += 1
    except OSError:
        closed += 1
        s = None
        time.sleep(0.01)
print(json.dumps({"denied": denied, "closed": closed, "slow": len(slow)}))
"#;

/// One keep-alive GET; returns the status.
fn get(stream: &mut BufReader<UnixStream>, path: &str) -> u16 {
    write!(stream.get_mut(), "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut status = String::new();
    stream.read_line(&mut status).unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    status.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flooding_uid_cannot_stop_another_uids_fetches_and_costs_a_few_audit_rows() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run the attacker as another uid");
        return;
    }
    let config = base_config("3s").replace(
        "[agent]\n",
        "[agent]\nsocket_mode = \"0666\"\nheader_timeout = \"1s\"\n",
    );
    let env = Env::with_config(&format!(
        "{config}\n[secrets.\"app/token\"]\nprovider = \"random\"\n\n\
         [[policy]]\nname = \"root\"\nuids = [0]\nsecrets = [\"app/*\"]\n"
    ));
    env.ok(&["init"], None);
    let daemon = env.start_daemon();
    wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/token")["version"] == 1).then_some(())
    });
    let socket = env.agent_socket();
    let attacker = Command::new("setpriv")
        .args([
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
            "python3",
            "-c",
            ATTACKER,
        ])
        .arg(&socket)
        .arg("10000")
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let attacker = std::thread::spawn(move || attacker.wait_with_output().unwrap());

    let mut client = BufReader::new(UnixStream::connect(&socket).unwrap());
    let mut latencies = Vec::new();
    while !attacker.is_finished() {
        let start = Instant::now();
        assert_eq!(get(&mut client, "/v1/secrets/app/token?ttl=1"), 200);
        latencies.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(client);
    let out = attacker.join().unwrap();
    assert!(out.status.success(), "the attacker ran");
    let flood: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    eprintln!(
        "flood {flood}; another uid's fetches meanwhile: {} fetches, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );
    assert!(
        latencies.len() >= 10,
        "the flood took long enough to measure"
    );
    assert!(
        flood["closed"].as_u64().unwrap() > 0,
        "connections beyond its share were closed"
    );

    // Clean shutdown writes the last window's counts: every denial is accounted for, in a few
    // rows.
    assert_eq!(daemon.terminate(), Some(0));
    let audit: serde_json::Value =
        serde_json::from_str(&env.ok(&["audit", "tail", "-n", "100000", "--json"], None)).unwrap();
    let denied_rows: Vec<&serde_json::Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "fetch.denied")
        .collect();
    let accounted: u64 = denied_rows
        .iter()
        .map(|r| r["detail"]["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        accounted,
        flood["denied"].as_u64().unwrap(),
        "{denied_rows:#?}"
    );
    assert!(
        denied_rows.len() <= 20,
        "{} rows for 10,000 denials",
        denied_rows.len()
    );
}
