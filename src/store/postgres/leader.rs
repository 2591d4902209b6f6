//! One leader per store on PostgreSQL: a lease row renewed on the database's clock, with a term
//! that increases at every takeover and that every leader-only write checks (a fencing token).
//!
//! - **Acquire**: the row is taken only when its lease has run out (on the database's clock) or
//!   is already this daemon's; every takeover increases the term. The takeover locks the row
//!   `FOR UPDATE`, so it waits for every fenced write in flight (below) to end first.
//! - **Renew**: every [`Timing::renew_every`], `valid_until = clock_timestamp() + ttl`, only while
//!   the row is still ours, at our term and unexpired; each attempt is bounded by
//!   [`Timing::attempt_deadline`] (a quarter of the TTL: less than a third).
//! - **Step down**: when the last good renewal *started* more than [`Timing::step_down_after`]
//!   (two thirds of the TTL) ago, as with a stalled connection or a paused process, or when a
//!   renewal finds the lease gone. The database dated that lease from a moment after the start,
//!   so a third of its TTL is still left: the leader stops before anyone else may start, as long
//!   as the two clocks run at about the same rate (their readings never matter).
//! - **Fence**: a leader-only write runs in a transaction from [`begin_fenced`], which reads the
//!   row `FOR KEY SHARE` and refuses unless the term is still ours. A renewal (it changes no key
//!   column) does not wait for it; a takeover does, and a transaction begun after a takeover sees
//!   the new term. A deposed leader's late write is refused, never applied.
//!
//! No session advisory locks: they are unsafe behind a transaction-pooling PgBouncer and linger
//! on a dead connection until the server notices it.

use std::time::Duration;

use sqlx::postgres::{PgPool, Postgres};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::store::StoreError;

/// This daemon's part in the store's leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Another daemon leads, or none does at the moment.
    Follower,
    /// This daemon leads, under this term.
    Leader {
        /// The fencing token its writes carry.
        term: i64,
    },
}

/// The lease's timing, all of it derived from its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lasts from its last renewal, on the database's clock.
    pub ttl: Duration,
}

impl Timing {
    /// How often a leader renews: six times per TTL, so a few failed attempts in a row do not
    /// cost the lease.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 6
    }

    /// The longest one acquisition or renewal may take: a quarter of the TTL (less than a third).
    pub fn attempt_deadline(&self) -> Duration {
        self.ttl / 4
    }

    /// A leader whose last good renewal started longer ago than this steps down: two thirds of
    /// the TTL.
    pub fn step_down_after(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// The pause after a failed renewal before the next attempt.
    fn retry_after_failure(&self) -> Duration {
        self.ttl / 20
    }

    fn ttl_seconds(&self) -> f64 {
        self.ttl.as_secs_f64()
    }
}

/// Who leads the store, as the database says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leadership {
    /// The leader's daemon id.
    pub holder: String,
    /// Its host name.
    pub host: String,
    /// Its process id on that host.
    pub pid: i64,
    /// Its term.
    pub term: i64,
    /// How long its lease has left, in milliseconds (negative: it ran out that long ago).
    pub valid_for_ms: i64,
}

/// A daemon on the store, as its last heartbeat left it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Its daemon id.
    pub id: String,
    /// Its host name.
    pub host: String,
    /// Its process id on that host.
    pub pid: i64,
    /// How long ago it was last heard from, in milliseconds.
    pub seen_ms_ago: i64,
}

/// One daemon campaigning for the leadership of a store.
#[derive(Debug, Clone)]
pub struct Candidate {
    pool: PgPool,
    id: String,
    host: String,
    pid: i64,
    timing: Timing,
}

impl Candidate {
    /// A candidate with a fresh daemon id, on this host and process.
    pub fn new(pool: PgPool, timing: Timing) -> Candidate {
        Candidate {
            pool,
            id: uuid::Uuid::new_v4().simple().to_string(),
            host: crate::store::host_name(),
            pid: i64::from(std::process::id()),
            timing,
        }
    }

