//! Group commit for the fetch path: lease changes and audit rows from many requests share one
//! transaction, so a busy socket costs one write per batch instead of one per fetch.
//!
//! Audit fails closed (docs/design.md §9): every write waits until its batch is committed, so a
//! fetch is answered only once its lease and audit row are durable, and a fetch whose rows cannot
//! be committed is refused rather than served unrecorded. Rows no answer waits for (a brokered
//! request's, written when its answer has ended) are deferred: piled up without waking the
//! writer, they join the next batch, or are committed on their own after at most
//! [`DEFER_AT_MOST`]. A batch that fails is tried again a few times before its writers are told;
//! its deferred rows are not dropped but piled up again and tried on their own until they
//! commit, and while any wait ([`GroupCommit::backlog`]) the broker takes no new request, so
//! what is served unrecorded stays bounded (and at most [`PILE_AT_MOST`] rows wait).
//! On shutdown the writer stops taking work, commits everything already handed to it, and only
//! then ends. The queue is bounded, so a writer that falls behind slows fetches down rather than
//! growing without limit. While the daemon runs, the in-memory lease table is authoritative; the
//! store is its durable copy.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditEvent;
use crate::clock::Millis;
use crate::store::{LeaseOp, Store, StoreError};

/// Why rows handed to the writer were not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The writer has stopped (the daemon is shutting down).
    #[error("the audit writer has stopped")]
    Stopped,
    /// The batch holding the rows could not be committed.
    #[error("the audit log and leases could not be written: {0}")]
    Failed(Arc<StoreError>),
}

/// Requests folded into one transaction at most.
const MAX_BATCH: usize = 512;

/// How long rows no request waits for (see [`GroupCommit::defer`]) may wait for company
/// before they are committed on their own.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(100);

/// Deferred rows kept at most (rows of a batch that failed included); beyond, a row is dropped
/// and an error logged. The broker takes no new request while rows wait after a failure, so
/// only refusals (a few hundred bytes each) can pile up this far.
pub const PILE_AT_MOST: usize = 10_000;

/// Waits before each further try of a batch that failed (a momentarily full disk; a busy store
/// is not tried again: SQLite's busy timeout already waited).
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];

struct Item {
    ops: Vec<LeaseOp>,
    audit: Vec<AuditEvent>,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// Rows no answer waits for, until the writer takes them into a batch.
#[derive(Debug)]
struct Pile {
    /// The rows, and whether the writer has ended (rows piled then would never be written).
    rows: Mutex<(Vec<AuditEvent>, bool)>,
    /// Told when the pile stops being empty, and when it holds a full batch.
    filled: tokio::sync::Notify,
    /// Whether rows of a batch that failed wait in the pile.
    backlog: tokio::sync::watch::Sender<bool>,
    /// Those rows the writer is trying again now (out of the pile meanwhile).
    retrying: std::sync::atomic::AtomicUsize,
}

impl Pile {
    fn new() -> Pile {
        Pile {
            rows: Mutex::default(),
            filled: tokio::sync::Notify::new(),
            backlog: tokio::sync::watch::Sender::new(false),
            retrying: Default::default(),
        }
    }

    fn len(&self) -> usize {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }

    /// Takes the rows; with `last`, marks the writer ended.
    fn take(&self, last: bool) -> Vec<AuditEvent> {
        let mut pile = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        pile.1 |= last;
        std::mem::take(&mut pile.0)
    }

    /// Puts back the rows of a batch that failed, ahead of those piled since (up to
    /// [`PILE_AT_MOST`] in all), and wakes the writer to try them again.
    fn put_back(&self, mut rows: Vec<AuditEvent>) {
        let mut pile = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.append(&mut pile.0);
        if rows.len() > PILE_AT_MOST {
            tracing::error!(
                rows = rows.len() - PILE_AT_MOST,
                "the audit log cannot be written and too many brokered requests' rows wait: the latest are dropped"
            );
            rows.truncate(PILE_AT_MOST);
        }
        pile.0 = rows;
        drop(pile);
        self.backlog.send_replace(true);
        self.filled.notify_one();
    }
}

/// A handle to the writer task. When every handle is dropped, the task commits what is queued
/// and ends.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Item>,
    pile: Arc<Pile>,
    health: WriteHealth,
}

/// Whether the store takes writes, as the writer last found it: from a batch that failed (and
/// is being tried again, or was refused) until the next one that commits. `status` shows it.
#[derive(Debug, Clone, Default)]
pub struct WriteHealth(Arc<Mutex<Option<WriteFailure>>>);

