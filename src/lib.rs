//! # sea-orm-tunnel
//!
//! PostgreSQL through an SSH bastion for SeaORM + tower (axum, tonic) services: a verified,
//! self-healing SSH tunnel ([`SshTunnel`], russh), a managed SeaORM pool over it
//! ([`ConnectionManager`]), health checks, recovery, observability and graceful shutdown, plus
//! the tower layers that put it into a service stack ([`InjectDatabaseLayer`], [`RecoveryLayer`]).
//!
//! ## Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use sea_orm::{ConnectionTrait, DbBackend, Statement};
//! use sea_orm_tunnel::ConnectionManager;
//! use sea_orm_tunnel::config::{Config, TunnelConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // In code (or `Config::from_env()` with DATABASE_URL, SSH_HOST, SSH_USER, ... ).
//! let config = Config::new("postgres://app:secret@db.internal:5432/app")
//!     .tunnel(TunnelConfig::new("bastion.example.com", "deploy")); // key ~/.ssh/id_ed25519, strict known_hosts
//! let manager = ConnectionManager::new(config).await?;
//!
//! // An ordinary SeaORM connection, through the tunnel.
//! let db = manager.connection();
//! db.execute_raw(Statement::from_string(DbBackend::Postgres, "SELECT 1")).await?;
//!
//! // Transient failures (a dropped bastion, a restarting database) retried with backoff;
//! // permanent ones (syntax, constraint, a changed host key) returned at once.
//! manager
//!     .retry(|db| async move { db.execute_unprepared("UPDATE jobs SET done = true WHERE id = 1").await })
//!     .await?;
//!
//! // Health, published on a watch channel and as events.
//! println!("healthy: {}", manager.status().healthy);
//!
//! // Drain checked-out connections (up to 5 s), close the pool, disconnect the tunnel.
//! let report = manager.shutdown(Duration::from_secs(5)).await;
//! println!("drained {}, forced {}", report.drained, report.forced);
//! # Ok(()) }
//! ```
//!
//! In an axum (or tonic) service:
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn demo(manager: sea_orm_tunnel::ConnectionManager) {
//! use axum::{Router, routing::get};
//! use sea_orm::ConnectionTrait;
//! use sea_orm_tunnel::layer::Db;
//! use sea_orm_tunnel::{InjectDatabaseLayer, RecoveryLayer};
//!
//! async fn now(Db(db): Db) -> Result<String, sea_orm_tunnel::Error> {
//!     let row = db.query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), "SELECT now()::text AS now")).await?;
//!     Ok(row.and_then(|r| r.try_get::<String>("", "now").ok()).unwrap_or_default())
//! }
//!
//! let app: Router = Router::new()
//!     .route("/now", get(now))
//!     // Outermost first: correlation id + connection, then wait/shed/retry while recovering.
//!     .layer(RecoveryLayer::new(manager.clone()))
//!     .layer(InjectDatabaseLayer::new(manager.clone()));
//! # let _ = app; }
//! ```
//!
//! ## Modules
//!
//! - [`config`]: [`Config`](config::Config) builders, environment (`from_env`, `.env.local`), profiles, validation.
//! - [`tunnel`]: the SSH tunnel and a process-wide singleton facade (`SshTunnel::initialize_instance`, ...).
//! - [`manager`]: the pool over the tunnel, health checks, retry, leak detection, shutdown.
//! - [`layer`]: tower layers for axum and tonic.
//! - [`observe`]: tracing events, metric names, the `connection_logs` sink.
//! - [`url`]: database URLs: validation, redaction, the URL through the tunnel's local endpoint.
//! - [`tls`]: TLS to PostgreSQL held by the tunnel (`sslmode`, `sslrootcert`, client certificates, libpq's meaning).
//! - `testkit` (feature `testkit`): throwaway PostgreSQL, OpenSSH sshd, an in-process bastion, a fault proxy.
//!
//! ## Features
//!
//! - `axum`: the `Db` extractor and `Error` as an axum response.
//! - `tonic`: `Error` as a `tonic::Status`.
//! - `testkit`: the test kit.
//! - `cli`: the `sea-orm-tunnel` command-line tool (`forward`, `check`).
//! - `backoff`: a `backoff::ExponentialBackoff` converts into a [`BackoffPolicy`](config::BackoffPolicy).
//! - `rsa`: RSA user keys and RSA host keys (ed25519 and ECDSA need no feature; RSA keys held by
//!   an ssh-agent work without it). Off by default because of RUSTSEC-2023-0071.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod civil;
pub mod config;
pub mod error;
pub(crate) mod generation;
pub mod layer;
pub mod manager;
pub mod observe;
pub mod ssh_config;
mod sync;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod tunnel;
pub mod url;

pub use error::{Error, Result};
pub use layer::{CorrelationId, InjectDatabaseLayer, RecoveryLayer};
pub use manager::{ConnectionManager, HealthEvent, HealthStatus, PoolStats, ShutdownReport};
pub use tunnel::{LocalEndpoint, SshTunnel, TunnelEvent, TunnelState, TunnelStats};
