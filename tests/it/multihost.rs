//! Multi-host `DATABASE_URL`s with `target_session_attrs`, against a real primary and a real
//! streaming standby (`pg_basebackup`): through a real sshd (the bastion dials each host) and
//! directly. The primary is stopped and the standby promoted under a writer: the pool follows
//! the new primary, and no acknowledged write is lost.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::{BackoffPolicy, LocalEndpointConfig, TargetSessionAttrs};
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{OpenSshd, TempPostgres, fast_config};

/// `postgres://user:pw@127.0.0.1:P1,127.0.0.1:P2,.../postgres?<query>`.
pub(super) fn multi_url(pg: &TempPostgres, ports: &[u16], query: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgres://{}:{}@{}/postgres?{query}",
        pg.user(),
        pg.password(),
        hosts.join(",")
    )
}

async fn in_recovery(db: &impl ConnectionTrait) -> bool {
    scalar::<bool>(db, "SELECT pg_is_in_recovery()").await
}

/// A primary with a `writes` table and a standby that has replayed it.
pub(super) async fn primary_and_standby() -> (TempPostgres, TempPostgres) {
    let primary = TempPostgres::start().await.unwrap();
    let admin = checker(&primary.url()).await;
    admin
        .execute_unprepared("CREATE TABLE writes (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let standby = primary.start_standby().await.unwrap();
    let on_standby = checker(&standby.url()).await;
    assert!(
        in_recovery(&on_standby).await,
        "a pg_basebackup -R standby is in recovery"
    );
    eventually("the standby replays the primary's table", || async {
        on_standby
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT 1 FROM pg_class WHERE relname = 'writes'",
            ))
            .await
            .is_ok_and(|r| r.is_some())
    })
    .await;
    (primary, standby)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_write_pool_follows_the_promoted_standby_through_the_bastion() {
    let ((primary, standby), sshd) = tokio::join!(primary_and_standby(), async { OpenSshd::start().await.unwrap() });
    // The standby listed first: read-write must skip it.
    let url = multi_url(
        &primary,
        &[standby.port(), primary.port()],
        "target_session_attrs=read-write",
    );
    let config = fast_config(url, "mh")
        .map_health(|h| h.interval(Duration::from_secs(30)))
        .recovery(
            BackoffPolicy::new(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500))
                .max_retries(60),
        )
        .tunnel(sshd.tunnel_config("127.0.0.1", standby.port()));
    let manager = ConnectionManager::new(config).await.unwrap();
    let tunnel = manager.tunnel().unwrap();
    assert_eq!(
        tunnel.target_endpoints().len(),
        2,
        "one local endpoint per host of the URL"
    );
    let db = manager.connection().clone();
    assert!(
        !in_recovery(&db).await,
        "the pool is on the primary, not the first host listed"
    );
    for _ in 0..3 {
        select_one(&db).await.unwrap();
    }

    let writer = spawn_retrying_writer(&manager, "writes", 500);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The failover: the primary goes (a fast shutdown sends its WAL to the standby first), the
    // standby is promoted.
    let stopped = Instant::now();
    primary.stop().await.unwrap();
    standby.promote().await.unwrap();
    let promoted = stopped.elapsed();

    let WriterOutcome {
        acked,
        acked_at,
        errors,
    } = writer.await.unwrap();
    assert!(
        errors.is_empty(),
        "every write succeeded through manager.retry: {errors:?}"
    );
    let new_primary = checker(&standby.url()).await;
    assert!(!in_recovery(&new_primary).await);
    let rows = new_primary
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT id FROM writes",
        ))
        .await
        .unwrap();
    let stored: BTreeSet<i64> = rows.iter().map(|r| r.try_get::<i64>("", "id").unwrap()).collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // Within the bound of the primary going away (the promotion itself is part of it).
    let resumed = acked_at
        .iter()
        .find(|at| **at > stopped + promoted)
        .map(|at| at.duration_since(stopped))
        .expect("writes after the promotion");
    assert!(
        resumed < Duration::from_secs(10),
        "writes resumed {resumed:?} after the primary stopped"
    );
    assert!(!in_recovery(&db).await, "the pool is on the new primary");
    assert!(manager.status().healthy, "{:?}", manager.status());
    eprintln!(
        "writes resumed {resumed:?} after the primary stopped (promoted after {promoted:?}); {} acknowledged, {} stored, 0 lost",
        acked.len(),
        stored.len()
    );
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_tried_in_order_for_each_target_session_attrs_directly_and_over_a_unix_socket() {
    let ((primary, standby), sshd) = tokio::join!(primary_and_standby(), async { OpenSshd::start().await.unwrap() });
    // First a port nothing listens on: every attribute must get past it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ports = [dead, standby.port(), primary.port()];
    for (attrs, want_standby) in [
        ("read-write", false),
        ("primary", false),
        ("read-only", true),
        ("standby", true),
        ("prefer-standby", true),
    ] {
        let url = multi_url(&primary, &ports, &format!("target_session_attrs={attrs}"));
        let manager = ConnectionManager::new(fast_config(url, "mhd")).await.unwrap();
        assert_eq!(
            in_recovery(manager.connection()).await,
            want_standby,
            "target_session_attrs={attrs} directly"
        );
        manager.shutdown(Duration::from_secs(1)).await;
    }
    // `any` takes the first that answers; prefer-standby without a standby takes any.
    let url = multi_url(&primary, &[dead, primary.port()], "");
    let manager = ConnectionManager::new(fast_config(url, "mha")).await.unwrap();
    assert!(!in_recovery(manager.connection()).await);
    manager.shutdown(Duration::from_secs(1)).await;
    let manager = ConnectionManager::new(
        fast_config(multi_url(&primary, &[primary.port()], ""), "mhp")
            .target_session_attrs(TargetSessionAttrs::PreferStandby),
    )
    .await
    .unwrap();
    assert!(!in_recovery(manager.connection()).await);
    manager.shutdown(Duration::from_secs(1)).await;

    // Through the bastion, with the private Unix socket endpoints (one 0700 directory per host).
    let url = multi_url(
        &primary,
        &[primary.port(), standby.port()],
        "target_session_attrs=standby",
    );
    let mut tunnel = sshd.tunnel_config("127.0.0.1", primary.port());
    tunnel.local = LocalEndpointConfig::Unix;
    let manager = ConnectionManager::new(fast_config(url, "mhu").tunnel(tunnel))
        .await
        .unwrap();
    let endpoints = manager.tunnel().unwrap().target_endpoints();
    assert_eq!(endpoints.len(), 2);
    assert!(endpoints.iter().all(|(_, e)| e.unix_dir().is_some()), "{endpoints:?}");
    assert!(
        in_recovery(manager.connection()).await,
        "standby through the tunnel's second endpoint"
    );
    manager.shutdown(Duration::from_secs(1)).await;
    for (_, endpoint) in &endpoints {
        assert!(
            !endpoint.unix_dir().unwrap().exists(),
            "socket directories removed at shutdown"
        );
    }

    // No host qualifies: a clear, transient error naming every host and what it was.
    let url = multi_url(&primary, &[dead, standby.port()], "target_session_attrs=primary");
    let error = ConnectionManager::new(fast_config(url, "mhn")).await.unwrap_err();
    assert!(matches!(error, Error::NoSuitableHost { .. }), "{error:?}");
    assert!(error.is_transient());
    let text = error.to_string();
    assert!(text.contains(&format!("127.0.0.1:{dead}")), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}: a standby", standby.port())),
        "{text}"
    );
    assert!(!text.contains(primary.password()), "no secret in {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_demoted_in_place_is_left_by_the_health_check_and_new_connections() {
    // Two independent servers; A is demoted (read-only) without any query of ours failing:
    // the health check's role check notices and the pool moves to B.
    let (a, b) = tokio::join!(TempPostgres::start(), TempPostgres::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    let url = multi_url(&a, &[a.port(), b.port()], "target_session_attrs=read-write");
    let manager = ConnectionManager::new(fast_config(url, "mhr")).await.unwrap();
    let db = manager.connection().clone();
    let port = || async { scalar::<i32>(&db, "SELECT current_setting('port')::int").await };
    assert_eq!(port().await as u16, a.port());

    let admin_a = checker(&a.url()).await;
    admin_a
        .execute_unprepared("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    let _: bool = scalar(&admin_a, "SELECT pg_reload_conf()").await;
    let demoted = Instant::now();
    eventually("the pool moves to B", || async {
        db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_setting('port')::int AS p",
        ))
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get::<i32>("", "p").ok())
            == Some(i32::from(b.port()))
    })
    .await;
    assert!(
        demoted.elapsed() < Duration::from_secs(10),
        "moved after {:?}",
        demoted.elapsed()
    );
    // Nothing of ours stays on A.
    eventually("no connection of ours left on A", || async {
        scalar::<i64>(
            &admin_a,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mhr-%'",
        )
        .await
            == 0
    })
    .await;
    manager.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn unusable_attributes_and_host_lists_are_clear_errors_without_the_password() {
    use sea_orm_tunnel::config::Config;
    let env = |pairs: &[(&str, &str)]| {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_env_with(move |name| map.get(name).cloned())
    };
    let e = env(&[
        ("DATABASE_URL", "postgres://app:pw-Secret1@a:5432,b:5432/app"),
        ("PGTARGETSESSIONATTRS", "writable"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("PGTARGETSESSIONATTRS") && e.contains("read-write"), "{e}");
    let e = env(&[(
        "DATABASE_URL",
        "postgres://app:pw-Secret1@a:5432,b:x/app?target_session_attrs=primary",
    )])
    .unwrap_err()
    .to_string();
    assert!(e.contains("DATABASE_URL") && e.contains("port"), "{e}");
    assert!(!e.contains("pw-Secret1"), "{e}");
    let e = env(&[(
        "DATABASE_URL",
        "postgres://app@a,b/app?target_session_attrs=primary-ish",
    )])
    .unwrap_err()
    .to_string();
    assert!(e.contains("DATABASE_URL") && e.contains("prefer-standby"), "{e}");
    let e = Config::new("postgres://app@a,b/app?target_session_attrs=read-write")
        .map_session(|s| s.read_only(true))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("session.read_only") && e.contains("read-write"), "{e}");
    let ok = env(&[(
        "DATABASE_URL",
        "postgres://app@a:5433,[::1]/app?target_session_attrs=standby",
    )])
    .unwrap();
    assert_eq!(
        ok.database_hosts().unwrap(),
        vec![("a".to_owned(), 5433), ("::1".to_owned(), 5432)]
    );
    assert_eq!(ok.resolve_target_session_attrs().unwrap(), TargetSessionAttrs::Standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostaddr_list_is_dialled_directly_and_names_the_hosts() {
    let (a, b) = tokio::join!(TempPostgres::start(), TempPostgres::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    let admin_a = checker(&a.url()).await;
    admin_a
        .execute_unprepared("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    let _: bool = scalar(&admin_a, "SELECT pg_reload_conf()").await;
    // Names nothing resolves: only the addresses can be dialled.
    let url = |extra: &str| {
        format!(
            "postgres://{}:{}@db-a.invalid:{},db-b.invalid:{}/postgres?hostaddr=127.0.0.1,127.0.0.1\
             &target_session_attrs=read-write{extra}",
            a.user(),
            a.password(),
            a.port(),
            b.port()
        )
    };
    let manager = ConnectionManager::new(fast_config(url(""), "mha")).await.unwrap();
    let port: i32 = scalar(manager.connection(), "SELECT current_setting('port')::int").await;
    assert_eq!(
        port as u16,
        b.port(),
        "A is read-only; B, dialled at its address, qualifies"
    );
    manager.shutdown(Duration::from_secs(1)).await;
    // verify-full without the tunnel would check the address, not the name: refused up front.
    let error = ConnectionManager::new(fast_config(url("&sslmode=verify-full"), "mhv"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("hostaddr"), "{error}");
    assert!(!error.to_string().contains(a.password()), "{error}");
}
