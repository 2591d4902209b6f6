//! Rotation engine benchmark: durable rotations per second through a plugin that answers
//! instantly, over 1,000 secrets (see `common/engine.rs`). Measures the engine's own overhead:
//! the journal steps (group-committed, each with its audit row), four plugin round trips and
//! the sealing of each new version, per rotation.
//!
//! Run with `cargo bench --bench engine`; prints its figures. The benchmark binary is also the
//! plugin: run with `--keywarden-plugin=1` it serves the `instant` kind through the SDK.

mod common;

use std::time::Duration;

use common::BenchPlugin;

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
        let r = rt.block_on(common::engine::run(SECRETS, concurrency));
        println!(
            "engine, {SECRETS} secrets, max_concurrent_rotations = {concurrency}: first versions {:.0}/s; \
             full rotations {:.0}/s",
            r.first_per_s, r.full_per_s
        );
    }
}
