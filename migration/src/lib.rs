//! Migrations for `sea-orm-tunnel` (placeholder; filled in by the migration work).
pub use sea_orm_migration::prelude::*;

/// The migrator.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![]
    }
}
