//! The PostgreSQL schema against SQLite's, and a scratch database per test on the test server
//! (`KEYWARDEN_TEST_POSTGRES_URL`).

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::connect;
use crate::audit::AuditEvent;

/// A database of the test's own on the test server, dropped with this.
pub(crate) struct Scratch {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl Scratch {
    /// `None` (with a note) where no server is configured; under CI its absence fails.
    pub(crate) async fn new() -> Option<Scratch> {
        let Ok(base) = std::env::var("KEYWARDEN_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "KEYWARDEN_TEST_POSTGRES_URL is not set (.ci/run sets it)"
            );
            eprintln!("skipping: KEYWARDEN_TEST_POSTGRES_URL is not set");
            return None;
        };
        let admin = PgPool::connect(&base).await.unwrap();
        let name = format!("kw_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let (server, _) = base.rsplit_once('/').unwrap();
        let url = format!("{server}/{name}");
        Some(Scratch {
            admin_url: base,
            name,
            url,
        })
    }

    pub(crate) async fn pool(&self) -> PgPool {
        connect(&self.url, Duration::from_secs(30)).await.unwrap()
    }

    /// Creates a store here (with a placeholder header), and opens it as the daemon does.
    async fn daemon_store(&self) -> crate::store::Store {
        use crate::store::{Access, Store};
        drop(
            Store::create_postgres(&self.url, &header(), AuditEvent::new("test", "created"))
                .await
                .unwrap(),
        );
        Store::open_postgres(&self.url, Access::Exclusive)
            .await
            .unwrap()
    }
}

/// A vault header that unlocks nothing: what the store tests need of one.
fn header() -> crate::store::VaultHeader {
    crate::store::VaultHeader {
        kdf: crate::crypto::KdfParams::default(),
        salt: vec![0; 16],
        wrapped_root_key: vec![1; 60],
        wrapped_fingerprint_key: vec![2; 60],
        root_generation: 1,
    }
}

impl Drop for Scratch {
    /// Drops the database (its connections ended by force), on a thread of its own: `Drop`
    /// cannot wait for a future on the test's runtime.
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = PgPool::connect(&url).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await?;
                admin.close().await;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the scratch database {}", self.name);
        }
    }
}

/// A column as both schemas are compared: its type in PostgreSQL's words, whether it may be
/// NULL, and whether it is part of the primary key.
type Columns = BTreeMap<(String, String), (String, bool, bool)>;

/// The SQLite store's columns after all its migrations.
async fn sqlite_columns() -> (Columns, Vec<String>) {
    let mut db = SqliteConnectOptions::new()
        .in_memory(true)
        .connect()
        .await
        .unwrap();
    crate::store::sqlite::MIGRATOR.run(&mut db).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name != '_sqlx_migrations'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut columns = Columns::new();
    for table in tables {
        let rows: Vec<(String, String, bool, i64)> =
            sqlx::query_as("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)")
                .bind(&table)
                .fetch_all(&mut db)
                .await
                .unwrap();
        for (column, kind, not_null, pk) in rows {
            let kind = match kind.as_str() {
                "INTEGER" => "bigint",
                "BLOB" => "bytea",
                "TEXT" => "text",
                other => panic!("{table}.{column}: a type the comparison does not know: {other}"),
            };
            // SQLite's INTEGER PRIMARY KEY (the rowid) is never NULL, whatever pragma says.
            let nullable = !(not_null || pk > 0);
            columns.insert((table.clone(), column), (kind.into(), nullable, pk > 0));
        }
    }
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    indexes.sort();
    db.close().await.unwrap();
    (columns, indexes)
}

