//! The agent side of the CLI: `get` through the agent socket while the daemon runs, and
//! `exec`, which runs a command with secrets in its environment and restarts or signals it
//! when they rotate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::Context;
use crate::http;

/// How `exec` reacts to a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnRotate {
    /// Stop the command and everything it started (SIGTERM to its process group, then SIGKILL
    /// after `--stop-timeout`) and start it with the new values.
    Restart,
    /// Send the command a signal (it re-reads its secrets some other way).
    Signal(rustix::process::Signal),
    /// Do nothing.
    Nothing,
}

fn parse_on_rotate(text: &str) -> Result<OnRotate, String> {
    use rustix::process::Signal;
    match text {
        "restart" => Ok(OnRotate::Restart),
        "none" => Ok(OnRotate::Nothing),
        _ => {
            let name = text
                .strip_prefix("signal:")
                .ok_or_else(|| format!("expected restart, signal:NAME or none, got {text:?}"))?;
            let signal = match name.trim_start_matches("SIG") {
                "HUP" => Signal::HUP,
                "USR1" => Signal::USR1,
                "USR2" => Signal::USR2,
                "TERM" => Signal::TERM,
                "INT" => Signal::INT,
                "QUIT" => Signal::QUIT,
                "WINCH" => Signal::WINCH,
                other => {
                    return Err(format!(
                        "unknown signal {other:?} (HUP, USR1, USR2, TERM, INT, QUIT, WINCH)"
                    ));
                }
            };
            Ok(OnRotate::Signal(signal))
        }
    }
}

fn parse_env_map(text: &str) -> Result<(String, String), String> {
    let (var, name) = text
        .split_once('=')
        .ok_or_else(|| format!("expected VAR=SECRET, got {text:?}"))?;
    if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("{var:?} is not a valid environment variable name"));
    }
    crate::name::validate(name).map_err(|e| e.to_string())?;
    Ok((var.to_string(), name.to_string()))
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  keywarden exec --env OPENAI_API_KEY=openai/prod -- python agent.py\n  \
    keywarden exec --env-file app.secrets -- ./server   # lines such as DATABASE_PASSWORD=db/app\n\n\
    The command runs in a process group of its own: on a restart, on SIGTERM, SIGINT or SIGHUP \
    to exec (forwarded), and when the command exits, the whole group is told to stop and, after \
    --stop-timeout, killed, so no process it started keeps an old value. (A process that leaves \
    the group with setsid escapes this.) The command's exit code is keywarden's (127 if it is \
    not found, 126 if it cannot be run). Needs the daemon (it watches for rotations)."
)]
pub(crate) struct ExecArgs {
    /// VAR=SECRET: put SECRET's current value in the environment variable VAR. Repeatable.
    #[arg(long = "env", value_name = "VAR=SECRET", value_parser = parse_env_map,
          required_unless_present = "env_file")]
    env: Vec<(String, String)>,
    /// A file of `VAR=SECRET` lines, like a `.env` file that names secrets instead of holding
    /// values (`#` comments, blank lines and a leading `export` are allowed). Repeatable.
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// On rotation: restart, signal:HUP (or another signal), or none.
    #[arg(long, value_name = "ACTION", default_value = "restart", value_parser = parse_on_rotate)]
    on_rotate: OnRotate,
    /// Seconds a stopping command (and everything it started) has between SIGTERM and SIGKILL,
    /// at a restart, after exec is told to stop, or once the command has exited.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// Lease length to ask for, in seconds (leases are renewed while the command runs).
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The `VAR=SECRET` lines of an `--env-file`, each error naming its line.
fn read_env_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the env file {}", path.display()))?;
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim();
        // Errors name the line and the variable, never the right-hand side: pointed at a
        // `.env` of values by mistake, it would be a credential.
        let var = line.split_once('=').map_or(line, |(v, _)| v).trim();
        let at = format!("{} line {}", path.display(), n + 1);
        let Some((_, name)) = line.split_once('=') else {
            bail!("{at}: expected VAR=SECRET-NAME");
        };
        if !crate::scan::patterns::find(name).is_empty() {
            bail!(
                "{at}: {var} holds what looks like a credential, not a secret name (this file is \
                 for names; move values into the store with `keywarden import --env-file`)"
            );
        }
        let pair = parse_env_map(line).map_err(|_| {
            anyhow::anyhow!(
                "{at}: {var}= must name a secret (letters, digits, '.', '_', '-', segments \
                 separated by '/')"
            )
        })?;
        vars.push(pair);
    }
    Ok(vars)
}

