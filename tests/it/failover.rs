//! Failover awareness through a real sshd: two real PostgreSQL servers behind the bastion and a
//! switch in front of them that stands for the database's DNS name. The primary is demoted
//! (read-only) and the name moves to the other server: a writer that uses `manager.retry` writes
//! again within the bound, no acknowledged write is lost, and no connection of ours stays on the
//! old primary.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::support::*;
use sea_orm::ConnectionTrait;
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{FaultProxy, OpenSshd, TempPostgres, fast_config};

async fn ids(db: &sea_orm::DatabaseConnection) -> Vec<i64> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT id FROM writes ORDER BY id",
        ))
        .await
        .unwrap();
    rows.iter().map(|r| r.try_get::<i64>("", "id").unwrap()).collect()
}

async fn ours(db: &sea_orm::DatabaseConnection, prefix: &str) -> i64 {
    scalar(
        db,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{prefix}-%'"),
    )
    .await
}

/// Two PostgreSQL servers with a `writes` table, behind a switch that stands for the database's
/// DNS name (pointing at A), and a bastion.
struct Moving {
    a: TempPostgres,
    b: TempPostgres,
    sshd: OpenSshd,
    admin_a: sea_orm::DatabaseConnection,
    admin_b: sea_orm::DatabaseConnection,
    switch: FaultProxy,
}

impl Moving {
    async fn start() -> Moving {
        let (a, b, sshd) = tokio::join!(TempPostgres::start(), TempPostgres::start(), OpenSshd::start());
        let (a, b, sshd) = (a.unwrap(), b.unwrap(), sshd.unwrap());
        let (admin_a, admin_b) = (checker(&a.url()).await, checker(&b.url()).await);
        for admin in [&admin_a, &admin_b] {
            admin
                .execute_unprepared("CREATE TABLE writes (id bigint PRIMARY KEY)")
                .await
                .unwrap();
        }
        let switch = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], a.port())))
            .await
            .unwrap();
        Moving {
            a,
            b,
            sshd,
            admin_a,
            admin_b,
            switch,
        }
    }
}

