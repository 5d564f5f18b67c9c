//! PgBouncer mode through a real sshd to a real PgBouncer 1.18 (Debian's; no prepared-statement
//! support) in transaction mode in front of a real PostgreSQL: SeaORM's prepared statements work
//! from several managers at once, PostgreSQL never sees more backends than the pooler's pool, a
//! PgBouncer restart under load is ridden out, and without the flag the error says what to set.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::support::*;
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use sea_orm_tunnel::Error;
use sea_orm_tunnel::config::BackoffPolicy;
use sea_orm_tunnel::manager::ConnectionManager;
use sea_orm_tunnel::testkit::{OpenSshd, PgBouncer, PoolMode, fast_config};

const POOL_SIZE: i64 = 5;

fn config(bouncer: &PgBouncer, sshd: &OpenSshd, prefix: &str, flag: bool) -> sea_orm_tunnel::config::Config {
    let url = if flag {
        format!("{}?pgbouncer=true", bouncer.url())
    } else {
        bouncer.url()
    };
    fast_config(url, prefix)
        .map_pool(|p| p.max_connections(20))
        .recovery(
            BackoffPolicy::new(Duration::from_millis(50))
                .max_delay(Duration::from_millis(500))
                .max_retries(20),
        )
        .tunnel(sshd.tunnel_config("127.0.0.1", bouncer.port()))
}

/// One prepared (parameterised) insert in a transaction, then a prepared read of it. Idempotent:
/// a commit whose reply was lost to a restart is retried without a duplicate-key error.
async fn write_and_read(db: sea_orm::DatabaseConnection, n: i64) -> Result<i64, sea_orm::DbErr> {
    let txn = db.begin().await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO items (n) VALUES ($1) ON CONFLICT (n) DO NOTHING",
        [n.into()],
    ))
    .await?;
    txn.commit().await?;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT n * 2 AS twice FROM items WHERE n = $1",
            [n.into()],
        ))
        .await?
        .expect("the row just written");
    row.try_get::<i64>("", "twice")
}

async fn server_backends(admin: &sea_orm::DatabaseConnection) -> i64 {
    // The pooler's server connections (the test's own checkers are named `checker`).
    scalar(
        admin,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND application_name IS DISTINCT FROM 'checker'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_through_transaction_pgbouncer_are_all_served_within_its_pool() {
    let (pg, sshd) = servers().await;
    let admin = checker(&format!("{}?application_name=checker", pg.url())).await;
    admin
        .execute_unprepared("CREATE TABLE items (n bigint PRIMARY KEY)")
        .await
        .unwrap();
    let bouncer = PgBouncer::builder()
        .mode(PoolMode::Transaction)
        .default_pool_size(POOL_SIZE as u32)
        .start(&pg)
        .await
        .unwrap();

    let mut managers = Vec::new();
    for i in 0..3 {
        managers.push(
            ConnectionManager::new(config(&bouncer, &sshd, &format!("pgb{i}"), true))
                .await
                .unwrap(),
        );
    }
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (peak, url) = (peak.clone(), format!("{}?application_name=checker", pg.url()));
        tokio::spawn(async move {
            let admin = checker(&url).await;
            loop {
                let n = server_backends(&admin).await;
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let next = Arc::new(AtomicI64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for m in &managers {
        for _ in 0..10 {
            let (m, next, served) = (m.clone(), next.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let twice = write_and_read(m.connection().clone(), n)
                        .await
                        .unwrap_or_else(|e| panic!("request {n} through PgBouncer: {e}"));
                    assert_eq!(twice, 2 * n);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    sampler.abort();
    let total = next.load(Ordering::Relaxed);
    assert_eq!(served.load(Ordering::Relaxed) as i64, total, "every request served");
    let rows: i64 = scalar(&admin, "SELECT count(*) FROM items").await;
    assert_eq!(rows, total, "every write stored once");
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= POOL_SIZE,
        "PostgreSQL saw {peak} backends, more than the pooler's pool of {POOL_SIZE}"
    );
    eprintln!("{total} requests from 3 managers x 20 connections, peak {peak} PostgreSQL backends");

    // A PgBouncer restart under load: requests through manager.retry keep succeeding.
    let m = managers[0].clone();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        for n in 100_000..100_150i64 {
            if let Err(e) = m.retry(|db| write_and_read(db, n)).await {
                failures.push(e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    bouncer.restart().await.unwrap();
    let failures = load.await.unwrap();
    assert!(failures.is_empty(), "requests lost to the restart: {failures:?}");
    for m in managers {
        m.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_error_says_to_set_pgbouncer_true() {
    let (pg, sshd) = servers().await;
    let bouncer = PgBouncer::start(&pg).await.unwrap();
    let error = ConnectionManager::new(config(&bouncer, &sshd, "nopgb", false))
        .await
        .expect_err("PgBouncer refuses sqlx's startup parameters");
    assert!(matches!(error, Error::TransactionPooler { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("pgbouncer=true") && text.contains("unsupported startup parameter"),
        "{text}"
    );
}

#[test]
fn session_settings_are_refused_in_pgbouncer_mode_naming_each() {
    let e = sea_orm_tunnel::config::Config::new("postgres://app@db/app?pgbouncer=true")
        .map_session(|s| s.statement_timeout(Duration::from_secs(5)).read_only(true))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("session.statement_timeout") && e.contains("session.read_only"),
        "{e}"
    );
    // application_name is fine, and the flag in the URL wins over the setting.
    sea_orm_tunnel::config::Config::new("postgres://app@db/app?pgbouncer=false")
        .pgbouncer(true)
        .map_session(|s| s.read_only(true))
        .validate()
        .unwrap();
    let e = sea_orm_tunnel::config::Config::new("postgres://app@db/app?pgbouncer=maybe")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("pgbouncer=\"maybe\""), "{e}");
}
