//! Budgets of brokered requests: requests per minute and tokens per (UTC) day, per policy,
//! with what each caller (uid, executable) spent kept beside them. The counters start from
//! the day's `broker.request` audit rows, so a restart forgets nothing. A request in flight
//! holds its estimated tokens ([`estimate`]) against its policy's day until its usage is known,
//! so a burst of requests started together cannot each spend the last of a budget.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

const MINUTE: Millis = 60_000;
const DAY: Millis = 86_400_000;

/// Tokens a request is taken to use until its answer says: one per 4 bytes of its body, and
/// one per event streamed back (for a stream that ended before its usage, or an answer
/// without one).
pub fn estimate(body_bytes: usize, events: u64) -> u64 {
    (body_bytes.div_ceil(4) as u64).saturating_add(events)
}

/// The most one request in flight holds of its policy's day, whatever its estimate: a body of
/// images (4 MiB of base64 is a million by [`estimate`], a few thousand tokens to the provider)
/// would otherwise hold a budget from everyone for as long as it runs.
pub const HOLD_AT_MOST: u64 = 32_768;

/// `budget = { requests_per_minute, tokens_per_day }` of a `[[policy]]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Brokered requests allowed per minute (none: no limit).
    pub requests_per_minute: Option<u64>,
    /// Tokens (in and out, as the provider counts them) allowed per UTC day.
    pub tokens_per_day: Option<u64>,
}

/// Which budget is spent, and when it renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spent {
    /// `requests_per_minute`.
    Requests {
        /// The limit.
        limit: u64,
        /// Seconds until the next minute.
        retry_after: u64,
    },
    /// `tokens_per_day`.
    Tokens {
        /// The limit.
        limit: u64,
        /// Seconds until the next UTC day, or 1 when `held`.
        retry_after: u64,
        /// Not spent yet, but held by requests still running.
        held: bool,
    },
}

impl Spent {
    /// Seconds until the budget renews.
    pub fn retry_after(&self) -> u64 {
        match self {
            Spent::Requests { retry_after, .. } | Spent::Tokens { retry_after, .. } => *retry_after,
        }
    }

    /// The budget's name in the config.
    pub fn budget(&self) -> &'static str {
        match self {
            Spent::Requests { .. } => "requests_per_minute",
            Spent::Tokens { .. } => "tokens_per_day",
        }
    }

    /// What the refusal says of the budget.
    pub fn message(&self) -> &'static str {
        match self {
            Spent::Tokens { held: true, .. } => {
                "is held by requests still running until their usage is known"
            }
            _ => "is spent",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    minute: Millis,
    requests_this_minute: u64,
    day: Millis,
    requests_today: u64,
    tokens_today: u64,
    /// Estimated tokens of requests admitted and not ended yet (a policy's counters only).
    reserved: u64,
}

impl Counters {
    fn roll(&mut self, now: Millis) {
        let (minute, day) = (now - now % MINUTE, now - now % DAY);
        if self.minute != minute {
            self.minute = minute;
            self.requests_this_minute = 0;
        }
        if self.day != day {
            self.day = day;
            self.requests_today = 0;
            self.tokens_today = 0;
        }
    }
}

/// Who made a request: the policy that admitted it, the peer's uid and executable.
pub type Caller = (String, u32, String);

/// What was spent today, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Spending {
    /// The policy.
    pub policy: String,
    /// The caller's uid (absent: the policy's total).
    pub uid: Option<u32>,
    /// The caller's executable.
    pub exe: Option<String>,
    /// Requests today.
    pub requests: u64,
    /// Tokens today.
    pub tokens: u64,
}

/// The counters of every policy and caller.
#[derive(Debug, Default)]
pub struct Budgets {
    policies: Mutex<HashMap<String, Counters>>,
    callers: Mutex<HashMap<Caller, Counters>>,
}

