//! `GET /metrics` on the admin socket, in Prometheus text format: secret ages, rotations by
//! result, ages of rotations in progress, live leases, fetch decisions, plugin restarts.
//!
//! Written by hand (a few counters and a text format) to keep the key-holding process's
//! dependency tree small.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::Millis;
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
    /// Alerts raised, by kind.
    alerts: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
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

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric: the store's secrets and rotations as of `now`, the plugins' restart
/// counts, and the in-memory counters.
pub async fn render(
    store: &Store,
    now: Millis,
    plugins: &[Arc<PluginHost>],
    metrics: &Metrics,
    live_leases: usize,
) -> Result<String, StoreError> {
    let mut out = String::new();
    let secrets = store.list().await?;

    out.push_str(
        "# HELP keywarden_secret_age_seconds Seconds since the secret's current version was set.\n",
    );
    out.push_str("# TYPE keywarden_secret_age_seconds gauge\n");
    for s in secrets.iter().filter(|s| s.version.is_some()) {
        let _ = writeln!(
            out,
            "keywarden_secret_age_seconds{{secret=\"{}\"}} {}",
            label(&s.name),
            (now - s.updated_at).max(0) / 1000
        );
    }
    out.push_str("# HELP keywarden_secret_quarantined Whether automatic rotation of the secret is stopped.\n");
    out.push_str("# TYPE keywarden_secret_quarantined gauge\n");
    for s in &secrets {
        let _ = writeln!(
            out,
            "keywarden_secret_quarantined{{secret=\"{}\"}} {}",
            label(&s.name),
            u8::from(s.quarantined_at.is_some())
        );
    }

    out.push_str("# HELP keywarden_rotations_total Rotations by result (terminal state), since the store was created.\n");
    out.push_str("# TYPE keywarden_rotations_total counter\n");
    for (state, count) in store.rotation_counts().await? {
        let _ = writeln!(
            out,
            "keywarden_rotations_total{{result=\"{state}\"}} {count}"
        );
    }

    out.push_str(
        "# HELP keywarden_pending_rotation_age_seconds Age of each rotation in progress.\n",
    );
    out.push_str("# TYPE keywarden_pending_rotation_age_seconds gauge\n");
    for r in store.active_rotations().await? {
        let _ = writeln!(
            out,
            "keywarden_pending_rotation_age_seconds{{secret=\"{}\",state=\"{}\"}} {}",
            label(&r.secret_name),
            r.state,
            (now - r.created_at).max(0) / 1000
        );
    }

    out.push_str(
        "# HELP keywarden_active_leases Live leases.\n# TYPE keywarden_active_leases gauge\n",
    );
    let _ = writeln!(out, "keywarden_active_leases {live_leases}");

    out.push_str("# HELP keywarden_fetch_decisions_total Fetch decisions on the agent socket.\n");
    out.push_str("# TYPE keywarden_fetch_decisions_total counter\n");
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
    out.push_str(
        "# HELP keywarden_watch_timeouts_total Watches that ended without a new version.\n",
    );
    out.push_str("# TYPE keywarden_watch_timeouts_total counter\n");
    let _ = writeln!(
        out,
        "keywarden_watch_timeouts_total {}",
        metrics.watch_timeouts.load(Ordering::Relaxed)
    );

    out.push_str("# HELP keywarden_alerts_total Alerts raised, by kind.\n");
    out.push_str("# TYPE keywarden_alerts_total counter\n");
    for (kind, n) in metrics.alerts.lock().expect("metrics lock").iter() {
        let _ = writeln!(
            out,
            "keywarden_alerts_total{{kind=\"{}\"}} {n}",
            label(kind)
        );
    }
    out.push_str("# HELP keywarden_signals_rejected_total Signals refused for a bad signature.\n");
    out.push_str("# TYPE keywarden_signals_rejected_total counter\n");
    let _ = writeln!(
        out,
        "keywarden_signals_rejected_total {}",
        metrics.signals_rejected.load(Ordering::Relaxed)
    );
    out.push_str(
        "# HELP keywarden_plugin_restarts_total Plugin process restarts after the first start.\n",
    );
    out.push_str("# TYPE keywarden_plugin_restarts_total counter\n");
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
