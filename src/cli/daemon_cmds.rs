//! `serve`, `rotate`, `status` and `plugin pin`: the commands around the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::Value;

use super::Context;
use super::output::{print_json, print_table, relative};
use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::{Mode, Runtime};
use crate::http;
use crate::passphrase::{self, Purpose};
use crate::services::RunEnd;
use crate::store::Reason;
use crate::store::postgres::leader::{Role, Timing};
use crate::store::{Access, Location, Store, StoreError};
use crate::vault::Vault;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Create the store first if it does not exist (for first runs and quickstarts).
    #[arg(long)]
    init: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// The secret to rotate (declared in the config).
    name: String,
    /// Return once the rotation is planned instead of waiting for it to settle.
    #[arg(long)]
    no_wait: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print {"daemon","alerts","incidents","secrets","audit"} as JSON (docs/socket-api.md,
    /// `GET /v1/admin/status`).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PluginCommand {
    /// Print the `[plugins.NAME]` lines for an executable, with its SHA-256.
    Pin {
        /// The plugin executable (or script).
        path: PathBuf,
        /// The name under [plugins] (default: the file name without `keywarden-plugin-`).
        #[arg(long)]
        name: Option<String>,
    },
}

/// SIGTERM and SIGINT, caught from the moment `serve` starts (so a stop request during start-up
/// is honoured once the daemon is up, rather than killing it half-way).
/// The signals `serve` acts on: SIGTERM and SIGINT stop it, SIGHUP reloads its config.
struct DaemonSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// What ends one run of the daemon's services.
enum Next {
    /// Stop, on this signal.
    Stop(&'static str),
    /// Start them again with this config (read and checked on SIGHUP).
    Reload(Box<Config>),
    /// This daemon's part in its PostgreSQL store's leadership changed: start them again in
    /// the other part.
    RoleChanged,
}

impl Next {
    /// Says in the log (and to systemd) why this run ends, and how.
    fn announce(&self, mode: Mode) -> RunEnd {
        match self {
            Next::Stop(signal) => {
                tracing::info!(signal, "stop requested");
                crate::daemon::notify::stopping();
                RunEnd::Stop
            }
            Next::Reload(_) => {
                tracing::info!("SIGHUP: reloading the config; restarting the services on it");
                crate::daemon::notify::reloading();
                RunEnd::Restart
            }
            Next::RoleChanged => {
                if mode == Mode::Daemon {
                    tracing::warn!(
                        "this daemon no longer leads the store: it stops rotating and follows"
                    );
                } else {
                    tracing::info!(
                        "this daemon now leads the store: restarting its services as the leader"
                    );
                }
                RunEnd::Restart
            }
        }
    }
}

impl DaemonSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(DaemonSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for a stop, or for a SIGHUP whose config reads and checks; a config that does
    /// not is refused with an error in the log, and the daemon goes on as it is.
    async fn next(&mut self, ctx: &Context, running: &Config) -> Next {
        loop {
            tokio::select! {
                _ = self.term.recv() => return Next::Stop("SIGTERM"),
                _ = self.int.recv() => return Next::Stop("SIGINT"),
                _ = self.hup.recv() => match reread(ctx, running) {
                    Ok(config) => return Next::Reload(Box::new(config)),
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "SIGHUP: the config was not reloaded; the daemon goes on with the one it runs"
                    ),
                },
            }
        }
    }
}

/// The config file read again, if it parses and checks and names the same store.
fn reread(ctx: &Context, running: &Config) -> anyhow::Result<Config> {
    let Some(path) = &ctx.config_path else {
        bail!("the daemon runs on the built-in defaults: there is no config file to read");
    };
    let config = Config::load(path)?;
    let (now, next) = (
        running.store_location(ctx.store_override.as_deref())?,
        config.store_location(ctx.store_override.as_deref())?,
    );
    if now != next {
        bail!("[store] changed ({now} -> {next}): a different store needs a restart");
    }
    Ok(config)
}

