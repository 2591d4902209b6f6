//! The store's own guarantees, on both backends (a real SQLite file in a temporary directory, a
//! database of its own on the PostgreSQL test server): conflicts on stale expectations, legal
//! journal moves only, generation checks, lease batches, and damaged rows read as corruption
//! (never as a default).

use serde_json::Map;

use super::*;
use crate::clock::now_millis;
use crate::crypto::KdfParams;

/// A store to test on: a SQLite file in a temporary directory, or a PostgreSQL database of its
/// own on the test server (both removed when this is dropped).
pub(crate) struct TempStore {
    _dir: tempfile::TempDir,
    /// The store's file (SQLite).
    pub(crate) path: PathBuf,
    /// The PostgreSQL database, where the store is there.
    postgres: Option<postgres::tests::Scratch>,
    /// The store, opened as a CLI writer would.
    pub(crate) store: Store,
}

/// A header whose wrapped keys are placeholders: the store never opens them.
fn placeholder_header() -> VaultHeader {
    VaultHeader {
        kdf: KdfParams::default(),
        salt: vec![0; 16],
        wrapped_root_key: vec![1; 60],
        wrapped_fingerprint_key: vec![2; 60],
        root_generation: 1,
    }
}

/// A SQLite store in a temporary directory.
pub(crate) async fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.db");
    let store = Store::create(
        &path,
        &placeholder_header(),
        AuditEvent::new("test", "vault.created"),
    )
    .await
    .unwrap();
    TempStore {
        _dir: dir,
        path,
        postgres: None,
        store,
    }
}

/// A PostgreSQL store in a database of its own, or `None` where no server is configured.
pub(crate) async fn temp_postgres_store() -> Option<TempStore> {
    let scratch = postgres::tests::Scratch::new().await?;
    let store = Store::create_postgres(
        &scratch.url,
        &placeholder_header(),
        AuditEvent::new("test", "vault.created"),
    )
    .await
    .unwrap();
    Some(TempStore {
        _dir: tempfile::tempdir().unwrap(),
        path: PathBuf::new(),
        postgres: Some(scratch),
        store,
    })
}

impl TempStore {
    /// The same store opened again with `access` (the first handle closed first).
    pub(crate) async fn reopened(self, access: Access) -> TempStore {
        let TempStore {
            _dir,
            path,
            postgres,
            store,
        } = self;
        drop(store);
        let store = match &postgres {
            Some(db) => Store::open_postgres(&db.url, access).await.unwrap(),
            None => Store::open(&path, access).await.unwrap(),
        };
        TempStore {
            _dir,
            path,
            postgres,
            store,
        }
    }

    /// Runs `sql` (`?` for each of `binds`) on a connection of its own, as any other writer
    /// of the database could.
    pub(crate) async fn execute(&self, sql: &str, binds: &[&str]) {
        match &self.postgres {
            Some(db) => {
                let mut numbered = String::new();
                for (i, piece) in sql.split('?').enumerate() {
                    if i > 0 {
                        numbered.push_str(&format!("${i}"));
                    }
                    numbered.push_str(piece);
                }
                let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
                let mut query = sqlx::query(sqlx::AssertSqlSafe(numbered));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.execute(&pool).await.unwrap();
                pool.close().await;
            }
            None => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", self.path.display()))
                    .await
                    .unwrap();
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()));
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }

    /// The rows in `table`, counted on a connection of its own.
    pub(crate) async fn count(&self, table: &'static str) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        match &self.postgres {
            Some(db) => {
                let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            }
            None => {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", self.path.display()))
                    .await
                    .unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            }
        }
    }
}

/// Runs a test of the store's guarantees on both backends, as `NAME::sqlite` and
/// `NAME::postgres` (which says `skipping` where no PostgreSQL server is configured).
macro_rules! on_both_backends {
    (async fn $name:ident($t:ident: TempStore) $body:block) => {
        mod $name {
            use super::*;

            async fn run($t: TempStore) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(temp_store().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(t) = temp_postgres_store().await {
                    run(t).await;
                }
            }
        }
    };
}

fn version(n: i64) -> NewVersion {
    NewVersion {
        version: n,
        ciphertext: vec![n as u8; 32],
        meta: Map::new(),
        fingerprint: vec![n as u8; 32],
    }
}

