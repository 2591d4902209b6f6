//! `GET /metrics` on the admin socket, in Prometheus text format: secret ages, rotations by
//! result, ages of rotations in progress, live leases, fetch decisions, plugin restarts.
//!
//! Written by hand (a few counters and a text format) to keep the key-holding process's
//! dependency tree small.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::Millis;
use crate::group_commit::GroupCommit;
use crate::plugin_host::PluginHost;
use crate::store::{AlertKind, Store, StoreError};

/// Counters kept in memory (the rest is read from the store at scrape time).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Fetches answered.
    pub fetch_allowed: AtomicU64,
    /// Fetches denied by policy.
    pub fetch_denied: AtomicU64,
    /// Fetches refused by the rate limit.
    pub fetch_rate_limited: AtomicU64,
    /// Watches that ended without a new version.
    pub watch_timeouts: AtomicU64,
    /// Signals refused for a bad or missing signature.
    pub signals_rejected: AtomicU64,
    /// Reactions skipped because the same cause was reacted to within the quiet interval.
    pub reactions_suppressed: AtomicU64,
    /// Alerts raised, by kind.
    alerts: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Brokered requests by (broker, policy).
    brokered: std::sync::Mutex<std::collections::BTreeMap<(String, String), Brokered>>,
}

/// Upper bounds (seconds) of the brokered-request duration histogram.
const DURATION_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0];

/// The counters of one (broker, policy).
#[derive(Debug, Default)]
struct Brokered {
    by_status: std::collections::BTreeMap<u16, u64>,
    tokens: u64,
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    seconds: f64,
}

impl Metrics {
    /// Counts an alert of `kind`.
    pub fn count_alert(&self, kind: AlertKind) {
        *self
            .alerts
            .lock()
            .expect("metrics lock")
            .entry(kind.as_str())
            .or_default() += 1;
    }
}

impl Metrics {
    /// Counts a brokered request: its status, tokens and duration (to its answer's end).
    pub fn count_brokered(
        &self,
        broker: &str,
        policy: &str,
        status: u16,
        tokens: u64,
        took: std::time::Duration,
    ) {
        let mut brokered = self.brokered.lock().expect("metrics lock");
        let b = brokered
            .entry((broker.to_string(), policy.to_string()))
            .or_default();
        *b.by_status.entry(status).or_default() += 1;
        b.tokens += tokens;
        let secs = took.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                b.buckets[i] += 1;
            }
        }
        b.count += 1;
        b.seconds += secs;
    }
}

