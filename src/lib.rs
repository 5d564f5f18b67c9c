//! # sea-orm-tunnel
//!
//! PostgreSQL through an SSH bastion for SeaORM + tower services: a verified, self-healing
//! SSH tunnel (russh), a managed SeaORM pool over it, health checks, recovery, observability
//! and graceful shutdown.
//!
//! See the README for the quick start and the configuration table.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod config;
pub mod error;
pub mod layer;
pub mod manager;
pub mod observe;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tunnel;

pub use error::{Error, Result};
pub use layer::{CorrelationId, InjectDatabaseLayer, RecoveryLayer};
pub use manager::{ConnectionManager, HealthEvent, HealthStatus, PoolStats, ShutdownReport};
pub use tunnel::{LocalEndpoint, SshTunnel, TunnelEvent, TunnelState, TunnelStats};
