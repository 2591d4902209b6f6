//! The leadership rules against the real PostgreSQL server (`KEYWARDEN_TEST_POSTGRES_URL`), a
//! database per test. The database's clock cannot be paused: the tests use short leases and
//! wait on conditions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::*;
use crate::store::postgres::tests::Scratch;

/// Polls `check` every 10 ms until it gives a value; panics after `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn timing(ms: u64) -> Timing {
    Timing {
        ttl: Duration::from_millis(ms),
    }
}

#[tokio::test]
async fn one_daemon_leads_and_a_takeover_waits_for_the_lease_to_run_out_and_raises_the_term() {
    let Some(db) = Scratch::new().await else {
        return;
    };
    let pool = db.pool().await;
    assert_eq!(leadership(&pool).await.unwrap(), None);
    let (a, b) = (
        Candidate::new(pool.clone(), timing(3000)),
        Candidate::new(pool.clone(), timing(3000)),
    );
    assert_eq!(a.acquire().await.unwrap(), Some(1));
    assert_eq!(b.acquire().await.unwrap(), None, "a's lease lasts");
    let now = leadership(&pool).await.unwrap().unwrap();
    assert_eq!((now.holder.as_str(), now.term), (a.id(), 1));
    assert!(now.valid_for_ms > 0);
    assert!(a.renew(1).await.unwrap());
    assert!(!b.renew(1).await.unwrap(), "b does not hold the lease");
    begin_fenced(&pool, 1)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    // a stops renewing (paused, partitioned): once the lease ran out on the database's clock,
    // b takes it under a new term, and a can neither renew nor write.
    wait_for(
        "a's lease to run out",
        Duration::from_secs(10),
        async || (leadership(&pool).await.unwrap().unwrap().valid_for_ms < 0).then_some(()),
    )
    .await;
    assert_eq!(b.acquire().await.unwrap(), Some(2));
    assert!(!a.renew(1).await.unwrap());
    match begin_fenced(&pool, 1).await {
        Err(StoreError::Fenced { mine, current }) => assert_eq!((mine, current), (1, 2)),
        other => panic!("a deposed leader's write began: {:?}", other.map(|_| ())),
    }
    begin_fenced(&pool, 2)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let who: Vec<String> = members(&pool, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(who.len(), 2);
    assert!(who.contains(&a.id().to_string()) && who.contains(&b.id().to_string()));

    // A clean stop ends the lease at once.
    b.resign(2).await.unwrap();
    assert_eq!(a.acquire().await.unwrap(), Some(3));
    pool.close().await;
}

#[tokio::test]
async fn a_takeover_waits_for_the_old_leaders_write_in_flight_and_then_sees_it() {
    let Some(db) = Scratch::new().await else {
        return;
    };
    let pool = db.pool().await;
    sqlx::query("CREATE TABLE steps (step TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let (a, b) = (
        Candidate::new(pool.clone(), timing(500)),
        Candidate::new(pool.clone(), timing(500)),
    );
    assert_eq!(a.acquire().await.unwrap(), Some(1));
    // a begins a write while it leads; its lease runs out before the write commits.
    let mut write = begin_fenced(&pool, 1).await.unwrap();
    sqlx::query("INSERT INTO steps VALUES ('by a')")
        .execute(&mut *write)
        .await
        .unwrap();
    wait_for(
        "a's lease to run out",
        Duration::from_secs(10),
        async || (leadership(&pool).await.unwrap().unwrap().valid_for_ms < 0).then_some(()),
    )
    .await;
    let takeover = tokio::spawn(async move { b.acquire().await.unwrap() });
    // The takeover waits on the row lock a's write holds (the server says so).
    wait_for(
        "the takeover to wait for a's write",
        Duration::from_secs(10),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting == 1).then_some(())
        },
    )
    .await;
    assert!(!takeover.is_finished());
    write.commit().await.unwrap();
    assert_eq!(takeover.await.unwrap(), Some(2));
    // b, leading from here, finds a's step: nothing done before the takeover is lost to it.
    let steps: Vec<String> = sqlx::query_scalar("SELECT step FROM steps")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(steps, ["by a"]);
    pool.close().await;
}

/// Campaigns `n` candidates, each on its own pool; returns their ids and role watches, and a
/// handle per campaign.
async fn campaigners(
    db: &Scratch,
    n: usize,
    ttl_ms: u64,
    stop: &watch::Receiver<bool>,
) -> Vec<(String, watch::Receiver<Role>, tokio::task::JoinHandle<()>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let candidate = Candidate::new(db.pool().await, timing(ttl_ms));
        let id = candidate.id().to_string();
        let (role, task) = candidate.campaign(stop.clone());
        out.push((id, role, task));
    }
    out
}

fn leaders(
    campaigns: &[(String, watch::Receiver<Role>, tokio::task::JoinHandle<()>)],
) -> Vec<(usize, i64)> {
    campaigns
        .iter()
        .enumerate()
        .filter(|(_, (_, _, task))| !task.is_finished())
        .filter_map(|(i, (_, role, _))| match *role.borrow() {
            Role::Leader { term } => Some((i, term)),
            Role::Follower => None,
        })
        .collect()
}

