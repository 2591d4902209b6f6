//! What each consumer has acknowledged.

use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::audit::AuditEvent;
use crate::clock::now_millis;
use crate::store::{DeliveryRecord, StoreError};

use super::PgStore;
use super::audit::Chain;

impl PgStore {
    /// What each consumer of a secret has acknowledged.
    pub async fn deliveries(&self, secret_id: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        // COLLATE "C": byte order, as SQLite's BINARY collation sorts.
        let rows = sqlx::query(
            "SELECT consumer, version, acked_at, attempts, last_error FROM deliveries \
             WHERE secret_id = $1 ORDER BY consumer COLLATE \"C\"",
        )
        .bind(secret_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRecord {
                    consumer: r.try_get(0)?,
                    version: r.try_get(1)?,
                    acked_at: r.try_get(2)?,
                    attempts: r.try_get(3)?,
                    last_error: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Records a delivery attempt: `Ok(audit)` acknowledges `version` and appends its audit row
    /// in the same transaction; `Err` counts a failure.
    pub async fn record_delivery(
        &self,
        secret_id: &str,
        consumer: &str,
        version: i64,
        outcome: Result<AuditEvent, &str>,
    ) -> Result<(), StoreError> {
        let job = std::sync::Arc::new((
            secret_id.to_string(),
            consumer.to_string(),
            outcome.map_err(str::to_string),
        ));
        self.write(Box::new(move |conn, chain, _| {
            let job = job.clone();
            Box::pin(async move {
                let (secret_id, consumer, outcome) = &*job;
                let outcome = outcome.as_ref().map_err(String::as_str);
                delivery_in(conn, chain, secret_id, consumer, version, outcome).await
            })
        }))
        .await
    }
}

/// The statements of [`PgStore::record_delivery`]; an audit row it appends goes on `chain`.
async fn delivery_in(
    conn: &mut PgConnection,
    chain: &mut Chain,
    secret_id: &str,
    consumer: &str,
    version: i64,
    outcome: Result<&AuditEvent, &str>,
) -> Result<(), StoreError> {
    let now = now_millis();
    match outcome {
        Ok(audit) => {
            sqlx::query(
                "INSERT INTO deliveries (secret_id, consumer, version, acked_at, attempts) \
                 VALUES ($1, $2, $3, $4, 0) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                 version = excluded.version, acked_at = excluded.acked_at, attempts = 0, \
                 last_error = NULL",
            )
            .bind(secret_id)
            .bind(consumer)
            .bind(version)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            chain.append(conn, std::slice::from_ref(audit)).await?;
        }
        Err(error) => {
            sqlx::query(
                "INSERT INTO deliveries (secret_id, consumer, version, attempts, last_error) \
                 VALUES ($1, $2, $3, 1, $4) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                 attempts = CASE WHEN deliveries.version = excluded.version \
                            THEN deliveries.attempts + 1 ELSE 1 END, \
                 acked_at = CASE WHEN deliveries.version = excluded.version \
                            THEN deliveries.acked_at ELSE NULL END, \
                 version = excluded.version, last_error = excluded.last_error",
            )
            .bind(secret_id)
            .bind(consumer)
            .bind(version)
            .bind(error)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
