//! The hostile-clients drill: while legitimate agents fetch back to back, an admitted but
//! poisoned client sends thousands of malformed requests (random methods, path tricks aimed at
//! a secret its policy does not grant, broken headers and bodies, random edits of all of these)
//! to the agent socket, the broker socket and the broker's loopback listener (and, as GETs
//! only, to the admin socket); others send oversized headers and bodies, hold slow connections
//! open, and come as another uid (over the sockets and over TCP). Nothing may crash, no answer may carry a value the client may not
//! have, memory stays bounded, and every legitimate request is served: its p50/p99 are measured
//! before and during the attack.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keywarden_testkit::Env;
use keywarden_testkit::daemon::base_config;

use crate::kit::{self, Rng, Violations};

/// Paths a poisoned client tries, before random edits: the granted secret, the one it is not
/// granted through every trick of encoding and traversal, odd queries, other routes.
const PATHS: &[&str] = &[
    "/v1/secrets/h/a",
    "/v1/secrets/other/x",
    "/v1/secrets/h/../other/x",
    "/v1/secrets/h%2F..%2Fother%2Fx",
    "/v1/secrets/h/%2e%2e/other/x",
    "/v1/secrets//other/x",
    "/v1/secrets/h/a/../../secrets/other/x",
    "/v1/secrets/other%2fx",
    "/v1/secrets/h/*",
    "/v1/secrets/h/a?ttl=-1",
    "/v1/secrets/h/a?ttl=18446744073709551616",
    "/v1/secrets/h/a?ttl=1&ttl=2&version=1",
    "/v1/leases/../../admin/status",
    "/v1/leases/00000000-0000-0000-0000-000000000000/renew",
    "/v1/watch/h/a",
    "/v1/broker/hostile/v1/echo",
    "/v1/broker/hostile/../../secrets/other/x",
    "/v1/broker/hostile/v1/echo/../../../v1/secrets/other/x",
    "/v1/broker/other/v1/echo",
    "/hostile/v1/echo",
    "/hostile/v1/%2e%2e/%2e%2e/v1/secrets/other/x",
    "http://evil.example/v1/secrets/other/x",
    "*",
    "/metrics",
    "/v1/admin/status",
    "/v1/admin/secrets/h/a",
    "/v1/admin/secrets/h%2Fa?version=-1",
    "/v1/admin/incidents/../status",
    "/v1/admin/rotations/00000000-0000-0000-0000-000000000000",
    "/v1/admin/alerts?limit=99999999999999999999",
];
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "G\0T", "get",
];
const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", ""];
const HEADERS: &[&str] = &[
    "Host: localhost",
    "Content-Length: 5",
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Content-Length: 3\r\nContent-Length: 7",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Authorization: Bearer placeholder",
    "x-api-key: placeholder",
    "Origin: http://evil.example",
    "Sec-Fetch-Site: cross-site",
    "Expect: 100-continue",
    "Connection: upgrade\r\nUpgrade: h2c",
    "Bad Header: x",
    "X-Nul: a\0b",
    "x-keywarden-key-0: injected",
];
/// Bytes random edits bring in.
const TRICKY: &[u8] = b"%/.\0\r\n ?#\xff\\:@";

/// Where requests go.
#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(u16),
}