/// The failover: A is demoted (every session becomes read-only; the postmaster signals the
/// backends asynchronously, so this waits until it is in force), then the name moves to B.
async fn fail_over(admin_a: &sea_orm::DatabaseConnection, switch: &FaultProxy, b: &TempPostgres) {
    admin_a
        .execute_unprepared("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    let _: bool = scalar(admin_a, "SELECT pg_reload_conf()").await;
    eventually("A read-only", || async {
        scalar::<String>(admin_a, "SHOW default_transaction_read_only").await == "on"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    switch.retarget(SocketAddr::from(([127, 0, 0, 1], b.port())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_and_a_moved_name_lose_no_acknowledged_write() {
    let Moving {
        a,
        b,
        sshd,
        admin_a,
        admin_b,
        switch,
    } = Moving::start().await;
    assert_eq!(a.password(), b.password(), "the test kit's servers share credentials");

    let tunnel = sshd.tunnel_config("127.0.0.1", switch.addr().port());
    let config = fast_config(a.url(), "fo")
        .map_health(|h| h.interval(Duration::from_secs(30)))
        .recovery(
            BackoffPolicy::new(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500))
                .max_retries(40),
        )
        .tunnel(tunnel);
    let manager = ConnectionManager::new(config).await.unwrap();
    let db = manager.connection().clone();
    // Pooled connections on A, as a service under load would have.
    for _ in 0..3 {
        select_one(&db).await.unwrap();
    }

    let writer = spawn_retrying_writer(&manager, "writes", 400);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The failover: A is demoted (every session becomes read-only), the name moves to B.
    fail_over(&admin_a, &switch, &b).await;
    let switched = Instant::now();

    let WriterOutcome {
        acked,
        acked_at,
        errors,
    } = writer.await.unwrap();
    assert!(
        errors.is_empty(),
        "every write succeeded through manager.retry: {errors:?}"
    );
    let on_a = ids(&admin_a).await;
    let on_b = ids(&admin_b).await;
    let stored: BTreeSet<i64> = on_a.iter().chain(&on_b).copied().collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!on_b.is_empty(), "writes moved to B");
    let first_on_b = acked
        .iter()
        .zip(&acked_at)
        .find(|(id, _)| on_b.contains(id))
        .map(|(_, at)| at.saturating_duration_since(switched))
        .unwrap();
    assert!(
        first_on_b < Duration::from_secs(10),
        "writes resumed on B after {first_on_b:?}"
    );
    assert!(
        manager.stats().rejected_stale >= 1,
        "the failover retired the pooled connections on A"
    );
    eventually("no connection of ours left on A", || async {
        ours(&admin_a, "fo").await == 0
    })
    .await;
    eprintln!(
        "writes resumed on B {first_on_b:?} after the switch; {} on A, {} on B, 0 lost",
        on_a.len(),
        on_b.len()
    );
    manager.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_read_only_pool_is_the_applications_error_not_a_failover() {
    let (pg, sshd) = servers().await;
    let admin = checker(&pg.url()).await;
    admin
        .execute_unprepared("CREATE TABLE ro_writes (id int)")
        .await
        .unwrap();
    let config = fast_config(pg.url(), "ro")
        .map_session(|s| s.read_only(true))
        .tunnel(sshd.tunnel_config("127.0.0.1", pg.port()));
    let manager = ConnectionManager::new(config).await.unwrap();
    let started = Instant::now();
    let error = manager
        .retry(|db| async move { db.execute_unprepared("INSERT INTO ro_writes VALUES (1)").await })
        .await
        .expect_err("a read-only session refuses writes");
    assert!(matches!(error, Error::Database(_)), "not a failover: {error:?}");
    assert!(!error.is_transient(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1), "not retried");
    assert_eq!(manager.stats().rejected_stale, 0, "nothing retired");
    manager.shutdown(Duration::from_secs(2)).await;
}

/// The same signal inside an axum handler that only uses `?`: served through the inject and
/// recovery layers, the demoted primary's 25006 is a 503 with `Retry-After` (not a 500), and it
/// retires the pool, so the next request lands on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_using_question_mark_sees_a_failover_as_503_and_the_pool_moves() {
    use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer};

    let Moving {
        a,
        b,
        sshd,
        admin_a,
        admin_b,
        switch,
    } = Moving::start().await;
    let config = fast_config(a.url(), "fohttp")
        .map_pool(|p| p.max_connections(1))
        .map_health(|h| h.interval(Duration::from_secs(30)))
        .tunnel(sshd.tunnel_config("127.0.0.1", switch.addr().port()));
    let manager = ConnectionManager::new(config).await.unwrap();

    async fn write(Db(db): Db, axum::extract::Path(id): axum::extract::Path<i64>) -> Result<String, Error> {
        db.execute_unprepared(&format!("INSERT INTO writes VALUES ({id})"))
            .await?;
        Ok("written".into())
    }
    let app = tower::ServiceBuilder::new()
        .layer(InjectDatabaseLayer::new(manager.clone()))
        .service(axum::Router::new().route("/write/{id}", axum::routing::post(write)));
    let served = serve(app).await;
    assert_eq!(http(served.addr, "POST", "/write/1", &[], "").await.status, 200);

    fail_over(&admin_a, &switch, &b).await;

    let demoted = http(served.addr, "POST", "/write/2", &[], "").await;
    assert_eq!(demoted.status, 503, "{demoted:?}");
    assert!(demoted.header("retry-after").is_some(), "{demoted:?}");
    assert!(demoted.body.contains("database"), "{demoted:?}");
    // The pool moved: the client's retry is served by B.
    let retried = http(served.addr, "POST", "/write/2", &[], "").await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(ids(&admin_b).await, vec![2]);
    assert_eq!(ids(&admin_a).await, vec![1]);
    manager.shutdown(Duration::from_secs(2)).await;
}
