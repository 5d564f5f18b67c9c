//! Observability: tracing events, metric names, and the optional `connection_logs` sink.
//!
//! The crate emits [`tracing`](https://docs.rs/tracing) events ([`events`]) and records
//! [`metrics`](https://docs.rs/metrics) ([`metrics`]); the application installs the subscriber and
//! the recorder.
//!
//! # Subscriber setup
//!
//! All metrics but one are recorded directly. `db_connection_acquire_seconds` is the exception:
//! sqlx reports the time of each pool acquire only as a TRACE tracing event (target
//! `sqlx::pool::acquire`) and has no callback for it, so
//! [`AcquireTimeLayer`](events::AcquireTimeLayer) reads that event from the subscriber. For the
//! metric not to depend on the log level, give the log layer its own filter (a per-layer filter,
//! `.with_filter(..)`) instead of a global one, and add the acquire layer with its own filter:
//!
//! ```
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//! use tracing_subscriber::{EnvFilter, Layer as _};
//! use sea_orm_tunnel::observe::events::AcquireTimeLayer;
//!
//! let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer().with_filter(log_filter))
//!     .with(AcquireTimeLayer::filtered())
//!     .try_init()
//!     .ok();
//! ```
//!
//! With `RUST_LOG` unset (or `info`, or anything else) the log shows INFO and above, and every
//! acquire SeaORM makes still lands in the histogram. Not like this:
//!
//! ```text
//! registry().with(EnvFilter::new("info")).with(fmt::layer()).with(AcquireTimeLayer::filtered())
//! ```
//!
//! An `EnvFilter` added with `.with(filter)` on the registry is global: it drops sqlx's TRACE
//! event before any layer sees it, and the histogram stays empty.

pub mod events;
pub mod log_sink;
pub mod metrics;
pub(crate) mod pool;
pub(crate) mod tunnel;
