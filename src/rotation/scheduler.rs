//! The scheduler: decides when each secret is due and hands due names to the engine.
//!
//! Due times are persisted ([`DueTimes`]), so a restart keeps them; a daemon that was down
//! rotates an overdue secret once on start (the next time is then computed from now, not once
//! per missed slot). The engine moves a secret's due time itself after a failure (backoff) and
//! pokes the scheduler, which re-reads due times on every wake.

use std::collections::BTreeMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::clock::Clock;
use crate::clock::Millis;
use crate::store::{Store, StoreError};

/// When a secret rotates.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A 6-field cron line, UTC.
    Cron(Box<cron::Schedule>),
    /// A fixed interval.
    Every(Duration),
}

/// Why a cron line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Not the six fields keywarden's cron lines have.
    #[error(
        "expected a 6-field cron line (sec min hour day month weekday), got {fields} fields in {line:?}"
    )]
    Fields {
        /// The line.
        line: String,
        /// How many fields it has.
        fields: usize,
    },
    /// Six fields, but not a valid schedule.
    #[error("invalid cron line {line:?}: {reason}")]
    Invalid {
        /// The line.
        line: String,
        /// The parser's reason.
        reason: String,
    },
}

impl Schedule {
    /// Parses a 6-field cron line: sec min hour day-of-month month day-of-week.
    pub fn cron(line: &str) -> Result<Schedule, CronError> {
        let fields = line.split_whitespace().count();
        if fields != 6 {
            return Err(CronError::Fields {
                line: line.to_string(),
                fields,
            });
        }
        cron::Schedule::from_str(line)
            .map(|s| Schedule::Cron(Box::new(s)))
            .map_err(|e| CronError::Invalid {
                line: line.to_string(),
                reason: e.to_string(),
            })
    }

    /// The first due time strictly after `now`.
    pub fn next_after(&self, now: Millis) -> Millis {
        match self {
            Schedule::Every(d) => now + d.as_millis() as Millis,
            Schedule::Cron(s) => chrono::DateTime::from_timestamp_millis(now)
                .and_then(|t| s.after(&t).next())
                .map_or(Millis::MAX, |t| t.timestamp_millis()),
        }
    }
}

/// A scheduled secret.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its schedule.
    pub schedule: Schedule,
    /// Random delay added to each due time, up to this much.
    pub jitter: Option<Duration>,
}

/// A secret's persisted due time.
#[derive(Debug, Clone)]
pub struct DueTime {
    /// The secret.
    pub name: String,
    /// When it is next due.
    pub next: Option<Millis>,
    /// Quarantined secrets are not started automatically.
    pub quarantined: bool,
}

/// Where due times live: the store in the daemon, memory in tests.
pub trait DueTimes: Send + Sync + 'static {
    /// Every secret's due time.
    fn load(&self) -> impl Future<Output = Result<Vec<DueTime>, StoreError>> + Send;
    /// Sets one secret's due time.
    fn save(&self, name: &str, next: Millis)
    -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl DueTimes for Store {
    async fn load(&self) -> Result<Vec<DueTime>, StoreError> {
        Ok(self
            .due_times()
            .await?
            .into_iter()
            .map(|(name, next, quarantined)| DueTime {
                name,
                next,
                quarantined,
            })
            .collect())
    }

    async fn save(&self, name: &str, next: Millis) -> Result<(), StoreError> {
        match self.secret(name).await? {
            Some(secret) => self.set_next_rotation(&secret.id, Some(next)).await,
            None => Ok(()),
        }
    }
}

/// The scheduler task.
#[derive(Debug)]
pub struct Scheduler<D> {
    entries: BTreeMap<String, Entry>,
    due_times: D,
    clock: Clock,
    due: mpsc::Sender<String>,
    wake: Arc<Notify>,
}

impl<D: DueTimes> Scheduler<D> {
    /// A scheduler over `entries` that sends due names to `due`; `wake` makes it re-read.
    pub fn new(
        entries: BTreeMap<String, Entry>,
        due_times: D,
        clock: Clock,
        due: mpsc::Sender<String>,
        wake: Arc<Notify>,
    ) -> Self {
        Scheduler {
            entries,
            due_times,
            clock,
            due,
            wake,
        }
    }

    fn next_for(&self, entry: &Entry, now: Millis) -> Millis {
        let jitter = entry.jitter.map_or(0, |j| {
            (j.as_millis() as f64 * super::backoff::rand_unit()) as Millis
        });
        entry.schedule.next_after(now).saturating_add(jitter)
    }

    /// Brings persisted due times in line with the schedules: a secret never scheduled gets its
    /// first due time; a schedule that moved earlier (a config change) takes effect now.
    async fn reconcile(&self) -> Result<(), StoreError> {
        let now = self.clock.now();
        let persisted: BTreeMap<String, Option<Millis>> = self
            .due_times
            .load()
            .await?
            .into_iter()
            .map(|d| (d.name, d.next))
            .collect();
        for (name, entry) in &self.entries {
            let Some(current) = persisted.get(name) else {
                continue;
            };
            let computed = self.next_for(entry, now);
            let wanted = current.map_or(computed, |p| p.min(computed));
            if *current != Some(wanted) {
                self.due_times.save(name, wanted).await?;
            }
        }
        Ok(())
    }

