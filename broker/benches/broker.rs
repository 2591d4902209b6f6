//! Broker benchmark: what going through keywarden costs an agent, against calling the same
//! provider directly, side by side in one run.
//!
//! A fake provider (this program with `--provider`, hyper over TLS with a private CA) answers
//! chat completions with a small JSON body, or streams a large SSE answer. Agents (HTTP/1.1
//! keep-alive clients) call it directly over TLS, and through the real `keywarden serve` +
//! `keywarden-broker` over the broker's loopback listener (the daemon attests each connection
//! and hands it to the broker, which checks the path and budget, injects the key, meters usage
//! and reports each request, one audit row each).
//!
//! Prints, at 1 and 32 concurrent agents: requests/s, p50 and p99 latency both ways, the
//! added latency, and the CPU the daemon and the broker process spent per request; then a
//! streamed answer's time to first byte and throughput both ways.
//!
//! Each agent sends its next request as soon as the previous answer has ended. Against a
//! provider that answers at once, 32 such agents saturate the machine's cores (load generator,
//! provider, daemon and broker share them), so the added latency of that row is mostly waiting
//! for a core: it follows the CPU per request. The last row gives the provider a model's time
//! to answer (`x-bench-delay-ms`, 20 ms: faster than any chat completion), so 32 agents keep
//! 32 requests in flight without saturating anything, and the added latency is the broker's
//! own.
//!
//! A second table sends each request on a new connection, as `curl` in a loop does: what
//! attesting and handing over a connection costs. A last table runs the paced row's load
//! direct and through keywarden, taking turns three times: the broker goal's figure (added p99
//! at 32 agents) and how much it moves between rounds.
//!
//! Run with `cargo bench -p keywarden-broker --bench broker` (`BENCH_SECONDS=30` to profile).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keywarden_testkit::Env;
use keywarden_testkit::daemon::{base_config, wait_for};
use keywarden_testkit::proc::cpu_seconds;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const KEY: &str = "sk-bench-0123456789abcdef0123456789abcdef";
/// How long each load runs (`BENCH_SECONDS`, default 3; longer to profile).
fn measure() -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    )
}
/// The paced row's provider time, like a model's (the fake provider sleeps this long).
const PROVIDER_MS: u64 = 20;
const ANSWER: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
/// A streamed answer: this many events of `CHUNK` bytes each (4 MiB in all).
const EVENTS: usize = 4096;
const CHUNK: usize = 1024;
/// Streamed answers per path (`BENCH_STREAMS`, default 40; more to profile).
fn stream_runs() -> usize {
    std::env::var("BENCH_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--provider") {
        provider(Path::new(&args[i + 1]));
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = Env::new();
    let certs = env.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (ca, _, _) = keywarden_testkit::tls::private_ca(&certs);
    let _provider = Killed(
        Command::new(std::env::current_exe().unwrap())
            .arg("--provider")
            .arg(&certs)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let port_file = certs.join("port");
    let provider_port: u16 = wait_for("the provider", Duration::from_secs(20), || {
        std::fs::read_to_string(&port_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let listen = keywarden_testkit::free_port();
    let config = format!(
        r#"{base}broker_socket = "run/broker.sock"

[secrets."bench/openai"]
provider = "manual"

[brokers.openai]
preset = "openai"
secret = "bench/openai"
upstream = "https://127.0.0.1:{provider_port}"
ca_file = {ca:?}
listen = "127.0.0.1:{listen}"

[[policy]]
name = "bench"
uids = [{uid}]
brokers = ["openai"]
"#,
        base = base_config("10s").replace(
            "default_ttl = \"5m\"\n",
            "default_ttl = \"5m\"\nmax_connections_per_uid = 1024\n"
        ),
        ca = ca.display().to_string(),
        uid = current_uid(),
    );
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{text}\n{config}")).unwrap();
    env.ok(&["init"], None);
    env.put("bench/openai", KEY);
    let daemon = env.start_daemon();
    let daemon_pid = daemon.pid();
    let broker_pid = child_named(daemon_pid, "keywarden-broker").expect("the broker process");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tls = tls_client(&ca);
    let direct = Target::Direct(provider_port, tls);
    let brokered = Target::Broker(listen);
    requests(&runtime, &direct, &brokered, &[daemon_pid, broker_pid]);
    println!();
    fresh_connections(&runtime, &brokered, &[daemon_pid, broker_pid]);
    println!();
    paced(&runtime, [&direct, &brokered], &[daemon_pid, broker_pid]);
    println!();
    streamed(&runtime, direct, brokered);
    daemon.terminate();
}

/// The requests table: each row's load direct, then through the broker, with the CPU of
/// `pids` (the daemon and the broker process) per brokered request.
fn requests(runtime: &tokio::runtime::Runtime, direct: &Target, brokered: &Target, pids: &[u32]) {
    println!("# broker: requests through keywarden vs the same provider called directly");
    println!(
        "| agents | provider answers in | direct req/s | broker req/s | direct p50 / p99 | broker p50 / p99 | added p50 / p99 | daemon + broker CPU per request |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (agents, delay_ms) in [(1, 0), (32, 0), (32, PROVIDER_MS)] {
        let (d, b, cpu) = side_by_side(runtime, [direct, brokered], (agents, delay_ms), pids);
        println!(
            "| {agents} | {delay_ms} ms | {:.0} | {:.0} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:+.2} / {:+.2} ms | {:.0} µs |",
            d.rate,
            b.rate,
            d.p50,
            d.p99,
            b.p50,
            b.p99,
            b.p50 - d.p50,
            b.p99 - d.p99,
            cpu,
        );
    }
}

/// Requests each on a new loopback connection, one after another, as `curl` in a loop sends
/// them: the daemon attests each connection (the process that owns its other end).
fn fresh_connections(runtime: &tokio::runtime::Runtime, brokered: &Target, pids: &[u32]) {
    const REQUESTS: usize = 500;
    let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    println!("# a new loopback connection per request, {REQUESTS} one after another");
    println!("| path | connect, request and answer p50 / p99 | daemon + broker CPU per request |");
    println!("|---|---|---|");
    let cpu_before = cpu();
    let mut latencies = runtime.block_on(async {
        let mut latencies = Vec::new();
        for _ in 0..REQUESTS {
            let t = Instant::now();
            let mut sender = brokered.connect().await;
            sender.ready().await.unwrap();
            let answer = sender
                .send_request(brokered.request(r#"{"model":"m","messages":[]}"#, 0))
                .await
                .unwrap();
            assert!(answer.status().is_success(), "{}", answer.status());
            answer.into_body().collect().await.unwrap();
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        }
        latencies
    });
    let used = cpu() - cpu_before;
    latencies.sort_by(f64::total_cmp);
    println!(
        "| through keywarden | {:.2} / {:.2} ms | {:.0} µs |",
        latencies[REQUESTS / 2],
        latencies[REQUESTS * 99 / 100],
        used / REQUESTS as f64 * 1e6
    );
}

/// The paced row's load, direct and through keywarden taking turns three times, with the CPU
/// of `pids` per brokered request.
fn paced(runtime: &tokio::runtime::Runtime, paths: [&Target; 2], pids: &[u32]) {
    println!("# 32 agents, the provider answering in {PROVIDER_MS} ms, the two paths taking turns");
    println!(
        "| round | direct p50 / p99 | through keywarden p50 / p99 | added p50 / p99 | daemon + broker CPU per request |"
    );
    println!("|---|---|---|---|---|");
    for round in 1..=3 {
        let (d, b, cpu) = side_by_side(runtime, paths, (32, PROVIDER_MS), pids);
        println!(
            "| {round} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:+.2} / {:+.2} ms | {:.0} µs |",
            d.p50,
            d.p99,
            b.p50,
            b.p99,
            b.p50 - d.p50,
            b.p99 - d.p99,
            cpu,
        );
    }
}

/// `agents` agents against a provider answering in `delay_ms`, direct then through keywarden,
/// with the CPU of `pids` per brokered request, in microseconds.
fn side_by_side(
    runtime: &tokio::runtime::Runtime,
    [direct, brokered]: [&Target; 2],
    (agents, delay_ms): (usize, u64),
    pids: &[u32],
) -> (Load, Load, f64) {
    let cpu = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let d = runtime.block_on(load(direct.clone(), agents, delay_ms));
    let before = cpu();
    let b = runtime.block_on(load(brokered.clone(), agents, delay_ms));
    let per_request = (cpu() - before) / b.count as f64 * 1e6;
    (d, b, per_request)
}

/// The streamed answer's table.
fn streamed(runtime: &tokio::runtime::Runtime, direct: Target, brokered: Target) {
    println!(
        "# a streamed answer ({EVENTS} events of {CHUNK} bytes), best of {}, the two paths taking turns",
        stream_runs()
    );
    println!("| path | time to first byte | throughput | ratio |");
    println!("|---|---|---|---|");
    let [d, b] = runtime.block_on(streams([direct, brokered]));
    println!("| direct | {:.2} ms | {:.0} MB/s | 1.00 |", d.0 * 1e3, d.1);
    println!(
        "| broker | {:.2} ms | {:.0} MB/s | {:.2} |",
        b.0 * 1e3,
        b.1,
        b.1 / d.1
    );
}

/// A child process killed when dropped (the benchmark ended or panicked).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The child of `parent` running `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (ppid == parent.to_string() && exe.file_name()? == name).then_some(pid)
    })
}

#[derive(Clone)]
enum Target {
    /// The provider over TLS.
    Direct(u16, tokio_rustls::TlsConnector),
    /// The broker's loopback listener.
    Broker(u16),
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Target {
    async fn connect(&self) -> Sender {
        match self {
            Target::Direct(port, tls) => {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = ServerName::try_from("127.0.0.1").unwrap();
                handshake(tls.connect(name, tcp).await.unwrap()).await
            }
            Target::Broker(port) => {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .unwrap();
                tcp.set_nodelay(true).unwrap();
                handshake(tcp).await
            }
        }
    }

    fn request(&self, body: &'static str, delay_ms: u64) -> Request<Full<Bytes>> {
        let (path, credential) = match self {
            Target::Direct(..) => (
                "/v1/chat/completions",
                ("authorization", "Bearer placeholder"),
            ),
            Target::Broker(_) => (
                "/openai/v1/chat/completions",
                ("authorization", "Bearer placeholder"),
            ),
        };
        Request::post(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header(credential.0, credential.1)
            .header("x-bench-delay-ms", delay_ms)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }
}

/// An HTTP/1.1 client connection over `io`, driven by a task of its own.
async fn handshake<T>(io: T) -> Sender
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

struct Load {
    rate: f64,
    count: usize,
    p50: f64,
    p99: f64,
}

/// `agents` clients sending requests back to back for [`measure`] (after a short warm-up), to
/// a provider that answers after `delay_ms`.
async fn load(target: Target, agents: usize, delay_ms: u64) -> Load {
    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + measure();
    for _ in 0..agents {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = target.connect().await;
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                sender.ready().await.unwrap();
                let answer = sender
                    .send_request(target.request(r#"{"model":"m","messages":[]}"#, delay_ms))
                    .await
                    .unwrap();
                assert!(answer.status().is_success(), "{}", answer.status());
                answer.into_body().collect().await.unwrap();
                if t >= start {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Load {
        rate: all.len() as f64 / measure().as_secs_f64(),
        count: all.len(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Streamed answers through both targets, alternating so that both see the same machine:
/// the best of [`stream_runs`] each, as (seconds to the first byte, MB/s over the whole body).
async fn streams(targets: [Target; 2]) -> [(f64, f64); 2] {
    let mut best = [(f64::MAX, 0.0f64); 2];
    let mut senders = Vec::new();
    for target in &targets {
        senders.push(target.connect().await);
    }
    for _ in 0..stream_runs() {
        for (i, target) in targets.iter().enumerate() {
            let sender = &mut senders[i];
            sender.ready().await.unwrap();
            let t = Instant::now();
            let answer = sender
                .send_request(target.request(r#"{"model":"m","messages":[],"stream":true}"#, 0))
                .await
                .unwrap();
            let mut body = answer.into_body();
            let mut first = None;
            let mut bytes = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    first.get_or_insert_with(|| t.elapsed().as_secs_f64());
                    bytes += data.len();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            best[i].0 = best[i].0.min(first.unwrap_or(secs));
            best[i].1 = best[i].1.max(bytes as f64 / secs / 1e6);
        }
    }
    best
}

fn tls_client(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The fake provider: TLS, chat completions in JSON or streamed; writes its port to
/// `certs/port`.
fn provider(certs: &Path) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs.join("server.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tmp: PathBuf = certs.join("port.tmp");
        std::fs::write(&tmp, port.to_string()).unwrap();
        std::fs::rename(&tmp, certs.join("port")).unwrap();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let delay: u64 = req
                            .headers()
                            .get("x-bench-delay-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(0);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let streamed = body.windows(13).any(|w| w == b"\"stream\":true");
                        Ok::<_, std::convert::Infallible>(if streamed {
                            let event = Bytes::from(format!("data: {}\n\n", "x".repeat(CHUNK - 8)));
                            let frames = futures_stream(event);
                            Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(http_body_util::Either::Right(frames))
                                .unwrap()
                        } else {
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(http_body_util::Either::Left(Full::new(Bytes::from_static(
                                    ANSWER.as_bytes(),
                                ))))
                                .unwrap()
                        })
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// [`EVENTS`] copies of `event` as a streamed body.
fn futures_stream(
    event: Bytes,
) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + 'static {
    http_body_util::StreamBody::new(futures_util::stream::iter(
        (0..EVENTS).map(move |_| Ok(hyper::body::Frame::data(event.clone()))),
    ))
}
