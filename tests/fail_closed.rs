//! Audit fails closed: a fetch is answered only once its lease and its `fetch.allowed` row (or,
//! for a repeated fetch, its count on the peer's lease) are committed, so a daemon killed at any
//! instant accounts for every value it handed out, and its next start folds the counts into
//! the audit chain.

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
    // Answers received, by lease id.
    let received = Arc::new(Mutex::new(BTreeMap::<String, i64>::new()));
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
                        *received.lock().unwrap().entry(lease).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    wait_for("many fetches", Duration::from_secs(60), || {
        (received.lock().unwrap().values().sum::<i64>() >= 3000).then_some(())
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
    // Durable before each answer: the count on the lease.
    for (lease, answers) in &received {
        let counted: i64 = common::sql_one(
            &env.store,
            &format!("SELECT ifnull((SELECT fetches FROM leases WHERE id = '{lease}'), 0)"),
        );
        assert!(
            counted >= *answers,
            "lease {lease}: {answers} values handed out, {counted} counted"
        );
    }
    // The next start folds the counts into the chain.
    env.start_daemon().terminate();
    for (lease, answers) in &received {
        let audited: i64 = common::sql_one(
            &env.store,
            &format!(
                "SELECT (SELECT count(*) FROM audit WHERE action = 'fetch.allowed' \
                   AND json_extract(detail, '$.lease_id') = '{lease}') \
                 + (SELECT ifnull(sum(json_extract(detail, '$.count')), 0) FROM audit \
                   WHERE action = 'fetch.repeated' AND json_extract(detail, '$.lease_id') = '{lease}')"
            ),
        );
        assert!(
            audited >= *answers,
            "lease {lease}: {answers} values handed out, {audited} in the audit chain"
        );
    }
    env.ok(&["audit", "verify"], None);
}
