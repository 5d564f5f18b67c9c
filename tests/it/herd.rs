//! Herd safety: many replicas that lose one bastion together come back without trampling it.
//!
//! sshd's `MaxStartups start:rate:full` drops new unauthenticated connections at random once
//! `start` are pending, and all of them at `full`. Twenty managers whose sessions all die in the
//! same instant must each serve again: the first reconnect attempt is spread, and a connection
//! sshd dropped is a transient error that is retried, never a permanent failure.

use std::time::{Duration, Instant};

use super::support::*;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};

const MANAGERS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_managers_all_serve_again_after_a_common_drop_under_max_startups() {
    let (pg, sshd) = tokio::join!(
        TempPostgres::start(),
        OpenSshd::builder().config_line("MaxStartups 3:50:6").start()
    );
    let (pg, sshd) = (pg.unwrap(), sshd.unwrap());

    // Production-like reconnect: 1 s first delay with 20 % jitter, retried forever
    // (SSH_MAX_RETRIES=0); the managers are started one by one, as replicas of a rollout are.
    let mut managers = Vec::new();
    for i in 0..MANAGERS {
        let tunnel = sshd
            .tunnel_config("127.0.0.1", pg.port())
            .keepalive_interval(Duration::from_secs(1))
            .keepalive_max(2)
            .connect_timeout(Duration::from_secs(10))
            .reconnect(
                BackoffPolicy::new(Duration::from_secs(1))
                    .max_delay(Duration::from_secs(5))
                    .jitter(0.2)
                    .max_retries(0),
            );
        let config = fast_config(pg.url(), &format!("herd{i}"))
            .map_pool(|p| p.max_connections(2))
            .tunnel(tunnel);
        managers.push(ConnectionManager::new(config).await.expect("a manager starts"));
    }
    for m in &managers {
        select_one(m.connection()).await.expect("serves before the drop");
    }

    let dropped = sshd.drop_sessions();
    assert!(dropped >= MANAGERS, "every manager had a session: {dropped}");
    let start = Instant::now();
    let mut back = vec![None; MANAGERS];
    while back.iter().any(Option::is_none) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not every manager serves again 30 s after the drop: {} of {MANAGERS} back; sshd log:\n{}",
            back.iter().filter(|b| b.is_some()).count(),
            std::fs::read_to_string(sshd.log_path()).unwrap_or_default()
        );
        for i in 0..MANAGERS {
            if back[i].is_none() && serves(&managers[i]).await {
                back[i] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(sshd.log_path()).unwrap_or_default();
    let drops = log.matches("past MaxStartups").count();
    let slowest = back.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("all {MANAGERS} managers serve again {slowest:?} after the drop; sshd dropped {drops} connections");
    for m in managers {
        assert!(m.tunnel().unwrap().stats().reconnects >= 1, "it reconnected");
        m.shutdown(Duration::from_secs(2)).await;
    }
}

/// Whether one query through `manager` succeeds within 2 s.
async fn serves(manager: &ConnectionManager) -> bool {
    tokio::time::timeout(Duration::from_secs(2), select_one(manager.connection()))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A connection sshd drops because too many are pending is retried, not a permanent failure: with
/// `MaxStartups 1:100:1` and one unauthenticated connection held open, every new connection is
/// dropped; the tunnel keeps retrying and connects once the holder goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_past_max_startups_is_retried() {
    let (pg, sshd) = tokio::join!(
        TempPostgres::start(),
        OpenSshd::builder().config_line("MaxStartups 1:100:1").start()
    );
    let (pg, sshd) = (pg.unwrap(), sshd.unwrap());
    // Pending (unauthenticated) until LoginGraceTime: it fills MaxStartups.
    let holder = tokio::net::TcpStream::connect(sshd.addr()).await.unwrap();
    let log_has_drop = || {
        std::fs::read_to_string(sshd.log_path())
            .unwrap_or_default()
            .contains("past MaxStartups")
    };

    let tunnel = sshd.tunnel_config("127.0.0.1", pg.port()).reconnect(
        BackoffPolicy::new(Duration::from_millis(100))
            .max_delay(Duration::from_millis(200))
            .max_retries(0),
    );
    let connect = tokio::spawn(sea_orm_tunnel::tunnel::SshTunnel::connect(tunnel));
    let start = Instant::now();
    while !log_has_drop() {
        assert!(
            start.elapsed() < Duration::from_secs(20) && !connect.is_finished(),
            "sshd did not drop our connection past MaxStartups; sshd log:\n{}",
            std::fs::read_to_string(sshd.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!connect.is_finished(), "a dropped connection is retried, not a failure");
    drop(holder);
    let tunnel = tokio::time::timeout(Duration::from_secs(20), connect)
        .await
        .expect("connects once MaxStartups has room")
        .unwrap()
        .expect("the tunnel connects");
    let url = url_via(&tunnel, &pg);
    let db = sea_orm::Database::connect(url).await.unwrap();
    assert_eq!(select_one(&db).await.unwrap(), 1);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}