/// One fetched secret.
struct Fetched {
    version: Option<i64>,
    value: Zeroizing<String>,
    lease_id: String,
    expires_at: Option<chrono::DateTime<chrono::FixedOffset>>,
}

fn error_message(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered {status}"))
}

/// What to tell a user whose request could not reach the daemon's socket.
fn unreachable_daemon(socket: &Path, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    match e.kind() {
        NotFound | ConnectionRefused => anyhow::anyhow!(
            "the keywarden daemon is not running: nothing listens on {} (start it with \
             `keywarden serve`, or set [agent] socket to where it listens)",
            socket.display()
        ),
        _ => anyhow::anyhow!(
            "cannot reach the daemon's agent socket {}: {e}",
            socket.display()
        ),
    }
}

/// GET a secret from the agent socket. `None` when a watch timed out (304).
async fn fetch(socket: &Path, name: &str, query: &str) -> anyhow::Result<Option<(Value, Fetched)>> {
    let (status, body) = http::request(
        socket,
        Method::GET,
        &format!("/v1/secrets/{name}{query}"),
        None,
    )
    .await
    .map_err(|e| unreachable_daemon(socket, e))?;
    if status == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let body = Zeroizing::new(body.to_vec());
    if status != StatusCode::OK {
        bail!("cannot fetch {name}: {}", error_message(status, &body));
    }
    let json: Value = serde_json::from_slice(&body).context("the daemon's reply is not JSON")?;
    let fetched = Fetched {
        version: json["version"].as_i64(),
        value: Zeroizing::new(json["value"].as_str().unwrap_or_default().to_string()),
        lease_id: json["lease_id"].as_str().unwrap_or_default().to_string(),
        expires_at: json["expires_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
    };
    Ok(Some((json, fetched)))
}

/// `get` while the daemon runs: through the agent socket, as a lease.
pub(crate) async fn get(
    ctx: &Context,
    args: &super::vault_cmds::GetArgs,
) -> anyhow::Result<ExitCode> {
    if args.version.is_some() {
        bail!(
            "--version reads the store directly, which the running daemon holds; stop it, or fetch the current version"
        );
    }
    let socket = &ctx.config.agent.socket;
    let (json, fetched) = match fetch(socket, &args.name, "").await {
        Ok(answer) => answer.context("no value")?,
        Err(e) if super::daemon_cmds::daemon_socket(ctx).await.is_some() => {
            bail!(
                "{e:#} (as an admin, `keywarden get --admin {}` reads it over the admin socket)",
                args.name
            )
        }
        Err(e) => return Err(e),
    };
    if args.json {
        super::output::print_json(&json)?;
    } else {
        super::output::print_value(&fetched.value, args.no_newline)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn release(socket: &Path, leases: impl Iterator<Item = &String>) {
    for id in leases {
        let _ = http::request(socket, Method::DELETE, &format!("/v1/leases/{id}"), None).await;
    }
}

/// The command `exec` runs, in a process group of its own: a restart or a stop signals the
/// whole group, so nothing the command started keeps an old value running.
struct Running {
    child: tokio::process::Child,
    group: rustix::process::Pid,
    /// Whether the group holds the terminal (exec was in the foreground of one).
    terminal: bool,
}

/// Why the command could not be started, with the exit code a shell would give.
struct SpawnError {
    code: u8,
    message: String,
}

impl Running {
    fn spawn(
        command: &[String],
        env: &BTreeMap<String, Fetched>,
        vars: &[(String, String)],
    ) -> Result<Running, SpawnError> {
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        for key in [
            "KEYWARDEN_PASSPHRASE",
            "KEYWARDEN_PASSPHRASE_FILE",
            "KEYWARDEN_NEW_PASSPHRASE",
            "KEYWARDEN_NEW_PASSPHRASE_FILE",
        ] {
            cmd.env_remove(key);
        }
        for (var, name) in vars {
            cmd.env(var, env[name].value.as_str());
        }
        let terminal = in_terminal_foreground();
        crate::sys::own_process_group(&mut cmd, terminal);
        let child = cmd.spawn().map_err(|e| {
            let (code, what) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found".to_string()),
                std::io::ErrorKind::PermissionDenied => (126, "permission denied".to_string()),
                _ => (126, e.to_string()),
            };
            SpawnError {
                code,
                message: format!("keywarden exec: {}: {what}", command[0]),
            }
        })?;
        let group = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            .expect("a child that was just spawned has a pid");
        if terminal {
            let _ = crate::sys::give_terminal_to(group.as_raw_nonzero().get());
        }
        Ok(Running {
            child,
            group,
            terminal,
        })
    }

    /// Sends `signal` to every process of the group.
    fn signal(&self, signal: rustix::process::Signal) {
        let _ = rustix::process::kill_process_group(self.group, signal);
    }

    /// With the terminal: when the command was stopped from it (Ctrl-Z stops only the
    /// foreground group, which is the command's), stops `exec` too so the shell sees the job
    /// stop; when `exec` is continued (`fg`), hands the terminal back and continues the command.
    fn follow_job_control(&self) {
        use rustix::process::{Signal, WaitId, WaitIdOptions};
        if !self.terminal {
            return;
        }
        let stopped = rustix::process::waitid(
            WaitId::Pid(self.group),
            WaitIdOptions::STOPPED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        );
        if !matches!(stopped, Ok(Some(status)) if status.stopped()) {
            return;
        }
        let _ = crate::sys::give_terminal_to(rustix::process::getpgrp().as_raw_nonzero().get());
        let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::STOP);
        // Continued: the shell gave this process's group the terminal; pass it on.
        let _ = crate::sys::give_terminal_to(self.group.as_raw_nonzero().get());
        self.signal(Signal::CONT);
    }

    /// Whether any process of the group is left.
    fn group_alive(&self) -> bool {
        rustix::process::test_kill_process_group(self.group).is_ok()
    }

    /// Stops the whole group: SIGTERM, then SIGKILL to whatever is left after `grace`.
    /// Returns the command's own exit status.
    async fn stop(&mut self, grace: Duration) -> std::io::Result<std::process::ExitStatus> {
        self.signal(rustix::process::Signal::TERM);
        let deadline = tokio::time::Instant::now() + grace;
        let status = tokio::time::timeout_at(deadline, self.child.wait()).await;
        self.end_group(deadline).await;
        match status {
            Ok(status) => status,
            Err(_) => self.child.wait().await,
        }
    }

    /// After the command itself has exited or been told to: tells the rest of its group (what
    /// it started) to stop, waits until `deadline`, then kills what is left.
    async fn end_group(&mut self, deadline: tokio::time::Instant) {
        if self.group_alive() {
            self.signal(rustix::process::Signal::TERM);
        }
        while self.group_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.group_alive() {
            self.signal(rustix::process::Signal::KILL);
            // A killed process is gone once its parent (or init) reaps it; a zombie still
            // counts as a member, so wait a moment, not forever.
            let reaped = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.group_alive() && tokio::time::Instant::now() < reaped {
                let _ = self.child.try_wait();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if self.terminal {
            let _ = crate::sys::give_terminal_to(rustix::process::getpgrp().as_raw_nonzero().get());
        }
    }
}

/// Whether stdin is a terminal whose foreground group is this process's.
fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    rustix::termios::tcgetpgrp(&stdin).is_ok_and(|pg| pg == rustix::process::getpgrp())
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal) as u8),
        _ => ExitCode::FAILURE,
    }
}

