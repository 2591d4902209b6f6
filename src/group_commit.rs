//! Group commit for the fetch path: lease changes and audit rows from many requests share one
//! transaction, so a busy socket costs one write per batch instead of one per fetch.
//!
//! Audit fails closed (docs/design.md §9): every write waits until its batch is committed, so a
//! fetch is answered only once its lease and audit row are durable, and a fetch whose rows cannot
//! be committed is refused rather than served unrecorded. Rows no answer waits for (a brokered
//! request's, written when its answer has ended) are deferred: they join the next batch, or are
//! committed on their own after at most [`DEFER_AT_MOST`]. A batch that fails is tried again a few
//! times before its writers are told. On shutdown the writer stops taking work, commits everything
//! already handed to it, and only then ends. The queue is bounded, so a writer that falls behind
//! slows fetches down rather than growing without limit. While the daemon runs, the in-memory lease
//! table is authoritative; the store is its durable copy.

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

/// How long rows no request waits for (see [`GroupCommit::write_deferred`]) may wait for
/// company before they are committed on their own.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(100);

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
    /// No answer waits for these rows: they may wait for a later batch.
    deferred: bool,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// A handle to the writer task. When every handle is dropped, the task commits what is queued
/// and ends.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Item>,
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
        let health = WriteHealth::default();
        let writer_health = health.clone();
        let task = tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    item = rx.recv() => item,
                    _ = shutdown.changed() => {
                        rx.close();
                        rx.recv().await
                    }
                };
                let Some(first) = first else { break };
                let mut batch = vec![first];
                // Let the requests already running queue their rows too: a bigger batch costs
                // fewer round trips to the database thread per fetch.
                tokio::task::yield_now().await;
                take_queued(&mut rx, &mut batch);
                if batch.iter().all(|item| item.deferred) {
                    // Nobody waits: wait for a row someone waits for, or for a full batch, at
                    // most DEFER_AT_MOST (a busy broker then costs one commit per interval).
                    let deadline = tokio::time::sleep(DEFER_AT_MOST);
                    tokio::pin!(deadline);
                    while batch.len() < MAX_BATCH {
                        tokio::select! {
                            item = rx.recv() => {
                                let Some(item) = item else { break };
                                let urgent = !item.deferred;
                                batch.push(item);
                                if urgent {
                                    take_queued(&mut rx, &mut batch);
                                    break;
                                }
                            }
                            _ = &mut deadline => break,
                            _ = shutdown.changed() => {
                                rx.close();
                                take_queued(&mut rx, &mut batch);
                                break;
                            }
                        }
                    }
                }
                let mut ops = Vec::new();
                let mut audit = Vec::new();
                let mut waiters = Vec::with_capacity(batch.len());
                for item in batch {
                    ops.extend(item.ops);
                    audit.extend(item.audit);
                    waiters.push(item.done);
                }
                let result = commit(&store, &ops, &audit, &writer_health).await;
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        (GroupCommit { tx, health }, task)
    }

    /// Whether the store takes the writer's batches.
    pub fn health(&self) -> &WriteHealth {
        &self.health
    }

    /// Queues lease changes and audit rows and waits until they are committed.
    pub async fn write(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        self.queue(ops, audit, false).await
    }

    /// Queues audit rows that no answer waits for (a brokered request's, written once its
    /// answer has ended) and waits until they are committed: with the next batch someone waits
    /// for, or on their own after at most [`DEFER_AT_MOST`], or at shutdown. A daemon killed
    /// meanwhile loses them.
    pub async fn write_deferred(&self, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        self.queue(Vec::new(), audit, true).await
    }

    async fn queue(
        &self,
        ops: Vec<LeaseOp>,
        audit: Vec<AuditEvent>,
        deferred: bool,
    ) -> Result<(), WriteError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Item {
                ops,
                audit,
                deferred,
                done,
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        wait.await.map_err(|_| WriteError::Stopped)?
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

    /// A brokered request's row, handed to `writer` in a task of its own.
    fn deferred_row(writer: &GroupCommit) -> tokio::task::JoinHandle<Result<(), WriteError>> {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .write_deferred(vec![AuditEvent::new("t", "broker.request")])
                .await
        })
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
        let alone = deferred_row(&writer);
        tokio::time::sleep(DEFER_AT_MOST / 2).await;
        assert_eq!(rows(&t.path, "broker.request"), 0, "committed early");
        alone.await.unwrap().unwrap();
        assert_eq!(rows(&t.path, "broker.request"), 1);

        // A row someone waits for takes the deferred ones with it at once.
        let started = tokio::time::Instant::now();
        let deferred = deferred_row(&writer);
        tokio::task::yield_now().await;
        writer
            .write(Vec::new(), vec![AuditEvent::new("t", "fetch.allowed")])
            .await
            .unwrap();
        deferred.await.unwrap().unwrap();
        assert!(started.elapsed() < DEFER_AT_MOST);
        assert_eq!(rows(&t.path, "broker.request"), 2);
    }

    #[tokio::test]
    async fn deferred_rows_are_committed_at_shutdown() {
        let (t, stop, writer, task) = paused_writer().await;
        let started = tokio::time::Instant::now();
        let deferred = deferred_row(&writer);
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        deferred.await.unwrap().unwrap();
        task.await.unwrap();
        assert!(started.elapsed() < DEFER_AT_MOST);
        assert_eq!(rows(&t.path, "broker.request"), 1);
    }
}
