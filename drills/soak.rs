//! The soak drill: for `minutes`, clients fetch back to back and send brokered requests, while
//! ten secrets of the Python example plugin rotate every 3 s (the broker's key every 5 s),
//! watchers long-poll for new versions, and half-way through a `rotate-all --assume-compromise`
//! runs. No legitimate request may fail, no fetch that started after a watcher was told of a
//! version may return an older one, and the daemon's resident memory and open descriptors stay
//! flat (printed as a series). Then the end-state checks and the hygiene sweep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::{base_config, example_plugin_config};

use crate::kit::{self, Rng, Violations};

const SECRETS: usize = 10;

fn name(i: usize) -> String {
    format!("s/{i:02}")
}

/// What the clients saw: per secret, fetches (version, when started) and what watchers were
/// told (version, when).
#[derive(Default)]
struct Seen {
    fetched: HashMap<String, Vec<(i64, Instant)>>,
    told: HashMap<String, Vec<(i64, Instant)>>,
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Runs the drill; the number of violations.
pub fn run(minutes: u64, clients: usize) -> usize {
    let started = Instant::now();
    let length = Duration::from_secs(minutes * 60);
    println!("soak drill: {minutes} min, {clients} fetching clients, {clients} broker clients");
    let mut violations = Violations::default();
    let env = Env::new();
    let mut upstream = kit::FakeUpstream::start(0);
    write_config(&env, upstream.port);
    let log = env.dir.path().join("daemons.log");
    let daemon = kit::start_daemon(&env, &log);
    let store = kit::open_db(&env.store);
    assert!(kit::first_versions(
        &store,
        SECRETS + 1,
        Duration::from_secs(60)
    ));

    let load = Load::start(&env, clients);
    let series = soak(&env, &load, daemon.id(), length, &mut violations);
    let (stale, told_count) = check_load(&load, &series, &mut violations);
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || {
        format!("the daemon exited {code:?} at its stop")
    });
    // Every brokered request has its audit row (a clean stop writes the last ones); one that
    // failed may have one or not.
    let rows = kit::one(
        &store,
        "SELECT count(*) FROM audit WHERE action = 'broker.request'",
    ) as u64;
    let answered = load.brokered.load(Ordering::Relaxed);
    let failed = load.broker_failures.lock().unwrap().len() as u64;
    violations.check(rows >= answered && rows <= answered + failed, || {
        format!("{rows} broker.request rows for {answered} brokered requests answered and {failed} failed")
    });
    let (hygiene, rotations) = settle_and_sweep(&env, &store, &log, &mut violations);
    upstream.stop();

    println!("  | s | RSS MB | open fds | fetches | brokered |");
    println!("  |---|---|---|---|---|");
    for (s, rss, fds, f, b) in &series {
        println!("  | {s} | {rss:.1} | {fds} | {f} | {b} |");
    }
    let secs = series.last().unwrap().0.max(1) as f64;
    println!(
        "  {} fetches ({:.0}/s) and {} brokered requests ({:.0}/s), {} and {} failed; {rotations} rotations done; watchers told {told_count} new versions, {stale} stale answers",
        load.fetches.load(Ordering::Relaxed),
        load.fetches.load(Ordering::Relaxed) as f64 / secs,
        load.brokered.load(Ordering::Relaxed),
        load.brokered.load(Ordering::Relaxed) as f64 / secs,
        load.fetch_failures.lock().unwrap().len(),
        load.broker_failures.lock().unwrap().len()
    );
    println!("  audit: {rows} broker.request rows");
    println!("  {hygiene}");
    println!(
        "soak drill: {} violations in {:.0} s",
        violations.count(),
        started.elapsed().as_secs_f64()
    );
    violations.count()
}

/// One sample of the series: seconds into the soak, the daemon's resident memory (MB) and open
/// descriptors, fetches and brokered requests so far.
type Sample = (u64, f64, usize, u64, u64);

