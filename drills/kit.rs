//! What the drills share: a seeded random source, the daemon as a process started and killed at
//! will, HTTP over a Unix socket, agents that fetch in the background and remember what they
//! were given, SQL on the files the drill checks, and the list of violations.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keywarden_testkit::Env;

/// xorshift64*: enough to pick instants and secrets, and repeatable from a printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A seed from the clock, printed by each drill so a run can be repeated.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// What went wrong; a drill exits non-zero when this is not empty.
#[derive(Default)]
pub struct Violations(Vec<String>);

impl Violations {
    /// Records `what` unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let what = what();
            eprintln!("VIOLATION: {what}");
            self.0.push(what);
        }
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// `keywarden serve --init` in the background, its log appended to `log`, with `FAILPOINTS`
/// set when `failpoints` is given. Not waited for: a drill may kill it while it starts.
pub fn spawn_daemon(env: &Env, log: &Path, failpoints: Option<&str>) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = env.cmd();
    cmd.args(["serve", "--init"])
        .env("KEYWARDEN_LOG", "keywarden=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    Daemon(Some(cmd.spawn().expect("spawn keywarden serve")))
}

/// A daemon a drill started. Dropped (a failed assertion unwinds past it), it is killed with
/// SIGKILL, so a failing drill leaves no daemon running behind it.
pub struct Daemon(Option<Child>);

impl Daemon {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("a running daemon").id()
    }

    /// Its exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child().try_wait().unwrap()
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("a running daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the admin socket answers `GET /v1/admin/status` with 200; false if the daemon
/// exited first or `timeout` passed.
pub fn wait_ready(env: &Env, daemon: &mut Daemon, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if matches!(
            request(&env.admin_socket(), "GET", "/v1/admin/status", None),
            Ok((200, _))
        ) {
            return true;
        }
        if daemon.try_wait().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// [`spawn_daemon`] without crash points, waited for until it answers (up to 2 minutes: a
/// first start creates every first version); panics with its log if it does not.
pub fn start_daemon(env: &Env, log: &Path) -> Daemon {
    let mut daemon = spawn_daemon(env, log, None);
    assert!(
        wait_ready(env, &mut daemon, Duration::from_secs(120)),
        "the daemon did not start:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    daemon
}

/// SIGKILL and reap.
pub fn kill9(daemon: Daemon) {
    drop(daemon);
}

/// SIGTERM and wait (up to 30 s); the exit code.
pub fn terminate(mut daemon: Daemon) -> Option<i32> {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(daemon.child()),
        rustix::process::Signal::TERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = daemon.try_wait() {
            daemon.0 = None;
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(daemon);
    None
}

/// One HTTP/1.1 request over a Unix socket (the connection closed after it); the status and
/// the body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    // Chunked bodies are not expected from these endpoints (each answer has its length).
    Ok((status, body.to_string()))
}

/// A value an agent was given.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub name: String,
    /// None for an issued credential.
    pub version: Option<i64>,
    pub lease_id: String,
    pub value: String,
}

/// Threads fetching secrets over the agent socket back to back (short TTLs), remembering every
/// value they were given; refused connections (the daemon is down) are counted, not fatal.
pub struct Agents {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    got: Arc<Mutex<Vec<Fetched>>>,
    /// Requests that got no answer (the daemon was down or was killed while answering).
    pub unanswered: Arc<AtomicU64>,
    /// Answers other than 200 and the refusals above.
    pub failed: Arc<AtomicU64>,
}

impl Agents {
    pub fn start(count: usize, socket: PathBuf, names: Vec<String>, seed: u64) -> Agents {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let unanswered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let names = Arc::new(names);
        let threads = (0..count)
            .map(|i| {
                let (stop, got, unanswered, failed, names, socket) = (
                    stop.clone(),
                    got.clone(),
                    unanswered.clone(),
                    failed.clone(),
                    names.clone(),
                    socket.clone(),
                );
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ ((i as u64 + 1) * 0x9E37_79B9));
                    while !stop.load(Ordering::Relaxed) {
                        let name = &names[rng.below(names.len() as u64) as usize];
                        match request(&socket, "GET", &format!("/v1/secrets/{name}?ttl=2"), None) {
                            Ok((200, body)) => {
                                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                                got.lock().unwrap().push(Fetched {
                                    name: name.clone(),
                                    version: v["version"].as_i64(),
                                    lease_id: v["lease_id"].as_str().unwrap().to_string(),
                                    value: v["value"].as_str().unwrap().to_string(),
                                });
                            }
                            Ok(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        }
                    }
                })
            })
            .collect();
        Agents {
            stop,
            threads,
            got,
            unanswered,
            failed,
        }
    }

    /// Stops the threads; everything they were given.
    pub fn stop(self) -> Vec<Fetched> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut self.got.lock().unwrap())
    }
}

/// An SQLite file opened read-only (the store, or the example plugin's upstream state).
pub fn open_db(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    conn
}

/// Every row of a one- or two-column text query.
pub fn rows(conn: &rusqlite::Connection, sql: &str) -> Vec<(String, String)> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let columns = stmt.column_count();
    stmt.query_map([], |r| {
        let text = |i: usize| -> rusqlite::Result<String> {
            Ok(match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => String::new(),
                rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                rusqlite::types::ValueRef::Real(f) => f.to_string(),
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    String::from_utf8_lossy(t).into_owned()
                }
            })
        };
        Ok((text(0)?, if columns > 1 { text(1)? } else { String::new() }))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Moves every scheduled rotation an hour out, so a daemon started next only finishes what is
/// in flight.
pub fn push_schedules_an_hour_out(env: &Env) {
    let in_an_hour = (chrono::Utc::now().timestamp() + 3600) * 1000;
    env.sql(&[&format!(
        "UPDATE secrets SET next_rotation_at = {in_an_hour} WHERE next_rotation_at IS NOT NULL"
    )]);
}

/// Rotations not yet in a final state.
pub fn rotations_in_flight(store: &rusqlite::Connection) -> i64 {
    one(
        store,
        "SELECT count(*) FROM rotations WHERE state NOT IN ('done', 'failed', 'rolled-back')",
    )
}

/// One integer.
pub fn one(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits until `count` secrets have a current version (a first start creates them); false
/// after `timeout`.
pub fn first_versions(store: &rusqlite::Connection, count: usize, timeout: Duration) -> bool {
    eventually(timeout, || {
        one(
            store,
            "SELECT count(*) FROM versions WHERE stage = 'current'",
        ) == count as i64
    })
}

/// Waits until `check` holds, polling every 50 ms; false after `timeout`.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fake upstream for the broker: plain HTTP on 127.0.0.1, answering every request with a
/// small JSON body; stopped (its port then refuses connections) and started again on the same
/// port.
pub struct FakeUpstream {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(port: u16) -> FakeUpstream {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut seen = Vec::new();
                        let mut buf = [0u8; 4096];
                        // The request: headers, then as many bytes as it says.
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            seen.extend_from_slice(&buf[..n]);
                            let text = String::from_utf8_lossy(&seen).to_lowercase();
                            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                if body.len() >= len {
                                    break;
                                }
                            }
                        }
                        let body = r#"{"ok":true}"#;
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeUpstream {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listening socket: connections are refused from now on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}
