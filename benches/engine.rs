//! Rotation engine benchmark: durable rotations per second through a plugin that answers
//! instantly, over 1,000 secrets. Measures the engine's own overhead: seven journal
//! transactions (each with its audit row, `synchronous=FULL`), four plugin round trips and the
//! sealing of each new version, per rotation.
//!
//! Run with `cargo bench --bench engine`; prints its figures. The benchmark binary is also the
//! plugin: run with `--keywarden-plugin=1` it serves the `instant` kind through the SDK.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keywarden::clock::Clock;
use keywarden::config::Config;
use keywarden::crypto::KdfParams;
use keywarden::daemon::{Mode, Runtime};
use keywarden::rotation::Reason;
use keywarden::store::{Access, Store};
use keywarden::vault::Vault;
use keywarden_plugin_sdk::{ErrReply, Hello, KindInfo, Meta, OkReply, Plugin, Request, Secret};
use zeroize::Zeroizing;

const SECRETS: usize = 1_000;

struct Instant_;

impl Plugin for Instant_ {
    fn hello(&self) -> Hello {
        Hello {
            keywarden_plugin: 1,
            name: "instant".into(),
            version: "1".into(),
            kinds: [(
                "instant".to_string(),
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
        std::process::exit(match keywarden_plugin_sdk::serve(Instant_) {
            c if c == std::process::ExitCode::SUCCESS => 0,
            _ => 1,
        });
    }
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
    let exe = std::env::current_exe().unwrap();
    let sha = keywarden::plugin_host::file_sha256(&exe).unwrap();
    let mut config = format!(
        "[store]\npath = \"vault.db\"\n[daemon]\nmax_concurrent_rotations = {concurrency}\n\
         [plugins.instant]\ncommand = [{:?}]\nsha256 = \"{sha}\"\nmax_concurrency = 64\n",
        exe.display().to_string()
    );
    for i in 0..SECRETS {
        config.push_str(&format!(
            "[secrets.\"bench/{i}\"]\nprovider = \"instant\"\ngrace = \"0s\"\n"
        ));
    }
    let config_path = dir.path().join("keywarden.toml");
    let config = Config::parse(&config, &config_path).unwrap();
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