/// Runs `load` against the daemon (`pid`) for `length`, sampling it twenty times, with a
/// `rotate-all --assume-compromise` half-way that must finish cleanly; stops the load.
fn soak(
    env: &Env,
    load: &Load,
    pid: u32,
    length: Duration,
    violations: &mut Violations,
) -> Vec<Sample> {
    let every = (length / 20).max(Duration::from_secs(5));
    let mut series = Vec::new();
    let mut incident = None;
    let soak_started = Instant::now();
    let sample = || {
        (
            soak_started.elapsed().as_secs(),
            keywarden_testkit::proc::rss_mb(pid),
            open_fds(pid),
            load.fetches.load(Ordering::Relaxed),
            load.brokered.load(Ordering::Relaxed),
        )
    };
    while soak_started.elapsed() < length {
        series.push(sample());
        if incident.is_none() && soak_started.elapsed() >= length / 2 {
            let cmd = env.cmd();
            incident = Some(std::thread::spawn(move || {
                keywarden_testkit::run_with(
                    cmd,
                    &["rotate-all", "--assume-compromise", "--yes", "--json"],
                    None,
                )
            }));
        }
        std::thread::sleep(every.min(length.saturating_sub(soak_started.elapsed())));
    }
    load.stop();
    series.push(sample());
    let incident = incident.map(|t| t.join().unwrap());
    violations.check(
        incident.as_ref().is_some_and(|o| o.status.success()),
        || {
            format!(
                "the incident did not finish cleanly: {:?}",
                incident.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            )
        },
    );
    series
}

/// No failed request, no stale answer, memory and descriptors flat over `series`; returns the
/// stale answers and how many new versions watchers were told of.
fn check_load(load: &Load, series: &[Sample], violations: &mut Violations) -> (usize, usize) {
    let fetch_failures = load.fetch_failures.lock().unwrap();
    let broker_failures = load.broker_failures.lock().unwrap();
    violations.check(fetch_failures.is_empty(), || {
        format!(
            "{} fetches failed, e.g. {:?}",
            fetch_failures.len(),
            &fetch_failures[..fetch_failures.len().min(3)]
        )
    });
    violations.check(broker_failures.is_empty(), || {
        format!(
            "{} brokered requests failed, e.g. {:?}",
            broker_failures.len(),
            &broker_failures[..broker_failures.len().min(3)]
        )
    });
    let (stale, told_count) = stale_answers(&load.seen.lock().unwrap());
    violations.check(stale == 0, || {
        format!("{stale} fetches returned a version older than one a watcher had been told of")
    });
    // Flat: the last sample against the first after the warm-up.
    let steady = &series[1.min(series.len() - 1)..];
    let (first, last) = (steady[0], steady[steady.len() - 1]);
    violations.check(last.1 <= first.1 * 1.25 + 10.0, || {
        format!(
            "resident memory grew from {:.1} MB to {:.1} MB",
            first.1, last.1
        )
    });
    violations.check(last.2 <= first.2 + 16, || {
        format!("open descriptors grew from {} to {}", first.2, last.2)
    });
    (stale, told_count)
}

/// Starts the daemon again with the schedules pushed out (hourly), waits for the rotations in
/// flight to settle, then the end-state checks and the hygiene sweep; returns the sweep's
/// summary and the rotations done.
fn settle_and_sweep(
    env: &Env,
    store: &rusqlite::Connection,
    log: &std::path::Path,
    violations: &mut Violations,
) -> (String, i64) {
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config
            .replace("rotate_every = \"3s\"", "rotate_every = \"1h\"")
            .replace("rotate_every = \"5s\"", "rotate_every = \"1h\""),
    )
    .unwrap();
    kit::push_schedules_an_hour_out(env);
    let daemon = kit::start_daemon(env, log);
    let settled = kit::eventually(Duration::from_secs(60), || {
        kit::rotations_in_flight(store) == 0
    });
    violations.check(settled, || "rotations did not settle".into());
    let stored: Vec<(String, String)> = (0..SECRETS)
        .map(|i| (name(i), format!("out/{i:02}")))
        .collect();
    let (_, hygiene) = crate::checks::end_state(env, daemon.id(), &stored, &[], violations);
    let rotations = kit::one(store, "SELECT count(*) FROM rotations WHERE state = 'done'");
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || format!("the daemon exited {code:?}"));
    (hygiene, rotations)
}

