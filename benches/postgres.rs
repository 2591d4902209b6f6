//! Two daemons on one PostgreSQL store against one on a SQLite file, in the same run: fetch
//! throughput and p50/p99 at 1, 8 and 32 clients on the SQLite daemon, the PostgreSQL leader and
//! the PostgreSQL follower (each fetch a lease and an audit row, durable before the answer), then
//! failover: the leader killed with SIGKILL, and the time until the follower leads.
//!
//! Needs a PostgreSQL server: `KEYWARDEN_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); a database of the benchmark's own is created and
//! dropped. Run with `cargo bench --bench postgres`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fetch::{self, FETCH_PATH};

/// The leader's lease in the failover measurement.
const LEASE: &str = "2s";

/// The pid of the daemon that leads, as `keywarden status --json` in `dir` reports it.
fn leader_pid(dir: &std::path::Path) -> Option<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["status", "--json", "--config"])
        .arg(dir.join("keywarden.toml"))
        .output()
        .ok()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    report["leadership"]["leader"]["pid"].as_u64()
}

fn main() {
    let database = common::postgres::Database::new();
    let store = format!("url = {:?}\nleader_lease = {LEASE:?}", database.url);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (sqlite, sqlite_sock) = fetch::start_keywarden(dirs[0].path());
    let (mut leader, leader_sock) = fetch::start_keywarden_on(dirs[1].path(), &store);
    let (follower, follower_sock) = fetch::start_keywarden_on(dirs[2].path(), &store);
    assert_eq!(
        leader_pid(dirs[2].path()),
        Some(u64::from(leader.id())),
        "the first daemon leads"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| clients | SQLite fetches/s | p50 / p99 | PostgreSQL leader fetches/s | p50 / p99 | follower fetches/s | p50 / p99 | follower / SQLite |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for clients in [1usize, 8, 32] {
        let file = fetch::measure(&rt, &sqlite_sock, FETCH_PATH, clients, sqlite.id());
        let lead = fetch::measure(&rt, &leader_sock, FETCH_PATH, clients, leader.id());
        let follow = fetch::measure(&rt, &follower_sock, FETCH_PATH, clients, follower.id());
        println!(
            "| {clients} | {:.0} | {:.2} / {:.2} ms | {:.0} | {:.2} / {:.2} ms | {:.0} | {:.2} / {:.2} ms | {:.2} |",
            file.rate,
            file.p50,
            file.p99,
            lead.rate,
            lead.p50,
            lead.p99,
            follow.rate,
            follow.p50,
            follow.p99,
            follow.rate / file.rate
        );
    }

    let killed = Instant::now();
    leader.kill().unwrap();
    leader.wait().unwrap();
    let deadline = killed + Duration::from_secs(60);
    while leader_pid(dirs[2].path()) != Some(u64::from(follower.id())) {
        assert!(Instant::now() < deadline, "no takeover");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!();
    println!(
        "failover: the follower led {:.2} s after the leader was killed (lease {LEASE})",
        killed.elapsed().as_secs_f64()
    );
    for mut child in [sqlite, follower] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
}
