//! `broker block|unblock|status`: stop a broker at once (a leaked key, a runaway agent), let
//! it serve again, and see its routes and what each policy spent today. Through the daemon.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use hyper::Method;
use serde_json::Value;

use super::Context;
use super::daemon_cmds::{admin, daemon_socket};
use super::output::print_json;

/// `keywarden broker …`.
#[derive(Debug, Subcommand)]
pub(crate) enum BrokerCommand {
    /// Refuse every request through a broker from now on (503), until `unblock`; survives a
    /// restart of the daemon.
    Block {
        /// The broker (`[brokers.NAME]`).
        name: String,
    },
    /// Let a blocked broker serve again.
    Unblock {
        /// The broker.
        name: String,
    },
    /// Each broker's routes, the key version its process serves (and older ones still draining
    /// under requests in flight), and today's requests and tokens per policy and caller.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: BrokerCommand) -> anyhow::Result<ExitCode> {
    let Some(socket) = daemon_socket(ctx).await else {
        bail!(
            "no daemon answers at {}: brokers exist only while `keywarden serve` runs",
            ctx.config.agent.admin_socket.display()
        );
    };
    match cmd {
        BrokerCommand::Block { name } | BrokerCommand::Unblock { name } if name.is_empty() => {
            bail!("name a broker")
        }
        BrokerCommand::Block { name } => {
            admin(
                socket,
                Method::POST,
                &format!("/v1/admin/brokers/{name}/block"),
                None,
            )
            .await?;
            println!("broker {name} is blocked: every request through it gets 503");
        }
        BrokerCommand::Unblock { name } => {
            admin(
                socket,
                Method::POST,
                &format!("/v1/admin/brokers/{name}/unblock"),
                None,
            )
            .await?;
            println!("broker {name} serves again");
        }
        BrokerCommand::Status { json } => {
            let status = admin(socket, Method::GET, "/v1/admin/status", None).await?;
            let brokers = &status["brokers"];
            if json {
                print_json(brokers)?;
                return Ok(ExitCode::SUCCESS);
            }
            if brokers.is_null() {
                println!("no brokers are configured ([brokers.NAME] in the config)");
            }
            print_brokers(brokers);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each broker's routes with the key version the broker process serves (and older ones still
/// draining there), then today's spending per policy and caller.
pub(super) fn print_brokers(brokers: &Value) {
    let Some(list) = brokers["brokers"].as_object() else {
        return;
    };
    for (name, b) in list {
        let routes: Vec<String> = b["routes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let draining: Vec<String> = r["draining"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|v| format!(", v{v} draining"))
                    .collect();
                let serving = match r["serving"].as_i64() {
                    Some(v) => format!("v{v}"),
                    None => "no key".to_string(),
                };
                format!(
                    "{} ({serving}{})",
                    r["secret"].as_str().unwrap_or("?"),
                    draining.concat()
                )
            })
            .collect();
        let blocked = if b["blocked"] == true {
            "  BLOCKED"
        } else {
            ""
        };
        println!("broker {name}: {}{blocked}", routes.join(" → "));
    }
    for s in brokers["today"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let who = match s["uid"].as_u64() {
            Some(uid) => format!(", uid {uid} {}", s["exe"].as_str().unwrap_or("")),
            None => String::new(),
        };
        println!(
            "brokered today, policy {}{who}: {} requests, {} tokens",
            s["policy"].as_str().unwrap_or("?"),
            s["requests"],
            s["tokens"]
        );
    }
}
