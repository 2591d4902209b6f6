//! What the audit log says about brokers: the day's spending and which brokers are blocked.

use sqlx::Row;

use crate::clock::Millis;
use crate::store::StoreError;

use super::PgStore;

impl PgStore {
    /// Sums the `broker.request` rows since `day_start` per caller (policy, uid, executable):
    /// requests since `minute_start`, requests and tokens since `day_start`.
    pub async fn broker_spending(
        &self,
        day_start: Millis,
        minute_start: Millis,
    ) -> Result<Vec<((String, u32, String), u64, u64, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT detail::jsonb ->> 'policy', (detail::jsonb ->> 'uid')::bigint, \
                    detail::jsonb ->> 'exe', count(*) FILTER (WHERE at >= $2), count(*), \
                    sum((detail::jsonb ->> 'tokens')::bigint)::bigint \
             FROM audit WHERE action = 'broker.request' AND at >= $1 GROUP BY 1, 2, 3",
        )
        .bind(day_start)
        .bind(minute_start)
        .fetch_all(&self.pool)
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
        // Each broker's last row (SQLite's bare column beside MAX(seq)): DISTINCT ON keeps the
        // first row of each broker in `seq DESC` order.
        let rows = sqlx::query(
            "SELECT broker FROM ( \
                SELECT DISTINCT ON (detail::jsonb ->> 'broker') \
                       detail::jsonb ->> 'broker' AS broker, action \
                FROM audit WHERE action IN ('broker.blocked', 'broker.unblocked') \
                ORDER BY detail::jsonb ->> 'broker', seq DESC) AS last \
             WHERE action = 'broker.blocked' ORDER BY broker NULLS FIRST",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<Option<String>, _>(0)?.unwrap_or_default()))
            .collect()
    }
}