/// A secret `name` with version 1 current. Returns its id.
pub(crate) async fn secret_with_a_version(store: &Store, name: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let target = VersionTarget::New(NewSecret {
        id: id.clone(),
        name: name.into(),
        provider: "random".into(),
        wrapped_data_key: vec![3; 60],
        tags: vec![],
    });
    store
        .put_version(
            name,
            1,
            &target,
            &version(1),
            AuditEvent::new("test", "put"),
        )
        .await
        .unwrap();
    id
}

async fn planned_rotation(store: &Store, secret_id: &str) -> RotationRecord {
    let id = uuid::Uuid::new_v4().to_string();
    let plan = NewRotation {
        id: id.clone(),
        secret_id: secret_id.into(),
        from_version: Some(1),
        proposed: None,
        reason: Reason::Manual,
        emergency: false,
        incident_id: None,
    };
    store
        .plan_rotation(&plan, AuditEvent::new("test", "planned"))
        .await
        .unwrap();
    store.rotation(&id).await.unwrap().unwrap()
}

on_both_backends! {
    async fn a_damaged_incident_scope_is_corruption_naming_the_incident_not_every_secret(t: TempStore) {
        let incident = IncidentRecord {
            id: "inc-1".into(),
            started_at: now_millis(),
            finished_at: None,
            scope: Scope::secret("only/this"),
            assume_compromise: true,
            trigger: Trigger::Admin,
            leases_revoked: 0,
            closed_by: None,
        };
        t.store
            .create_incident(&incident, AuditEvent::new("test", "compromise.started"))
            .await
            .unwrap();
        let read = t.store.incident("inc-1").await.unwrap().unwrap();
        assert_eq!(read.scope, Scope::secret("only/this"));
        assert_eq!(read.trigger, Trigger::Admin);

        // A damaged row used to read as the default scope: every secret in the store.
        t.execute("UPDATE incidents SET scope = '{\"names\": 7}' WHERE id = 'inc-1'", &[])
            .await;
        let err = t.store.unfinished_incidents().await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.starts_with("incident inc-1: its scope")),
            "{err}"
        );
    }
}

on_both_backends! {
    async fn unknown_spellings_in_rows_are_corruption_naming_the_row(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "app/key").await;
        let rotation = planned_rotation(&t.store, &secret).await;
        assert_eq!(rotation.reason, Reason::Manual);
        t.execute("UPDATE rotations SET reason = 'because' WHERE id = ?", &[&rotation.id])
            .await;
        let err = t.store.rotation(&rotation.id).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the store is damaged: rotation {}: unknown rotation reason \"because\"",
                rotation.id
            )
        );
        t.execute(
            "INSERT INTO alerts (at, kind, secret, message) VALUES (1, 'rumour', NULL, 'x')",
            &[],
        )
        .await;
        let err = t.store.recent_alerts(10, false).await.unwrap_err();
        assert!(
            err.to_string().contains("unknown alert kind \"rumour\""),
            "{err}"
        );
    }
}

