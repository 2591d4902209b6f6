//! Every figure of the "under load" goals in one table, measured in one run on this machine:
//! fetches against the bare transport, memory and disk under a fetch loop, the emergency
//! `rotate-all` through the real CLI, the engine's own rate, and the daemon at 10,000 secrets.
//! Each ratio is measured side by side in this run; each ideal is printed with how it is
//! computed.
//!
//! Run with `cargo bench --bench under_load [-- --full] [-- --soak SECS]`. `--full` adds the
//! CLI run at 10,000 secrets and the in-process incident at 100,000 (tens of minutes); the
//! soak defaults to 60 s (the README's ten-minute series: `cargo bench --bench agent -- --soak
//! 600`). The separate benchmarks (`agent`, `rotate_all`, `compromise`, `engine`, `scale`)
//! print the same measurements in more detail.

mod common;

use std::time::Duration;

use common::BenchPlugin;
use common::fetch::{self, FETCH_PATH};

/// One row: the goal, what was measured, the target, and whether it is met.
struct Row {
    goal: String,
    measured: String,
    target: &'static str,
    met: bool,
}

fn main() {
    common::serve_if_plugin(BenchPlugin {
        kind: "instant",
        delay: Duration::ZERO,
    });
    fetch::serve_baseline_if_asked();
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--full");
    let soak_secs = args
        .iter()
        .position(|a| a == "--soak")
        .map_or(60, |i| args[i + 1].parse().expect("--soak SECS"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = fetches(&rt, soak_secs);
    rows.extend(emergency(full));
    rows.extend(incident(&rt, full));
    rows.extend(engine_and_scale(&rt));
    println!("| goal | measured (this run) | target | met |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.goal,
            r.measured,
            r.target,
            if r.met { "yes" } else { "no" }
        );
    }
}

/// Fetches at 32 clients, keywarden and the bare transport side by side; then the soak.
fn fetches(rt: &tokio::runtime::Runtime, soak_secs: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let (baseline, baseline_sock, daemon, agent_sock) = fetch::start_both(dir.path());
    let base = fetch::measure(rt, &baseline_sock, "/", 32, baseline.id());
    let kw = fetch::measure(rt, &agent_sock, FETCH_PATH, 32, daemon.id());
    rows.push(Row {
        goal: "4. fetches/s at 32 clients ÷ bare hyper on a Unix socket".into(),
        measured: format!(
            "{:.2} ({:.0} ÷ {:.0}/s; daemon CPU {:.1} µs per fetch, bare server {:.1} µs)",
            kw.rate / base.rate,
            kw.rate,
            base.rate,
            kw.cpu_us,
            base.cpu_us
        ),
        target: "≥ 0.5",
        met: kw.rate / base.rate >= 0.5,
    });
    rows.push(Row {
        goal: "4. fetch p99 ÷ bare p99, 32 clients".into(),
        measured: format!(
            "{:.2} ({:.2} ms ÷ {:.2} ms)",
            kw.p99 / base.p99,
            kw.p99,
            base.p99
        ),
        target: "≤ 2",
        met: kw.p99 <= 2.0 * base.p99,
    });
    let soak = fetch::soak(rt, &agent_sock, daemon.id(), dir.path(), soak_secs, |_| {});
    fetch::stop_both(baseline, daemon);
    let (first, last) = (soak.first().unwrap(), soak.last().unwrap());
    let wal_max = soak.iter().map(|r| r.wal_mb).fold(0.0, f64::max);
    let fetches: f64 = soak
        .iter()
        .map(|r| r.rate * (soak_secs / soak.len() as u64).max(1) as f64)
        .sum();
    rows.push(Row {
        goal: format!(
            "0. {soak_secs} s of 32 clients fetching ({fetches:.0} fetches): RSS, WAL, database"
        ),
        measured: format!(
            "RSS {:.1} → {:.1} MB, WAL ≤ {wal_max:.1} MB, database {:.1} → {:.1} MB",
            first.rss_mb, last.rss_mb, first.db_mb, last.db_mb
        ),
        target: "flat (RSS +< 5 MB, WAL < 40 MB, database +< 1 MB)",
        met: last.rss_mb - first.rss_mb < 5.0 && wal_max < 40.0 && last.db_mb - first.db_mb < 1.0,
    });
    rows
}

/// The emergency rotate-all through the CLI.
fn emergency(full: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    for secrets in if full {
        vec![1_000, 10_000]
    } else {
        vec![1_000]
    } {
        let f = common::emergency::run(secrets, None);
        rows.push(Row {
            goal: format!(
                "3. `rotate-all --assume-compromise --concurrency 32`, CLI, {secrets} secrets: wall ÷ ideal ({secrets} × {} ops × {} ms ÷ {} = {:.1} s)",
                common::emergency::OPS,
                common::emergency::OP_DELAY_MS,
                common::emergency::CONCURRENCY,
                f.ideal
            ),
            measured: format!("{:.2} ({:.1} s)", f.wall / f.ideal, f.wall),
            target: "≤ 1.2",
            met: f.wall / f.ideal <= 1.2,
        });
        rows.push(Row {
            goal: format!("2. daemon CPU per emergency rotation, {secrets} secrets"),
            measured: format!(
                "{:.2} ms, {:.2} ms of it in the kernel",
                f.cpu_ms_per_rotation, f.system_ms_per_rotation
            ),
            target: "≤ 2 ms",
            met: f.cpu_ms_per_rotation <= 2.0,
        });
    }
    rows
}

/// The incident's time per secret, in process: linear in the number of secrets.
fn incident(rt: &tokio::runtime::Runtime, full: bool) -> Vec<Row> {
    let sizes = if full {
        vec![1_000, 10_000, 100_000]
    } else {
        vec![1_000, 10_000]
    };
    let timings: Vec<_> = sizes
        .iter()
        .map(|&n| (n, rt.block_on(common::incident::run(n, 32))))
        .collect();
    let per_secret = |t: &common::incident::Timing, n: usize| t.wall * 1000.0 / n as f64;
    let (n0, t0) = &timings[0];
    let mut rows = Vec::new();
    for (n, t) in &timings[1..] {
        let growth = per_secret(t, *n) / per_secret(t0, *n0);
        rows.push(Row {
            goal: format!("3. in-process incident, time per secret at {n} ÷ at {n0} (32 at once)"),
            measured: format!(
                "{growth:.2} ({:.2} ms ÷ {:.2} ms; ratios to the ideal {:.2}, {:.2})",
                per_secret(t, *n),
                per_secret(t0, *n0),
                t.wall / t.ideal,
                t0.wall / t0.ideal
            ),
            target: "≤ 1.1 (linear)",
            met: growth <= 1.1,
        });
    }
    rows
}

/// The engine's own rate, and the daemon at 10,000 secrets.
fn engine_and_scale(rt: &tokio::runtime::Runtime) -> Vec<Row> {
    let mut rows = Vec::new();
    let rates = rt.block_on(common::engine::run(1_000, 32));
    rows.push(Row {
        goal: "5. durable full rotations/s, instant plugin, 1,000 secrets, 32 at once".into(),
        measured: format!("{:.0}/s", rates.full_per_s),
        target: "≥ 1,000/s",
        met: rates.full_per_s >= 1_000.0,
    });

    // The daemon at 10,000 secrets.
    let s = common::scale::run(10_000);
    rows.push(Row {
        goal: "6. resident memory at 10,000 secrets, settled".into(),
        measured: format!("{:.1} MB", s.rss),
        target: "≤ 30 MB",
        met: s.rss <= 30.0,
    });
    rows.push(Row {
        goal: "6. start to a serving agent socket at 10,000 secrets (no KDF)".into(),
        measured: format!("{:.0} ms", s.startup * 1000.0),
        target: "≤ 200 ms",
        met: s.startup <= 0.2,
    });
    rows
}
