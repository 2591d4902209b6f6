//! Reports to the daemon: what happened on the connections it handed over (requests that
//! ended, refusals, connections closed), batched: whatever piles up within [`GATHER`] of the
//! first report leaves in one record on the hand-off channel, so a busy broker wakes the daemon
//! once per interval instead of once per request. Nothing waits for a report (the broker counts
//! budgets itself; the daemon's audit rows share a later commit anyway).

use std::sync::Mutex;

use keywarden_plugin_sdk::broker::channel::Channel;
use keywarden_plugin_sdk::broker::{Denied, Ended, MAX_RECORD, Reports};
use tokio::sync::Notify;

/// How long reports gather before they are sent.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Reports waiting at most before new requests are refused (503): the daemon has stopped
/// reading them, and a request served now might never be recorded.
const PENDING_AT_MOST: usize = 10_000;

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
            let batch = {
                let mut pending = self.pending.lock().expect("reports lock");
                self.sending
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                std::mem::take(&mut *pending)
            };
            for record in records(&batch) {
                channel.send(&record, None).await?;
            }
            self.sending
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.idle.notify_waiters();
        }
    }
}

/// `batch` as [`Reports`] records of at most [`MAX_RECORD`] bytes each, whatever its reports
/// hold (an agent's path of quotes doubles in JSON; a record the channel refused would end the
/// process), and in order: every ended request and refusal before any closed connection, so
/// the daemon, reading the records in turn, still knows each request's caller when its report
/// arrives. Each report is serialized once.
fn records(batch: &Reports) -> Vec<Vec<u8>> {
    const EMPTY: usize = br#"{"ended":[],"denied":[],"closed":[]}"#.len();
    let items = (batch.ended.iter().map(|e| (0, serde_json::to_vec(e))))
        .chain(batch.denied.iter().map(|d| (1, serde_json::to_vec(d))))
        .chain(batch.closed.iter().map(|c| (2, serde_json::to_vec(c))));
    let mut lists: [Vec<Vec<u8>>; 3] = Default::default();
    let (mut out, mut size) = (Vec::new(), EMPTY);
    for (list, item) in items {
        let item = item.expect("reports serialize");
        if size + item.len() + 1 > MAX_RECORD && lists.iter().any(|l| !l.is_empty()) {
            out.push(assemble(&mut lists));
            size = EMPTY;
        }
        size += item.len() + 1;
        lists[list].push(item);
    }
    if lists.iter().any(|l| !l.is_empty()) {
        out.push(assemble(&mut lists));
    }
    out
}

/// One record of the serialized reports in `lists` (ended, denied, closed), which it empties.
fn assemble(lists: &mut [Vec<Vec<u8>>; 3]) -> Vec<u8> {
    let mut record = Vec::new();
    for (i, (key, items)) in ["ended", "denied", "closed"]
        .iter()
        .zip(lists.iter_mut())
        .enumerate()
    {
        record.extend_from_slice(if i == 0 { b"{\"" } else { b",\"" });
        record.extend_from_slice(key.as_bytes());
        record.extend_from_slice(b"\":[");
        record.extend_from_slice(&items.join(&b',')[..]);
        record.push(b']');
        items.clear();
    }
    record.push(b'}');
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywarden_plugin_sdk::broker::channel;

    /// What an agent controls in a report (its path, a refusal's reason) is cut at 1 KiB, but a
    /// path of quotes doubles in JSON: 40 such reports of each kind once made a record the
    /// channel refused, which ended the broker process and lost the batch.
    #[test]
    fn records_stay_under_the_channel_limit_and_keep_closes_after_the_requests() {
        let quotes = "\"".repeat(1024);
        let n = 200;
        let batch = Reports {
            ended: (0..n)
                .map(|i| Ended {
                    conn: i,
                    broker: "openai".into(),
                    route: Some("openai/prod".into()),
                    version: Some(1),
                    method: "GET".into(),
                    path: format!("/{quotes}"),
                    status: 200,
                    tokens_in: None,
                    tokens_out: None,
                    tokens_estimated: None,
                    upstream_ms: Some(1),
                    ms: 1,
                    complete: true,
                })
                .collect(),
            denied: (0..n)
                .map(|i| Denied {
                    conn: i,
                    broker: "openai".into(),
                    reason: format!("GET /{quotes} is not an allowed call"),
                })
                .collect(),
            closed: (0..n).collect(),
        };
        let records = records(&batch);
        assert!(records.len() > 1);
        let mut seen = Reports::default();
        for record in &records {
            assert!(record.len() <= MAX_RECORD, "{} bytes", record.len());
            let r: Reports = serde_json::from_slice(record).unwrap();
            assert!(
                r.closed.is_empty()
                    || (seen.ended.len() + r.ended.len() == batch.ended.len()
                        && seen.denied.len() + r.denied.len() == batch.denied.len()),
                "a close sent before a request's report"
            );
            seen.ended.extend(r.ended);
            seen.denied.extend(r.denied);
            seen.closed.extend(r.closed);
        }
        assert_eq!(seen.ended.len(), batch.ended.len());
        assert!(
            seen.ended
                .iter()
                .zip(&batch.ended)
                .all(|(a, b)| a.conn == b.conn && a.path == b.path)
        );
        assert_eq!(seen.denied.len(), batch.denied.len());
        assert_eq!(seen.closed, batch.closed);
    }

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