on_both_backends! {
    async fn advance_rotation_takes_only_legal_moves_from_the_state_it_expects(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "app/key").await;
        let rotation = planned_rotation(&t.store, &secret).await;
        let step = |from, to| StepChange::to(from, to);

        // Not a move of the state machine: refused before anything is written.
        let err = t
            .store
            .advance_rotation(
                &rotation,
                &step(RotationState::Planned, RotationState::Promoted),
                AuditEvent::new("test", "step"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::IllegalMove { .. }), "{err}");

        // A legal move, but the journal is not in `from`: a conflict, and nothing changes.
        let err = t
            .store
            .advance_rotation(
                &rotation,
                &step(RotationState::Created, RotationState::Verified),
                AuditEvent::new("test", "step"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        let unchanged = t.store.rotation(&rotation.id).await.unwrap().unwrap();
        assert_eq!(unchanged.state, RotationState::Planned);

        let failed = StepChange {
            error: Some("upstream refused".into()),
            ..step(RotationState::Planned, RotationState::Failed)
        };
        t.store
            .advance_rotation(&rotation, &failed, AuditEvent::new("test", "step"))
            .await
            .unwrap();
        let moved = t.store.rotation(&rotation.id).await.unwrap().unwrap();
        assert_eq!(moved.state, RotationState::Failed);
        assert_eq!(moved.last_error.as_deref(), Some("upstream refused"));
    }
}

on_both_backends! {
    async fn put_version_on_a_stale_expected_version_conflicts_and_keeps_the_current_one(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "app/key").await;
        let stale = VersionTarget::Existing {
            secret_id: secret.clone(),
            expected_latest: None,
        };
        let err = t
            .store
            .put_version(
                "app/key",
                1,
                &stale,
                &version(2),
                AuditEvent::new("test", "put"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        let current = t.store.sealed("app/key", None).await.unwrap().unwrap();
        assert_eq!(current.version.version, 1);

        let fresh = VersionTarget::Existing {
            secret_id: secret,
            expected_latest: Some(1),
        };
        t.store
            .put_version(
                "app/key",
                1,
                &fresh,
                &version(2),
                AuditEvent::new("test", "put"),
            )
            .await
            .unwrap();
        let current = t.store.sealed("app/key", None).await.unwrap().unwrap();
        assert_eq!(current.version.version, 2);
    }
}

on_both_backends! {
    async fn writes_under_an_old_root_key_generation_are_refused(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "app/key").await;
        let header = VaultHeader {
            root_generation: 2,
            ..t.store.header().await.unwrap()
        };
        let rewrapped = [RewrappedKey {
            secret_id: secret.clone(),
            wrapped_data_key: vec![4; 60],
            resealed: None,
        }];
        // A rekey computed against generation 0 lost a race: refused.
        let err = t
            .store
            .rekey(0, &header, &rewrapped, AuditEvent::new("test", "rekey"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::StaleKeys), "{err}");
        t.store
            .rekey(1, &header, &rewrapped, AuditEvent::new("test", "rekey"))
            .await
            .unwrap();
        assert_eq!(t.store.header().await.unwrap().root_generation, 2);
        // A writer still holding generation 1's keys must unlock again.
        let target = VersionTarget::Existing {
            secret_id: secret,
            expected_latest: Some(1),
        };
        let err = t
            .store
            .put_version(
                "app/key",
                1,
                &target,
                &version(2),
                AuditEvent::new("test", "put"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::StaleKeys), "{err}");
    }
}

on_both_backends! {
    async fn a_lease_batch_inserts_ends_and_purges_with_its_audit_rows(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "app/key").await;
        let lease = |id: &str, issued: bool| LeaseRow {
            id: id.into(),
            secret_id: secret.clone(),
            secret_name: "app/key".into(),
            version: (!issued).then_some(1),
            issued: issued.then(|| vec![9; 40]),
            issued_meta: issued.then(Map::new),
            uid: 1000,
            gid: 1000,
            pid: 42,
            exe: Some("/usr/bin/agent".into()),
            created_at: 1_000,
            expires_at: 2_000,
            ended_at: None,
            upstream_state: issued.then_some(UpstreamState::Live),
        };
        let audit_rows = |n: usize| {
            (0..n)
                .map(|_| AuditEvent::new("test", "fetch.allowed"))
                .collect::<Vec<_>>()
        };
        let before = t.store.audit_head().await.unwrap().unwrap().0;
        t.store
            .apply_lease_batch(
                &[
                    LeaseOp::Insert(Arc::new(lease("plain", false))),
                    LeaseOp::Insert(Arc::new(lease("issued", true))),
                ],
                &audit_rows(2),
            )
            .await
            .unwrap();
        assert_eq!(t.store.audit_head().await.unwrap().unwrap().0, before + 2);
        assert_eq!(t.store.open_leases().await.unwrap().len(), 2);
        assert_eq!(
            t.store.live_leases(&secret, 1, 1_500).await.unwrap(),
            (1, Some(2_000))
        );

        let end = |id: &str, upstream| LeaseOp::End {
            id: id.into(),
            at: 2_000,
            reason: LeaseEnd::Expired,
            upstream_state: upstream,
        };
        t.store
            .apply_lease_batch(
                &[
                    end("plain", None),
                    end("issued", Some(UpstreamState::RevokePending)),
                ],
                &[],
            )
            .await
            .unwrap();
        // The issued credential stays open until it is revoked upstream.
        let open = t.store.open_leases().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].upstream_state, Some(UpstreamState::RevokePending));

        t.store
            .apply_lease_batch(
                &[
                    LeaseOp::UpstreamRevoked {
                        id: "issued".into(),
                    },
                    LeaseOp::PurgeEnded { before: 3_000 },
                ],
                &[],
            )
            .await
            .unwrap();
        assert!(t.store.open_leases().await.unwrap().is_empty());
        let remaining = t.count("leases").await;
        assert_eq!(remaining, 0, "ended and revoked leases are purged");
    }
}

