//! The connection-log sink against a real PostgreSQL with the migration applied: events become
//! `connection_logs` rows with `metadata.occurred_at`; `record` never blocks, even with the database
//! down; events from an outage are kept and written after recovery; a full queue drops and counts.

use std::time::{Duration, Instant, UNIX_EPOCH};

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, JsonValue, Statement};
use sea_orm_tunnel::observe::log_sink::{ConnectionLogEvent, LogSink, LogSinkOptions};
use sea_orm_tunnel::observe::metrics::CONNECTION_LOG_DROPPED_TOTAL;
use sea_orm_tunnel::testkit::TempPostgres;
use sea_orm_tunnel_migration::{Migrator, MigratorTrait};
use serde_json::json;

use super::support::{PATIENCE, TestMetrics, checker, scalar};

/// PostgreSQL with the migration applied.
async fn migrated() -> TempPostgres {
    let pg = TempPostgres::start().await.expect("start PostgreSQL");
    let db = Database::connect(pg.url()).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    db.close().await.expect("close");
    pg
}

/// The connection the sink writes through; its backends are recognisable by `application_name`.
async fn sink_db(pg: &TempPostgres, application_name: &str) -> DatabaseConnection {
    let mut options = ConnectOptions::new(pg.url());
    options
        .connect_timeout(Duration::from_secs(2))
        .set_application_name(application_name)
        .sqlx_logging(false);
    Database::connect(options).await.expect("connect the sink")
}

async fn row_count(db: &DatabaseConnection) -> i64 {
    scalar(db, "SELECT count(*) FROM connection_logs").await
}

