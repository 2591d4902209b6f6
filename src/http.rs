//! HTTP/1.1 over Unix sockets: creating a socket safely, serving it with limits that keep a
//! hostile or slow client from hurting anyone else, and a small client for the CLI.
//!
//! Limits: a connection cap, a deadline for the request head (slow clients), a cap on header
//! and body sizes, JSON error bodies of the form `{"error":{"code","message"}}`.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::attest::{Peer, boot_seconds};
use crate::group_commit::WriteError;
use crate::leases::LeaseError;
use crate::plugin_host::PluginError;
use crate::rotation::engine::PluginCallError;
use crate::store::StoreError;
use crate::vault::VaultError;

/// Errors creating a socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A live daemon already listens there.
    #[error("{0} is in use by a running process; refusing to take it over")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket's directory could let another user replace or redirect the socket.
    #[error("refusing to put a socket in {dir}: it {why}")]
    UnsafeDirectory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A filesystem or socket call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Binds a listening socket at `path` with `mode`. A missing parent directory is created with
/// `dir_mode` (an existing one is left as it is); a stale socket from a dead process is
/// replaced; a live one is never stolen.
pub fn bind_socket(path: &Path, mode: u32, dir_mode: u32) -> Result<UnixListener, SocketError> {
    let io = |what, path: &Path, source| SocketError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)
            .map_err(|e| io("cannot create the socket directory", dir, e))?;
        // The umask may have trimmed the mode; set it exactly.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
            .map_err(|e| io("cannot set the mode of", dir, e))?;
    }
    check_socket_directory(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                Err(_) => {
                    tracing::info!(path = %path.display(), "replacing a stale socket");
                    std::fs::remove_file(path)
                        .map_err(|e| io("cannot remove the stale socket", path, e))?;
                }
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    // The socket gets its mode as it is created: no chmod afterwards, no window in which it
    // has another mode, nothing to follow if the path were swapped. The umask is the
    // process's: one bind at a time.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(!mode & 0o777));
    let bound = UnixListener::bind(path);
    rustix::process::umask(umask);
    bound.map_err(|e| io("cannot listen on", path, e))
}

/// A socket's directory must be a real directory (not a symlink), owned by root or by this
/// process's user, and writable by nobody else: otherwise another user could replace the socket,
/// or point its path somewhere else, between two of our calls.
fn check_socket_directory(dir: &Path) -> Result<(), SocketError> {
    let unsafe_dir = |why: String| SocketError::UnsafeDirectory {
        dir: dir.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| SocketError::Io {
        what: "cannot inspect the socket directory",
        path: dir.to_path_buf(),
        source: e,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory (a symlink?)".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(unsafe_dir(format!(
            "is owned by uid {}, not by root or by this daemon's user (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by other users (mode {:o}); `chmod go-w` it or choose another directory",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Limits applied to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections one peer (a uid; every TCP peer counts as one) may hold at once; more are
    /// closed as soon as they are accepted, so one peer cannot take every slot.
    pub max_connections_per_peer: usize,
    /// Time allowed to send a request's body, once its head arrived.
    pub body_timeout: Duration,
    /// Time allowed to send a complete request head.
    pub header_timeout: Duration,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_peer: 128,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Slots counted per uid: a connection or a watch holds one until its guard drops.
#[derive(Debug, Clone)]
pub struct Slots {
    limit: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

/// One slot of a uid, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    uid: u32,
}

impl Slots {
    /// At most `limit` slots per uid.
    pub fn new(limit: usize) -> Self {
        Slots {
            limit,
            held: Arc::default(),
        }
    }

    /// A slot for `uid`, or `None` when it holds `limit` already.
    pub fn take(&self, uid: u32) -> Option<Slot> {
        let mut held = self.held.lock().expect("slots lock");
        let n = held.entry(uid).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("slots lock");
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// A request handler.
pub trait Handler: Send + Sync + 'static {
    /// What the handler keeps per connection (the peer's identity).
    type Conn: Send + Sync + 'static;

    /// Called once per connection, with the peer's credentials, a pidfd of the very process
    /// that connected (Unix sockets, where the kernel gives one) and the moment the connection
    /// was accepted (seconds since boot).
    fn connect(&self, peer: Peer, pidfd: Option<OwnedFd>, accepted: f64) -> Self::Conn;

    /// Answers one request. The body is already read (and size-limited).
    fn handle(
        &self,
        conn: &Self::Conn,
        request: Request<Bytes>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// A JSON response.
pub fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// An error response `{"error":{"code","message"}}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message.into() } }),
    )
}

/// An error answer, small enough to pass around in `Result`s.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The response `{"error":{"code","message"}}`.
    pub fn response(&self) -> Response<Full<Bytes>> {
        error(self.status, self.code, self.message.clone())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{e}; nothing was done, try again"),
            )
        } else {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
        }
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::NoSuchSecret(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown",
                format!("no secret named {name:?}"),
            ),
            VaultError::NoCurrentVersion(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown",
                format!("{name:?} has no value yet"),
            ),
            VaultError::Store(e) => e.into(),
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "vault", e.to_string()),
        }
    }
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        let (status, code) = match e {
            LeaseError::NotFound => (StatusCode::NOT_FOUND, "unknown"),
            LeaseError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            LeaseError::TooMany { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_leases"),
            LeaseError::Store(e) => return e.into(),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Rows that could not be committed: nothing is served unrecorded (503, try again).
impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e}; nothing was handed out"),
        )
    }
}

