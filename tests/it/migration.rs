//! The migration crate against a real PostgreSQL: `up` creates `connection_logs`, its indexes
//! and `log_connection_event(...)` exactly as the spec defines them; `down` removes them;
//! `fresh`, `refresh`, `reset` and `status` work. (The `migration` binary itself is exercised in
//! `migration/tests/cli.rs`.)

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, JsonValue, Statement};
use sea_orm_tunnel::testkit::TempPostgres;
use sea_orm_tunnel_migration::{Migrator, MigratorTrait};

use super::support::scalar;

const MIGRATION: &str = "m20261127_000001_connection_logs";

async fn server() -> (TempPostgres, DatabaseConnection) {
    let pg = TempPostgres::start().await.expect("start PostgreSQL");
    let db = Database::connect(pg.url()).await.expect("connect");
    (pg, db)
}

async fn table_exists(db: &DatabaseConnection) -> bool {
    scalar(db, "SELECT to_regclass('public.connection_logs') IS NOT NULL").await
}

async fn function_count(db: &DatabaseConnection) -> i64 {
    scalar(
        db,
        "SELECT count(*) FROM pg_proc WHERE proname = 'log_connection_event'",
    )
    .await
}

async fn index_names(db: &DatabaseConnection) -> Vec<String> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT indexname FROM pg_indexes WHERE tablename = 'connection_logs' ORDER BY indexname",
        ))
        .await
        .expect("list indexes");
    rows.iter().map(|r| r.try_get_by_index(0).expect("indexname")).collect()
}

async fn applied(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_applied_migrations(db)
        .await
        .expect("applied migrations")
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

async fn pending(db: &DatabaseConnection) -> Vec<String> {
    Migrator::get_pending_migrations(db)
        .await
        .expect("pending migrations")
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

#[tokio::test]
async fn up_creates_the_spec_table_indexes_and_function() {
    let (_pg, db) = server().await;
    assert!(!table_exists(&db).await);
    assert_eq!(function_count(&db).await, 0);
    assert_eq!(pending(&db).await, [MIGRATION]);

    Migrator::up(&db, None).await.expect("up");

    assert!(table_exists(&db).await);
    assert_eq!(applied(&db).await, [MIGRATION]);
    assert!(pending(&db).await.is_empty());

    // Columns exactly as the spec's CREATE TABLE.
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT column_name::text, data_type::text, is_nullable::text, column_default::text \
             FROM information_schema.columns WHERE table_name = 'connection_logs' ORDER BY ordinal_position",
        ))
        .await
        .expect("columns");
    let columns: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get_by_index(0).unwrap(),
                r.try_get_by_index(1).unwrap(),
                r.try_get_by_index(2).unwrap(),
                r.try_get_by_index(3).unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, Option<String>)> = [
        (
            "id",
            "integer",
            "NO",
            Some("nextval('connection_logs_id_seq'::regclass)"),
        ),
        ("connection_id", "text", "NO", None),
        ("status", "text", "NO", None),
        ("error_message", "text", "YES", None),
        ("metadata", "jsonb", "NO", Some("'{}'::jsonb")),
        ("created_at", "timestamp with time zone", "NO", Some("now()")),
    ]
    .into_iter()
    .map(|(n, t, null, d)| (n.to_owned(), t.to_owned(), null.to_owned(), d.map(str::to_owned)))
    .collect();
    assert_eq!(columns, expected);

    let pk: String = scalar(
        &db,
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = 'connection_logs'::regclass AND i.indisprimary",
    )
    .await;
    assert_eq!(pk, "id");
    assert_eq!(
        index_names(&db).await,
        [
            "connection_logs_pkey",
            "idx_connection_logs_connection_id",
            "idx_connection_logs_created_at"
        ]
    );
    let created_at_index: String = scalar(
        &db,
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_connection_logs_created_at'",
    )
    .await;
    assert!(created_at_index.ends_with("(created_at)"), "{created_at_index}");

    // The function: signature, defaults, result and language as the spec gives them.
    assert_eq!(function_count(&db).await, 1);
    let args: String = scalar(
        &db,
        "SELECT pg_get_function_arguments(oid) FROM pg_proc WHERE proname = 'log_connection_event'",
    )
    .await;
    assert_eq!(
        args,
        "p_connection_id text, p_status text, p_error_message text DEFAULT NULL::text, \
         p_metadata jsonb DEFAULT '{}'::jsonb"
    );
    let result: String = scalar(
        &db,
        "SELECT pg_get_function_result(oid) FROM pg_proc WHERE proname = 'log_connection_event'",
    )
    .await;
    assert_eq!(result, "void");
    let language: String = scalar(
        &db,
        "SELECT l.lanname::text FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang \
         WHERE p.proname = 'log_connection_event'",
    )
    .await;
    assert_eq!(language, "plpgsql");

    // Applying again is a no-op.
    Migrator::up(&db, None).await.expect("second up");
    assert_eq!(applied(&db).await, [MIGRATION]);
}