impl Target {
    /// Sends `bytes`, reads the answer (up to 5 s); its status, or 0 when the connection closed
    /// without one.
    fn send(&self, bytes: &[u8]) -> (u16, Vec<u8>) {
        let answer = |mut s: Box<dyn ReadWrite>| {
            let _ = s.write_all(bytes);
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            answer
        };
        let answer = match self {
            Target::Unix(p) => UnixStream::connect(p).ok().map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                answer(Box::new(s))
            }),
            Target::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).ok().map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                answer(Box::new(s))
            }),
        }
        .unwrap_or_default();
        let status = answer
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, answer)
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One random malformed request.
fn malformed(rng: &mut Rng) -> Vec<u8> {
    let pick =
        |rng: &mut Rng, from: &[&str]| from[rng.below(from.len() as u64) as usize].to_string();
    let mut path = pick(rng, PATHS).into_bytes();
    for _ in 0..rng.below(4) {
        let at = rng.below(path.len() as u64 + 1) as usize;
        let byte = TRICKY[rng.below(TRICKY.len() as u64) as usize];
        match rng.below(3) {
            0 => path.insert(at, byte),
            1 if at < path.len() => {
                path.remove(at);
            }
            _ if at < path.len() => path[at] = byte,
            _ => {}
        }
    }
    let mut request = Vec::new();
    request.extend_from_slice(pick(rng, METHODS).as_bytes());
    request.push(b' ');
    request.extend_from_slice(&path);
    request.push(b' ');
    request.extend_from_slice(pick(rng, VERSIONS).as_bytes());
    request.extend_from_slice(b"\r\n");
    for _ in 0..rng.below(5) {
        request.extend_from_slice(pick(rng, HEADERS).as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    if rng.below(20) == 0 {
        request.extend_from_slice(b"X-Long: ");
        request.extend(std::iter::repeat_n(b'a', 70_000));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    let body_len = rng.below(64) as usize;
    request.extend((0..body_len).map(|_| (rng.next() & 0xff) as u8));
    request
}

/// Legitimate agents fetching the granted secret back to back, each answer timed.
struct Legit {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// (ms, served) per request, tagged with the phase it ran in.
    times: Arc<Mutex<Vec<(u8, f64, bool)>>>,
    phase: Arc<AtomicUsize>,
}

impl Legit {
    fn start(socket: PathBuf, threads: usize) -> Legit {
        let stop = Arc::new(AtomicBool::new(false));
        let times = Arc::new(Mutex::new(Vec::new()));
        let phase = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, times, phase, socket) =
                    (stop.clone(), times.clone(), phase.clone(), socket.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let served = matches!(
                            kit::request(&socket, "GET", "/v1/secrets/h/a?ttl=60", None),
                            Ok((200, _))
                        );
                        let ms = t0.elapsed().as_secs_f64() * 1000.0;
                        times.lock().unwrap().push((
                            phase.load(Ordering::Relaxed) as u8,
                            ms,
                            served,
                        ));
                    }
                })
            })
            .collect();
        Legit {
            stop,
            threads,
            times,
            phase,
        }
    }

    fn stop(self) -> Vec<(u8, f64, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut self.times.lock().unwrap())
    }
}

/// (count, failed, p50, p99) of a phase's requests.
fn summary(times: &[(u8, f64, bool)], phase: u8) -> (usize, usize, f64, f64) {
    let mut ms: Vec<f64> = times.iter().filter(|t| t.0 == phase).map(|t| t.1).collect();
    let failed = times.iter().filter(|t| t.0 == phase && !t.2).count();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (ms.len(), failed, at(0.5), at(0.99))
}

