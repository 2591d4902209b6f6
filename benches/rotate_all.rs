//! `rotate-all --assume-compromise` as an operator runs it (see `common/emergency.rs`).
//!
//! Prints wall time against the ideal — secrets × 4 plugin ops (create, verify, promote,
//! revoke) × 50 ms ÷ 32 — and the daemon's CPU time per emergency rotation (user + system,
//! from `/proc`). The first versions are made by a run of the daemon with no delay, which is
//! not measured.
//!
//! Run with `cargo bench --bench rotate_all [-- --secrets 1000,10000]` (default 1,000).
//! `-- --postgres` runs the daemon on a PostgreSQL store instead, in a database of the
//! benchmark's own on the server at `KEYWARDEN_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped after.

mod common;

use std::time::Duration;

use common::BenchPlugin;
use common::emergency::{CONCURRENCY, OP_DELAY_MS, OPS};

fn main() {
    common::serve_if_plugin(BenchPlugin {
        kind: "slow",
        delay: Duration::ZERO,
    });
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--secrets")
        .map_or(vec![1000], |i| {
            args[i + 1]
                .split(',')
                .map(|n| n.parse().expect("--secrets N[,N...]"))
                .collect()
        });
    let postgres = args
        .iter()
        .any(|a| a == "--postgres")
        .then(common::postgres::Database::new);
    let url = postgres.as_ref().map(|db| db.url.as_str());
    println!(
        "store: {}",
        if url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    println!(
        "| secrets | wall | ideal (secrets × {OPS} ops × {OP_DELAY_MS} ms ÷ {CONCURRENCY}) | ratio | daemon CPU per rotation (of it in the kernel) |"
    );
    println!("|---|---|---|---|---|");
    for secrets in sizes {
        let f = common::emergency::run(secrets, url);
        println!(
            "| {secrets} | {:.1} s | {:.1} s | {:.2} | {:.2} ms ({:.2} ms) |",
            f.wall,
            f.ideal,
            f.wall / f.ideal,
            f.cpu_ms_per_rotation,
            f.system_ms_per_rotation
        );
    }
}