/// What a run of the services is on a PostgreSQL store, from the campaign's `role` now: the
/// leader's run (its writes fenced by its term), or a follower's.
fn mode_for(role: Option<&mut tokio::sync::watch::Receiver<Role>>, vault: &Vault) -> Mode {
    let Some(role) = role else {
        return Mode::Daemon;
    };
    let now = *role.borrow_and_update();
    match now {
        Role::Leader { term } => {
            tracing::info!(
                term,
                "this daemon leads the store: it runs rotations and incidents"
            );
            if let Some(pg) = vault.store().postgres() {
                pg.fence_writes(Some(term));
            }
            Mode::Daemon
        }
        Role::Follower => {
            tracing::info!(
                "another daemon leads the store: this one serves its host's agents and takes \
                 over when the leader's lease runs out"
            );
            Mode::Follower
        }
    }
}

/// Resolves once `role` no longer fits the run's `mode` (never where there is no campaign, or
/// once the campaign has ended at a stop).
async fn role_changed(role: Option<&mut tokio::sync::watch::Receiver<Role>>, mode: Mode) {
    let Some(role) = role else {
        return std::future::pending().await;
    };
    let changed = role
        .wait_for(|r| matches!(r, Role::Leader { .. }) != (mode == Mode::Daemon))
        .await;
    if changed.is_err() {
        std::future::pending::<()>().await;
    }
}

/// On PostgreSQL the daemon campaigns for the store's leadership from its start until `stop`,
/// and runs its services as the leader or as a follower, as the role watch says
/// (docs/design.md §13); `None` on SQLite.
fn start_campaign(
    ctx: &Context,
    vault: &Vault,
    stop: &tokio::sync::watch::Sender<bool>,
) -> Option<(
    tokio::sync::watch::Receiver<Role>,
    tokio::task::JoinHandle<()>,
)> {
    let timing = Timing {
        ttl: ctx.config.store.leader_lease,
    };
    let pg = vault.store().postgres()?;
    Some(pg.candidate(timing).campaign(stop.subscribe()))
}

/// Whether a store is already at `location`.
async fn store_exists(location: &Location) -> anyhow::Result<bool> {
    match location {
        Location::File(path) => Ok(path.exists()),
        Location::Postgres(_) => match Store::open_at(location, Access::ReadOnly).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotInitialized { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        },
    }
}

/// Asks for the passphrase, creates the store first when `creating`, opens it for the daemon
/// and unlocks it.
async fn unlock(ctx: &Context, location: &Location, creating: bool) -> anyhow::Result<Arc<Vault>> {
    let passphrase = passphrase::obtain(if creating {
        Purpose::Create
    } else {
        Purpose::Unlock
    })?;
    if creating {
        Vault::init_at(location, &passphrase, ctx.config.store.kdf, &ctx.actor).await?;
        tracing::info!(store = %location, "created a new store");
    }
    let store = match location {
        Location::File(path) => Store::open_for_daemon(path, ctx.config.daemon.lock_wait).await?,
        Location::Postgres(url) => Store::open_postgres(url, Access::Exclusive).await?,
    };
    Ok(Arc::new(Vault::unlock(store, &passphrase).await?))
}

/// The next stop, reload or role change, if one comes within `wait`.
async fn signal_within(
    signals: &mut DaemonSignals,
    ctx: &Context,
    config: &Config,
    wait: Duration,
) -> Option<Next> {
    tokio::select! {
        why = signals.next(ctx, config) => Some(why),
        _ = tokio::time::sleep(wait) => None,
    }
}

/// A leader resigns once its services have stopped, so another daemon takes over at once.
async fn resign(
    campaign_stop: &tokio::sync::watch::Sender<bool>,
    campaign: Option<tokio::task::JoinHandle<()>>,
) {
    let _ = campaign_stop.send(true);
    if let Some(campaign) = campaign {
        let _ = campaign.await;
    }
}

