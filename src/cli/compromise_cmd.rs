//! `rotate-all [--assume-compromise]`: the plan, a confirmation, the run with progress, and the
//! incident report. Through the daemon when it runs; in this process otherwise.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use hyper::Method;
use serde_json::{Value, json};

use super::Context;
use super::daemon_cmds::admin;
use super::output::print_json;
use crate::clock::Clock;
use crate::daemon::{Mode, Runtime};
use crate::incident::compromise::{
    DEFAULT_CONCURRENCY, MAX_CONCURRENCY, Plan, Progress, Report, describe_plan,
};
use crate::passphrase::{self, Purpose};
use crate::store::{Access, Store};
use crate::store::{Scope, Trigger};
use crate::vault::Vault;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    keywarden rotate-all --assume-compromise --dry-run          # the plan only\n  \
    keywarden rotate-all --assume-compromise --yes --json       # everything, now\n  \
    keywarden rotate-all --tag prod --provider aws-iam --yes    # an ordinary rotation of a scope\n\n\
    Running the same scope again resumes what did not finish. Exit code 1 if anything failed.")]
pub(crate) struct RotateAllArgs {
    /// Secrets to include by name (besides those matched by --tag / --provider).
    names: Vec<String>,
    /// Revoke every lease in scope first, then revoke each old version right after promotion
    /// (no grace). Without it, an ordinary rotation of everything in scope.
    #[arg(long)]
    assume_compromise: bool,
    /// Only secrets with this tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Only secrets of this provider kind (repeatable).
    #[arg(long = "provider", value_name = "KIND")]
    providers: Vec<String>,
    /// Print the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Secrets rotated at once. An incident is bound by this (and by each plugin's
    /// max_concurrency, which the plan names when it binds), not by the routine
    /// [daemon] max_concurrent_rotations.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY as u32, value_parser = clap::value_parser!(u32).range(1..=MAX_CONCURRENCY as i64))]
    concurrency: u32,
    /// Print the report (or, with --dry-run, the plan) as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the run happens.
enum Runner {
    Daemon(std::path::PathBuf),
    Local(Runtime),
}

impl Runner {
    /// The daemon when its admin socket answers; otherwise the store unlocked here, with a
    /// runtime in `mode`.
    async fn connect(ctx: &Context, mode: Mode) -> anyhow::Result<Runner> {
        let socket = ctx.config.agent.admin_socket.clone();
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Ok(Runner::Daemon(socket));
        }
        let store = Store::open_at(&ctx.store_location()?, Access::Shared).await?;
        let passphrase = passphrase::obtain(Purpose::Unlock)?;
        let vault = Arc::new(Vault::unlock(store, &passphrase).await?);
        drop(passphrase);
        Ok(Runner::Local(
            Runtime::start(&ctx.config, vault, Clock::System, mode).await?,
        ))
    }

    async fn stop(self) {
        if let Runner::Local(rt) = self {
            rt.stop(Duration::from_secs(30)).await;
        }
    }

