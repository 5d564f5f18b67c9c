//! The subscriber both service examples install: JSON log lines filtered by `RUST_LOG` (default
//! `info`), and the acquire-time layer, which that filter never hides.

use sea_orm_tunnel::observe::events::AcquireTimeLayer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Installs the global subscriber.
///
/// The log filter is the fmt layer's own (a per-layer filter), not the registry's: a global
/// `info` filter would drop sqlx's TRACE acquire event, and `db_connection_acquire_seconds` with it.
pub(crate) fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        // JSON lines with the current span's fields, so each line shows its request's correlation_id.
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_filter(filter),
        )
        // Feeds db_connection_acquire_seconds from every acquire SeaORM makes, whatever RUST_LOG says.
        .with(AcquireTimeLayer::filtered())
        .init();
}
