//! The plugin host: runs one plugin process and talks protocol v1 to it (docs/plugin-protocol.md).
//!
//! Before every start the file `command[0]` is hashed and compared with the pinned SHA-256; a
//! mismatch is refused, naming both hashes. The process gets an empty environment (except
//! `PATH`, `LANG=C` and what its config lists) and a private, empty working directory. Requests
//! carry unique ids and several may be in flight; replies are matched by id. A request that gets
//! no reply within the timeout kills the process (it is restarted on next use); a crash fails
//! the requests in flight and the host restarts the plugin and retries each once, which is safe
//! because every request is idempotent by construction. A plugin that writes garbage or answers
//! an id it was never sent is stopped with a clear error. Its stderr goes to the log at debug
//! level with the values it was sent redacted.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keywarden_plugin_sdk::{Hello, MAX_LINE_BYTES, OkReply, Op, PLUGIN_FLAG, Reply, Request};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Semaphore, oneshot};
use zeroize::Zeroizing;

use crate::crypto;
use crate::sandbox::{Confinement, FAILURE_PREFIX};

/// Settings passed through to a plugin, as a JSON object.
pub type Settings = serde_json::Map<String, serde_json::Value>;

/// How a plugin is started, from `[plugins.NAME]`.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The config name.
    pub name: String,
    /// Executable and arguments.
    pub command: Vec<String>,
    /// Pinned SHA-256 of `command[0]`, hex.
    pub sha256: String,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// Parent of the private working directories.
    pub work_dir: PathBuf,
    /// How the process is confined (its own user when the daemon is root, Landlock, seccomp).
    pub confinement: Confinement,
}

/// What went wrong talking to a plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The executable's hash does not match the pin.
    #[error(
        "plugin {plugin}: {path} has SHA-256 {actual} but the config pins {expected}; refusing \
         to run it (if the change is intended, re-pin with `keywarden plugin pin {path}`)"
    )]
    PinMismatch {
        /// Plugin name.
        plugin: String,
        /// The executable.
        path: String,
        /// The pinned hash.
        expected: String,
        /// The file's hash.
        actual: String,
    },
    /// The executable cannot be read or started, or is unsafe to run.
    #[error("plugin {plugin}: cannot start {path}: {message}")]
    Spawn {
        /// Plugin name.
        plugin: String,
        /// The executable.
        path: String,
        /// Why.
        message: String,
    },
    /// The plugin did not say hello properly.
    #[error("plugin {plugin}: bad handshake: {message}")]
    Handshake {
        /// Plugin name.
        plugin: String,
        /// Why.
        message: String,
    },
    /// No reply in time; the process was killed.
    #[error(
        "plugin {plugin}: no reply to {op} within {timeout:?}; the plugin was killed and will be restarted"
    )]
    Timeout {
        /// Plugin name.
        plugin: String,
        /// The operation.
        op: String,
        /// The limit.
        timeout: Duration,
    },
    /// The process exited while requests were in flight.
    #[error("plugin {plugin} exited ({status}) before answering {op}")]
    Crashed {
        /// Plugin name.
        plugin: String,
        /// The operation.
        op: String,
        /// How it exited.
        status: String,
    },
    /// The plugin broke the protocol and was stopped.
    #[error("plugin {plugin} broke the protocol ({message}); it was stopped")]
    Protocol {
        /// Plugin name.
        plugin: String,
        /// What it did.
        message: String,
    },
    /// The plugin answered with an error.
    #[error("plugin {plugin}: {op} failed: {message}")]
    Failed {
        /// Plugin name.
        plugin: String,
        /// The operation.
        op: String,
        /// Whether the plugin says a retry may help.
        retryable: bool,
        /// The plugin's message (known values redacted).
        message: String,
    },
}

impl PluginError {
    /// Whether retrying later may help.
    pub fn retryable(&self) -> bool {
        match self {
            PluginError::Timeout { .. }
            | PluginError::Crashed { .. }
            | PluginError::Protocol { .. } => true,
            PluginError::Failed { retryable, .. } => *retryable,
            PluginError::PinMismatch { .. }
            | PluginError::Spawn { .. }
            | PluginError::Handshake { .. } => false,
        }
    }
}