impl Budgets {
    /// Counts a request against `policy`'s budget and holds `reserve` tokens (its
    /// [`estimate`], at most [`HOLD_AT_MOST`]) until [`Budgets::spend`] says what it used; or says which budget is spent
    /// (and counts nothing). Tokens held by requests in flight count as spent: when only they
    /// fill the budget, it renews in a second, not the next day.
    pub fn admit(
        &self,
        policy: &str,
        budget: &Budget,
        caller: &Caller,
        reserve: u64,
        now: Millis,
    ) -> Result<(), Spent> {
        let mut policies = self.policies.lock().expect("budget lock");
        let c = policies.entry(policy.to_string()).or_default();
        c.roll(now);
        if let Some(limit) = budget.requests_per_minute {
            if c.requests_this_minute >= limit {
                return Err(Spent::Requests {
                    limit,
                    retry_after: ((c.minute + MINUTE - now) as u64).div_ceil(1000),
                });
            }
        }
        if let Some(limit) = budget.tokens_per_day {
            if c.tokens_today.saturating_add(c.reserved) >= limit {
                let held = c.tokens_today < limit;
                let retry_after = if held {
                    1
                } else {
                    ((c.day + DAY - now) as u64).div_ceil(1000)
                };
                return Err(Spent::Tokens {
                    limit,
                    retry_after,
                    held,
                });
            }
        }
        c.requests_this_minute += 1;
        c.requests_today += 1;
        c.reserved = c.reserved.saturating_add(reserve.min(HOLD_AT_MOST));
        drop(policies);
        let mut callers = self.callers.lock().expect("budget lock");
        let c = callers.entry(caller.clone()).or_default();
        c.roll(now);
        c.requests_this_minute += 1;
        c.requests_today += 1;
        Ok(())
    }

    /// Adds the tokens a finished request used, and lets go of the `reserved` tokens
    /// [`Budgets::admit`] held for it.
    pub fn spend(&self, caller: &Caller, tokens: u64, reserved: u64, now: Millis) {
        if let Some(c) = self
            .policies
            .lock()
            .expect("budget lock")
            .get_mut(&caller.0)
        {
            c.reserved = c.reserved.saturating_sub(reserved.min(HOLD_AT_MOST));
        }
        self.add(caller, 0, tokens, now);
    }

    /// Counts a request that ended and the tokens it used, without checking any budget (the
    /// daemon's counters, kept from the broker process's reports: the broker admitted it).
    pub fn count(&self, caller: &Caller, tokens: u64, now: Millis) {
        self.add(caller, 1, tokens, now);
    }

    fn add(&self, caller: &Caller, requests: u64, tokens: u64, now: Millis) {
        for c in [
            self.policies
                .lock()
                .expect("budget lock")
                .entry(caller.0.clone())
                .or_default(),
            self.callers
                .lock()
                .expect("budget lock")
                .entry(caller.clone())
                .or_default(),
        ] {
            c.roll(now);
            c.requests_this_minute += requests;
            c.requests_today += requests;
            c.tokens_today = c.tokens_today.saturating_add(tokens);
        }
    }

    /// What each caller spent, in the shape [`Budgets::restore`] takes: requests this minute,
    /// requests and tokens today.
    pub fn spent(&self, now: Millis) -> Vec<(Caller, u64, u64, u64)> {
        let mut callers = self.callers.lock().expect("budget lock");
        callers
            .iter_mut()
            .map(|(caller, c)| {
                c.roll(now);
                (
                    caller.clone(),
                    c.requests_this_minute,
                    c.requests_today,
                    c.tokens_today,
                )
            })
            .filter(|(_, minute, requests, _)| *minute + *requests > 0)
            .collect()
    }

    /// Starts from what the audit log says was spent: per caller, requests in the current
    /// minute, requests and tokens today.
    pub fn restore(&self, rows: &[(Caller, u64, u64, u64)], now: Millis) {
        let mut policies = self.policies.lock().expect("budget lock");
        let mut callers = self.callers.lock().expect("budget lock");
        for (caller, minute, requests, tokens) in rows {
            for c in [
                policies.entry(caller.0.clone()).or_default(),
                callers.entry(caller.clone()).or_default(),
            ] {
                c.roll(now);
                c.requests_this_minute += minute;
                c.requests_today += requests;
                c.tokens_today = c.tokens_today.saturating_add(*tokens);
            }
        }
    }

