//! The connection manager through a real OpenSSH sshd: TCP and Unix endpoints, connection ids
//! over the tunnel, health when the sshd sessions are killed and when PostgreSQL restarts behind
//! the bastion (no stale connection handed out), shutdown that leaves nothing behind.

mod manager_support;

use std::time::Duration;

use manager_support::*;
use sea_orm::{ConnectionTrait, TransactionTrait};
use sea_orm_tunnel::config::{BackoffPolicy, Config, LocalEndpointConfig};
use sea_orm_tunnel::manager::{ConnectionManager, HealthEvent, TunnelHealth};
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::TunnelState;

fn config(pg: &TempPostgres, sshd: &OpenSshd, prefix: &str) -> Config {
    let tunnel = sshd
        .tunnel_config("127.0.0.1", pg.port())
        .keepalive_interval(Duration::from_millis(500))
        .keepalive_max(2)
        .reconnect(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_secs(1)));
    Config::new(pg.url())
        .tunnel(tunnel)
        .map_pool(|p| {
            p.max_connections(4)
                .acquire_timeout(Duration::from_secs(3))
                .connect_timeout(Duration::from_secs(3))
                .application_name(prefix)
        })
        .map_health(|h| {
            h.interval(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .recheck(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_millis(500)))
        })
}

async fn select_one(db: &impl ConnectionTrait) -> Result<i32, sea_orm::DbErr> {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), "SELECT 1"))
        .await?
        .expect("a row");
    row.try_get_by_index(0)
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
    let mut restart_events = manager.subscribe_health();
    pg.restart().await.unwrap();
    wait_event(&mut restart_events, "a failed check after the restart", |e| {
        matches!(e, HealthEvent::HealthCheckFailed(_))
    })
    .await;
    let back = wait_event(&mut restart_events, "a healthy check after the restart", |e| {
        e.status().healthy
    })
    .await;
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
