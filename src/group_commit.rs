//! Group commit for the fetch path: lease changes and audit rows from many requests share one
//! transaction, so a busy socket costs one write per batch instead of one per fetch.
//!
//! A fetch is answered once its audit row and lease are queued here (docs/design.md §9; making
//! this fail closed, answered only once committed, is the hardening issue's work). On shutdown
//! the writer stops taking work, commits everything queued, and only then ends. The queue is bounded, so a writer that falls
//! behind slows fetches down rather than growing without limit. While the daemon runs, the
//! in-memory lease table is authoritative; the store is its durable copy.

use std::sync::Arc;

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

struct Item {
    ops: Vec<LeaseOp>,
    audit: Vec<AuditEvent>,
    done: Option<oneshot::Sender<Result<(), WriteError>>>,
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
                    waiters.extend(item.done);
                }
                let result = store
                    .apply_lease_batch(&ops, &audit)
                    .await
                    .map_err(|e| WriteError::Failed(Arc::new(e)));
                if let Err(e) = &result {
                    tracing::error!(error = %e, rows = audit.len(), "a batch of audit rows and leases could not be written");
                }
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        (GroupCommit { tx }, task)
    }

    /// Queues lease changes and audit rows for the next batch.
    pub async fn queue(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        self.tx
            .send(Item {
                ops,
                audit,
                done: None,
            })
            .await
            .map_err(|_| WriteError::Stopped)
    }

    /// Queues lease changes and audit rows and waits until they are committed.
    pub async fn write(&self, ops: Vec<LeaseOp>, audit: Vec<AuditEvent>) -> Result<(), WriteError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Item {
                ops,
                audit,
                done: Some(done),
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        wait.await.map_err(|_| WriteError::Stopped)?
    }
}
