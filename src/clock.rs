//! Wall-clock time for the engine, the scheduler and leases, with a variant that follows
//! tokio's (pausable) clock so schedules, TTLs and grace periods are tested without sleeping.

use std::time::Duration;

/// Unix time in milliseconds, the unit of every timestamp keywarden stores.
pub type Millis = i64;

/// The current wall-clock time as [`Millis`].
pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Longest single sleep: wall-clock jumps (NTP, suspend) are noticed within this long.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A source of "now" in Unix milliseconds.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// `start_wall` plus the time tokio's clock has advanced since `start` (tests pause it).
    Tokio {
        /// Wall time at `start`.
        start_wall: Millis,
        /// tokio's instant when the clock was made.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's time, starting at `start_wall`.
    pub fn tokio(start_wall: Millis) -> Clock {
        Clock::Tokio {
            start_wall,
            start: tokio::time::Instant::now(),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now(&self) -> Millis {
        match self {
            Clock::System => now_millis(),
            Clock::Tokio { start_wall, start } => {
                start_wall + start.elapsed().as_millis() as Millis
            }
        }
    }

    /// Sleeps until `at` (or at most a minute, after which the caller re-checks).
    pub async fn sleep_until(&self, at: Millis) {
        let wait = Duration::from_millis(at.saturating_sub(self.now()).max(0) as u64);
        tokio::time::sleep(wait.min(MAX_SLEEP)).await;
    }

    /// Sleeps for `d` (capped like [`Clock::sleep_until`]).
    pub async fn sleep(&self, d: Duration) {
        self.sleep_until(self.now() + d.as_millis() as Millis).await;
    }
}

/// `ms` as RFC 3339 in UTC with second precision (`2026-12-03T08:00:00Z`); the number itself
/// if it is out of range.
pub fn rfc3339(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}
