//! The crash drill: secrets of the Python example plugin, each with a file consumer, rotating on
//! schedules while agents fetch (stored values and credentials issued per lease); the daemon is
//! SIGKILLed at random instants (during scheduled rotations, then during a `rotate-all
//! --assume-compromise`, then during `rekey`s), then stopped at every crash point of a
//! rotation, an incident, a lease issue and a rekey, and restarted each time. At the end, with
//! the schedules pushed out and everything settled, it checks what a team would: every secret
//! has exactly one live upstream credential and it is the current version, every consumer
//! holds it, no issued credential is live without an open lease, every value an agent was given
//! has its audit row, and `audit verify` passes. Then the hygiene sweep.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::{base_config, example_plugin_config};

use crate::kit::{self, Agents, Daemon, Rng, Violations};

/// The drill's size.
pub struct Options {
    pub secrets: usize,
    pub kills: usize,
    /// The longest a daemon runs before it is killed (each kill falls uniformly in it).
    pub max_life: Duration,
    pub seed: u64,
}

/// Secrets issued per lease (`example-sts`), fetched by the agents beside the stored ones.
const ISSUED: usize = 4;

/// The crash points and what makes the daemon pass through each.
const CRASH_POINTS: &[(&str, Trigger)] = &[
    ("rotation.created", Trigger::Rotate),
    ("rotation.verified", Trigger::Rotate),
    ("rotation.promoted", Trigger::Rotate),
    ("rotation.pushed", Trigger::Rotate),
    ("rotation.draining", Trigger::Rotate),
    ("incident.opened", Trigger::Incident),
    ("lease.issue-journaled", Trigger::Agents),
    ("lease.issued", Trigger::Agents),
    ("lease.granted", Trigger::Agents),
    ("fetch.served", Trigger::Agents),
    ("rekey.half-rewrapped", Trigger::Rekey),
    ("rekey.before-commit", Trigger::Rekey),
    ("rekey.committed", Trigger::Rekey),
];

#[derive(Clone, Copy)]
enum Trigger {
    /// `keywarden rotate` of a secret, again and again until the daemon stops.
    Rotate,
    /// `rotate-all --assume-compromise`.
    Incident,
    /// The agents' own fetches.
    Agents,
    /// `keywarden rekey`.
    Rekey,
}

fn stored_name(i: usize) -> String {
    format!("drill/{i:03}")
}

fn issued_name(i: usize) -> String {
    format!("drill/sts-{i}")
}

/// The config: schedules of 15–44 s spread over the secrets (so rotations are always under way)
/// or, for the final settling, an hour.
fn config(env: &Env, secrets: usize, schedules: bool) -> String {
    let mut config = format!(
        "{}\n{}\n[[policy]]\nname = \"drill\"\nuids = [{}]\nsecrets = [\"drill/*\"]\nmax_ttl = \"1h\"\n\n",
        base_config("5s"),
        example_plugin_config(env.dir.path(), ""),
        rustix::process::getuid().as_raw()
    );
    for i in 0..secrets {
        let every = if schedules {
            format!("{}s", 15 + i % 30)
        } else {
            "1h".to_string()
        };
        config.push_str(&format!(
            "[secrets.\"{}\"]\nprovider = \"example\"\nrotate_every = \"{every}\"\ngrace = \"1s\"\nconsumers = [\"file-{i:03}\"]\n\n\
             [consumers.file-{i:03}]\nkind = \"file\"\npath = \"out/{i:03}\"\n\n",
            stored_name(i)
        ));
    }
    for i in 0..ISSUED {
        config.push_str(&format!(
            "[secrets.\"{}\"]\nprovider = \"example-sts\"\n\n",
            issued_name(i)
        ));
    }
    let base = std::fs::read_to_string(&env.config).unwrap();
    let base = base.split("\n# drill\n").next().unwrap().to_string();
    format!("{base}\n# drill\n{config}")
}

/// Background CLI commands the drill started; reaped as they end.
#[derive(Default)]
struct Commands(Vec<Child>);

