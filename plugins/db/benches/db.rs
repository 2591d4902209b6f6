//! Database plugin benchmark, against a PostgreSQL cluster started for the run
//! (`scram-sha-256`, on this machine): first versions per second of `postgres-password`
//! secrets through the real daemon (engine + plugin + server: `ALTER ROLE`, a fresh login to
//! verify, promote), and the latency of issuing a per-lease user (`postgres-lease`: `CREATE
//! ROLE … VALID UNTIL`, journaled, leased and audited) as an agent sees it over the socket.
//!
//! Run with `cargo bench -p keywarden-plugin-db --bench db [-- --secrets N]` (default 200).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::{base_config, sha256_of, wait_for};
use keywarden_testkit::postgres::Postgres;

const FETCHES: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secrets: usize = args
        .iter()
        .position(|a| a == "--secrets")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(200);
    let pg = Postgres::start().expect("a PostgreSQL cluster (server binaries, root)");
    pg.admin(&format!(
        "DO $$ BEGIN FOR i IN 1..{secrets} LOOP EXECUTE format('CREATE ROLE %I LOGIN', 'app' || i); END LOOP; END $$"
    ));
    pg.admin("CREATE ROLE readers NOLOGIN");
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden-plugin-db"));
    let mut config = format!(
        "{}\n[plugins.db]\ncommand = [{:?}]\nsha256 = \"{}\"\nmax_concurrency = 16\n\n\
         [secrets.\"pg/lease\"]\nprovider = \"postgres-lease\"\ncredentials = {{ admin = \"admin\" }}\n\
         settings = {{ group_role = \"readers\" }}\n\n\
         [[policy]]\nname = \"bench\"\nuids = [0]\nsame_user = true\nsecrets = [\"**\"]\n",
        base_config("30s"),
        bin.display().to_string(),
        sha256_of(bin)
    );
    for i in 1..=secrets {
        config.push_str(&format!(
            "\n[secrets.\"pg/app{i}\"]\nprovider = \"postgres-password\"\ncredentials = {{ admin = \"admin\" }}\nsettings = {{ username = \"app{i}\" }}\n"
        ));
    }
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env.ok(&["init"], None);
    env.ok(&["put", "admin"], Some(pg.admin_url().as_bytes()));

    let started = Instant::now();
    let daemon = env.start_daemon();
    wait_for("every first version", Duration::from_secs(600), || {
        let list = env.list();
        let done = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"].as_str().unwrap().starts_with("pg/app") && s["version"] == 1)
            .count();
        (done == secrets).then_some(())
    });
    let took = started.elapsed().as_secs_f64();

    let socket = env.agent_socket();
    let mut latencies = Vec::new();
    for _ in 0..FETCHES {
        let t = Instant::now();
        let answer = fetch(&socket, "/v1/secrets/pg/lease?ttl=600");
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!("# postgres-password and postgres-lease against a local scram-sha-256 cluster");
    println!("| measure | figure |");
    println!("|---|---|");
    println!(
        "| first versions of {secrets} secrets (ALTER ROLE, fresh-login verify, promote), from daemon start | {took:.1} s, {:.0} rotations/s |",
        secrets as f64 / took
    );
    println!(
        "| issuing a per-lease user, {FETCHES} fetches one after another | p50 {:.1} ms, p99 {:.1} ms |",
        at(0.5),
        at(0.99)
    );
    daemon.terminate();
}

/// One request over the agent socket, the whole answer as text.
fn fetch(socket: &Path, path: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: keywarden\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}
