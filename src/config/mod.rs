//! Configuration: code first (builders with documented defaults), then environment.
//!
//! SKELETON: the type shapes below are the contract other modules code against. The config
//! work adds consuming builder setters, `from_env`, profiles, `validate()` and redaction.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

/// Deployment profile; selects defaults (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Profile {
    /// `APP_ENV=development` (default).
    #[default]
    Development,
    /// `APP_ENV=production`.
    Production,
}

/// The whole configuration.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// Profile the defaults came from.
    pub profile: Profile,
    /// `DATABASE_URL`. With a tunnel, its host:port is the remote side as seen from the bastion.
    pub database_url: SecretString,
    /// The SSH tunnel; `None` connects directly.
    pub tunnel: Option<TunnelConfig>,
    /// Pool limits and timeouts.
    pub pool: PoolConfig,
    /// Health checks.
    pub health: HealthConfig,
    /// Backoff for `manager.retry` and the recovery layer.
    pub recovery: BackoffPolicy,
    /// Per-connection session settings.
    pub session: SessionSettings,
    /// `CONNECTION_LOG_TO_DB`.
    pub log_to_db: bool,
    /// `SHUTDOWN_DRAIN_TIMEOUT`: how long shutdown waits for checked-out connections. Default 5 s.
    pub shutdown_drain_timeout: Duration,
}

/// The SSH tunnel.
#[derive(Clone)]
#[non_exhaustive]
pub struct TunnelConfig {
    /// `SSH_HOST`.
    pub host: String,
    /// `SSH_PORT`, default 22.
    pub port: u16,
    /// `SSH_USER`.
    pub user: String,
    /// How to authenticate.
    pub auth: AuthConfig,
    /// `SSH_HOST_KEY_POLICY`, default strict.
    pub host_key_policy: HostKeyPolicy,
    /// `SSH_KNOWN_HOSTS`, default `~/.ssh/known_hosts`.
    pub known_hosts: PathBuf,
    /// `SSH_REMOTE_HOST`: target as seen from the bastion (default: host of DATABASE_URL).
    pub remote_host: String,
    /// `SSH_REMOTE_PORT`: default: port of DATABASE_URL.
    pub remote_port: u16,
    /// `SSH_LOCAL_PORT`: where the local endpoint listens.
    pub local: LocalEndpointConfig,
    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session (spec maxPoolSize).
    pub max_channels: usize,
    /// `SSH_MAX_SESSIONS`: SSH sessions opened on demand, default 4.
    pub max_sessions: usize,
    /// Reconnect backoff; `initial_delay` = `SSH_RETRY_DELAY`, `max_retries` = `SSH_MAX_RETRIES` (0 = forever).
    pub reconnect: BackoffPolicy,
    /// `SSH_KEEPALIVE_INTERVAL`, default 5 s.
    pub keepalive_interval: Duration,
    /// `SSH_KEEPALIVE_MAX`: missed replies before the link counts as dead, default 3.
    pub keepalive_max: usize,
    /// TCP connect + handshake + auth timeout; also bounds how long a local connection waits for
    /// a session or capacity. Defaults to the pool connection timeout.
    pub connect_timeout: Duration,
}

/// SSH authentication sources, tried in order: key file, then agent.
#[derive(Clone)]
#[non_exhaustive]
pub struct AuthConfig {
    /// `SSH_KEY_PATH` (`~` expanded). `None` = no key file.
    pub key_path: Option<PathBuf>,
    /// `SSH_KEY_PASSPHRASE`.
    pub passphrase: Option<SecretString>,
    /// `SSH_USE_AGENT`: try the agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
}

/// How the bastion's host key is verified.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Must be in known_hosts (OpenSSH `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Learn an unknown host (append to known_hosts), reject a changed key.
    AcceptNew,
    /// Must match this `SHA256:...` fingerprint.
    Fingerprint(String),
    /// Accept any key. Insecure: logs a warning on every connect.
    InsecureAcceptAny,
}

/// Where the tunnel's local endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalEndpointConfig {
    /// `127.0.0.1:port`; 0 = ephemeral.
    Tcp(u16),
    /// A Unix socket in a private 0700 directory (created in the temp dir).
    Unix,
}

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
    /// `POSTGRES_LEAK_DETECTION_THRESHOLD`: report connections checked out longer. Default off.
    pub leak_detection_threshold: Option<Duration>,
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

/// Exponential backoff with jitter.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// First delay.
    pub initial_delay: Duration,
    /// Growth factor (>= 1.0).
    pub factor: f64,
    /// Cap of one delay.
    pub max_delay: Duration,
    /// Add up to this fraction of the delay at random (0.0..=1.0).
    pub jitter: f64,
    /// Give up after this many retries; 0 = never.
    pub max_retries: u32,
    /// Give up once this much time has passed since the first failure; `None` = no limit.
    pub max_elapsed: Option<Duration>,
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