/// Long-polls for each version of `name` after `version`, sending each to `tx` until `exec`
/// stops listening.
async fn watch(
    socket: PathBuf,
    name: String,
    mut version: i64,
    ttl: Option<u64>,
    tx: mpsc::Sender<(String, Fetched)>,
) {
    loop {
        let query = format!(
            "?min_version={}&wait=300{}",
            version + 1,
            ttl.map(|t| format!("&ttl={t}")).unwrap_or_default()
        );
        match fetch(&socket, &name, &query).await {
            Ok(Some((_, fetched))) => {
                version = fetched.version.unwrap_or(version + 1);
                if tx.send((name.clone(), fetched)).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Renews the leases past two thirds of their life; refetches any that lapsed.
async fn renew_due(socket: &Path, current: &mut BTreeMap<String, Fetched>, ttl_query: &str) {
    let now = chrono::Utc::now();
    for (name, f) in current.iter_mut() {
        let Some(expires) = f.expires_at else {
            continue;
        };
        let left = expires.with_timezone(&chrono::Utc) - now;
        if left > chrono::Duration::seconds(30) {
            continue;
        }
        let path = format!("/v1/leases/{}/renew{ttl_query}", f.lease_id);
        match http::request(socket, Method::PUT, &path, None).await {
            Ok((StatusCode::OK, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                f.expires_at = v["expires_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            }
            _ => {
                if let Ok(Some((_, fresh))) = fetch(socket, name, ttl_query).await {
                    *f = fresh;
                }
            }
        }
    }
}

/// `exec`: fetch, inject, watch, restart or signal; exit with the command's code.
pub(crate) async fn exec(ctx: &Context, mut args: ExecArgs) -> anyhow::Result<ExitCode> {
    for file in &args.env_file {
        let vars = read_env_file(file)?;
        args.env.extend(vars);
    }
    let socket = ctx.config.agent.socket.clone();
    let ttl_query = args.ttl.map(|t| format!("?ttl={t}")).unwrap_or_default();
    let names: Vec<String> = {
        let mut n: Vec<String> = args.env.iter().map(|(_, name)| name.clone()).collect();
        n.sort();
        n.dedup();
        n
    };
    let mut current: BTreeMap<String, Fetched> = BTreeMap::new();
    for name in &names {
        let (_, fetched) = fetch(&socket, name, &ttl_query)
            .await?
            .context("no value")?;
        current.insert(name.clone(), fetched);
    }
    // The command runs with the user's own umask and core limit, not keywarden's.
    ctx.inherited.restore_for_children();
    let grace = Duration::from_secs(args.stop_timeout);
    let mut running = match Running::spawn(&args.command, &current, &args.env) {
        Ok(r) => r,
        Err(e) => {
            release(&socket, current.values().map(|f| &f.lease_id)).await;
            eprintln!("{}", e.message);
            return Ok(ExitCode::from(e.code));
        }
    };

    // One watcher per secret: a long poll for the next version, never a busy loop.
    let (tx, mut rotated) = mpsc::channel::<(String, Fetched)>(16);
    for name in &names {
        let version = current[name].version.unwrap_or(0);
        tokio::spawn(watch(
            socket.clone(),
            name.clone(),
            version,
            args.ttl,
            tx.clone(),
        ));
    }
    drop(tx);

    use rustix::process::Signal;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut renew_tick = tokio::time::interval(Duration::from_secs(5));
    let mut job_tick = tokio::time::interval(Duration::from_millis(200));
    let status = loop {
        tokio::select! {
            status = running.child.wait() => {
                // What the command left behind in its group goes with it.
                running.end_group(tokio::time::Instant::now() + grace).await;
                break status?;
            }
            Some((name, fetched)) = rotated.recv() => {
                let old = current.insert(name.clone(), fetched);
                match args.on_rotate {
                    OnRotate::Restart => {
                        eprintln!("keywarden exec: {name} rotated; restarting {}", args.command[0]);
                        running.stop(grace).await?;
                        running = match Running::spawn(&args.command, &current, &args.env) {
                            Ok(r) => r,
                            Err(e) => {
                                release(&socket, current.values().map(|f| &f.lease_id)).await;
                                release(&socket, old.iter().map(|f| &f.lease_id)).await;
                                eprintln!("{}", e.message);
                                return Ok(ExitCode::from(e.code));
                            }
                        };
                    }
                    OnRotate::Signal(signal) => running.signal(signal),
                    OnRotate::Nothing => {}
                }
                // Only now does nothing of this process hold the old value.
                release(&socket, old.iter().map(|f| &f.lease_id)).await;
            }
            _ = renew_tick.tick() => renew_due(&socket, &mut current, &ttl_query).await,
            _ = job_tick.tick(), if running.terminal => running.follow_job_control(),
            _ = term.recv() => running.signal(Signal::TERM),
            _ = int.recv() => running.signal(Signal::INT),
            _ = hup.recv() => running.signal(Signal::HUP),
        }
    };
    release(&socket, current.values().map(|f| &f.lease_id)).await;
    Ok(exit_code(status))
}
