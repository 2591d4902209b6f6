//! The rotation engine's own overhead: durable rotations per second through a plugin that
//! answers at once (`instant`), over many secrets, in process.

use std::time::{Duration, Instant};

use keywarden::clock::Clock;
use keywarden::daemon::{Mode, Runtime};
use keywarden::store::{Reason, RotationState, Store};

/// Rotations per second, for the first versions and for full rotations.
pub struct Rates {
    pub first_per_s: f64,
    pub full_per_s: f64,
}

/// Gives `secrets` secrets their first versions, then rotates every one at once (create,
/// verify, promote, drain, revoke), with `concurrency` rotations (and plugin requests) at once.
pub async fn run(secrets: usize, concurrency: usize) -> Rates {
    let dir = tempfile::tempdir().unwrap();
    let (config, store, vault) = super::setup(
        dir.path(),
        ("instant", Duration::ZERO),
        "bench",
        secrets,
        concurrency,
        concurrency,
    )
    .await;

    // Registration plans a first rotation for every secret (create, verify, promote; no revoke).
    let start = Instant::now();
    let runtime = Runtime::start(&config, vault.clone(), Clock::System, Mode::OneShot)
        .await
        .unwrap();
    wait_all_done(&store, secrets as i64, 1).await;
    let first = start.elapsed().as_secs_f64();

    // The requests come at once (as from many callers), so their plans share commits too.
    let start = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..secrets {
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
    wait_all_done(&store, 2 * secrets as i64, 2).await;
    let full = start.elapsed().as_secs_f64();
    runtime.stop(Duration::from_secs(10)).await;
    Rates {
        first_per_s: secrets as f64 / first,
        full_per_s: secrets as f64 / full,
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
        list.iter()
            .all(|s| s.version == Some(version) && s.rotation_state == Some(RotationState::Done)),
        "every rotation done"
    );
}