/// Runs the drill; the number of violations.
pub fn run(requests: usize, seed: u64) -> usize {
    let started = Instant::now();
    println!("hostile-clients drill: {requests} malformed requests, seed {seed}");
    let mut violations = Violations::default();
    let env = Env::new();
    let mut upstream = kit::FakeUpstream::start(0);
    let tcp = keywarden_testkit::free_port();
    write_config(&env, upstream.port, tcp);
    let log = env.dir.path().join("daemons.log");
    let daemon = kit::start_daemon(&env, &log);
    let pid = daemon.id();
    let forbidden = [value_of(&env, "other/x"), value_of(&env, "h/key")];
    let rss = RssPeak::start(pid);

    let legit = Legit::start(env.agent_socket(), 4);
    std::thread::sleep(Duration::from_secs(3)); // the baseline: 3 s of undisturbed fetches
    let rss_before = keywarden_testkit::proc::rss_mb(pid);
    legit.phase.store(1, Ordering::Relaxed);
    let attack_started = Instant::now();
    let slow = slow_clients(&env);
    let slow_opened = slow.len();
    let targets = [
        Target::Unix(env.agent_socket()),
        Target::Unix(env.dir.path().join("run/broker.sock")),
        Target::Tcp(tcp),
        Target::Unix(env.admin_socket()),
    ];
    let attackers = attack(&targets, requests, seed, &forbidden);
    let oversized = oversized(&targets);
    let (nobody_tcp, nobody_socket) = as_another_uid(&env, tcp);
    violations.check(nobody_tcp == "403", || {
        format!("another uid over TCP got {nobody_tcp}")
    });
    violations.check(nobody_socket == "000", || {
        format!("another uid reached the agent socket: {nobody_socket}")
    });
    let seen = Seen::join(attackers);
    let attack_time = attack_started.elapsed();
    // The slow clients: how many the daemon closed once its header timeout (5 s) passed.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(attack_started.elapsed()));
    let slow_closed = slow.iter().filter(|s| closed(s)).count();
    violations.check(slow_closed == slow_opened, || {
        format!(
            "{} slow clients still held after the header timeout",
            slow_opened - slow_closed
        )
    });
    legit.phase.store(2, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    let times = legit.stop();
    let rss_peak = rss.stop();
    let rss_after = keywarden_testkit::proc::rss_mb(pid);

    check_unharmed(&env, &log, &seen, &mut violations);
    let (base_n, base_failed, base_p50, base_p99) = summary(&times, 0);
    let (n, failed, p50, p99) = summary(&times, 1);
    violations.check(base_failed == 0 && failed == 0, || {
        format!("legitimate requests failed: {base_failed} before, {failed} during the attack")
    });
    violations.check(rss_peak < rss_before + 100.0, || {
        format!("memory grew from {rss_before:.1} MB to {rss_peak:.1} MB")
    });
    upstream.stop();
    let hygiene = crate::hygiene::sweep(&env, pid, &forbidden, &mut violations);
    let code = kit::terminate(daemon);
    violations.check(code == Some(0), || format!("the daemon exited {code:?}"));

    println!(
        "  malformed: {requests} in {:.1} s; answers by status: {:?} (0: closed without one)",
        attack_time.as_secs_f64(),
        seen.codes
    );
    println!("  oversized header / body per listener: {oversized:?}");
    println!(
        "  slow clients: {slow_opened} half-requests held, {slow_closed} closed by the daemon after its header timeout"
    );
    println!(
        "  another uid: over TCP {nobody_tcp}, agent socket {nobody_socket} (000: could not connect)"
    );
    println!(
        "  legitimate fetches: before {base_n} at p50 {base_p50:.2} / p99 {base_p99:.2} ms; during {n} at p50 {p50:.2} / p99 {p99:.2} ms; {} failed",
        base_failed + failed
    );
    println!(
        "  daemon RSS: {rss_before:.1} MB before, {rss_peak:.1} MB at most, {rss_after:.1} MB after"
    );
    println!("  {hygiene}");
    println!(
        "hostile-clients drill: {} violations in {:.0} s",
        violations.count(),
        started.elapsed().as_secs_f64()
    );
    violations.count()
}

/// After the attack: the daemon never panicked and still answers, no answer carried a value
/// its client may not have, and none was a 500.
fn check_unharmed(env: &Env, log: &std::path::Path, seen: &Seen, violations: &mut Violations) {
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let panics: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("panicked"))
        .collect();
    violations.check(panics.is_empty(), || {
        format!(
            "the daemon panicked {} times: {:?}",
            panics.len(),
            &panics[..panics.len().min(3)]
        )
    });
    let alive = kit::request(&env.admin_socket(), "GET", "/v1/admin/status", None)
        .is_ok_and(|r| r.0 == 200);
    violations.check(alive, || "the daemon stopped answering".into());
    violations.check(seen.leaked == 0, || {
        format!(
            "{} answers carried a value the client may not have",
            seen.leaked
        )
    });
    violations.check(seen.internal.is_empty(), || {
        format!(
            "500 answers to: {:?}",
            &seen.internal[..seen.internal.len().min(3)]
        )
    });
}

/// A bearer broker whose upstream is `upstream_port`, listening on `tcp`; an agent policy for
/// this uid over `h/*` and the broker; `other/x`, which no agent may read.
fn write_config(env: &Env, upstream_port: u16, tcp: u16) {
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\nbroker_socket = \"run/broker.sock\"\n\n\
             [[policy]]\nname = \"agent\"\nuids = [{}]\nsecrets = [\"h/*\"]\nbrokers = [\"hostile\"]\nmax_ttl = \"1h\"\n\n\
             [brokers.hostile]\npreset = \"bearer\"\nsecret = \"h/key\"\nupstream = \"http://127.0.0.1:{upstream_port}\"\n\
             paths = [\"POST /v1/echo\"]\nlisten = \"127.0.0.1:{tcp}\"\n\n\
             [secrets.\"h/a\"]\nprovider = \"random\"\n\n[secrets.\"h/key\"]\nprovider = \"random\"\n\n\
             [secrets.\"other/x\"]\nprovider = \"random\"\n",
            base_config("3s"),
            rustix::process::getuid().as_raw(),
        ),
    )
    .unwrap();
}

