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
        // Up to 20 first logins at once per manager (an SSH channel and a SCRAM login each) can
        // take longer than fast_config's 3 s on a loaded 2-core machine: a liveness bound here.
        .map_pool(|p| p.max_connections(20).acquire_timeout(LIVENESS))
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

/// The axum layers over a PgBouncer-mode manager, through the tunnel to PgBouncer in transaction
/// mode with a pool of 3: concurrent prepared reads and writes, some in `manager.begin()`
/// transactions, each answer exactly what its request asked, and every write is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_layers_through_transaction_pgbouncer_answer_concurrent_reads_and_writes_correctly() {
    use axum::extract::Path;
    use axum::routing::{get, post};
    use sea_orm_tunnel::layer::{Db, InjectDatabaseLayer, RecoveryLayer};

    const BOUNCER_POOL: i64 = 3;
    const REQUESTS: i64 = 60;
    const SEEDED: i64 = 20;

    let (pg, sshd) = servers().await;
    let admin = checker(&format!("{}?application_name=checker", pg.url())).await;
    admin
        .execute_unprepared(
            "CREATE TABLE notes (id bigserial PRIMARY KEY, n bigint NOT NULL UNIQUE, body text NOT NULL); \
             CREATE TABLE audit (note_id bigint NOT NULL REFERENCES notes (id), n bigint NOT NULL UNIQUE)",
        )
        .await
        .unwrap();
    // Rows for the reads to find, written outside the code under test.
    admin
        .execute_unprepared(&format!(
            "INSERT INTO notes (n, body) SELECT 1000 + g, 'seed-' || (1000 + g) FROM generate_series(0, {}) g",
            SEEDED - 1
        ))
        .await
        .unwrap();
    let bouncer = PgBouncer::builder()
        .mode(PoolMode::Transaction)
        .default_pool_size(BOUNCER_POOL as u32)
        .start(&pg)
        .await
        .unwrap();
    let manager = ConnectionManager::new(config(&bouncer, &sshd, "pgbaxum", true))
        .await
        .unwrap();

    /// `POST /notes/{n}`: one prepared INSERT ... RETURNING.
    async fn create(Db(db): Db, Path(n): Path<i64>) -> Result<String, Error> {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO notes (n, body) VALUES ($1, 'note-' || $1::text) RETURNING id, n * 10 AS tenfold",
                [n.into()],
            ))
            .await?
            .expect("RETURNING gives a row");
        let id: i64 = row.try_get("", "id")?;
        let tenfold: i64 = row.try_get("", "tenfold")?;
        Ok(format!("{id} {tenfold}"))
    }
    /// `POST /audited/{n}`: a note and its audit row in one `manager.begin()` transaction.
    async fn audited(manager: ConnectionManager, Path(n): Path<i64>) -> Result<String, Error> {
        let txn = manager.begin().await?;
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO notes (n, body) VALUES ($1, 'audited-' || $1::text) RETURNING id",
                [n.into()],
            ))
            .await?
            .expect("RETURNING gives a row");
        let id: i64 = row.try_get("", "id")?;
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO audit (note_id, n) VALUES ($1, $2)",
            [id.into(), n.into()],
        ))
        .await?;
        // Inside the transaction, on the same server connection: the row just written.
        let seen: i64 = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT count(*) AS c FROM audit WHERE note_id = $1",
                [id.into()],
            ))
            .await?
            .expect("a count")
            .try_get("", "c")?;
        txn.commit().await?;
        Ok(format!("{id} {seen}"))
    }
    /// `GET /notes/{n}`: a prepared parameterised read.
    async fn read(Db(db): Db, Path(n): Path<i64>) -> Result<String, Error> {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT body FROM notes WHERE n = $1",
                [n.into()],
            ))
            .await?;
        Ok(match row {
            Some(row) => row.try_get("", "body")?,
            None => "missing".to_owned(),
        })
    }
    /// `GET /square/{n}`: a prepared read that touches no table.
    async fn square(Db(db): Db, Path(n): Path<i64>) -> Result<String, Error> {
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT $1::int8 * $1::int8 AS sq, pg_backend_pid() AS pid",
                [n.into()],
            ))
            .await?
            .expect("one row");
        Ok(row.try_get::<i64>("", "sq")?.to_string())
    }

    let app = axum::Router::new()
        .route("/notes/{n}", post(create).get(read))
        .route("/audited/{n}", post(audited))
        .route("/square/{n}", get(square))
        .layer(RecoveryLayer::new(manager.clone()))
        .layer(InjectDatabaseLayer::new(manager.clone()));
    let served = serve(app).await;
    let addr = served.addr;

    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (peak, url) = (peak.clone(), format!("{}?application_name=checker", pg.url()));
        tokio::spawn(async move {
            let admin = checker(&url).await;
            loop {
                peak.fetch_max(server_backends(&admin).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // All at once: writes, transactional writes, reads of seeded rows, table-less reads.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        requests.spawn(async move {
            let (method, path) = match i % 4 {
                0 => ("POST", format!("/notes/{i}")),
                1 => ("POST", format!("/audited/{i}")),
                2 => ("GET", format!("/notes/{}", 1000 + i % SEEDED)),
                _ => ("GET", format!("/square/{i}")),
            };
            let response = tokio::time::timeout(LIVENESS, http(addr, method, &path, &[], ""))
                .await
                .unwrap_or_else(|_| panic!("{method} {path} hung"));
            (i, method, path, response)
        });
    }
    let mut created: Vec<(i64, i64)> = Vec::new();
    let mut audited_ids: Vec<(i64, i64)> = Vec::new();
    let mut answered = 0;
    while let Some(joined) = requests.join_next().await {
        let (i, method, path, response) = joined.unwrap();
        assert_eq!(response.status, 200, "{method} {path}: {response:?}");
        let body = response.body.trim();
        match i % 4 {
            0 => {
                let (id, tenfold) = body.split_once(' ').expect("id and n*10");
                assert_eq!(tenfold, (i * 10).to_string(), "{path}");
                created.push((id.parse().unwrap(), i));
            }
            1 => {
                let (id, seen) = body.split_once(' ').expect("id and the audit count");
                assert_eq!(seen, "1", "{path}: the transaction saw its own audit row");
                audited_ids.push((id.parse().unwrap(), i));
            }
            2 => assert_eq!(body, format!("seed-{}", 1000 + i % SEEDED), "{path}"),
            _ => assert_eq!(body, (i * i).to_string(), "{path}"),
        }
        answered += 1;
    }
    sampler.abort();
    assert_eq!(answered, REQUESTS);

    // Every write stored once, under the id its response named.
    let writes = REQUESTS / 2;
    assert_eq!(created.len() + audited_ids.len(), writes as usize);
    let rows: i64 = scalar(&admin, "SELECT count(*) FROM notes WHERE n < 1000").await;
    assert_eq!(rows, writes, "every write stored once");
    for (id, n) in &created {
        let body: String = scalar(&admin, &format!("SELECT body FROM notes WHERE id = {id} AND n = {n}")).await;
        assert_eq!(body, format!("note-{n}"));
    }
    for (id, n) in &audited_ids {
        let body: String = scalar(
            &admin,
            &format!(
                "SELECT body FROM notes JOIN audit ON audit.note_id = notes.id WHERE notes.id = {id} AND audit.n = {n}"
            ),
        )
        .await;
        assert_eq!(body, format!("audited-{n}"));
    }
    let audit_rows: i64 = scalar(&admin, "SELECT count(*) FROM audit").await;
    assert_eq!(audit_rows, audited_ids.len() as i64);
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= BOUNCER_POOL,
        "PostgreSQL saw {peak} backends, more than the pooler's pool of {BOUNCER_POOL}"
    );
    eprintln!(
        "{REQUESTS} concurrent requests through the layers and PgBouncer (pool {BOUNCER_POOL}): all 200, \
         {writes} writes stored once, peak {peak} PostgreSQL backends, manager pool {:?}",
        manager.stats()
    );
    manager.shutdown(Duration::from_secs(2)).await;
}