type Pending = HashMap<u64, (String, oneshot::Sender<Result<Reply, PluginError>>)>;

/// One running plugin process.
struct Running {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<Pending>,
    dead: AtomicBool,
    kill: Mutex<Option<oneshot::Sender<()>>>,
}

impl Running {
    fn fail_all(&self, error: impl Fn(&str) -> PluginError) {
        self.dead.store(true, Ordering::SeqCst);
        let pending: Vec<_> = self.pending.lock().expect("pending lock").drain().collect();
        for (_, (op, tx)) in pending {
            let _ = tx.send(Err(error(&op)));
        }
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(tx) = self.kill.lock().expect("kill lock").take() {
            let _ = tx.send(());
        }
    }
}

/// Values sent to or received from plugins, for scrubbing their stderr and messages. Bounded by
/// bytes, not by count: a daemon with thousands of secrets still scrubs a value a plugin was
/// handed long ago (only the oldest go once [`REDACT_BUDGET_BYTES`] is reached).
#[derive(Debug, Default)]
pub struct Redactor {
    values: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    order: std::collections::VecDeque<Zeroizing<String>>,
    /// SHA-256s of what `order` holds, to find a repeat without a scan.
    seen: std::collections::HashSet<[u8; 32]>,
    bytes: usize,
}

/// Bytes of values the redactor keeps.
const REDACT_BUDGET_BYTES: usize = 16 << 20;

impl Redactor {
    /// Remembers a value to scrub (values shorter than 4 bytes are not worth it). Stderr is
    /// logged in pieces of at most [`MAX_STDERR_LINE`] bytes, so a longer value could never
    /// match whole: its lines and 1 KiB pieces are remembered instead.
    pub fn remember(&self, value: &str) {
        if value.len() <= MAX_STDERR_LINE {
            self.remember_one(value);
            return;
        }
        for line in value.lines() {
            if line.len() <= MAX_STDERR_LINE {
                self.remember_one(line);
                continue;
            }
            let bytes = line.as_bytes();
            for piece in bytes.chunks(1024) {
                self.remember_one(&String::from_utf8_lossy(piece));
            }
        }
    }

    fn remember_one(&self, value: &str) {
        if value.len() < 4 {
            return;
        }
        let mut r = self.values.lock().expect("redactor lock");
        if !r.seen.insert(crypto::sha256(value.as_bytes())) {
            return;
        }
        while r.bytes + value.len() > REDACT_BUDGET_BYTES {
            let Some(old) = r.order.pop_front() else {
                break;
            };
            r.bytes -= old.len();
            r.seen.remove(&crypto::sha256(old.as_bytes()));
        }
        r.bytes += value.len();
        r.order.push_back(Zeroizing::new(value.to_string()));
    }

    /// `text` with every remembered value replaced by `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        let r = self.values.lock().expect("redactor lock");
        let mut out = text.to_string();
        for v in r.order.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// The host of one plugin.
pub struct PluginHost {
    spec: PluginSpec,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    hello: Mutex<Option<Hello>>,
    next_id: AtomicU64,
    permits: Semaphore,
    restarts: AtomicU64,
    redactor: Arc<Redactor>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

/// Kills plugin processes that a previous daemon left running (those whose working directory is
/// under `work_dir`) and waits, up to 5 s, until they are gone. A plugin that does not exit when
/// its stdin closes could otherwise still finish or retry a call whose result nobody will
/// record. Only for the daemon: it holds the store exclusively, so no other keywarden process
/// runs plugins there. Returns how many it killed.
pub async fn reap_orphans(work_dir: &Path) -> usize {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let (Ok(work), Ok(procs)) = (work_dir.canonicalize(), std::fs::read_dir("/proc")) else {
        return 0;
    };
    let mut killed = Vec::new();
    for entry in procs.flatten() {
        let pid = entry.file_name().to_str().and_then(|n| n.parse().ok());
        let Some(pid) = pid.and_then(Pid::from_raw) else {
            continue;
        };
        // The pidfd is opened before the check, so the signal reaches the process checked.
        let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) else {
            continue;
        };
        let orphan =
            std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&work));
        if orphan && pidfd_send_signal(&pidfd, Signal::KILL).is_ok() {
            killed.push(entry.path());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // A dead process (a zombie too) has no readable working directory.
    while killed
        .iter()
        .any(|p| std::fs::read_link(p.join("cwd")).is_ok())
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.len()
}

impl PluginHost {
    /// A host for `spec`; nothing runs until [`PluginHost::start`] or the first request.
    pub fn new(spec: PluginSpec, redactor: Arc<Redactor>) -> Self {
        let permits = Semaphore::new(spec.max_concurrency.max(1));
        PluginHost {
            spec,
            running: tokio::sync::Mutex::new(None),
            hello: Mutex::new(None),
            next_id: AtomicU64::new(1),
            permits,
            restarts: AtomicU64::new(0),
            redactor,
        }
    }