    /// Its daemon id (random per process).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Takes the lease if it has run out or is already ours, under a new term (returned);
    /// `None` while another daemon's lease lasts. Records a heartbeat either way.
    pub async fn acquire(&self) -> Result<Option<i64>, StoreError> {
        self.heartbeat().await?;
        // A cheap look first: a follower must not lock the row (and hold up the leader's
        // fenced writes) every time it asks.
        let open: bool = sqlx::query_scalar(
            "SELECT valid_until <= clock_timestamp() OR holder = $1 FROM leadership WHERE id = 1",
        )
        .bind(&self.id)
        .fetch_one(&self.pool)
        .await?;
        if !open {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE waits for the fenced writes in flight; the look is repeated under the lock.
        let open: bool = sqlx::query_scalar(
            "SELECT valid_until <= clock_timestamp() OR holder = $1 FROM leadership \
             WHERE id = 1 FOR UPDATE",
        )
        .bind(&self.id)
        .fetch_one(&mut *tx)
        .await?;
        if !open {
            return Ok(None);
        }
        let term: i64 = sqlx::query_scalar(
            "UPDATE leadership SET holder = $1, host = $2, pid = $3, term = term + 1, \
             valid_until = clock_timestamp() + make_interval(secs => $4), \
             since = clock_timestamp() WHERE id = 1 RETURNING term",
        )
        .bind(&self.id)
        .bind(&self.host)
        .bind(self.pid)
        .bind(self.timing.ttl_seconds())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(term))
    }