    /// Sends every due secret once and reschedules it; returns when to look next.
    async fn tick(&self) -> Result<Millis, StoreError> {
        let now = self.clock.now();
        let mut earliest = now + 60_000;
        for due in self.due_times.load().await? {
            let Some(entry) = self.entries.get(&due.name) else {
                continue;
            };
            let Some(next) = due.next else { continue };
            if due.quarantined {
                continue;
            }
            if next <= now {
                if self.due.send(due.name.clone()).await.is_err() {
                    return Ok(earliest);
                }
                let next = self.next_for(entry, now);
                self.due_times.save(&due.name, next).await?;
                earliest = earliest.min(next);
            } else {
                earliest = earliest.min(next);
            }
        }
        Ok(earliest)
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if self.entries.is_empty() {
            // Nothing is scheduled: no reason to read every secret's due time on each wake.
            let _ = shutdown.wait_for(|stop| *stop).await;
            return;
        }
        if let Err(e) = self.reconcile().await {
            tracing::error!(error = %e, "scheduler could not load due times");
        }
        loop {
            let next = match self.tick().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "scheduler tick failed; retrying in a minute");
                    self.clock.now() + 60_000
                }
            };
            tokio::select! {
                _ = self.clock.sleep_until(next) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// name → (next due time, quarantined)
    type Table = BTreeMap<String, (Option<Millis>, bool)>;

    #[derive(Default, Clone)]
    struct Memory(Arc<Mutex<Table>>);

    impl DueTimes for Memory {
        async fn load(&self) -> Result<Vec<DueTime>, StoreError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(n, (next, q))| DueTime {
                    name: n.clone(),
                    next: *next,
                    quarantined: *q,
                })
                .collect())
        }

        async fn save(&self, name: &str, next: Millis) -> Result<(), StoreError> {
            self.0.lock().unwrap().entry(name.into()).or_default().0 = Some(next);
            Ok(())
        }
    }

    const HOUR: Millis = 3_600_000;
    const T0: Millis = 1_800_000_000_000;

    fn start(
        schedules: &[(&str, Schedule)],
        persisted: &[(&str, Option<Millis>, bool)],
    ) -> (Memory, mpsc::Receiver<String>, watch::Sender<bool>) {
        let memory = Memory::default();
        for (name, next, q) in persisted {
            memory
                .0
                .lock()
                .unwrap()
                .insert(name.to_string(), (*next, *q));
        }
        let entries = schedules
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Entry {
                        schedule: s.clone(),
                        jitter: None,
                    },
                )
            })
            .collect();
        let (tx, rx) = mpsc::channel(100);
        let (stop_tx, stop_rx) = watch::channel(false);
        let scheduler = Scheduler::new(
            entries,
            memory.clone(),
            Clock::tokio(T0),
            tx,
            Arc::new(Notify::new()),
        );
        tokio::spawn(scheduler.run(stop_rx));
        (memory, rx, stop_tx)
    }

    fn drain(rx: &mut mpsc::Receiver<String>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(n) = rx.try_recv() {
            out.push(n);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn rotate_every_fires_on_time_and_persists_the_next_due_time() {
        let every = Schedule::Every(Duration::from_secs(3600));
        let (memory, mut rx, _stop) = start(&[("a", every)], &[("a", None, false)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            drain(&mut rx).is_empty(),
            "a fresh schedule is not due at once"
        );
        assert_eq!(memory.0.lock().unwrap()["a"].0, Some(T0 + HOUR));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(drain(&mut rx), ["a"]);
        tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
        assert_eq!(drain(&mut rx), ["a", "a"]);
        let next = memory.0.lock().unwrap()["a"].0.unwrap();
        assert!(
            (T0 + 4 * HOUR..=T0 + 4 * HOUR + 1000).contains(&next),
            "{}",
            next - T0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_secret_rotates_once_not_once_per_missed_slot() {
        let every = Schedule::Every(Duration::from_secs(3600));
        // The daemon was down for five hours: five slots missed.
        let (memory, mut rx, _stop) =
            start(&[("late", every)], &[("late", Some(T0 - 5 * HOUR), false)]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(drain(&mut rx), ["late"]);
        assert_eq!(memory.0.lock().unwrap()["late"].0, Some(T0 + HOUR));
        tokio::time::sleep(Duration::from_secs(3000)).await;
        assert!(drain(&mut rx).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn cron_schedules_quarantine_and_unscheduled_secrets() {
        // Every day at 03:00:00 UTC.
        let daily = Schedule::cron("0 0 3 * * *").unwrap();
        let (memory, mut rx, _stop) = start(
            &[
                ("daily", daily),
                ("held", Schedule::Every(Duration::from_secs(60))),
            ],
            &[
                ("daily", None, false),
                ("held", Some(T0 - 1), true),
                ("manual", None, false),
            ],
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let first = memory.0.lock().unwrap()["daily"].0.unwrap();
        let t = chrono::DateTime::from_timestamp_millis(first).unwrap();
        assert_eq!(t.format("%H:%M:%S").to_string(), "03:00:00");
        assert!(first > T0 && first <= T0 + 24 * HOUR);
        tokio::time::sleep(Duration::from_secs(3 * 24 * 3600)).await;
        assert_eq!(
            drain(&mut rx),
            ["daily", "daily", "daily"],
            "quarantined and unscheduled never fire"
        );
    }

    #[test]
    fn cron_lines_must_have_six_fields() {
        assert!(Schedule::cron("0 3 * * *").is_err());
        assert!(Schedule::cron("0 0 3 * * * 2030").is_err());
        assert!(Schedule::cron("0 0 3 * * *").is_ok());
        assert!(Schedule::cron("61 0 3 * * *").is_err());
    }
}
