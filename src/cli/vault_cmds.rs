//! `init`, `put`, `get`, `list`, `rm`, `passwd`, `rekey`: the store commands.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;
use zeroize::Zeroizing;

use super::Context;
use super::daemon_cmds::admin;
use super::output::print_json;
use crate::passphrase::{self, Purpose};
use crate::store::{Access, Location, Store, StoreError};
use crate::value::SecretValue;
use crate::vault::{Meta, Passphrase, Vault};
use hyper::Method;

/// Largest value `put` accepts. Values travel in one protocol line (1 MiB) with room to spare.
const MAX_VALUE_BYTES: usize = 256 * 1024;

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Accept a passphrase shorter than 12 characters at the prompt (a test store).
    #[arg(long)]
    weak_passphrase: bool,
}

/// `passwd` options.
#[derive(Debug, Args)]
pub(crate) struct PasswdArgs {
    /// Accept a new passphrase shorter than 12 characters at the prompt (a test store).
    #[arg(long)]
    weak_passphrase: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    printf %s \"$OPENAI_API_KEY\" | keywarden put openai/prod\n  \
    keywarden put aws/rotator --value-file secret.txt --meta access_key_id=AKIA...\n\n\
    One trailing newline is stripped from the value (so `echo` works); --keep-newline keeps it.")]
pub(crate) struct PutArgs {
    /// Secret name: letters, digits, '.', '_', '-', segments separated by '/'.
    name: String,
    /// Read the value from this file ('-' for stdin). Default: stdin (prompted on a terminal).
    #[arg(long, value_name = "FILE")]
    value_file: Option<PathBuf>,
    /// A non-secret fact to store beside the value, such as an access key id. Repeatable.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Keep a trailing newline in the value.
    #[arg(long)]
    keep_newline: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Secret name.
    pub(super) name: String,
    /// A specific version instead of the current one.
    #[arg(long)]
    pub(super) version: Option<i64>,
    /// Print {"name","version","value","meta"} as JSON (through the daemon, also "lease_id"
    /// and "expires_at").
    #[arg(long)]
    pub(super) json: bool,
    /// While the daemon runs: read over its admin socket (an admin's read, audited as such; no
    /// lease, no policy) instead of fetching over the agent socket like an agent.
    #[arg(long)]
    pub(super) admin: bool,
    /// Print the value's exact bytes, without the newline that ends it otherwise.
    #[arg(short = 'n', long)]
    pub(super) no_newline: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print an array of {"name","provider","version","updated_at","next_rotation_at",
    /// "rotation_state","quarantined","tags"}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// Secret name.
    name: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    if k.is_empty() {
        return Err("the meta key must not be empty".into());
    }
    Ok((k.to_string(), v.to_string()))
}

pub(crate) async fn init(ctx: &Context, args: InitArgs) -> anyhow::Result<ExitCode> {
    let location = ctx.store_location()?;
    if let Location::File(path) = &location {
        if path.exists() {
            bail!(
                "a store already exists at {}; refusing to overwrite it",
                path.display()
            );
        }
    }
    let kdf = ctx.config.store.kdf;
    let passphrase = passphrase::obtain_new(Purpose::Create, args.weak_passphrase)?;
    Vault::init_at(&location, &passphrase, kdf, &ctx.actor).await?;
    if args.json {
        print_json(&json!({ "store": location.to_string(), "kdf": kdf }))?;
    } else {
        println!("created a store at {location} ({kdf})");
    }
    Ok(ExitCode::SUCCESS)
}

fn read_value(args: &PutArgs) -> anyhow::Result<SecretValue> {
    let mut buf = Zeroizing::new(Vec::new());
    match &args.value_file {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open the value file {}", path.display()))?;
            file.take(MAX_VALUE_BYTES as u64 + 1)
                .read_to_end(&mut buf)
                .with_context(|| format!("cannot read the value file {}", path.display()))?;
        }
        _ if args.value_file.is_none() && std::io::stdin().is_terminal() => {
            let typed = rpassword::prompt_password(format!("value for {}: ", args.name))
                .context("cannot read the value from the terminal")?;
            buf.extend_from_slice(typed.as_bytes());
            drop(Zeroizing::new(typed));
        }
        _ => {
            std::io::stdin()
                .lock()
                .take(MAX_VALUE_BYTES as u64 + 1)
                .read_to_end(&mut buf)
                .context("cannot read the value from stdin")?;
        }
    }
    if buf.len() > MAX_VALUE_BYTES {
        bail!("the value is larger than {} KiB", MAX_VALUE_BYTES / 1024);
    }
    if !args.keep_newline {
        if buf.ends_with(b"\r\n") {
            let len = buf.len() - 2;
            buf.truncate(len);
        } else if buf.ends_with(b"\n") {
            let len = buf.len() - 1;
            buf.truncate(len);
        }
    }
    if buf.is_empty() {
        bail!("the value is empty; nothing stored");
    }
    SecretValue::from_utf8(buf).map_err(|_| anyhow::anyhow!("the value is not UTF-8 text"))
}

