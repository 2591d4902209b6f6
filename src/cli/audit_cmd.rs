//! `audit verify` and `audit tail`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::Context;
use super::output::{print_json, printable, rfc3339};
use crate::audit::ChainVerifier;
use crate::store::{Access, Store};

const PAGE: i64 = 1000;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain; exit 0 if it holds, 1 naming the first bad row if not.
    ///
    /// The chain alone proves no row was edited, reordered or removed from the middle by
    /// someone who did not recompute the hashes after it. With --keyed (asks for the
    /// passphrase) every seal is checked too: each transaction of an unlocked keywarden seals
    /// the chain's head with the vault's key, so rows rewritten with recomputed hashes, and rows
    /// deleted from the end, are found.
    Verify {
        /// Print {"ok","rows","head"} (with --keyed also "seals", "unsealed_tail") or
        /// {"ok":false,"first_bad_seq","reason"} as JSON.
        #[arg(long)]
        json: bool,
        /// Also check the keyed seals (needs the passphrase).
        #[arg(long)]
        keyed: bool,
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
        AuditCommand::Verify { json, keyed } => return verify(&store, json, keyed).await,
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

/// `audit verify [--keyed]`: walks the chain (and checks every keyed seal); exit 1 naming the
/// first bad row.
async fn verify(store: &Store, json: bool, keyed: bool) -> anyhow::Result<ExitCode> {
    let seals = if keyed {
        let passphrase = crate::passphrase::obtain(crate::passphrase::Purpose::Unlock)?;
        let vault = crate::vault::Vault::unlock(store.clone(), &passphrase).await?;
        Some((vault, store.audit_seals().await?))
    } else {
        None
    };
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    let mut sealed_up_to = 0;
    let fail = |seq: i64, reason: String, rows: u64| -> anyhow::Result<ExitCode> {
        if json {
            print_json(&json!({
                "ok": false,
                "first_bad_seq": seq,
                "reason": reason,
                "rows_verified": rows,
            }))?;
        } else {
            eprintln!("audit chain broken at row {seq}: {reason} ({rows} rows before it verified)");
        }
        Ok(ExitCode::FAILURE)
    };
    loop {
        let page = store.audit_page(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in &page {
            if let Err(brk) = verifier.check(row) {
                return fail(brk.seq, brk.reason, verifier.rows());
            }
            let Some((vault, seals)) = &seals else {
                continue;
            };
            let Ok(i) = seals.binary_search_by_key(&row.seq, |(seq, _)| *seq) else {
                continue;
            };
            if !vault.audit_seal_holds(row.seq, &row.hash, &seals[i].1) {
                let reason = "its keyed seal does not match: the rows up to it were \
                              rewritten and their hashes recomputed"
                    .to_string();
                return fail(row.seq, reason, verifier.rows() - 1);
            }
            sealed_up_to = row.seq;
        }
    }
    let rows = verifier.rows();
    let mut report = json!({ "ok": true, "rows": rows, "head": verifier.head() });
    if let Some((_, seals)) = &seals {
        if let Some((seq, _)) = seals.iter().find(|(seq, _)| *seq > after) {
            let reason = format!(
                "a seal names row {seq} but the chain ends at row {after}: rows were \
                 deleted from its end"
            );
            return fail(after + 1, reason, rows);
        }
        report["seals"] = json!(seals.len());
        report["unsealed_tail"] = json!(after - sealed_up_to);
    }
    if json {
        print_json(&report)?;
    } else {
        println!("audit chain intact: {rows} rows, head {}", verifier.head());
        if seals.is_some() {
            println!(
                "keyed seals hold up to row {sealed_up_to}; {} rows after it are not sealed",
                after - sealed_up_to
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
