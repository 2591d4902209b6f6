//! Compromise benchmark: `rotate-all --assume-compromise` (the same incident runner the CLI
//! and the admin API use) over 1,000 and 10,000 secrets, through a plugin whose every op takes
//! 50 ms. Prints wall time against the ideal, secrets × ops × 50 ms ÷ concurrency, where an
//! emergency rotation is four plugin ops (create, verify, promote, revoke).
//!
//! Run with `cargo bench --bench compromise`. The benchmark binary is also the plugin: run with
//! `--keywarden-plugin=1` it serves the `slow` kind through the SDK.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::clock::Clock;
use keywarden::compromise::Scope;
use keywarden::config::Config;
use keywarden::crypto::KdfParams;
use keywarden::daemon::{Mode, Runtime};
use keywarden::store::{Access, Store};
use keywarden::vault::Vault;
use keywarden_plugin_sdk::{ErrReply, Hello, KindInfo, Meta, OkReply, Plugin, Request, Secret};
use zeroize::Zeroizing;

const OP_DELAY: Duration = Duration::from_millis(50);
const OPS: u32 = 4;

struct Slow;

impl Plugin for Slow {
    fn hello(&self) -> Hello {
        Hello {
            keywarden_plugin: 1,
            name: "slow".into(),
            version: "1".into(),
            kinds: [(
                "slow".to_string(),
                KindInfo {
                    ops: ["create", "verify", "promote", "revoke"]
                        .map(String::from)
                        .to_vec(),
                    overlap: Some(true),
                },
            )]
            .into(),
        }
    }

    async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
        tokio::time::sleep(OP_DELAY).await;
        match request.op.as_str() {
            "create" => Ok(OkReply::credential(
                request
                    .proposed
                    .unwrap_or_else(|| Secret::new("x".repeat(32))),
                Meta::new(),
            )),
            "verify" | "promote" | "revoke" => Ok(OkReply::default()),
            _ => Err(ErrReply::unsupported()),
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == keywarden_plugin_sdk::PLUGIN_FLAG) {
        let ok = keywarden_plugin_sdk::serve(Slow) == std::process::ExitCode::SUCCESS;
        std::process::exit(if ok { 0 } else { 1 });
    }
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
    let exe = std::env::current_exe().unwrap();
    let sha = keywarden::plugin_host::file_sha256(&exe).unwrap();
    let mut config = format!(
        "[store]\npath = \"vault.db\"\n[daemon]\nmax_concurrent_rotations = {concurrency}\n\
         [plugins.slow]\ncommand = [{:?}]\nsha256 = \"{sha}\"\nmax_concurrency = 256\n",
        exe.display().to_string()
    );
    for i in 0..secrets {
        config.push_str(&format!(
            "[secrets.\"fleet/{i}\"]\nprovider = \"slow\"\ngrace = \"0s\"\n"
        ));
    }
    let config = Config::parse(&config, &dir.path().join("keywarden.toml")).unwrap();
    let passphrase = Zeroizing::new("bench passphrase".to_string());
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let store_path = dir.path().join("vault.db");
    drop(
        Vault::init(&store_path, &passphrase, kdf, "bench")
            .await
            .unwrap(),
    );
    let store = Store::open(&store_path, Access::Exclusive).await.unwrap();
    let vault = Arc::new(Vault::unlock(store.clone(), &passphrase).await.unwrap());
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
        .run(Scope::everything(), true, concurrency, "bench")
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
