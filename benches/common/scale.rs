//! The daemon at scale: many `random` secrets (default config). The time the first start takes
//! to give every secret its first version, the write-ahead log and database size after it and
//! after a clean stop, the time a second start takes to a serving agent socket (the KDF is the
//! benchmark's weak one, so this is the daemon's own start-up), and the resident memory once it
//! has settled and around a `status` of every secret.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::wait_for;

/// What [`run`] measures (seconds, MB).
pub struct Figures {
    pub first: f64,
    pub wal_running: f64,
    pub db_running: f64,
    pub wal_stopped: f64,
    pub db_stopped: f64,
    pub startup: f64,
    pub rss: f64,
    pub status: f64,
    pub rss_during: f64,
    pub rss_after: f64,
}

/// Runs the daemon over `secrets` secrets as the module says.
pub fn run(secrets: usize) -> Figures {
    let env = Env::new();
    let mut config = std::fs::read_to_string(&env.config).unwrap();
    config.push_str("[agent]\nsocket = \"run/agent.sock\"\nadmin_socket = \"run/admin.sock\"\n");
    for i in 0..secrets {
        let _ = write!(
            config,
            "\n[secrets.\"scale/s{i}\"]\nprovider = \"random\"\n"
        );
    }
    std::fs::write(&env.config, config).unwrap();

    let start = Instant::now();
    let daemon = spawn(&env);
    // Polled once a second: `list` reads every secret, and polling it faster would slow the
    // daemon being measured.
    super::wait_first_versions(&env, secrets);
    let first = start.elapsed().as_secs_f64();
    let (wal_running, db_running) = sizes(&env.store);
    stop(daemon);
    let (wal_stopped, db_stopped) = sizes(&env.store);

    let start = Instant::now();
    let daemon = spawn(&env);
    let agent = env.dir.path().join("run/agent.sock");
    wait_for("the agent socket", Duration::from_secs(1800), || {
        answers(&agent).then_some(())
    });
    let startup = start.elapsed().as_secs_f64();
    // Settle: let start-up work (consumers, schedules) finish before reading memory.
    std::thread::sleep(Duration::from_secs(5));
    let rss = keywarden_testkit::proc::rss_mb(daemon.id());
    // A status of every secret is the largest request an operator makes: its memory is
    // handed back within the daemon's release period (10 s).
    let status = Instant::now();
    assert!(env.run(&["status", "--json"], None).status.success());
    let status = status.elapsed().as_secs_f64();
    let rss_during = keywarden_testkit::proc::rss_mb(daemon.id());
    std::thread::sleep(Duration::from_secs(11));
    let rss_after = keywarden_testkit::proc::rss_mb(daemon.id());
    stop(daemon);

    Figures {
        first,
        wal_running,
        db_running,
        wal_stopped,
        db_stopped,
        startup,
        rss,
        status,
        rss_during,
        rss_after,
    }
}

/// `keywarden serve` on the environment, quiet (the testkit's helper gives up after 30 s, and a
/// first start of this many secrets takes longer).
fn spawn(env: &Env) -> std::process::Child {
    env.cmd()
        .args(["serve", "--init"])
        .env("KEYWARDEN_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut daemon: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert!(daemon.wait().unwrap().success());
}

/// Whether the agent socket answers a health request.
fn answers(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head[8..] == *b" 200"
}

fn sizes(store: &Path) -> (f64, f64) {
    let mb = |p: &Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    let mut wal = store.as_os_str().to_owned();
    wal.push("-wal");
    (mb(Path::new(&wal)), mb(store))
}