impl From<PluginCallError> for ApiError {
    fn from(e: PluginCallError) -> Self {
        match e {
            PluginCallError::Store(e) => e.into(),
            PluginCallError::Vault(e) => e.into(),
            e @ PluginCallError::NotDeclared(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown", e.to_string())
            }
            e => ApiError::new(StatusCode::BAD_GATEWAY, "upstream", e.to_string()),
        }
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream", e.to_string())
    }
}

/// A listening socket whose connections the server accepts.
pub trait Listener: Send + 'static {
    /// The connection type.
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;

    /// Accepts a connection and says who is on the other end (`None`: refuse it), with a
    /// pidfd of that process where there is one.
    fn accept_peer(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, Option<Peer>, Option<OwnedFd>)>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_peer(
        &mut self,
    ) -> std::io::Result<(UnixStream, Option<Peer>, Option<OwnedFd>)> {
        let (stream, _) = self.accept().await?;
        // SO_PEERPIDFD (Linux 6.5+): pins the process that connected, so attestation cannot
        // be fooled by its pid being reused while the connection waited to be accepted.
        let pidfd = crate::sys::peer_pidfd(&stream).ok();
        let peer = match stream.peer_cred() {
            Ok(c) => Some(Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing the connection");
                None
            }
        };
        Ok((stream, peer, pidfd))
    }
}

/// A TCP peer has no credentials: handlers of TCP listeners authenticate each request.
pub const REMOTE_PEER: Peer = Peer {
    uid: u32::MAX,
    gid: u32::MAX,
    pid: None,
};

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept_peer(
        &mut self,
    ) -> std::io::Result<(tokio::net::TcpStream, Option<Peer>, Option<OwnedFd>)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, Some(REMOTE_PEER), None))
    }
}

/// A TCP listener that speaks TLS (rustls, ring): handshakes run concurrently in their own
/// tasks, at most [`TLS_HANDSHAKES`] at a time and each within [`TLS_HANDSHAKE_TIMEOUT`], so a
/// client that never finishes its handshake holds up no one.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").finish_non_exhaustive()
    }
}

/// Handshakes in progress at once on a [`TlsListener`].
const TLS_HANDSHAKES: usize = 64;
/// Time a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain cannot be read.
    #[error("cannot read the TLS certificate {path}: {why}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The private key cannot be read.
    #[error("cannot read the TLS private key {path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the pair.
    #[error("the TLS certificate and key do not work together: {0}")]
    Config(String),
}

