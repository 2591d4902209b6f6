//! What the benchmarks share: the benchmark binary doubles as a plugin (served through the SDK
//! when started with `--keywarden-plugin=1`), a fresh store with a config declaring many
//! secrets of that plugin's kind, and each measurement as a function, so that each benchmark
//! prints its own table and `benches/under_load.rs` prints every goal's figure in one.

// Each benchmark uses a part of what is here.
#![allow(dead_code)]

pub mod emergency;
pub mod engine;
pub mod fetch;
pub mod incident;
pub mod postgres;
pub mod scale;

use std::sync::Arc;
use std::time::Duration;

use keywarden::config::Config;
use keywarden::crypto::KdfParams;
use keywarden::store::{Access, Store};
use keywarden::vault::Vault;
use keywarden_plugin_sdk::{ErrReply, Hello, KindInfo, Meta, OkReply, Plugin, Request, Secret};
use zeroize::Zeroizing;

/// A plugin of one kind (create, verify, promote, revoke; overlap) whose every op takes `delay`.
pub struct BenchPlugin {
    pub kind: &'static str,
    pub delay: Duration,
}

impl Plugin for BenchPlugin {
    fn hello(&self) -> Hello {
        Hello {
            keywarden_plugin: 1,
            name: self.kind.into(),
            version: "1".into(),
            kinds: [(
                self.kind.to_string(),
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
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
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

/// Serves `plugin` and exits when this binary was started as a plugin (its kind and delay as
/// the config's `BENCH_KIND` and `BENCH_DELAY_MS` say, where set). Before that, this binary may
/// have been started as keywarden's sandbox launcher (the daemon runs in it, so its plugins are
/// launched through it): then it confines itself and executes the plugin.
pub fn serve_if_plugin(mut plugin: BenchPlugin) {
    keywarden::sandbox::run_if_launcher();
    if std::env::args().any(|a| a == keywarden_plugin_sdk::PLUGIN_FLAG) {
        if let Ok(kind) = std::env::var("BENCH_KIND") {
            plugin.kind = Box::leak(kind.into_boxed_str());
        }
        if let Ok(ms) = std::env::var("BENCH_DELAY_MS") {
            plugin.delay = Duration::from_millis(ms.parse().expect("BENCH_DELAY_MS"));
        }
        let ok = keywarden_plugin_sdk::serve(plugin) == std::process::ExitCode::SUCCESS;
        std::process::exit(if ok { 0 } else { 1 });
    }
}

/// A fresh store in `dir` (small Argon2 parameters) and a config that pins this binary as the
/// plugin of `kind` (every op taking `delay`) and declares `count` secrets `PREFIX/i` of that
/// kind with no grace.
pub async fn setup(
    dir: &std::path::Path,
    (kind, delay): (&str, Duration),
    prefix: &str,
    count: usize,
    concurrency: usize,
    plugin_concurrency: usize,
) -> (Config, Store, Arc<Vault>) {
    let exe = std::env::current_exe().unwrap();
    let sha = keywarden::crypto::file_sha256(&exe).unwrap();
    let mut config = format!(
        "[store]\npath = \"vault.db\"\n[daemon]\nmax_concurrent_rotations = {concurrency}\nplugin_user = \"65534:65534\"\n\
         [plugins.{kind}]\ncommand = [{:?}]\nsha256 = \"{sha}\"\nmax_concurrency = {plugin_concurrency}\n\
         env = {{ BENCH_KIND = \"{kind}\", BENCH_DELAY_MS = \"{}\" }}\n",
        exe.display().to_string(),
        delay.as_millis()
    );
    for i in 0..count {
        config.push_str(&format!(
            "[secrets.\"{prefix}/{i}\"]\nprovider = \"{kind}\"\ngrace = \"0s\"\n"
        ));
    }
    let config = Config::parse(&config, &dir.join("keywarden.toml")).unwrap();
    let passphrase = Zeroizing::new("bench passphrase".to_string());
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let store_path = dir.join("vault.db");
    drop(
        Vault::init(&store_path, &passphrase, kdf, "bench")
            .await
            .unwrap(),
    );
    let store = Store::open(&store_path, Access::Exclusive).await.unwrap();
    let vault = Arc::new(Vault::unlock(store.clone(), &passphrase).await.unwrap());
    (config, store, vault)
}

/// Waits until each of `secrets` secrets of the daemon on `env` has its first version, polling
/// `list` once a second (it reads every secret; polling faster would slow the daemon being
/// measured). `list` fails until `serve --init` has created the store.
pub fn wait_first_versions(env: &keywarden_testkit::Env, secrets: usize) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let out = env.run(&["list", "--json"], None);
        if !out.status.success() {
            continue;
        }
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ready = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["version"] == 1 && s["rotation_state"] == "done")
            .count();
        if ready == secrets {
            return;
        }
    }
}
