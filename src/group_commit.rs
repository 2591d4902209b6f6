//! Group commit for the fetch path: lease changes and audit rows from many requests share one
//! transaction, so a busy socket costs one write per batch instead of one per fetch.
//!
//! Audit fails closed (docs/design.md §9): every write waits until its batch is committed, so a
//! fetch is answered only once its lease and audit row are durable, and a fetch whose rows
//! cannot be committed is refused rather than served unrecorded. A batch that fails is tried
//! again a few times before its writers are told. On shutdown the writer stops taking work,
//! commits everything already handed to it, and only then ends. The queue is bounded, so a writer that falls
//! behind slows fetches down rather than growing without limit. While the daemon runs, the
//! in-memory lease table is authoritative; the store is its durable copy.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditEvent;
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

/// Waits before each further try of a batch that failed (a busy or momentarily full disk).
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

/// A handle to the writer task. When every handle is dropped, the task commits what is queued
/// and ends.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Item>,
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
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
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
                let result = commit(&store, &ops, &audit).await;
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        (GroupCommit { tx }, task)
    }

    /// Queues lease changes and audit rows and waits until they are committed.
    pub async fn write(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Item { ops, audit, done })
            .await
            .map_err(|_| WriteError::Stopped)?;
        wait.await.map_err(|_| WriteError::Stopped)?
    }
}

/// Commits one batch, trying again after short waits before giving up on it.
async fn commit(store: &Store, ops: &[LeaseOp], audit: &[AuditEvent]) -> Result<(), WriteError> {
    let mut waits = RETRY_AFTER.iter();
    loop {
        match store.apply_lease_batch(ops, audit).await {
            Ok(()) => return Ok(()),
            Err(e) => match waits.next() {
                Some(wait) => {
                    tracing::warn!(error = %e, rows = audit.len(), "a batch of audit rows and leases could not be written; trying again");
                    tokio::time::sleep(*wait).await;
                }
                None => {
                    tracing::error!(error = %e, rows = audit.len(), "a batch of audit rows and leases could not be written; its requests are refused");
                    return Err(WriteError::Failed(Arc::new(e)));
                }
            },
        }
    }
}
