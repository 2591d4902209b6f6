//! Fetch load on the agent socket: clients over HTTP/1.1 keep-alive connections sending
//! requests back to back against the real `keywarden serve`, and against a minimal hyper server
//! answering a fixed body on a Unix socket (the transport's limit, the baseline).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
const BODY: &str = r#"{"name":"bench/token","version":1,"value":"0123456789abcdef0123456789abcdef01234567","meta":{},"lease_id":"00000000-0000-0000-0000-000000000000","expires_at":"2026-01-01T00:00:00Z"}"#;
/// The argument that makes the benchmark binary the baseline server.
const BASELINE_FLAG: &str = "--baseline-server";
/// What clients fetch from keywarden.
pub const FETCH_PATH: &str = "/v1/secrets/bench/token";

/// Serves the baseline and never returns when this binary was started as the baseline server.
pub fn serve_baseline_if_asked() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == BASELINE_FLAG) {
        baseline_server(Path::new(&args[i + 1]));
        std::process::exit(0);
    }
}

/// The baseline server and keywarden, both serving, in `dir`: (baseline, its socket, daemon,
/// agent socket).
pub fn start_both(dir: &Path) -> (Child, PathBuf, Child, PathBuf) {
    let baseline_sock = dir.join("baseline.sock");
    let baseline = Command::new(std::env::current_exe().unwrap())
        .arg(BASELINE_FLAG)
        .arg(&baseline_sock)
        .spawn()
        .unwrap();
    let (daemon, agent_sock) = start_keywarden(dir);
    wait_socket(&baseline_sock);
    (baseline, baseline_sock, daemon, agent_sock)
}

/// Stops both servers.
pub fn stop_both(mut baseline: Child, mut daemon: Child) {
    let _ = baseline.kill();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    let _ = baseline.wait();
}

fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// keywarden serving a store file in `dir`, its first version made.
pub fn start_keywarden(dir: &Path) -> (Child, PathBuf) {
    start_keywarden_on(dir, r#"path = "vault.db""#)
}

/// keywarden in `dir` on the store `[store]` names (`store` is that line: a `path` or a
/// `url`), serving once the secret's first version answers.
pub fn start_keywarden_on(dir: &Path, store: &str) -> (Child, PathBuf) {
    let config = dir.join("keywarden.toml");
    std::fs::write(
        &config,
        r#"[store]
STORE
weak_kdf_for_tests = true
[store.kdf]
memory_kib = 64
iterations = 1
parallelism = 1
[agent]
socket = "agent.sock"
admin_socket = "admin.sock"
max_connections = 512
# Every client here is the same uid (one agent host's many workers): lift the per-uid share.
max_connections_per_uid = 512
[secrets."bench/token"]
provider = "random"
generate = { length = 40, charset = "alphanumeric" }
[[policy]]
name = "bench"
same_user = true
secrets = ["bench/*"]
max_ttl = "1h"
"#
        .replace("STORE", store),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .args(["serve", "--init", "--config"])
        .arg(&config)
        .env("KEYWARDEN_PASSPHRASE", "benchmark passphrase")
        .env("KEYWARDEN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.join("agent.sock");
    wait_socket(&sock);
    // The first version is created at start; wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if rt.block_on(one_request(&sock, "/v1/secrets/bench/token")) == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no first version");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, sock)
}

async fn one_request(sock: &Path, path: &str) -> u16 {
    let Ok(stream) = tokio::net::UnixStream::connect(sock).await else {
        return 0;
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Throughput, latency (ms) and the server's CPU per request.
pub struct Figures {
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
    /// Requests answered, warm-up included.
    pub total: usize,
    /// The server's CPU time per request, in microseconds.
    pub cpu_us: f64,
}

/// Runs [`load`] and charges the server process's CPU time (user + system) to its requests.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    path: &'static str,
    clients: usize,
    server: u32,
) -> Figures {
    let before = keywarden_testkit::proc::cpu_seconds(server);
    let mut figures = rt.block_on(load(sock, path, clients));
    figures.cpu_us =
        (keywarden_testkit::proc::cpu_seconds(server) - before) * 1e6 / figures.total as f64;
    figures
}

/// One step of a soak.
pub struct SoakRow {
    pub elapsed: Duration,
    pub rate: f64,
    pub rss_mb: f64,
    pub wal_mb: f64,
    pub db_mb: f64,
}

/// 32 clients fetching back to back for `secs`; every `secs / 10` seconds (at least one), the
/// rate, the daemon's resident memory and the store's write-ahead log and database size.
pub fn soak(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    daemon: u32,
    dir: &Path,
    secs: u64,
    mut each: impl FnMut(&SoakRow),
) -> Vec<SoakRow> {
    let file_mb =
        |name: &str| std::fs::metadata(dir.join(name)).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    let step = Duration::from_secs((secs / 10).max(1));
    let mut elapsed = Duration::ZERO;
    let mut rows = Vec::new();
    while elapsed.as_secs() < secs {
        let figures = rt.block_on(load_for(sock, FETCH_PATH, 32, Duration::ZERO, step));
        elapsed += step;
        let row = SoakRow {
            elapsed,
            rate: figures.rate,
            rss_mb: keywarden_testkit::proc::rss_mb(daemon),
            wal_mb: file_mb("vault.db-wal"),
            db_mb: file_mb("vault.db"),
        };
        each(&row);
        rows.push(row);
    }
    rows
}

async fn load(sock: &Path, path: &'static str, clients: usize) -> Figures {
    load_for(sock, path, clients, WARMUP, MEASURE).await
}

/// `clients` connections sending requests back to back for `warmup + measure`; latencies and
/// the rate count only the `measure` part.
async fn load_for(
    sock: &Path,
    path: &'static str,
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> Figures {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let sock = sock.to_path_buf();
            tokio::spawn(async move {
                let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut latencies = Vec::new();
                let mut total = 0usize;
                loop {
                    let t = Instant::now();
                    if t - start > warmup + measure {
                        break;
                    }
                    let req = hyper::Request::get(path)
                        .header("host", "x")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let _ = resp.into_body().collect().await.unwrap();
                    total += 1;
                    if t - start >= warmup {
                        latencies.push(t.elapsed());
                    }
                }
                (latencies, total)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut total = 0;
    for t in tasks {
        let (latencies, n) = t.await.unwrap();
        all.extend(latencies);
        total += n;
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Figures {
        rate: all.len() as f64 / measure.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        total,
        cpu_us: 0.0,
    }
}

fn baseline_server(path: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(BODY.as_bytes()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
