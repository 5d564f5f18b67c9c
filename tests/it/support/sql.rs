//! SQL shortcuts: plain pools and connections outside the code under test, and one-value queries.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement, TryGetable};

/// A SeaORM pool on `url` with `max` connections and quiet logging.
pub async fn pool(url: &str, max: u32) -> DatabaseConnection {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    Database::connect(opts).await.expect("pool connects through the tunnel")
}

/// A plain connection for assertions, outside the code under test (a fresh one sees the server
/// as it is now, e.g. after a restart).
pub async fn checker(url: &str) -> DatabaseConnection {
    Database::connect(url).await.expect("connect the checker")
}

/// The first column of the one row `sql` returns.
pub async fn scalar<T: TryGetable>(db: &impl ConnectionTrait, sql: &str) -> T {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("one row");
    row.try_get_by_index(0).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `SELECT 1`, as an error where the query fails.
pub async fn select_one(db: &impl ConnectionTrait) -> Result<i32, sea_orm::DbErr> {
    select(db, 1).await
}

/// `SELECT <n>::int4` and return the value.
pub async fn select(db: &impl ConnectionTrait, n: i32) -> Result<i32, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT {n}::int4 AS v"),
        ))
        .await?
        .expect("one row");
    row.try_get::<i32>("", "v")
}

/// Backends whose application_name starts with `prefix-`.
pub async fn backends(checker: &DatabaseConnection, prefix: &str) -> Vec<String> {
    let sql =
        format!("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE '{prefix}-%' ORDER BY 1");
    checker
        .query_all_raw(Statement::from_string(checker.get_database_backend(), sql))
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.try_get_by_index(0).unwrap())
        .collect()
}

/// What [`spawn_retrying_writer`] saw: the ids acknowledged (with when), and the errors.
pub struct WriterOutcome {
    pub acked: Vec<i64>,
    pub acked_at: Vec<std::time::Instant>,
    pub errors: Vec<String>,
}

/// Inserts ids `0..n` into `table (id bigint PRIMARY KEY)` one at a time through
/// `manager.retry` (idempotent: `ON CONFLICT DO NOTHING`), 10 ms apart.
pub fn spawn_retrying_writer(
    manager: &sea_orm_tunnel::manager::ConnectionManager,
    table: &'static str,
    n: i64,
) -> tokio::task::JoinHandle<WriterOutcome> {
    let manager = manager.clone();
    tokio::spawn(async move {
        let mut out = WriterOutcome {
            acked: Vec::new(),
            acked_at: Vec::new(),
            errors: Vec::new(),
        };
        for id in 0..n {
            let result = manager
                .retry(|db| async move {
                    db.execute_unprepared(&format!("INSERT INTO {table} VALUES ({id}) ON CONFLICT DO NOTHING"))
                        .await
                })
                .await;
            match result {
                Ok(_) => {
                    out.acked.push(id);
                    out.acked_at.push(std::time::Instant::now());
                }
                Err(e) => out.errors.push(format!("{id}: {e}")),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        out
    })
}
