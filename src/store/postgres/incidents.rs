//! Compromise incidents and alerts.

use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::audit::AuditEvent;
use crate::clock::{Millis, now_millis};
use crate::store::{AlertKind, RotationState, Scope, Trigger};
use crate::store::{AlertRecord, IncidentRecord, IncidentRotation, StoreError};

use super::PgStore;
use super::audit::append_audit_in;

impl PgStore {
    /// Records a new incident.
    pub async fn create_incident(
        &self,
        incident: &IncidentRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO incidents (id, started_at, scope, assume_compromise, trigger) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(incident.id.as_str())
        .bind(incident.started_at)
        .bind(serde_json::to_string(&incident.scope.canonical()).expect("scopes serialize"))
        .bind(i64::from(incident.assume_compromise))
        .bind(incident.trigger.as_str())
        .execute(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn incidents(
        &self,
        id: Option<&str>,
        unfinished: bool,
    ) -> Result<Vec<IncidentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, started_at, finished_at, scope, assume_compromise, trigger, leases_revoked, \
             closed_by FROM incidents WHERE ($1::text IS NULL OR id = $1) \
             AND (NOT $2::boolean OR finished_at IS NULL) ORDER BY started_at",
        )
        .bind(id)
        .bind(unfinished)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                let scope: String = r.try_get(3)?;
                let trigger: String = r.try_get(5)?;
                let parsed = (|| {
                    let scope = serde_json::from_str::<Scope>(&scope).map_err(|e| {
                        StoreError::Corrupt(format!("its scope is not a readable scope ({e})"))
                    })?;
                    Ok::<_, StoreError>((scope, Trigger::parse(&trigger)?))
                })();
                let (scope, trigger) = parsed.map_err(|e| e.in_row(format!("incident {id}")))?;
                let assume_compromise: i64 = r.try_get(4)?;
                Ok(IncidentRecord {
                    id,
                    started_at: r.try_get(1)?,
                    finished_at: r.try_get(2)?,
                    scope,
                    assume_compromise: assume_compromise != 0,
                    trigger,
                    leases_revoked: r.try_get(6)?,
                    closed_by: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// Adds to an incident's count of revoked leases.
    pub async fn add_incident_leases(&self, id: &str, revoked: i64) -> Result<(), StoreError> {
        // A write transaction like any other: the leader's term fences it.
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE incidents SET leases_revoked = leases_revoked + $1 WHERE id = $2")
            .bind(revoked)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks an incident finished.
    pub async fn finish_incident(&self, id: &str, audit: AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE incidents SET finished_at = $1 WHERE id = $2 AND finished_at IS NULL")
            .bind(now_millis())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a finished incident unfinished again (a run of its scope retries what failed),
    /// unless someone closed it by hand. Returns whether it was reopened.
    pub async fn reopen_incident(&self, id: &str, audit: AuditEvent) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let reopened = sqlx::query(
            "UPDATE incidents SET finished_at = NULL WHERE id = $1 AND closed_by IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if reopened {
            append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        }
        tx.commit().await?;
        Ok(reopened)
    }

    /// Closes an incident by hand: it is finished and never resumed. Returns whether it was
    /// open or finished (not already closed).
    pub async fn close_incident(
        &self,
        id: &str,
        by: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let closed = sqlx::query(
            "UPDATE incidents SET finished_at = coalesce(finished_at, $1), closed_by = $2 \
             WHERE id = $3 AND closed_by IS NULL",
        )
        .bind(now_millis())
        .bind(by)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if closed {
            append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        }
        tx.commit().await?;
        Ok(closed)
    }

    /// Every incident, oldest first.
    pub async fn all_incidents(&self) -> Result<Vec<IncidentRecord>, StoreError> {
        self.incidents(None, false).await
    }

    /// The latest rotation of each secret under an incident.
    pub async fn incident_rotations(&self, id: &str) -> Result<Vec<IncidentRotation>, StoreError> {
        // SQLite picks the latest by rowid (insertion order), which PostgreSQL's table does not
        // have: the order of `rotations.rs`'s latest rotation stands in for it. `COLLATE "C"`:
        // SQLite's byte order of names, whatever the database's collation.
        let rows = sqlx::query(
            "SELECT s.name, r.state, r.last_error FROM rotations r JOIN secrets s ON s.id = r.secret_id \
             WHERE r.incident_id = $1 AND r.id = (SELECT r2.id FROM rotations r2 \
             WHERE r2.incident_id = r.incident_id AND r2.secret_id = r.secret_id \
             ORDER BY r2.created_at DESC, (r2.state NOT IN ('done', 'failed', 'rolled-back')) DESC, \
             r2.updated_at DESC, r2.id DESC LIMIT 1) ORDER BY s.name COLLATE \"C\"",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(IncidentRotation {
                    secret: r.try_get(0)?,
                    state: RotationState::parse(&r.try_get::<String, _>(1)?)?,
                    last_error: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// Records an alert (with its audit row). Returns its id.
    pub async fn insert_alert(
        &self,
        alert: &AlertRecord,
        audit: AuditEvent,
    ) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO alerts (at, kind, secret, message, incident_id) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(alert.at)
        .bind(alert.kind.as_str())
        .bind(alert.secret.as_deref())
        .bind(alert.message.as_str())
        .bind(alert.incident_id.as_deref())
        .fetch_one(&mut *tx)
        .await?;
        append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The most recent alerts, newest first; with `unacked_only`, those no one acknowledged.
    pub async fn recent_alerts(
        &self,
        limit: i64,
        unacked_only: bool,
    ) -> Result<Vec<AlertRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, kind, secret, message, incident_id, acked_at, acked_by FROM alerts \
             WHERE NOT $1::boolean OR acked_at IS NULL ORDER BY id DESC LIMIT $2",
        )
        .bind(unacked_only)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get(0)?;
                let kind = AlertKind::parse(&r.try_get::<String, _>(2)?)
                    .map_err(|e| e.in_row(format!("alert {id}")))?;
                let acked_at: Option<Millis> = r.try_get(6)?;
                let acked_by: Option<String> = r.try_get(7)?;
                Ok(AlertRecord {
                    id,
                    at: r.try_get(1)?,
                    kind,
                    secret: r.try_get(3)?,
                    message: r.try_get(4)?,
                    incident_id: r.try_get(5)?,
                    acked: acked_at.map(|at| (at, acked_by.unwrap_or_default())),
                })
            })
            .collect()
    }

    /// Acknowledges alerts (these ids, or every one not yet acknowledged), with the audit row
    /// `audit` (its detail gets the ids). Returns the ids acknowledged now.
    pub async fn ack_alerts(
        &self,
        ids: Option<&[i64]>,
        by: &str,
        audit: AuditEvent,
    ) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let open: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM alerts WHERE acked_at IS NULL ORDER BY id")
                .fetch_all(&mut *tx)
                .await?;
        let acked: Vec<i64> = open
            .into_iter()
            .filter(|id| ids.is_none_or(|ids| ids.contains(id)))
            .collect();
        let now = now_millis();
        for id in &acked {
            sqlx::query("UPDATE alerts SET acked_at = $1, acked_by = $2 WHERE id = $3")
                .bind(now)
                .bind(by)
                .bind(*id)
                .execute(&mut *tx)
                .await?;
        }
        if !acked.is_empty() {
            let audit = audit.detail(serde_json::json!({ "alerts": acked }));
            append_audit_in(&mut tx, self.integrity(), &[audit]).await?;
        }
        tx.commit().await?;
        Ok(acked)
    }

    /// An incident by id.
    pub async fn incident(&self, id: &str) -> Result<Option<IncidentRecord>, StoreError> {
        Ok(self.incidents(Some(id), false).await?.pop())
    }

    /// Incidents not yet finished, oldest first.
    pub async fn unfinished_incidents(&self) -> Result<Vec<IncidentRecord>, StoreError> {
        self.incidents(None, true).await
    }
}

/// The audit rows that record a new value stored for secret `secret_id` (by `actor`) as the
/// resolution of incidents it was left to a person in: incidents whose scope covers it, that
/// started after its previous value was stored (`previous_value_at`), and that rotated nothing
/// of it.
pub(super) async fn resolutions_in(
    conn: &mut PgConnection,
    secret_id: &str,
    previous_value_at: Millis,
    actor: &str,
) -> Result<Vec<AuditEvent>, StoreError> {
    let (name, tags, provider): (String, String, String) =
        sqlx::query_as("SELECT name, tags, provider FROM secrets WHERE id = $1")
            .bind(secret_id)
            .fetch_one(&mut *conn)
            .await?;
    let tags: Vec<String> = serde_json::from_str(&tags).unwrap_or_default();
    let incidents: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.id, i.scope FROM incidents i WHERE i.started_at > $1 AND NOT EXISTS \
         (SELECT 1 FROM rotations r WHERE r.incident_id = i.id AND r.secret_id = $2) \
         ORDER BY i.started_at",
    )
    .bind(previous_value_at)
    .bind(secret_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(incidents
        .into_iter()
        .filter(|(_, scope)| {
            serde_json::from_str::<Scope>(scope).is_ok_and(|s| s.covers(&name, &tags, &provider))
        })
        .map(|(id, _)| {
            AuditEvent::new(actor, "compromise.resolved")
                .secret(name.as_str())
                .incident(Some(id))
        })
        .collect())
}
