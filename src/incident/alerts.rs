//! Alerts: raised by signals, leak reports, canaries and access anomalies. Each is a row in the
//! store (shown by `status`), an audit row, a counter in `/metrics`, a warning in the log, and
//! a delivery to the configured `alert_command` (the alert as JSON on stdin) and/or
//! `alert_consumer` (a plugin `push`, such as a webhook).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use keywarden_plugin_sdk::{Op, Request, Secret};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::audit::AuditEvent;
use crate::consumer::Consumer;
use crate::metrics::Metrics;
use crate::rotation::engine::Engine;
use crate::sandbox::Confinement;
use crate::store::{AlertKind, AlertRecord};

/// How long an alert command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The alert sink.
pub struct Alerts {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    command: Vec<String>,
    confinement: Confinement,
    consumer: Option<String>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").finish_non_exhaustive()
    }
}

impl Alerts {
    /// Alerts delivered to `command` (run under `confinement`) and/or `consumer`.
    pub fn new(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        command: Vec<String>,
        confinement: Confinement,
        consumer: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Alerts {
            engine,
            metrics,
            command,
            confinement,
            consumer,
        })
    }

    /// Records and delivers an alert. Messages must not contain secret values.
    pub async fn raise(
        &self,
        kind: AlertKind,
        secret: Option<&str>,
        message: String,
        incident_id: Option<String>,
    ) -> Option<i64> {
        let mut alert = AlertRecord {
            id: 0,
            at: self.engine.clock().now(),
            kind,
            secret: secret.map(str::to_string),
            message,
            incident_id,
            acked: None,
        };
        tracing::warn!(%kind, secret, incident = ?alert.incident_id, "ALERT: {}", alert.message);
        self.metrics.count_alert(kind);
        let mut audit = AuditEvent::new("alerts", "alert.raised")
            .incident(alert.incident_id.clone())
            .detail(json!({ "kind": kind, "message": alert.message }));
        if let Some(s) = secret {
            audit = audit.secret(s);
        }
        match self
            .engine
            .vault()
            .store()
            .insert_alert(&alert, audit)
            .await
        {
            Ok(id) => alert.id = id,
            Err(e) => tracing::error!(error = %e, "could not record an alert"),
        }
        let payload = serde_json::to_string(&alert).expect("alerts serialize");
        if !self.command.is_empty() {
            if let Err(e) = self.run_command(&payload).await {
                tracing::error!(error = %e, "the alert command failed");
            }
        }
        if let Some(name) = &self.consumer {
            if let Err(e) = self.push(name, &alert, &payload).await {
                tracing::error!(consumer = %name, error = %e, "the alert consumer failed");
            }
        }
        Some(alert.id)
    }

    async fn run_command(&self, payload: &str) -> Result<(), String> {
        let mut child = self
            .confinement
            .command_for(&self.command, &[])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("LANG", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", self.command[0]))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(payload.as_bytes()).await;
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("exited with {status}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not finish within {COMMAND_TIMEOUT:?}")),
        }
    }

    async fn push(&self, name: &str, alert: &AlertRecord, payload: &str) -> Result<(), String> {
        let Some(Consumer::Plugin {
            host,
            kind,
            settings,
            credentials,
        }) = self.engine.catalog().consumers.get(name)
        else {
            return Err("not a plugin consumer".into());
        };
        let request = self
            .engine
            .plugin_request(
                Op::Push,
                kind,
                alert.secret.as_deref(),
                settings,
                credentials,
            )
            .await
            .map_err(|e| e.to_string())?;
        let request = Request {
            version: Some(alert.id),
            value: Some(Secret::new(payload)),
            meta: Some(serde_json::Map::from_iter([(
                "alert".to_string(),
                json!(true),
            )])),
            ..request
        };
        host.call(request)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