    /// The plugin's config name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The most requests this plugin has in flight at once.
    pub fn max_concurrency(&self) -> usize {
        self.spec.max_concurrency
    }

    /// How many times the process was (re)started after the first start.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The hello of the last start, if it started.
    pub fn hello(&self) -> Option<Hello> {
        self.hello.lock().expect("hello lock").clone()
    }

    /// Whether a process is running now.
    pub async fn is_running(&self) -> bool {
        self.running
            .lock()
            .await
            .as_ref()
            .is_some_and(|r| !r.dead.load(Ordering::SeqCst))
    }

    /// Starts the plugin if it is not running, and returns its hello.
    pub async fn start(&self) -> Result<Hello, PluginError> {
        self.ensure_running().await?;
        Ok(self.hello().expect("hello after start"))
    }

    fn path(&self) -> String {
        self.spec.command[0].clone()
    }

    fn check_pin(&self) -> Result<(), PluginError> {
        let path = Path::new(&self.spec.command[0]);
        let spawn_error = |message: String| PluginError::Spawn {
            plugin: self.spec.name.clone(),
            path: self.path(),
            message,
        };
        if let Some(why) = replaceable_by_others(path) {
            return Err(spawn_error(why));
        }
        if let Some(interpreter) = interpreter_of(path) {
            if let Some(why) = replaceable_by_others(&interpreter) {
                return Err(spawn_error(format!(
                    "its interpreter {}: {why}",
                    interpreter.display()
                )));
            }
        }
        let actual = crypto::file_sha256(path).map_err(|e| spawn_error(e.to_string()))?;
        if !actual.eq_ignore_ascii_case(&self.spec.sha256) {
            return Err(PluginError::PinMismatch {
                plugin: self.spec.name.clone(),
                path: self.path(),
                expected: self.spec.sha256.to_lowercase(),
                actual,
            });
        }
        Ok(())
    }

    async fn ensure_running(&self) -> Result<Arc<Running>, PluginError> {
        let mut slot = self.running.lock().await;
        if let Some(r) = slot.as_ref().filter(|r| !r.dead.load(Ordering::SeqCst)) {
            return Ok(r.clone());
        }
        if slot.is_some() {
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
        *slot = None;
        let running = self.spawn().await?;
        *slot = Some(running.clone());
        Ok(running)
    }

    async fn spawn(&self) -> Result<Arc<Running>, PluginError> {
        self.check_pin()?;
        let spawn_error = |message: String| PluginError::Spawn {
            plugin: self.spec.name.clone(),
            path: self.path(),
            message,
        };
        let work = self.spec.work_dir.join(format!(
            "{}-{}",
            self.spec.name,
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work)
            .map_err(|e| {
                spawn_error(format!(
                    "cannot create its working directory {}: {e}",
                    work.display()
                ))
            })?;
        if let Some(user) = &self.spec.confinement.user {
            rustix::fs::chown(
                &work,
                Some(rustix::fs::Uid::from_raw(user.uid)),
                Some(rustix::fs::Gid::from_raw(user.gid)),
            )
            .map_err(|e| spawn_error(format!("cannot hand {} to its user: {e}", work.display())))?;
        }
        let mut child = self.command(&work).spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&work);
            spawn_error(e.to_string())
        })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        self.forward_stderr(child.stderr.take().expect("piped stderr"));
        let hello = match self.handshake(&mut stdout).await {
            Ok(hello) => hello,
            Err(message) => {
                let _ = child.kill().await;
                let _ = std::fs::remove_dir_all(&work);
                return Err(PluginError::Handshake {
                    plugin: self.spec.name.clone(),
                    message,
                });
            }
        };
        tracing::info!(
            plugin = %self.spec.name,
            name = %hello.name,
            version = %hello.version,
            kinds = ?hello.kinds.keys().collect::<Vec<_>>(),
            pid = child.id(),
            "plugin started"
        );
        *self.hello.lock().expect("hello lock") = Some(hello);
        let (kill_tx, kill_rx) = oneshot::channel();
        let running = Arc::new(Running {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            kill: Mutex::new(Some(kill_tx)),
        });
        tokio::spawn(read_replies(
            self.spec.name.clone(),
            running.clone(),
            stdout,
            child,
            kill_rx,
            work,
        ));
        Ok(running)
    }

