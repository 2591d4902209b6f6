//! Rotation engine benchmark: durable rotations per second through a plugin that answers
//! instantly, over 1,000 secrets. Measures the engine's own overhead: seven journal
//! transactions (each with its audit row, `synchronous=FULL`), four plugin round trips and the
//! sealing of each new version, per rotation.
//!
//! Run with `cargo bench --bench engine`; prints its figures. The benchmark binary is also the
//! plugin: run with `--keywarden-plugin=1` it serves the `instant` kind through the SDK.

mod common;

use std::time::{Duration, Instant};

use common::BenchPlugin;
use keywarden::clock::Clock;
use keywarden::daemon::{Mode, Runtime};
use keywarden::store::Reason;
use keywarden::store::Store;

const SECRETS: usize = 1_000;

fn main() {
    common::serve_if_plugin(BenchPlugin {
        kind: "instant",
        delay: Duration::ZERO,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for concurrency in [8usize, 32] {
        rt.block_on(run(concurrency));
    }
}

async fn wait_all_done(store: &Store, expected_version: i64) {
    loop {
        let list = store.list().await.unwrap();
        let done = list
            .iter()
            .filter(|s| {
                s.version == Some(expected_version)
                    && s.rotation_state.is_some_and(|r| r.is_terminal())
            })
            .count();
        if done == SECRETS {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(concurrency: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (config, store, vault) =
        common::setup(dir.path(), "instant", "bench", SECRETS, concurrency, 64).await;

    // Registration plans a first rotation for every secret (create, verify, promote; no revoke).
    let start = Instant::now();
    let runtime = Runtime::start(&config, vault.clone(), Clock::System, Mode::OneShot)
        .await
        .unwrap();
    wait_all_done(&store, 1).await;
    let first = start.elapsed().as_secs_f64();

    // A full rotation of every secret: create, verify, promote, drain (no leases), revoke.
    let start = Instant::now();
    for i in 0..SECRETS {
        runtime
            .engine
            .request(&format!("bench/{i}"), Reason::Manual, false, None)
            .await
            .unwrap();
    }
    wait_all_done(&store, 2).await;
    let full = start.elapsed().as_secs_f64();
    runtime.stop(Duration::from_secs(10)).await;
    println!(
        "engine, {SECRETS} secrets, max_concurrent_rotations = {concurrency}: first versions {:.0}/s ({first:.2} s); \
         full rotations {:.0}/s ({full:.2} s)",
        SECRETS as f64 / first,
        SECRETS as f64 / full
    );
}
