//! `backup` and `restore`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use hyper::{Method, StatusCode};
use serde_json::json;

use super::Context;
use super::audit_cmd::check_chain;
use super::output::print_json;
use super::vault_cmds::daemon_admin;
use crate::backup::{self, Restore, Written};
use crate::passphrase::{self, Purpose};
use crate::store::{Access, StoreError};

/// `backup` options.
#[derive(Debug, clap::Args)]
pub(crate) struct BackupArgs {
    /// The file to write (mode 0600; never over an existing file without --force).
    file: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// Print {"path","bytes","sha256"} as JSON.
    #[arg(long)]
    json: bool,
}

/// `restore` options.
#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// A file `keywarden backup` wrote.
    file: PathBuf,
    /// Replace the store if one exists (its file is kept beside it, renamed).
    #[arg(long)]
    force: bool,
    /// Print {"secrets","values","audit_rows","replaced_kept_as"} as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn backup(ctx: &Context, args: BackupArgs) -> anyhow::Result<ExitCode> {
    let written: Written = match ctx.open_store(Access::Shared).await {
        Ok(store) => {
            let partial = backup::snapshot(&store, backup::parent(&args.file)).await?;
            backup::install(&partial, &args.file, args.force)?
        }
        Err(e)
            if matches!(
                e.downcast_ref::<StoreError>(),
                Some(StoreError::Locked { .. })
            ) =>
        {
            // The daemon holds the store: it takes the copy, and audits it.
            let socket = daemon_admin(ctx).await?;
            let (status, bytes) =
                crate::http::request(&socket, Method::POST, "/v1/admin/backup", None)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot reach the daemon at {}: {e}", socket.display())
                    })?;
            if status != StatusCode::OK {
                let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                bail!(
                    "{}",
                    reply["error"]["message"]
                        .as_str()
                        .unwrap_or("the daemon refused the backup")
                );
            }
            backup::write(&bytes, &args.file, args.force)?
        }
        Err(e) => return Err(e),
    };
    if args.json {
        print_json(&json!({
            "path": written.path.display().to_string(),
            "bytes": written.bytes,
            "sha256": written.sha256,
        }))?;
    } else {
        println!(
            "backup written to {} ({} bytes, sha256 {}); values stay sealed: it opens with the \
             passphrase current now. Check it now and then: `keywarden restore {} --store \
             /tmp/check.db`",
            written.path.display(),
            written.bytes,
            written.sha256,
            written.path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn restore(ctx: &Context, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let store = ctx.store_path()?;
    let restore = Restore::prepare(&args.file, &store, args.force)?;
    let passphrase = passphrase::obtain(Purpose::Unlock)?;
    let vault = restore.open(&passphrase).await?;
    // Everything is checked before anything is replaced: every sealed value opens, and the
    // audit chain and its keyed seals hold.
    let (secrets, values) = vault.check_every_value().await?;
    let chain = match check_chain(vault.store(), Some(&vault), &[]).await? {
        Ok(chain) => chain,
        Err(brk) => bail!(
            "{}: its audit chain is broken at row {}: {}; the store was not replaced",
            args.file.display(),
            brk.seq,
            brk.reason
        ),
    };
    let kept = restore.install(vault, &ctx.actor).await?;
    if args.json {
        print_json(&json!({
            "secrets": secrets,
            "values": values,
            "audit_rows": chain.rows,
            "replaced_kept_as": kept.as_ref().map(|k| k.display().to_string()),
        }))?;
    } else {
        println!(
            "restored {} from {}: {secrets} secrets, {values} sealed values opened, audit chain \
             of {} rows intact",
            store.display(),
            args.file.display(),
            chain.rows
        );
        if let Some(kept) = kept {
            println!("the store it replaced is kept as {}", kept.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