    /// The plugin's command, confined (see `sandbox`): its arguments and the protocol flag, an
    /// environment of `PATH`, `LANG=C`, `HOME` and `TMPDIR` (its working directory) and what
    /// its config lists, its private working directory, piped stdio. The launcher executes
    /// exactly the file whose hash it checked against the pin.
    fn command(&self, work: &Path) -> tokio::process::Command {
        let mut args = self.spec.command[1..].to_vec();
        args.push(PLUGIN_FLAG.to_string());
        let mut cmd = self.spec.confinement.granting(&[], &[work]).command(
            work,
            &self.spec.command[0],
            Some(&self.spec.sha256),
            &args,
        );
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "C")
            .env("HOME", work)
            .env("TMPDIR", work)
            .envs(&self.spec.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Reads the plugin's hello (within the request timeout) and checks its protocol version.
    async fn handshake<R: AsyncBufRead + Unpin>(&self, stdout: &mut R) -> Result<Hello, String> {
        let first = async {
            match read_line(stdout).await? {
                Some(line) => serde_json::from_slice::<Hello>(&line)
                    .map_err(|e| format!("the first line is not a hello: {e}")),
                None => Err("the plugin exited before saying hello".to_string()),
            }
        };
        let hello = tokio::time::timeout(self.spec.timeout, first)
            .await
            .map_err(|_| format!("no hello within {:?}", self.spec.timeout))??;
        if hello.keywarden_plugin != keywarden_plugin_sdk::PROTOCOL_VERSION {
            return Err(format!(
                "it speaks protocol {}, this keywarden speaks 1",
                hello.keywarden_plugin
            ));
        }
        Ok(hello)
    }

    fn forward_stderr(&self, stderr: tokio::process::ChildStderr) {
        let plugin = self.spec.name.clone();
        let redactor = self.redactor.clone();
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr);
            while let Some(line) = read_stderr_line(&mut stderr).await {
                let line = String::from_utf8_lossy(&line);
                if line.starts_with(FAILURE_PREFIX) {
                    // The launcher could not confine it, so it did not run.
                    tracing::error!(plugin = %plugin, "{}", redactor.scrub(&line));
                } else {
                    tracing::debug!(plugin = %plugin, "plugin stderr: {}", redactor.scrub(&line));
                }
            }
        });
    }

    fn remember_values(&self, request: &Request) {
        let r = &self.redactor;
        for c in request.credentials.values() {
            r.remember(c.value.expose());
        }
        for c in [&request.current, &request.candidate, &request.target]
            .into_iter()
            .flatten()
        {
            r.remember(c.value.expose());
        }
        for v in [&request.proposed, &request.value].into_iter().flatten() {
            r.remember(v.expose());
        }
    }

    /// Sends a request and waits for its reply. The `id` field is assigned here. A crash is
    /// retried once on a restarted process.
    pub async fn call(&self, mut request: Request) -> Result<OkReply, PluginError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        self.remember_values(&request);
        let op = request.op.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            request.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            match self.call_once(&request).await {
                Err(PluginError::Crashed { .. }) if attempt == 1 => {
                    tracing::warn!(plugin = %self.spec.name, op = %op, "plugin crashed; restarting it and retrying");
                    continue;
                }
                Ok(reply) => {
                    if let Some(v) = &reply.value {
                        self.redactor.remember(v.expose());
                    }
                    return Ok(reply);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn call_once(&self, request: &Request) -> Result<OkReply, PluginError> {
        let running = self.ensure_running().await?;
        let (tx, rx) = oneshot::channel();
        running
            .pending
            .lock()
            .expect("pending lock")
            .insert(request.id, (request.op.clone(), tx));
        let line = keywarden_plugin_sdk::protocol::line(&Zeroizing::new(
            serde_json::to_string(request).expect("requests serialize"),
        ));
        // One deadline for the whole call: a plugin that stops reading its input (the pipe
        // fills up) times out like one that never answers.
        let deadline = tokio::time::Instant::now() + self.spec.timeout;
        let written = tokio::time::timeout_at(deadline, async {
            let mut stdin = running.stdin.lock().await;
            stdin.write_all(&line).await?;
            stdin.flush().await
        })
        .await;
        drop(line);
        if !matches!(written, Ok(Ok(()))) {
            // Dead, or not reading: the reader reports the exit; this request must not wait.
            running.kill();
        }
        let reply = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => {
                return Err(PluginError::Crashed {
                    plugin: self.spec.name.clone(),
                    op: request.op.clone(),
                    status: "unknown".into(),
                });
            }
            Err(_) => {
                running
                    .pending
                    .lock()
                    .expect("pending lock")
                    .remove(&request.id);
                running.kill();
                return Err(PluginError::Timeout {
                    plugin: self.spec.name.clone(),
                    op: request.op.clone(),
                    timeout: self.spec.timeout,
                });
            }
        };
        match reply.into_result() {
            Some(Ok(ok)) => Ok(ok),
            Some(Err(err)) => Err(PluginError::Failed {
                plugin: self.spec.name.clone(),
                op: request.op.clone(),
                retryable: err.retryable,
                message: self.redactor.scrub(&err.message),
            }),
            None => {
                running.kill();
                Err(PluginError::Protocol {
                    plugin: self.spec.name.clone(),
                    message: "a reply carried neither (or both) of ok and err".into(),
                })
            }
        }
    }

    /// Asks the plugin to exit, then kills it if it has not within a few seconds.
    pub async fn shutdown(&self) {
        let Some(running) = self.running.lock().await.take() else {
            return;
        };
        if running.dead.load(Ordering::SeqCst) {
            return;
        }
        let request = Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            op: Op::Shutdown.as_str().into(),
            ..Request::default()
        };
        let json = serde_json::to_string(&request).expect("requests serialize");
        {
            let mut stdin = running.stdin.lock().await;
            let _ = stdin
                .write_all(&keywarden_plugin_sdk::protocol::line(&json))
                .await;
            let _ = stdin.flush().await;
        }
        for _ in 0..50 {
            if running.dead.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.kill();
    }
}

