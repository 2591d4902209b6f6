//! The command line: argument definitions, the shared context, and dispatch to one module per
//! group of commands.

mod agent_cmds;
mod alerts_cmd;
mod audit_cmd;
mod backup_cmd;
mod broker_cmd;
mod compromise_cmd;
mod daemon_cmds;
mod output;
mod scan_cmd;
mod vault_cmds;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::passphrase::{self, Purpose};
use crate::store::{Access, Store};
use crate::vault::Vault;

/// keywarden: a secrets vault and automatic key-rotation daemon.
#[derive(Debug, Parser)]
#[command(
    name = "keywarden",
    version,
    about = "Secrets vault and automatic key-rotation daemon",
    long_about = "keywarden keeps credentials encrypted in a local SQLite store, rotates them on \
                  schedule through provider plugins, and hands them to agents over a Unix socket.\n\n\
                  The passphrase is read from KEYWARDEN_PASSPHRASE, the file named by \
                  KEYWARDEN_PASSPHRASE_FILE, $CREDENTIALS_DIRECTORY/passphrase (systemd), or a \
                  prompt on a terminal.",
    after_help = "Start here:\n  keywarden init                       create a store\n  \
                  printf %s \"$KEY\" | keywarden put openai/prod   store a value (read from stdin)\n  \
                  keywarden get openai/prod            print it\n  \
                  keywarden list                       what is stored\n  \
                  keywarden audit verify               check the audit chain"
)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/keywarden/keywarden.toml, else
    /// ~/.config/keywarden/keywarden.toml, whichever exists first; else built-in defaults.
    #[arg(long, global = true, env = "KEYWARDEN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Store file, overriding the config's `[store] path`.
    #[arg(long, global = true, env = "KEYWARDEN_STORE", value_name = "PATH")]
    store: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level filter on stderr (also KEYWARDEN_LOG), e.g. `info` or `keywarden=debug`.
    #[arg(long, global = true, env = "KEYWARDEN_LOG", value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new store with a fresh root key, wrapped under the passphrase.
    Init(vault_cmds::InitArgs),
    /// Store a new version of a secret; the value is read from stdin or --value-file, never argv.
    Put(vault_cmds::PutArgs),
    /// Print a secret's value (the current version unless --version).
    Get(vault_cmds::GetArgs),
    /// List secrets with their versions and rotation state; never values.
    List(vault_cmds::ListArgs),
    /// Remove a secret: destroys its data key, so no version of it can be opened again.
    Rm(vault_cmds::RmArgs),
    /// Change the passphrase (rewraps the root key; values are untouched).
    Passwd(vault_cmds::PasswdArgs),
    /// Replace the root key and rewrap every data key under it (values are untouched; with
    /// --data-keys, new data keys and every value re-encrypted).
    Rekey(vault_cmds::RekeyArgs),
    /// Write a consistent copy of the store to a file, while the daemon runs or not (values
    /// stay sealed: the passphrase current now opens it).
    Backup(backup_cmd::BackupArgs),
    /// Replace the store with a backup, once every value in it opens with the passphrase and its
    /// audit chain holds (the daemon stopped; the replaced store is kept, renamed).
    Restore(backup_cmd::RestoreArgs),
    /// Check or print the audit chain.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Run the daemon: scheduler, rotation engine, plugins and sockets.
    Serve(daemon_cmds::ServeArgs),
    /// Rotate one secret now (through the daemon when it runs, directly otherwise).
    Rotate(daemon_cmds::RotateArgs),
    /// Show versions, ages, last and next rotations, rotation states and quarantines.
    Status(daemon_cmds::StatusArgs),
    /// Plugin helpers.
    #[command(subcommand)]
    Plugin(daemon_cmds::PluginCommand),
    /// Run a command with secrets in its environment; restart or signal it when they rotate.
    Exec(agent_cmds::ExecArgs),
    /// Rotate everything in a scope now; with --assume-compromise, revoke leases and old
    /// versions without grace. Prints the plan first, then an incident report.
    RotateAll(compromise_cmd::RotateAllArgs),
    /// Show what a credential harvester would take from this host (never the values), and
    /// which of it is a copy of a secret keywarden manages.
    Scan(scan_cmd::ScanArgs),
    /// Move plaintext credentials from a `.env` file or the environment into the store.
    Import(scan_cmd::ImportArgs),
    /// List alerts, or acknowledge them so they leave `status`.
    #[command(subcommand)]
    Alerts(alerts_cmd::AlertsCommand),
    /// List compromise incidents, show one's report, or close one by hand.
    #[command(subcommand)]
    Incident(compromise_cmd::IncidentCommand),
    /// Block or unblock a broker, or see what its callers spent today.
    #[command(subcommand)]
    Broker(broker_cmd::BrokerCommand),
}