#[tokio::test]
async fn of_three_daemons_one_leads_and_a_killed_leader_is_replaced_under_a_new_term() {
    let Some(db) = Scratch::new().await else {
        return;
    };
    let pool = db.pool().await;
    let (stop, stopped) = watch::channel(false);
    let campaigns = campaigners(&db, 3, 1500, &stopped).await;
    let (first, term) = wait_for("a leader", Duration::from_secs(10), async || {
        let now = leaders(&campaigns);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        now.first().copied()
    })
    .await;
    assert_eq!(
        leadership(&pool).await.unwrap().unwrap().holder,
        campaigns[first].0
    );
    wait_for(
        "all three heard from",
        Duration::from_secs(10),
        async || (members(&pool, Duration::from_secs(5)).await.unwrap().len() == 3).then_some(()),
    )
    .await;

    // The leader dies without a word (its task aborted: no resign, no more renewals).
    let killed = Instant::now();
    campaigns[first].2.abort();
    let (_, new_term) = wait_for("a new leader", Duration::from_secs(20), async || {
        let now = leaders(&campaigns);
        assert!(now.len() <= 1, "two leaders at once: {now:?}");
        now.first().copied().filter(|(i, _)| *i != first)
    })
    .await;
    eprintln!(
        "takeover after the leader was killed: {:?} (lease 1.5 s)",
        killed.elapsed()
    );
    assert_eq!(new_term, term + 1);
    assert!(matches!(
        begin_fenced(&pool, term).await,
        Err(StoreError::Fenced { .. })
    ));

    // A clean stop: a leader resigns, so no one waits out its lease. Every campaign stops; the
    // remaining one may take the lease the leader gave up an instant before its own stop, and
    // then resigns too: no lease runs on.
    stop.send(true).unwrap();
    for (_, _, task) in campaigns {
        let _ = task.await;
    }
    let last = leadership(&pool).await.unwrap().unwrap();
    assert!(last.term >= new_term, "{last:?}");
    assert!(last.valid_for_ms <= 0, "every leader resigned: {last:?}");
    pool.close().await;
}

/// A TCP proxy to the test server that can stop forwarding (a stalled connection: packets held,
/// nothing refused).
struct Proxy {
    port: u16,
    flowing: watch::Sender<bool>,
}

impl Proxy {
    async fn to(url: &str) -> Proxy {
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (flowing, watch) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(forward(cr, sw, watch.clone()));
                tokio::spawn(forward(sr, cw, watch.clone()));
            }
        });
        Proxy { port, flowing }
    }

    fn url(&self, url: &str) -> String {
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let (_, db) = url.rsplit_once('/').unwrap();
        format!(
            "postgres://{}@127.0.0.1:{}/{db}",
            options.get_username(),
            self.port
        )
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flowing.wait_for(|f| *f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_leader_whose_connection_stalls_steps_down_before_its_lease_ends_and_its_late_write_is_refused()
 {
    let Some(db) = Scratch::new().await else {
        return;
    };
    let direct = db.pool().await;
    sqlx::query("CREATE TABLE steps (step TEXT NOT NULL)")
        .execute(&direct)
        .await
        .unwrap();
    let proxy = Proxy::to(&db.url).await;
    let stalled_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&proxy.url(&db.url))
        .await
        .unwrap();
    let a = Candidate::new(stalled_pool.clone(), timing(3000));
    let a_id = a.id().to_string();
    let (stop, stopped) = watch::channel(false);
    let (mut a_role, _a_task) = a.campaign(stopped.clone());
    let term = match *a_role.wait_for(|r| *r != Role::Follower).await.unwrap() {
        Role::Leader { term } => term,
        Role::Follower => unreachable!(),
    };

    // The connection stalls: a steps down, and when it does its lease still runs.
    proxy.flowing.send(false).unwrap();
    a_role.wait_for(|r| *r == Role::Follower).await.unwrap();
    let lease = leadership(&direct).await.unwrap().unwrap();
    assert_eq!((lease.holder.as_str(), lease.term), (a_id.as_str(), term));
    assert!(
        lease.valid_for_ms > 0,
        "a stepped down only after its lease ended: {lease:?}"
    );

    // a's write, sent into the stalled connection, arrives after b took over.
    let wrote = Arc::new(AtomicBool::new(false));
    let late = {
        let (pool, wrote) = (stalled_pool.clone(), wrote.clone());
        tokio::spawn(async move {
            let mut tx = begin_fenced(&pool, term).await?;
            sqlx::query("INSERT INTO steps VALUES ('late')")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            wrote.store(true, Ordering::SeqCst);
            Ok::<_, StoreError>(())
        })
    };
    let b = Candidate::new(direct.clone(), timing(3000));
    let (b_role, _b_task) = b.campaign(stopped.clone());
    let mut b_role = b_role;
    let b_term = match *b_role.wait_for(|r| *r != Role::Follower).await.unwrap() {
        Role::Leader { term } => term,
        Role::Follower => unreachable!(),
    };
    assert_eq!(b_term, term + 1);
    proxy.flowing.send(true).unwrap();
    match late.await.unwrap() {
        Err(StoreError::Fenced { mine, current }) => assert_eq!((mine, current), (term, b_term)),
        other => panic!("the deposed leader's late write was not fenced: {other:?}"),
    }
    assert!(!wrote.load(Ordering::SeqCst));
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM steps")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(steps, 0);
    stop.send(true).unwrap();
    stalled_pool.close().await;
    direct.close().await;
}
