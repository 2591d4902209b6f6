//! Store benchmark: `put` commits per second while filling a store to 10,000 secrets, then
//! decrypting point reads per second (current version, data key unwrapped, value opened) from
//! 1 and 8 concurrent tasks. Run with `cargo bench --bench store`; prints its figures.

use std::sync::Arc;
use std::time::Instant;

use keywarden::crypto::KdfParams;
use keywarden::store::{Access, Store};
use keywarden::value::SecretValue;
use keywarden::vault::Vault;
use zeroize::Zeroizing;

const SECRETS: usize = 10_000;
const READS: usize = 200_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    let vault = Vault::init(
        &path,
        &Zeroizing::new("bench passphrase".into()),
        kdf,
        "bench",
    )
    .await
    .unwrap();

    let start = Instant::now();
    for i in 0..SECRETS {
        let value = SecretValue::new(format!(
            "sk-bench-{i:08}-0123456789abcdefghijklmnopqrstuvwxyz"
        ));
        vault
            .put(
                &format!("bench/{i}"),
                "manual",
                &value,
                Default::default(),
                "bench",
            )
            .await
            .unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "put (new secret, durable commit): {SECRETS} in {secs:.2} s = {:.0} commits/s",
        SECRETS as f64 / secs
    );

    let start = Instant::now();
    for i in 0..2_000 {
        let value = SecretValue::new(format!("sk-bench-{i:08}-second-version"));
        vault
            .put(
                &format!("bench/{i}"),
                "manual",
                &value,
                Default::default(),
                "bench",
            )
            .await
            .unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "put (new version of existing secret): 2000 in {secs:.2} s = {:.0} commits/s",
        2000.0 / secs
    );

    drop(vault);
    for access in [Access::Shared, Access::Exclusive] {
        let store = Store::open(&path, access).await.unwrap();
        let vault = Vault::unlock(store, &Zeroizing::new("bench passphrase".into()))
            .await
            .unwrap();
        reads(Arc::new(vault), access).await;
    }
}

async fn reads(vault: Arc<Vault>, access: Access) {
    let how = match access {
        Access::Exclusive => "daemon (sealed-row cache)",
        _ => "straight from SQLite",
    };
    for tasks in [1usize, 8, 32] {
        let start = Instant::now();
        let per_task = READS / tasks;
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let vault = vault.clone();
                tokio::spawn(async move {
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ t as u64;
                    for _ in 0..per_task {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let name = format!("bench/{}", x % SECRETS as u64);
                        let revealed = vault.read(&name, None).await.unwrap();
                        assert!(revealed.value.len() > 10);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "decrypting point reads, {how}, {tasks} task(s): {} in {secs:.2} s = {:.0} reads/s",
            per_task * tasks,
            (per_task * tasks) as f64 / secs
        );
    }
}
