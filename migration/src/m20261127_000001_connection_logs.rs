//! `connection_logs` and `log_connection_event(...)`, exactly as the spec defines them, plus the
//! indexes a log table is queried by (time range, one connection's history).

use sea_orm_migration::prelude::*;

/// Creates the table, its indexes and the function; `down` drops them again.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

/// The spec's DDL. Raw SQL on purpose: the `DEFAULT '{}'::jsonb`, `TIMESTAMPTZ ... DEFAULT NOW()`
/// and the PL/pgSQL body are PostgreSQL-specific and must match the spec to the letter.
const UP: &[&str] = &[
    r#"CREATE TABLE IF NOT EXISTS connection_logs (
    id SERIAL PRIMARY KEY,
    connection_id TEXT NOT NULL,
    status TEXT NOT NULL,
    error_message TEXT,
    metadata JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
)"#,
    "CREATE INDEX IF NOT EXISTS idx_connection_logs_created_at ON connection_logs (created_at)",
    "CREATE INDEX IF NOT EXISTS idx_connection_logs_connection_id ON connection_logs (connection_id)",
    r#"CREATE OR REPLACE FUNCTION log_connection_event(
    p_connection_id TEXT, p_status TEXT, p_error_message TEXT DEFAULT NULL, p_metadata JSONB DEFAULT '{}'
) RETURNS VOID AS $$
BEGIN
    INSERT INTO connection_logs (connection_id, status, error_message, metadata)
    VALUES (p_connection_id, p_status, p_error_message, p_metadata);
END;
$$ LANGUAGE plpgsql"#,
];

/// Reverse order of [`UP`]. The function is named with its argument types so that an
/// unrelated overload of the same name is left alone.
const DOWN: &[&str] = &[
    "DROP FUNCTION IF EXISTS log_connection_event(TEXT, TEXT, TEXT, JSONB)",
    "DROP INDEX IF EXISTS idx_connection_logs_connection_id",
    "DROP INDEX IF EXISTS idx_connection_logs_created_at",
    "DROP TABLE IF EXISTS connection_logs",
];

// `&SchemaManager` without `<'_>`: async-trait bounds every lifetime it sees in the impl, which
// makes it early-bound and no longer matches the trait.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        run_all(manager, DOWN).await
    }
}

async fn run_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}