/// Brokered requests, tokens and durations per broker and policy.
fn render_brokered(out: &mut String, metrics: &Metrics) {
    let brokered = metrics.brokered.lock().expect("metrics lock");
    family(
        out,
        "keywarden_broker_requests_total",
        "counter",
        "Brokered requests, by broker, policy and status.",
    );
    for ((broker, policy), b) in brokered.iter() {
        for (status, n) in &b.by_status {
            let _ = writeln!(
                out,
                "keywarden_broker_requests_total{{broker=\"{}\",policy=\"{}\",status=\"{status}\"}} {n}",
                label(broker),
                label(policy)
            );
        }
    }
    family(
        out,
        "keywarden_broker_tokens_total",
        "counter",
        "Tokens the providers counted for brokered requests.",
    );
    for ((broker, policy), b) in brokered.iter() {
        let _ = writeln!(
            out,
            "keywarden_broker_tokens_total{{broker=\"{}\",policy=\"{}\"}} {}",
            label(broker),
            label(policy),
            b.tokens
        );
    }
    family(
        out,
        "keywarden_broker_request_seconds",
        "histogram",
        "Time from a brokered request to the end of its answer.",
    );
    for ((broker, policy), b) in brokered.iter() {
        let labels = format!("broker=\"{}\",policy=\"{}\"", label(broker), label(policy));
        for (bound, n) in DURATION_BUCKETS.iter().zip(b.buckets) {
            let _ = writeln!(
                out,
                "keywarden_broker_request_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "keywarden_broker_request_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            b.count
        );
        let _ = writeln!(
            out,
            "keywarden_broker_request_seconds_sum{{{labels}}} {}",
            b.seconds
        );
        let _ = writeln!(
            out,
            "keywarden_broker_request_seconds_count{{{labels}}} {}",
            b.count
        );
    }
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric: the store's secrets and rotations as of `now`, whether it takes the
/// `writer`'s batches, the plugins' restart counts, and the in-memory counters.
pub async fn render(
    (store, writer): (&Store, &GroupCommit),
    now: Millis,
    plugins: &[Arc<PluginHost>],
    metrics: &Metrics,
    live_leases: usize,
) -> Result<String, StoreError> {
    let mut out = String::new();
    render_store(&mut out, store, now).await?;
    family(
        &mut out,
        "keywarden_store_writes_failing",
        "gauge",
        "Whether the store refuses the daemon's writes (fetches are refused meanwhile).",
    );
    let failing = writer.health().failing().is_some();
    let _ = writeln!(out, "keywarden_store_writes_failing {}", u8::from(failing));
    family(
        &mut out,
        "keywarden_audit_rows_waiting",
        "gauge",
        "Brokered requests' audit rows the store refused, kept to be written (brokered requests are refused meanwhile).",
    );
    let _ = writeln!(out, "keywarden_audit_rows_waiting {}", writer.waiting());
    render_counters(&mut out, metrics, live_leases);
    family(
        &mut out,
        "keywarden_plugin_restarts_total",
        "counter",
        "Plugin process restarts after the first start.",
    );
    for p in plugins {
        let _ = writeln!(
            out,
            "keywarden_plugin_restarts_total{{plugin=\"{}\"}} {}",
            label(p.name()),
            p.restarts()
        );
    }
    Ok(out)
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Secret ages, quarantines and rotations, from the store.
async fn render_store(out: &mut String, store: &Store, now: Millis) -> Result<(), StoreError> {
    let secrets = store.list().await?;
    family(
        out,
        "keywarden_secret_age_seconds",
        "gauge",
        "Seconds since the secret's current version was set.",
    );
    for s in secrets.iter().filter(|s| s.version.is_some()) {
        let _ = writeln!(
            out,
            "keywarden_secret_age_seconds{{secret=\"{}\"}} {}",
            label(&s.name),
            (now - s.updated_at).max(0) / 1000
        );
    }
    family(
        out,
        "keywarden_secret_quarantined",
        "gauge",
        "Whether automatic rotation of the secret is stopped.",
    );
    for s in &secrets {
        let _ = writeln!(
            out,
            "keywarden_secret_quarantined{{secret=\"{}\"}} {}",
            label(&s.name),
            u8::from(s.quarantined_at.is_some())
        );
    }
    family(
        out,
        "keywarden_rotations_total",
        "counter",
        "Rotations by result (terminal state), since the store was created.",
    );
    for (state, count) in store.rotation_counts().await? {
        let _ = writeln!(
            out,
            "keywarden_rotations_total{{result=\"{state}\"}} {count}"
        );
    }
    family(
        out,
        "keywarden_pending_rotation_age_seconds",
        "gauge",
        "Age of each rotation in progress.",
    );
    for (secret, state, created_at) in store.active_rotation_ages().await? {
        let _ = writeln!(
            out,
            "keywarden_pending_rotation_age_seconds{{secret=\"{}\",state=\"{}\"}} {}",
            label(&secret),
            state,
            (now - created_at).max(0) / 1000
        );
    }
    Ok(())
}

/// Leases, fetch decisions, watches, alerts and signals, from the in-memory counters.
fn render_counters(out: &mut String, metrics: &Metrics, live_leases: usize) {
    family(out, "keywarden_active_leases", "gauge", "Live leases.");
    let _ = writeln!(out, "keywarden_active_leases {live_leases}");
    family(
        out,
        "keywarden_fetch_decisions_total",
        "counter",
        "Fetch decisions on the agent socket.",
    );
    for (decision, counter) in [
        ("allow", &metrics.fetch_allowed),
        ("deny", &metrics.fetch_denied),
        ("rate_limited", &metrics.fetch_rate_limited),
    ] {
        let _ = writeln!(
            out,
            "keywarden_fetch_decisions_total{{decision=\"{decision}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    family(
        out,
        "keywarden_watch_timeouts_total",
        "counter",
        "Watches that ended without a new version.",
    );
    let _ = writeln!(
        out,
        "keywarden_watch_timeouts_total {}",
        metrics.watch_timeouts.load(Ordering::Relaxed)
    );
    family(
        out,
        "keywarden_alerts_total",
        "counter",
        "Alerts raised, by kind.",
    );
    for (kind, n) in metrics.alerts.lock().expect("metrics lock").iter() {
        let _ = writeln!(out, "keywarden_alerts_total{{kind=\"{kind}\"}} {n}");
    }
    family(
        out,
        "keywarden_reactions_suppressed_total",
        "counter",
        "Repeated signals, canary fetches and anomalies not reacted to again within 10 minutes.",
    );
    let _ = writeln!(
        out,
        "keywarden_reactions_suppressed_total {}",
        metrics.reactions_suppressed.load(Ordering::Relaxed)
    );
    family(
        out,
        "keywarden_signals_rejected_total",
        "counter",
        "Signals refused for a bad signature.",
    );
    let _ = writeln!(
        out,
        "keywarden_signals_rejected_total {}",
        metrics.signals_rejected.load(Ordering::Relaxed)
    );
    render_brokered(out, metrics);
}
