//! The connection manager through a real OpenSSH sshd: TCP and Unix endpoints, connection ids
//! over the tunnel, health when the sshd sessions are killed and when PostgreSQL restarts behind
//! the bastion (no stale connection handed out), shutdown that leaves nothing behind.

use std::time::Duration;

use super::support::*;
use sea_orm::{ConnectionTrait, TransactionTrait};
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{BackoffPolicy, Config, LocalEndpointConfig};
use sea_orm_tunnel::manager::{ConnectionManager, HealthEvent, TunnelHealth};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};
use sea_orm_tunnel::tunnel::{TunnelEvent, TunnelState};

fn config(pg: &TempPostgres, sshd: &OpenSshd, prefix: &str) -> Config {
    let tunnel = sshd
        .tunnel_config("127.0.0.1", pg.port())
        .keepalive_interval(Duration::from_millis(500))
        .keepalive_max(2)
        .reconnect(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_secs(1)));
    fast_config(pg.url(), prefix).tunnel(tunnel)
}

async fn hold(db: &sea_orm::DatabaseConnection, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        let txn = db.begin().await.unwrap();
        txn.execute_unprepared("SELECT 1").await.unwrap();
        held.push(txn);
    }
    for txn in held {
        txn.commit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_go_through_the_tunnel_on_tcp_and_unix_endpoints() {
    let pg = TempPostgres::start().await.unwrap();
    let sshd = OpenSshd::start().await.unwrap();
    let check = checker(&pg.url()).await;

    let manager = ConnectionManager::new(config(&pg, &sshd, "tun")).await.unwrap();
    let tunnel = manager.tunnel().expect("a tunnel");
    let local = tunnel.local_endpoint().tcp_addr().expect("a TCP endpoint");
    assert_eq!(manager.status().tunnel, TunnelHealth::Up);
    hold(manager.connection(), 3).await;
    // The server sees our ids, coming from the bastion.
    let ids = backends(&check, "tun").await;
    assert!(ids.len() >= 3, "{ids:?}");
    assert!(tunnel.stats().connections_total >= 3);
    // The options for a pool of one's own point at the same local endpoint.
    let options = manager.connect_options();
    assert!(options.get_url().contains(&local.to_string()), "points at the tunnel");
    let own = sea_orm::Database::connect(options).await.unwrap();
    select_one(&own).await.unwrap();
    let own_id: String = scalar(&own, "SHOW application_name").await;
    assert!(
        own_id.starts_with("tun-") && !ids.contains(&own_id),
        "{own_id} continues the sequence"
    );
    own.close().await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;

    // The private Unix socket endpoint.
    let cfg = config(&pg, &sshd, "tunx").map_tunnel(|t| t.local(LocalEndpointConfig::Unix));
    let manager = ConnectionManager::new(cfg).await.unwrap();
    let dir = manager
        .tunnel()
        .unwrap()
        .local_endpoint()
        .unix_dir()
        .unwrap()
        .to_path_buf();
    assert!(manager.connect_options().get_url().contains("host="));
    hold(manager.connection(), 2).await;
    assert!(backends(&check, "tunx").await.len() >= 2);
    manager.shutdown(Duration::from_secs(2)).await;
    assert!(!dir.exists(), "socket dir removed at shutdown");
    eventually("no backend of ours", || async {
        backends(&check, "tunx").await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_killed_ssh_sessions_and_a_postgres_restart_without_stale_connections() {
    let pg = TempPostgres::start().await.unwrap();
    let sshd = OpenSshd::start().await.unwrap();
    let manager = ConnectionManager::new(config(&pg, &sshd, "heal")).await.unwrap();
    let db = manager.connection().clone();
    let mut health = manager.health();
    let mut events = manager.subscribe_health();
    hold(&db, 4).await;
    eventually("four idle connections", || async { manager.stats().idle >= 4 }).await;
    let tunnel = manager.tunnel().unwrap().clone();
    assert!(tunnel.last_reconnect_at().is_none());

    // 1. The bastion kills every session. As soon as the tunnel is back, queries work: the four
    //    pooled connections from before are never handed out (no waiting for a health check).
    assert!(sshd.drop_sessions() > 0);
    let mut state = tunnel.state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| s.is_connected() && tunnel.last_reconnect_at().is_some()),
    )
    .await
    .expect("reconnected")
    .unwrap();
    for _ in 0..8 {
        select_one(&db)
            .await
            .expect("no stale connection right after the reconnect");
    }
    // Unhealthy at once (tunnel down), then healthy again.
    wait_health(&mut health, "healthy again after the sessions were killed", |s| {
        s.healthy
    })
    .await;
    let mut saw_tunnel_down = false;
    while let Ok(e) = events.try_recv() {
        if let HealthEvent::HealthCheckFailed(s) = e {
            saw_tunnel_down |= s.tunnel == TunnelHealth::Down;
        }
    }
    assert!(saw_tunnel_down, "the dropped tunnel was reported");
    // Pooled connections from before the reconnect are never handed out.
    for _ in 0..20 {
        select_one(&db).await.expect("no stale connection after the reconnect");
    }
    hold(&db, 4).await;
    let stats = manager.stats();
    assert!(stats.rejected_stale >= 1, "{stats:?}");
    assert!(tunnel.stats().reconnects >= 1);

    // 2. PostgreSQL restarts behind the bastion, with connections idle in the pool.
    eventually("idle connections", || async { manager.stats().idle >= 2 }).await;
    let back = restart_and_wait_for_health(&manager, &pg).await;
    assert_eq!(back.status().tunnel, TunnelHealth::Up);
    for _ in 0..20 {
        select_one(&db).await.expect("no stale connection after the restart");
    }
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_through_the_tunnel_forces_held_connections_and_disconnects() {
    let pg = TempPostgres::start().await.unwrap();
    let sshd = OpenSshd::start().await.unwrap();
    let check = checker(&pg.url()).await;
    let manager = ConnectionManager::new(config(&pg, &sshd, "tshut")).await.unwrap();
    let tunnel = manager.tunnel().unwrap().clone();

    let held = manager.begin().await.unwrap();
    held.execute_unprepared("SELECT 1").await.unwrap();
    hold(manager.connection(), 2).await;
    let report = manager.shutdown(Duration::from_millis(500)).await;
    assert_eq!(report.forced, 1, "{report:?}");
    assert!(report.duration < PATIENCE);
    assert!(matches!(*tunnel.state().borrow(), TunnelState::Disconnected));
    eventually("no backend of ours", || async {
        backends(&check, "tshut").await.is_empty()
    })
    .await;
    assert!(held.execute_unprepared("SELECT 1").await.is_err());
    assert_eq!(manager.shutdown(Duration::from_secs(5)).await, report);
}

/// Collects the tunnel's `Reconnecting` attempts (number, announced delay, instant seen) until
/// `Failed`, whose instant is returned too.
async fn one_round(
    events: &mut tokio::sync::broadcast::Receiver<TunnelEvent>,
) -> (Vec<(u32, Duration, std::time::Instant)>, std::time::Instant) {
    let mut attempts = Vec::new();
    let failed_at = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(TunnelEvent::Reconnecting { attempt, delay, .. }) => {
                    attempts.push((attempt, delay, std::time::Instant::now()))
                }
                Ok(TunnelEvent::Failed { .. }) => return std::time::Instant::now(),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("tunnel events: {e}"),
            }
        }
    })
    .await
    .expect("the round of reconnect attempts ends in Failed");
    (attempts, failed_at)
}