/// The store refusing writes: since when, and the error of the latest batch.
#[derive(Debug, Clone)]
pub struct WriteFailure {
    /// When the first batch of this spell failed.
    pub since: Millis,
    /// The latest batch's error (a store error: no value or key in it).
    pub error: String,
}

impl WriteHealth {
    /// The current spell of failures, if any.
    pub fn failing(&self) -> Option<WriteFailure> {
        self.0.lock().expect("health lock").clone()
    }

    /// A write of the store failed (a batch of the writer's, or another write on the fetch
    /// path).
    pub fn failed(&self, error: &StoreError) {
        let mut health = self.0.lock().expect("health lock");
        let since = health
            .as_ref()
            .map_or_else(crate::clock::now_millis, |f| f.since);
        *health = Some(WriteFailure {
            since,
            error: error.to_string(),
        });
    }

    fn committed(&self) {
        let mut health = self.0.lock().expect("health lock");
        if health.take().is_some() {
            tracing::info!("the store takes writes again");
        }
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer task. When `shutdown` turns true it stops taking new work, commits
    /// what is queued, and ends.
    pub fn start(
        store: Store,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (GroupCommit, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Item>(4096);
        let pile = Arc::new(Pile::new());
        let health = WriteHealth::default();
        let writer_health = health.clone();
        let writer_pile = pile.clone();
        let task = tokio::spawn(async move {
            let pile = writer_pile;
            loop {
                let woke = tokio::select! {
                    item = rx.recv() => Some(item),
                    () = pile.filled.notified() => None,
                    _ = shutdown.changed() => {
                        rx.close();
                        Some(rx.recv().await)
                    }
                };
                let mut batch = Vec::new();
                match woke {
                    Some(Some(item)) => batch.push(item),
                    // Stopped, and nothing queued: what is piled is written last.
                    Some(None) => {
                        let rows = pile.take(true);
                        if !rows.is_empty()
                            && commit(&store, &[], &rows, &writer_health).await.is_err()
                        {
                            tracing::error!(
                                rows = rows.len(),
                                "the daemon stops with brokered requests' audit rows it could not write"
                            );
                        }
                        break;
                    }
                    // Rows piled up: nobody waits for them.
                    None => {}
                }
                // Let the requests already running queue their rows too: a bigger batch costs
                // fewer round trips to the database thread per fetch.
                tokio::task::yield_now().await;
                take_queued(&mut rx, &mut batch);
                if batch.is_empty() && pile.len() < MAX_BATCH {
                    // Only piled rows: wait for a row someone waits for, or for a full pile, at
                    // most DEFER_AT_MOST (a busy broker then costs one commit per interval).
                    tokio::select! {
                        item = rx.recv() => {
                            batch.extend(item);
                            take_queued(&mut rx, &mut batch);
                        }
                        () = pile.filled.notified() => {}
                        () = tokio::time::sleep(DEFER_AT_MOST) => {}
                        _ = shutdown.changed() => {
                            rx.close();
                            take_queued(&mut rx, &mut batch);
                        }
                    }
                }
                write_batch(&store, &pile, &writer_health, batch).await;
            }
        });
        (GroupCommit { tx, pile, health }, task)
    }

    /// Whether the store takes the writer's batches.
    pub fn health(&self) -> &WriteHealth {
        &self.health
    }

    /// Turns true when deferred rows could not be written and wait to be tried again, false
    /// once they are committed.
    pub fn backlog(&self) -> tokio::sync::watch::Receiver<bool> {
        self.pile.backlog.subscribe()
    }

    /// How many deferred rows wait after the store refused them (0 when none did).
    pub fn waiting(&self) -> usize {
        if *self.pile.backlog.borrow() {
            self.pile.len() + self.pile.retrying.load(Ordering::SeqCst)
        } else {
            0
        }
    }

    /// Queues lease changes and audit rows and waits until they are committed.
    pub async fn write(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        self.queue(ops, audit).await
    }

    /// Piles up audit rows that no answer waits for (a brokered request's, written once its
    /// answer has ended), without waking the writer: they are committed with the next batch
    /// someone waits for, or on their own after at most [`DEFER_AT_MOST`], or at shutdown;
    /// kept while the store refuses them. A daemon killed meanwhile loses them.
    pub fn defer(&self, audit: Vec<AuditEvent>) {
        let mut pile = self.pile.rows.lock().unwrap_or_else(|e| e.into_inner());
        if pile.1 {
            drop(pile);
            tracing::error!(
                rows = audit.len(),
                "the audit writer has stopped: a brokered request is not recorded"
            );
            return;
        }
        if pile.0.len() + audit.len() > PILE_AT_MOST {
            drop(pile);
            tracing::error!(
                rows = audit.len(),
                "the audit log cannot be written and too many brokered requests' rows wait: a row is dropped"
            );
            return;
        }
        let was_empty = pile.0.is_empty();
        pile.0.extend(audit);
        let full = pile.0.len() >= MAX_BATCH;
        drop(pile);
        if was_empty || full {
            self.pile.filled.notify_one();
        }
    }

    async fn queue(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Item { ops, audit, done })
            .await
            .map_err(|_| WriteError::Stopped)?;
        wait.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Commits `batch` with the piled rows, tells its writers how it went, and keeps piled rows
/// the store refused. Rows that failed before are tried on their own: whatever refused them
/// cannot fail the requests waiting here.
async fn write_batch(store: &Store, pile: &Pile, health: &WriteHealth, batch: Vec<Item>) {
    let mut ops = Vec::new();
    let mut audit = Vec::new();
    let mut waiters = Vec::with_capacity(batch.len());
    for item in batch {
        ops.extend(item.ops);
        audit.extend(item.audit);
        waiters.push(item.done);
    }
    let waited_for = audit.len();
    let retried = if *pile.backlog.borrow() {
        pile.take(false)
    } else {
        audit.extend(pile.take(false));
        Vec::new()
    };
    if !(ops.is_empty() && audit.is_empty()) {
        let result = commit(store, &ops, &audit, health).await;
        if result.is_err() && audit.len() > waited_for {
            // Nobody waits for these to be told: they are kept and tried again.
            pile.put_back(audit.split_off(waited_for));
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
    if !retried.is_empty() {
        pile.retrying.store(retried.len(), Ordering::SeqCst);
        match commit(store, &[], &retried, health).await {
            Ok(()) => {
                pile.backlog.send_replace(false);
            }
            Err(_) => pile.put_back(retried),
        }
        pile.retrying.store(0, Ordering::SeqCst);
    }
}

/// Moves what is already queued into `batch`, up to [`MAX_BATCH`].
fn take_queued(rx: &mut mpsc::Receiver<Item>, batch: &mut Vec<Item>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// Commits one batch, trying again after short waits before giving up on it.
async fn commit(
    store: &Store,
    ops: &[LeaseOp],
    audit: &[AuditEvent],
    health: &WriteHealth,
) -> Result<(), WriteError> {
    let mut waits = RETRY_AFTER.iter();
    loop {
        match store.apply_lease_batch(ops, audit).await {
            Ok(()) => {
                health.committed();
                return Ok(());
            }
            // A busy store was waited for already (its busy timeout): refuse now.
            Err(e) => match waits.next().filter(|_| !e.is_busy()) {
                Some(wait) => {
                    health.failed(&e);
                    tracing::warn!(error = %e, rows = audit.len(), "a batch of audit rows and leases could not be written; trying again");
                    tokio::time::sleep(*wait).await;
                }
                None => {
                    health.failed(&e);
                    tracing::error!(error = %e, rows = audit.len(), "a batch of audit rows and leases could not be written; its requests are refused");
                    return Err(WriteError::Failed(Arc::new(e)));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;

    /// Rows of `action` in the file, read on a connection of the test's own (no await: the
    /// paused clock does not move while it reads).
    fn rows(path: &std::path::Path, action: &str) -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE action = ?",
                [action],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// A brokered request's row, piled up on `writer`.
    fn deferred_row(writer: &GroupCommit) {
        writer.defer(vec![AuditEvent::new("t", "broker.request")]);
    }

    /// Lets the paused clock run until `n` rows of `action` are in the file; the time it took.
    async fn until_rows(path: &std::path::Path, action: &str, n: i64) -> Duration {
        let started = tokio::time::Instant::now();
        while rows(path, action) < n {
            assert!(started.elapsed() < 10 * DEFER_AT_MOST, "never committed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        started.elapsed()
    }

    /// A store, and a writer on it with its stop switch and task, on a paused clock (paused
    /// once the store is open: its pool's time-outs run on this clock too; the batches run in
    /// this thread).
    async fn paused_writer() -> (
        crate::store::tests::TempStore,
        tokio::sync::watch::Sender<bool>,
        GroupCommit,
        tokio::task::JoinHandle<()>,
    ) {
        let t = temp_store().await;
        tokio::time::pause();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (writer, task) = GroupCommit::start(t.store.clone(), shutdown);
        (t, stop, writer, task)
    }

    #[tokio::test]
    async fn deferred_rows_wait_for_company_or_at_most_the_interval() {
        let (t, _stop, writer, _task) = paused_writer().await;

        // Alone, a deferred row waits the whole interval, then is committed.
        deferred_row(&writer);
        deferred_row(&writer);
        let waited = until_rows(&t.path, "broker.request", 2).await;
        assert!(waited >= DEFER_AT_MOST, "committed after {waited:?}");
        assert!(waited < DEFER_AT_MOST * 2, "committed after {waited:?}");

        // A row someone waits for takes the deferred ones with it at once.
        let started = tokio::time::Instant::now();
        deferred_row(&writer);
        writer
            .write(Vec::new(), vec![AuditEvent::new("t", "fetch.allowed")])
            .await
            .unwrap();
        assert_eq!(rows(&t.path, "broker.request"), 3);
        assert!(started.elapsed() < DEFER_AT_MOST);

        // A full batch's worth does not wait.
        for _ in 0..MAX_BATCH {
            deferred_row(&writer);
        }
        let waited = until_rows(&t.path, "broker.request", 3 + MAX_BATCH as i64).await;
        assert!(waited < DEFER_AT_MOST, "committed after {waited:?}");
    }

    #[tokio::test]
    async fn deferred_rows_are_committed_at_shutdown_and_later_ones_refused() {
        let (t, stop, writer, task) = paused_writer().await;
        let started = tokio::time::Instant::now();
        deferred_row(&writer);
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(started.elapsed() < DEFER_AT_MOST);
        assert_eq!(rows(&t.path, "broker.request"), 1);
        // The writer has ended: a row piled now is reported lost, not kept forever.
        deferred_row(&writer);
        assert!(writer.pile.rows.lock().unwrap().0.is_empty());
    }

    /// Lets the paused clock run until `backlog` says `to`.
    async fn backlog_turns(backlog: &mut tokio::sync::watch::Receiver<bool>, to: bool) {
        tokio::time::timeout(Duration::from_secs(10), backlog.wait_for(|b| *b == to))
            .await
            .unwrap_or_else(|_| panic!("the backlog never turned {to}"))
            .unwrap();
    }

    #[tokio::test]
    async fn deferred_rows_a_store_refuses_are_kept_and_written_once_it_takes_them() {
        let (t, _stop, writer, _task) = paused_writer().await;
        let mut backlog = writer.backlog();
        // The store refuses brokered requests' rows (not busy: the writer's tries run on the
        // clock).
        let refuse = |on: bool| {
            let db = rusqlite::Connection::open(&t.path).unwrap();
            db.execute_batch(if on {
                "CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.action = 'broker.request' \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END"
            } else {
                "DROP TRIGGER refuse"
            })
            .unwrap();
        };
        refuse(true);
        deferred_row(&writer);
        deferred_row(&writer);
        backlog_turns(&mut backlog, true).await;
        assert_eq!(rows(&t.path, "broker.request"), 0);
        assert_eq!(writer.waiting(), 2);
        assert!(writer.health().failing().is_some());
        // They are tried on their own: a fetch's rows are not failed with them.
        writer
            .write(Vec::new(), vec![AuditEvent::new("t", "fetch.allowed")])
            .await
            .unwrap();
        assert_eq!(rows(&t.path, "fetch.allowed"), 1);
        // Later rows join them; nothing is dropped while the store refuses.
        deferred_row(&writer);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(rows(&t.path, "broker.request"), 0);
        assert!(*backlog.borrow());

        refuse(false);
        backlog_turns(&mut backlog, false).await;
        assert_eq!(rows(&t.path, "broker.request"), 3);
        assert_eq!(writer.waiting(), 0);
        assert!(writer.health().failing().is_none());
    }

    #[test]
    fn the_pile_keeps_at_most_its_bound() {
        let pile = Pile::new();
        pile.put_back(
            (0..PILE_AT_MOST + 5)
                .map(|_| AuditEvent::new("t", "broker.request"))
                .collect(),
        );
        assert_eq!(pile.len(), PILE_AT_MOST);
        assert!(*pile.backlog.borrow());
    }
}
