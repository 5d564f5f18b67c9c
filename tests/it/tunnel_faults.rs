//! The SSH tunnel under faults: killed sessions, a silent link, sshd down and back, giving up,
//! and a bastion that refuses the forwarding channel.

use std::time::{Duration, Instant};

use super::support::*;
use sea_orm_tunnel::config::{BackoffPolicy, HostKeyPolicy, TunnelConfig};
use sea_orm_tunnel::testkit::{Bastion, FaultProxy, OpenSshd, TempPostgres};
use sea_orm_tunnel::tunnel::{SshTunnel, TunnelEvent, TunnelState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_killed_mid_query_fail_that_query_then_the_tunnel_reconnects_on_the_same_endpoint() {
    let (pg, sshd) = servers().await;
    let tunnel = SshTunnel::connect(config(&sshd, &pg)).await.unwrap();
    let endpoint = tunnel.local_endpoint().clone();
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &pg), 2).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);
    assert!(tunnel.last_reconnect_at().is_none());

    let slow = {
        let db = db.clone();
        tokio::spawn(async move {
            use sea_orm::ConnectionTrait;
            db.execute_unprepared("SELECT pg_sleep(5)").await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    assert!(sshd.drop_sessions() > 0);

    let err = tokio::time::timeout(LIVENESS, slow)
        .await
        .expect("the query in flight ends promptly")
        .unwrap()
        .expect_err("the query in flight dies with its session");
    assert!(
        killed_at.elapsed() < Duration::from_secs(4),
        "failed fast, not after pg_sleep: {:?}",
        killed_at.elapsed()
    );
    assert!(
        sea_orm_tunnel::error::db_err_is_transient(&err),
        "a lost link is a transient connection error: {err}"
    );

    let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
    eprintln!("lost: {ev:?}");
    let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Connected { .. })).await;
    assert!(matches!(ev, TunnelEvent::Connected { reconnect: true, .. }), "{ev:?}");
    assert!(tunnel.is_connected());
    let reconnected_at = tunnel.last_reconnect_at().expect("reconnect instant recorded");
    assert!(reconnected_at >= killed_at);
    assert_eq!(tunnel.stats().reconnects, 1);
    assert_eq!(tunnel.local_endpoint(), &endpoint, "the endpoint never moves");

    // The next query succeeds on the new session (the pool replaces its dead connections).
    let v = tokio::time::timeout(LIVENESS, select(&db, 2))
        .await
        .expect("query finishes");
    assert_eq!(v.expect("query after the reconnect succeeds"), 2);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

/// A tunnel that reaches sshd through `proxy`, with the given keepalive. known_hosts names sshd's
/// own port, so the proxy's port is pinned by fingerprint instead.
fn through_proxy(
    sshd: &OpenSshd,
    pg: &TempPostgres,
    proxy: &FaultProxy,
    keepalive_interval: Duration,
    keepalive_max: usize,
) -> TunnelConfig {
    config(sshd, pg)
        .port(proxy.addr().port())
        .host_key_policy(HostKeyPolicy::Fingerprint(sshd.host_key_fingerprint()))
        .keepalive_interval(keepalive_interval)
        .keepalive_max(keepalive_max)
        .connect_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_is_detected_by_keepalive_and_recovers_when_restored() {
    let (pg, sshd) = servers().await;
    let proxy = FaultProxy::start(sshd.addr()).await.unwrap();
    let interval = Duration::from_millis(500);
    let keepalive_max = 2;
    let tunnel = SshTunnel::connect(through_proxy(&sshd, &pg, &proxy, interval, keepalive_max))
        .await
        .unwrap();
    let db = pool(&url_via(&tunnel, &pg), 1).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);
    let mut events = tunnel.subscribe();

    proxy.blackhole();
    let started = Instant::now();
    let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
    let detected = started.elapsed();
    eprintln!("blackhole detected after {detected:?}: {ev:?}");
    let bound = interval * keepalive_max as u32 + Duration::from_secs(2);
    assert!(detected <= bound, "detection took {detected:?}, bound {bound:?}");
    assert!(!tunnel.is_connected());
    match ev {
        TunnelEvent::Disconnected { reason, .. } => assert!(reason.contains("keepalive"), "{reason}"),
        _ => unreachable!(),
    }

    proxy.restore();
    wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Connected { reconnect: true, .. })
    })
    .await;
    let v = tokio::time::timeout(LIVENESS, select(&db, 3))
        .await
        .expect("query finishes");
    assert_eq!(v.unwrap(), 3);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_down_then_up_reconnects_with_growing_delays() {
    let (pg, sshd) = servers().await;
    let tunnel = SshTunnel::connect(
        config(&sshd, &pg).reconnect(BackoffPolicy::new(Duration::from_millis(100)).factor(2.0).jitter(0.0)),
    )
    .await
    .unwrap();
    let endpoint = tunnel.local_endpoint().clone();
    let mut events = tunnel.subscribe();
    sshd.stop().await.unwrap();

    let mut delays = Vec::new();
    while delays.len() < 5 {
        match wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Reconnecting { .. })).await {
            TunnelEvent::Reconnecting { attempt, delay, .. } => {
                assert_eq!(attempt as usize, delays.len() + 1);
                delays.push(delay);
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(delays[0], Duration::ZERO, "the first attempt is immediate");
    assert!(
        delays[1..].windows(2).all(|w| w[1] > w[0]),
        "retry delays grow: {delays:?}"
    );
    assert!(matches!(*tunnel.state().borrow(), TunnelState::Reconnecting { .. }));
    assert!(!tunnel.is_connected());

    sshd.start_again().await.unwrap();
    wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Connected { reconnect: true, .. })
    })
    .await;
    assert!(tunnel.is_connected());
    assert_eq!(tunnel.local_endpoint(), &endpoint);
    let db = pool(&url_via(&tunnel, &pg), 1).await;
    assert_eq!(select(&db, 4).await.unwrap(), 4);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_leave_the_tunnel_failed_with_the_last_error() {
    let (pg, sshd) = servers().await;
    let tunnel = SshTunnel::connect(
        config(&sshd, &pg).reconnect(BackoffPolicy::new(Duration::from_millis(50)).jitter(0.0).max_retries(2)),
    )
    .await
    .unwrap();
    let mut events = tunnel.subscribe();
    sshd.stop().await.unwrap();

    let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Failed { .. })).await;
    let TunnelEvent::Failed { error } = ev else {
        unreachable!()
    };
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains(&sshd.port().to_string()),
        "the last error names the bastion: {error}"
    );
    match &*tunnel.state().borrow() {
        TunnelState::Failed { error } => {
            assert!(matches!(**error, sea_orm_tunnel::Error::SshConnect { .. }), "{error}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // While it stays down, asking again fails with an error, not a hang.
    assert!(
        tokio::time::timeout(LIVENESS, tunnel.ensure_connected())
            .await
            .unwrap()
            .is_err()
    );
    // Back up: ensure_connected starts a new round and succeeds.
    sshd.start_again().await.unwrap();
    tokio::time::timeout(LIVENESS, tunnel.ensure_connected())
        .await
        .unwrap()
        .expect("reconnects on demand after giving up");
    assert!(tunnel.is_connected());
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administratively_prohibited_channel_is_a_permanent_channel_error() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = Bastion::generate_client_key(dir.path()).unwrap();
    let echo = echo_server().await;
    // The bastion permits another port only, like a PermitOpen that does not list ours.
    let bastion = Bastion::builder()
        .authorize_key(public)
        .allow_target("127.0.0.1", echo.port().wrapping_add(1).max(1))
        .start()
        .await
        .unwrap();
    let known_hosts = dir.path().join("known_hosts");
    bastion.write_known_hosts(&known_hosts).unwrap();
    let config = sea_orm_tunnel::config::TunnelConfig::new("127.0.0.1", bastion.user())
        .port(bastion.port())
        .auth(sea_orm_tunnel::config::AuthConfig::key_file(&key))
        .known_hosts(&known_hosts)
        .remote("127.0.0.1", echo.port());
    let tunnel = SshTunnel::connect(config).await.unwrap();
    let mut events = tunnel.subscribe();
    let mut local = tokio::net::TcpStream::connect(tunnel.local_endpoint().tcp_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(LIVENESS, local.read(&mut buf)).await.unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "refused channel closes the local connection"
    );
    let ev = wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::ChannelOpenFailed { .. })
    })
    .await;
    match ev {
        TunnelEvent::ChannelOpenFailed { reason, permanent } => {
            assert!(permanent, "administratively prohibited is permanent");
            assert!(reason.contains("administratively prohibited"), "{reason}");
        }
        _ => unreachable!(),
    }
    assert_eq!(tunnel.stats().channel_open_failures, 1);
    let last = tunnel.last_error().expect("recorded");
    assert!(!last.is_transient(), "{last}");
    // The SSH session itself is fine.
    assert!(tunnel.is_connected());
    tunnel.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sshd_session_is_declared_dead_and_replaced() {
    let (pg, sshd) = servers().await;
    let tunnel = SshTunnel::connect(
        config(&sshd, &pg)
            .keepalive_interval(Duration::from_millis(500))
            .keepalive_max(2),
    )
    .await
    .unwrap();
    let mut events = tunnel.subscribe();
    let db = pool(&url_via(&tunnel, &pg), 1).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);
    let frozen = sshd.pause_sessions();
    assert!(frozen > 0);
    let started = Instant::now();
    wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
    assert!(started.elapsed() <= Duration::from_secs(3), "{:?}", started.elapsed());
    // New sessions are served by the (still running) listener.
    wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Connected { reconnect: true, .. })
    })
    .await;
    let v = tokio::time::timeout(LIVENESS, select(&db, 9))
        .await
        .expect("query finishes");
    assert_eq!(v.unwrap(), 9);
    sshd.resume_sessions();
    db.close().await.unwrap();
    tunnel.disconnect().await;
}

