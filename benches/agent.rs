//! Agent socket benchmark: fetch throughput and p50/p99 latency at 1, 8, 32 and 128 concurrent
//! clients against the real `keywarden serve` (peer attestation, policy, a lease and an audit
//! row per fetch, group-committed), and against a minimal hyper server answering a fixed body on
//! a Unix socket (the transport's limit), in the same run on the same machine.
//!
//! Run with `cargo bench --bench agent`; prints a table. Each client keeps one HTTP/1.1
//! connection and sends requests back to back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
const BODY: &str = r#"{"name":"bench/token","version":1,"value":"0123456789abcdef0123456789abcdef01234567","meta":{},"lease_id":"00000000-0000-0000-0000-000000000000","expires_at":"2026-01-01T00:00:00Z"}"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-server") {
        baseline_server(Path::new(&args[i + 1]));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let baseline_sock = dir.path().join("baseline.sock");
    let mut baseline = Command::new(std::env::current_exe().unwrap())
        .arg("--baseline-server")
        .arg(&baseline_sock)
        .spawn()
        .unwrap();
    let (mut daemon, agent_sock) = start_keywarden(dir.path());
    wait_socket(&baseline_sock);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| clients | baseline req/s | baseline p50 / p99 | keywarden fetches/s | keywarden p50 / p99 | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for clients in [1usize, 8, 32, 128] {
        let base = rt.block_on(load(&baseline_sock, "/", clients));
        let kw = rt.block_on(load(&agent_sock, "/v1/secrets/bench/token", clients));
        println!(
            "| {clients} | {:.0} | {:.2} / {:.2} ms | {:.0} | {:.2} / {:.2} ms | {:.2} |",
            base.rate,
            base.p50,
            base.p99,
            kw.rate,
            kw.p50,
            kw.p99,
            kw.rate / base.rate
        );
    }
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

fn start_keywarden(dir: &Path) -> (Child, PathBuf) {
    let config = dir.join("keywarden.toml");
    std::fs::write(
        &config,
        r#"[store]
path = "vault.db"
[store.kdf]
memory_kib = 64
iterations = 1
parallelism = 1
[agent]
socket = "agent.sock"
admin_socket = "admin.sock"
default_ttl = "10m"
max_connections = 512
[secrets."bench/token"]
provider = "random"
generate = { length = 40, charset = "alphanumeric" }
[[policy]]
name = "bench"
same_user = true
secrets = ["bench/*"]
max_ttl = "1h"
"#,
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

struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
}

async fn load(sock: &Path, path: &'static str, clients: usize) -> Figures {
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
                loop {
                    let t = Instant::now();
                    if t - start > WARMUP + MEASURE {
                        break;
                    }
                    let req = hyper::Request::get(path)
                        .header("host", "x")
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let _ = resp.into_body().collect().await.unwrap();
                    if t - start >= WARMUP {
                        latencies.push(t.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Figures {
        rate: all.len() as f64 / MEASURE.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
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
