//! Runs `keywarden-broker`: pinned by SHA-256 and confined like a plugin, started with a
//! listening Unix socket (in a private directory of the daemon's) as its standard input and
//! the hand-off channel as its standard output, told its routes, given its keys, the blocks
//! and what each caller spent, and kept attached so it exits when the daemon does. Restarted
//! when it dies. The daemon's pushes reach it over pooled HTTP/1.1 connections to that socket;
//! agents' connections and the broker's reports about them over the channel. While it runs,
//! each new current version of a route secret is pushed to it (`keys.rs`).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keywarden_plugin_sdk::broker::channel::{self, Channel};
use keywarden_plugin_sdk::broker::{Handoff, Reports, Routes, TOKEN_HEADER};
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};

use super::Enforced;
use super::keys::KeyPusher;
use crate::sandbox::Confinement;

/// Idle connections kept to the broker process.
const POOL: usize = 64;
/// Pause before the keys are read and pushed again after a failure.
const KEYS_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between restarts of a broker that keeps dying.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// How to start the broker process.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    /// The `keywarden-broker` executable.
    pub program: PathBuf,
    /// Its pinned SHA-256 (hex).
    pub sha256: String,
    /// Its confinement (its own user under a root daemon, Landlock, seccomp).
    pub confinement: Confinement,
    /// A private directory of the daemon's for the socket.
    pub dir: PathBuf,
    /// What it serves.
    pub routes: Routes,
    /// Its routes' keys.
    pub keys: Arc<KeyPusher>,
    /// The blocks and what each caller spent, given to each process as it starts.
    pub enforced: Arc<Enforced>,
}

/// What the broker process says, in order.
#[derive(Debug)]
pub enum FromBroker {
    /// Reports about connections handed to the process of this generation.
    Reports(u64, Reports),
    /// The process of this generation is gone, with every connection handed to it.
    Gone(u64),
}

/// Why the broker process could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// It could not be started.
    #[error("cannot start the broker {program}: {why}")]
    Start {
        /// The executable.
        program: String,
        /// Why.
        why: String,
    },
    /// A request to it failed.
    #[error("the broker process did not answer: {0}")]
    Unavailable(String),
}

/// The running broker process and the connections to it.
#[derive(Debug)]
pub struct BrokerProcess {
    socket: PathBuf,
    /// The running process's token for `PUT /v1/keys` (a new one for each process).
    token: Mutex<Token>,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    restarts: std::sync::atomic::AtomicU64,
    /// The running process's hand-off channel and its generation (one per process started).
    channel: Mutex<Option<(u64, Arc<Channel>)>>,
    generation: std::sync::atomic::AtomicU64,
    /// Where the reports read from each process's channel go (let go once stopped, so the
    /// reader of what arrives ends once the last process's channel closes).
    reports: Mutex<Option<tokio::sync::mpsc::Sender<FromBroker>>>,
    enforced: Arc<Enforced>,
}

impl BrokerProcess {
    /// Checks the pin, binds the socket, starts the process and gives it its routes and keys;
    /// then keeps it running (restarting it when it dies) and its keys current (`versions`:
    /// the store's changes) until `stop` turns true.
    pub async fn start(
        spec: BrokerSpec,
        versions: broadcast::Receiver<Option<Arc<str>>>,
        reports: tokio::sync::mpsc::Sender<FromBroker>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<BrokerProcess>, tokio::task::JoinHandle<()>), BrokerError> {
        let start_error = |why: String| BrokerError::Start {
            program: spec.program.display().to_string(),
            why,
        };
        if let Some(why) = crate::plugin_host::replaceable_by_others(&spec.program) {
            return Err(start_error(why));
        }
        let actual =
            crate::crypto::file_sha256(&spec.program).map_err(|e| start_error(e.to_string()))?;
        if !actual.eq_ignore_ascii_case(&spec.sha256) {
            return Err(start_error(format!(
                "its SHA-256 is {actual}, the config pins {}",
                spec.sha256
            )));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spec.dir)
            .map_err(|e| start_error(format!("cannot create {}: {e}", spec.dir.display())))?;
        let process = Arc::new(BrokerProcess {
            socket: spec.dir.join("broker.sock"),
            token: Mutex::new(Token(String::new())),
            idle: Mutex::new(Vec::new()),
            restarts: Default::default(),
            channel: Mutex::new(None),
            generation: Default::default(),
            reports: Mutex::new(Some(reports)),
            enforced: spec.enforced.clone(),
        });
        let child = process.spawn(&spec).await.map_err(start_error)?;
        let watcher = tokio::spawn(process.clone().keep_keys(
            spec.keys.clone(),
            versions,
            stop.clone(),
        ));
        let keeper = tokio::spawn(process.clone().keep_running(spec, child, stop));
        let both = tokio::spawn(async move {
            let _ = keeper.await;
            let _ = watcher.await;
        });
        Ok((process, both))
    }