/// Polls until `connection_logs` holds `n` rows (the writer works in the background).
async fn wait_for_rows(db: &DatabaseConnection, n: i64) {
    let start = Instant::now();
    loop {
        let have = row_count(db).await;
        if have == n {
            return;
        }
        assert!(have < n, "more rows than recorded: {have} > {n}");
        assert!(start.elapsed() < PATIENCE, "only {have} of {n} rows after {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until no backend with `application_name` is connected: the writer dropped its pool.
async fn wait_for_no_backend(db: &DatabaseConnection, application_name: &str) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'");
    let start = Instant::now();
    while scalar::<i64>(db, &sql).await > 0 {
        assert!(start.elapsed() < PATIENCE, "the writer still holds its connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows as (connection_id, status, error_message, metadata), in insertion order.
async fn rows(db: &DatabaseConnection) -> Vec<(String, String, Option<String>, JsonValue)> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT connection_id, status, error_message, metadata FROM connection_logs ORDER BY id",
    ))
    .await
    .expect("select rows")
    .iter()
    .map(|r| {
        (
            r.try_get("", "connection_id").unwrap(),
            r.try_get("", "status").unwrap(),
            r.try_get("", "error_message").unwrap(),
            r.try_get("", "metadata").unwrap(),
        )
    })
    .collect()
}

fn fast() -> LogSinkOptions {
    LogSinkOptions::new()
        .flush_interval(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(50), Duration::from_millis(500))
        .write_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_become_rows_with_occurred_at() {
    let pg = migrated().await;
    let db = checker(&pg.url()).await;
    let sink = LogSink::spawn(sink_db(&pg, "log-sink-rows").await, fast());

    let long_ago = UNIX_EPOCH + Duration::from_secs(1_795_746_441) + Duration::from_micros(123_456);
    sink.record(ConnectionLogEvent::new("app-1", "connected"));
    sink.record(
        ConnectionLogEvent::new("app-1", "error")
            .with_error("connection reset by peer")
            .with_metadata(json!({"pool_size": 3, "correlation_id": "req-9"})),
    );
    sink.record(ConnectionLogEvent::new("app-2", "disconnected").with_occurred_at(long_ago));

    // No flush: the writer writes on its own within the flush interval.
    wait_for_rows(&db, 3).await;
    let rows = rows(&db).await;
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2.as_deref()),
        ("app-1", "connected", None)
    );
    assert_eq!(
        (rows[1].0.as_str(), rows[1].1.as_str(), rows[1].2.as_deref()),
        ("app-1", "error", Some("connection reset by peer"))
    );
    assert_eq!(rows[1].3["pool_size"], 3);
    assert_eq!(rows[1].3["correlation_id"], "req-9");
    assert_eq!((rows[2].0.as_str(), rows[2].1.as_str()), ("app-2", "disconnected"));
    assert_eq!(rows[2].3, json!({"occurred_at": "2026-11-27T02:27:21.123456Z"}));
    // Only occurred_at was added to the first event's empty metadata.
    assert_eq!(rows[0].3.as_object().map(|m| m.len()), Some(1));

    // PostgreSQL reads occurred_at as a timestamp, and for live events it is the insert time give or take.
    let close_to_insert: i64 = scalar(
        &db,
        "SELECT count(*) FROM connection_logs WHERE connection_id = 'app-1' AND \
         abs(extract(epoch FROM created_at - (metadata->>'occurred_at')::timestamptz)) < 60",
    )
    .await;
    assert_eq!(close_to_insert, 2);
    let exact: bool = scalar(
        &db,
        "SELECT (metadata->>'occurred_at')::timestamptz = '2026-11-27 02:27:21.123456+00' \
         FROM connection_logs WHERE connection_id = 'app-2'",
    )
    .await;
    assert!(exact);

    assert_eq!(sink.written(), 3);
    assert_eq!(sink.dropped(), 0);

    // close: the writer stops and lets go of its connection; later records are dropped and counted.
    sink.close(Duration::from_secs(10)).await;
    wait_for_no_backend(&db, "log-sink-rows").await;
    sink.record(ConnectionLogEvent::new("app-1", "late"));
    assert_eq!(sink.dropped(), 1);
    assert!(sink.flush(Duration::from_secs(1)).await.is_err());
    sink.close(Duration::from_secs(1)).await; // idempotent
    assert_eq!(row_count(&db).await, 3);
}

#[tokio::test]
async fn a_batch_is_one_round_trip_in_order() {
    let pg = migrated().await;
    let db = checker(&pg.url()).await;
    let sink = LogSink::spawn(
        sink_db(&pg, "log-sink-batch").await,
        fast()
            .capacity(2000)
            .batch_size(256)
            .flush_interval(Duration::from_secs(60)),
    );
    // Current-thread runtime: the writer cannot run until we await, so all 1000 are queued.
    for i in 0..1000 {
        sink.record(ConnectionLogEvent::new(format!("c{i:04}"), "connected"));
    }
    assert_eq!(sink.flush(PATIENCE).await.expect("flush"), 1000);

    let ids: Vec<String> = rows(&db).await.into_iter().map(|r| r.0).collect();
    let expected: Vec<String> = (0..1000).map(|i| format!("c{i:04}")).collect();
    assert_eq!(ids, expected, "rows are inserted in recording order");
    // created_at is now() = the statement's transaction time: one value per round trip.
    let round_trips: i64 = scalar(&db, "SELECT count(DISTINCT created_at) FROM connection_logs").await;
    assert_eq!(round_trips, 4, "1000 events in batches of 256");
    assert_eq!(sink.flush(PATIENCE).await.expect("empty flush"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_never_blocks_while_the_database_is_down() {
    let pg = migrated().await;
    let sink = LogSink::spawn(sink_db(&pg, "log-sink-down").await, fast());
    pg.stop().await.expect("stop PostgreSQL");

    let start = Instant::now();
    for i in 0..10_000 {
        sink.record(ConnectionLogEvent::new(format!("c{i}"), "connected"));
    }
    let took = start.elapsed();
    eprintln!("10 000 record() calls with the database down took {took:?}");
    // Generous: a non-blocking call is microseconds; one blocking write would take seconds.
    assert!(took < Duration::from_secs(2), "10 000 records took {took:?}");

    // And a flush with the database down reports the failure by its deadline instead of hanging.
    let start = Instant::now();
    let err = sink
        .flush(Duration::from_millis(500))
        .await
        .expect_err("database is down");
    assert!(err.is_transient(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "flush overran its deadline: {:?}",
        start.elapsed()
    );
    sink.close(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_events_are_kept_and_written_after_recovery() {
    let pg = migrated().await;
    let sink = LogSink::spawn(sink_db(&pg, "log-sink-outage").await, fast());
    {
        let db = checker(&pg.url()).await;
        sink.record(ConnectionLogEvent::new("before", "connected"));
        wait_for_rows(&db, 1).await;
        db.close().await.expect("close checker");
    }

    pg.stop().await.expect("stop PostgreSQL");
    for i in 0..20 {
        sink.record(ConnectionLogEvent::new(format!("during-{i:02}"), "disconnected").with_error("server is down"));
    }
    // Let the writer fail a few times with the server down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.written(), 1, "nothing can be written while PostgreSQL is down");
    pg.start_again().await.expect("start PostgreSQL again");

    // No flush: the writer's own retry writes them once the server is back.
    let db = checker(&pg.url()).await;
    wait_for_rows(&db, 21).await;
    let rows = rows(&db).await;
    assert_eq!(rows[0].0, "before");
    for (i, row) in rows[1..].iter().enumerate() {
        assert_eq!(row.0, format!("during-{i:02}"));
        assert_eq!(row.2.as_deref(), Some("server is down"));
    }
    // Written after recovery, stamped with the time they happened (before the 1 s of downtime ended).
    let stamped_early: i64 = scalar(
        &db,
        "SELECT count(*) FROM connection_logs WHERE connection_id LIKE 'during-%' AND \
         created_at - (metadata->>'occurred_at')::timestamptz >= interval '900 milliseconds'",
    )
    .await;
    assert_eq!(stamped_early, 20);
    assert_eq!(sink.dropped(), 0);
    sink.close(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn outage_buffer_is_bounded_and_drops_the_oldest() {
    let pg = migrated().await;
    let sink = LogSink::spawn(
        sink_db(&pg, "log-sink-buffer").await,
        fast().batch_size(5).outage_buffer(10).capacity(100),
    );
    pg.stop().await.expect("stop PostgreSQL");
    for i in 0..30 {
        sink.record(ConnectionLogEvent::new(format!("e{i:02}"), "connected"));
    }
    // The writer takes all 30 off the queue, keeps the newest 10 and fails to write them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.dropped(), 20);
    pg.start_again().await.expect("start PostgreSQL again");

    // The writer may already have written them while the server came back; flush makes sure.
    sink.flush(PATIENCE).await.expect("flush after recovery");
    assert_eq!(sink.written(), 10);
    assert_eq!(sink.dropped(), 20);
    let db = checker(&pg.url()).await;
    let ids: Vec<String> = rows(&db).await.into_iter().map(|r| r.0).collect();
    let expected: Vec<String> = (20..30).map(|i| format!("e{i:02}")).collect();
    assert_eq!(ids, expected);
    sink.close(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let pg = migrated().await;
    let sink = LogSink::spawn(
        sink_db(&pg, "log-sink-full").await,
        fast().capacity(8).pool_label("orders"),
    );
    let recorder = TestMetrics::default();
    // Current-thread runtime and no await: the writer cannot drain while we record.
    metrics::with_local_recorder(&recorder, || {
        for i in 0..100 {
            sink.record(ConnectionLogEvent::new(format!("c{i}"), "connected"));
        }
    });
    assert_eq!(sink.dropped(), 92);
    assert_eq!(
        recorder.counter(&format!(
            "{CONNECTION_LOG_DROPPED_TOTAL}{{pool=orders,reason=queue_full}}"
        )),
        92
    );

    // The 8 that fitted are written.
    assert_eq!(sink.flush(PATIENCE).await.expect("flush"), 8);
    let db = checker(&pg.url()).await;
    assert_eq!(row_count(&db).await, 8);
    sink.close(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_writes_what_is_left_and_stops_the_writer() {
    let pg = migrated().await;
    let db = checker(&pg.url()).await;
    let sink = LogSink::spawn(
        sink_db(&pg, "log-sink-drop").await,
        fast().flush_interval(Duration::from_secs(3600)),
    );
    let clone = sink.clone();
    sink.record(ConnectionLogEvent::new("a", "connected"));
    clone.record(ConnectionLogEvent::new("b", "connected"));
    drop(sink);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        row_count(&db).await,
        0,
        "one handle left: the writer waits for its batch"
    );
    drop(clone);

    wait_for_rows(&db, 2).await;
    wait_for_no_backend(&db, "log-sink-drop").await;
}

#[tokio::test]
async fn a_permanent_error_drops_the_batch_instead_of_retrying_forever() {
    // No migration: `log_connection_event` does not exist, which no retry can fix.
    let pg = TempPostgres::start().await.expect("start PostgreSQL");
    let sink = LogSink::spawn(sink_db(&pg, "log-sink-rejected").await, fast());
    for i in 0..3 {
        sink.record(ConnectionLogEvent::new(format!("c{i}"), "connected"));
    }
    assert_eq!(sink.flush(PATIENCE).await.expect("flush completes"), 0);
    assert_eq!(sink.dropped(), 3);
    assert_eq!(sink.written(), 0);

    // Once the schema exists, the same sink writes normally.
    let db = checker(&pg.url()).await;
    Migrator::up(&db, None).await.expect("migrate");
    sink.record(ConnectionLogEvent::new("after", "connected"));
    assert_eq!(sink.flush(PATIENCE).await.expect("flush"), 1);
    assert_eq!(row_count(&db).await, 1);
    sink.close(Duration::from_secs(10)).await;
}
