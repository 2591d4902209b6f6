//! `alerts list|ack`: what detectors raised, and acknowledging it so it leaves `status`.
//! Through the daemon when it runs; on the store otherwise.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use hyper::Method;
use serde_json::{Value, json};

use super::Context;
use super::daemon_cmds::{admin, daemon_socket};
use super::output::{print_json, print_table};
use crate::audit::AuditEvent;
use crate::store::Access;

/// `keywarden alerts …`.
#[derive(Debug, Subcommand)]
pub(crate) enum AlertsCommand {
    /// The 100 most recent alerts, newest first, acknowledged or not.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge alerts: they stay in the store and the audit log, and leave `status`.
    Ack {
        /// Alert ids (from `alerts list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every alert not yet acknowledged.
        #[arg(long)]
        all: bool,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: AlertsCommand) -> anyhow::Result<ExitCode> {
    let daemon = daemon_socket(ctx).await;
    match cmd {
        AlertsCommand::List { json } => {
            let alerts = match daemon {
                Some(socket) => admin(socket, Method::GET, "/v1/admin/alerts", None).await?,
                None => {
                    let store = ctx.open_store(Access::ReadOnly).await?;
                    let alerts = store.recent_alerts(100, false).await?;
                    Value::Array(alerts.iter().map(crate::status::alert_entry).collect())
                }
            };
            if json {
                print_json(&alerts)?;
            } else {
                print_alerts(alerts.as_array().map_or(&[][..], Vec::as_slice))?;
            }
        }
        AlertsCommand::Ack { ids, all } => {
            let acked: Vec<i64> = match daemon {
                Some(socket) => {
                    let body = if all {
                        json!({ "all": true })
                    } else {
                        json!({ "ids": ids })
                    };
                    let answer =
                        admin(socket, Method::POST, "/v1/admin/alerts/ack", Some(body)).await?;
                    serde_json::from_value(answer["acked"].clone()).unwrap_or_default()
                }
                None => {
                    let vault = ctx.unlock().await?;
                    let audit = AuditEvent::new(ctx.actor.as_str(), "alert.acked");
                    let ids = (!all).then_some(&ids[..]);
                    vault.store().ack_alerts(ids, &ctx.actor, audit).await?
                }
            };
            if acked.is_empty() {
                bail!("no such alert waiting for acknowledgement (see `keywarden alerts list`)");
            }
            println!("acknowledged {} alert(s)", acked.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_alerts(alerts: &[Value]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            let text = |k: &str| a[k].as_str().unwrap_or("-").to_string();
            vec![
                a["id"].to_string(),
                text("at"),
                text("kind"),
                a["acked_by"]
                    .as_str()
                    .map_or("OPEN".into(), |by| format!("acked by {by}")),
                super::output::printable(&text("message")).into_owned(),
            ]
        })
        .collect();
    print_table(&["ID", "AT", "KIND", "STATE", "MESSAGE"], &rows)
}