/// Reads one line of at most [`MAX_LINE_BYTES`]; `None` at end of input.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading its output failed: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE_BYTES {
        return Err(format!(
            "it wrote a line longer than {MAX_LINE_BYTES} bytes"
        ));
    }
    Ok(Some(line))
}

/// The interpreter a script names on its `#!` line, if it is one.
fn interpreter_of(path: &Path) -> Option<PathBuf> {
    let mut head = [0u8; 256];
    let n = std::io::Read::read(&mut std::fs::File::open(path).ok()?, &mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let text = std::str::from_utf8(line).ok()?.trim();
    text.split_whitespace().next().map(PathBuf::from)
}

/// Why another user could change what runs as this plugin: the file, or a directory above it
/// (before or after following symlinks), is owned by someone other than root or this process's
/// user, or writable by group or others (a sticky directory such as /tmp is fine: others cannot
/// replace what they do not own in it). `None` when nobody else can.
pub(crate) fn replaceable_by_others(path: &Path) -> Option<String> {
    let me = rustix::process::geteuid().as_raw();
    let unsafe_entry = |entry: &Path, meta: &std::fs::Metadata| -> Option<String> {
        let mode = meta.mode();
        if meta.uid() != 0 && meta.uid() != me {
            return Some(format!(
                "{} is owned by uid {}, not by root or by this daemon's user (uid {me})",
                entry.display(),
                meta.uid()
            ));
        }
        let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
        (mode & 0o022 != 0 && !sticky_dir).then(|| {
            format!(
                "{} is writable by other users (mode {:o}); `chmod go-w` it",
                entry.display(),
                mode & 0o7777
            )
        })
    };
    let resolved = std::fs::canonicalize(path).ok();
    for start in [Some(path), resolved.as_deref()].into_iter().flatten() {
        for entry in start.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            // A symlink's own mode means nothing; the directory holding it is checked too.
            let Ok(meta) = std::fs::symlink_metadata(entry) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue;
            }
            if let Some(why) = unsafe_entry(entry, &meta) {
                return Some(why);
            }
        }
    }
    None
}

