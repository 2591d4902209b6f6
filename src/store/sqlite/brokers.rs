//! What the audit log says about brokers: the day's spending and which brokers are blocked.

use sqlx::Row;

use crate::clock::Millis;
use crate::store::StoreError;

use super::SqliteStore;

impl SqliteStore {
    /// Sums the `broker.request` rows since `day_start` per caller (policy, uid, executable):
    /// requests since `minute_start`, requests and tokens since `day_start`.
    pub async fn broker_spending(
        &self,
        day_start: Millis,
        minute_start: Millis,
    ) -> Result<Vec<((String, u32, String), u64, u64, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT json_extract(detail, '$.policy'), json_extract(detail, '$.uid'), \
                    json_extract(detail, '$.exe'), SUM(at >= ?2), COUNT(*), \
                    SUM(json_extract(detail, '$.tokens')) \
             FROM audit WHERE action = 'broker.request' AND at >= ?1 GROUP BY 1, 2, 3",
        )
        .bind(day_start)
        .bind(minute_start)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    (
                        r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
                        r.try_get::<Option<i64>, _>(1)?.unwrap_or(-1) as u32,
                        r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
                    ),
                    r.try_get::<i64, _>(3)? as u64,
                    r.try_get::<i64, _>(4)? as u64,
                    r.try_get::<Option<i64>, _>(5)?.unwrap_or(0) as u64,
                ))
            })
            .collect()
    }

    /// Brokers whose last `broker.blocked`/`broker.unblocked` row blocks them.
    pub async fn blocked_brokers(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT broker, action FROM ( \
                SELECT json_extract(detail, '$.broker') AS broker, action, MAX(seq) \
                FROM audit WHERE action IN ('broker.blocked', 'broker.unblocked') GROUP BY 1) \
             WHERE action = 'broker.blocked'",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<Option<String>, _>(0)?.unwrap_or_default()))
            .collect()
    }
}