    /// Extends our lease by a TTL from the database's now; `false` if it is no longer ours at
    /// `term` or has already run out (then we do not lead any more). Records a heartbeat.
    pub async fn renew(&self, term: i64) -> Result<bool, StoreError> {
        let renewed = sqlx::query(
            "WITH beat AS (INSERT INTO daemons (id, host, pid, seen_at) \
             VALUES ($1, $4, $5, clock_timestamp()) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at) \
             UPDATE leadership SET valid_until = clock_timestamp() + make_interval(secs => $3) \
             WHERE id = 1 AND holder = $1 AND term = $2 AND valid_until > clock_timestamp()",
        )
        .bind(&self.id)
        .bind(term)
        .bind(self.timing.ttl_seconds())
        .bind(&self.host)
        .bind(self.pid)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Ends our lease at `term` now, so another daemon can take over at once (a clean stop).
    pub async fn resign(&self, term: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leadership SET valid_until = clock_timestamp() \
             WHERE id = 1 AND holder = $1 AND term = $2",
        )
        .bind(&self.id)
        .bind(term)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Says this daemon is alive (shown by [`members`]).
    async fn heartbeat(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO daemons (id, host, pid, seen_at) VALUES ($1, $2, $3, clock_timestamp()) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
        )
        .bind(&self.id)
        .bind(&self.host)
        .bind(self.pid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes this daemon from [`members`] (a clean stop).
    async fn leave(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM daemons WHERE id = $1")
            .bind(&self.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Campaigns until `stop` changes (or its sender is dropped): tries to acquire every
    /// [`Timing::renew_every`], and while leading renews and steps down by the rules above.
    /// The returned watch says the role at every moment; it turns to [`Role::Follower`] before
    /// anything else happens when leadership ends. On `stop` a leader resigns.
    pub fn campaign(
        self,
        mut stop: watch::Receiver<bool>,
    ) -> (watch::Receiver<Role>, tokio::task::JoinHandle<()>) {
        let (role, watched) = watch::channel(Role::Follower);
        let task = tokio::spawn(async move {
            let timing = self.timing;
            loop {
                let started = Instant::now();
                match timeout(timing.attempt_deadline(), self.acquire()).await {
                    Ok(Ok(Some(term))) => {
                        tracing::info!(term, daemon = %self.id, "this daemon leads the store");
                        let _ = role.send(Role::Leader { term });
                        let stopped = self.lead(term, started, &mut stop).await;
                        let _ = role.send(Role::Follower);
                        if stopped {
                            let _ = timeout(timing.attempt_deadline(), self.leave()).await;
                            return;
                        }
                        continue;
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        error = %e,
                        "cannot reach the store's database to campaign for its leadership"
                    ),
                    Err(_) => tracing::warn!(
                        deadline = ?timing.attempt_deadline(),
                        "campaigning for the store's leadership timed out"
                    ),
                }
                tokio::select! {
                    _ = sleep(timing.renew_every()) => {}
                    _ = stop.changed() => {
                        let _ = timeout(timing.attempt_deadline(), self.leave()).await;
                        return;
                    }
                }
            }
        });
        (watched, task)
    }

    /// Renews the lease taken at `term` (an attempt that started at `last_good`) until it
    /// cannot: returns `false` on stepping down, `true` on `stop` (after resigning).
    async fn lead(
        &self,
        term: i64,
        mut last_good: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let timing = self.timing;
        let mut next = last_good + timing.renew_every();
        loop {
            let step_down_at = last_good + timing.step_down_after();
            tokio::select! {
                _ = sleep_until(next.min(step_down_at)) => {}
                _ = stop.changed() => {
                    let _ = timeout(timing.attempt_deadline(), self.resign(term)).await;
                    return true;
                }
            }
            let started = Instant::now();
            if started >= step_down_at {
                break;
            }
            let attempt = tokio::select! {
                attempt = timeout(timing.attempt_deadline(), self.renew(term)) => attempt,
                _ = sleep_until(step_down_at) => break,
            };
            match attempt {
                Ok(Ok(true)) => {
                    last_good = started;
                    next = started + timing.renew_every();
                }
                Ok(Ok(false)) => {
                    tracing::warn!(
                        term,
                        "the lease on the store's leadership was lost; stepping down"
                    );
                    return false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(term, error = %e, "renewing the store's leadership failed");
                    next = Instant::now() + timing.retry_after_failure();
                }
                Err(_) => {
                    tracing::warn!(term, deadline = ?timing.attempt_deadline(), "renewing the store's leadership timed out");
                    next = Instant::now() + timing.retry_after_failure();
                }
            }
        }
        tracing::warn!(
            term,
            since = ?last_good.elapsed(),
            "no good renewal of the store's leadership for two thirds of its lease; stepping down"
        );
        false
    }
}

/// Begins a leader-only write at `term`: a transaction that holds the leadership row
/// `FOR KEY SHARE` until it ends, or [`StoreError::Fenced`] if another term leads now.
pub async fn begin_fenced(
    pool: &PgPool,
    term: i64,
) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    let current: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1 FOR KEY SHARE")
        .fetch_one(&mut *tx)
        .await?;
    if current != term {
        return Err(StoreError::Fenced {
            mine: term,
            current,
        });
    }
    Ok(tx)
}

/// Who leads the store (`None`: no daemon has led it yet).
pub async fn leadership(pool: &PgPool) -> Result<Option<Leadership>, StoreError> {
    let row: (String, String, i64, i64, i64) = sqlx::query_as(
        "SELECT holder, host, pid, term, \
         (extract(epoch FROM valid_until - clock_timestamp()) * 1000)::bigint \
         FROM leadership WHERE id = 1",
    )
    .fetch_one(pool)
    .await?;
    let (holder, host, pid, term, valid_for_ms) = row;
    Ok((term > 0).then_some(Leadership {
        holder,
        host,
        pid,
        term,
        valid_for_ms,
    }))
}

/// The daemons heard from within `within`, by host and process id.
pub async fn members(pool: &PgPool, within: Duration) -> Result<Vec<Member>, StoreError> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT id, host, pid, (extract(epoch FROM clock_timestamp() - seen_at) * 1000)::bigint \
         FROM daemons WHERE seen_at > clock_timestamp() - make_interval(secs => $1) \
         ORDER BY host, pid, id",
    )
    .bind(within.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, host, pid, seen_ms_ago)| Member {
            id,
            host,
            pid,
            seen_ms_ago,
        })
        .collect())
}

#[cfg(test)]
mod tests;
