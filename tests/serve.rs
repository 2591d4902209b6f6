//! `daemon::serve` as a library call: started on a temporary store and sockets, stopped by the
//! future it was given, and returning only after every connection closed and the sockets are
//! gone (as mini-redis's `server::run` does).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use keywarden::config::Config;
use keywarden::store::{Access, Store};
use keywarden::vault::{Passphrase, Vault};
use keywarden_testkit::daemon::base_config;
use keywarden_testkit::{Env, PASSPHRASE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_until_its_shutdown_future_and_joins_connections_in_flight() {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/key\"]\nprovider = \"random\"\n\n[[policy]]\nname = \"me\"\nsame_user = true\nsecrets = [\"app/*\"]\n",
        base_config("3s")
    ));
    env.ok(&["init"], None);
    let config = Config::load(&env.config).unwrap();
    let store = Store::open(&env.store, Access::Exclusive).await.unwrap();
    let passphrase = Passphrase::new(PASSPHRASE.to_string());
    let vault = Arc::new(Vault::unlock(store, &passphrase).await.unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_socket = config.agent.socket.clone();
    let admin_socket = config.agent.admin_socket.clone();
    let server = tokio::spawn(async move {
        keywarden::daemon::serve(&config, vault, async {
            let _ = stopped.await;
        })
        .await
    });

    // Serving: the random secret got its first version.
    let mut fetched = None;
    for _ in 0..500 {
        if let Ok((StatusCode::OK, body)) =
            keywarden::http::request(&agent_socket, Method::GET, "/v1/secrets/app/key", None).await
        {
            fetched = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body: serde_json::Value = serde_json::from_slice(&fetched.expect("served")).unwrap();
    assert_eq!(body["version"], 1);

    // A long-poll for a version that will not come is in flight when shutdown begins.
    let poll = tokio::spawn({
        let socket = agent_socket.clone();
        async move {
            keywarden::http::request(
                &socket,
                Method::GET,
                "/v1/secrets/app/key?min_version=2&wait=30",
                None,
            )
            .await
        }
    });
    // And a client that sent half a request head and went quiet.
    let mut slow = std::os::unix::net::UnixStream::connect(&agent_socket).unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\n").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poll.is_finished());

    stop.send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("serve returns once its connections are closed")
        .unwrap();
    served.unwrap();
    // serve joined its connections: the quiet client's connection is already closed (a
    // connection task left running would still hold it open, and this read would block).
    slow.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    match slow.read(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection is still open after serve returned: {e}"),
    }
    // The long-poll got its answer when shutdown began.
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll was answered")
        .unwrap()
        .unwrap();
    assert_ne!(status, StatusCode::OK);
    assert!(!agent_socket.exists() && !admin_socket.exists());
}
