//! Several daemons on one PostgreSQL store (the local server, `KEYWARDEN_TEST_POSTGRES_URL`, a
//! database per test): one leads and rotates, every one serves its host's agents, and when the
//! leader is killed in the middle of a rotation another takes over and finishes it, once.
//! Each daemon has a directory, sockets and plugin work directory of its own, as on its own
//! host; the example plugin's upstream state is shared, as a provider would be.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, base_config, example_plugin_config, wait_for, wait_for_explained};
use common::{Env, curl};
use serde_json::Value;

/// A database of the test's own on the test server, dropped at the end.
struct Database {
    base: String,
    name: String,
    url: String,
}

impl Database {
    fn new() -> Option<Database> {
        let Ok(base) = std::env::var("KEYWARDEN_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "KEYWARDEN_TEST_POSTGRES_URL is not set (.ci/run sets it)"
            );
            eprintln!("skipping: KEYWARDEN_TEST_POSTGRES_URL is not set");
            return None;
        };
        // Unique per test: the tests of this file run at once in one process.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "kw_it_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        psql(
            &base,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql(&base, &format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        Some(Database { base, name, url })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A daemon's environment on the shared store: its own directory, sockets and plugin work
/// directory; the example plugin's upstream state in `upstream`'s directory.
fn env_on(db: &Database, upstream: &Env, secrets: &str) -> Env {
    env_at(&db.url, upstream, "", secrets)
}

/// Like [`env_on`], on the store at `url`, with `plugin_env` added to the plugin's environment.
fn env_at(url: &str, upstream: &Env, plugin_env: &str, secrets: &str) -> Env {
    let env = Env::new();
    let written = std::fs::read_to_string(&env.config).unwrap();
    let store = format!("url = {url:?}\nleader_lease = \"1500ms\"");
    let daemon = base_config("3s").replace(
        "[daemon]\n",
        &format!(
            "[daemon]\nwork_dir = {:?}\n",
            env.dir.path().join("work").display().to_string()
        ),
    );
    std::fs::write(
        &env.config,
        format!(
            "{}\n{daemon}\n{}\n{secrets}\n[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"**\"]\n",
            written.replace("path = \"data/vault.db\"", &store),
            example_plugin_config(upstream.dir.path(), plugin_env),
        ),
    )
    .unwrap();
    env
}

fn status(env: &Env) -> Value {
    serde_json::from_str(&env.ok(&["status", "--json"], None)).unwrap()
}

/// The pid of the daemon that leads, and its term, as `env`'s daemon reports them.
fn leader(env: &Env) -> Option<(u32, i64)> {
    let report = status(env);
    let leader = &report["leadership"]["leader"];
    Some((leader["pid"].as_u64()? as u32, leader["term"].as_i64()?))
}

const SECRETS: &str = r#"
[secrets."svc/ha"]
provider = "example"
grace = "10m"
settings = { hang = { op = "promote", once = true, skip = 1 } }
"#;

/// Fetches `svc/ha` from `env`'s agent socket until `stop`; returns (served, failures).
fn fetch_until(env: &Env, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    let socket = env.dir.path().join("run/agent.sock");
    std::thread::spawn(move || {
        let (mut served, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match curl(&socket, "GET", "/v1/secrets/svc/ha", &[]) {
                (200, _) => served += 1,
                (code, body) => failed.push(format!("{code} {body}")),
            }
        }
        (served, failed)
    })
}

#[test]
fn three_daemons_serve_one_store_and_a_leader_killed_mid_rotation_is_replaced_and_the_rotation_finishes_once()
 {
    let Some(db) = Database::new() else {
        return;
    };
    let first = Env::new();
    let envs: Vec<Env> = (0..3).map(|_| env_on(&db, &first, SECRETS)).collect();
    envs[0].ok(&["init"], None);
    let mut daemons: Vec<Option<Daemon>> = vec![Some(envs[0].start_daemon())];
    wait_for("the first version", Duration::from_secs(30), || {
        (envs[0].entry("svc/ha")["version"] == 1).then_some(())
    });
    daemons.extend(envs[1..].iter().map(|e| Some(e.start_daemon())));
    let (leader_pid, term) = leader(&envs[1]).expect("a leader");
    let lead = daemons
        .iter()
        .position(|d| d.as_ref().unwrap().pid() == leader_pid)
        .unwrap();
    let report = status(&envs[2]);
    let roles: Vec<&str> = report["leadership"]["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{report}"
    );
    assert_eq!(roles.len(), 3, "{report}");

    // Every daemon serves its agents the same value.
    let values: Vec<String> = envs
        .iter()
        .map(|e| {
            let (code, body) = curl(
                &e.dir.path().join("run/agent.sock"),
                "GET",
                "/v1/secrets/svc/ha",
                &[],
            );
            assert_eq!(code, 200, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()["value"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(values.iter().all(|v| *v == values[0]));

    // A follower refuses what only the leader does, and names it.
    let follower = (lead + 1) % 3;
    let refused = envs[follower].fails(1, &["rotate", "svc/ha"], None);
    assert!(
        refused.contains("follows another") && refused.contains(&format!("pid {leader_pid}")),
        "{refused}"
    );

    // The followers' agents fetch throughout; the leader rotates and hangs in its promote.
    let stop = Arc::new(AtomicBool::new(false));
    let fetchers: Vec<_> = (0..3)
        .filter(|i| *i != lead)
        .map(|i| fetch_until(&envs[i], stop.clone()))
        .collect();
    envs[lead].ok(&["rotate", "svc/ha", "--no-wait"], None);
    wait_for("the promote to hang", Duration::from_secs(30), || {
        (first.upstream_i64("SELECT count(*) FROM events WHERE op = 'hung:promote'") == 1)
            .then_some(())
    });
    let killed = Instant::now();
    daemons[lead].take().unwrap().kill9();

    // Another daemon takes over under the next term and finishes the rotation.
    let survivor = &envs[follower];
    let (new_pid, new_term) = wait_for("a new leader", Duration::from_secs(30), || {
        leader(survivor).filter(|(pid, _)| *pid != leader_pid)
    });
    let failover = killed.elapsed();
    assert_eq!(new_term, term + 1);
    // Promoted by the new leader (then drained: the followers' agents hold leases on 1).
    wait_for_explained(
        "the new leader to promote version 2",
        Duration::from_secs(60),
        || {
            let e = survivor.entry("svc/ha");
            (e["version"] == 2
                && (e["rotation_state"] == "draining" || e["rotation_state"] == "done"))
                .then_some(())
        },
        || survivor.entry("svc/ha").to_string(),
    );
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for fetcher in fetchers {
        let (n, failed) = fetcher.join().unwrap();
        assert!(
            failed.is_empty(),
            "fetches failed on a follower: {failed:?}"
        );
        served += n;
    }
    eprintln!(
        "failover: a new leader {:?} after the leader was killed (lease 1.5 s); {served} fetches \
         served by the followers meanwhile, none failed",
        failover
    );

    // Exactly once: the first version's promote and the rotation's, one current credential
    // upstream.
    assert_eq!(
        first.upstream_i64("SELECT count(*) FROM events WHERE op = 'promote'"),
        2,
        "promoted once per version"
    );
    assert_eq!(
        first.upstream_i64("SELECT count(*) FROM creds WHERE current = 1"),
        1
    );
    for (i, env) in envs.iter().enumerate() {
        if i == lead {
            continue;
        }
        let (code, body) = curl(
            &env.dir.path().join("run/agent.sock"),
            "GET",
            "/v1/secrets/svc/ha",
            &[],
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], 2);
    }
    assert_ne!(new_pid, leader_pid);
    let verified = survivor.ok(&["audit", "verify"], None);
    assert!(verified.contains("audit chain intact"), "{verified}");
    // The journal's writes shared transactions (group commit), each sealing the head once.
    let keyed = survivor.run(&["audit", "verify", "--keyed", "--json"], None);
    let report: Value = serde_json::from_slice(&keyed.stdout).unwrap();
    assert_eq!(keyed.status.code(), Some(0), "{report}");
    assert_eq!(report["unsealed_tail"], 0, "every row is sealed: {report}");
    for daemon in daemons.into_iter().flatten() {
        assert_eq!(daemon.terminate(), Some(0));
    }
}

/// `[store] url` over TLS to a cluster of the test's own (`ssl = on`, a certificate from a
/// private CA, passwords checked): verified against the CA it works, with another CA it is
/// refused; the password comes from `PGPASSWORD` and is never printed.
#[test]
fn a_store_over_tls_is_verified_against_its_ca_and_its_password_stays_out_of_the_output() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::tls::private_ca(certs.path());
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = common::tls::private_ca(other.path());
    for file in [&cert, &key] {
        assert!(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(file)
                .status()
                .unwrap()
                .success()
        );
    }
    std::fs::set_permissions(
        certs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ssl = [
        "ssl=on".to_string(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ];
    let settings: Vec<&str> = ssl.iter().map(String::as_str).collect();
    let Some(server) = common::postgres::Postgres::start_with(&settings) else {
        return;
    };
    let password = server.admin_password().to_string();
    let url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
            server.port,
            ca.display()
        )
    };
    let env_for = |ca: &std::path::Path| {
        let env = Env::new();
        let written = std::fs::read_to_string(&env.config).unwrap();
        std::fs::write(
            &env.config,
            written.replace("path = \"data/vault.db\"", &format!("url = {:?}", url(ca))),
        )
        .unwrap();
        env
    };
    let run = |env: &Env, args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.env("PGPASSWORD", &password);
        common::run_with(cmd, args, Some(b"a value"))
    };

    // Another CA: refused, naming the certificate, before anything is written.
    let wrong = env_for(&other_ca);
    let out = run(&wrong, &["init"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert!(!stderr.contains(&password), "{stderr}");

    // Its own CA: a store is created and opens; nothing printed holds the password.
    let env = env_for(&ca);
    let out = run(&env, &["init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&env, &["put", "app/tls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&env, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("app/tls"), "{stdout}");
    for printed in [stdout, String::from_utf8_lossy(&out.stderr).into_owned()] {
        assert!(!printed.contains(&password), "{printed}");
    }
}

/// A TCP proxy to the database server that can stall: while `flowing` is false it holds what
/// it reads (a partition that drops nothing and refuses nothing).
struct Proxy {
    port: u16,
    flowing: Arc<AtomicBool>,
}

impl Proxy {
    fn to(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let flowing = Arc::new(AtomicBool::new(true));
        let gate = flowing.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&upstream)) else {
                    continue;
                };
                let ways = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ];
                for (mut from, mut to) in ways {
                    let gate = gate.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => {
                                    let _ = to.shutdown(std::net::Shutdown::Both);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            while !gate.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy { port, flowing }
    }
}

#[test]
fn a_leader_whose_database_connection_stalls_steps_down_its_late_write_is_refused_and_the_rotation_finishes_once()
 {
    let Some(db) = Database::new() else {
        return;
    };
    let server = db
        .url
        .split_once('@')
        .unwrap()
        .1
        .split_once('/')
        .unwrap()
        .0
        .to_string();
    let proxy = Proxy::to(server);
    let user = db
        .url
        .split_once("://")
        .unwrap()
        .1
        .split_once('@')
        .unwrap()
        .0;
    let through_proxy = format!("postgres://{user}@127.0.0.1:{}/{}", proxy.port, db.name);
    let first = Env::new();
    let secrets = r#"
[secrets."svc/ha"]
provider = "example"
"#;
    // The daemon behind the proxy leads; its plugin takes 1.5 s per operation, so a step is in
    // flight when its connection stalls.
    let a = env_at(
        &through_proxy,
        &first,
        ", EXAMPLE_DELAY_MS = \"1500\"",
        secrets,
    );
    let b = env_at(&db.url, &first, "", secrets);
    a.ok(&["init"], None);
    let a_daemon = a.start_daemon();
    wait_for("the first version", Duration::from_secs(60), || {
        (a.entry("svc/ha")["version"] == 1 && a.entry("svc/ha")["rotation_state"] == "done")
            .then_some(())
    });
    let b_daemon = b.start_daemon();
    let (leader_pid, term) = leader(&b).unwrap();
    assert_eq!(leader_pid, a_daemon.pid());

    a.ok(&["rotate", "svc/ha", "--no-wait"], None);
    wait_for(
        "the rotation to be planned",
        Duration::from_secs(30),
        || (b.entry("svc/ha")["rotation_state"] == "planned").then_some(()),
    );
    proxy.flowing.store(false, Ordering::SeqCst);
    let stalled = Instant::now();

    // The other daemon takes over under the next term; the stalled one stepped down first.
    wait_for("the other daemon to lead", Duration::from_secs(30), || {
        leader(&b).filter(|(pid, _)| *pid == b_daemon.pid())
    });
    let takeover = stalled.elapsed();
    assert_eq!(leader(&b).unwrap().1, term + 1);
    wait_for(
        "the stalled daemon to step down",
        Duration::from_secs(30),
        || {
            a_daemon
                .log_text()
                .contains("two thirds of its lease; stepping down")
                .then_some(())
        },
    );

    // The link comes back: the old leader's step, held in the stalled connection, is refused.
    proxy.flowing.store(true, Ordering::SeqCst);
    wait_for_explained(
        "the new leader to finish the rotation",
        Duration::from_secs(60),
        || {
            let e = b.entry("svc/ha");
            (e["version"] == 2 && e["rotation_state"] == "done").then_some(())
        },
        || b.entry("svc/ha").to_string(),
    );
    wait_for_explained(
        "the old leader's late write to be refused",
        Duration::from_secs(30),
        || {
            a_daemon
                .log_text()
                .contains(&format!("its term {term} ended; term {} leads", term + 1))
                .then_some(())
        },
        || a_daemon.log_text(),
    );
    eprintln!("takeover {takeover:?} after the leader's connection stalled (lease 1.5 s)");

    // Exactly once: one live credential upstream, the one the store holds.
    assert_eq!(
        first.upstream_i64("SELECT count(*) FROM creds WHERE status = 'active' AND issued = 0"),
        1,
        "no orphan: only the current credential is live upstream"
    );
    assert_eq!(
        first.upstream_i64("SELECT count(*) FROM events WHERE op = 'promote'"),
        2,
        "promoted once per version"
    );
    let verified = b.ok(&["audit", "verify"], None);
    assert!(verified.contains("audit chain intact"), "{verified}");
    for daemon in [a_daemon, b_daemon] {
        assert_eq!(daemon.terminate(), Some(0));
    }
}

#[test]
fn a_leader_whose_database_refuses_connections_steps_down_waits_and_leads_again() {
    let Some(db) = Database::new() else {
        return;
    };
    let first = Env::new();
    let env = env_on(&db, &first, SECRETS);
    env.ok(&["init"], None);
    let daemon = env.start_daemon();
    wait_for("the daemon to lead", Duration::from_secs(30), || {
        (leader(&env).map(|l| l.0) == Some(daemon.pid())).then_some(())
    });
    wait_for("the first version", Duration::from_secs(30), || {
        (env.entry("svc/ha")["version"] == 1).then_some(())
    });
    let socket = env.dir.path().join("run/agent.sock");
    assert_eq!(curl(&socket, "GET", "/v1/secrets/svc/ha", &[]).0, 200);

    // Its connections cut, and new ones refused: it steps down, and its services cannot
    // start again as a follower while the database refuses them.
    psql(
        &db.base,
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name),
    );
    psql(
        &db.base,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
            db.name
        ),
    );
    wait_for(
        "the services to wait for the store",
        Duration::from_secs(30),
        || {
            daemon
                .log_text()
                .contains("the services cannot start: the store is unavailable; trying again")
                .then_some(())
        },
    );

    // The database takes connections again: the same process leads and serves, nothing done
    // by hand (it used to exit with the store's error).
    psql(
        &db.base,
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name),
    );
    wait_for("the daemon to lead again", Duration::from_secs(60), || {
        (leader(&env).is_some_and(|l| l.0 == daemon.pid())
            && curl(&socket, "GET", "/v1/secrets/svc/ha", &[]).0 == 200)
            .then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0));
}
