//! Compromise benchmark: `rotate-all --assume-compromise` (the same incident runner the CLI
//! and the admin API use) over 1,000 and 10,000 secrets, through a plugin whose every op takes
//! 50 ms. Prints wall time against the ideal, secrets × ops × 50 ms ÷ concurrency, where an
//! emergency rotation is four plugin ops (create, verify, promote, revoke).
//!
//! Run with `cargo bench --bench compromise [-- --secrets 1000,10000,100000]`. The benchmark
//! binary is also the plugin: run with `--keywarden-plugin=1` it serves the `slow` kind through
//! the SDK.

mod common;

use common::BenchPlugin;
use common::incident::OP_DELAY;

const CONCURRENCY: usize = 32;

fn main() {
    common::serve_if_plugin(BenchPlugin {
        kind: "slow",
        delay: OP_DELAY,
    });
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> =
        args.iter()
            .position(|a| a == "--secrets")
            .map_or(vec![1_000, 10_000], |i| {
                args[i + 1]
                    .split(',')
                    .map(|n| n.parse().expect("--secrets N[,N...]"))
                    .collect()
            });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| secrets | concurrency | wall | ideal | ratio | per secret |");
    println!("|---|---|---|---|---|---|");
    for secrets in sizes {
        let t = rt.block_on(common::incident::run(secrets, CONCURRENCY));
        println!(
            "| {secrets} | {CONCURRENCY} | {:.1} s | {:.1} s | {:.2} | {:.1} ms |",
            t.wall,
            t.ideal,
            t.wall / t.ideal,
            t.wall * 1000.0 / secrets as f64
        );
    }
}