/// The real waits of a round: event *n* announces attempt *n* and is sent before its delay,
/// so the wait before attempt *n* is the time from event *n* to event *n + 1* (or `Failed`),
/// minus attempt *n*'s own connect time (a refused TCP connect: microseconds).
fn real_waits(
    attempts: &[(u32, Duration, std::time::Instant)],
    failed_at: std::time::Instant,
) -> Vec<(Duration, Duration)> {
    attempts
        .iter()
        .enumerate()
        .map(|(i, (_, announced, seen))| {
            let next = attempts.get(i + 1).map_or(failed_at, |a| a.2);
            (*announced, next - *seen)
        })
        .collect()
}

/// The health loop used to wake the supervisor on every `Reconnecting` state change, so with a
/// manager attached the attempts ran back to back (ignoring the backoff), and after `Failed` it
/// started a new round at once (so `max_retries` never took effect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_loop_keeps_the_reconnect_backoff_and_retry_limit() {
    let pg = TempPostgres::start().await.unwrap();
    let sshd = OpenSshd::start().await.unwrap();
    let max_delay = Duration::from_millis(1600);
    let cfg = config(&pg, &sshd, "pace").map_tunnel(|t| {
        t.reconnect(
            BackoffPolicy::new(Duration::from_millis(200))
                .factor(2.0)
                .jitter(0.0)
                .max_delay(max_delay)
                .max_retries(4),
        )
    });
    let manager = ConnectionManager::new(cfg).await.unwrap();
    let tunnel = manager.tunnel().unwrap().clone();
    let mut events = tunnel.subscribe();
    let mut health = manager.health();

    sshd.stop().await.unwrap();
    let (attempts, failed_at) = one_round(&mut events).await;
    let numbers: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5], "one attempt plus max_retries retries");
    let waits = real_waits(&attempts, failed_at);
    eprintln!("(announced delay, real wait) per attempt: {waits:?}");
    let announced: Vec<u64> = waits.iter().map(|w| w.0.as_millis() as u64).collect();
    assert_eq!(announced, [0, 200, 400, 800, 1600]);
    for (announced, real) in &waits {
        // Event delivery jitter only; before the fix the real waits were all ~0.
        assert!(
            *real + Duration::from_millis(60) >= *announced,
            "an attempt came before its backoff delay: {waits:?}"
        );
    }
    assert!(
        waits[1..].windows(2).all(|w| w[1].1 > w[0].1),
        "real delays grow: {waits:?}"
    );
    assert!(matches!(*tunnel.state().borrow(), TunnelState::Failed { .. }));
    let status = wait_health(&mut health, "unhealthy after the tunnel gave up", |s| !s.healthy).await;
    assert_eq!(status.tunnel, TunnelHealth::Down, "{status:?}");

    // The tunnel starts a new round on its own (health checks do not), but not sooner than
    // reconnect.max_delay after it gave up, and that round keeps the same schedule and limit.
    let (second, second_failed_at) = one_round(&mut events).await;
    let numbers: Vec<u32> = second.iter().map(|a| a.0).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5], "the next round has the same limit");
    let pause = second[0].2 - failed_at;
    eprintln!("pause before the manager's next round: {pause:?}");
    assert!(
        pause + Duration::from_millis(100) >= max_delay,
        "a new round came {pause:?} after giving up (at most one per {max_delay:?})"
    );
    let round = second_failed_at - second[0].2;
    assert!(
        round >= Duration::from_millis(2900),
        "the second round kept its backoff: {round:?}"
    );
    assert!(!manager.status().healthy);

    // Back up: the tunnel's next round reconnects, and queries work again.
    sshd.start_again().await.unwrap();
    wait_health(&mut health, "healthy after sshd is back", |s| s.healthy).await;
    select_one(manager.connection()).await.unwrap();
    manager.shutdown(Duration::from_secs(2)).await;
}