/// Where a store command runs: on the store, unlocked here, or through the admin socket of
/// the daemon that holds it (audited as that admin's action; no passphrase asked).
pub(super) enum Target {
    /// The store, unlocked here with `passphrase`.
    Store {
        vault: Box<Vault>,
        passphrase: Passphrase,
    },
    /// The admin socket of the daemon holding the store.
    Daemon(PathBuf),
}

impl Target {
    pub(super) async fn of(ctx: &Context) -> anyhow::Result<Target> {
        match ctx.open_store(Access::Shared).await {
            Ok(store) => {
                let passphrase = passphrase::obtain(Purpose::Unlock)?;
                Ok(Target::Store {
                    vault: Box::new(Vault::unlock(store, &passphrase).await?),
                    passphrase,
                })
            }
            Err(e) => match e.downcast_ref::<StoreError>() {
                Some(StoreError::Locked { .. }) => Ok(Target::Daemon(daemon_admin(ctx).await?)),
                _ => Err(e),
            },
        }
    }
}

impl Target {
    /// Stores `value` as the next version of `name` (a `manual` secret if new); its number.
    pub(super) async fn put(
        &self,
        ctx: &Context,
        name: &str,
        value: &SecretValue,
        meta: Meta,
    ) -> anyhow::Result<i64> {
        Ok(match self {
            Target::Store { vault, .. } => {
                vault.put(name, "manual", value, meta, &ctx.actor).await?
            }
            Target::Daemon(socket) => {
                let body = json!({ "value": value.expose(), "meta": meta });
                let answer = admin(socket, Method::PUT, &secret_path(name), Some(body)).await?;
                answer["version"].as_i64().unwrap_or_default()
            }
        })
    }
}

/// The admin socket of the daemon that holds the store.
pub(super) async fn daemon_admin(ctx: &Context) -> anyhow::Result<PathBuf> {
    super::daemon_cmds::daemon_socket(ctx)
        .await
        .map(Path::to_path_buf)
        .context("the daemon holds the store but its admin socket does not answer (or this user may not use it)")
}

fn secret_path(name: &str) -> String {
    format!("/v1/admin/secrets/{name}")
}

