//! The daemon as a systemd service: `Type=notify` readiness, reloading and stopping (through a
//! `NOTIFY_SOCKET` the test listens on, as systemd does), SIGHUP reloading the config (a bad one
//! refused, the running one kept), and the unit files checked by `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::Env;

/// The next notification the daemon sent (a `KEY=VALUE` per line), waiting up to `timeout`.
fn next_message(socket: &UnixDatagram, timeout: Duration) -> String {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification from the daemon");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn signal(pid: u32, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn the_daemon_notifies_systemd_and_sighup_reloads_its_config_or_keeps_it() {
    let policy = "[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\n";
    let base = format!("{}\n{policy}", common::daemon::base_config("5s"));
    let env = Env::with_config(&format!(
        "{base}\n[secrets.\"app/first\"]\nprovider = \"random\"\n"
    ));
    env.ok(&["init"], None);
    let notify_path = env.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let daemon = env.start_daemon_with(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    // READY=1 comes once the sockets answer (start_daemon has already seen the admin one).
    let ready = next_message(&notify, Duration::from_secs(20));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    common::daemon::wait_for("the first secret", Duration::from_secs(20), || {
        let (code, _) = common::curl(&env.agent_socket(), "GET", "/v1/secrets/app/first", &[]);
        (code == 200).then_some(())
    });
    // The daemon holding the store's lock is its one leader, and status says so.
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--json"], None)).unwrap();
    assert_eq!(
        status["leadership"]["leader"]["pid"],
        daemon.pid(),
        "{status}"
    );
    let screen = env.ok(&["status"], None);
    assert!(
        screen.contains(&format!("pid {} (it holds the store's lock)", daemon.pid())),
        "{screen}"
    );

    // SIGHUP with a new secret in the file: it is served, without a passphrase or a restart.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{config}\n[secrets.\"app/second\"]\nprovider = \"random\"\n"),
    )
    .unwrap();
    // A client fetching throughout: the sockets stay open across the reload, so a connection
    // made meanwhile waits for the next run instead of being refused.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (stop, socket) = (stop.clone(), env.agent_socket());
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match common::curl(&socket, "GET", "/v1/secrets/app/first", &[]) {
                    (200, _) => served += 1,
                    other => failed.push(other),
                }
            }
            (served, failed)
        })
    };
    signal(daemon.pid(), "HUP");
    let reloading = next_message(&notify, Duration::from_secs(20));
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let ready = next_message(&notify, Duration::from_secs(20));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    let body = common::daemon::wait_for("the new secret", Duration::from_secs(20), || {
        let (code, body) = common::curl(&env.agent_socket(), "GET", "/v1/secrets/app/second", &[]);
        (code == 200).then_some(body)
    });
    assert!(body.contains("\"version\":1"), "{body}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = client.join().unwrap();
    assert!(served > 0);
    assert!(failed.is_empty(), "refused during the reload: {failed:?}");

    // SIGHUP with a broken file: refused, named in the log, and the daemon goes on as it was.
    let good = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{good}\n[secrets.\"app/third\"]\nprovder = \"random\"\n"),
    )
    .unwrap();
    signal(daemon.pid(), "HUP");
    common::daemon::wait_for("the refusal in the log", Duration::from_secs(20), || {
        daemon
            .log_text()
            .contains("the config was not reloaded")
            .then_some(())
    });
    let log = daemon.log_text();
    assert!(log.contains("provder"), "the error names the key: {log}");
    for name in ["app/first", "app/second"] {
        let (code, _) = common::curl(
            &env.agent_socket(),
            "GET",
            &format!("/v1/secrets/{name}"),
            &[],
        );
        assert_eq!(code, 200, "{name}");
    }
    // No notification was sent for the refused reload.
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    assert!(notify.recv(&mut buf).is_err());
    notify.set_nonblocking(false).unwrap();

    // SIGTERM: STOPPING=1, and a clean exit.
    let pid = daemon.pid();
    signal(pid, "TERM");
    let stopping = next_message(&notify, Duration::from_secs(20));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_fetch_or_a_watch_in_flight_when_the_daemon_reloads_or_stops_is_answered() {
    // Each fetch is held (the failpoint sleeps) between reading the value and registering its
    // lease while the daemon restarts its services (SIGHUP) or stops (SIGTERM): the services it
    // started on answer it before they stop, rather than an error or a dropped connection. A
    // watch open at the restart is answered as if its wait had run out.
    let policy = "[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\n";
    let env = Env::with_config(&format!(
        "{}max_watches_per_uid = 1\n\n{policy}\n[secrets.\"app/first\"]\nprovider = \"random\"\n",
        common::daemon::base_config("5s")
    ));
    env.ok(&["init"], None);
    let daemon = env.start_daemon_with(&[("FAILPOINTS", "fetch.served=2*sleep(2000)")]);
    common::daemon::wait_for("the first version", Duration::from_secs(20), || {
        (env.entry("app/first")["version"] == 1).then_some(())
    });
    let watch = "/v1/secrets/app/first?min_version=2&wait=120";
    let watcher = {
        let socket = env.agent_socket();
        // (Turned away while the probe below holds the uid's one watch.)
        std::thread::spawn(move || {
            loop {
                let answer = common::curl(&socket, "GET", watch, &[]);
                if answer.0 != 429 {
                    return answer;
                }
            }
        })
    };
    common::daemon::wait_for("the watch to be open", Duration::from_secs(20), || {
        // The uid's one watch is taken once the first waits.
        let probe = "/v1/secrets/app/first?min_version=2&wait=1";
        (common::curl(&env.agent_socket(), "GET", probe, &[]).0 == 429).then_some(())
    });
    for (n, signal_name) in [(1, "HUP"), (2, "TERM")] {
        let socket = env.agent_socket();
        let fetch =
            std::thread::spawn(move || common::curl(&socket, "GET", "/v1/secrets/app/first", &[]));
        common::daemon::wait_for("the fetch to be held", Duration::from_secs(20), || {
            (daemon
                .log_text()
                .matches("serving; registering its lease")
                .count()
                == n)
                .then_some(())
        });
        signal(daemon.pid(), signal_name);
        let (code, body) = fetch.join().unwrap();
        assert_eq!(code, 200, "the fetch in flight at SIG{signal_name}: {body}");
        assert!(body.contains("\"version\":1"), "{body}");
    }
    assert_eq!(watcher.join().unwrap().0, 304, "the watch open at SIGHUP");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn a_rotation_waited_on_when_the_daemon_stops_is_answered_with_where_it_stands() {
    // The rotation is held after its `created` step (the failpoint sleeps) while `keywarden
    // rotate` waits for it and the daemon is told to stop: the command is answered with the
    // rotation as it stands (it resumes at the next start), not cut off.
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/first\"]\nprovider = \"random\"\n",
        common::daemon::base_config("5s")
    ));
    env.ok(&["init"], None);
    let daemon = env.start_daemon_with(&[("FAILPOINTS", "rotation.created=sleep(3000)")]);
    common::daemon::wait_for("the first version", Duration::from_secs(30), || {
        (env.entry("app/first")["version"] == 1).then_some(())
    });
    let rotate = env
        .cmd()
        .args(["rotate", "app/first", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::daemon::wait_for("the rotation to be held", Duration::from_secs(20), || {
        (env.entry("app/first")["rotation_state"] == "created").then_some(())
    });
    signal(daemon.pid(), "TERM");
    let out = rotate.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["state"], "created", "{answer}");
    assert_eq!(daemon.terminate(), Some(0));
}