#[tokio::test]
async fn log_connection_event_inserts_one_row() {
    let (_pg, db) = server().await;
    Migrator::up(&db, None).await.expect("up");

    // Defaults: no error, metadata `{}`, created_at = now.
    db.execute_unprepared("SELECT log_connection_event('c1', 'connected')")
        .await
        .expect("call with defaults");
    assert_eq!(scalar::<i64>(&db, "SELECT count(*) FROM connection_logs").await, 1);
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT id, connection_id, status, error_message, metadata, \
             created_at BETWEEN now() - interval '1 minute' AND now() AS recent \
             FROM connection_logs",
        ))
        .await
        .expect("select")
        .expect("one row");
    assert_eq!(row.try_get::<i32>("", "id").unwrap(), 1);
    assert_eq!(row.try_get::<String>("", "connection_id").unwrap(), "c1");
    assert_eq!(row.try_get::<String>("", "status").unwrap(), "connected");
    assert_eq!(row.try_get::<Option<String>>("", "error_message").unwrap(), None);
    assert_eq!(
        row.try_get::<JsonValue>("", "metadata").unwrap(),
        JsonValue::Object(Default::default())
    );
    assert!(row.try_get::<bool>("", "recent").unwrap());

    // Explicit error and metadata, bound as parameters.
    let metadata: JsonValue = serde_json::json!({"attempt": 2, "pool_size": 7});
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT log_connection_event($1, $2, $3, $4)",
        [
            "c2".into(),
            "error".into(),
            "connection reset by peer".into(),
            metadata.clone().into(),
        ],
    ))
    .await
    .expect("call with every argument");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT id, connection_id, status, error_message, metadata FROM connection_logs WHERE id = 2",
        ))
        .await
        .expect("select")
        .expect("second row");
    assert_eq!(row.try_get::<String>("", "connection_id").unwrap(), "c2");
    assert_eq!(row.try_get::<String>("", "status").unwrap(), "error");
    assert_eq!(
        row.try_get::<Option<String>>("", "error_message").unwrap().as_deref(),
        Some("connection reset by peer")
    );
    assert_eq!(row.try_get::<JsonValue>("", "metadata").unwrap(), metadata);
    assert_eq!(scalar::<i64>(&db, "SELECT count(*) FROM connection_logs").await, 2);

    // The NOT NULL columns really are.
    let err = db
        .execute_unprepared("SELECT log_connection_event(NULL, 'connected')")
        .await
        .expect_err("connection_id is NOT NULL");
    assert!(err.to_string().contains("null value"), "{err}");
}

#[tokio::test]
async fn down_removes_everything_and_up_works_again() {
    let (_pg, db) = server().await;
    Migrator::up(&db, None).await.expect("up");
    db.execute_unprepared("SELECT log_connection_event('c1', 'connected')")
        .await
        .expect("log");

    Migrator::down(&db, None).await.expect("down");
    assert!(!table_exists(&db).await);
    assert_eq!(function_count(&db).await, 0);
    assert!(index_names(&db).await.is_empty());
    let leftover: i64 = scalar(
        &db,
        "SELECT count(*) FROM pg_class WHERE relname LIKE '%connection_logs%'",
    )
    .await;
    assert_eq!(leftover, 0, "sequence and indexes are gone too");
    assert!(applied(&db).await.is_empty());
    assert_eq!(pending(&db).await, [MIGRATION]);

    Migrator::up(&db, None).await.expect("up again");
    assert!(table_exists(&db).await);
    assert_eq!(function_count(&db).await, 1);
    assert_eq!(scalar::<i64>(&db, "SELECT count(*) FROM connection_logs").await, 0);
}

#[tokio::test]
async fn fresh_refresh_reset_and_status() {
    let (_pg, db) = server().await;
    Migrator::status(&db).await.expect("status on an empty database");

    // fresh on an empty database applies everything.
    Migrator::fresh(&db).await.expect("fresh (empty)");
    assert_eq!(applied(&db).await, [MIGRATION]);
    Migrator::status(&db).await.expect("status after fresh");

    // fresh on a used database drops the data and rebuilds.
    db.execute_unprepared("SELECT log_connection_event('c1', 'connected')")
        .await
        .expect("log");
    Migrator::fresh(&db).await.expect("fresh (used)");
    assert!(table_exists(&db).await);
    assert_eq!(function_count(&db).await, 1);
    assert_eq!(scalar::<i64>(&db, "SELECT count(*) FROM connection_logs").await, 0);
    assert_eq!(applied(&db).await, [MIGRATION]);

    // refresh = down all, then up all.
    db.execute_unprepared("SELECT log_connection_event('c1', 'connected')")
        .await
        .expect("log");
    Migrator::refresh(&db).await.expect("refresh");
    assert_eq!(scalar::<i64>(&db, "SELECT count(*) FROM connection_logs").await, 0);
    assert_eq!(applied(&db).await, [MIGRATION]);

    // reset = down all.
    Migrator::reset(&db).await.expect("reset");
    assert!(!table_exists(&db).await);
    assert_eq!(function_count(&db).await, 0);
    assert_eq!(pending(&db).await, [MIGRATION]);
    Migrator::status(&db).await.expect("status after reset");
}
