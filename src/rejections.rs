//! Repeated rejections cost one audit row per cause and window, not one per request.
//!
//! A denied fetch, an admin request from a uid that may not use the admin socket, a signal with
//! a bad signature: the first of a cause (action, uid, secret, reason) gets its own audit row at
//! once, committed before the answer as usual. Repeats within [`WINDOW`] are answered without any durable write and counted
//! in memory; when the window ends, one row records how many there were (`detail.repeats`). A
//! flood of rejections from one peer therefore costs memory bounded by [`MAX_CAUSES`] and one
//! row per cause every few seconds, and cannot slow the audit writer for everyone else. One
//! peer varying what it asks for (a secret's name, a broker path) to make every rejection a new
//! cause gets [`MAX_CAUSES_PER_PEER`] of them per window; the rest share one cause. A crash
//! loses at most one window's counts, never a row of something that was handed out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::store::Store;

/// How long repeats of one cause are counted before their row is written.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Causes tracked at once; past it, new causes share one overflow entry.
const MAX_CAUSES: usize = 10_000;

/// Causes of one action and uid tracked at once; past it, that peer's new causes share one.
const MAX_CAUSES_PER_PEER: usize = 32;

/// The reason of a cause that stands for many.
const MANY: &str = "many different causes";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Cause {
    action: &'static str,
    uid: u32,
    secret: Option<String>,
    reason: String,
}

#[derive(Debug)]
struct Tally {
    /// The actor of the first rejection (the aggregated row is written as it).
    actor: String,
    since: tokio::time::Instant,
    repeats: u64,
}

/// The rejections seen in the current windows.
#[derive(Debug, Default)]
pub struct Rejections {
    causes: Mutex<Causes>,
}

#[derive(Debug, Default)]
struct Causes {
    tallies: HashMap<Cause, Tally>,
    /// How many of `tallies` each (action, uid) has.
    per_peer: HashMap<(&'static str, u32), usize>,
}

impl Rejections {
    /// Notes a rejection; `true` when it is the first of its cause in this window (the caller
    /// writes its audit row now), `false` when it was counted (no write).
    pub fn first(
        &self,
        action: &'static str,
        uid: u32,
        secret: Option<&str>,
        reason: &str,
        actor: &str,
    ) -> bool {
        let mut causes = self.causes.lock().expect("rejections lock");
        let Causes { tallies, per_peer } = &mut *causes;
        let mut cause = Cause {
            action,
            uid,
            secret: secret.map(str::to_string),
            reason: reason.to_string(),
        };
        if !tallies.contains_key(&cause) {
            let many = |uid| Cause {
                action,
                uid,
                secret: None,
                reason: MANY.into(),
            };
            if tallies.len() >= MAX_CAUSES {
                cause = many(u32::MAX);
            } else if per_peer.get(&(action, uid)).copied().unwrap_or(0) >= MAX_CAUSES_PER_PEER {
                cause = many(uid);
            }
        }
        match tallies.get_mut(&cause) {
            Some(tally) => {
                tally.repeats += 1;
                false
            }
            None => {
                *per_peer.entry((action, cause.uid)).or_default() += 1;
                tallies.insert(
                    cause,
                    Tally {
                        actor: actor.to_string(),
                        since: tokio::time::Instant::now(),
                        repeats: 0,
                    },
                );
                true
            }
        }
    }

    /// Audit rows for the windows that ended (all of them with `everything`), removing them.
    fn take_due(&self, everything: bool) -> Vec<AuditEvent> {
        let now = tokio::time::Instant::now();
        let mut causes = self.causes.lock().expect("rejections lock");
        let Causes { tallies, per_peer } = &mut *causes;
        let due: Vec<Cause> = tallies
            .iter()
            .filter(|(_, t)| everything || now.duration_since(t.since) >= WINDOW)
            .map(|(c, _)| c.clone())
            .collect();
        due.into_iter()
            .filter_map(|cause| {
                let tally = tallies.remove(&cause)?;
                let peer = (cause.action, cause.uid);
                if let Some(n) = per_peer.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        per_peer.remove(&peer);
                    }
                }
                (tally.repeats > 0).then(|| {
                    let mut event = AuditEvent::new(tally.actor, cause.action).detail(json!({
                        "reason": cause.reason,
                        "repeats": tally.repeats,
                        "window_seconds": WINDOW.as_secs(),
                    }));
                    if let Some(secret) = &cause.secret {
                        event = event.secret(secret);
                    }
                    event
                })
            })
            .collect()
    }

    /// Writes the rows of ended windows every second, and all of them at shutdown (straight to
    /// the store: the group-commit writer may already have stopped by then).
    pub async fn run_flusher(&self, store: Store, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            let rows = self.take_due(stopping);
            if !rows.is_empty() {
                if let Err(e) = store.append_audit(&rows).await {
                    tracing::error!(error = %e, "could not record repeated rejections");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn repeats_of_one_cause_become_one_row_per_window() {
        let r = Rejections::default();
        let deny = |uid| {
            r.first(
                "fetch.denied",
                uid,
                Some("app/x"),
                "no policy",
                "agent uid=7",
            )
        };
        assert!(deny(7), "the first is written at once");
        for _ in 0..999 {
            assert!(!deny(7));
        }
        assert!(deny(8), "another uid is another cause");
        assert!(r.take_due(false).is_empty(), "the window is still open");
        tokio::time::advance(WINDOW).await;
        let rows = r.take_due(false);
        assert_eq!(rows.len(), 1, "uid 8 had no repeats: nothing more to write");
        let detail: serde_json::Value = serde_json::from_str(&rows[0].detail).unwrap();
        assert_eq!(detail["repeats"], 999, "{detail}");
        assert_eq!(rows[0].secret.as_deref(), Some("app/x"));
        assert!(deny(7), "a new window starts with a written row");
    }

    #[test]
    fn causes_are_bounded() {
        let r = Rejections::default();
        for i in 0..(MAX_CAUSES as u32 + 100) {
            r.first("fetch.denied", i, None, "no policy", "a");
        }
        assert!(r.causes.lock().unwrap().tallies.len() <= MAX_CAUSES + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_varying_its_requests_gets_few_rows_per_window() {
        // An agent asking for a new made-up secret name (or broker path) each time.
        let r = Rejections::default();
        let written = (0..10_000)
            .filter(|i| r.first("fetch.denied", 7, Some(&format!("x/{i}")), "no policy", "a"))
            .count();
        assert_eq!(written, MAX_CAUSES_PER_PEER + 1);
        assert!(
            r.first("fetch.denied", 8, Some("x/0"), "no policy", "b"),
            "another peer"
        );
        tokio::time::advance(WINDOW).await;
        let rows = r.take_due(false);
        assert_eq!(rows.len(), 1, "the shared cause's repeats");
        let detail: serde_json::Value = serde_json::from_str(&rows[0].detail).unwrap();
        assert_eq!(detail["reason"], MANY);
        assert_eq!(detail["repeats"], 10_000 - MAX_CAUSES_PER_PEER - 1);
        assert!(r.causes.lock().unwrap().per_peer.is_empty());
        assert!(r.first("fetch.denied", 7, Some("x/1"), "no policy", "a"));
    }
}