/// Longest stderr line logged at once; a longer line is logged in pieces of this size.
const MAX_STDERR_LINE: usize = 4096;

/// One line of a plugin's stderr, or the next [`MAX_STDERR_LINE`] bytes of a longer one, so
/// a plugin that never writes a newline cannot make the daemon hold more; `None` at the end.
async fn read_stderr_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => return (!line.is_empty()).then_some(line),
            Ok(chunk) => chunk,
        };
        let newline = chunk.iter().position(|b| *b == b'\n');
        let part = newline.unwrap_or(chunk.len());
        let room = MAX_STDERR_LINE - line.len();
        if part >= room {
            line.extend_from_slice(&chunk[..room]);
            reader.consume(room);
            return Some(line);
        }
        line.extend_from_slice(&chunk[..part]);
        if newline.is_some() {
            reader.consume(part + 1);
            return Some(line);
        }
        reader.consume(part);
    }
}

/// Hands each reply on `stdout` to the request waiting for its id, until the plugin closes its
/// output or `kill` fires (`None`), or breaks the protocol (what it did): a line over the limit,
/// a line that is not a reply, or a reply to an id not in flight.
async fn route_replies<R: AsyncBufRead + Unpin>(
    pending: &Mutex<Pending>,
    stdout: &mut R,
    kill: &mut oneshot::Receiver<()>,
) -> Option<String> {
    loop {
        let line = tokio::select! {
            line = read_line(stdout) => line,
            _ = &mut *kill => return None,
        };
        let line = match line {
            Ok(Some(line)) => Zeroizing::new(line),
            Ok(None) => return None,
            Err(e) => return Some(e),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(reply) = serde_json::from_slice::<Reply>(&line) else {
            return Some(format!(
                "it wrote a line that is not a JSON reply ({} bytes)",
                line.len()
            ));
        };
        let waiter = pending.lock().expect("pending lock").remove(&reply.id);
        match waiter {
            Some((_, tx)) => {
                let _ = tx.send(Ok(reply));
            }
            None => {
                return Some(format!(
                    "it answered request id {}, which is not in flight",
                    reply.id
                ));
            }
        }
    }
}

/// The reader task of one process: routes replies by id; on exit, garbage or a lie, fails what
/// is pending and reaps the process.
async fn read_replies(
    plugin: String,
    running: Arc<Running>,
    mut stdout: BufReader<ChildStdout>,
    mut child: Child,
    mut kill: oneshot::Receiver<()>,
    work: PathBuf,
) {
    let violation = route_replies(&running.pending, &mut stdout, &mut kill).await;
    running.dead.store(true, Ordering::SeqCst);
    let _ = child.start_kill();
    let status = match child.wait().await {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    };
    match violation {
        Some(message) => {
            tracing::error!(plugin = %plugin, "{message}; stopping the plugin");
            running.fail_all(|_| PluginError::Protocol {
                plugin: plugin.clone(),
                message: message.clone(),
            });
        }
        None => {
            tracing::info!(plugin = %plugin, status = %status, "plugin exited");
            running.fail_all(|op| PluginError::Crashed {
                plugin: plugin.clone(),
                op: op.to_string(),
                status: status.clone(),
            });
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactor_scrubs_remembered_values_only() {
        let r = Redactor::default();
        r.remember("sk-very-secret-1");
        r.remember("abc"); // too short to be worth scrubbing
        assert_eq!(
            r.scrub("got sk-very-secret-1 and abc"),
            "got [redacted] and abc"
        );
    }

    #[test]
    fn the_redactor_forgets_no_value_of_a_large_daemon() {
        // 5,000 secrets' values (the old redactor kept only the last 512).
        let r = Redactor::default();
        let values: Vec<String> = (0..5000).map(|i| format!("sk-value-{i:06}-xyz")).collect();
        for v in &values {
            r.remember(v);
        }
        assert_eq!(r.scrub(&format!("leak {}", values[0])), "leak [redacted]");
        // A value longer than a stderr piece is scrubbed piece by piece.
        let pem = format!(
            "-----BEGIN KEY-----\n{}\n-----END KEY-----",
            "A".repeat(5000)
        );
        r.remember(&pem);
        let piece = &pem[100..2100];
        assert!(
            !r.scrub(piece).contains(&"A".repeat(1024)),
            "{}",
            r.scrub(piece)
        );
    }

    #[test]
    fn retryability() {
        let t = PluginError::Timeout {
            plugin: "p".into(),
            op: "create".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(t.retryable());
        let pin = PluginError::PinMismatch {
            plugin: "p".into(),
            path: "/x".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(!pin.retryable());
        assert!(pin.to_string().contains("a") && pin.to_string().contains("b"));
    }

    /// A table of requests in flight, and the receivers their replies arrive on.
    fn in_flight(
        ids: &[u64],
    ) -> (
        Mutex<Pending>,
        Vec<oneshot::Receiver<Result<Reply, PluginError>>>,
    ) {
        let mut pending = Pending::new();
        let mut receivers = Vec::new();
        for id in ids {
            let (tx, rx) = oneshot::channel();
            pending.insert(*id, ("verify".to_string(), tx));
            receivers.push(rx);
        }
        (Mutex::new(pending), receivers)
    }

    async fn route(pending: &Mutex<Pending>, output: &[u8]) -> Option<String> {
        let (_kill_tx, mut kill) = oneshot::channel();
        let mut reader = output;
        route_replies(pending, &mut reader, &mut kill).await
    }

    #[tokio::test]
    async fn replies_in_any_order_reach_their_requests() {
        let (pending, mut receivers) = in_flight(&[1, 2]);
        let output = b"{\"id\":2,\"ok\":{}}\n\n{\"id\":1,\"err\":{\"retryable\":true,\"message\":\"later\"}}\n";
        assert_eq!(route(&pending, output).await, None, "end of output");
        let second = receivers.pop().unwrap().await.unwrap().unwrap();
        let first = receivers.pop().unwrap().await.unwrap().unwrap();
        assert_eq!((first.id, second.id), (1, 2));
        assert!(pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reply_to_an_id_not_in_flight_is_a_protocol_violation() {
        let (pending, _receivers) = in_flight(&[1]);
        let violation = route(&pending, b"{\"id\":99,\"ok\":{}}\n").await;
        assert_eq!(
            violation.as_deref(),
            Some("it answered request id 99, which is not in flight")
        );
        assert_eq!(
            pending.lock().unwrap().len(),
            1,
            "the real request still waits"
        );
    }

    #[tokio::test]
    async fn garbage_and_overlong_lines_are_protocol_violations() {
        let (pending, _receivers) = in_flight(&[1]);
        let violation = route(&pending, b"Traceback (most recent call last):\n").await;
        assert!(violation.unwrap().contains("not a JSON reply"));
        let mut long = vec![b'x'; MAX_LINE_BYTES + 10];
        long.push(b'\n');
        let violation = route(&pending, &long).await;
        assert!(violation.unwrap().contains("longer than"));
    }

    #[tokio::test]
    async fn a_plugin_that_never_ends_its_stderr_line_is_read_in_bounded_pieces() {
        // An endless stream with no newline: `lines()` never returned and grew without bound.
        let mut endless = tokio::io::BufReader::new(tokio::io::repeat(b'x'));
        for _ in 0..3 {
            let piece =
                tokio::time::timeout(Duration::from_secs(5), read_stderr_line(&mut endless))
                    .await
                    .expect("a piece comes back without waiting for a newline")
                    .unwrap();
            assert_eq!(piece.len(), MAX_STDERR_LINE);
        }
        let mut input: &[u8] = b"short\nlast";
        assert_eq!(read_stderr_line(&mut input).await.unwrap(), b"short");
        assert_eq!(read_stderr_line(&mut input).await.unwrap(), b"last");
        assert_eq!(read_stderr_line(&mut input).await, None);
    }
}
