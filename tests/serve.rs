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

    // A client in the middle of a request: the server has started reading its body (it said
    // `100 Continue`), and the body never comes.
    let mut slow = std::os::unix::net::UnixStream::connect(&agent_socket).unwrap();
    slow.write_all(
        b"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n") {
        let n = slow.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the server closed the connection instead of reading the body"
        );
        reply.extend_from_slice(&buf[..n]);
    }

    stop.send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("serve returns once its connections are closed")
        .unwrap();
    served.unwrap();
    // serve joined its connections: the quiet client's connection is already closed (a
    // connection task left running would still hold it open, and this read would block).
    slow.set_nonblocking(true).unwrap();
    match slow.read(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection is still open after serve returned: {e}"),
    }
    assert!(!agent_socket.exists() && !admin_socket.exists());
}