/// `keywarden serve`: unlocks the store (creating it with `--init`), binds the sockets and
/// runs the services until a stop, starting them again on a reload or a change of leader.
pub(crate) async fn serve(ctx: &Context, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut signals = DaemonSignals::install()?;
    let location = ctx.store_location()?;
    let creating = args.init && !store_exists(&location).await?;
    let vault = unlock(ctx, &location, creating).await?;
    let (campaign_stop, _) = tokio::sync::watch::channel(false);
    let (mut role, campaign) = start_campaign(ctx, &vault, &campaign_stop).unzip();
    // The services run until a stop; a reload stops them and starts them again with the new
    // config on the same unlocked store and the same sockets. If they cannot start with it,
    // the previous one is put back.
    let mut sockets = match crate::daemon::Sockets::bind(&ctx.config) {
        Ok(sockets) => sockets,
        Err(e) => {
            if let (true, Location::File(path)) = (creating, &location) {
                remove_created_store(path, &e)?;
            }
            return Err(e.into());
        }
    };
    let mut running: Option<Box<Config>> = None;
    let mut previous: Option<Option<Box<Config>>> = None;
    let mut served_once = false;
    let mut unavailable_wait = StartRetry::default();
    let outcome = loop {
        let config = running.as_deref().unwrap_or(&ctx.config);
        if !sockets.fit(config) {
            // The new config moves a socket: the old one goes, the new one is bound.
            sockets.release();
            sockets = match crate::daemon::Sockets::bind(config) {
                Ok(sockets) => sockets,
                Err(e) => break Err(e),
            };
        }
        let mode = mode_for(role.as_mut(), &vault);
        let mut next = None;
        let until = async {
            let why = tokio::select! {
                why = signals.next(ctx, config) => why,
                _ = role_changed(role.as_mut(), mode) => Next::RoleChanged,
            };
            let end = why.announce(mode);
            next = Some(why);
            end
        };
        let served = crate::daemon::serve_on(config, vault.clone(), &sockets, mode, until).await;
        if let Some(pg) = vault.store().postgres() {
            pg.fence_writes(None);
        }
        served_once |= served.is_ok();
        if served.is_ok() {
            unavailable_wait = StartRetry::default();
        }
        match (served, next) {
            (Ok(()), Some(Next::Reload(config))) => {
                previous = Some(running.take());
                running = Some(config);
            }
            (Ok(()), Some(Next::RoleChanged)) => {}
            (Ok(()), _) => break Ok(()),
            // The services ran before and the store is out of reach for now (a PostgreSQL
            // leader that lost its database steps down, then cannot start as a follower):
            // try again until it answers or a stop comes; exiting would need a person.
            (Err(e), _) if served_once && e.store_unavailable() => {
                let wait = unavailable_wait.next();
                tracing::error!(error = %e, retry_in = ?wait, "the services cannot start: the store is unavailable; trying again");
                match signal_within(&mut signals, ctx, config, wait).await {
                    Some(Next::Stop(signal)) => {
                        tracing::info!(signal, "stop requested");
                        break Ok(());
                    }
                    Some(Next::Reload(config)) => {
                        previous = Some(running.take());
                        running = Some(config);
                    }
                    Some(Next::RoleChanged) | None => {}
                }
            }
            (Err(e), _) if previous.is_some() => {
                tracing::error!(error = %e, "the reloaded config does not start; going back to the previous one");
                running = previous.take().flatten();
            }
            (Err(e), _) => break Err(e),
        }
    };
    sockets.remove();
    resign(&campaign_stop, campaign).await;
    if let Err(e) = outcome {
        if let (true, false, Location::File(path)) = (creating, served_once, &location) {
            // The daemon never started on the store it just created: a bad config must not
            // leave a store behind (its passphrase, typed once, may not be what the user meant).
            remove_created_store(path, &e)?;
        }
        return Err(e.into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits between starts of the services while the store is unavailable: 250 ms, doubling, at
/// most 5 s.
#[derive(Debug, Default)]
struct StartRetry(u32);

impl StartRetry {
    fn next(&mut self) -> Duration {
        let wait = Duration::from_millis(250) * 2u32.pow(self.0.min(5));
        self.0 += 1;
        wait.min(Duration::from_secs(5))
    }
}

/// Removes the store a failed first start created; says so in the error.
fn remove_created_store(path: &Path, e: &crate::daemon::ServeError) -> anyhow::Result<()> {
    let mut removed = true;
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut file = path.to_path_buf().into_os_string();
        file.push(suffix);
        if let Err(err) = std::fs::remove_file(&file) {
            removed &= err.kind() == std::io::ErrorKind::NotFound;
        }
    }
    if removed {
        bail!("{e} (the store this start created was removed)");
    }
    Ok(())
}

/// `status`'s leadership lines: the leader (its term and lease on PostgreSQL) and the daemons
/// (on PostgreSQL, when each was last heard from).
fn leadership_lines(leadership: &Value) -> Vec<String> {
    if !leadership.is_object() {
        return Vec::new();
    }
    let mut lines = vec![match leadership["leader"].as_object() {
        Some(l) if l.contains_key("term") => format!(
            "leader: {} pid {} (term {}, lease {} ms left)",
            l["host"].as_str().unwrap_or("?"),
            l["pid"],
            l["term"],
            l["valid_for_ms"]
        ),
        Some(l) => format!(
            "leader: {} pid {} (it holds the store's lock)",
            l["host"].as_str().unwrap_or("?"),
            l["pid"]
        ),
        None => "leader: none (the last lease ran out)".to_string(),
    }];
    for d in leadership["daemons"].as_array().into_iter().flatten() {
        let seen = d["seen_ms_ago"]
            .as_i64()
            .map_or(String::new(), |ms| format!(" (seen {ms} ms ago)"));
        lines.push(format!(
            "daemon {} pid {}: {}{seen}",
            d["host"].as_str().unwrap_or("?"),
            d["pid"],
            d["role"].as_str().unwrap_or("?"),
        ));
    }
    lines
}

/// Whether a daemon answers on the admin socket.
pub(super) async fn daemon_socket(ctx: &Context) -> Option<&Path> {
    let socket = ctx.config.agent.admin_socket.as_path();
    tokio::net::UnixStream::connect(socket)
        .await
        .ok()
        .map(|_| socket)
}

fn rotate_outcome(result: &Value, json_out: bool) -> anyhow::Result<ExitCode> {
    let state = result["state"].as_str().unwrap_or("");
    let failed = matches!(state, "failed" | "rolled-back") || result["quarantined"] == true;
    if json_out {
        print_json(result)?;
    } else {
        let secret = result["secret"].as_str().unwrap_or("");
        let versions = format!(
            "{} -> {}",
            result["from_version"]
                .as_i64()
                .map_or("none".into(), |v| v.to_string()),
            result["to_version"]
                .as_i64()
                .map_or("?".into(), |v| v.to_string())
        );
        if result["joined"] == true {
            // Nothing new was started: say what is under way and what it waits for.
            let waiting = &result["waiting_for"];
            let waits = if state == "draining" {
                format!(
                    "; it waits for {} lease(s) on version {} to end, and revokes that version by {} at the latest",
                    waiting["leases"].as_i64().unwrap_or(0),
                    result["from_version"].as_i64().unwrap_or(0),
                    waiting["until"]
                        .as_str()
                        .unwrap_or("the end of its grace period"),
                )
            } else {
                String::new()
            };
            println!(
                "{secret}: a rotation was already under way ({versions}, {state}); no new one was started{waits}"
            );
        } else if failed {
            eprintln!(
                "rotation of {secret} {state}{}: {}",
                if result["quarantined"] == true {
                    " (secret quarantined)"
                } else {
                    ""
                },
                result["quarantine_reason"]
                    .as_str()
                    .or(result["last_error"].as_str())
                    .unwrap_or("see `keywarden status`")
            );
        } else if state == "draining" {
            println!(
                "rotated {secret} ({versions}); the old version is revoked once its leases expire"
            );
        } else {
            println!("rotated {secret} ({versions}): {state}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) async fn rotate(ctx: &Context, args: RotateArgs) -> anyhow::Result<ExitCode> {
    crate::name::validate(&args.name)?;
    let store = match Store::open_at(&ctx.store_location()?, Access::Shared).await {
        Ok(store) => store,
        Err(StoreError::Locked { .. }) => {
            let socket = daemon_socket(ctx)
                .await
                .context("the daemon holds the store but its admin socket does not answer")?;
            let wait = if args.no_wait { 0 } else { 600 };
            let body = admin(
                socket,
                Method::POST,
                &format!("/v1/admin/rotate/{}?wait={wait}", args.name),
                None,
            )
            .await?;
            return rotate_outcome(&body, args.json);
        }
        Err(e) => return Err(e.into()),
    };
    // No daemon: run the rotation here, with the plugins, and wait for it.
    let passphrase = passphrase::obtain(Purpose::Unlock)?;
    let vault = Arc::new(Vault::unlock(store, &passphrase).await?);
    drop(passphrase);
    let runtime = Runtime::start(&ctx.config, vault, Clock::System, Mode::OneShot).await?;
    let engine = runtime.engine.clone();
    let outcome = async {
        let ticket = engine
            .request(&args.name, Reason::Manual, false, None)
            .await?;
        let grace = engine
            .catalog()
            .secrets
            .get(&args.name)
            .map_or(Duration::ZERO, |s| s.grace);
        let mut record = engine
            .wait(&ticket.rotation_id, Duration::from_secs(600))
            .await?;
        if record
            .as_ref()
            .is_some_and(|r| r.state == crate::store::RotationState::Draining)
            && !args.no_wait
        {
            eprintln!("waiting for leases on the old version to expire (at most {grace:?})...");
            let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(60);
            while record.as_ref().is_some_and(|r| !r.state.is_terminal())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                record = engine.vault().store().rotation(&ticket.rotation_id).await?;
            }
        }
        let record = record.context("the rotation vanished")?;
        let summary = engine.vault().store().secret_summary(&args.name).await?;
        let quarantine =
            summary.and_then(|s| s.quarantined_at.map(|_| s.last_error.unwrap_or_default()));
        anyhow::Ok(crate::admin::rotation_outcome(
            &record,
            ticket.joined,
            quarantine,
        ))
    }
    .await;
    runtime.stop(Duration::from_secs(10)).await;
    rotate_outcome(&outcome?, args.json)
}

/// What `status` says of a store that refuses the daemon's writes (`store` of the report).
fn store_lines(store: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(error) = store["error"].as_str() {
        lines.push(format!(
            "STORE WRITES FAILING since {} (fetches are refused until it takes writes): {error}",
            store["failing_since"].as_str().unwrap_or("?")
        ));
    }
    if let Some(rows) = store["brokered_rows_waiting"].as_u64().filter(|n| *n > 0) {
        lines.push(format!(
            "BROKERED REQUESTS REFUSED: {rows} audit rows of brokered requests wait for the store to take them"
        ));
    }
    lines
}

pub(crate) async fn status(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let report = match daemon_socket(ctx).await {
        Some(socket) => admin(socket, Method::GET, "/v1/admin/status", None).await?,
        None => {
            let store = ctx.open_store(Access::ReadOnly).await?;
            crate::status::report(&store, None).await?
        }
    };
    if args.json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    let running = report["daemon"]["running"] == true;
    println!(
        "daemon: {}",
        if running { "running" } else { "not running" }
    );
    for p in report["daemon"]["plugins"].as_array().into_iter().flatten() {
        println!(
            "plugin {}: {} (restarts {})",
            p["name"].as_str().unwrap_or(""),
            if p["running"] == true {
                "running"
            } else {
                "stopped"
            },
            p["restarts"]
        );
    }
    for line in store_lines(&report["store"])
        .into_iter()
        .chain(leadership_lines(&report["leadership"]))
    {
        println!("{line}");
    }
    super::broker_cmd::print_brokers(&report["brokers"]);
    println!(
        "audit chain: {} rows, head {}",
        report["audit"]["rows"],
        report["audit"]["head"].as_str().unwrap_or("-")
    );
    let secrets = report["secrets"].as_array().map_or(&[][..], Vec::as_slice);
    print_secrets(secrets)?;
    for a in report["alerts"].as_array().into_iter().flatten() {
        println!(
            "ALERT {} {} {}: {} (acknowledge with `keywarden alerts ack {}`)",
            a["id"],
            a["at"].as_str().unwrap_or(""),
            a["kind"].as_str().unwrap_or(""),
            a["message"].as_str().unwrap_or(""),
            a["id"]
        );
    }
    for w in report["warnings"].as_array().into_iter().flatten() {
        println!(
            "WARNING {}: {}",
            w["secret"].as_str().unwrap_or(""),
            w["message"].as_str().unwrap_or("")
        );
    }
    for i in report["incidents"].as_array().into_iter().flatten() {
        println!(
            "OPEN INCIDENT {} (started {}, scope {}): see `keywarden incident show {}`",
            i["incident_id"].as_str().unwrap_or(""),
            i["started_at"].as_str().unwrap_or(""),
            i["scope"],
            i["incident_id"].as_str().unwrap_or("")
        );
    }
    for p in report["needs_person"].as_array().into_iter().flatten() {
        println!(
            "NEEDS A PERSON {} (incident {}): {}",
            p["name"].as_str().unwrap_or(""),
            p["incident_id"].as_str().unwrap_or(""),
            p["error"].as_str().unwrap_or("")
        );
    }
    for s in report["secrets"].as_array().into_iter().flatten() {
        if s["version"].is_null() && s["provider"] == "manual" {
            println!(
                "NO VALUE {}: store one with `keywarden put {}`",
                s["name"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or("")
            );
        }
        if s["quarantined"] == true {
            println!(
                "QUARANTINED {}: {} (resume with `keywarden rotate {}`)",
                s["name"].as_str().unwrap_or(""),
                s["last_error"].as_str().unwrap_or("no error recorded"),
                s["name"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn when(v: &Value) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or("-".into(), |t| relative(t.timestamp_millis()))
}

/// The `list`/`status` table of [`crate::status::secret_entry`] values.
pub(crate) fn print_secrets(secrets: &[Value]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = secrets.iter().map(secret_row).collect();
    print_table(
        &[
            "NAME",
            "PROVIDER",
            "VERSION",
            "AGE",
            "LAST ROTATED",
            "NEXT ROTATION",
            "STATE",
        ],
        &rows,
    )
}

/// A row of the `list`/`status` table from a [`crate::status::secret_entry`].
fn secret_row(s: &Value) -> Vec<String> {
    let state = match (s["rotation_state"].as_str(), s["quarantined"] == true) {
        (_, true) => "QUARANTINED".to_string(),
        (Some(state), false) => state.to_string(),
        (None, false) => "-".to_string(),
    };
    vec![
        s["name"].as_str().unwrap_or("").to_string(),
        s["provider"].as_str().unwrap_or("").to_string(),
        s["version"].as_i64().map_or("-".into(), |v| v.to_string()),
        when(&s["updated_at"]),
        when(&s["last_rotated_at"]),
        when(&s["next_rotation_at"]),
        state,
    ]
}

pub(crate) fn plugin(cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginCommand::Pin { path, name } => {
            let absolute = std::fs::canonicalize(&path)
                .with_context(|| format!("cannot find {}", path.display()))?;
            let sha = crate::crypto::file_sha256(&absolute)
                .with_context(|| format!("cannot read {}", absolute.display()))?;
            let name = name.unwrap_or_else(|| {
                let stem = absolute
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                stem.strip_prefix("keywarden-plugin-")
                    .unwrap_or(&stem)
                    .to_string()
            });
            println!("[plugins.{name}]");
            println!("command = [{:?}]", absolute.display().to_string());
            println!("sha256 = \"{sha}\"");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends one request to the daemon's admin socket; returns its JSON reply, or the daemon's
/// error message as the error.
pub(super) async fn admin(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, bytes) = http::request(socket, method, path, body)
        .await
        .with_context(|| format!("cannot reach the daemon at {}", socket.display()))?;
    let value: Value = serde_json::from_slice(&bytes).context("the daemon's reply is not JSON")?;
    if !(status == StatusCode::OK || status == StatusCode::ACCEPTED) {
        bail!(
            "{}",
            value["error"]["message"]
                .as_str()
                .unwrap_or("the daemon refused")
        );
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_says_when_a_daemon_was_seen_only_where_the_store_knows() {
        // A SQLite store's leader holds its lock: nothing records when it was last seen.
        let sqlite = serde_json::json!({
            "leader": { "host": "h", "pid": 7 },
            "term": null,
            "daemons": [{ "host": "h", "pid": 7, "role": "leader" }],
        });
        assert_eq!(
            leadership_lines(&sqlite),
            [
                "leader: h pid 7 (it holds the store's lock)",
                "daemon h pid 7: leader"
            ]
        );
        let postgres = serde_json::json!({
            "leader": { "host": "a", "pid": 1, "term": 3, "valid_for_ms": 900 },
            "term": 3,
            "daemons": [
                { "host": "a", "pid": 1, "role": "leader", "seen_ms_ago": 12 },
                { "host": "b", "pid": 2, "role": "follower", "seen_ms_ago": 340 },
            ],
        });
        assert_eq!(
            leadership_lines(&postgres),
            [
                "leader: a pid 1 (term 3, lease 900 ms left)",
                "daemon a pid 1: leader (seen 12 ms ago)",
                "daemon b pid 2: follower (seen 340 ms ago)"
            ]
        );
        assert!(leadership_lines(&Value::Null).is_empty());
    }
}