/// The PostgreSQL store's columns after all its migrations (the leadership tables aside: they
/// have no SQLite twin, where the file lock is the leadership).
async fn postgres_columns(pool: &PgPool) -> (Columns, Vec<String>) {
    let rows: Vec<(String, String, String, String, bool)> = sqlx::query_as(
        "SELECT c.table_name::text, c.column_name::text, c.data_type::text, c.is_nullable::text, \
         EXISTS (SELECT 1 FROM information_schema.table_constraints t \
                 JOIN information_schema.key_column_usage k \
                   ON k.constraint_name = t.constraint_name AND k.table_name = t.table_name \
                 WHERE t.constraint_type = 'PRIMARY KEY' AND t.table_name = c.table_name \
                   AND k.column_name = c.column_name) \
         FROM information_schema.columns c WHERE c.table_schema = current_schema() \
         AND c.table_name NOT IN ('_sqlx_migrations', 'leadership', 'daemons')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let columns = rows
        .into_iter()
        .map(|(table, column, kind, nullable, pk)| ((table, column), (kind, nullable == "YES", pk)))
        .collect();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() \
         AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key' ORDER BY indexname",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (columns, indexes)
}

#[tokio::test]
async fn the_postgres_schema_has_every_table_column_type_key_and_index_the_sqlite_one_has() {
    let Some(db) = Scratch::new().await else {
        return;
    };
    let pool = db.pool().await;
    let (sqlite, sqlite_indexes) = sqlite_columns().await;
    let (postgres, postgres_indexes) = postgres_columns(&pool).await;
    assert!(sqlite.len() > 100, "{}", sqlite.len());
    let only = |a: &Columns, b: &Columns| {
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{}.{} {v:?}", k.0, k.1))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (only(&sqlite, &postgres), only(&postgres, &sqlite)),
        (vec![], vec![]),
        "(SQLite's columns that PostgreSQL lacks or has otherwise, and the reverse)"
    );
    assert_eq!(sqlite_indexes, postgres_indexes);
    pool.close().await;
}

/// Waits (polling every 10 ms, at most 10 s) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemons_cache_forgets_what_another_daemon_replaced_and_reads_the_database_while_deaf() {
    // What the daemon hears is also what its watchers (the broker's key pusher) are told.
    use crate::store::tests::secret_with_a_version;
    use crate::store::{Access, NewVersion, Store, VersionTarget};

    let Some(db) = Scratch::new().await else {
        return;
    };
    let other = Store::create_postgres(&db.url, &header(), AuditEvent::new("test", "created"))
        .await
        .unwrap();
    let id = secret_with_a_version(&other, "app/key").await;
    let daemon = Store::open_postgres(&db.url, Access::Exclusive)
        .await
        .unwrap();
    let cached = daemon.postgres().unwrap();
    let mut watch = daemon
        .watch_versions()
        .expect("a daemon's store tells of new versions");
    let mut heard = move || {
        std::iter::from_fn(|| watch.try_recv().ok())
            .map(|name| name.map(|n| n.to_string()))
            .collect::<Vec<_>>()
    };
    eventually("the daemon to listen", async || cached.cache().is_some()).await;
    heard();
    let current = async || {
        let sealed = daemon.sealed("app/key", None).await.unwrap().unwrap();
        (sealed.version.version, sealed.version.ciphertext[0])
    };
    assert_eq!(current().await, (1, 1));

    // A change no one announced (a row edited by hand) is not seen: the row is served from
    // the cache.
    let raw = db.pool().await;
    sqlx::query("UPDATE versions SET ciphertext = '\\x09' WHERE version = 1")
        .execute(&raw)
        .await
        .unwrap();
    assert_eq!(current().await, (1, 1), "read from the cache");

    // Another daemon's new version is announced: the cache forgets the old one.
    let put = |n: i64| {
        let other = other.clone();
        let id = id.clone();
        async move {
            let version = NewVersion {
                version: n,
                ciphertext: vec![n as u8; 32],
                meta: serde_json::Map::new(),
                fingerprint: vec![n as u8; 32],
            };
            let target = VersionTarget::Existing {
                secret_id: id,
                expected_latest: Some(n - 1),
            };
            other
                .put_version(
                    "app/key",
                    1,
                    &target,
                    &version,
                    AuditEvent::new("test", "put"),
                )
                .await
                .unwrap();
        }
    };
    put(2).await;
    eventually("version 2", async || current().await == (2, 2)).await;
    assert!(heard().contains(&Some("app/key".to_string())));

    // The listener's connection is cut: until it listens again the cache is not used, so a
    // version written meanwhile is served at once.
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&raw)
    .await
    .unwrap();
    assert_eq!(cut, 1);
    put(3).await;
    eventually("version 3", async || current().await == (3, 3)).await;
    eventually("the daemon to listen again", async || {
        cached.cache().is_some()
    })
    .await;
    // While deaf, any secret may have changed: watchers are told so.
    assert!(heard().contains(&None));
    put(4).await;
    eventually("version 4", async || current().await == (4, 4)).await;
    eventually("version 4 heard", async || {
        heard().contains(&Some("app/key".to_string()))
    })
    .await;
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_of_a_fenced_store_is_refused_once_another_daemon_took_over() {
    use crate::store::StoreError;
    use crate::store::postgres::leader::{Candidate, Timing, leadership};
    use crate::store::tests::secret_with_a_version;

    let Some(db) = Scratch::new().await else {
        return;
    };
    let store = db.daemon_store().await;
    let id = secret_with_a_version(&store, "app/key").await;
    let pg = store.postgres().unwrap();
    let timing = Timing {
        ttl: Duration::from_millis(600),
    };
    let term = pg.candidate(timing).acquire().await.unwrap().unwrap();
    pg.fence_writes(Some(term));
    store.set_next_rotation(&id, Some(1)).await.unwrap();
    let pool = db.pool().await;
    eventually("the lease to run out", async || {
        leadership(&pool).await.unwrap().unwrap().valid_for_ms < 0
    })
    .await;
    let other = Candidate::new(pool.clone(), timing);
    assert_eq!(other.acquire().await.unwrap(), Some(term + 1));
    let refused = [
        store.set_next_rotation(&id, Some(2)).await,
        store.append_audit(&[AuditEvent::new("test", "late")]).await,
        store
            .record_secret_failure(&id, "late", false, AuditEvent::new("test", "late"))
            .await
            .map(drop),
    ];
    for result in refused {
        assert!(
            matches!(result, Err(StoreError::Fenced { mine, current }) if mine == term && current == term + 1),
            "{result:?}"
        );
    }
    // Nothing of them was written; unfenced (a follower's writes), the store writes again.
    let late: i64 = sqlx::query_scalar("SELECT count(*) FROM audit WHERE action = 'late'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(late, 0);
    pg.fence_writes(None);
    store.set_next_rotation(&id, Some(3)).await.unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_shares_transactions_and_a_failed_job_leaves_the_chain_as_if_it_never_ran() {
    use std::sync::{Arc, Mutex};

    use crate::audit::ChainVerifier;
    use crate::store::StoreError;

    let Some(db) = Scratch::new().await else {
        return;
    };
    // Opened as the daemon opens it: with the group commit.
    let store = db.daemon_store().await;
    let transactions = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (store, transactions) = (store.clone(), transactions.clone());
        jobs.spawn(async move {
            let fails = i % 3 == 0;
            let event: Arc<[AuditEvent]> = Arc::new([AuditEvent::new("test", format!("job-{i}"))]);
            store
                .postgres()
                .expect("a PostgreSQL store")
                .write(Box::new(move |conn, chain, _| {
                    let (event, transactions) = (event.clone(), transactions.clone());
                    Box::pin(async move {
                        chain.append(&mut *conn, &event).await?;
                        if fails {
                            return Err(StoreError::Conflict("after its append".into()));
                        }
                        let txid: i64 = sqlx::query_scalar("SELECT txid_current()")
                            .fetch_one(&mut *conn)
                            .await?;
                        transactions.lock().unwrap().insert(txid);
                        Ok(())
                    })
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
    let shared = transactions.lock().unwrap().len();
    assert!(
        shared < committed,
        "{committed} jobs committed in {shared} transactions: none shared"
    );
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
