//! Reports to the daemon: what happened on the connections it handed over (requests that
//! ended, refusals, connections closed), batched: whatever piles up within [`GATHER`] of the
//! first report leaves in one record on the hand-off channel, so a busy broker wakes the daemon
//! once per interval instead of once per request. Nothing waits for a report (the broker counts
//! budgets itself; the daemon's audit rows share a later commit anyway).

use std::sync::Mutex;

use keywarden_plugin_sdk::broker::channel::Channel;
use keywarden_plugin_sdk::broker::{Denied, Ended, Reports};
use tokio::sync::Notify;

/// How long reports gather before they are sent.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Reports waiting at most before new requests are refused (503): the daemon has stopped
/// reading them, and a request served now might never be recorded.
const PENDING_AT_MOST: usize = 10_000;

/// Items per record: with paths cut at 1 KiB (`agents.rs`), a record stays under the channel's
/// limit.
const PER_RECORD: usize = 40;

/// Reports waiting to be sent.
#[derive(Default)]
pub struct Reporter {
    pending: Mutex<Reports>,
    wake: Notify,
    /// Whether a batch is taken and not yet sent.
    sending: std::sync::atomic::AtomicBool,
    /// Notified whenever nothing is left to send.
    idle: Notify,
}

impl Reporter {
    fn add(&self, add: impl FnOnce(&mut Reports)) {
        add(&mut self.pending.lock().expect("reports lock"));
        self.wake.notify_one();
    }

    /// Sends what is pending (nothing new to add).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A request's answer ended.
    pub fn ended(&self, ended: Ended) {
        self.add(|r| r.ended.push(ended));
    }

    /// A request was refused because the peer may not make it.
    pub fn denied(&self, denied: Denied) {
        self.add(|r| r.denied.push(denied));
    }

    /// A handed connection closed.
    pub fn closed(&self, conn: u64) {
        self.add(|r| r.closed.push(conn));
    }

    /// Resolves once every report made so far has been sent.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if !self.sending.load(std::sync::atomic::Ordering::SeqCst) && self.is_empty() {
                return;
            }
            idle.await;
        }
    }

    fn len(&self) -> usize {
        let pending = self.pending.lock().expect("reports lock");
        pending.ended.len() + pending.denied.len() + pending.closed.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether so many reports wait that the daemon cannot be taking them: new requests are
    /// refused until they leave.
    pub fn backlogged(&self) -> bool {
        self.len() >= PENDING_AT_MOST
    }

    /// Sends what piles up, until the channel fails.
    pub async fn run(&self, channel: &Channel) -> std::io::Result<()> {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(GATHER).await;
            let mut batch = {
                let mut pending = self.pending.lock().expect("reports lock");
                self.sending
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                std::mem::take(&mut *pending)
            };
            while !(batch.ended.is_empty() && batch.denied.is_empty() && batch.closed.is_empty()) {
                let record = Reports {
                    ended: take(&mut batch.ended),
                    denied: take(&mut batch.denied),
                    closed: take(&mut batch.closed),
                };
                let bytes = serde_json::to_vec(&record).expect("reports serialize");
                channel.send(&bytes, None).await?;
            }
            self.sending
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.idle.notify_waiters();
        }
    }
}

/// The first [`PER_RECORD`] items of `items`, leaving the rest.
fn take<T>(items: &mut Vec<T>) -> Vec<T> {
    let rest = items.split_off(items.len().min(PER_RECORD));
    std::mem::replace(items, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywarden_plugin_sdk::broker::channel;

    #[tokio::test(flavor = "current_thread")]
    async fn reports_the_daemon_does_not_take_refuse_new_requests_until_they_leave() {
        let (ours, daemons) = channel::pair().unwrap();
        let (ours, daemons) = (Channel::new(ours).unwrap(), Channel::new(daemons).unwrap());
        let reporter = std::sync::Arc::new(Reporter::default());
        let sender = reporter.clone();
        tokio::spawn(async move { sender.run(&ours).await });
        // The daemon reads nothing: once the channel's buffer is full, reports wait here.
        let mut made = 0;
        while !reporter.backlogged() {
            for _ in 0..100 {
                reporter.closed(made);
                made += 1;
            }
            tokio::time::sleep(GATHER * 2).await;
            assert!(made < 10 * PENDING_AT_MOST as u64, "never backlogged");
        }
        // The daemon reads again: every report arrives, and requests are taken again.
        let mut got = 0;
        while got < made {
            let record = daemons.recv().await.unwrap().unwrap();
            let reports: Reports = serde_json::from_slice(&record.0).unwrap();
            got += reports.closed.len() as u64;
        }
        reporter.drained().await;
        assert!(!reporter.backlogged());
    }
}
