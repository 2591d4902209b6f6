//! Audit fails closed: a value is handed to a peer only once its lease and its `fetch.allowed`
//! row are committed, and a repeated fetch by the same peer of the same version only once the
//! lease's recorded expiry covers the expiry it is given. So a daemon killed at any instant
//! accounts for every value it handed out, a restarted daemon's drains wait for every lease
//! any client was told of, and its next start folds the counts it has into the audit chain.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Env;
use hyper::{Method, StatusCode};
use keywarden_testkit::daemon::{base_config, wait_for};

const CLIENTS: usize = 32;

#[test]
fn a_daemon_killed_while_32_clients_fetch_has_recorded_every_value_it_handed_out() {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/key\"]\nprovider = \"random\"\n\n[[policy]]\nname = \"me\"\n\
         same_user = true\nsecrets = [\"app/*\"]\n",
        base_config("3s")
    ));
    let daemon = env.start_daemon();
    let socket = env.agent_socket();
    // Answers received, by lease id: how many, and the latest expiry they gave (ms).
    let received = Arc::new(Mutex::new(BTreeMap::<String, (i64, i64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (socket, received, stop) = (socket.clone(), received.clone(), stop.clone());
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((status, body)) =
                        keywarden::http::request(&socket, Method::GET, "/v1/secrets/app/key", None)
                            .await
                    else {
                        continue;
                    };
                    if status == StatusCode::OK {
                        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let lease = reply["lease_id"].as_str().unwrap().to_string();
                        let expires = chrono::DateTime::parse_from_rfc3339(
                            reply["expires_at"].as_str().unwrap(),
                        )
                        .unwrap()
                        .timestamp_millis();
                        let mut received = received.lock().unwrap();
                        let seen = received.entry(lease).or_default();
                        seen.0 += 1;
                        seen.1 = seen.1.max(expires);
                    }
                }
            })
        })
        .collect();
    wait_for("many fetches", Duration::from_secs(60), || {
        (received.lock().unwrap().values().map(|r| r.0).sum::<i64>() >= 3000).then_some(())
    });
    // Killed in the middle of the traffic: some fetches are between their answer and whatever
    // the daemon would have done next.
    daemon.kill9();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for client in clients {
            client.await.unwrap();
        }
    });
    let received = received.lock().unwrap().clone();
    // Durable before each answer: the lease, its `fetch.allowed` row (the value handed to that
    // peer) and an expiry at least the one the answer gave.
    for (lease, (answers, told)) in &received {
        let recorded: i64 = common::sql_one(
            &env.store,
            &format!("SELECT ifnull((SELECT expires_at FROM leases WHERE id = '{lease}'), 0)"),
        );
        assert!(
            recorded >= *told,
            "lease {lease}: {answers} values handed out until {told}, recorded until {recorded}"
        );
        let allowed: i64 = common::sql_one(
            &env.store,
            &format!(
                "SELECT count(*) FROM audit WHERE action = 'fetch.allowed' \
                 AND json_extract(detail, '$.lease_id') = '{lease}'"
            ),
        );
        assert_eq!(allowed, 1, "lease {lease}: the value's audit row");
    }
    // The next start folds every count the store holds into the chain.
    env.start_daemon().terminate();
    for lease in received.keys() {
        let (counted, folded): (i64, i64) = (
            common::sql_one(
                &env.store,
                // The first fetch of a lease is its `fetch.allowed` row.
                &format!("SELECT fetches - 1 FROM leases WHERE id = '{lease}'"),
            ),
            common::sql_one(
                &env.store,
                &format!(
                    "SELECT ifnull(sum(json_extract(detail, '$.count')), 0) FROM audit \
                     WHERE action = 'fetch.repeated' AND json_extract(detail, '$.lease_id') = '{lease}'"
                ),
            ),
        );
        assert_eq!(
            folded, counted,
            "lease {lease}: every count recorded is in the chain"
        );
    }
    env.ok(&["audit", "verify"], None);
}

#[test]
fn a_store_that_takes_no_writes_refuses_fetches_says_so_in_status_and_recovers_by_itself() {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/key\"]\nprovider = \"random\"\n\n[[policy]]\nname = \"curl\"\n\
         exe = [\"/usr/bin/curl\"]\nsecrets = [\"app/*\"]\n",
        base_config("3s")
    ));
    let daemon = env.start_daemon();
    let socket = env.agent_socket();
    let status = || -> serde_json::Value {
        serde_json::from_str(&env.ok(&["status", "--json"], None)).unwrap()
    };
    assert_eq!(status()["store"]["error"], serde_json::Value::Null);

    // Another process holds SQLite's write lock: the fetch's lease and audit row cannot be
    // committed, so nothing is handed out.
    let locker = rusqlite::Connection::open(&env.store).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (code, body) = common::curl(&socket, "GET", "/v1/secrets/app/key", &[]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("nothing was handed out"), "{body}");
    let report = status();
    let error = report["store"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("locked"), "{report}");
    assert!(report["store"]["failing_since"].is_string(), "{report}");
    let text = env.ok(&["status"], None);
    assert!(text.contains("STORE WRITES FAILING"), "{text}");
    assert!(
        daemon
            .log_text()
            .contains("a batch of audit rows and leases could not be written")
    );

    // The lock goes: the next fetch is served and status is clear, with nothing done by hand.
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    let (code, body) = common::curl(&socket, "GET", "/v1/secrets/app/key", &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(status()["store"]["error"], serde_json::Value::Null);
    assert!(daemon.log_text().contains("the store takes writes again"));
    assert_eq!(daemon.terminate(), Some(0));
    env.ok(&["audit", "verify"], None);
}
