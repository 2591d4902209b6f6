//! What `list` and `status` report, built once for the CLI and the admin API alike.

use serde_json::{Value, json};

use crate::broker::Brokers;
use crate::clock::Millis;
use crate::crypto;
use crate::plugin_host::PluginHost;
use crate::store::{AlertRecord, SecretSummary, Store, StoreError};

fn time(ms: Option<Millis>) -> Value {
    ms.map_or(Value::Null, |ms| Value::String(crate::clock::rfc3339(ms)))
}

/// One secret as `list --json` shows it (the shape README "Using the store" documents, plus
/// fields `status` uses).
pub fn secret_entry(s: &SecretSummary) -> Value {
    json!({
        "name": s.name,
        "provider": s.provider,
        "version": s.version,
        "updated_at": time(Some(s.updated_at)),
        "next_rotation_at": time(s.next_rotation_at),
        "rotation_state": s.rotation_state.map(|r| r.as_str()),
        "quarantined": s.quarantined_at.is_some(),
        "tags": s.tags,
        "last_rotated_at": time(s.last_rotated_at),
        "failed_attempts": s.failed_attempts,
        "last_error": s.last_error,
    })
}

/// Whether the store takes the daemon's writes: `{"error": null, "failing_since": null}`, or
/// the latest failed batch's error and since when writes fail (fetches are refused meanwhile);
/// and `brokered_rows_waiting`, the brokered requests' audit rows it refused and that wait to
/// be written (brokered requests are refused meanwhile).
pub fn write_health(writer: &crate::group_commit::GroupCommit) -> Value {
    let failing = writer.health().failing();
    json!({
        "error": failing.as_ref().map(|f| f.error.clone()),
        "failing_since": time(failing.map(|f| f.since)),
        "brokered_rows_waiting": writer.waiting(),
    })
}

/// One alert as `status --json` and `alerts list --json` show it.
pub fn alert_entry(a: &AlertRecord) -> Value {
    json!({
        "id": a.id,
        "at": time(Some(a.at)),
        "kind": a.kind,
        "secret": a.secret,
        "message": a.message,
        "incident_id": a.incident_id,
        "acked_at": time(a.acked.as_ref().map(|(at, _)| *at)),
        "acked_by": a.acked.as_ref().map(|(_, by)| by),
    })
}

/// The `status` report: every secret, the audit chain head, the ten most recent alerts no one
/// acknowledged, open incidents, warnings (changes a server did not persist), and the plugins
/// when a daemon runs.
pub async fn report(
    store: &Store,
    plugins: Option<&[std::sync::Arc<PluginHost>]>,
) -> Result<Value, StoreError> {
    let secrets: Vec<Value> = store.list().await?.iter().map(secret_entry).collect();
    let head = store.audit_head().await?;
    let mut plugin_entries = Vec::new();
    if let Some(plugins) = plugins {
        for p in plugins {
            plugin_entries.push(json!({
                "name": p.name(),
                "running": p.is_running().await,
                "restarts": p.restarts(),
                "kinds": p.hello().map(|h| h.kinds.keys().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            }));
        }
    }
    let alerts: Vec<Value> = store
        .recent_alerts(10, true)
        .await?
        .iter()
        .map(alert_entry)
        .collect();
    let open_incidents: Vec<Value> = store
        .unfinished_incidents()
        .await?
        .iter()
        .map(|i| {
            json!({
                "incident_id": i.id,
                "started_at": time(Some(i.started_at)),
                "scope": i.scope,
                "assume_compromise": i.assume_compromise,
            })
        })
        .collect();
    let warnings: Vec<Value> = store
        .unpersisted_current_versions()
        .await?
        .iter()
        .map(|name| {
            json!({
                "secret": name,
                "message": "the server did not persist the current version's change (no ACL \
                            file, no writable config): a restart of it would bring the old \
                            password back",
            })
        })
        .collect();
    let mut report = json!({
        "daemon": { "running": plugins.is_some(), "plugins": plugin_entries },
        "alerts": alerts,
        "warnings": warnings,
        "incidents": open_incidents,
        "secrets": secrets,
        "audit": {
            "rows": head.as_ref().map_or(0, |h| h.0),
            "head": head.map(|h| crypto::hex(&h.1)),
        },
    });
    if let Some(pg) = store.postgres() {
        report["leadership"] = leadership(pg).await?;
    } else if let Some(pid) = store.lock_holder() {
        // A SQLite store's one leader is the daemon holding its lock; there is no term.
        let host = crate::store::host_name();
        report["leadership"] = json!({
            "leader": { "host": host, "pid": pid },
            "term": null,
            "daemons": [{ "host": host, "pid": pid, "role": "leader" }],
        });
    }
    Ok(report)
}

/// A PostgreSQL store's leadership: who leads (daemon id, host, pid, term, how long its lease
/// has left) and every daemon heard from in the last minute, each marked leader or follower.
async fn leadership(pg: &crate::store::PgStore) -> Result<Value, StoreError> {
    let (leader, members) = pg.leadership(std::time::Duration::from_secs(60)).await?;
    let live = leader.as_ref().filter(|l| l.valid_for_ms > 0);
    let daemons: Vec<Value> = members
        .iter()
        .map(|m| {
            let leads = live.is_some_and(|l| l.holder == m.id);
            json!({
                "id": m.id,
                "host": m.host,
                "pid": m.pid,
                "seen_ms_ago": m.seen_ms_ago,
                "role": if leads { "leader" } else { "follower" },
            })
        })
        .collect();
    Ok(json!({
        "leader": live,
        "term": leader.as_ref().map(|l| l.term),
        "daemons": daemons,
    }))
}

/// Each broker's routes (the secret and its latest version), whether it is blocked, and what
/// each policy and caller spent today.
pub async fn brokers(brokers: &Brokers, store: &Store, now: Millis) -> Result<Value, StoreError> {
    let mut list = serde_json::Map::new();
    for (name, b) in &brokers.brokers {
        let mut routes = Vec::new();
        for secret in b.secrets() {
            let version = store.secret(secret).await?.and_then(|s| s.latest_version);
            let (serving, draining) = brokers.keys.in_use(secret);
            routes.push(json!({
                "secret": secret,
                "version": version,
                "serving": serving,
                "draining": draining,
            }));
        }
        list.insert(
            name.clone(),
            json!({
                "routes": routes,
                "listen": b.listen.map(|a| a.to_string()),
                "blocked": brokers.enforced.is_blocked(name),
            }),
        );
    }
    Ok(json!({
        "brokers": list,
        "today": brokers.enforced.budgets.today(now),
        "restarts": brokers.process.restarts(),
    }))
}
