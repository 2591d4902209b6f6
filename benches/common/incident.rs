//! `rotate-all --assume-compromise` in process: the incident runner the CLI and the admin API
//! use, through a plugin whose every op takes 50 ms.

use std::time::{Duration, Instant};

use keywarden::clock::Clock;
use keywarden::daemon::{Mode, Runtime};
use keywarden::store::{Scope, Trigger};

/// Every plugin op's delay.
pub const OP_DELAY: Duration = Duration::from_millis(50);
/// Plugin ops per emergency rotation: create, verify, promote, revoke.
pub const OPS: u32 = 4;

/// Wall time of the incident, and its ideal: secrets × ops × delay ÷ concurrency.
pub struct Timing {
    pub wall: f64,
    pub ideal: f64,
}

/// Gives `secrets` secrets their first versions, then runs the incident over all of them with
/// `concurrency` rotations at once.
pub async fn run(secrets: usize, concurrency: usize) -> Timing {
    let dir = tempfile::tempdir().unwrap();
    let (config, store, vault) = super::setup(
        dir.path(),
        ("slow", OP_DELAY),
        "fleet",
        secrets,
        concurrency,
        256,
    )
    .await;
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
    runtime.stop(Duration::from_secs(10)).await;
    Timing {
        wall,
        ideal: secrets as f64 * f64::from(OPS) * OP_DELAY.as_secs_f64() / concurrency as f64,
    }
}