impl Commands {
    fn start(&mut self, env: &Env, args: &[&str]) {
        let child = env
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.0.push(child);
    }

    fn reap(&mut self) {
        self.0.retain_mut(|c| c.try_wait().unwrap().is_none());
    }

    fn kill_all(&mut self) {
        for mut c in self.0.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the kills at random instants did.
struct Kills {
    /// Kills that came before the daemon answered its admin socket.
    before_ready: usize,
    took: Duration,
}

/// Runs the drill; the number of violations.
pub fn run(o: &Options) -> usize {
    let started = Instant::now();
    println!(
        "crash drill: {} secrets (+{ISSUED} issued per lease), {} kills, daemon life up to {:?}, seed {}",
        o.secrets, o.kills, o.max_life, o.seed
    );
    let rng = Rng::new(o.seed);
    let mut violations = Violations::default();
    let env = Env::new();
    std::fs::write(&env.config, config(&env, o.secrets, true)).unwrap();
    let log = env.dir.path().join("daemons.log");
    let names: Vec<String> = (0..o.secrets)
        .map(stored_name)
        .chain((0..ISSUED).map(issued_name))
        .collect();

    // First versions of everything, then the agents.
    let daemon = kit::start_daemon(&env, &log);
    let store = kit::open_db(&env.store);
    assert!(
        kit::first_versions(&store, o.secrets, Duration::from_secs(300)),
        "the first versions were not all created"
    );
    println!(
        "  {} first versions in {:.1} s",
        o.secrets,
        started.elapsed().as_secs_f64()
    );
    let agents = Agents::start(4, env.agent_socket(), names.clone(), o.seed);
    let mut drill = Crashes {
        o,
        env: &env,
        log: &log,
        rng,
        commands: Commands::default(),
    };
    let (daemon, kills) = drill.kill_at_random(daemon);
    let (daemon, points_hit) = drill.stop_at_every_crash_point(daemon, &mut violations);
    kit::kill9(daemon);
    drill.commands.kill_all();
    let (unanswered, refused) = (agents.unanswered.clone(), agents.failed.clone());
    let fetched = agents.stop();

    let settle_started = Instant::now();
    let daemon = settle(o, &env, &log, &store, &mut violations);
    let settle_time = settle_started.elapsed();
    let upstream = kit::open_db(&env.upstream_db());
    no_issued_credential_without_a_lease(&store, &upstream, &mut violations);
    let audited = every_value_handed_out_audited(&store, &fetched, &mut violations);

    let tally = Tally::read(&log, &store, &upstream);

    // The stored secrets, the audit chain and hygiene, while the daemon still runs (its
    // sockets and limits are part of it).
    let stored: Vec<(String, String)> = (0..o.secrets)
        .map(|i| (stored_name(i), format!("out/{i:03}")))
        .collect();
    let handed_out: Vec<String> = fetched.iter().map(|f| f.value.clone()).collect();
    let (checked, hygiene) =
        crate::checks::end_state(&env, daemon.id(), &stored, &handed_out, &mut violations);
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || {
        format!("the last daemon exited {code:?}")
    });

    println!(
        "  kills: {} ({} before the daemon answered) in {:.0} s, then {points_hit} of {} crash points",
        o.kills,
        kills.before_ready,
        kills.took.as_secs_f64(),
        CRASH_POINTS.len()
    );
    tally.print();
    println!(
        "  agents: {} values handed out ({} distinct leases), {} requests unanswered while the daemon was down, {} refused",
        fetched.len(),
        fetched
            .iter()
            .map(|f| &f.lease_id)
            .collect::<HashSet<_>>()
            .len(),
        unanswered.load(std::sync::atomic::Ordering::Relaxed),
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "  settled in {:.1} s; checked {} secrets, {} issued leases, {} audit rows",
        settle_time.as_secs_f64(),
        checked,
        tally.issued,
        audited
    );
    println!("  {hygiene}");
    println!(
        "crash drill: {} violations in {:.0} s",
        violations.count(),
        started.elapsed().as_secs_f64()
    );
    violations.count()
}

/// What the drill made happen, counted from the daemons' log and the stores.
struct Tally {
    resumed: usize,
    incidents_resumed: usize,
    rotations_done: i64,
    emergency_done: i64,
    rekeys: i64,
    issued: i64,
}

impl Tally {
    /// What the daemons resumed and completed, two lines of the drill's report.
    fn print(&self) {
        println!(
            "  resumed: {} rotations, {} incident runs; {} rekeys committed",
            self.resumed, self.incidents_resumed, self.rekeys
        );
        println!(
            "  rotations done: {} ({} emergency); {} credentials issued per lease",
            self.rotations_done, self.emergency_done, self.issued
        );
    }