impl TlsListener {
    /// Serves TLS on `listener` with the PEM certificate chain `cert` and private key `key`.
    pub fn new(
        listener: tokio::net::TcpListener,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, TlsError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Certificate {
                path: cert.to_path_buf(),
                why: e.to_string(),
            })?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            why: e.to_string(),
        })?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = tokio::sync::mpsc::channel(TLS_HANDSHAKES);
        let handshakes = Arc::new(Semaphore::new(TLS_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(tls).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            acceptor: task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Listener for TlsListener {
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

    async fn accept_peer(
        &mut self,
    ) -> std::io::Result<(Self::Stream, Option<Peer>, Option<OwnedFd>)> {
        match self.ready.recv().await {
            Some(stream) => Ok((stream, Some(REMOTE_PEER), None)),
            None => Err(std::io::Error::other("the TLS acceptor stopped")),
        }
    }
}

/// How long a connection may take to finish its request in flight once shutdown begins.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(5);

/// Whether a connection's first request has arrived (its head read), and a way to wait for it.
#[derive(Default)]
struct FirstRequest {
    seen: std::sync::atomic::AtomicBool,
    arrived: tokio::sync::Notify,
}

impl FirstRequest {
    fn arrived(&self) {
        if !self.seen.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.arrived.notify_one();
        }
    }

    fn seen(&self) -> bool {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn wait(&self) {
        if !self.seen() {
            self.arrived.notified().await;
        }
    }
}

/// Serves `listener` with `handler` until `shutdown` changes, then lets each connection
/// finish its request in flight (at most [`GRACEFUL_CLOSE`]) and returns once all are closed.
pub async fn serve<H: Handler, L: Listener, S: Send + Sync + 'static>(
    mut listener: L,
    handler: Arc<H>,
    limits: Limits,
    mut shutdown: watch::Receiver<S>,
) {
    let gate = Gate::new(limits.max_connections, limits.max_connections_per_peer);
    let limits = Arc::new(limits);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Some(a) = gate.accept(&mut listener, &mut shutdown).await else {
            break;
        };
        let conn_state = Arc::new(handler.connect(a.peer, a.pidfd, a.accepted));
        let (handler, limits, shutdown) = (handler.clone(), limits.clone(), shutdown.clone());
        connections.spawn(async move {
            let (_permit, _slot) = (a.permit, a.slot);
            serve_connection(a.stream, handler, conn_state, &limits, shutdown).await;
        });
    }
    while connections.join_next().await.is_some() {}
}

/// What every listener's connections must pass: at most so many at once, and at most so many
/// per peer (a uid; every TCP peer counts as one).
#[derive(Debug)]
pub struct Gate {
    permits: Arc<Semaphore>,
    slots: Slots,
}

/// A connection through the [`Gate`], holding its place until dropped.
#[derive(Debug)]
pub struct Accepted<T> {
    /// The connection.
    pub stream: T,
    /// Who is on the other end.
    pub peer: Peer,
    /// A pidfd of that process, where there is one.
    pub pidfd: Option<OwnedFd>,
    /// When it was accepted, seconds since boot.
    pub accepted: f64,
    /// Its place among the peer's connections.
    pub slot: Slot,
    /// Its place among all connections.
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

impl Gate {
    /// At most `max` connections, `per_peer` of them one peer's.
    pub fn new(max: usize, per_peer: usize) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(max)),
            slots: Slots::new(per_peer),
        }
    }

    /// The next connection `listener` accepts that passes (one over its peer's share is
    /// closed at once), or `None` once `shutdown` changes.
    pub async fn accept<L: Listener, S>(
        &self,
        listener: &mut L,
        shutdown: &mut watch::Receiver<S>,
    ) -> Option<Accepted<L::Stream>> {
        loop {
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.changed() => return None,
            };
            let (stream, peer, pidfd) = tokio::select! {
                accepted = listener.accept_peer() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return None,
            };
            let accepted = boot_seconds();
            let Some(peer) = peer else { continue };
            let Some(slot) = self.slots.take(peer.uid) else {
                // This peer holds its share of connections already (slow clients, a flood).
                tracing::debug!(
                    uid = peer.uid,
                    "too many connections from one peer; closing"
                );
                continue;
            };
            return Some(Accepted {
                stream,
                peer,
                pidfd,
                accepted,
                slot,
                permit,
            });
        }
    }
}

