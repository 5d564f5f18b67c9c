//! The SeaORM migration command line for `sea-orm-tunnel`.
use sea_orm_migration::prelude::*;

#[tokio::main]
async fn main() {
    cli::run_cli(sea_orm_tunnel_migration::Migrator).await;
}
