//! Compromise benchmark: `rotate-all --assume-compromise` (the same incident runner the CLI
//! and the admin API use) over 1,000 and 10,000 secrets, through a plugin whose every op takes
//! 50 ms. Prints wall time against the ideal, secrets × ops × 50 ms ÷ concurrency, where an
//! emergency rotation is four plugin ops (create, verify, promote, revoke).
//!
//! Run with `cargo bench --bench compromise`. The benchmark binary is also the plugin: run with
//! `--keywarden-plugin=1` it serves the `slow` kind through the SDK.

mod common;

use std::time::{Duration, Instant};

use common::BenchPlugin;
use keywarden::clock::Clock;
use keywarden::daemon::{Mode, Runtime};
use keywarden::store::{Scope, Trigger};

const OP_DELAY: Duration = Duration::from_millis(50);
const OPS: u32 = 4;

fn main() {
    common::serve_if_plugin(BenchPlugin {
        kind: "slow",
        delay: OP_DELAY,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| secrets | concurrency | wall | ideal | ratio | per secret |");
    println!("|---|---|---|---|---|---|");
    for (secrets, concurrency) in [(1_000usize, 32usize), (10_000, 32)] {
        rt.block_on(run(secrets, concurrency));
    }
}

async fn run(secrets: usize, concurrency: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (config, store, vault) =
        common::setup(dir.path(), "slow", "fleet", secrets, concurrency, 256).await;
    let runtime = Runtime::start(&config, vault, Clock::System, Mode::Maintenance)
        .await
        .unwrap();
    // Registration gives every secret its first version; wait for all of them.
    loop {
        let ready = store
            .list()
            .await
            .unwrap()
            .iter()
            .filter(|s| s.version == Some(1))
            .count();
        if ready == secrets && store.active_rotations().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let start = Instant::now();
    let report = runtime
        .incidents
        .run(Scope::everything(), true, concurrency, Trigger::Cli)
        .await
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    assert_eq!(report.rotated.len(), secrets, "{:?}", report.failed.first());
    let ideal = secrets as f64 * f64::from(OPS) * OP_DELAY.as_secs_f64() / concurrency as f64;
    println!(
        "| {secrets} | {concurrency} | {wall:.1} s | {ideal:.1} s | {:.2} | {:.1} ms |",
        wall / ideal,
        wall * 1000.0 / secrets as f64
    );
    runtime.stop(Duration::from_secs(10)).await;
}
