//! `audit verify`, `audit tail` and `audit archive`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use hyper::Method;

use super::Context;
use super::daemon_cmds::admin;
use super::output::{print_json, printable, rfc3339};
use super::vault_cmds::Target;
use crate::audit::{AuditEvent, AuditRecord, ChainVerifier};
use crate::audit_archive::{self, ArchiveWriter};
use crate::clock::Millis;
use crate::crypto;
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
        /// Archive files written by `audit archive`, oldest first: their rows are checked, and
        /// the store's chain must go on where the last one ends. Without them, the chain is
        /// checked from the row after the last archived one.
        #[arg(long = "archive", value_name = "FILE")]
        archives: Vec<PathBuf>,
    },
    /// Move the rows older than a date out of the store into an archive file.
    ///
    /// The file (JSON lines, mode 0600, never over an existing file) verifies on its own with
    /// `audit verify --archive FILE`, and the store's chain goes on from its last row, whose
    /// seq and hash the store keeps as its anchor under the vault's keyed seal (asks for the
    /// passphrase). Rows are removed from the store only once the file is on disk.
    Archive {
        /// Archive the rows written before this: an RFC 3339 time, a date (YYYY-MM-DD, UTC
        /// midnight), or an age such as `90d`.
        #[arg(long, value_name = "WHEN")]
        before: String,
        /// The archive file to create.
        file: PathBuf,
        /// Print {"file","rows","first_seq","last_seq","head"} as JSON.
        ///
        /// While the daemon runs, this command reads the rows itself and the daemon removes
        /// them (through its admin socket: root or the daemon's user, no passphrase asked).
        #[arg(long)]
        json: bool,
    },
    /// Print the most recent audit events.
    Tail {
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
        /// Print an array of events as JSON (with --follow, one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Keep printing events as they are appended, until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    if let AuditCommand::Archive { before, file, json } = cmd {
        return archive(ctx, &before, &file, json).await;
    }
    let store = ctx.open_store(Access::ReadOnly).await?;
    match cmd {
        AuditCommand::Verify {
            json,
            keyed,
            archives,
        } => return verify(&store, json, keyed, &archives).await,
        AuditCommand::Archive { .. } => unreachable!("handled above"),
        AuditCommand::Tail {
            lines,
            json,
            follow,
        } => {
            let rows = store.audit_tail(lines.max(0)).await?;
            let mut last = rows.last().map_or(0, |r| r.seq);
            if follow {
                // Rows before the tail are not printed again, even when the tail is empty.
                last = last.max(store.audit_head().await?.map_or(0, |h| h.0));
            }
            if json && !follow {
                let items: Vec<_> = rows.iter().map(row_json).collect();
                print_json(&items)?;
            } else {
                rows.iter().for_each(|r| print_row(r, json));
            }
            if follow {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    for r in store.audit_page(last, 500).await? {
                        print_row(&r, json);
                        last = r.seq;
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One audit row as `audit tail --json` prints it.
fn row_json(r: &AuditRecord) -> serde_json::Value {
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
}

/// One audit row on a line: JSON, or columns with control characters escaped.
fn print_row(r: &AuditRecord, json: bool) {
    if json {
        println!("{}", row_json(r));
        return;
    }
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

/// Parses `--before`: an RFC 3339 time, a date (UTC midnight), or an age before now.
fn parse_before(text: &str, now: Millis) -> anyhow::Result<Millis> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis());
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(now - age.as_millis() as Millis),
        Err(_) => anyhow::bail!(
            "--before {text:?}: expected an RFC 3339 time (2026-01-31T00:00:00Z), a date \
             (2026-01-31) or an age (90d)"
        ),
    }
}

/// `audit archive --before WHEN FILE`: writes the rows before `WHEN` to `FILE` (checking their
/// chain on the way), then removes them from the store, anchored under the vault's seal: here
/// (the store unlocked), or by the daemon that holds it (the rows read from a read-only view).
async fn archive(ctx: &Context, before: &str, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let before = parse_before(before, crate::clock::now_millis())?;
    let target = Target::of(ctx).await?;
    let store = match &target {
        Target::Store { vault, .. } => vault.store().clone(),
        Target::Daemon(_) => ctx.open_store(Access::ReadOnly).await?,
    };
    let archived = write_archive(&store, before, file).await?;
    let head = crypto::hex(&archived.head);
    let detail = json!({
        "first_seq": archived.first_seq,
        "last_seq": archived.last_seq,
        "rows": archived.rows,
        "head": head,
        "file": file.display().to_string(),
    });
    let removed = match &target {
        Target::Store { vault, .. } => {
            let event = AuditEvent::new(&ctx.actor, "audit.archived").detail(detail.clone());
            vault
                .archive_audit(archived.last_seq, &archived.head, event)
                .await
                .map_err(anyhow::Error::from)
        }
        Target::Daemon(socket) => admin(
            socket,
            Method::POST,
            "/v1/admin/audit/archive",
            Some(detail.clone()),
        )
        .await
        .map(drop),
    };
    if let Err(e) = removed {
        let _ = std::fs::remove_file(file);
        anyhow::bail!(
            "{e:#}; no row was removed and {} was deleted",
            file.display()
        );
    }
    if json {
        print_json(&detail)?;
    } else {
        println!(
            "archived audit rows {}..={} ({} rows) to {}; the store's chain now starts after \
             row {}, head {head}",
            archived.first_seq,
            archived.last_seq,
            archived.rows,
            file.display(),
            archived.last_seq,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows written to an archive file.
struct Archived {
    first_seq: i64,
    last_seq: i64,
    rows: u64,
    head: Vec<u8>,
}

/// Writes the rows after the store's anchor and before `before` to a new archive `file`,
/// checking their chain; removes the file if the chain breaks.
async fn write_archive(store: &Store, before: Millis, file: &Path) -> anyhow::Result<Archived> {
    let Some(through) = store.audit_last_before(before).await? else {
        anyhow::bail!(
            "no audit rows before {}: nothing to archive",
            rfc3339(before)
        );
    };
    let (anchor_seq, anchor_hash) = store
        .audit_anchor()
        .await?
        .unwrap_or((0, crate::audit::GENESIS_HASH.to_vec()));
    let mut verifier = ChainVerifier::after(anchor_seq, anchor_hash.clone());
    let mut writer = ArchiveWriter::create(file, anchor_seq + 1, &anchor_hash)?;
    let mut after = anchor_seq;
    while after < through {
        let page = store.audit_page(after, PAGE.min(through - after)).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in &page {
            if let Err(brk) = verifier.check(row) {
                drop(writer);
                let _ = std::fs::remove_file(file);
                anyhow::bail!(
                    "the audit chain is broken at row {}: {}; nothing was archived (run `keywarden \
                     audit verify`)",
                    brk.seq,
                    brk.reason
                );
            }
            writer.push(row)?;
        }
    }
    let rows = writer.finish()?;
    let (last_seq, head) = verifier.last();
    Ok(Archived {
        first_seq: anchor_seq + 1,
        last_seq,
        rows,
        head: head.to_vec(),
    })
}

/// Where the store's chain must start checking: after the archives given (each checked), or
/// after the store's anchor; the anchor's seal checked when `seals` are. Returns the verifier,
/// the anchor, and how many archived rows were checked — or where the chain breaks.
async fn chain_start(
    store: &Store,
    archives: &[PathBuf],
    seals: &Option<Seals<'_>>,
) -> anyhow::Result<Result<(ChainVerifier, Option<(i64, Vec<u8>)>, u64), Break>> {
    let mut verifier = ChainVerifier::default();
    let brk = |seq: i64, reason: String, verifier: &ChainVerifier| {
        Ok(Err(Break {
            seq,
            reason,
            rows: verifier.rows(),
        }))
    };
    for file in archives {
        if let Err(e) = audit_archive::verify(file, &mut verifier) {
            let seq = match &e {
                audit_archive::ArchiveError::Broken { brk, .. } => brk.seq,
                _ => verifier.last().0 + 1,
            };
            return brk(seq, e.to_string(), &verifier);
        }
    }
    let archived_rows = verifier.rows();
    let anchor = store.audit_anchor().await?;
    if let Some((seq, hash)) = &anchor {
        if archives.is_empty() {
            verifier = ChainVerifier::after(*seq, hash.clone());
        } else if verifier.last() != (*seq, hash.as_slice()) {
            let reason = format!(
                "the store's chain goes on after row {seq}, but the archives given end at row {}",
                verifier.last().0
            );
            return brk(seq + 1, reason, &verifier);
        }
        if let Some((vault, seals)) = seals {
            let sealed = seals
                .binary_search_by_key(seq, |(s, _)| *s)
                .is_ok_and(|i| vault.audit_seal_holds(*seq, hash, &seals[i].1));
            if !sealed {
                let reason = format!(
                    "the anchor where the archived rows end (row {seq}) does not carry the \
                     vault's seal: rows were removed from the start of the chain"
                );
                return brk(seq + 1, reason, &verifier);
            }
        }
    } else if !archives.is_empty() && verifier.rows() > 0 {
        let reason = "the store holds no archive anchor, but archives were given".to_string();
        return brk(verifier.last().0 + 1, reason, &verifier);
    }
    Ok(Ok((verifier, anchor, archived_rows)))
}

/// With a vault: the unlocked vault and every seal, by row (seq, mac).
type Seals<'a> = (&'a crate::vault::Vault, Vec<(i64, Vec<u8>)>);

/// Where and why a chain check failed, and how many rows verified before it.
pub(super) struct Break {
    /// The first bad row.
    pub(super) seq: i64,
    /// Why.
    pub(super) reason: String,
    /// Rows verified before it.
    pub(super) rows: u64,
}

/// `audit verify [--keyed] [--archive FILE]...`: walks the archives and then the store's chain
/// (and checks every keyed seal); exit 1 naming the first bad row.
async fn verify(
    store: &Store,
    json: bool,
    keyed: bool,
    archives: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let vault = if keyed {
        let passphrase = crate::passphrase::obtain(crate::passphrase::Purpose::Unlock)?;
        Some(crate::vault::Vault::unlock(store.clone(), &passphrase).await?)
    } else {
        None
    };
    let report = match check_chain(store, vault.as_ref(), archives).await? {
        Ok(report) => report,
        Err(brk) => {
            if json {
                print_json(&json!({
                    "ok": false,
                    "first_bad_seq": brk.seq,
                    "reason": brk.reason,
                    "rows_verified": brk.rows,
                }))?;
            } else {
                eprintln!(
                    "audit chain broken at row {}: {} ({} rows before it verified)",
                    brk.seq, brk.reason, brk.rows
                );
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let rows = report.rows;
    if json {
        let mut out = json!({ "ok": true, "rows": rows, "head": report.head });
        if let Some(seq) = report.archived_through {
            out["archived_through"] = json!(seq);
            out["archived_rows_verified"] = json!(report.archived_rows);
        }
        if let Some((seals, unsealed)) = report.seals {
            out["seals"] = json!(seals);
            out["unsealed_tail"] = json!(unsealed);
        }
        print_json(&out)?;
    } else {
        println!("audit chain intact: {rows} rows, head {}", report.head);
        if let Some(seq) = report.archived_through {
            match report.archived_rows {
                0 => println!(
                    "rows up to {seq} are archived (check them with --archive FILE, oldest first)"
                ),
                n => println!("of which {n} rows from the archives, up to row {seq}"),
            }
        }
        if let Some((_, unsealed)) = report.seals {
            println!(
                "keyed seals hold up to row {}; {unsealed} rows after it are not sealed",
                report.last_seq - unsealed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a chain check found when the chain holds.
pub(super) struct ChainReport {
    /// Rows checked (archives included).
    pub(super) rows: u64,
    /// The chain's head, hex.
    pub(super) head: String,
    /// The store's last row.
    last_seq: i64,
    /// Where the archived rows end, when the store has an anchor.
    archived_through: Option<i64>,
    /// Archived rows checked.
    archived_rows: u64,
    /// With a vault: how many seals there are, and how many rows after the last seal.
    seals: Option<(usize, i64)>,
}

/// Walks `archives` and then the store's chain; with `vault`, checks every keyed seal too (and
/// that no seal names a row past the end). The report, or where the chain breaks.
pub(super) async fn check_chain(
    store: &Store,
    vault: Option<&crate::vault::Vault>,
    archives: &[PathBuf],
) -> anyhow::Result<Result<ChainReport, Break>> {
    let seals = match vault {
        Some(vault) => Some((vault, store.audit_seals().await?)),
        None => None,
    };
    let (mut verifier, anchor, archived_rows) = match chain_start(store, archives, &seals).await? {
        Ok(start) => start,
        Err(brk) => return Ok(Err(brk)),
    };
    let mut after = verifier.last().0;
    let mut sealed_up_to = after;
    loop {
        let page = store.audit_page(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in &page {
            if let Err(brk) = verifier.check(row) {
                return Ok(Err(Break {
                    seq: brk.seq,
                    reason: brk.reason,
                    rows: verifier.rows(),
                }));
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
                return Ok(Err(Break {
                    seq: row.seq,
                    reason,
                    rows: verifier.rows() - 1,
                }));
            }
            sealed_up_to = row.seq;
        }
    }
    let rows = verifier.rows();
    if let Some((_, seals)) = &seals {
        if let Some((seq, _)) = seals.iter().find(|(seq, _)| *seq > after) {
            let reason = format!(
                "a seal names row {seq} but the chain ends at row {after}: rows were \
                 deleted from its end"
            );
            return Ok(Err(Break {
                seq: after + 1,
                reason,
                rows,
            }));
        }
    }
    Ok(Ok(ChainReport {
        rows,
        head: verifier.head(),
        last_seq: after,
        archived_through: anchor.map(|(seq, _)| seq),
        archived_rows,
        seals: seals.map(|(_, seals)| (seals.len(), after - sealed_up_to)),
    }))
}
