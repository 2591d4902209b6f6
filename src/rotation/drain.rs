//! Draining: waiting for the leases on a replaced version to end, bounded by the grace
//! period, woken by lease ends and expiries.

use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::clock::Millis;
use crate::store::StoreError;

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainEnd {
    /// No live lease is left on the old version.
    Drained,
    /// The grace period ran out first.
    GraceElapsed,
    /// The daemon is stopping; the rotation stays in `draining`.
    Shutdown,
}

/// Waits until `live()` reports no live leases or `deadline` passes, waking early when `wake`
/// is notified (a lease ended) and at each lease's expiry.
pub async fn drain<F, Fut>(
    clock: &Clock,
    deadline: Millis,
    mut live: F,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<DrainEnd, StoreError>
where
    F: FnMut(Millis) -> Fut,
    Fut: std::future::Future<Output = Result<(i64, Option<Millis>), StoreError>>,
{
    loop {
        let now = clock.now();
        let (count, next_expiry) = live(now).await?;
        if count == 0 {
            return Ok(DrainEnd::Drained);
        }
        if now >= deadline {
            return Ok(DrainEnd::GraceElapsed);
        }
        // A lease past its expiry is still live until the sweeper ends it (and wakes us).
        let until = next_expiry
            .map_or(deadline, |e| e.min(deadline))
            .max(now + 100);
        tokio::select! {
            _ = clock.sleep_until(until) => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Ok(DrainEnd::Shutdown);
        }
    }
}

/// Live leases as the daemon's lease table sees them (authoritative while it runs).
pub trait LeaseView: Send + Sync {
    /// Live leases on a version at `now`, and the earliest of their expiries.
    fn live_on(&self, secret_id: &str, version: i64, now: Millis) -> (i64, Option<Millis>);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: Millis = 1_800_000_000_000;

    /// Leases that expire at given times (ms after T0).
    fn leases(
        expiries: Vec<Millis>,
    ) -> impl FnMut(Millis) -> std::future::Ready<Result<(i64, Option<Millis>), StoreError>> {
        move |now| {
            let live: Vec<_> = expiries
                .iter()
                .map(|e| T0 + e)
                .filter(|e| *e > now)
                .collect();
            std::future::ready(Ok((live.len() as i64, live.iter().min().copied())))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ends_when_the_last_lease_expires() {
        let clock = Clock::tokio(T0);
        let (_tx, mut rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let end = drain(
            &clock,
            T0 + 3_600_000,
            leases(vec![60_000, 300_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Drained);
        assert_eq!(start.elapsed(), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_is_bounded_by_grace() {
        let clock = Clock::tokio(T0);
        let (_tx, mut rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![7_200_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::GraceElapsed);
        assert_eq!(start.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_with_no_leases_is_immediate_and_shutdown_parks_it() {
        let clock = Clock::tokio(T0);
        let (tx, mut rx) = watch::channel(false);
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Drained);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(true).unwrap();
        });
        let end = drain(
            &clock,
            T0 + 600_000,
            leases(vec![500_000]),
            &Notify::new(),
            &mut rx,
        )
        .await
        .unwrap();
        assert_eq!(end, DrainEnd::Shutdown);
        stopper.await.unwrap();
    }
}