    /// Today's spending per policy, then per caller.
    pub fn today(&self, now: Millis) -> Vec<Spending> {
        let day = now - now % DAY;
        let mut out: Vec<Spending> = Vec::new();
        for (policy, c) in self.policies.lock().expect("budget lock").iter() {
            if c.day == day {
                out.push(Spending {
                    policy: policy.clone(),
                    uid: None,
                    exe: None,
                    requests: c.requests_today,
                    tokens: c.tokens_today,
                });
            }
        }
        for ((policy, uid, exe), c) in self.callers.lock().expect("budget lock").iter() {
            if c.day == day {
                out.push(Spending {
                    policy: policy.clone(),
                    uid: Some(*uid),
                    exe: Some(exe.clone()),
                    requests: c.requests_today,
                    tokens: c.tokens_today,
                });
            }
        }
        out.sort_by(|a, b| (&a.policy, a.uid, &a.exe).cmp(&(&b.policy, b.uid, &b.exe)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000 - 1_800_000_000_000 % DAY + 10 * 3_600_000;

    fn caller() -> Caller {
        ("agents".into(), 1001, "/usr/bin/python3".into())
    }

    #[test]
    fn requests_per_minute_refuse_at_the_limit_and_renew_with_the_minute() {
        let b = Budgets::default();
        let budget = Budget {
            requests_per_minute: Some(3),
            tokens_per_day: None,
        };
        for _ in 0..3 {
            b.admit("agents", &budget, &caller(), 0, T0 + 1_000)
                .unwrap();
        }
        let spent = b
            .admit("agents", &budget, &caller(), 0, T0 + 1_000)
            .unwrap_err();
        assert_eq!(
            spent,
            Spent::Requests {
                limit: 3,
                retry_after: 59
            }
        );
        b.admit("agents", &budget, &caller(), 0, T0 + MINUTE)
            .unwrap();
    }

    #[test]
    fn requests_in_flight_hold_their_estimate_until_their_usage_is_known() {
        let b = Budgets::default();
        let budget = Budget {
            requests_per_minute: None,
            tokens_per_day: Some(100),
        };
        // Nothing spent yet: the first of a burst goes, the rest wait for its usage.
        b.admit("agents", &budget, &caller(), estimate(400, 0), T0)
            .unwrap();
        let spent = b
            .admit("agents", &budget, &caller(), estimate(4, 0), T0)
            .unwrap_err();
        assert_eq!(spent.budget(), "tokens_per_day");
        assert_eq!(spent.retry_after(), 1);
        // It used 30: what it held is let go, the next one goes.
        b.spend(&caller(), 30, estimate(400, 0), T0);
        b.admit("agents", &budget, &caller(), estimate(4, 0), T0)
            .unwrap();
        b.spend(&caller(), 70, estimate(4, 0), T0);
        let spent = b.admit("agents", &budget, &caller(), 0, T0).unwrap_err();
        assert_eq!(spent.retry_after(), 14 * 3600);

        // A body of images holds no more than HOLD_AT_MOST, and lets go of exactly that.
        let large = Budget {
            requests_per_minute: None,
            tokens_per_day: Some(2 * HOLD_AT_MOST),
        };
        let image = estimate(4 << 20, 0);
        let caller: Caller = ("large".into(), 1001, "/usr/bin/python3".into());
        b.admit("large", &large, &caller, image, T0).unwrap();
        b.admit("large", &large, &caller, image, T0).unwrap();
        b.admit("large", &large, &caller, 1, T0).unwrap_err();
        b.spend(&caller, 0, image, T0);
        b.admit("large", &large, &caller, 1, T0).unwrap();
    }

    #[test]
    fn tokens_per_day_refuse_once_spent_and_survive_a_restore() {
        let b = Budgets::default();
        let budget = Budget {
            requests_per_minute: None,
            tokens_per_day: Some(100),
        };
        b.admit("agents", &budget, &caller(), 0, T0).unwrap();
        b.spend(&caller(), 60, 0, T0);
        b.admit("agents", &budget, &caller(), 0, T0).unwrap();
        b.spend(&caller(), 40, 0, T0);
        let spent = b.admit("agents", &budget, &caller(), 0, T0).unwrap_err();
        assert_eq!(spent.budget(), "tokens_per_day");
        assert_eq!(spent.retry_after(), 14 * 3600);
        assert_eq!(
            b.today(T0)[0],
            Spending {
                policy: "agents".into(),
                uid: None,
                exe: None,
                requests: 2,
                tokens: 100
            }
        );

        // A restarted daemon starts from the day's rows.
        let restarted = Budgets::default();
        restarted.restore(&[(caller(), 2, 2, 100)], T0 + 1);
        assert!(
            restarted
                .admit("agents", &budget, &caller(), 0, T0 + 1)
                .is_err()
        );
        // The next day it renews.
        restarted
            .admit("agents", &budget, &caller(), 0, T0 + DAY)
            .unwrap();
    }

    #[test]
    fn counted_requests_seed_a_new_process_exactly() {
        let daemon = Budgets::default();
        let budget = Budget {
            requests_per_minute: Some(2),
            tokens_per_day: Some(100),
        };
        daemon.count(&caller(), 30, T0);
        daemon.count(&caller(), 70, T0 + 1);
        let broker = Budgets::default();
        broker.restore(&daemon.spent(T0 + 2), T0 + 2);
        let spent = broker
            .admit("agents", &budget, &caller(), 0, T0 + 2)
            .unwrap_err();
        assert_eq!(spent.budget(), "requests_per_minute");
        let spent = broker
            .admit("agents", &budget, &caller(), 0, T0 + MINUTE)
            .unwrap_err();
        assert_eq!(spent.budget(), "tokens_per_day");
        assert_eq!(daemon.today(T0)[0].requests, 2);
    }
}
