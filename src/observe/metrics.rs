//! Metric names and their descriptions. Every metric carries a `pool` label.
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
/// Counter (labels `pool`, `reason` = `recovering` / `shutting_down`): requests the recovery
/// layer answered itself (503 / gRPC UNAVAILABLE) instead of calling the handler.
pub const DB_REQUESTS_SHED_TOTAL: &str = "db_requests_shed_total";
/// Counter (label `pool`): retries of idempotent requests after a response marked
/// [`TransientDbFailure`](crate::layer::TransientDbFailure).
pub const DB_REQUESTS_RETRIED_TOTAL: &str = "db_requests_retried_total";
/// Counter (labels `pool`, `reason` = `queue_full` / `outage_buffer_full` / `rejected` / `closed`):
/// connection-log events dropped instead of written.
pub const CONNECTION_LOG_DROPPED_TOTAL: &str = "connection_log_dropped_total";
/// Counter (label `pool`): database password rotations picked up from a
/// [`PasswordSource`](crate::config::PasswordSource) (new connections use the new password).
pub const DB_PASSWORD_ROTATIONS_TOTAL: &str = "db_password_rotations_total";
/// Counter (label `pool`): failovers detected (each retired the pool generation once).
pub const DB_FAILOVERS_TOTAL: &str = "db_failovers_total";

/// Gauge (labels `pool`, `bastion` = `host:port`): SSH sessions open on one bastion.
pub const SSH_TUNNEL_BASTION_SESSIONS: &str = "ssh_tunnel_bastion_sessions";
/// Counter (labels `pool`, `bastion` = the bastion moved to): sessions opened on another bastion
/// than the one before (`SSH_HOST=a,b:2222` failover, and the move back to the preferred one).
pub const SSH_TUNNEL_FAILOVERS_TOTAL: &str = "ssh_tunnel_failovers_total";
/// Label of the tunnel metrics that are per bastion: `host:port`.
pub const BASTION_LABEL: &str = "bastion";

/// Gauge (label `pool`): seconds until the PostgreSQL server certificate expires, as seen in
/// the latest TLS handshake the tunnel made (negative once expired).
pub const DB_TLS_CERT_EXPIRY_SECONDS: &str = "db_tls_cert_expiry_seconds";

/// Label every metric of this crate carries: the pool (or tunnel) it belongs to.
pub const POOL_LABEL: &str = "pool";

/// The `pool` label value used unless another is configured.
pub const DEFAULT_POOL: &str = "default";

