//! The database side: [`PoolConfig`], [`HealthConfig`], [`SessionSettings`].

use std::time::Duration;

#[cfg(doc)]
use super::ProfileDefaults;
use super::{BackoffPolicy, Profile, profile};

/// Pool limits and timeouts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolConfig {
    /// `POSTGRES_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// `POSTGRES_MIN_CONNECTIONS`, default 0.
    pub min_connections: u32,
    /// `POSTGRES_IDLE_TIMEOUT`.
    pub idle_timeout: Duration,
    /// `POSTGRES_CONNECTION_TIMEOUT`: connect and acquire timeout.
    pub connect_timeout: Duration,
    /// Acquire timeout (defaults to `connect_timeout`).
    pub acquire_timeout: Duration,
    /// `POSTGRES_MAX_LIFETIME`, default 30 min; each connection gets a small random reduction.
    pub max_lifetime: Duration,
    /// Ping a pooled connection before handing it out only if it was idle at least this long. Default 10 s.
    pub test_if_idle_for: Duration,
    /// `POSTGRES_APPLICATION_NAME`: prefix of each connection id. Default `sea-orm-tunnel`.
    pub application_name: String,
    /// `POSTGRES_CONNECTION_IDS`: give each server connection its own id as `application_name`
    /// (one `SET` round trip per new connection). Default true.
    pub connection_ids: bool,
    /// `POSTGRES_LEAK_DETECTION_THRESHOLD`: report connections checked out longer. Default off.
    pub leak_detection_threshold: Option<Duration>,
    /// The `pool` label on every metric of this pool and its tunnel. Default `default`.
    pub pool_label: String,
}

/// Health checks.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HealthConfig {
    /// `POSTGRES_HEALTH_CHECK_INTERVAL`.
    pub interval: Duration,
    /// Timeout of one probe. Default 5 s.
    pub timeout: Duration,
    /// Fast re-check schedule after a failure.
    pub recheck: BackoffPolicy,
}

/// Settings applied to every new database connection.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionSettings {
    /// `SET ROLE`.
    pub role: Option<String>,
    /// `POSTGRES_STATEMENT_TIMEOUT`.
    pub statement_timeout: Option<Duration>,
    /// `idle_in_transaction_session_timeout`.
    pub idle_in_transaction_session_timeout: Option<Duration>,
    /// `default_transaction_read_only = on`.
    pub read_only: bool,
}

impl PoolConfig {
    /// `profile`'s pool (see [`ProfileDefaults`]).
    pub fn for_profile(profile: Profile) -> Self {
        let d = profile.defaults();
        PoolConfig {
            max_connections: d.max_connections,
            min_connections: profile::MIN_CONNECTIONS,
            idle_timeout: d.idle_timeout,
            connect_timeout: d.connect_timeout,
            acquire_timeout: d.connect_timeout,
            max_lifetime: profile::MAX_LIFETIME,
            test_if_idle_for: profile::TEST_IF_IDLE_FOR,
            application_name: profile::APPLICATION_NAME.to_owned(),
            connection_ids: true,
            pool_label: crate::observe::metrics::DEFAULT_POOL.to_owned(),
            leak_detection_threshold: None,
        }
    }

    /// `POSTGRES_MAX_CONNECTIONS`. Default from the profile (20 / 100). With a tunnel it must not
    /// exceed `max_channels × max_sessions`.
    #[must_use]
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// `POSTGRES_MIN_CONNECTIONS`. Default 0: an idle service holds no connection (and no SSH
    /// channel) open, and the first request after a quiet period pays one connect.
    #[must_use]
    pub fn min_connections(mut self, min: u32) -> Self {
        self.min_connections = min;
        self
    }

