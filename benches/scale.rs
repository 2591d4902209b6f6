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
    let common::scale::Figures {
        first,
        wal_running,
        db_running,
        wal_stopped,
        db_stopped,
        startup,
        rss,
        status,
        rss_during,
        rss_after,
    } = common::scale::run(secrets);
    println!("| {secrets} secrets | figure |");
    println!("|---|---|");
    println!(
        "| first versions, first start | {first:.1} s ({:.0} rotations/s) |",
        secrets as f64 / first
    );
    println!("| WAL / database while serving | {wal_running:.1} MB / {db_running:.1} MB |");
    println!("| WAL / database after a clean stop | {wal_stopped:.1} MB / {db_stopped:.1} MB |");
    println!(
        "| second start to a serving agent socket (no KDF) | {:.0} ms |",
        startup * 1000.0
    );
    println!("| resident memory, settled | {rss:.1} MB |");
    println!(
        "| `status` of every secret; resident memory after it, 11 s later | {:.0} ms; {rss_during:.1} MB, {rss_after:.1} MB |",
        status * 1000.0
    );
}
