//! The connection manager on a direct connection to a real PostgreSQL: session settings and
//! connection ids, pool limits, leak detection, metrics and events from ordinary use, health
//! through a restart and an outage, the retry helper, and shutdown under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::{ConnectionTrait, TransactionTrait};
use sea_orm_tunnel::config::{BackoffPolicy, Config, SessionSettings};
use sea_orm_tunnel::error::TimeoutKind;
use sea_orm_tunnel::manager::{ConnectionManager, HealthEvent, TunnelHealth};
use sea_orm_tunnel::observe::events::{AcquireTimeLayer, with_correlation_id};
use sea_orm_tunnel::testkit::{TempPostgres, fast_config};
use sea_orm_tunnel::{Error, Result};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// A configuration for tests: fast health checks and rechecks, short timeouts.
fn config(pg: &TempPostgres, prefix: &str) -> Config {
    fast_config(pg.url(), prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_and_connection_ids_show_in_pg_stat_activity() {
    let pg = TempPostgres::start().await.unwrap();
    let check = checker(&pg.url()).await;
    check.execute_unprepared("CREATE ROLE app_ro NOLOGIN").await.unwrap();

    let settings = SessionSettings::new()
        .role("app_ro")
        .statement_timeout(Duration::from_millis(1234))
        .idle_in_transaction_session_timeout(Duration::from_millis(5678))
        .read_only(true);
    let manager = ConnectionManager::new(config(&pg, "sess").session(settings))
        .await
        .unwrap();
    let db = manager.connection();

    let txn = db.begin().await.unwrap();
    let user: String = scalar(&txn, "SELECT current_user::text").await;
    let statement_timeout: String = scalar(&txn, "SHOW statement_timeout").await;
    let idle_tx: String = scalar(&txn, "SHOW idle_in_transaction_session_timeout").await;
    let read_only: String = scalar(&txn, "SHOW default_transaction_read_only").await;
    let app_name: String = scalar(&txn, "SHOW application_name").await;
    let pid: i32 = scalar(&txn, "SELECT pg_backend_pid()").await;
    assert_eq!(user, "app_ro");
    assert_eq!(statement_timeout, "1234ms");
    assert_eq!(idle_tx, "5678ms");
    assert_eq!(read_only, "on");
    // `sess-<tag>-<n>`: the manager's random tag, then the connection's number.
    let (tag, n) = app_name
        .strip_prefix("sess-")
        .and_then(|rest| rest.split_once('-'))
        .expect(&app_name);
    assert!(
        tag.len() == 6 && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{app_name}"
    );
    let n: u64 = n.parse().expect(&app_name);
    assert!(n >= 1);
    // The server sees the same id for the same backend.
    let seen: String = scalar(
        &check,
        &format!("SELECT application_name FROM pg_stat_activity WHERE pid = {pid}"),
    )
    .await;
    assert_eq!(seen, app_name);
    // Read-only is enforced.
    let err = txn.execute_unprepared("CREATE TABLE t (x int)").await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    drop(txn);

    // Several connections, reused ones among them: each has the settings and its own id.
    let held: Vec<_> = futures_join(db, 3).await;
    for txn in &held {
        let settings: String = scalar(
            txn,
            "SELECT concat_ws(',', current_user, current_setting('statement_timeout'), \
             current_setting('idle_in_transaction_session_timeout'), current_setting('default_transaction_read_only'))",
        )
        .await;
        assert_eq!(settings, "app_ro,1234ms,5678ms,on");
    }
    let ids = backends(&check, "sess").await;
    assert!(ids.len() >= 3, "{ids:?}");
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids are unique: {ids:?}");
    // Every one of them is a connection of the pool (a health probe may be opening one more).
    assert!(
        ids.len() as u32 <= manager.stats().size,
        "{ids:?} vs {:?}",
        manager.stats()
    );
    drop(held);

    // A role that does not exist is a permanent configuration problem, reported by `new`.
    let bad = SessionSettings::new().role("no_such_role");
    let started = Instant::now();
    let err = ConnectionManager::new(config(&pg, "bad").session(bad))
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("no_such_role"), "{err}");
    assert!(started.elapsed() < PATIENCE);

    manager.shutdown(Duration::from_secs(2)).await;
}

/// Checks out `n` connections at once (each inside its own open transaction).
async fn futures_join(db: &sea_orm::DatabaseConnection, n: usize) -> Vec<sea_orm::DatabaseTransaction> {
    let mut held = Vec::new();
    for _ in 0..n {
        let txn = db.begin().await.unwrap();
        txn.execute_unprepared("SELECT 1").await.unwrap();
        held.push(txn);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_limit_times_out_naming_the_limit_and_recovers() {
    let pg = TempPostgres::start().await.unwrap();
    let cfg = config(&pg, "limit").map_pool(|p| p.max_connections(2).acquire_timeout(Duration::from_millis(500)));
    let manager = ConnectionManager::new(cfg).await.unwrap();

    let a = manager.begin().await.unwrap();
    let b = manager.begin().await.unwrap();
    let err = manager.begin().await.unwrap_err();
    match &err {
        Error::Timeout {
            kind: TimeoutKind::Acquire,
            after,
            detail,
        } => {
            assert_eq!(*after, Duration::from_millis(500));
            assert!(detail.contains("pool max 2 connections"), "{detail}");
        }
        other => panic!("expected an acquire timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("pool max 2"), "{err}");
    assert!(err.is_transient());

    // A connection comes back: the pool serves again.
    a.rollback().await.unwrap();
    let c = manager.begin().await.unwrap();
    c.commit().await.unwrap();
    b.commit().await.unwrap();

    // Many more tasks than connections: all finish, nobody deadlocks.
    let done = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let db = manager.connection().clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                db.execute_unprepared("SELECT pg_sleep(0.002)").await.unwrap();
            }
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        tokio::time::timeout(PATIENCE, t).await.expect("no deadlock").unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 16);
    let stats = manager.stats();
    assert!(stats.size <= 2, "{stats:?}");
    assert_eq!(stats.max, 2);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn leak_detection_reports_a_held_connection_once_and_not_a_normal_one() {
    let recorder = Arc::new(TestMetrics::default());
    let _metrics = metrics::set_default_local_recorder(&*recorder);
    let log = Capture::default();
    let _tracing = tracing::subscriber::set_default(tracing_subscriber::registry().with(log.clone()));

    let pg = TempPostgres::start().await.unwrap();
    let cfg = config(&pg, "leak").map_pool(|p| p.leak_detection_threshold(Duration::from_millis(400)));
    let manager = ConnectionManager::new(cfg).await.unwrap();
    let db = manager.connection().clone();

    // Normal use: short checkouts, well under the threshold.
    for _ in 0..20 {
        select_one(&db).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(manager.stats().leaks_total, 0);
    assert!(log.named("connection_leaked").is_empty());

    // A request holds a connection for too long.
    let holder = with_correlation_id(
        "req-leaky",
        async {
            let txn = db.begin().await.unwrap();
            txn.execute_unprepared("SELECT 1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            txn.commit().await.unwrap();
        }
        .instrument(tracing::info_span!("slow_report")),
    );
    holder.await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let leaks = log.named("connection_leaked");
    assert_eq!(leaks.len(), 1, "reported once: {leaks:?}");
    let leak = &leaks[0];
    assert_eq!(leak.target, "sea_orm_tunnel::pool");
    assert_eq!(leak.field("correlation_id"), Some("req-leaky"));
    assert_eq!(leak.field("span"), Some("slow_report"));
    assert!(leak.field("connection_id").unwrap().starts_with("leak-"), "{leak:?}");
    assert_eq!(manager.stats().leaks_total, 1);
    assert_eq!(recorder.counter("db_connection_leaks_total{pool=default}"), 1);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn metrics_and_events_come_from_ordinary_seaorm_use() {
    let recorder = Arc::new(TestMetrics::default());
    let _metrics = metrics::set_default_local_recorder(&*recorder);
    let log = Capture::default();
    let _tracing = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(log.clone())
            .with(AcquireTimeLayer::new()),
    );
    sea_orm_tunnel::observe::metrics::describe_metrics();

    let pg = TempPostgres::start().await.unwrap();
    let cfg = config(&pg, "obs").map_pool(|p| p.max_lifetime(Duration::from_millis(1500)));
    let manager = ConnectionManager::new(cfg).await.unwrap();
    let db = manager.connection().clone();

    for _ in 0..10 {
        with_correlation_id("req-obs", select_one(&db)).await.unwrap();
    }
    // Outlive the (jittered) lifetime: the next release closes the connection.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    select_one(&db).await.unwrap();
    select_one(&db).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let acquire = recorder.histogram("db_connection_acquire_seconds{pool=default}");
    assert!(
        acquire.len() >= 12,
        "one sample per acquire: {} ({:?})",
        acquire.len(),
        recorder.keys()
    );
    assert!(acquire.iter().all(|s| *s >= 0.0 && *s < 60.0));
    let lifetimes = recorder.histogram("db_connection_lifetime_seconds{pool=default}");
    assert!(
        !lifetimes.is_empty(),
        "an expired connection was closed: {:?}",
        manager.stats()
    );
    assert!(lifetimes.iter().all(|s| *s >= 1.3), "{lifetimes:?}");
    assert!(recorder.counter("db_health_checks_total{pool=default}") >= 2);
    assert!(!recorder.histogram("db_health_check_seconds{pool=default}").is_empty());
    assert_eq!(recorder.gauge("db_pool_connections_max{pool=default}"), Some(4.0));
    assert!(recorder.gauge("db_pool_connections_idle{pool=default}").is_some());
    assert!(recorder.gauge("db_pool_connections_active{pool=default}").is_some());

    let acquired = log.named("connection_acquired");
    let released = log.named("connection_released");
    assert!(acquired.len() >= 12, "{}", acquired.len());
    assert!(released.len() >= 12, "{}", released.len());
    for e in acquired.iter().chain(&released) {
        assert!(
            e.field("connection_id").is_some_and(|id| id.starts_with("obs-")),
            "{e:?}"
        );
        assert!(
            e.field("pool_size").is_some_and(|n| n.parse::<u32>().unwrap() >= 1),
            "{e:?}"
        );
    }
    assert!(
        acquired.iter().any(|e| e.field("correlation_id") == Some("req-obs")),
        "{acquired:?}"
    );
    assert!(released.iter().any(|e| e.field("correlation_id") == Some("req-obs")));
    assert!(!log.named("health_check").is_empty());
    assert!(!log.named("connection_opened").is_empty());
    assert!(
        log.named("connection_closed")
            .iter()
            .any(|e| e.field("reason") == Some("expired"))
    );

    let stats = manager.stats();
    assert!(stats.rejected_expired >= 1, "{stats:?}");
    assert!(stats.acquired_total >= 12 && stats.released_total >= 12, "{stats:?}");
    // Hooks find their connection without asking the server: no event names an unknown one.
    for e in acquired.iter().chain(&released) {
        assert!(!e.field("connection_id").unwrap().ends_with("-?"), "{e:?}");
    }
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_a_restart_and_an_outage_and_no_stale_connection_is_handed_out() {
    let pg = TempPostgres::start().await.unwrap();
    let manager = ConnectionManager::new(config(&pg, "health")).await.unwrap();
    let db = manager.connection().clone();
    let mut health = manager.health();
    let mut events = manager.subscribe_health();

    let status = manager.status();
    assert!(status.healthy && status.database, "{status:?}");
    assert_eq!(status.tunnel, TunnelHealth::Direct);
    assert!(status.latency.is_some());
    assert!(status.error.is_none());

    // Connections idle in the pool when the server goes away (returns are asynchronous).
    drop(futures_join(&db, 3).await);
    eventually("three idle connections", || async { manager.stats().idle >= 3 }).await;

    // 1. A restart: the pooled connections die with it.
    let back = restart_and_wait_for_health(&manager, &pg).await;
    assert!(back.status().database);
    for _ in 0..20 {
        select_one(&db).await.expect("no stale connection after recovery");
    }
    assert!(manager.stats().rejected_stale >= 1, "{:?}", manager.stats());

    // 2. An outage of several seconds.
    drop(futures_join(&db, 3).await);
    eventually("three idle connections", || async { manager.stats().idle >= 3 }).await;
    pg.stop().await.unwrap();
    let down = wait_health(&mut health, "unhealthy while stopped", |s| !s.healthy).await;
    assert!(!down.database);
    assert!(
        down.error.as_deref().is_some_and(|e| e.starts_with("database")),
        "{down:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!manager.status().healthy);
    pg.start_again().await.unwrap();
    wait_health(&mut health, "healthy after the outage", |s| s.healthy).await;
    let txns = futures_join(&db, 4).await;
    drop(txns);
    for _ in 0..20 {
        select_one(&db).await.expect("no stale connection after the outage");
    }

    // The broadcast saw failures (with their own event) and successes.
    let mut failed = 0;
    let mut healthy = 0;
    while let Ok(e) = events.try_recv() {
        match e {
            HealthEvent::HealthCheckFailed(s) => {
                assert!(!s.healthy);
                failed += 1;
            }
            HealthEvent::HealthCheck(s) if s.healthy => healthy += 1,
            _ => {}
        }
    }
    assert!(failed >= 2, "{failed}");
    assert!(healthy >= 2, "{healthy}");
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_rides_out_a_restart_and_returns_a_permanent_error_at_once() {
    let pg = TempPostgres::start().await.unwrap();
    let cfg = config(&pg, "retry").recovery(
        BackoffPolicy::new(Duration::from_millis(200))
            .max_delay(Duration::from_secs(1))
            .max_retries(20)
            .max_elapsed(Duration::from_secs(40)),
    );
    let manager = ConnectionManager::new(cfg).await.unwrap();

    // Permanent: one attempt, the database error as is.
    let attempts = AtomicU32::new(0);
    let err = manager
        .retry(|db| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move { db.execute_unprepared("SELEC 1").await }
        })
        .await
        .unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(matches!(err, Error::Database(_)), "{err:?}");
    assert!(!err.is_transient());

    // Transient: the first attempt dies with a restart; a later one succeeds.
    drop(futures_join(manager.connection(), 3).await);
    let attempts = Arc::new(AtomicU32::new(0));
    let restarter = {
        let url = pg.url();
        let check = checker(&url).await;
        async move {
            // Restart once the first attempt is running its query.
            eventually("the first attempt running", || async {
                scalar::<i64>(
                    &check,
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'",
                )
                .await
                    > 0
            })
            .await;
            drop(check);
            pg.restart().await.unwrap();
            pg
        }
    };
    let counting = attempts.clone();
    let work = manager.retry(move |db| {
        let n = counting.fetch_add(1, Ordering::SeqCst);
        async move {
            let sql = if n == 0 { "SELECT pg_sleep(30)" } else { "SELECT 1" };
            db.execute_unprepared(sql).await.map(|_| n)
        }
    });
    let (result, _pg): (Result<u32>, TempPostgres) = tokio::join!(work, restarter);
    let last = result.expect("retried until the server was back");
    assert!(last >= 1, "succeeded on attempt {}", last + 1);
    assert_eq!(attempts.load(Ordering::SeqCst), last + 1);
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_drains_forces_the_rest_and_leaves_no_backend() {
    let pg = TempPostgres::start().await.unwrap();
    let manager = ConnectionManager::new(config(&pg, "shut")).await.unwrap();
    let check = checker(&pg.url()).await;

    // Load: short queries in a loop on three tasks, plus one request that never lets go.
    let mut load = Vec::new();
    for _ in 0..3 {
        let manager = manager.clone();
        load.push(tokio::spawn(async move {
            let mut ok = 0u32;
            while !manager.is_shutting_down() {
                if manager
                    .connection()
                    .execute_unprepared("SELECT pg_sleep(0.01)")
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let stuck = {
        let db = manager.connection().clone();
        tokio::spawn(async move {
            let txn = db.begin().await.unwrap();
            txn.execute_unprepared("SELECT 1").await.unwrap();
            // Held far past the drain deadline, then used: it must have been cut off.
            tokio::time::sleep(Duration::from_secs(8)).await;
            txn.execute_unprepared("SELECT 1").await
        })
    };
    eventually("connections in use", || async {
        backends(&check, "shut").await.len() >= 3
    })
    .await;

    let started = Instant::now();
    let report = manager.shutdown(Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(report.forced >= 1, "{report:?}");
    assert!(report.duration >= Duration::from_secs(1), "{report:?}");
    assert!(manager.is_shutting_down());

    // Idempotent: the same report, at once.
    assert_eq!(manager.shutdown(Duration::from_secs(30)).await, report);

    // Nothing of ours is left on the server.
    eventually("no backend of ours", || async {
        backends(&check, "shut").await.is_empty()
    })
    .await;

    // New work is refused.
    assert!(matches!(manager.begin().await, Err(Error::ShutDown(_))));
    assert!(matches!(
        manager
            .retry(|db| async move { db.execute_unprepared("SELECT 1").await })
            .await,
        Err(Error::ShutDown(_))
    ));
    assert!(select_one(manager.connection()).await.is_err());

    for t in load {
        let ok = tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
        assert!(ok > 0);
    }
    let held = tokio::time::timeout(PATIENCE, stuck).await.unwrap().unwrap();
    assert!(held.is_err(), "the forced connection was cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_log_gets_lifecycle_rows_including_an_outage_and_no_checkouts() {
    use sea_orm_tunnel_migration::{Migrator, MigratorTrait};

    let pg = TempPostgres::start().await.unwrap();
    let check = checker(&pg.url()).await;
    Migrator::up(&check, None).await.unwrap();

    let manager = ConnectionManager::new(config(&pg, "clog").log_to_db(true))
        .await
        .unwrap();
    let mut health = manager.health();
    drop(futures_join(manager.connection(), 3).await);
    for _ in 0..20 {
        select_one(manager.connection()).await.unwrap();
    }

    pg.stop().await.unwrap();
    wait_health(&mut health, "unhealthy while stopped", |s| !s.healthy).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pg.start_again().await.unwrap();
    wait_health(&mut health, "healthy again", |s| s.healthy).await;
    let report = manager.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.forced, 0);

    let check = checker(&pg.url()).await;
    let connected: i64 = scalar(
        &check,
        "SELECT count(*) FROM connection_logs WHERE status = 'connected' AND connection_id LIKE 'clog-%'",
    )
    .await;
    assert!(connected >= 3, "{connected}");
    // Failures seen during the outage were kept and written after it, with their own time.
    let late: i64 = scalar(
        &check,
        "SELECT count(*) FROM connection_logs WHERE status = 'health_check_failed' \
         AND created_at - (metadata->>'occurred_at')::timestamptz >= interval '1 second'",
    )
    .await;
    assert!(late >= 1, "{late}");
    // Checkouts are not logged (the log's own writes would log themselves).
    let statuses: String = scalar(
        &check,
        "SELECT string_agg(DISTINCT status, ',' ORDER BY status) FROM connection_logs",
    )
    .await;
    for status in statuses.split(',') {
        assert!(
            [
                "connected",
                "disconnected",
                "error",
                "health_check_failed",
                "health_check_recovered",
                "shutdown",
                "leak"
            ]
            .contains(&status),
            "unexpected status {status} in {statuses}"
        );
    }
}

/// Shutdown used to flush the connection log (up to a quarter of the deadline) before closing
/// the pool, so `connection()` kept handing out connections during that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_acquisitions_at_once_while_the_log_still_flushes() {
    use sea_orm_tunnel_migration::{Migrator, MigratorTrait};

    let pg = TempPostgres::start().await.unwrap();
    let check = checker(&pg.url()).await;
    Migrator::up(&check, None).await.unwrap();
    let manager = ConnectionManager::new(config(&pg, "sref").log_to_db(true))
        .await
        .unwrap();
    // Idle connections in the pool, ready to be handed out.
    drop(futures_join(manager.connection(), 3).await);
    eventually("idle connections", || async { manager.stats().idle >= 3 }).await;

    // Hold the log's writes up: its flush at shutdown cannot finish while the table is locked.
    let locker = checker(&pg.url()).await;
    let lock = locker.begin().await.unwrap();
    lock.execute_unprepared("LOCK TABLE connection_logs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let shutdown = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.shutdown(Duration::from_secs(4)).await })
    };
    eventually("shutting down", || async { manager.is_shutting_down() }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let refused = select_one(manager.connection())
        .await
        .expect_err("no connection is handed out once shutdown began");
    let explained = manager.explain_error(refused);
    assert!(matches!(explained, Error::ShutDown(_)), "{explained:?}");
    assert!(matches!(manager.begin().await, Err(Error::ShutDown(_))));
    assert!(!shutdown.is_finished(), "the log flush is still waiting on the lock");

    // The log gets its rows once the table is free again, over its own connection.
    lock.rollback().await.unwrap();
    let report = tokio::time::timeout(PATIENCE, shutdown).await.unwrap().unwrap();
    assert_eq!(report.forced, 0, "{report:?}");
    let rows: i64 = scalar(&check, "SELECT count(*) FROM connection_logs WHERE status = 'shutdown'").await;
    assert_eq!(rows, 1);
    eventually("no backend of ours", || async {
        backends(&check, "sref").await.is_empty()
    })
    .await;
}

/// sqlx tops the pool up to `min_connections` only right after its idle reaper closed a
/// connection. A connection that dies otherwise (here: its backend is terminated under it) left
/// the pool below its minimum for good while health checks kept the rest busy. The manager
/// brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_brought_back_to_min_connections_after_a_connection_dies() {
    let pg = TempPostgres::start().await.unwrap();
    let checker = checker(&pg.url()).await;
    let manager = ConnectionManager::new(
        config(&pg, "minkeep").map_pool(|p| p.min_connections(2).test_if_idle_for(Duration::ZERO)),
    )
    .await
    .unwrap();
    eventually("the pool opens its minimum", || async { manager.stats().size == 2 }).await;
    let before = backends(&checker, "minkeep").await;
    assert_eq!(before.len(), 2, "{before:?}");

    // One backend dies under the pool, as after an administrator's pg_terminate_backend.
    let victim = &before[0];
    checker
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{victim}'"
        ))
        .await
        .unwrap();

    // The health probe finds it dead (its ping fails) and the pool drops to one connection;
    // then the manager opens a replacement: two live backends again, the victim gone.
    eventually("back at the minimum with live connections", || async {
        let now = backends(&checker, "minkeep").await;
        manager.stats().size == 2 && now.len() == 2 && !now.contains(victim)
    })
    .await;
    assert!(manager.stats().ping_failures >= 1, "{:?}", manager.stats());
    manager.shutdown(Duration::from_secs(5)).await;
}

/// `connection_ids(false)`: no `SET` after connecting (the server says the name came from the
/// client's startup message), every connection of the manager is `<prefix>-<tag>`, and a forced
/// shutdown still ends exactly its backends, sparing a manager with ids and the same prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_connection_ids_the_tag_rides_the_startup_and_a_forced_shutdown_still_finds_it() {
    let pg = TempPostgres::start().await.unwrap();
    let check = checker(&pg.url()).await;
    let plain = ConnectionManager::new(config(&pg, "noid").map_pool(|p| p.connection_ids(false)))
        .await
        .unwrap();
    let with_ids = ConnectionManager::new(config(&pg, "noid")).await.unwrap();
    let source = "SELECT source || ' ' || setting FROM pg_settings WHERE name = 'application_name'";

    let held = futures_join(plain.connection(), 2).await;
    let mut names = Vec::new();
    for txn in &held {
        let seen: String = scalar(txn, source).await;
        let name = seen
            .strip_prefix("client ")
            .unwrap_or_else(|| panic!("set by SET, not at startup: {seen}"));
        names.push(name.to_owned());
    }
    assert_eq!(names[0], names[1], "one name for all of the manager's connections");
    let tag = names[0].strip_prefix("noid-").expect(&names[0]);
    assert!(
        tag.len() == 6 && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{names:?}"
    );
    // Events and stats still count each connection.
    assert!(plain.stats().connections_opened >= 2, "{:?}", plain.stats());

    let kept = futures_join(with_ids.connection(), 1).await;
    let kept_seen: String = scalar(&kept[0], source).await;
    let kept_id = kept_seen.strip_prefix("session ").expect(&kept_seen).to_owned();
    assert!(
        kept_id.starts_with("noid-") && kept_id.matches('-').count() == 2,
        "{kept_id}"
    );

    let report = plain.shutdown(Duration::from_millis(300)).await;
    assert!(report.forced >= 2, "{report:?}");
    eventually("the forced backends gone", || async {
        !backends(&check, "noid").await.contains(&names[0])
    })
    .await;
    for txn in &held {
        assert!(txn.execute_unprepared("SELECT 1").await.is_err(), "cut off");
    }
    select_one(&kept[0])
        .await
        .expect("the manager with ids keeps its connection");
    assert!(backends(&check, "noid").await.contains(&kept_id));
    drop(held);
    for txn in kept {
        txn.commit().await.unwrap();
    }
    with_ids.shutdown(Duration::from_secs(2)).await;
}

/// Two replicas with the same `application_name` prefix: forcing one's shutdown ends only its
/// own backends (found by its tag), never the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_shutdown_spares_another_manager_with_the_same_prefix() {
    let pg = TempPostgres::start().await.unwrap();
    let check = checker(&pg.url()).await;
    let leaving = ConnectionManager::new(config(&pg, "twin")).await.unwrap();
    let staying = ConnectionManager::new(config(&pg, "twin")).await.unwrap();
    let kept = futures_join(staying.connection(), 2).await;
    let kept_ids: Vec<String> = {
        let mut ids = Vec::new();
        for txn in &kept {
            ids.push(scalar::<String>(txn, "SHOW application_name").await);
        }
        ids
    };
    let held = futures_join(leaving.connection(), 1).await;
    let held_id: String = scalar(&held[0], "SHOW application_name").await;
    let tag = |id: &str| id.rsplit_once('-').map(|(base, _)| base.to_owned()).unwrap();
    assert_ne!(tag(&held_id), tag(&kept_ids[0]), "{held_id} vs {kept_ids:?}");

    let report = leaving.shutdown(Duration::from_millis(300)).await;
    assert!(report.forced >= 1, "{report:?}");
    eventually("the forced backend gone", || async {
        !backends(&check, "twin").await.contains(&held_id)
    })
    .await;
    assert!(held[0].execute_unprepared("SELECT 1").await.is_err(), "cut off");

    // The other replica's connections, held all along, still work and are still there.
    for txn in &kept {
        select_one(txn).await.expect("the other manager's connection survives");
    }
    let now = backends(&check, "twin").await;
    assert!(kept_ids.iter().all(|id| now.contains(id)), "{kept_ids:?} in {now:?}");
    drop(held);
    for txn in kept {
        txn.commit().await.unwrap();
    }
    assert!(staying.status().healthy || staying.check_health().await.healthy);
    staying.shutdown(Duration::from_secs(2)).await;
}
