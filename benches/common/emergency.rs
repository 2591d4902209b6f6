//! `rotate-all --assume-compromise` as an operator runs it: the real CLI against a running
//! daemon with the default config, a plugin whose every op takes 50 ms (the benchmark binary,
//! serving through the SDK, so the plugin's own CPU is negligible and what is measured is
//! keywarden), one file consumer per secret, `--concurrency 32`.

use std::fmt::Write as _;
use std::time::Instant;

use keywarden_testkit::Env;

/// Every plugin op's delay.
pub const OP_DELAY_MS: u64 = 50;
/// Plugin ops per emergency rotation: create, verify, promote, revoke.
pub const OPS: u64 = 4;
/// `rotate-all --concurrency`.
pub const CONCURRENCY: u64 = 32;

/// Wall time against the ideal (secrets × ops × delay ÷ concurrency), and the daemon's CPU
/// time (user + system, from `/proc`) per emergency rotation, and the system part.
pub struct Figures {
    pub wall: f64,
    pub ideal: f64,
    pub cpu_ms_per_rotation: f64,
    /// The part of it spent in the kernel (fsyncs, file creation, WAL writes, wakes).
    pub system_ms_per_rotation: f64,
}

/// Gives `secrets` secrets their first versions (a run of the daemon with no delay, not
/// measured), restarts the daemon with the delay, and times the CLI's `rotate-all`. The store
/// is a SQLite file, or the empty PostgreSQL database at `postgres_url`.
pub fn run(secrets: usize, postgres_url: Option<&str>) -> Figures {
    let env = Env::new();
    let store = match postgres_url {
        Some(url) => format!("url = {url:?}"),
        None => "path = \"data/vault.db\"".to_string(),
    };
    write_config(&env, &store, secrets, 0);
    // The first start registers every secret before it serves (longer than the testkit's
    // 30 s wait at 10,000 secrets): started by hand, polled once a second (`list` reads every
    // secret; polling faster would slow the daemon).
    let mut first = env
        .cmd()
        .args(["serve", "--init"])
        .env("KEYWARDEN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    super::wait_first_versions(&env, secrets);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    assert!(first.wait().unwrap().success());
    write_config(&env, &store, secrets, OP_DELAY_MS);
    let daemon = env.start_daemon_with(&[("KEYWARDEN_LOG", "warn")]);
    let cpu_before = keywarden_testkit::proc::cpu_user_system(daemon.pid());
    let start = Instant::now();
    let out = env
        .cmd()
        .args([
            "rotate-all",
            "--assume-compromise",
            "--yes",
            "--json",
            "--concurrency",
            &CONCURRENCY.to_string(),
        ])
        .output()
        .unwrap();
    let wall = start.elapsed().as_secs_f64();
    let cpu_after = keywarden_testkit::proc::cpu_user_system(daemon.pid());
    let system = cpu_after.1 - cpu_before.1;
    let cpu = cpu_after.0 - cpu_before.0 + system;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rotated"].as_array().unwrap().len(), secrets);
    drop(daemon);
    Figures {
        wall,
        ideal: (secrets as u64 * OPS * OP_DELAY_MS) as f64 / 1000.0 / CONCURRENCY as f64,
        cpu_ms_per_rotation: cpu * 1000.0 / secrets as f64,
        system_ms_per_rotation: system * 1000.0 / secrets as f64,
    }
}

/// The config: `store` is the `[store]` line that says where (`path = …` or `url = …`).
fn write_config(env: &Env, store: &str, secrets: usize, delay_ms: u64) {
    let root = env.dir.path();
    std::fs::create_dir_all(root.join("out")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut text = format!(
        "[store]\n{store}\nweak_kdf_for_tests = true\n[store.kdf]\n\
         memory_kib = 64\niterations = 1\nparallelism = 1\n\n\
         [daemon]\nplugin_user = \"65534:65534\"\n\n[agent]\nsocket = \"run/agent.sock\"\n\
         admin_socket = \"run/admin.sock\"\n\n[plugins.slow]\ncommand = [{:?}]\nsha256 = \"{}\"\n\
         env = {{ BENCH_KIND = \"slow\", BENCH_DELAY_MS = \"{delay_ms}\" }}\n",
        exe.display().to_string(),
        keywarden::crypto::file_sha256(&exe).unwrap(),
    );
    for i in 0..secrets {
        let _ = write!(
            text,
            "\n[secrets.\"fleet/s{i}\"]\nprovider = \"slow\"\nconsumers = [\"c{i}\"]\n\
             [consumers.c{i}]\nkind = \"file\"\npath = {:?}\n",
            root.join("out").join(format!("s{i}")).display().to_string()
        );
    }
    std::fs::write(&env.config, text).unwrap();
}
