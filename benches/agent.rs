//! Agent socket benchmark: fetch throughput and p50/p99 latency at 1, 8, 32 and 128 concurrent
//! clients against the real `keywarden serve` (peer attestation, policy, the lease extended,
//! its expiry durable before each answer), and against a minimal hyper server answering a
//! fixed body on a Unix socket (the transport's limit), in the same run on the same machine
//! (see `common/fetch.rs`).
//!
//! Then a soak: 32 clients fetching back to back for `--soak SECS` (default 60; the README's
//! figures use 600), printing the daemon's resident memory, write-ahead log and database size
//! as a series — flat when memory and disk depend on the secrets and peers, not on the fetches.
//!
//! Run with `cargo bench --bench agent [-- --soak 600]`; prints two tables. Each client keeps
//! one HTTP/1.1 connection and sends requests back to back. The daemon runs the default
//! `[agent]` settings except the per-uid connection share (every client here is one uid).

mod common;

use common::fetch::{self, FETCH_PATH};

fn main() {
    fetch::serve_baseline_if_asked();
    let args: Vec<String> = std::env::args().collect();
    let dir = tempfile::tempdir().unwrap();
    let (baseline, baseline_sock, daemon, agent_sock) = fetch::start_both(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| clients | baseline req/s | baseline p50 / p99 | server CPU per req | keywarden fetches/s | keywarden p50 / p99 | daemon CPU per fetch | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for clients in [1usize, 8, 32, 128] {
        let base = fetch::measure(&rt, &baseline_sock, "/", clients, baseline.id());
        let kw = fetch::measure(&rt, &agent_sock, FETCH_PATH, clients, daemon.id());
        println!(
            "| {clients} | {:.0} | {:.2} / {:.2} ms | {:.1} µs | {:.0} | {:.2} / {:.2} ms | {:.1} µs | {:.2} |",
            base.rate,
            base.p50,
            base.p99,
            base.cpu_us,
            kw.rate,
            kw.p50,
            kw.p99,
            kw.cpu_us,
            kw.rate / base.rate
        );
    }
    let secs = args
        .iter()
        .position(|a| a == "--soak")
        .map_or(60, |i| args[i + 1].parse().expect("--soak SECS"));
    println!();
    println!("Soak: 32 clients fetching back to back for {secs} s");
    println!();
    println!("| elapsed | fetches/s | daemon RSS | WAL | database |");
    println!("|---|---|---|---|---|");
    fetch::soak(&rt, &agent_sock, daemon.id(), dir.path(), secs, |r| {
        println!(
            "| {} s | {:.0} | {:.1} MB | {:.1} MB | {:.1} MB |",
            r.elapsed.as_secs(),
            r.rate,
            r.rss_mb,
            r.wal_mb,
            r.db_mb
        )
    });
    fetch::stop_both(baseline, daemon);
}