    async fn list(&self) -> anyhow::Result<Vec<Value>> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(socket, Method::GET, "/v1/admin/incidents", None).await?;
                Ok(serde_json::from_value(value)
                    .context("the daemon's incident list is not understood")?)
            }
            Runner::Local(rt) => Ok(rt.incidents.list().await?),
        }
    }

    async fn close(&self, id: &str, actor: &str) -> anyhow::Result<bool> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(
                    socket,
                    Method::POST,
                    &format!("/v1/admin/incidents/{id}/close"),
                    None,
                )
                .await?;
                Ok(value["closed"].as_bool().unwrap_or(false))
            }
            Runner::Local(rt) => Ok(rt.incidents.close(id, actor).await?),
        }
    }

    async fn plan(&self, body: &Value) -> anyhow::Result<Plan> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(
                    socket,
                    Method::POST,
                    "/v1/admin/compromise/plan",
                    Some(body.clone()),
                )
                .await?;
                Ok(serde_json::from_value(value).context("the daemon's plan is not understood")?)
            }
            Runner::Local(rt) => Ok(rt.incidents.plan(&scope_of(body)).await?),
        }
    }

    async fn start(&self, body: &Value) -> anyhow::Result<String> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(
                    socket,
                    Method::POST,
                    "/v1/admin/compromise?wait=0",
                    Some(body.clone()),
                )
                .await?;
                Ok(value["incident_id"]
                    .as_str()
                    .context("no incident id")?
                    .to_string())
            }
            Runner::Local(rt) => Ok(rt
                .incidents
                .start(
                    scope_of(body),
                    body["assume_compromise"].as_bool().unwrap_or(false),
                    body["concurrency"]
                        .as_u64()
                        .map_or(DEFAULT_CONCURRENCY, |c| c as usize),
                    Trigger::Cli,
                )
                .await?),
        }
    }

    /// Counts only: what the progress display polls.
    async fn progress(&self, id: &str) -> anyhow::Result<Progress> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(
                    socket,
                    Method::GET,
                    &format!("/v1/admin/incidents/{id}/progress"),
                    None,
                )
                .await?;
                Ok(serde_json::from_value(value)
                    .context("the daemon's progress is not understood")?)
            }
            Runner::Local(rt) => match rt.incidents.progress(id) {
                Some(p) => Ok(p),
                None => anyhow::bail!("incident {id} is not running here"),
            },
        }
    }

    async fn report(&self, id: &str) -> anyhow::Result<Report> {
        match self {
            Runner::Daemon(socket) => {
                let value = admin(
                    socket,
                    Method::GET,
                    &format!("/v1/admin/incidents/{id}"),
                    None,
                )
                .await?;
                Ok(serde_json::from_value(value)
                    .context("the daemon's report is not understood")?)
            }
            Runner::Local(rt) => Ok(rt.incidents.report(id).await?),
        }
    }
}

fn scope_of(body: &Value) -> Scope {
    serde_json::from_value(json!({
        "all": body["all"],
        "names": body["names"],
        "tags": body["tags"],
        "providers": body["providers"],
    }))
    .unwrap_or_default()
}

/// `keywarden incident …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum IncidentCommand {
    /// Every incident: when it started, whether it is open, finished or closed, its scope.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One incident's report: rotated, failed, left to a person, resolved since, pending.
    Show {
        /// The incident id (from `incident list` or the run's report).
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Close an incident by hand: it counts as finished and is never resumed, and a run of its
    /// scope starts a new one. For what a person has dealt with outside keywarden.
    Close {
        /// The incident id.
        id: String,
    },
}

