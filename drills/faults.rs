//! The faults drill: one fault at a time against a running daemon — a plugin that returns
//! retryable errors, hangs, crashes, answers out of order, answers an id never sent, writes a
//! line over the limit or one that is not JSON; a consumer's directory removed; the SQLite store
//! locked by another process; its file system full (a tmpfs of its own, filled, then freed); the
//! broker's upstream refusing connections; the PostgreSQL leader's connections cut and refused
//! for a while. Each fault must show a clear error (in `status` and the log, or in the answer
//! the agent gets) and the service must come back by itself once the fault is cleared: the drill
//! measures how long that takes. At the end nothing may be lost (the crash drill's checks) and
//! the hygiene sweep runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::{base_config, example_plugin_config, upstream_dir};

use crate::kit::{self, Violations};

/// Plugin misbehaviour, as settings of the example plugin's `EXAMPLE_FAULTS` file.
const PLUGIN_FAULTS: &[(&str, &str)] = &[
    (
        "plugin: retryable errors",
        r#"{"fail": {"op": "create", "retryable": true}}"#,
    ),
    ("plugin: hangs", r#"{"hang": {"op": "verify"}}"#),
    ("plugin: crashes", r#"{"crash": {"op": "create"}}"#),
    (
        "plugin: answers an unknown id",
        r#"{"lie": {"op": "create"}}"#,
    ),
    (
        "plugin: a line over the limit",
        r#"{"oversize": {"op": "create"}}"#,
    ),
    (
        "plugin: a line that is not JSON",
        r#"{"garbage": {"op": "promote"}}"#,
    ),
];

/// Stored secrets (each with a file consumer); one per plugin fault and a few more.
const SECRETS: usize = 16;
/// Secrets rotated at once while the plugin answers out of order.
const OUT_OF_ORDER: std::ops::Range<usize> = 8..16;

/// One measured fault.
struct Row {
    fault: String,
    /// What showed it (trimmed), or why nothing did.
    error: String,
    /// From clearing the fault to the service working again.
    recovery: Option<Duration>,
}

fn name(i: usize) -> String {
    format!("f/{i:02}")
}

fn config(env: &Env, broker_port: u16, faults_file: &Path) -> String {
    let mut config = format!(
        "{}\nbroker_socket = \"run/broker.sock\"\n\n{}\n\
         [[policy]]\nname = \"drill\"\nuids = [{}]\nsecrets = [\"f/*\"]\nbrokers = [\"drill\"]\nmax_ttl = \"100000h\"\n\n\
         [brokers.drill]\npreset = \"bearer\"\nsecret = \"f/broker\"\nupstream = \"http://127.0.0.1:{broker_port}\"\n\
         paths = [\"POST /v1/echo\"]\nconnect_timeout = \"2s\"\n\n\
         [secrets.\"f/broker\"]\nprovider = \"example\"\n\n[secrets.\"f/sts\"]\nprovider = \"example-sts\"\n\n\
         [secrets.\"f/probe\"]\nprovider = \"random\"\n\n",
        base_config("2s")
            .replace("max_attempts = 4", "max_attempts = 1000")
            .replace("retry_max = \"400ms\"", "retry_max = \"1s\""),
        example_plugin_config(
            env.dir.path(),
            &format!(", EXAMPLE_FAULTS = {:?}", faults_file.display().to_string())
        ),
        rustix::process::getuid().as_raw(),
    );
    for i in 0..SECRETS {
        config.push_str(&format!(
            "[secrets.\"{}\"]\nprovider = \"example\"\ngrace = \"1s\"\nconsumers = [\"file-{i:02}\"]\n\n\
             [consumers.file-{i:02}]\nkind = \"file\"\npath = \"out/{i:02}/key\"\n\n",
            name(i)
        ));
    }
    let base = std::fs::read_to_string(&env.config).unwrap();
    format!("{base}\n{config}")
}

/// `(version, rotation_state, last_error)` of a secret, from `GET /v1/admin/status`.
fn secret_state(env: &Env, name: &str) -> (i64, String, String) {
    let status = admin_json(env, "/v1/admin/status");
    let entry = status["secrets"]
        .as_array()
        .and_then(|s| s.iter().find(|e| e["name"] == name).cloned())
        .unwrap_or_default();
    (
        entry["version"].as_i64().unwrap_or(0),
        entry["rotation_state"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        entry["last_error"].as_str().unwrap_or_default().to_string(),
    )
}

fn admin_json(env: &Env, path: &str) -> serde_json::Value {
    match kit::request(&env.admin_socket(), "GET", path, None) {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// Fetches that need a durable write before their answer: a stored value for longer than its
/// lease is recorded for (each probe asks for more), and a credential issued per lease (a new
/// lease each time). Their statuses, and the body of the first that was not served.
fn probe_fetch(env: &Env) -> ([u16; 2], String) {
    static TTL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ttl = 3600 * (TTL.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
    let mut refused = String::new();
    let mut status = [0; 2];
    for (i, path) in [
        format!("/v1/secrets/f/probe?ttl={ttl}"),
        "/v1/secrets/f/sts?ttl=2".into(),
    ]
    .iter()
    .enumerate()
    {
        let (code, body) =
            kit::request(&env.agent_socket(), "GET", path, None).unwrap_or((0, String::new()));
        if code != 200 && refused.is_empty() {
            refused = body;
        }
        status[i] = code;
    }
    (status, refused)
}

/// The text the log gained since `from` bytes.
fn log_since(log: &Path, from: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_string()
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// The first line of `text` with `needle`, shortened.
fn line_with(text: &str, needle: &str) -> Option<String> {
    text.lines()
        .find(|l| l.contains(needle))
        .map(|l| l.chars().take(160).collect())
}

/// A tmpfs mounted on a directory for the store, unmounted at the end; None where mounting is
/// not allowed (not root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs the drill (only the faults of one part, when asked); the number of violations.
pub fn run(only: Option<&str>) -> usize {
    let part = |name: &str| only.is_none_or(|o| o == name);
    let started = Instant::now();
    println!("faults drill");
    let mut violations = Violations::default();
    let mut rows = Vec::new();
    let env = Env::new();
    let faults_file = upstream_dir(env.dir.path()).join("faults.json");
    let mut upstream_server = kit::FakeUpstream::start(0);
    // The store on a small file system of its own, to fill.
    let tmpfs = Tmpfs::mount(&env.dir.path().join("data"), "64m");
    std::fs::write(
        &env.config,
        config(&env, upstream_server.port, &faults_file),
    )
    .unwrap();
    let log = env.dir.path().join("daemons.log");
    let daemon = kit::start_daemon(&env, &log);
    let store = kit::open_db(&env.store);
    assert!(kit::first_versions(
        &store,
        SECRETS + 2,
        Duration::from_secs(60)
    ));

    if part("plugin") {
        rows.extend(plugin_faults(&env, &log, &faults_file, &mut violations));
        rows.push(answers_out_of_order(&env, &faults_file, &mut violations));
        rows.push(consumer_directory_removed(&env, &mut violations));
    }
    if part("store") {
        rows.extend(store_faults(&env, &log, tmpfs.is_some(), &mut violations));
    }
    if part("broker") {
        rows.push(broker_upstream_down(
            &env,
            &mut upstream_server,
            &mut violations,
        ));
        upstream_server.stop();
    }
    // The end state, then hygiene.
    let stored: Vec<(String, String)> = (0..SECRETS)
        .map(|i| (name(i), format!("out/{i:02}/key")))
        .collect();
    let (_, hygiene) = crate::checks::end_state(&env, daemon.id(), &stored, &[], &mut violations);
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || format!("the daemon exited {code:?}"));
    drop(store);
    drop(tmpfs);

    if let Some(row) = part("postgres")
        .then(|| postgres_connection_cut(&mut violations))
        .flatten()
    {
        rows.push(row);
    }

    print_table(&rows);
    println!("  {hygiene}");
    println!(
        "faults drill: {} faults, {} violations in {:.0} s",
        rows.len(),
        violations.count(),
        started.elapsed().as_secs_f64()
    );
    violations.count()
}

/// The plugin's faults, each on a rotation of its own secret: shown in `status` and the log,
/// and the secret rotates once the fault is cleared.
fn plugin_faults(
    env: &Env,
    log: &Path,
    faults_file: &Path,
    violations: &mut Violations,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, (fault, settings)) in PLUGIN_FAULTS.iter().enumerate() {
        let name = name(i);
        let (v0, ..) = secret_state(env, &name);
        let from = log_len(log);
        std::fs::write(faults_file, settings).unwrap();
        env.ok(&["rotate", &name, "--no-wait"], None);
        let mut error = String::new();
        let shown = kit::eventually(Duration::from_secs(60), || {
            error = secret_state(env, &name).2;
            !error.is_empty()
        });
        violations.check(shown, || format!("{fault}: no error in status"));
        let logged = log_since(log, from);
        violations.check(logged.contains(&name), || {
            format!("{fault}: nothing about {name} in the log")
        });
        std::fs::remove_file(faults_file).unwrap();
        let cleared = Instant::now();
        let recovered = kit::eventually(Duration::from_secs(120), || {
            let (v, state, _) = secret_state(env, &name);
            v == v0 + 1 && state == "done"
        });
        violations.check(recovered, || {
            format!("{fault}: {name} did not rotate once cleared")
        });
        rows.push(Row {
            fault: fault.to_string(),
            error: format!("status: {}", error.chars().take(120).collect::<String>()),
            recovery: recovered.then(|| cleared.elapsed()),
        });
    }
    rows
}

/// Answers out of order: several rotations in flight, each answer after a random wait.
fn answers_out_of_order(env: &Env, faults_file: &Path, violations: &mut Violations) -> Row {
    std::fs::write(faults_file, r#"{"jitter_ms": 400}"#).unwrap();
    let before: Vec<i64> = OUT_OF_ORDER
        .map(|i| secret_state(env, &name(i)).0)
        .collect();
    let t0 = Instant::now();
    for i in OUT_OF_ORDER {
        env.ok(&["rotate", &name(i), "--no-wait"], None);
    }
    let all_done = kit::eventually(Duration::from_secs(120), || {
        OUT_OF_ORDER.zip(&before).all(|(i, v0)| {
            let (v, state, _) = secret_state(env, &name(i));
            v == v0 + 1 && state == "done"
        })
    });
    violations.check(all_done, || {
        "answers out of order: rotations did not finish".into()
    });
    std::fs::remove_file(faults_file).unwrap();
    Row {
        fault: format!(
            "plugin: answers out of order ({} rotations at once)",
            OUT_OF_ORDER.len()
        ),
        error: "none expected: each answer matched by id".into(),
        recovery: all_done.then(|| t0.elapsed()),
    }
}

/// A consumer's target directory removed: made again at the next delivery.
fn consumer_directory_removed(env: &Env, violations: &mut Violations) -> Row {
    let target = name(PLUGIN_FAULTS.len());
    std::fs::remove_dir_all(
        env.dir
            .path()
            .join(format!("out/{:02}", PLUGIN_FAULTS.len())),
    )
    .unwrap();
    let (v0, ..) = secret_state(env, &target);
    let t0 = Instant::now();
    env.ok(&["rotate", &target, "--no-wait"], None);
    let redelivered = kit::eventually(Duration::from_secs(60), || {
        let (v, state, _) = secret_state(env, &target);
        v == v0 + 1
            && state == "done"
            && env
                .dir
                .path()
                .join(format!("out/{:02}/key", PLUGIN_FAULTS.len()))
                .exists()
    });
    violations.check(redelivered, || {
        "the removed consumer directory was not made again".into()
    });
    Row {
        fault: "consumer: target directory removed".into(),
        error: "none expected: the directory is made again (0755) at the next delivery".into(),
        recovery: redelivered.then(|| t0.elapsed()),
    }
}

/// The store locked by another process, then its file system full (when `small_fs`: the store
/// is on a tmpfs of its own).
fn store_faults(env: &Env, log: &Path, small_fs: bool, violations: &mut Violations) -> Vec<Row> {
    let mut rows = Vec::new();
    // The SQLite store locked by another process (this one): fetches that need a write fail
    // closed, then work again once the lock is gone.
    let locker = rusqlite::Connection::open(&env.store).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    rows.push(store_fault(
        env,
        log,
        "store: SQLite file locked by another process",
        violations,
        || {
            locker.execute_batch("ROLLBACK").unwrap();
        },
    ));
    drop(locker);

    // The store's file system full.
    if small_fs {
        let fill = env.dir.path().join("data/fill");
        let mut file = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        drop(file); // an unlinked file still open keeps its space
        rows.push(store_fault(
            env,
            log,
            "store: file system full",
            violations,
            || {
                std::fs::remove_file(&fill).unwrap();
            },
        ));
    } else {
        println!("  (store: file system full skipped: cannot mount a tmpfs here)");
    }
    rows
}

/// The broker's upstream refusing connections: 502, then answers again once it is back.
fn broker_upstream_down(
    env: &Env,
    upstream_server: &mut kit::FakeUpstream,
    violations: &mut Violations,
) -> Row {
    let port = upstream_server.port;
    let broker_call = || {
        kit::request(
            &env.dir.path().join("run/broker.sock"),
            "POST",
            "/v1/broker/drill/v1/echo",
            Some("{}"),
        )
        .unwrap_or((0, String::new()))
    };
    violations.check(broker_call().0 == 200, || {
        "the broker did not answer before the fault".into()
    });
    upstream_server.stop();
    let (status, body) = broker_call();
    violations.check(status == 502, || {
        format!("broker with its upstream down answered {status}")
    });
    *upstream_server = kit::FakeUpstream::start(port);
    let t0 = Instant::now();
    let back = kit::eventually(Duration::from_secs(60), || broker_call().0 == 200);
    violations.check(back, || {
        "the broker did not recover with its upstream".into()
    });
    Row {
        fault: "broker: upstream refuses connections".into(),
        error: format!(
            "agent got {status}: {}",
            body.trim().chars().take(110).collect::<String>()
        ),
        recovery: back.then(|| t0.elapsed()),
    }
}

/// The faults' table.
fn print_table(rows: &[Row]) {
    println!("  | fault | what showed it | back after clearing |");
    println!("  |---|---|---|");
    for r in rows {
        println!(
            "  | {} | {} | {} |",
            r.fault,
            r.error.replace('|', "/"),
            r.recovery.map_or("NOT RECOVERED".into(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            ))
        );
    }
}

/// A store fault held until a fetch that needs a write fails closed and `status` shows the
/// store's error; then `clear`, and the time until such fetches work again.
fn store_fault(
    env: &Env,
    log: &Path,
    fault: &str,
    violations: &mut Violations,
    clear: impl FnOnce(),
) -> Row {
    let from = log_len(log);
    let mut answer = ([0; 2], String::new());
    let closed = kit::eventually(Duration::from_secs(60), || {
        answer = probe_fetch(env);
        answer.0.iter().all(|s| *s != 200)
    });
    violations.check(closed && answer.0 == [503, 503], || {
        format!(
            "{fault}: fetches answered {:?}, not refused as unavailable (503)",
            answer.0
        )
    });
    let mut shown = String::new();
    let in_status = kit::eventually(Duration::from_secs(30), || {
        shown = admin_json(env, "/v1/admin/status")["store"]["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !shown.is_empty()
    });
    violations.check(in_status, || format!("{fault}: no store error in status"));
    let logged = line_with(&log_since(log, from), "could not be written");
    violations.check(logged.is_some(), || format!("{fault}: no error in the log"));
    clear();
    let t0 = Instant::now();
    let back = kit::eventually(Duration::from_secs(60), || probe_fetch(env).0 == [200, 200]);
    violations.check(back, || {
        let lines: Vec<String> = log_since(log, from).lines().map(str::to_string).collect();
        format!(
            "{fault}: fetches did not come back ({:?}); the log's last lines since the fault:\n{}",
            probe_fetch(env),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    });
    let cleared_in_status = kit::eventually(Duration::from_secs(30), || {
        admin_json(env, "/v1/admin/status")["store"]["error"].is_null()
    });
    violations.check(cleared_in_status, || {
        format!("{fault}: status still shows the error")
    });
    Row {
        fault: fault.to_string(),
        error: format!(
            "agent got {:?}; status: {}",
            answer.0,
            shown.chars().take(100).collect::<String>()
        ),
        recovery: back.then(|| t0.elapsed()),
    }
}

/// A scratch directory whose store is the PostgreSQL database at `url` (a short leader lease),
/// with the example plugin's `f/sts` and a `random` `f/probe` the drill's uid may fetch.
fn postgres_env(url: &str) -> Env {
    let env = Env::new();
    let written = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{}\n{}\n{}\n[[policy]]\nname = \"drill\"\nuids = [{}]\nsecrets = [\"f/*\"]\nmax_ttl = \"100000h\"\n\n\
             [secrets.\"f/sts\"]\nprovider = \"example-sts\"\n\n[secrets.\"f/probe\"]\nprovider = \"random\"\n",
            written.replace(
                "path = \"data/vault.db\"",
                &format!("url = {url:?}\nleader_lease = \"2s\"")
            ),
            base_config("2s"),
            example_plugin_config(env.dir.path(), ""),
            rustix::process::getuid().as_raw(),
        ),
    )
    .unwrap();
    env
}

/// A daemon leading a PostgreSQL store (`KEYWARDEN_TEST_POSTGRES_URL`) whose connections are
/// cut and refused for a while; None (and a note) without a server.
fn postgres_connection_cut(violations: &mut Violations) -> Option<Row> {
    let Ok(base) = std::env::var("KEYWARDEN_TEST_POSTGRES_URL") else {
        println!("  (postgres: connection cut skipped: KEYWARDEN_TEST_POSTGRES_URL is not set)");
        return None;
    };
    let db = format!("kw_drill_{}", std::process::id());
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([base.as_str(), "-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    psql(&format!("CREATE DATABASE {db}"));
    let env = postgres_env(&format!("{}/{db}", base.rsplit_once('/').unwrap().0));
    let log = env.dir.path().join("daemons.log");
    let daemon = kit::start_daemon(&env, &log);
    let leads = |env: &Env| {
        let s = admin_json(env, "/v1/admin/status");
        s["leadership"]["leader"]["pid"].as_u64() == Some(u64::from(daemon.id()))
    };
    violations.check(
        kit::eventually(Duration::from_secs(30), || {
            leads(&env) && probe_fetch(&env).0 == [200, 200]
        }),
        || "postgres: the daemon did not lead".into(),
    );
    let from = log_len(&log);
    psql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"));
    psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
    ));
    let mut answer = ([0; 2], String::new());
    let closed = kit::eventually(Duration::from_secs(30), || {
        answer = probe_fetch(&env);
        answer.0.iter().all(|s| *s != 200)
    });
    // Refused as unavailable (503), or cut off while the services restart as a follower.
    violations.check(
        closed && answer.0.iter().all(|s| [503, 0].contains(s)),
        || {
            format!(
                "postgres: fetches answered {:?}, not refused as unavailable (503): {}",
                answer.0, answer.1
            )
        },
    );
    let mut line = None;
    let logged = kit::eventually(Duration::from_secs(10), || {
        line = log_since(&log, from)
            .lines()
            .find(|l| l.contains("ERROR") || l.contains("WARN"))
            .map(|l| l.chars().take(120).collect::<String>());
        line.is_some()
    });
    violations.check(logged, || "postgres: nothing in the log".into());
    psql(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
    let t0 = Instant::now();
    let back = kit::eventually(Duration::from_secs(60), || {
        probe_fetch(&env).0 == [200, 200] && leads(&env)
    });
    violations.check(back, || {
        let lines: Vec<String> = log_since(&log, from).lines().map(str::to_string).collect();
        format!(
            "postgres: the daemon did not lead and serve again; the log's last lines:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    });
    let recovery = back.then(|| t0.elapsed());
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || {
        format!("postgres: the daemon exited {code:?}")
    });
    crate::checks::audit_verifies(&env, violations);
    psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    Some(Row {
        fault: "postgres: the leader's connections cut and refused".into(),
        error: format!(
            "agent got {:?}; log: {}",
            answer.0,
            line.unwrap_or_default()
        ),
        recovery,
    })
}