/// Registers a description and unit for every metric of this crate with the installed recorder.
///
/// Call it once after installing a recorder (e.g. a Prometheus exporter); the crate itself never
/// installs one. What each metric covers, exactly:
///
/// - `db_pool_connections_active` / `_idle` / `_max`: gauges of the managed pool, set from the sqlx
///   pool once a second by the manager's maintenance task and after every acquire, release, open
///   and close seen by the pool hooks. `active` = physical connections checked out (or being
///   opened); `idle` = connections waiting in the pool.
/// - `db_connection_errors_total` (`kind`): connections that could not be set up (`kind="setup"`),
///   were found dead by the idle ping (`"ping"`), failed the health probe (`"health"`), or were
///   force-closed at shutdown (`"forced"`).
/// - `db_connection_acquire_seconds`: time one `Pool::acquire` took, from the call until a
///   connection was handed out — waiting for a free slot, the idle ping (if any) and opening a new
///   connection (if needed) included, as measured by sqlx itself. Fed by every acquire SeaORM
///   makes once [`AcquireTimeLayer::filtered`](crate::observe::events::AcquireTimeLayer::filtered)
///   is in the tracing subscriber (it reads sqlx's `sqlx::pool::acquire` timing event; sqlx's
///   hooks cannot see when an acquire started, so there is no other way to include the wait).
///   Without the layer it stays empty; see [`observe`](crate::observe#subscriber-setup) for a
///   setup in which the log filter does not hide the event.
/// - `db_connection_lifetime_seconds`: age of a physical connection when the manager saw it close:
///   rejected as stale (made before a tunnel reconnect or a database failure) or expired, failed
///   its idle ping, closed at shutdown, or found gone from the pool by the once-a-second check
///   (then the age is when it was noticed, at most a second late).
/// - `db_health_checks_total` / `db_health_check_failures_total` / `db_health_check_seconds`: one
///   per probe (tunnel check plus `SELECT 1`, acquire included), failed probes, probe duration.
/// - `db_connection_leaks_total`: checkouts held longer than the leak threshold (once per checkout).
/// - `ssh_tunnel_*`: the tunnel's state, sessions, channels, reconnects, refused channels and bytes.
/// - `connection_log_dropped_total`: connection-log events dropped (queue full, outage buffer
///   full, rejected, or unwritten at close).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_gauge!(
        DB_POOL_CONNECTIONS_ACTIVE,
        Unit::Count,
        "Physical connections of the pool that are checked out or being opened."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS_IDLE,
        Unit::Count,
        "Physical connections idle in the pool."
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS_MAX,
        Unit::Count,
        "Configured maximum size of the pool."
    );
    describe_counter!(
        DB_CONNECTION_ERRORS_TOTAL,
        Unit::Count,
        "Connection failures by kind: setup, ping, health, forced."
    );
    describe_counter!(
        DB_HEALTH_CHECKS_TOTAL,
        Unit::Count,
        "Health checks run (tunnel check plus SELECT 1)."
    );
    describe_counter!(
        DB_HEALTH_CHECK_FAILURES_TOTAL,
        Unit::Count,
        "Health checks that failed."
    );
    describe_histogram!(
        DB_CONNECTION_ACQUIRE_SECONDS,
        Unit::Seconds,
        "Time from a pool acquire call until a connection was handed out, waiting and connecting included."
    );
    describe_histogram!(
        DB_CONNECTION_LIFETIME_SECONDS,
        Unit::Seconds,
        "Age of a physical connection when it was closed."
    );
    describe_histogram!(
        DB_HEALTH_CHECK_SECONDS,
        Unit::Seconds,
        "Duration of one health check, acquire included."
    );
    describe_counter!(
        DB_CONNECTION_LEAKS_TOTAL,
        Unit::Count,
        "Checkouts held longer than the leak detection threshold."
    );
    describe_gauge!(
        SSH_TUNNEL_UP,
        Unit::Count,
        "1 while at least one SSH session is up, else 0."
    );
    describe_gauge!(SSH_TUNNEL_SESSIONS, Unit::Count, "SSH sessions open.");
    describe_gauge!(SSH_TUNNEL_CHANNELS_ACTIVE, Unit::Count, "Forwarding channels open.");
    describe_counter!(
        SSH_TUNNEL_RECONNECTS_TOTAL,
        Unit::Count,
        "SSH reconnects after a lost session."
    );
    describe_counter!(
        SSH_TUNNEL_CHANNEL_OPEN_FAILURES_TOTAL,
        Unit::Count,
        "Channel opens that failed or were refused, capacity exhaustion included."
    );
    describe_counter!(
        SSH_TUNNEL_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes forwarded through the tunnel, by direction (to_remote, from_remote)."
    );
    describe_gauge!(
        SSH_TUNNEL_BASTION_SESSIONS,
        Unit::Count,
        "SSH sessions open, by bastion (host:port)."
    );
    describe_counter!(
        SSH_TUNNEL_FAILOVERS_TOTAL,
        Unit::Count,
        "Sessions opened on another bastion than the one before, by the bastion moved to."
    );
    describe_counter!(
        CONNECTION_LOG_DROPPED_TOTAL,
        Unit::Count,
        "Connection-log events dropped instead of written."
    );
    describe_counter!(
        DB_REQUESTS_SHED_TOTAL,
        Unit::Count,
        "Requests the recovery layer answered itself (503 / UNAVAILABLE) while the database was unavailable."
    );
    describe_counter!(
        DB_REQUESTS_RETRIED_TOTAL,
        Unit::Count,
        "Retries of idempotent requests after a transient database failure."
    );
}