/// `keywarden incident list|show|close`: through the daemon when it runs; in this process
/// otherwise (asks for the passphrase).
pub(crate) async fn incident(ctx: &Context, cmd: IncidentCommand) -> anyhow::Result<ExitCode> {
    let runner = Runner::connect(ctx, Mode::Inspect).await?;
    let outcome = match cmd {
        IncidentCommand::List { json } => {
            let list = runner.list().await?;
            if json {
                print_json(&list)?;
            } else {
                print_incidents(&list)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Show { id, json } => {
            let report = runner.report(&id).await?;
            if json {
                print_json(&report)?;
            } else {
                print_report(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Close { id } => {
            if runner.close(&id, &ctx.actor).await? {
                println!("incident {id} closed");
            } else {
                println!("incident {id} was already closed");
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    runner.stop().await;
    outcome
}

fn print_incidents(list: &[Value]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let text = |k: &str| i[k].as_str().unwrap_or("-").to_string();
            let state = match (i["finished_at"].as_str(), i["closed_by"].as_str()) {
                (_, Some(by)) => format!("closed by {by}"),
                (Some(_), None) => "finished".to_string(),
                (None, None) => "OPEN".to_string(),
            };
            vec![
                text("incident_id"),
                text("started_at"),
                state,
                i["scope"].to_string(),
                i["leases_revoked"].to_string(),
            ]
        })
        .collect();
    super::output::print_table(
        &["INCIDENT", "STARTED", "STATE", "SCOPE", "LEASES REVOKED"],
        &rows,
    )
}

pub(crate) async fn rotate_all(ctx: &Context, args: RotateAllArgs) -> anyhow::Result<ExitCode> {
    for name in &args.names {
        crate::name::validate(name)?;
    }
    let body = json!({
        "all": args.names.is_empty() && args.tags.is_empty() && args.providers.is_empty(),
        "names": args.names,
        "tags": args.tags,
        "providers": args.providers,
        "assume_compromise": args.assume_compromise,
        "concurrency": args.concurrency,
    });
    let runner = Runner::connect(ctx, Mode::Maintenance).await?;
    let outcome = run(&runner, &args, &body).await;
    runner.stop().await;
    outcome
}

async fn run(runner: &Runner, args: &RotateAllArgs, body: &Value) -> anyhow::Result<ExitCode> {
    let plan = runner.plan(body).await?;
    if args.dry_run {
        if args.json {
            print_json(&plan)?;
        } else {
            println!(
                "{}",
                describe_plan(&plan, args.concurrency as usize).join("\n")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The plan goes to stderr so that --json leaves one document on stdout.
    eprintln!(
        "{}",
        describe_plan(&plan, args.concurrency as usize).join("\n")
    );
    if !args.yes {
        confirm(args, &plan)?;
    }
    let id = runner.start(body).await?;
    let report = follow(runner, &id, plan.secrets.len()).await?;
    if args.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Asks on the terminal before acting; refuses when there is no terminal to ask on.
fn confirm(args: &RotateAllArgs, plan: &Plan) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to run without --yes: stdin is not a terminal to confirm on");
    }
    eprint!(
        "{} {} secret(s){}. Type 'yes' to proceed: ",
        if args.assume_compromise {
            "Assume compromise: rotate and revoke"
        } else {
            "Rotate"
        },
        plan.secrets.len(),
        if args.assume_compromise {
            format!(" and revoke {} lease(s)", plan.live_leases)
        } else {
            String::new()
        }
    );
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!("not confirmed; nothing was done");
    }
    Ok(())
}

/// Shows the run's progress on stderr until it finishes, and returns its report.
/// Shows the run's progress until it is over, then returns its report. On a terminal, a
/// progress bar with counts, rate and ETA; otherwise a line every few seconds. Each poll
/// costs the daemon the same whatever the number of secrets (counts kept as the run goes); the
/// full report is read once, at the end.
async fn follow(runner: &Runner, id: &str, total: usize) -> anyhow::Result<Report> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} secrets · {per_sec} · ETA {eta} {msg}",
            )
            .expect("a valid template"),
        );
        bar
    });
    let mut last_line = std::time::Instant::now();
    loop {
        let progress = runner.progress(id).await?;
        let line = format!(
            "incident {id}: {}/{} handled, {} failed",
            progress.done, progress.total, progress.failed
        );
        match &bar {
            Some(bar) => {
                bar.set_length(progress.total as u64);
                bar.set_position(progress.done as u64);
                if progress.failed > 0 {
                    bar.set_message(format!("· {} failed", progress.failed));
                }
            }
            None if progress.finished || last_line.elapsed() >= PROGRESS_LINE_EVERY => {
                eprintln!("{line}");
                last_line = std::time::Instant::now();
            }
            None => {}
        }
        if progress.finished {
            if let Some(bar) = &bar {
                bar.finish();
            }
            return runner.report(id).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How often progress is printed when stderr is not a terminal.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(5);

fn print_report(report: &Report) {
    println!(
        "incident {}{}: rotated {}, failed {}, leases revoked {}",
        report.incident_id,
        if report.finished {
            ""
        } else {
            " (in progress)"
        },
        report.rotated.len(),
        report.failed.len(),
        report.leases_revoked
    );
    for name in &report.rotated {
        println!("  rotated  {name}");
    }
    for f in report
        .failed
        .iter()
        .filter(|f| !report.needs_person.contains(f))
    {
        println!("  FAILED   {}: {}", f.name, f.error);
    }
    for f in &report.needs_person {
        println!("  PERSON   {}: {}", f.name, f.error);
    }
    for name in &report.resolved {
        println!("  resolved {name}: a new value was stored after the incident started");
    }
    for name in &report.pending {
        println!("  pending  {name}");
    }
    if report.failed.len() > report.needs_person.len() {
        println!(
            "run the same command again to retry what failed (incident {})",
            report.incident_id
        );
    }
}
