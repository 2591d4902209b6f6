//! Group commit for the rotation journal: in the daemon, the write transactions of many
//! rotations (their steps, deliveries and audit rows) share one `BEGIN IMMEDIATE … COMMIT` and
//! one fsync, each inside a savepoint of its own.
//!
//! A job that fails is rolled back to its savepoint and told its error; the others go on. Every
//! job is answered only after the shared commit (with full sync) returned, so a caller that sees
//! `Ok` has its write on disk exactly as with a transaction of its own; if the commit fails,
//! every job of the batch is told. Without a batcher (the CLI), a job runs in a transaction of
//! its own.

use futures_util::future::BoxFuture;
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

use super::SqliteStore;
use crate::store::StoreError;

/// The statements of one write transaction, run on the connection it is given.
pub(super) type Job = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<(), StoreError>> + Send,
>;

/// Jobs folded into one transaction at most.
const MAX_JOBS: usize = 128;

pub(super) struct Pending {
    job: Job,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Starts the batcher over the store's writer pool; it ends when every sender is dropped.
pub(super) fn start(writer: SqlitePool) -> mpsc::Sender<Pending> {
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
            run(&writer, batch).await;
        }
    });
    tx
}

/// Runs a batch in one transaction and tells each job how it went.
async fn run(writer: &SqlitePool, batch: Vec<Pending>) {
    let mut answers = Vec::with_capacity(batch.len());
    let committed = async {
        let mut conn = writer.acquire().await?;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
        for pending in batch {
            sqlx::query("SAVEPOINT job").execute(&mut *tx).await?;
            let result = (pending.job)(&mut tx).await;
            let end = if result.is_ok() {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            sqlx::raw_sql(end).execute(&mut *tx).await?;
            answers.push((pending.done, result));
        }
        tx.commit().await?;
        Ok::<_, StoreError>(())
    }
    .await;
    for (done, result) in answers {
        let result = match (&committed, result) {
            (Err(e), Ok(())) => Err(StoreError::Commit(e.to_string())),
            (_, result) => result,
        };
        let _ = done.send(result);
    }
    // Jobs the batch never reached (it failed before them) see their sender dropped.
}

impl SqliteStore {
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
                    .map_err(|_| StoreError::Commit("the batch failed before this write".into()))?
            }
            None => {
                let mut tx = self.begin_write().await?;
                job(&mut tx).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }
}