/// A connection that arrives while no session is up waits for the reconnect instead
/// of being accepted and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_arriving_during_an_outage_waits_for_the_reconnect() {
    let sshd = sea_orm_tunnel::testkit::OpenSshd::start().await.unwrap();
    let echo = echo_server().await;
    let tunnel = SshTunnel::connect(
        sshd.tunnel_config("127.0.0.1", echo.port())
            .connect_timeout(Duration::from_secs(15))
            .reconnect(
                BackoffPolicy::new(Duration::from_millis(200))
                    .jitter(0.0)
                    .max_delay(Duration::from_millis(400)),
            ),
    )
    .await
    .unwrap();
    let addr = tunnel.local_endpoint().tcp_addr().unwrap();
    let mut events = tunnel.subscribe();
    sshd.stop().await.unwrap();
    wait_event(&mut events, LIVENESS, |e| {
        matches!(e, TunnelEvent::Reconnecting { attempt: 2, .. })
    })
    .await;
    assert!(!tunnel.is_connected());

    let client = tokio::spawn(echo_roundtrip(addr, b"waited for the bastion".to_vec()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!client.is_finished(), "the connection is held, not dropped");
    sshd.start_again().await.unwrap();
    tokio::time::timeout(LIVENESS, client)
        .await
        .expect("served after the reconnect")
        .expect("echo intact");
    assert_eq!(tunnel.stats().refused_connections, 0);
    tunnel.disconnect().await;
}