/// A secret's current value, read as the operator.
fn value_of(env: &Env, name: &str) -> String {
    let (_, body) = kit::request(
        &env.admin_socket(),
        "GET",
        &format!("/v1/admin/secrets/{name}"),
        None,
    )
    .unwrap();
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The daemon's resident memory, sampled every 50 ms until stopped.
struct RssPeak {
    on: Arc<AtomicBool>,
    peak_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssPeak {
    fn start(pid: u32) -> RssPeak {
        let on = Arc::new(AtomicBool::new(true));
        let peak_kb = Arc::new(AtomicU64::new(0));
        let thread = {
            let (on, peak_kb) = (on.clone(), peak_kb.clone());
            std::thread::spawn(move || {
                while on.load(Ordering::Relaxed) {
                    let kb = (keywarden_testkit::proc::rss_mb(pid) * 1024.0) as u64;
                    peak_kb.fetch_max(kb, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        RssPeak {
            on,
            peak_kb,
            thread,
        }
    }

    /// Stops sampling: the peak, in MB.
    fn stop(self) -> f64 {
        self.on.store(false, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Connections to the agent socket that send half a request and then nothing (fewer than a uid
/// may hold: the legitimate agents here share the attacker's uid).
fn slow_clients(env: &Env) -> Vec<UnixStream> {
    (0..100)
        .filter_map(|_| {
            let mut s = UnixStream::connect(env.agent_socket()).ok()?;
            s.write_all(b"GET /v1/secrets/h/a HTTP/1.1\r\nHost: x\r\n")
                .ok()?;
            Some(s)
        })
        .collect()
}

/// Whether the daemon closed (or answered) a slow client's connection.
fn closed(mut s: &UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 256];
    s.read(&mut buf).is_ok()
}

/// What the attacking threads saw.
#[derive(Default)]
struct Seen {
    /// Answers by status (0: the connection closed without one).
    codes: std::collections::BTreeMap<u16, usize>,
    /// Answers to an agent that carried a value it may not have.
    leaked: usize,
    /// The start of each request answered 500.
    internal: Vec<String>,
}

impl Seen {
    /// What all the threads saw.
    fn join(threads: Vec<std::thread::JoinHandle<Seen>>) -> Seen {
        let mut all = Seen::default();
        for t in threads {
            let seen = t.join().unwrap();
            for (status, n) in seen.codes {
                *all.codes.entry(status).or_default() += n;
            }
            all.leaked += seen.leaked;
            all.internal.extend(seen.internal);
        }
        all
    }
}

/// `requests` malformed requests from 4 threads at random targets; the last target, the admin
/// socket, gets only GETs (its peer, root, may change anything). No answer to an agent may carry
/// a value of `forbidden`.
fn attack(
    targets: &[Target],
    requests: usize,
    seed: u64,
    forbidden: &[String],
) -> Vec<std::thread::JoinHandle<Seen>> {
    (0..4)
        .map(|t| {
            let (targets, forbidden) = (targets.to_vec(), forbidden.to_vec());
            std::thread::spawn(move || {
                let mut seen = Seen::default();
                let mut rng = Rng::new(seed ^ ((t as u64 + 7) * 0x9E37_79B9));
                for _ in 0..requests / 4 {
                    let mut request = malformed(&mut rng);
                    let at = rng.below(targets.len() as u64) as usize;
                    let admin = at == targets.len() - 1;
                    if admin {
                        let method = request.iter().position(|b| *b == b' ').unwrap_or(0);
                        request.splice(..method, *b"GET");
                    }
                    let (status, answer) = targets[at].send(&request);
                    *seen.codes.entry(status).or_default() += 1;
                    // The admin may read any value; no agent may read these.
                    if !admin
                        && forbidden
                            .iter()
                            .any(|v| keywarden_testkit::contains(&answer, v.as_bytes()))
                    {
                        seen.leaked += 1;
                    }
                    if status == 500 {
                        seen.internal.push(
                            String::from_utf8_lossy(&request[..request.len().min(200)])
                                .into_owned(),
                        );
                    }
                }
                seen
            })
        })
        .collect()
}

/// A 2 MiB header, and a body that claims 1 GiB and sends 16 MiB, to each target: the statuses.
fn oversized(targets: &[Target]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for target in targets {
        let mut big = b"GET /v1/secrets/h/a HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2 << 20));
        big.extend_from_slice(b"\r\n\r\n");
        statuses.push(target.send(&big).0);
        let mut body = b"POST /v1/broker/hostile/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'x', 16 << 20));
        statuses.push(target.send(&body).0);
    }
    statuses
}

/// Another uid, nobody, calls the broker over TCP (attested, refused: 403) and the agent socket
/// (not even reachable: 000): curl's status codes.
fn as_another_uid(env: &Env, tcp: u16) -> (String, String) {
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let nobody_tcp = as_nobody(&[
        "-X",
        "POST",
        "-d",
        "{}",
        &format!("http://127.0.0.1:{tcp}/hostile/v1/echo"),
    ]);
    let sock = env.agent_socket().display().to_string();
    let nobody_socket = as_nobody(&["--unix-socket", &sock, "http://localhost/v1/secrets/h/a"]);
    (nobody_tcp, nobody_socket)
}
