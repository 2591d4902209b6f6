//! What each consumer has acknowledged.

use rusqlite::params;

use crate::audit::AuditEvent;
use crate::clock::now_millis;
use crate::store::{DeliveryRecord, StoreError};

use super::SqliteStore;
use super::audit::append_audit;
use super::direct::Tx;

impl SqliteStore {
    /// What each consumer of a secret has acknowledged.
    pub async fn deliveries(&self, secret_id: &str) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.direct_reader.read(|db| {
            let mut select = db.prepare_cached(
                "SELECT consumer, version, acked_at, attempts, last_error FROM deliveries \
                 WHERE secret_id = ? ORDER BY consumer",
            )?;
            let rows = select.query_map([secret_id], |r| {
                Ok(DeliveryRecord {
                    consumer: r.get(0)?,
                    version: r.get(1)?,
                    acked_at: r.get(2)?,
                    attempts: r.get(3)?,
                    last_error: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
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
        let (secret_id, consumer) = (secret_id.to_string(), consumer.to_string());
        let outcome = outcome.map_err(str::to_string);
        self.write(Box::new(move |tx| {
            let outcome = outcome.as_ref().map_err(String::as_str);
            delivery_in(tx, &secret_id, &consumer, version, outcome)
        }))
        .await
    }
}

/// The statements of [`SqliteStore::record_delivery`].
fn delivery_in(
    tx: &mut Tx<'_>,
    secret_id: &str,
    consumer: &str,
    version: i64,
    outcome: Result<&AuditEvent, &str>,
) -> Result<(), StoreError> {
    let now = now_millis();
    match outcome {
        Ok(audit) => {
            tx.prepare_cached(
                "INSERT INTO deliveries (secret_id, consumer, version, acked_at, attempts) \
                 VALUES (?, ?, ?, ?, 0) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                 version = excluded.version, acked_at = excluded.acked_at, attempts = 0, \
                 last_error = NULL",
            )?
            .execute(params![secret_id, consumer, version, now])?;
            append_audit(tx, None, std::slice::from_ref(audit))?;
        }
        Err(error) => {
            tx.prepare_cached(
                "INSERT INTO deliveries (secret_id, consumer, version, attempts, last_error) \
                 VALUES (?, ?, ?, 1, ?) ON CONFLICT (secret_id, consumer) DO UPDATE SET \
                 attempts = CASE WHEN deliveries.version = excluded.version \
                            THEN deliveries.attempts + 1 ELSE 1 END, \
                 acked_at = CASE WHEN deliveries.version = excluded.version \
                            THEN deliveries.acked_at ELSE NULL END, \
                 version = excluded.version, last_error = excluded.last_error",
            )?
            .execute(params![secret_id, consumer, version, error])?;
        }
    }
    Ok(())
}