/// A refused channel closes the local socket; the driver sees an I/O error, which looks
/// transient. The manager must return the permanent cause after one attempt instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administratively_refused_channel_is_returned_at_once_as_a_permanent_error() {
    let sandbox = sea_orm_tunnel::testkit::Sandbox::start().await.unwrap();
    let cfg = sandbox
        .config()
        .map_pool(|p| p.max_connections(4).application_name("refused"));
    let manager = ConnectionManager::new(cfg).await.unwrap();
    sandbox.bastion().refuse_channels(true);

    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let policy = BackoffPolicy::new(Duration::from_millis(500))
        .jitter(0.0)
        .max_retries(5);
    let started = std::time::Instant::now();
    let result = {
        let attempts = attempts.clone();
        manager
            .retry_with(&policy, move |db| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    // Two at once: at least one needs a new connection, so a new channel.
                    let a = db.begin().await?;
                    let b = db.begin().await?;
                    b.commit().await?;
                    a.commit().await
                }
            })
            .await
    };
    let took = started.elapsed();
    let error = result.expect_err("no channel, no new connection");
    eprintln!("after {took:?}: {error}");
    assert!(
        matches!(error, Error::ChannelRefused { transient: false, .. }),
        "the permanent cause, not an I/O error: {error:?}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains("administratively prohibited"), "{error}");
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 1, "no retry");
    // The policy would sleep 0.5 + 1 + 2 + 4 + 8 s before giving up.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(manager.tunnel().unwrap().permanent_error().is_some());

    // The bastion allows channels again: the next channel clears the refusal.
    sandbox.bastion().refuse_channels(false);
    manager
        .retry(|db| async move { select_one(&db).await })
        .await
        .expect("works once the bastion allows the channel");
    // Four at once need new connections, so new channels.
    hold(manager.connection(), 4).await;
    assert!(manager.tunnel().unwrap().permanent_error().is_none());
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_after_a_reconnect_is_a_permanent_error_for_retry_and_health() {
    let pg = TempPostgres::start().await.unwrap();
    let sshd = OpenSshd::start().await.unwrap();
    let manager = ConnectionManager::new(config(&pg, &sshd, "hkey")).await.unwrap();
    hold(manager.connection(), 2).await;
    let tunnel = manager.tunnel().unwrap().clone();
    let mut state = tunnel.state();

    // sshd comes back with another host key (its sessions die on the way).
    sshd.rotate_host_key().await.unwrap();
    let failed = tokio::time::timeout(PATIENCE, state.wait_for(|s| matches!(s, TunnelState::Failed { .. })))
        .await
        .expect("the tunnel gives up")
        .unwrap()
        .clone();
    let TunnelState::Failed { error } = failed else {
        unreachable!()
    };
    assert!(matches!(*error, Error::HostKeyChanged { .. }), "{error}");

    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let started = std::time::Instant::now();
    let result = {
        let attempts = attempts.clone();
        manager
            .retry_with(
                &BackoffPolicy::new(Duration::from_millis(500))
                    .jitter(0.0)
                    .max_retries(5),
                move |db| {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move { select_one(&db).await }
                },
            )
            .await
    };
    let error = result.expect_err("the tunnel is down for good");
    eprintln!("after {:?}: {error}", started.elapsed());
    match &error {
        Error::TunnelFailed(inner) => assert!(matches!(**inner, Error::HostKeyChanged { .. }), "{inner:?}"),
        other => panic!("expected TunnelFailed(HostKeyChanged), got {other:?}"),
    }
    assert!(!error.is_transient());
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 1, "no retry");
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut health = manager.health();
    let status = wait_health(&mut health, "unhealthy naming the host key", |s| {
        !s.healthy
            && s.error
                .as_deref()
                .is_some_and(|e| e.to_lowercase().contains("host key"))
    })
    .await;
    eprintln!("health: {:?}", status.error);
    // A manual check says the same, and does not start a reconnect round for a permanent error.
    let checked = manager.check_health().await;
    assert!(checked.error.unwrap().to_lowercase().contains("host key"));
    assert!(matches!(*tunnel.state().borrow(), TunnelState::Failed { .. }));
    manager.shutdown(Duration::from_secs(2)).await;
}
