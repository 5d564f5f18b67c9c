//! The SeaORM migration command line for `sea-orm-tunnel`.
//!
//! `cargo run -p sea-orm-tunnel-migration -- up|down|fresh|refresh|reset|status`; the database is
//! taken from `DATABASE_URL` (or `-u URL`), also read from a `.env` file.

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(sea_orm_tunnel_migration::Migrator).await;
}