/// Three blackhole -> detect -> restore -> reconnect rounds on one tunnel: every session a
/// reconnect creates is watched by its own keepalive monitor, and whoever reacts to
/// `Disconnected` already sees the tunnel as down (the comparison harness once waited for
/// `Connected` right after the event, got the stale state, blackholed again while the
/// reconnect was in flight, and no session was left to be declared dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_blackholes_in_a_row_are_each_detected_and_recovered() {
    let (pg, sshd) = servers().await;
    let proxy = FaultProxy::start(sshd.addr()).await.unwrap();
    let interval = Duration::from_millis(300);
    let keepalive_max = 2;
    let tunnel = SshTunnel::connect(
        through_proxy(&sshd, &pg, &proxy, interval, keepalive_max).reconnect(
            BackoffPolicy::new(Duration::from_millis(100))
                .jitter(0.0)
                .max_delay(Duration::from_millis(500)),
        ),
    )
    .await
    .unwrap();
    let db = pool(&url_via(&tunnel, &pg), 1).await;
    assert_eq!(select(&db, 1).await.unwrap(), 1);

    let bound = interval * keepalive_max as u32 + Duration::from_secs(2);
    let mut sessions = Vec::new();
    for round in 1..=3 {
        let mut events = tunnel.subscribe();
        proxy.blackhole();
        let started = Instant::now();
        let ev = wait_event(&mut events, LIVENESS, |e| matches!(e, TunnelEvent::Disconnected { .. })).await;
        let detected = started.elapsed();
        // Checked right at the event, as a reacting caller would.
        let state_at_event = tunnel.state().borrow().clone();
        eprintln!("round {round}: detected after {detected:?}: {ev:?}");
        assert!(
            !state_at_event.is_connected(),
            "round {round}: the state still said Connected when Disconnected arrived"
        );
        assert!(!tunnel.is_connected());
        assert!(
            detected <= bound,
            "round {round}: detection took {detected:?}, bound {bound:?}"
        );
        match ev {
            TunnelEvent::Disconnected { session, reason, .. } => {
                assert!(reason.contains("keepalive"), "{reason}");
                sessions.push(session);
            }
            _ => unreachable!(),
        }

        proxy.restore();
        let mut state = tunnel.state();
        tokio::time::timeout(LIVENESS, state.wait_for(|s| s.is_connected()))
            .await
            .unwrap_or_else(|_| panic!("round {round}: not reconnected"))
            .unwrap();
        let v = tokio::time::timeout(LIVENESS, select(&db, round))
            .await
            .expect("query finishes");
        assert_eq!(v.unwrap(), round, "round {round}: query after the reconnect");
    }
    // A different session died each time: each was a fresh one from a reconnect.
    sessions.dedup();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert_eq!(tunnel.stats().reconnects, 3);
    db.close().await.unwrap();
    tunnel.disconnect().await;
}
