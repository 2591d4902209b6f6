//! The daemon at scale: 10,000 `random` secrets (default config); see `common/scale.rs`.
//!
//! Run with `cargo bench --bench scale [-- --secrets N]` (default 10,000).

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secrets: usize = args
        .iter()
        .position(|a| a == "--secrets")
        .map_or(10_000, |i| args[i + 1].parse().expect("--secrets N"));
    let f = common::scale::run(secrets);
    println!("| {secrets} secrets | figure |");
    println!("|---|---|");
    println!(
        "| first versions, first start | {:.1} s ({:.0} rotations/s) |",
        f.first,
        secrets as f64 / f.first
    );
    println!(
        "| WAL / database while serving | {:.1} MB / {:.1} MB |",
        f.wal_running, f.db_running
    );
    println!(
        "| WAL / database after a clean stop | {:.1} MB / {:.1} MB |",
        f.wal_stopped, f.db_stopped
    );
    println!(
        "| second start to a serving agent socket (no KDF) | {:.0} ms |",
        f.startup * 1000.0
    );
    println!("| resident memory, settled | {:.1} MB |", f.rss);
    println!(
        "| `status` of every secret; resident memory after it, 11 s later | {:.0} ms; {:.1} MB, {:.1} MB |",
        f.status * 1000.0,
        f.rss_during,
        f.rss_after
    );
}
