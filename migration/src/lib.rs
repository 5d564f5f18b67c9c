//! Migrations for [`sea-orm-tunnel`](https://docs.rs/sea-orm-tunnel).
//!
//! One migration creates the `connection_logs` table, its indexes on `created_at` and
//! `connection_id`, and the `log_connection_event(...)` function that the connection-log sink
//! calls. `down` removes all three.
//!
//! Run it like any SeaORM migration crate (reads `DATABASE_URL`, also from `.env`):
//!
//! ```text
//! cargo run -p sea-orm-tunnel-migration -- up      # apply pending migrations
//! cargo run -p sea-orm-tunnel-migration -- status  # list applied / pending
//! cargo run -p sea-orm-tunnel-migration -- down    # roll back the last one
//! cargo run -p sea-orm-tunnel-migration -- fresh   # drop all tables, then apply everything
//! ```
//!
//! Or from code:
//!
//! ```no_run
//! use sea_orm_tunnel_migration::{Migrator, MigratorTrait};
//!
//! # async fn run(db: &sea_orm_migration::sea_orm::DatabaseConnection) -> Result<(), sea_orm_migration::DbErr> {
//! Migrator::up(db, None).await?;
//! # Ok(())
//! # }
//! ```

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_connection_logs;

/// Every migration of this crate, in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261127_000001_connection_logs::Migration)]
    }
}