on_both_backends! {
    async fn batched_writes_commit_together_and_a_conflicting_one_fails_alone(t: TempStore) {
        let secret = secret_with_a_version(&t.store, "batched").await;
        // The daemon's access: on SQLite, its journal writes go through the batcher.
        let t = t.reopened(Access::Exclusive).await;
        let store = t.store.clone();
        let key = crate::crypto::FingerprintKey::generate()
            .unwrap()
            .integrity_key();
        store.set_integrity_key(key.clone());
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (planner, secret) = (store.clone(), secret.clone());
            writes.spawn(async move {
                let plan = NewRotation {
                    id: format!("rotation-{i}"),
                    secret_id: secret,
                    from_version: Some(1),
                    proposed: None,
                    reason: Reason::Manual,
                    emergency: false,
                    incident_id: None,
                };
                let planned = planner
                    .plan_rotation(&plan, AuditEvent::new("test", "planned"))
                    .await;
                (
                    true,
                    planned.map_err(|e| matches!(e, StoreError::Conflict(_))),
                )
            });
            let auditor = store.clone();
            writes.spawn(async move {
                let appended = auditor
                    .append_audit(&[AuditEvent::new("test", format!("event-{i}"))])
                    .await;
                (false, appended.map_err(|_| false))
            });
        }
        let (mut planned, mut conflicts, mut appended) = (0, 0, 0);
        while let Some(result) = writes.join_next().await {
            match result.unwrap() {
                (true, Ok(())) => planned += 1,
                (true, Err(true)) => conflicts += 1,
                (false, Ok(())) => appended += 1,
                other => panic!("unexpected: {other:?}"),
            }
        }
        // One plan wins; the others conflict, and nothing of theirs is written; the other jobs of
        // their batches are committed.
        assert_eq!((planned, conflicts, appended), (1, 19, 20));
        let rows = store.audit_page(0, 1000).await.unwrap();
        assert_eq!(rows.iter().filter(|r| r.action == "planned").count(), 1);
        assert_eq!(
            rows.iter()
                .filter(|r| r.action.starts_with("event-"))
                .count(),
            20
        );
        let mut chain = crate::audit::ChainVerifier::default();
        for row in &rows {
            chain.check(row).unwrap();
        }
        assert_eq!(store.active_rotations().await.unwrap().len(), 1);
        let ages = store.active_rotation_ages().await.unwrap();
        assert_eq!(ages.len(), 1);
        assert_eq!(ages[0].1, RotationState::Planned);
        // Each batch sealed its head: the last row carries a seal, under the vault's key.
        let head = rows.last().unwrap();
        let seals = store.audit_seals().await.unwrap();
        let (seq, mac) = seals.last().unwrap();
        assert_eq!(*seq, head.seq);
        assert_eq!(
            mac.as_slice(),
            key.audit_seal(head.seq, &head.hash).as_slice()
        );
    }
}

on_both_backends! {
    async fn unquarantine_lifts_a_quarantine_and_writes_nothing_when_there_is_none(t: TempStore) {
        let id = secret_with_a_version(&t.store, "app/key").await;
        let rows = || async { t.store.audit_tail(1000).await.unwrap().len() };
        let lift = || AuditEvent::new("test", "secret.unquarantine");

        // Nothing counted: no write, no audit row.
        let before = rows().await;
        t.store.unquarantine(&id, lift()).await.unwrap();
        assert_eq!(rows().await, before);

        t.store
            .record_secret_failure(&id, "upstream refused", true, AuditEvent::new("test", "q"))
            .await
            .unwrap();
        assert!(t.store.is_quarantined("app/key").await.unwrap());
        t.store.unquarantine(&id, lift()).await.unwrap();
        let summary = t.store.secret_summary("app/key").await.unwrap().unwrap();
        assert_eq!((summary.quarantined_at, summary.failed_attempts), (None, 0));
        let last = t.store.audit_tail(1).await.unwrap().pop().unwrap();
        assert_eq!(last.action, "secret.unquarantine");
    }
}
