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
    for concurrency in [8usize, 32, 128, 256] {
        rt.block_on(run(concurrency));
    }
}

/// Waits until `expected` rotations have ended (a cheap count, so the waiting costs the engine
/// little), then checks every one is done and every secret is at `version`.
async fn wait_all_done(store: &Store, expected: i64, version: i64) {
    loop {
        let ended: i64 = store
            .rotation_counts()
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum();
        if ended >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let list = store.list().await.unwrap();
    assert!(
        list.iter().all(|s| s.version == Some(version)
            && s.rotation_state == Some(keywarden::store::RotationState::Done)),
        "every rotation done"
    );
}

async fn run(concurrency: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (config, store, vault) = common::setup(
        dir.path(),
        "instant",
        "bench",
        SECRETS,
        concurrency,
        concurrency,
    )
    .await;

    // Registration plans a first rotation for every secret (create, verify, promote; no revoke).
    let start = Instant::now();
    let runtime = Runtime::start(&config, vault.clone(), Clock::System, Mode::OneShot)
        .await
        .unwrap();
    wait_all_done(&store, SECRETS as i64, 1).await;
    let first = start.elapsed().as_secs_f64();

    // A full rotation of every secret: create, verify, promote, drain (no leases), revoke. The
    // requests come at once (as from many callers), so their plans share commits too.
    let start = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..SECRETS {
        let engine = runtime.engine.clone();
        requests.spawn(async move {
            engine
                .request(&format!("bench/{i}"), Reason::Manual, false, None)
                .await
                .unwrap();
        });
    }
    while let Some(done) = requests.join_next().await {
        done.unwrap();
    }
    wait_all_done(&store, 2 * SECRETS as i64, 2).await;
    let full = start.elapsed().as_secs_f64();
    runtime.stop(Duration::from_secs(10)).await;
    println!(
        "engine, {SECRETS} secrets, max_concurrent_rotations = {concurrency}: first versions {:.0}/s ({first:.2} s); \
         full rotations {:.0}/s ({full:.2} s)",
        SECRETS as f64 / first,
        SECRETS as f64 / full
    );
}
