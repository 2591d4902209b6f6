//! Audit fails closed: a fetch is answered only once its lease and its `fetch.allowed` row are
//! committed, so a daemon killed at any instant has an audit row for every value it handed out.

mod common;

use std::collections::BTreeSet;
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
    let received = Arc::new(Mutex::new(BTreeSet::<String>::new()));
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
                        received.lock().unwrap().insert(lease);
                    }
                }
            })
        })
        .collect();
    wait_for("many fetches", Duration::from_secs(60), || {
        (received.lock().unwrap().len() >= 3000).then_some(())
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
    let recorded: String = common::sql_one(
        &env.store,
        "SELECT ifnull(group_concat(json_extract(detail, '$.lease_id'), ' '), '') FROM audit \
         WHERE action = 'fetch.allowed'",
    );
    let recorded: BTreeSet<&str> = recorded.split(' ').collect();
    let missing: Vec<&String> = received
        .iter()
        .filter(|l| !recorded.contains(l.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} values handed out have no fetch.allowed row: {:?}",
        missing.len(),
        received.len(),
        &missing[..missing.len().min(5)]
    );
    env.ok(&["audit", "verify"], None);
}