    fn read(log: &Path, store: &rusqlite::Connection, upstream: &rusqlite::Connection) -> Tally {
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        Tally {
            resumed: log_text.matches("resuming rotation").count(),
            incidents_resumed: log_text
                .matches("resuming an unfinished compromise run")
                .count(),
            rotations_done: kit::one(store, "SELECT count(*) FROM rotations WHERE state = 'done'"),
            emergency_done: kit::one(
                store,
                "SELECT count(*) FROM rotations WHERE state = 'done' AND emergency = 1",
            ),
            rekeys: kit::one(store, "SELECT root_generation FROM vault") - 1,
            issued: kit::one(upstream, "SELECT count(*) FROM creds WHERE issued = 1"),
        }
    }
}

/// The daemon's kills and crash points, and what they share.
struct Crashes<'a> {
    o: &'a Options,
    env: &'a Env,
    log: &'a Path,
    rng: Rng,
    /// CLI commands started in the background (an incident, rekeys).
    commands: Commands,
}

impl Crashes<'_> {
    /// Kills the daemon at random instants and starts it again, `o.kills` times: during scheduled
    /// rotations, then during a `rotate-all --assume-compromise`, then during `rekey`s. Returns the
    /// daemon last started.
    fn kill_at_random(&mut self, mut daemon: Daemon) -> (Daemon, Kills) {
        let (o, env, log) = (self.o, self.env, self.log);
        let incident_at = o.kills * 2 / 5;
        let rekeys_from = o.kills * 7 / 10;
        let mut before_ready = 0;
        let started = Instant::now();
        for k in 0..o.kills {
            if k == incident_at {
                self.commands.start(
                    env,
                    &[
                        "rotate-all",
                        "--assume-compromise",
                        "--yes",
                        "--json",
                        "--concurrency",
                        "32",
                    ],
                );
            }
            if k >= rekeys_from && k % 10 == 0 {
                self.commands.start(env, &["rekey"]);
            }
            let life = Duration::from_millis(self.rng.below(o.max_life.as_millis() as u64 + 1));
            std::thread::sleep(life);
            if !matches!(
                kit::request(&env.admin_socket(), "GET", "/v1/admin/status", None),
                Ok((200, _))
            ) {
                before_ready += 1;
            }
            kit::kill9(daemon);
            self.commands.reap();
            daemon = kit::spawn_daemon(env, log, None);
            if (k + 1) % 100 == 0 {
                println!(
                    "  {} kills in {:.0} s",
                    k + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let took = started.elapsed();
        (daemon, Kills { before_ready, took })
    }

    /// Starts the daemon armed at each crash point in turn and makes it pass there; returns the
    /// daemon last started and how many points stopped it.
    fn stop_at_every_crash_point(
        &mut self,
        mut daemon: Daemon,
        violations: &mut Violations,
    ) -> (Daemon, usize) {
        let (o, env, log) = (self.o, self.env, self.log);
        let mut points_hit = 0;
        for (point, trigger) in CRASH_POINTS {
            kit::kill9(daemon);
            self.commands.kill_all();
            let mut armed = kit::spawn_daemon(env, log, Some(&format!("{point}=return")));
            if kit::wait_ready(env, &mut armed, Duration::from_secs(60)) {
                match trigger {
                    Trigger::Incident => self.commands.start(
                        env,
                        &["rotate-all", "--assume-compromise", "--yes", "--json"],
                    ),
                    Trigger::Rekey => self.commands.start(env, &["rekey"]),
                    Trigger::Rotate | Trigger::Agents => {}
                }
            }
            let hit = kit::eventually(Duration::from_secs(60), || {
                if armed.try_wait().is_some() {
                    return true;
                }
                if let Trigger::Rotate = trigger {
                    let name = stored_name(self.rng.below(o.secrets as u64) as usize);
                    let _ = env.run(&["rotate", &name, "--no-wait"], None);
                }
                false
            });
            let aborted = hit
                && armed
                    .try_wait()
                    .is_some_and(|s| std::os::unix::process::ExitStatusExt::signal(&s).is_some());
            violations.check(aborted, || format!("crash point {point} was not reached"));
            points_hit += usize::from(aborted);
            kit::kill9(armed);
            self.commands.reap();
            daemon = kit::spawn_daemon(env, log, None);
        }
        (daemon, points_hit)
    }
}

/// Pushes the schedules out of the way and starts the daemon until every rotation, incident
/// and lease has finished (at most 300 s); returns that daemon.
fn settle(
    o: &Options,
    env: &Env,
    log: &Path,
    store: &rusqlite::Connection,
    violations: &mut Violations,
) -> Daemon {
    std::fs::write(&env.config, config(env, o.secrets, false)).unwrap();
    kit::push_schedules_an_hour_out(env);
    let daemon = kit::start_daemon(env, log);
    let settled = kit::eventually(Duration::from_secs(300), || {
        kit::rotations_in_flight(store) == 0
            && kit::one(
                store,
                "SELECT count(*) FROM incidents WHERE finished_at IS NULL AND closed_by IS NULL",
            ) == 0
            && kit::one(store, "SELECT count(*) FROM leases WHERE ended_at IS NULL") == 0
    });
    violations.check(settled, || {
        format!(
            "not settled after 300 s: {:?}",
            kit::rows(
                store,
                "SELECT state, count(*) FROM rotations WHERE state NOT IN ('done', 'failed', 'rolled-back') GROUP BY state"
            )
        )
    });
    daemon
}

/// No credential issued for a lease is live upstream without that lease open.
fn no_issued_credential_without_a_lease(
    store: &rusqlite::Connection,
    upstream: &rusqlite::Connection,
    violations: &mut Violations,
) {
    let open: HashSet<String> = kit::rows(store, "SELECT id FROM leases WHERE ended_at IS NULL")
        .into_iter()
        .map(|r| r.0)
        .collect();
    let orphans: Vec<String> = kit::rows(
        upstream,
        "SELECT key_id, rotation_id FROM creds WHERE issued = 1 AND status = 'active'",
    )
    .into_iter()
    .filter(|(_, lease)| !open.contains(lease))
    .map(|r| r.0)
    .collect();
    violations.check(orphans.is_empty(), || {
        format!("issued credentials live without a lease: {orphans:?}")
    });
}

/// Every value handed out has its audit row (its lease's `fetch.allowed`, same version);
/// returns how many such rows there are.
fn every_value_handed_out_audited(
    store: &rusqlite::Connection,
    fetched: &[kit::Fetched],
    violations: &mut Violations,
) -> usize {
    let audited: HashMap<String, String> = kit::rows(
        store,
        "SELECT json_extract(detail, '$.lease_id'), ifnull(json_extract(detail, '$.version'), '') \
         FROM audit WHERE action = 'fetch.allowed'",
    )
    .into_iter()
    .collect();
    let unaudited: Vec<&kit::Fetched> = fetched
        .iter()
        .filter(|f| {
            let version = f.version.map(|v| v.to_string()).unwrap_or_default();
            audited.get(&f.lease_id) != Some(&version)
        })
        .collect();
    violations.check(unaudited.is_empty(), || {
        format!(
            "{} values handed out without their audit row, e.g. {:?}",
            unaudited.len(),
            unaudited
                .iter()
                .take(3)
                .map(|f| (&f.name, f.version, &f.lease_id))
                .collect::<Vec<_>>()
        )
    });
    audited.len()
}
