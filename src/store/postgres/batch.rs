//! Group commit for the rotation journal on PostgreSQL, as `sqlite/batch.rs` does it for SQLite:
//! in the daemon, the write transactions of many rotations (their plans, steps, deliveries and
//! audit rows) share one transaction, one turn of the writers' lock, one fence check and one
//! commit. Without it each took its own, and since writers take turns on one lock, the commits
//! of an emergency `rotate-all` ran one after another.
//!
//! A batch first runs its jobs one after another in a plain transaction. When one fails (a
//! conflict, rare), the transaction is rolled back and the batch runs again with each job in a
//! savepoint of its own: the failing one is rolled back to its savepoint and told its error, the
//! others go on. So a job may run twice, and does nothing but SQL on the connection it is given.
//! Every job is answered only after the shared commit returned; if the transaction cannot begin
//! (another daemon took over: fenced) or commit, every job of the batch is told. Jobs append
//! audit rows to the transaction's [`Chain`]: its head is read once and carried from job to job
//! (a job rolled back to its savepoint leaves it as if the job had never run), and the rows are
//! written in one statement and the head sealed once, before the commit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, OnceLock};

use sqlx::PgPool;
use sqlx::postgres::PgConnection;
use tokio::sync::{mpsc, oneshot};

use super::audit::Chain;
use super::begin_write;
use crate::crypto::IntegrityKey;
use crate::store::StoreError;

/// What a job's statements return.
pub(super) type JobFuture<'c> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'c>>;

/// The statements of one write transaction, run on the connection of the batch's transaction,
/// appending audit rows to its [`Chain`], with the integrity key (for a new current version's
/// MAC); possibly twice: see the module's documentation.
pub(super) type Job = Box<
    dyn for<'c> Fn(&'c mut PgConnection, &'c mut Chain, Option<&'c IntegrityKey>) -> JobFuture<'c>
        + Send
        + Sync,
>;

/// Jobs folded into one transaction at most.
const MAX_JOBS: usize = 128;

pub(super) struct Pending {
    job: Job,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the batcher needs of the store (not the store itself, which holds the batcher).
pub(super) struct Writer {
    pub(super) pool: PgPool,
    pub(super) fence: Arc<AtomicI64>,
    pub(super) integrity: Arc<OnceLock<IntegrityKey>>,
}

/// Starts the batcher; it ends when every sender is dropped.
pub(super) fn start(writer: Writer) -> mpsc::Sender<Pending> {
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
            let answers = run(&writer, &batch).await;
            for (pending, answer) in batch.into_iter().zip(answers) {
                let _ = pending.done.send(answer);
            }
        }
    });
    tx
}

/// Sends `job` to the batcher and waits for its answer.
pub(super) async fn submit(batcher: &mpsc::Sender<Pending>, job: Job) -> Result<(), StoreError> {
    let (done, answer) = oneshot::channel();
    batcher
        .send(Pending { job, done })
        .await
        .map_err(|_| StoreError::Commit("the store is closing".into()))?;
    answer
        .await
        .map_err(|_| StoreError::Commit("the store is closing".into()))?
}

async fn run(writer: &Writer, batch: &[Pending]) -> Vec<Result<(), StoreError>> {
    match all_or_nothing(writer, batch).await {
        Ok(true) => batch.iter().map(|_| Ok(())).collect(),
        Ok(false) => match with_savepoints(writer, batch).await {
            Ok(answers) => answers,
            Err(e) => failed(batch, &e),
        },
        Err(e) => failed(batch, &e),
    }
}

async fn all_or_nothing(writer: &Writer, batch: &[Pending]) -> Result<bool, StoreError> {
    let mut tx = begin_write(&writer.pool, &writer.fence).await?;
    let key = writer.integrity.get();
    let mut chain = Chain::default();
    for pending in batch {
        if (pending.job)(&mut tx, &mut chain, key).await.is_err() {
            return Ok(false); // dropping `tx` rolls it back
        }
    }
    chain.finish(&mut tx, key).await?;
    tx.commit().await?;
    Ok(true)
}

async fn with_savepoints(
    writer: &Writer,
    batch: &[Pending],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut tx = begin_write(&writer.pool, &writer.fence).await?;
    let key = writer.integrity.get();
    let mut chain = Chain::default();
    let mut answers = Vec::with_capacity(batch.len());
    for pending in batch {
        sqlx::query("SAVEPOINT job").execute(&mut *tx).await?;
        let before = chain.clone();
        let result = (pending.job)(&mut tx, &mut chain, key).await;
        if result.is_err() {
            chain = before;
            sqlx::query("ROLLBACK TO SAVEPOINT job")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("RELEASE SAVEPOINT job")
            .execute(&mut *tx)
            .await?;
        answers.push(result);
    }
    chain.finish(&mut tx, key).await?;
    tx.commit().await?;
    Ok(answers)
}

/// The batch's failure, told to each of its jobs: a fence keeps its kind (the daemon no
/// longer leads); anything else is a write that could not be committed.
fn failed(batch: &[Pending], error: &StoreError) -> Vec<Result<(), StoreError>> {
    batch
        .iter()
        .map(|_| {
            Err(match error {
                StoreError::Fenced { mine, current } => StoreError::Fenced {
                    mine: *mine,
                    current: *current,
                },
                other => StoreError::Commit(other.to_string()),
            })
        })
        .collect()
}