/// Serves the requests of one accepted connection until it ends, or until `shutdown` changes:
/// then the request in flight is answered and the connection closed.
async fn serve_connection<H: Handler, S: Send + Sync + 'static>(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    handler: Arc<H>,
    conn_state: Arc<H::Conn>,
    limits: &Limits,
    mut shutdown: watch::Receiver<S>,
) {
    let (max_body, body_timeout) = (limits.max_body_bytes, limits.body_timeout);
    let first_request = Arc::new(FirstRequest::default());
    let service_first = first_request.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let conn_state = conn_state.clone();
        service_first.arrived();
        async move {
            Ok::<_, Infallible>(match read_request(req, max_body, body_timeout).await {
                Ok(request) => handler.handle(&conn_state, request).await,
                Err(refused) => refused,
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        // One buffer, one write per flush: a streamed (brokered) answer's chunks, three
        // pieces each, otherwise go out sixteen pieces per `writev`.
        .writev(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = |result: Result<(), hyper::Error>| {
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    };
    tokio::select! {
        result = conn.as_mut() => ended(result),
        _ = shutdown.changed() => {
            // Accepted, but its first request not read yet: hyper would close it as idle, and
            // the client, whose request may already be on its way, would get nothing back. It
            // gets the header timeout for that request instead.
            if !first_request.seen() {
                let first = tokio::time::timeout(limits.header_timeout, first_request.wait());
                tokio::select! {
                    result = conn.as_mut() => return ended(result),
                    _ = first => {}
                }
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACEFUL_CLOSE, conn).await;
        }
    }
}

/// Reads a request's body, at most `max_body` bytes within `body_timeout`; else the answer
/// that refuses it.
async fn read_request(
    request: Request<Incoming>,
    max_body: usize,
    body_timeout: Duration,
) -> Result<Request<Bytes>, Response<Full<Bytes>>> {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(body_timeout, Limited::new(body, max_body).collect()).await {
        Ok(Ok(body)) => Ok(Request::from_parts(parts, body.to_bytes())),
        Ok(Err(_)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is larger than {max_body} bytes"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {body_timeout:?}"),
        )),
    }
}

/// Sends one request over a Unix socket and returns the status and body.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> std::io::Result<(StatusCode, Bytes)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "keywarden")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(std::io::Error::other)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, bytes))
}

/// Splits a query string into key/value pairs (no percent-decoding: keywarden's keys and
/// values are plain).
pub fn query_pairs(query: Option<&str>) -> Vec<(&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_gets_its_mode_at_creation_in_a_safe_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let socket = run.join("agent.sock");
        let _listener = bind_socket(&socket, 0o660, 0o755).unwrap();
        let mode = std::fs::symlink_metadata(&socket).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o660);

        // A directory other users can write to: they could swap the socket.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind_socket(&shared.join("agent.sock"), 0o660, 0o755).unwrap_err();
        assert!(err.to_string().contains("writable by other users"), "{err}");

        // A symlink to a directory: the path could be pointed elsewhere.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        let err = bind_socket(&link.join("admin.sock"), 0o600, 0o700).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    /// Answers 200 to anything; says when a connection is accepted.
    struct Answer {
        accepted: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl Handler for Answer {
        type Conn = ();

        fn connect(&self, _: Peer, _: Option<OwnedFd>, _: f64) {
            let _ = self.accepted.send(());
        }

        async fn handle(&self, _: &(), _: Request<Bytes>) -> Response<Full<Bytes>> {
            json(StatusCode::OK, &serde_json::json!({ "ok": true }))
        }
    }

    /// A reload stops the server while a client has connected but not yet sent its request:
    /// the request is still answered (the CI run that found it saw curl get an empty reply).
    #[tokio::test(start_paused = true)]
    async fn a_connection_accepted_just_before_a_shutdown_still_gets_its_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/s.sock");
        let listener = bind_socket(&path, 0o600, 0o700).unwrap();
        let (accepted, mut was_accepted) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Answer { accepted }),
            Limits::default(),
            stopped,
        ));
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        was_accepted.recv().await.unwrap();
        stop.send(true).unwrap();
        // Paused time advances only once every task is idle: the server has seen the stop.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        server.await.unwrap();
    }
}