    /// `POSTGRES_IDLE_TIMEOUT`: close a connection idle this long (down to `min_connections`).
    /// Default 30 s (both profiles).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// `POSTGRES_CONNECTION_TIMEOUT`: sets both the connect and the acquire timeout (call
    /// [`acquire_timeout`](Self::acquire_timeout) afterwards to make them differ). Default from the
    /// profile (2 s / 3 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.acquire_timeout = timeout;
        self
    }

    /// How long a caller waits for a pooled connection. Default: the connect timeout, because
    /// SeaORM's `connect_timeout` is sqlx's acquire timeout (one knob for both in practice).
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// `POSTGRES_MAX_LIFETIME`. Default 30 min (sqlx's default): long enough that reconnect cost
    /// is negligible, short enough that server-side memory growth and failovers are picked up.
    #[must_use]
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Ping a pooled connection before handing it out only if it was idle at least this long;
    /// `Duration::ZERO` pings every time. Default 10 s: a ping costs a round trip through the
    /// tunnel (~0.2 ms), which busy connections should not pay, while an idle one may have died
    /// unnoticed. A reconnect invalidates older connections regardless.
    #[must_use]
    pub fn test_if_idle_for(mut self, idle: Duration) -> Self {
        self.test_if_idle_for = idle;
        self
    }

    /// `POSTGRES_APPLICATION_NAME`: prefix of each connection id, which is sent as
    /// `application_name`. Default `sea-orm-tunnel`, so the crate's connections are recognisable
    /// in `pg_stat_activity`. At most 40 printable ASCII characters, leaving room for the id
    /// within PostgreSQL's 63-byte limit.
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// `POSTGRES_CONNECTION_IDS`: whether each new server connection is given its own id,
    /// `<application_name>-<tag>-<n>`, as its `application_name` (a `SET` right after it is
    /// established: one round trip more per new connection, which through a far bastion is
    /// one more RTT). Default true, so `pg_stat_activity` rows match the ids in events and logs.
    ///
    /// `false` saves that round trip: every connection of this manager then starts with
    /// `<application_name>-<tag>` in its startup message, so `pg_stat_activity` still tells this
    /// manager's connections from another replica's (and a forced shutdown still ends only its
    /// own), but not from each other. Events, metrics and `connection_logs` keep per-connection
    /// ids. In PgBouncer mode no `SET` is sent either way.
    #[must_use]
    pub fn connection_ids(mut self, enabled: bool) -> Self {
        self.connection_ids = enabled;
        self
    }

    /// `POSTGRES_LEAK_DETECTION_THRESHOLD`: report connections checked out longer than this.
    /// Default off: a long report query or migration is not a leak, so the threshold must be
    /// chosen for the application.
    #[must_use]
    pub fn leak_detection_threshold(mut self, threshold: impl Into<Option<Duration>>) -> Self {
        self.leak_detection_threshold = threshold.into();
        self
    }

    /// The value of the `pool` label on every metric this pool and its tunnel record, so that
    /// several pools in one process (a primary and a replica, two databases) are told apart on
    /// one `/metrics` page. Default `default`.
    ///
    /// Must be non-empty printable ASCII without spaces (`primary`, `replica-1`, `billing_db`):
    /// it ends up in metric exporters and log queries, where spaces and control characters need
    /// quoting.
    #[must_use]
    pub fn pool_label(mut self, label: impl Into<String>) -> Self {
        self.pool_label = label.into();
        self
    }
}

impl Default for PoolConfig {
    /// The development profile's pool.
    fn default() -> Self {
        Self::for_profile(Profile::Development)
    }
}

impl HealthConfig {
    /// `profile`'s health checks (see [`ProfileDefaults`]).
    pub fn for_profile(profile: Profile) -> Self {
        HealthConfig {
            interval: profile.defaults().health_check_interval,
            timeout: profile::HEALTH_TIMEOUT,
            recheck: BackoffPolicy::health_recheck(),
        }
    }

    /// `POSTGRES_HEALTH_CHECK_INTERVAL`. Default from the profile (60 s / 30 s); a dead link is
    /// found sooner by SSH keepalive, so this mostly watches PostgreSQL itself.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Timeout of one probe (tunnel check plus `SELECT 1`). Default 5 s: generous for one round
    /// trip, short enough that a hung server is reported within one interval.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Schedule of fast re-checks after a failure. Default [`BackoffPolicy::health_recheck`].
    #[must_use]
    pub fn recheck(mut self, policy: BackoffPolicy) -> Self {
        self.recheck = policy;
        self
    }
}

impl Default for HealthConfig {
    /// The development profile's health checks.
    fn default() -> Self {
        Self::for_profile(Profile::Development)
    }
}

impl SessionSettings {
    /// No session settings: connections keep the server's and the role's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// `SET ROLE` on every new connection. Default none.
    #[must_use]
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = Some(role.into());
        self
    }

    /// `POSTGRES_STATEMENT_TIMEOUT`: PostgreSQL cancels statements running longer. Default none
    /// (the server's setting); `None` also clears it.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.statement_timeout = timeout.into();
        self
    }

    /// `idle_in_transaction_session_timeout`: PostgreSQL ends sessions that sit idle inside a
    /// transaction longer. Default none (the server's setting).
    #[must_use]
    pub fn idle_in_transaction_session_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle_in_transaction_session_timeout = timeout.into();
        self
    }

    /// `default_transaction_read_only = on`. Default off.
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
}