pub(crate) async fn put(ctx: &Context, args: PutArgs) -> anyhow::Result<ExitCode> {
    crate::name::validate(&args.name)?;
    let meta: Meta = args
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    // The store first: a wrong passphrase or a store in use fails before the value is typed.
    let target = Target::of(ctx).await?;
    let value = read_value(&args)?;
    let version = target.put(ctx, &args.name, &value, meta).await?;
    if args.json {
        print_json(&json!({ "name": args.name, "version": version }))?;
    } else {
        println!("stored {} version {version}", args.name);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn get(ctx: &Context, args: GetArgs) -> anyhow::Result<ExitCode> {
    crate::name::validate(&args.name)?;
    let store = match Store::open_at(&ctx.store_location()?, Access::Shared).await {
        Ok(store) => store,
        // The daemon holds the store: ask it over the agent socket, like any agent (a lease,
        // under the policies); with --admin or --version, over the admin socket.
        Err(StoreError::Locked { .. }) => {
            if args.version.is_none() && !args.admin {
                return super::agent_cmds::get(ctx, &args).await;
            }
            let socket = daemon_admin(ctx).await?;
            let query = args
                .version
                .map(|v| format!("?version={v}"))
                .unwrap_or_default();
            let path = format!("{}{query}", secret_path(&args.name));
            let revealed = admin(&socket, Method::GET, &path, None).await?;
            return print_revealed(&revealed, &args);
        }
        Err(e) => return Err(e.into()),
    };
    let passphrase = passphrase::obtain(Purpose::Unlock)?;
    let vault = Vault::unlock(store, &passphrase).await?;
    let revealed = vault.get(&args.name, args.version, &ctx.actor).await?;
    let revealed = json!({
        "name": revealed.name,
        "version": revealed.version,
        "value": revealed.value.expose(),
        "meta": revealed.meta,
    });
    print_revealed(&revealed, &args)
}

/// Prints `{"name","version","value","meta"}` as JSON, or the value alone.
fn print_revealed(revealed: &serde_json::Value, args: &GetArgs) -> anyhow::Result<ExitCode> {
    if args.json {
        print_json(revealed)?;
    } else {
        super::output::print_value(
            revealed["value"].as_str().unwrap_or_default(),
            args.no_newline,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<ExitCode> {
    let store = ctx.open_store(Access::ReadOnly).await?;
    let secrets: Vec<serde_json::Value> = store
        .list()
        .await?
        .iter()
        .map(crate::status::secret_entry)
        .collect();
    if args.json {
        print_json(&secrets)?;
    } else if secrets.is_empty() {
        eprintln!("no secrets yet; add one with `keywarden put NAME`");
    } else {
        super::daemon_cmds::print_secrets(&secrets)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn rm(ctx: &Context, args: RmArgs) -> anyhow::Result<ExitCode> {
    crate::name::validate(&args.name)?;
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to remove {} without --yes (stdin is not a terminal)",
                args.name
            );
        }
        eprint!(
            "This destroys {}'s data key: no version of it can be opened again.\n\
             Type the name to confirm: ",
            args.name
        );
        let mut typed = String::new();
        std::io::stdin().read_line(&mut typed)?;
        if typed.trim_end() != args.name {
            bail!("not confirmed; nothing removed");
        }
    }
    let versions = match Target::of(ctx).await? {
        Target::Store { vault, .. } => vault.remove(&args.name, &ctx.actor).await?,
        Target::Daemon(socket) => admin(&socket, Method::DELETE, &secret_path(&args.name), None)
            .await?["versions_destroyed"]
            .as_i64()
            .unwrap_or_default(),
    };
    if args.json {
        print_json(&json!({ "name": args.name, "versions_destroyed": versions }))?;
    } else {
        println!(
            "removed {}: its data key is destroyed and its {versions} version(s) can no longer be \
             opened from this store (backups taken before now still hold them)",
            args.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn passwd(ctx: &Context, args: PasswdArgs) -> anyhow::Result<ExitCode> {
    match Target::of(ctx).await? {
        Target::Store { vault, .. } => {
            let new = passphrase::obtain_new(Purpose::Change, args.weak_passphrase)?;
            vault
                .change_passphrase(&new, ctx.config.store.kdf, &ctx.actor)
                .await?;
        }
        Target::Daemon(socket) => {
            // The daemon checks the current passphrase before it wraps under the new one.
            let current = passphrase::obtain(Purpose::Unlock)?;
            let new = passphrase::obtain_new(Purpose::Change, args.weak_passphrase)?;
            let body = json!({ "current": current.as_str(), "new": new.as_str() });
            admin(&socket, Method::POST, "/v1/admin/passwd", Some(body)).await?;
        }
    }
    println!(
        "passphrase changed for {} ({})",
        ctx.store_location()?,
        ctx.config.store.kdf
    );
    Ok(ExitCode::SUCCESS)
}

/// `rekey` options.
#[derive(Debug, clap::Args)]
pub(crate) struct RekeyArgs {
    /// Also replace every secret's data key and re-encrypt everything sealed under it
    /// (versions, proposed values, issued credentials): an old backup opened with the old
    /// passphrase then opens nothing stored from now on.
    #[arg(long)]
    data_keys: bool,
}

pub(crate) async fn rekey(ctx: &Context, args: RekeyArgs) -> anyhow::Result<ExitCode> {
    let count = match Target::of(ctx).await? {
        Target::Store { vault, passphrase } => {
            vault.rekey(&passphrase, &ctx.actor, args.data_keys).await?
        }
        Target::Daemon(socket) => {
            // The daemon checks the passphrase, and rekeys while it serves.
            let passphrase = passphrase::obtain(Purpose::Unlock)?;
            let body = json!({ "passphrase": passphrase.as_str(), "data_keys": args.data_keys });
            let answer = admin(&socket, Method::POST, "/v1/admin/rekey", Some(body)).await?;
            answer["data_keys"].as_u64().unwrap_or_default() as usize
        }
    };
    if args.data_keys {
        println!("new root key and {count} new data key(s) installed; every value re-encrypted");
    } else {
        println!("new root key installed; {count} data key(s) rewrapped; values untouched");
    }
    Ok(ExitCode::SUCCESS)
}