/// What every command can use: the parsed config and the CLI's overrides.
pub(crate) struct Context {
    config: Config,
    /// Where `config` was read from (none: the built-in defaults); `serve` reads it again on
    /// SIGHUP.
    config_path: Option<PathBuf>,
    store_override: Option<PathBuf>,
    actor: String,
    /// What the process started with, for the commands `exec` runs.
    inherited: crate::hardening::Inherited,
}

impl Context {
    /// The store's file (for the commands that work on one: `backup`, `restore`).
    fn store_path(&self) -> anyhow::Result<PathBuf> {
        Ok(self.config.store_path(self.store_override.as_deref())?)
    }

    /// Where the store is: a file, or a PostgreSQL database.
    fn store_location(&self) -> anyhow::Result<crate::store::Location> {
        Ok(self.config.store_location(self.store_override.as_deref())?)
    }

    async fn open_store(&self, access: Access) -> anyhow::Result<Store> {
        Ok(Store::open_at(&self.store_location()?, access).await?)
    }

    /// Opens the store for writing and unlocks it with the passphrase.
    async fn unlock(&self) -> anyhow::Result<Vault> {
        let store = self.open_store(Access::Shared).await?;
        let passphrase = passphrase::obtain(Purpose::Unlock)?;
        Ok(Vault::unlock(store, &passphrase).await?)
    }
}

fn init_logging(format: LogFormat, filter: Option<&str>, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// An error and its causes on one line, each said once: most of keywarden's errors already
/// name their cause (`cannot read … : No such file or directory`), which the chain repeats.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Parses the command line and runs the command. Exit codes: 0 ok, 1 failure, 2 usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the runtime starts its threads (see the function for why).
    crate::sys::limit_malloc_arenas(2);
    // The daemon reports what it does; one-shot commands only warn.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, cli.log.as_deref(), default_level);
    let inherited = crate::hardening::harden_process(matches!(cli.command, Command::Exec(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, inherited)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, inherited: crate::hardening::Inherited) -> anyhow::Result<ExitCode> {
    let config_path = cli
        .config
        .clone()
        .or_else(crate::config::default_config_path);
    let config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let ctx = Context {
        config,
        config_path,
        store_override: cli.store,
        actor: format!("cli uid={}", rustix::process::getuid().as_raw()),
        inherited,
    };
    match cli.command {
        Command::Init(args) => vault_cmds::init(&ctx, args).await,
        Command::Put(args) => vault_cmds::put(&ctx, args).await,
        Command::Get(args) => vault_cmds::get(&ctx, args).await,
        Command::List(args) => vault_cmds::list(&ctx, args).await,
        Command::Rm(args) => vault_cmds::rm(&ctx, args).await,
        Command::Passwd(args) => vault_cmds::passwd(&ctx, args).await,
        Command::Rekey(args) => vault_cmds::rekey(&ctx, args).await,
        Command::Backup(args) => backup_cmd::backup(&ctx, args).await,
        Command::Restore(args) => backup_cmd::restore(&ctx, args).await,
        Command::Audit(cmd) => audit_cmd::run(&ctx, cmd).await,
        Command::Serve(args) => daemon_cmds::serve(&ctx, args).await,
        Command::Rotate(args) => daemon_cmds::rotate(&ctx, args).await,
        Command::Status(args) => daemon_cmds::status(&ctx, args).await,
        Command::Plugin(cmd) => daemon_cmds::plugin(cmd),
        Command::Exec(args) => agent_cmds::exec(&ctx, args).await,
        Command::RotateAll(args) => compromise_cmd::rotate_all(&ctx, args).await,
        Command::Incident(cmd) => compromise_cmd::incident(&ctx, cmd).await,
        Command::Alerts(cmd) => alerts_cmd::run(&ctx, cmd).await,
        Command::Broker(cmd) => broker_cmd::run(&ctx, cmd).await,
        Command::Scan(args) => scan_cmd::scan(&ctx, args).await,
        Command::Import(args) => scan_cmd::import(&ctx, args).await,
    }
}
