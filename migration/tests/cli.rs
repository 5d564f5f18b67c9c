//! The `migration` binary from the command line, the way a user runs it
//! (`cargo run -p sea-orm-tunnel-migration -- up`), against a real PostgreSQL: `DATABASE_URL`
//! is honoured and `status`, `up`, `down`, `fresh` do what they say.

use std::path::Path;
use std::process::{Command, Output};

use sea_orm_migration::sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use sea_orm_tunnel::testkit::TempPostgres;

const MIGRATION: &str = "m20261127_000001_connection_logs";

/// Runs the binary in `dir` (an empty temp dir, so no stray `.env` is picked up) with the given
/// `DATABASE_URL`; returns its output with stdout and stderr joined.
async fn migration(dir: &Path, database_url: Option<&str>, args: &[&str]) -> (Output, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_migration"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_SCHEMA")
        .env_remove("RUST_LOG");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run the migration binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

async fn ok(dir: &Path, url: &str, args: &[&str]) -> String {
    let (output, text) = migration(dir, Some(url), args).await;
    assert!(output.status.success(), "migration {args:?} failed: {text}");
    text
}

async fn table_exists(db: &DatabaseConnection) -> bool {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT to_regclass('public.connection_logs') IS NOT NULL AND \
             EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'log_connection_event')",
        ))
        .await
        .expect("query")
        .expect("row");
    row.try_get_by_index(0).expect("bool")
}

#[tokio::test]
async fn binary_status_up_down_fresh_with_database_url() {
    let pg = TempPostgres::start().await.expect("start PostgreSQL");
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::connect(pg.url()).await.expect("connect");
    let url = pg.url();

    let status = ok(dir.path(), &url, &["status"]).await;
    assert!(
        status.contains(&format!("Migration '{MIGRATION}'... Pending")),
        "{status}"
    );
    assert!(!table_exists(&db).await);

    let up = ok(dir.path(), &url, &["up"]).await;
    assert!(
        up.contains(&format!("Migration '{MIGRATION}' has been applied")),
        "{up}"
    );
    assert!(table_exists(&db).await);
    db.execute_unprepared("SELECT log_connection_event('cli', 'connected')")
        .await
        .expect("the function works");

    let status = ok(dir.path(), &url, &["status"]).await;
    assert!(
        status.contains(&format!("Migration '{MIGRATION}'... Applied")),
        "{status}"
    );

    let up_again = ok(dir.path(), &url, &["up"]).await;
    assert!(up_again.contains("No pending migrations"), "{up_again}");

    let down = ok(dir.path(), &url, &["down"]).await;
    assert!(
        down.contains(&format!("Migration '{MIGRATION}' has been rolled back")),
        "{down}"
    );
    assert!(!table_exists(&db).await);

    let fresh = ok(dir.path(), &url, &["fresh"]).await;
    assert!(
        fresh.contains(&format!("Migration '{MIGRATION}' has been applied")),
        "{fresh}"
    );
    assert!(table_exists(&db).await);

    // `-u URL` works as well as the variable.
    let (output, text) = migration(dir.path(), None, &["-u", &url, "status"]).await;
    assert!(output.status.success(), "{text}");
    assert!(text.contains("Applied"), "{text}");
}

#[tokio::test]
async fn binary_without_database_url_fails_and_says_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (output, text) = migration(dir.path(), None, &["status"]).await;
    assert!(!output.status.success());
    assert!(text.contains("DATABASE_URL"), "{text}");
}
