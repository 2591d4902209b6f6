//! `audit verify` and `audit tail`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::Context;
use super::output::{print_json, printable, rfc3339};
use crate::audit::ChainVerifier;
use crate::store::Access;

const PAGE: i64 = 1000;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain; exit 0 if it holds, 1 naming the first bad row if not.
    Verify {
        /// Print {"ok","rows","head"} or {"ok":false,"first_bad_seq","reason"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the most recent audit events.
    Tail {
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
        /// Print an array of events as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let store = ctx.open_store(Access::ReadOnly).await?;
    match cmd {
        AuditCommand::Verify { json } => {
            let mut verifier = ChainVerifier::default();
            let mut after = 0;
            loop {
                let page = store.audit_page(after, PAGE).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for row in &page {
                    if let Err(brk) = verifier.check(row) {
                        if json {
                            print_json(&json!({
                                "ok": false,
                                "first_bad_seq": brk.seq,
                                "reason": brk.reason,
                                "rows_verified": verifier.rows(),
                            }))?;
                        } else {
                            eprintln!(
                                "audit chain broken at row {}: {} ({} rows before it verified)",
                                brk.seq,
                                brk.reason,
                                verifier.rows()
                            );
                        }
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            if json {
                print_json(
                    &json!({ "ok": true, "rows": verifier.rows(), "head": verifier.head() }),
                )?;
            } else {
                println!(
                    "audit chain intact: {} rows, head {}",
                    verifier.rows(),
                    verifier.head()
                );
            }
        }
        AuditCommand::Tail { lines, json } => {
            let rows = store.audit_tail(lines.max(0)).await?;
            if json {
                let items: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        json!({
                            "seq": r.seq,
                            "at": rfc3339(r.at),
                            "actor": r.actor,
                            "action": r.action,
                            "secret": r.secret,
                            "incident_id": r.incident_id,
                            "detail": serde_json::from_str::<serde_json::Value>(&r.detail)
                                .unwrap_or(serde_json::Value::String(r.detail.clone())),
                        })
                    })
                    .collect();
                print_json(&items)?;
            } else {
                for r in rows {
                    println!(
                        "{:>6} {} {:<16} {:<24} {} {}",
                        r.seq,
                        rfc3339(r.at),
                        printable(&r.action),
                        printable(r.secret.as_deref().unwrap_or("-")),
                        printable(&r.actor),
                        printable(&r.detail)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