/// Ten secrets rotating every 3 s with a file consumer each, and a bearer broker (upstream on
/// `upstream_port`) whose key rotates every 5 s; a policy for this uid over both.
fn write_config(env: &Env, upstream_port: u16) {
    let mut config = format!(
        "{}\nbroker_socket = \"run/broker.sock\"\n\n{}\n\
         [[policy]]\nname = \"soak\"\nuids = [{}]\nsecrets = [\"s/*\"]\nbrokers = [\"soak\"]\nmax_ttl = \"1h\"\n\n\
         [brokers.soak]\npreset = \"bearer\"\nsecret = \"s/broker\"\nupstream = \"http://127.0.0.1:{}\"\n\
         paths = [\"POST /v1/echo\"]\n\n\
         [secrets.\"s/broker\"]\nprovider = \"example\"\nrotate_every = \"5s\"\ngrace = \"1s\"\n\n",
        base_config("5s"),
        example_plugin_config(env.dir.path(), ""),
        rustix::process::getuid().as_raw(),
        upstream_port,
    );
    for i in 0..SECRETS {
        config.push_str(&format!(
            "[secrets.\"{}\"]\nprovider = \"example\"\nrotate_every = \"3s\"\ngrace = \"1s\"\nconsumers = [\"file-{i:02}\"]\n\n\
             [consumers.file-{i:02}]\nkind = \"file\"\npath = \"out/{i:02}\"\n\n",
            name(i)
        ));
    }
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
}

/// The clients: fetchers, senders of brokered requests and a watcher per secret, each on a
/// thread of its own until stopped.
struct Load {
    halt: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    fetches: Arc<AtomicU64>,
    fetch_failures: Arc<Mutex<Vec<String>>>,
    brokered: Arc<AtomicU64>,
    broker_failures: Arc<Mutex<Vec<String>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Load {
    /// `clients` fetchers and as many brokered-request senders, and the watchers.
    fn start(env: &Env, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (fetches, fetch_failures) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (brokered, broker_failures) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let mut threads = Vec::new();
        for c in 0..clients {
            let (halt, seen, count, failures, socket) = (
                stop.clone(),
                seen.clone(),
                fetches.clone(),
                fetch_failures.clone(),
                env.agent_socket(),
            );
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng::new(c as u64 + 1);
                while !halt.load(Ordering::Relaxed) {
                    let secret = name(rng.below(SECRETS as u64) as usize);
                    let at = Instant::now();
                    match kit::request(&socket, "GET", &format!("/v1/secrets/{secret}?ttl=2"), None)
                    {
                        Ok((200, body)) => {
                            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                            let version = v["version"].as_i64().unwrap();
                            seen.lock()
                                .unwrap()
                                .fetched
                                .entry(secret)
                                .or_default()
                                .push((version, at));
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("{secret}: {other:?}")),
                    }
                }
            }));
            let (halt, count, failures, socket) = (
                stop.clone(),
                brokered.clone(),
                broker_failures.clone(),
                env.dir.path().join("run/broker.sock"),
            );
            threads.push(std::thread::spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    match kit::request(&socket, "POST", "/v1/broker/soak/v1/echo", Some("{}")) {
                        Ok((200, _)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            }));
        }
        // One watcher per secret, long-polling for the next version.
        for i in 0..SECRETS {
            let (halt, seen, socket) = (stop.clone(), seen.clone(), env.agent_socket());
            threads.push(std::thread::spawn(move || {
                let secret = name(i);
                let mut version = 0;
                while !halt.load(Ordering::Relaxed) {
                    let path = format!(
                        "/v1/secrets/{secret}?ttl=2&min_version={}&wait=5",
                        version + 1
                    );
                    if let Ok((200, body)) = kit::request(&socket, "GET", &path, None) {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                        version = v["version"].as_i64().unwrap();
                        seen.lock()
                            .unwrap()
                            .told
                            .entry(secret.clone())
                            .or_default()
                            .push((version, Instant::now()));
                    }
                }
            }));
        }
        Load {
            halt: stop,
            seen,
            fetches,
            fetch_failures,
            brokered,
            broker_failures,
            threads: Mutex::new(threads),
        }
    }

    /// Stops every client and waits for it.
    fn stop(&self) {
        self.halt.store(true, Ordering::Relaxed);
        for t in self.threads.lock().unwrap().drain(..) {
            t.join().unwrap();
        }
    }
}

/// Fetches that returned a version older than one a watcher had been told of before the
/// fetch started, and how many versions watchers were told of.
fn stale_answers(seen: &Seen) -> (usize, usize) {
    let mut stale = 0;
    let mut told_count = 0;
    for (secret, told) in &seen.told {
        told_count += told.len();
        for (version, at) in seen.fetched.get(secret).into_iter().flatten() {
            let newest_told = told.iter().filter(|(_, t)| t < at).map(|(v, _)| *v).max();
            if newest_told.is_some_and(|n| *version < n) {
                stale += 1;
            }
        }
    }
    (stale, told_count)
}