    /// The token of the running process's `PUT /v1/keys`.
    pub(super) fn token(&self) -> String {
        self.token.lock().expect("token lock").0.clone()
    }

    /// How often the process was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts the process, attaches to it and sends the routes and keys.
    async fn spawn(&self, spec: &BrokerSpec) -> Result<tokio::process::Child, String> {
        *self.channel.lock().expect("channel lock") = None;
        let _ = std::fs::remove_file(&self.socket);
        let (ours, theirs) =
            channel::pair().map_err(|e| format!("cannot make the hand-off channel: {e}"))?;
        let ours = Arc::new(
            Channel::new(ours).map_err(|e| format!("cannot use the hand-off channel: {e}"))?,
        );
        let listener = std::os::unix::net::UnixListener::bind(&self.socket)
            .map_err(|e| format!("cannot bind {}: {e}", self.socket.display()))?;
        let mut cmd = spec.confinement.command(
            Path::new("/"),
            &spec.program.display().to_string(),
            Some(&spec.sha256),
            &[],
        );
        cmd.env_clear()
            .env("LANG", "C")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
            .stdout(Stdio::from(theirs))
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(target: "keywarden::broker", "broker: {line}");
                }
            });
        }
        self.idle.lock().expect("pool lock").clear();
        self.attach().await?;
        let token = crate::crypto::random_bytes(32)
            .map(|b| crate::crypto::hex(&b))
            .map_err(|e| e.to_string())?;
        *self.token.lock().expect("token lock") = Token(token.clone());
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let reports = self.reports.lock().expect("reports lock").clone();
        tokio::spawn(read_reports(
            generation,
            ours.clone(),
            reports.ok_or("the daemon is stopping")?,
        ));
        let routes = Routes {
            token,
            ..spec.routes.clone()
        };
        let body = serde_json::to_vec(&routes).expect("routes serialize");
        let answer = self
            .send(
                Request::put("/v1/routes")
                    .header("host", "broker")
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid request"),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status().is_success() {
            return Err(format!("it refused its routes ({})", answer.status()));
        }
        spec.keys
            .start_over(self)
            .await
            .map_err(|e| e.to_string())?;
        self.push_state().await.map_err(|e| e.to_string())?;
        *self.channel.lock().expect("channel lock") = Some((generation, ours));
        tracing::info!(pid = child.id(), "broker started");
        Ok(child)
    }

    /// Holds `GET /v1/attach` open: the broker exits when this connection closes.
    async fn attach(&self) -> Result<(), String> {
        let mut sender = None;
        for _ in 0..100 {
            match self.connect().await {
                Ok(s) => {
                    sender = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut sender = sender.ok_or("the broker's socket does not accept connections")?;
        let request = Request::get("/v1/attach")
            .header("host", "broker")
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        tokio::spawn(async move {
            let _ = sender.send_request(request).await;
        });
        Ok(())
    }

    async fn keep_running(
        self: Arc<Self>,
        spec: BrokerSpec,
        mut child: tokio::process::Child,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::select! {
                status = child.wait() => {
                    tracing::error!(status = ?status.ok(), "the broker process exited; restarting it");
                    // Its requests ended with it: no version is in use any more.
                    spec.keys.forget();
                }
                _ = stopped(&mut stop) => {
                    let _ = child.kill().await;
                    let _ = std::fs::remove_file(&self.socket);
                    self.reports.lock().expect("reports lock").take();
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut stop) => {
                        self.reports.lock().expect("reports lock").take();
                        return;
                    }
                }
                delay = (delay * 2).min(MAX_RESTART_DELAY);
                self.restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match self.spawn(&spec).await {
                    Ok(c) => {
                        child = c;
                        delay = Duration::from_millis(100);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the broker could not be restarted");
                        spec.keys.forget();
                    }
                }
            }
        }
    }

    /// Pushes each change of a route secret's current version until `stop`.
    async fn keep_keys(
        self: Arc<Self>,
        keys: Arc<KeyPusher>,
        mut versions: broadcast::Receiver<Option<Arc<str>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let changed = tokio::select! {
                changed = versions.recv() => changed,
                () = keys.failed() => {
                    // A key could not be read or pushed: every key again, a moment later.
                    tokio::select! {
                        () = tokio::time::sleep(KEYS_RETRY) => {}
                        _ = stopped(&mut stop) => return,
                    }
                    Ok(None)
                }
                _ = stopped(&mut stop) => return,
            };
            match changed {
                Ok(name) => keys.changed(&self, name.as_deref()).await,
                // Fell behind: any secret may have changed.
                Err(broadcast::error::RecvError::Lagged(_)) => keys.changed(&self, None).await,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Tells the running process which brokers are blocked and what each caller spent (the
    /// latter taken only by a process's first push).
    pub async fn push_state(&self) -> Result<(), BrokerError> {
        let state = self.enforced.state(crate::clock::now_millis());
        let body = serde_json::to_vec(&state).expect("state serializes");
        let answer = self
            .send(
                Request::put("/v1/state")
                    .header("host", "broker")
                    .header(TOKEN_HEADER, self.token())
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid request"),
            )
            .await?;
        if !answer.status().is_success() {
            return Err(BrokerError::Unavailable(format!(
                "it refused its state ({})",
                answer.status()
            )));
        }
        Ok(())
    }

    /// Asks the running process to answer the requests in flight on handed connections and
    /// close them, and waits until it has, and has sent its reports.
    pub async fn finish(&self) {
        let request = Request::post("/v1/finish")
            .header("host", "broker")
            .header(TOKEN_HEADER, self.token())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        if let Err(e) = self.send(request).await {
            tracing::debug!(error = %e, "the broker process could not finish");
        }
    }

    /// Hands an agent's connection to the running process, with the decision about its peer;
    /// `record` is told the generation of that process before the connection is sent.
    pub async fn hand_off(
        &self,
        handoff: &Handoff,
        connection: std::os::fd::BorrowedFd<'_>,
        record: impl FnOnce(u64),
    ) -> Result<(), BrokerError> {
        let current = self.channel.lock().expect("channel lock").clone();
        let (generation, channel) = current.ok_or_else(|| {
            BrokerError::Unavailable("the broker process is starting".to_string())
        })?;
        let bytes = serde_json::to_vec(handoff).expect("a hand-off serializes");
        record(generation);
        channel
            .send(&bytes, Some(connection))
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends a request to the broker process over an idle connection (or a new one) and
    /// returns the head of its answer; the body streams.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, BrokerError> {
        let idle = {
            let mut pool = self.idle.lock().expect("pool lock");
            pool.retain(|s| !s.is_closed());
            let ready = pool.iter().position(|s| s.is_ready());
            ready.map(|i| pool.swap_remove(i))
        };
        let mut sender = match idle {
            Some(s) => s,
            None => self.connect().await.map_err(BrokerError::Unavailable)?,
        };
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        // Ready again once this answer's body is read; until then `send` passes it over.
        let mut pool = self.idle.lock().expect("pool lock");
        if pool.len() < POOL {
            pool.push(sender);
        }
        Ok(answer)
    }
}

/// Reads a process's reports until its channel closes (the process is gone), then says so.
async fn read_reports(
    generation: u64,
    channel: Arc<Channel>,
    to: tokio::sync::mpsc::Sender<FromBroker>,
) {
    loop {
        match channel.recv().await {
            Ok(Some((record, _))) => match serde_json::from_slice::<Reports>(&record) {
                Ok(reports) => {
                    if to
                        .send(FromBroker::Reports(generation, reports))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a report from the broker that is not one"),
            },
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the broker's hand-off channel failed");
                break;
            }
        }
    }
    let _ = to.send(FromBroker::Gone(generation)).await;
}

/// A broker process's token, never printed.
struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
