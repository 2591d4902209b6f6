//! Group commit for the rotation journal: in the daemon, the write transactions of many
//! rotations (their steps, deliveries and audit rows) share one `BEGIN IMMEDIATE … COMMIT` and
//! one fsync, and run in the calling thread on a write connection of their own (`direct.rs`).
//!
//! A batch first runs its jobs one after another in a plain transaction. When one fails (a
//! conflict, rare), that transaction is rolled back and the batch runs again with each job in a
//! savepoint of its own: the failing one is rolled back to its savepoint and told its error, the
//! others go on. So a job may run twice, and does nothing but SQL on the connection it is given.
//! Every job is answered only after the shared commit (with full sync) returned, so a caller that
//! sees `Ok` has its write on disk exactly as with a transaction of its own; if the commit fails,
//! every job of the batch is told. Without a batcher (the CLI), a job runs in a transaction of
//! its own. Jobs append audit rows unsealed: the transaction that runs them seals the chain's
//! head once, before it commits.

use std::sync::{Arc, OnceLock};

use rusqlite::{Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::SqliteStore;
use super::audit::seal_head;
use super::direct::{Db, Tx, Writer, in_transaction};
use crate::crypto::IntegrityKey;
use crate::store::StoreError;

/// The vault's integrity key, once it is unlocked (shared with the store).
pub(super) type Sealer = Arc<OnceLock<IntegrityKey>>;

/// The statements of one write transaction, run on the transaction it is given (possibly
/// twice: see the module's documentation).
pub(super) type Job = Box<dyn Fn(&mut Tx<'_>) -> Result<(), StoreError> + Send + Sync>;

/// Jobs folded into one transaction at most.
const MAX_JOBS: usize = 128;

pub(super) struct Pending {
    job: Job,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Starts the batcher over the group commits' write connection; it ends when every sender is
/// dropped.
pub(super) fn start(writer: Arc<Writer>, sealer: Sealer) -> mpsc::Sender<Pending> {
    let (tx, mut rx) = mpsc::channel::<Pending>(1024);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            // Let the steps already running queue their writes too.
            tokio::task::yield_now().await;
            while batch.len() < MAX_JOBS {
                match rx.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            run(&writer, &sealer, batch);
        }
    });
    tx
}

/// Runs a batch in one transaction, in this thread, and tells each job how it went.
fn run(writer: &Writer, sealer: &Sealer, batch: Vec<Pending>) {
    let answers = writer
        .write(|db| Ok(run_on(db, sealer, &batch)))
        .unwrap_or_else(|e| failed(&batch, &e));
    for (pending, answer) in batch.into_iter().zip(answers) {
        let _ = pending.done.send(answer);
    }
}

fn run_on(db: &Db, sealer: &Sealer, batch: &[Pending]) -> Vec<Result<(), StoreError>> {
    match all_or_nothing(db, sealer, batch) {
        Ok(true) => batch.iter().map(|_| Ok(())).collect(),
        Ok(false) => with_savepoints(db, sealer, batch).unwrap_or_else(|e| failed(batch, &e)),
        Err(e) => failed(batch, &e),
    }
}

/// Every job in one plain transaction. `Ok(false)`: a job failed, and nothing was written.
fn all_or_nothing(db: &Db, sealer: &Sealer, batch: &[Pending]) -> Result<bool, StoreError> {
    let txn = Transaction::new_unchecked(db, TransactionBehavior::Immediate)?;
    {
        let mut tx = Tx::new(&txn);
        for pending in batch {
            if (pending.job)(&mut tx).is_err() {
                return Ok(false); // dropping `txn` rolls it back
            }
        }
        if let Some(key) = sealer.get() {
            seal_head(&tx, key)?;
        }
    }
    txn.commit()?;
    Ok(true)
}

/// Every job in a savepoint of its own, in one transaction: a failing job is rolled back alone.
fn with_savepoints(
    db: &Db,
    sealer: &Sealer,
    batch: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let txn = Transaction::new_unchecked(db, TransactionBehavior::Immediate)?;
    let mut answers = Vec::with_capacity(batch.len());
    {
        let mut tx = Tx::new(&txn);
        for pending in batch {
            txn.execute_batch("SAVEPOINT job")?;
            let head = tx.head.clone();
            let result = (pending.job)(&mut tx);
            if result.is_ok() {
                txn.execute_batch("RELEASE job")?;
            } else {
                // The rows it appended are gone: so is the head it left.
                tx.head = head;
                txn.execute_batch("ROLLBACK TO job; RELEASE job")?;
            }
            answers.push(result);
        }
        if let Some(key) = sealer.get() {
            seal_head(&tx, key)?;
        }
    }
    txn.commit()?;
    Ok(answers)
}

/// The answers when the batch's transaction itself failed: nothing of it was written.
fn failed(batch: &[Pending], error: &StoreError) -> Vec<Result<(), StoreError>> {
    batch
        .iter()
        .map(|_| Err(StoreError::Commit(error.to_string())))
        .collect()
}

impl SqliteStore {
    /// Waits until every write queued so far is committed (batches run in order): at shutdown,
    /// before the process ends.
    pub async fn flush_writes(&self) -> Result<(), StoreError> {
        self.write(Box::new(|_| Ok(()))).await
    }

    /// Runs `job` as a write transaction: batched with others in the daemon, on its own in the
    /// CLI. Returns once it is committed (with full sync).
    pub(super) async fn write(&self, job: Job) -> Result<(), StoreError> {
        match &self.batcher {
            Some(batcher) => {
                let (done, answer) = oneshot::channel();
                batcher
                    .send(Pending { job, done })
                    .await
                    .map_err(|_| StoreError::Commit("the store is closing".into()))?;
                answer
                    .await
                    .map_err(|_| StoreError::Commit("the store is closing".into()))?
            }
            None => {
                let key = self.integrity();
                self.direct_writer.write(|db| {
                    in_transaction(db, |tx| {
                        job(tx)?;
                        match key {
                            Some(key) => seal_head(tx, key),
                            None => Ok(()),
                        }
                    })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::audit::append_audit;
    use crate::audit::{AuditEvent, ChainVerifier};
    use crate::store::tests::{secret_with_a_version, temp_store};
    use crate::store::{Access, Store, StoreError};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_appended_and_then_failed_leaves_the_chain_as_if_it_never_ran() {
        let t = temp_store().await;
        let path = t.path.clone();
        drop(t.store);
        // The daemon's access: writes go through the batcher, many jobs per transaction.
        let store = Store::open(&path, Access::Exclusive).await.unwrap();
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..40 {
            let store = store.clone();
            jobs.spawn(async move {
                let fails = i % 3 == 0;
                let event = std::sync::Arc::new([AuditEvent::new("test", format!("job-{i}"))]);
                store
                    .sqlite()
                    .expect("a SQLite store")
                    .write(Box::new(move |tx| {
                        append_audit(tx, None, &event[..])?;
                        if fails {
                            return Err(StoreError::Conflict("after its append".into()));
                        }
                        Ok(())
                    }))
                    .await
                    .is_ok()
            });
        }
        let mut committed = 0;
        while let Some(ok) = jobs.join_next().await {
            committed += usize::from(ok.unwrap());
        }
        assert_eq!(committed, 26);
        let rows = store.audit_page(0, 1000).await.unwrap();
        assert_eq!(rows.len(), 27, "the created row and each committed job's");
        let mut chain = ChainVerifier::default();
        for row in &rows {
            chain.check(row).unwrap();
            if let Some(i) = row.action.strip_prefix("job-") {
                assert_ne!(i.parse::<usize>().unwrap() % 3, 0, "a failed job's row");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commits_and_transactions_on_sqlx_writer_take_turns_on_one_chain() {
        let t = temp_store().await;
        let path = t.path.clone();
        let secret_id = secret_with_a_version(&t.store, "app/key").await;
        drop(t.store);
        let store = Store::open(&path, Access::Exclusive).await.unwrap();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..60 {
            let (store, secret_id) = (store.clone(), secret_id.clone());
            writes.spawn(async move {
                if i % 2 == 0 {
                    // Group-committed, on the write connection of `direct.rs`.
                    let event = AuditEvent::new("test", format!("batched-{i}"));
                    store.append_audit(&[event]).await
                } else {
                    // A transaction of its own on sqlx's writer, appending on its handle.
                    let event = AuditEvent::new("test", format!("own-{i}"));
                    store
                        .record_secret_failure(&secret_id, "upstream refused", false, event)
                        .await
                        .map(drop)
                }
            });
        }
        while let Some(written) = writes.join_next().await {
            written.unwrap().unwrap();
        }
        let rows = store.audit_page(0, 1000).await.unwrap();
        let mut chain = ChainVerifier::default();
        for row in &rows {
            chain.check(row).unwrap();
        }
        let ours = rows
            .iter()
            .filter(|r| r.action.starts_with("batched-") || r.action.starts_with("own-"))
            .count();
        assert_eq!(ours, 60, "every write's row, in one chain");
    }
}
