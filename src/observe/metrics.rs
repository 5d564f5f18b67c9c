//! Metric names (DESIGN §4). Every metric carries a `pool` label.
//!
//! The crate records through the [`metrics`](https://docs.rs/metrics) facade only and never
//! installs a recorder.

/// Gauge: pooled connections checked out.
pub const DB_POOL_CONNECTIONS_ACTIVE: &str = "db_pool_connections_active";
/// Gauge: pooled connections idle.
pub const DB_POOL_CONNECTIONS_IDLE: &str = "db_pool_connections_idle";
/// Gauge: configured pool maximum.
pub const DB_POOL_CONNECTIONS_MAX: &str = "db_pool_connections_max";
/// Counter (label `kind`): connection errors.
pub const DB_CONNECTION_ERRORS_TOTAL: &str = "db_connection_errors_total";
/// Counter: health checks run.
pub const DB_HEALTH_CHECKS_TOTAL: &str = "db_health_checks_total";
/// Counter: failed health checks.
pub const DB_HEALTH_CHECK_FAILURES_TOTAL: &str = "db_health_check_failures_total";
/// Histogram (seconds): time to acquire a pooled connection.
pub const DB_CONNECTION_ACQUIRE_SECONDS: &str = "db_connection_acquire_seconds";
/// Histogram (seconds): lifetime of a physical connection, recorded when it closes.
pub const DB_CONNECTION_LIFETIME_SECONDS: &str = "db_connection_lifetime_seconds";
/// Histogram (seconds): duration of a health check.
pub const DB_HEALTH_CHECK_SECONDS: &str = "db_health_check_seconds";
/// Counter: connections held longer than the leak threshold.
pub const DB_CONNECTION_LEAKS_TOTAL: &str = "db_connection_leaks_total";
/// Gauge: 1 when at least one SSH session is up, else 0.
pub const SSH_TUNNEL_UP: &str = "ssh_tunnel_up";
/// Gauge: SSH sessions open.
pub const SSH_TUNNEL_SESSIONS: &str = "ssh_tunnel_sessions";
/// Gauge: forwarding channels open.
pub const SSH_TUNNEL_CHANNELS_ACTIVE: &str = "ssh_tunnel_channels_active";
/// Counter: SSH reconnects after a lost session.
pub const SSH_TUNNEL_RECONNECTS_TOTAL: &str = "ssh_tunnel_reconnects_total";
/// Counter: channel opens that failed or were refused (including capacity exhaustion).
pub const SSH_TUNNEL_CHANNEL_OPEN_FAILURES_TOTAL: &str = "ssh_tunnel_channel_open_failures_total";
/// Counter (label `direction` = `to_remote` / `from_remote`): bytes forwarded.
pub const SSH_TUNNEL_BYTES_TOTAL: &str = "ssh_tunnel_bytes_total";
/// Counter: connection-log events dropped because the queue was full.
pub const CONNECTION_LOG_DROPPED_TOTAL: &str = "connection_log_dropped_total";
