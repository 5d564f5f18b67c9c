//! Configuration: code first (builders with documented defaults), then environment.
//!
//! A [`Config`] is built in code with consuming, `#[must_use]` setters in the style of sqlx's
//! `PoolOptions`, or read from the environment with [`Config::from_env`] (DESIGN §3). Either way
//! [`Config::validate`] rejects contradictions before anything connects, and `Debug` never shows a
//! password, a passphrase or the password inside `DATABASE_URL`.
//!
//! ```
//! use std::time::Duration;
//! use sea_orm_tunnel::config::{Config, HostKeyPolicy, Profile, TunnelConfig};
//!
//! let config = Config::for_profile(Profile::Production, "postgres://app:secret@db.internal:5432/app")
//!     .tunnel(
//!         TunnelConfig::for_profile(Profile::Production, "bastion.example.com", "deploy")
//!             .host_key_policy(HostKeyPolicy::AcceptNew),
//!     )
//!     .map_pool(|pool| pool.min_connections(2).idle_timeout(Duration::from_secs(60)));
//!
//! // The tunnel's remote side was taken from DATABASE_URL.
//! let tunnel = config.tunnel.as_ref().unwrap();
//! assert_eq!((tunnel.remote_host.as_str(), tunnel.remote_port), ("db.internal", 5432));
//! assert_eq!(config.pool.max_connections, 100);
//! // Secrets stay out of logs.
//! assert!(!format!("{config:?}").contains("secret"));
//! ```
//!
//! # Which default applies
//!
//! Profile-dependent numbers are in [`ProfileDefaults`]; every other default is written on the
//! setter that changes it, with the reason for it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::{Error, Result};

mod env;
mod profile;
mod validate;

pub use env::{ENV_VARS, is_set};
pub use profile::ProfileDefaults;

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
///
/// Build it with [`Config::new`] / [`Config::for_profile`] and the setters, or read it with
/// [`Config::from_env`]. `Debug` redacts the password of `database_url` and every SSH secret.
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
///
/// Build it with [`TunnelConfig::new`] or [`TunnelConfig::for_profile`]; the remote side is set
/// with [`remote`](TunnelConfig::remote) or taken from `DATABASE_URL` by [`Config::tunnel`].
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
    /// Empty = not set yet.
    pub remote_host: String,
    /// `SSH_REMOTE_PORT`: default: port of DATABASE_URL. 0 = not set yet.
    pub remote_port: u16,
    /// `SSH_LOCAL_PORT`: where the local endpoint listens.
    pub local: LocalEndpointConfig,
    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session (spec maxPoolSize).
    pub max_channels: usize,
    /// `SSH_MAX_SESSIONS`: SSH sessions opened on demand, default 4 (production: 5, see
    /// [`ProfileDefaults`]).
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
    /// How long an extra SSH session opened for capacity may stay without channels before it is
    /// closed; the last session is always kept. Default 60 s.
    pub session_idle_timeout: Duration,
}

/// SSH authentication sources, tried in order: key file, then agent.
///
/// `Debug` shows whether a passphrase is set, never the passphrase.
#[derive(Clone)]
#[non_exhaustive]
pub struct AuthConfig {
    /// `SSH_KEY_PATH` (`~` expanded). `None` = no key file.
    pub key_path: Option<PathBuf>,
    /// `SSH_KEY_PASSPHRASE`.
    pub passphrase: Option<SecretString>,
    /// `SSH_USE_AGENT`: try the agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
    /// The ssh-agent socket to use instead of `SSH_AUTH_SOCK` (read when the tunnel connects).
    /// Default `None`.
    pub agent_socket: Option<PathBuf>,
}

/// How the bastion's host key is verified.
///
/// Parses from the `SSH_HOST_KEY_POLICY` spellings: `strict`, `accept-new`, `SHA256:<base64>`
/// and `insecure-accept-any`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Must be in known_hosts (OpenSSH `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Learn an unknown host (append to known_hosts), reject a changed key.
    AcceptNew,
    /// Must match this `SHA256:...` fingerprint (with the prefix, base64 unpadded, as
    /// `ssh-keygen -lf` prints it).
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
///
/// Delay *n* (from 0) is `min(initial_delay × factorⁿ, max_delay)`, plus a random extra of up to
/// `jitter` × that delay. [`delays`](BackoffPolicy::delays) yields the schedule.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// First delay.
    pub initial_delay: Duration,
    /// Growth factor (>= 1.0).
    pub factor: f64,
    /// Cap of one delay (before jitter).
    pub max_delay: Duration,
    /// Add up to this fraction of the delay at random (0.0..=1.0).
    pub jitter: f64,
    /// Give up after this many retries; 0 = never.
    pub max_retries: u32,
    /// Give up once the delays slept since the first failure would exceed this; `None` = no limit.
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

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

impl Config {
    /// A configuration with the development profile's defaults, no tunnel.
    ///
    /// `database_url` is a `postgres://` URL; with a tunnel, its host:port is the remote side as
    /// seen from the bastion. It is only parsed by [`validate`](Config::validate) and the
    /// accessors, so an invalid URL is reported there, with its password redacted.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self::for_profile(Profile::Development, database_url)
    }

    /// A configuration with `profile`'s defaults (see [`ProfileDefaults`]), no tunnel.
    pub fn for_profile(profile: Profile, database_url: impl Into<String>) -> Self {
        Config {
            profile,
            database_url: SecretString::from(database_url.into()),
            tunnel: None,
            pool: PoolConfig::for_profile(profile),
            health: HealthConfig::for_profile(profile),
            recovery: BackoffPolicy::retry(),
            session: SessionSettings::default(),
            // Writing every connection event to the database is opt-in: it costs a table, a
            // migration and a little load on the server the application depends on.
            log_to_db: false,
            shutdown_drain_timeout: profile::SHUTDOWN_DRAIN_TIMEOUT,
        }
    }

    /// Replaces `DATABASE_URL`. It does not change the remote side of a tunnel that was already set.
    #[must_use]
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = SecretString::from(url.into());
        self
    }

    /// Connects through this SSH tunnel.
    ///
    /// A remote host or port the tunnel leaves unset (empty / 0) is taken from `DATABASE_URL`'s
    /// host and port. If the URL has no TCP host (a Unix socket path, or it does not parse),
    /// they stay unset and [`validate`](Config::validate) says so.
    ///
    /// The tunnel keeps its own numbers: for production use
    /// [`TunnelConfig::for_profile`]`(Profile::Production, ..)` so that its channel and session
    /// caps carry the production pool.
    #[must_use]
    pub fn tunnel(mut self, mut tunnel: TunnelConfig) -> Self {
        if (tunnel.remote_host.is_empty() || tunnel.remote_port == 0)
            && let Ok(Some((host, port))) = self.database_target()
        {
            if tunnel.remote_host.is_empty() {
                tunnel.remote_host = host;
            }
            if tunnel.remote_port == 0 {
                tunnel.remote_port = port;
            }
        }
        self.tunnel = Some(tunnel);
        self
    }

    /// Connects directly, without a tunnel.
    #[must_use]
    pub fn without_tunnel(mut self) -> Self {
        self.tunnel = None;
        self
    }

    /// Changes the tunnel in place, if there is one.
    #[must_use]
    pub fn map_tunnel(mut self, f: impl FnOnce(TunnelConfig) -> TunnelConfig) -> Self {
        self.tunnel = self.tunnel.map(f);
        self
    }

    /// Replaces the pool settings.
    #[must_use]
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Changes the pool settings in place, keeping the profile's other defaults.
    #[must_use]
    pub fn map_pool(mut self, f: impl FnOnce(PoolConfig) -> PoolConfig) -> Self {
        self.pool = f(self.pool);
        self
    }

    /// Replaces the health-check settings.
    #[must_use]
    pub fn health(mut self, health: HealthConfig) -> Self {
        self.health = health;
        self
    }

    /// Changes the health-check settings in place.
    #[must_use]
    pub fn map_health(mut self, f: impl FnOnce(HealthConfig) -> HealthConfig) -> Self {
        self.health = f(self.health);
        self
    }

    /// Backoff for `manager.retry` and the recovery layer. Default [`BackoffPolicy::retry`].
    #[must_use]
    pub fn recovery(mut self, recovery: BackoffPolicy) -> Self {
        self.recovery = recovery;
        self
    }

    /// Changes the recovery backoff in place.
    #[must_use]
    pub fn map_recovery(mut self, f: impl FnOnce(BackoffPolicy) -> BackoffPolicy) -> Self {
        self.recovery = f(self.recovery);
        self
    }

    /// Replaces the per-connection session settings. Default: none.
    #[must_use]
    pub fn session(mut self, session: SessionSettings) -> Self {
        self.session = session;
        self
    }

    /// Changes the per-connection session settings in place.
    #[must_use]
    pub fn map_session(mut self, f: impl FnOnce(SessionSettings) -> SessionSettings) -> Self {
        self.session = f(self.session);
        self
    }

    /// `CONNECTION_LOG_TO_DB`: write connection events to `connection_logs`.
    ///
    /// Default `false`: the log table needs the migration and adds writes to the database the
    /// application depends on, so it is opt-in.
    #[must_use]
    pub fn log_to_db(mut self, enabled: bool) -> Self {
        self.log_to_db = enabled;
        self
    }

    /// `SHUTDOWN_DRAIN_TIMEOUT`: how long shutdown waits for checked-out connections before it
    /// closes them by force. Zero closes them at once.
    ///
    /// Default 5 s (the spec's), which is shorter than the usual 10–30 s an orchestrator waits
    /// between SIGTERM and SIGKILL, so the rest of shutdown still runs.
    #[must_use]
    pub fn shutdown_drain_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_drain_timeout = timeout;
        self
    }

    /// `DATABASE_URL` with its password, for the code that connects. Never log this.
    #[allow(dead_code)] // Used by the manager.
    pub(crate) fn database_url_str(&self) -> &str {
        self.database_url.expose_secret()
    }

    /// `DATABASE_URL` with the password replaced by `***`; safe to log.
    pub fn redacted_database_url(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }

    /// `DATABASE_URL` parsed into sqlx's connect options.
    ///
    /// Errors are [`Error::Config`] for `database_url` and never contain the password; a URL
    /// that does not parse is not repeated at all (it cannot be reliably redacted).
    pub fn database_options(&self) -> Result<sea_orm::sqlx::postgres::PgConnectOptions> {
        parse_database_url(self.database_url.expose_secret(), "database_url")
    }

    /// Host and port of `DATABASE_URL` when it names a TCP server; `None` when it points at a Unix
    /// socket. An IPv6 host is returned without brackets.
    pub fn database_target(&self) -> Result<Option<(String, u16)>> {
        let options = self.database_options()?;
        Ok(tcp_target(&options))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("profile", &self.profile)
            .field("database_url", &self.redacted_database_url())
            .field("tunnel", &self.tunnel)
            .field("pool", &self.pool)
            .field("health", &self.health)
            .field("recovery", &self.recovery)
            .field("session", &self.session)
            .field("log_to_db", &self.log_to_db)
            .field("shutdown_drain_timeout", &self.shutdown_drain_timeout)
            .finish()
    }
}

/// Parses a `postgres://` URL, naming `field` in errors and never echoing the password.
pub(crate) fn parse_database_url(url: &str, field: &str) -> Result<sea_orm::sqlx::postgres::PgConnectOptions> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::config(
            field,
            "is not set (expected postgres://user:password@host:port/database)",
        ));
    }
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") => {}
        Some(s) if s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) => {
            return Err(Error::config(
                field,
                format!("scheme {s:?} is not postgres:// or postgresql:// (PostgreSQL is the only database supported)"),
            ));
        }
        _ => {
            return Err(Error::config(
                field,
                "is not a URL: expected postgres://user:password@host:port/database (value not shown: it may contain a password)",
            ));
        }
    }
    sea_orm::sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| {
        // sqlx's messages name the part that failed (port, sslmode, UTF-8), never the password.
        Error::config(
            field,
            format!("is not a valid PostgreSQL URL: {e} (value not shown: it may contain a password)"),
        )
    })
}

/// TCP host and port of parsed options; `None` for a Unix socket.
fn tcp_target(options: &sea_orm::sqlx::postgres::PgConnectOptions) -> Option<(String, u16)> {
    if options.get_socket().is_some() {
        return None;
    }
    let host = options.get_host();
    // sqlx falls back to a socket directory (e.g. /var/run/postgresql) as the "host" when the
    // URL names none and a local server's socket exists.
    if host.is_empty() || host.starts_with('/') {
        return None;
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((host.to_owned(), options.get_port()))
}

// ---------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------

/// A URL with its password replaced by `***`, safe to log.
///
/// Handles `scheme://user:password@host/...`, a `password=` query parameter, and malformed input
/// conservatively: when it is unclear where a password ends, more is hidden rather than less.
///
/// ```
/// use sea_orm_tunnel::config::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/app"), "postgres://app:***@db:5432/app");
/// assert_eq!(redact_url("postgres://db/app?user=app&password=s3cret"), "postgres://db/app?user=app&password=***");
/// assert_eq!(redact_url("postgres://app@db/app"), "postgres://app@db/app");
/// ```
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let mut out = String::with_capacity(url.len() + 3);
    out.push_str(head);

    // A password-like query parameter hides everything from its value to the end: an unencoded
    // '&', '#' or '@' may sit inside it, and nothing after it is worth a leak.
    let (rest, hide_tail) = match secret_param_value(rest) {
        Some(value_start) => (&rest[..value_start], true),
        None => (rest, false),
    };

    if let Some(at) = rest.rfind('@') {
        // The last '@' (before any password parameter) ends the user info even when an
        // unencoded '@', '/', '?' or '#' sits in the password.
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) => {
                out.push_str(&userinfo[..colon]);
                out.push_str(":***");
            }
            None => out.push_str(userinfo),
        }
        out.push_str(&rest[at..]);
    } else {
        // No '@': `user:password` without a host looks like `host:port`. Keep a numeric port (or
        // an IPv6 literal); otherwise hide everything after the colon, since the password may
        // start with '/', '?' or '#'.
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        match authority.find(':') {
            Some(colon)
                if !authority.starts_with('[')
                    && (colon + 1 == authority.len()
                        || !authority[colon + 1..].bytes().all(|b| b.is_ascii_digit())) =>
            {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                return out;
            }
            _ => out.push_str(rest),
        }
    }
    if hide_tail {
        out.push_str("***");
        // Parameters after the password stay visible only when they are unmistakably
        // parameters (`&name=value`, no '#', '@' or stray '&'); otherwise they may be the rest of
        // an unencoded password and stay hidden.
        let value = &url[start + rest.len()..];
        if let Some(amp) = value.find('&') {
            let tail = &value[amp + 1..];
            if tail.split('&').all(is_plain_param) {
                out.push_str(&value[amp..]);
            }
        }
    }
    out
}

fn is_plain_param(pair: &str) -> bool {
    let Some((key, value)) = pair.split_once('=') else {
        return false;
    };
    !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !key.to_ascii_lowercase().contains("pass")
        && !value.contains(['#', '@', '='])
}

/// Start of the value of the first query parameter whose name contains "pass" (any case).
fn secret_param_value(rest: &str) -> Option<usize> {
    rest.char_indices()
        .filter(|&(_, c)| c == '?' || c == '&')
        .find_map(|(i, _)| {
            let tail = &rest[i + 1..];
            let eq = tail.find(['=', '&'])?;
            (tail.as_bytes()[eq] == b'=' && tail[..eq].to_ascii_lowercase().contains("pass")).then_some(i + 1 + eq + 1)
        })
}

/// `Debug` of a secret: only whether it is there.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------------------------
// TunnelConfig
// ---------------------------------------------------------------------------------------------

impl TunnelConfig {
    /// A tunnel through `user@host:22` with the development profile's defaults.
    ///
    /// The remote side is unset until [`remote`](Self::remote) sets it or [`Config::tunnel`]
    /// takes it from `DATABASE_URL`. Authentication defaults to [`AuthConfig::new`]
    /// (`~/.ssh/id_ed25519` if it exists, and the agent if `SSH_AUTH_SOCK` points at a socket).
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> Self {
        Self::for_profile(Profile::Development, host, user)
    }

    /// A tunnel through `user@host:22` with `profile`'s defaults (see [`ProfileDefaults`]).
    pub fn for_profile(profile: Profile, host: impl Into<String>, user: impl Into<String>) -> Self {
        let d = profile.defaults();
        TunnelConfig {
            host: host.into(),
            port: profile::SSH_PORT,
            user: user.into(),
            auth: AuthConfig::new(),
            // Verify like OpenSSH does by default; anything weaker must be chosen explicitly.
            host_key_policy: HostKeyPolicy::Strict,
            known_hosts: home_dir().map_or_else(|| PathBuf::from(".ssh/known_hosts"), |h| h.join(".ssh/known_hosts")),
            remote_host: String::new(),
            remote_port: 0,
            // An ephemeral loopback port never collides with another process or a second tunnel.
            local: LocalEndpointConfig::Tcp(0),
            max_channels: d.max_channels,
            max_sessions: d.max_sessions,
            reconnect: BackoffPolicy::reconnect(profile),
            keepalive_interval: profile::KEEPALIVE_INTERVAL,
            keepalive_max: profile::KEEPALIVE_MAX,
            connect_timeout: d.connect_timeout,
            session_idle_timeout: Duration::from_secs(60),
        }
    }

    /// `SSH_HOST`: the bastion.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// `SSH_PORT`. Default 22, the SSH standard port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// `SSH_USER`.
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// Authentication sources. Default [`AuthConfig::new`].
    #[must_use]
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// Changes the authentication sources in place.
    #[must_use]
    pub fn map_auth(mut self, f: impl FnOnce(AuthConfig) -> AuthConfig) -> Self {
        self.auth = f(self.auth);
        self
    }

    /// `SSH_HOST_KEY_POLICY`. Default [`HostKeyPolicy::Strict`]: the key must already be in
    /// known_hosts, as OpenSSH requires by default; TOFU and pinning are opt-in.
    #[must_use]
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.host_key_policy = policy;
        self
    }

    /// `SSH_KNOWN_HOSTS` (a leading `~/` is expanded with `$HOME`). Default `~/.ssh/known_hosts`,
    /// the file OpenSSH uses, so hosts the user already trusts are trusted here.
    #[must_use]
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_hosts = expand_home(path.into());
        self
    }

    /// `SSH_REMOTE_HOST` / `SSH_REMOTE_PORT`: the PostgreSQL server as seen from the bastion.
    /// Default: host and port of `DATABASE_URL` (filled in by [`Config::tunnel`]).
    #[must_use]
    pub fn remote(mut self, host: impl Into<String>, port: u16) -> Self {
        self.remote_host = host.into();
        self.remote_port = port;
        self
    }

    /// `SSH_LOCAL_PORT`: where the local endpoint listens. Default `Tcp(0)`: an ephemeral
    /// loopback port, which never collides with another process or another tunnel.
    #[must_use]
    pub fn local(mut self, local: LocalEndpointConfig) -> Self {
        self.local = local;
        self
    }

    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session. Default from the profile
    /// (10 / 20, the spec's `maxPoolSize`): sshd serves each session in one process, so this
    /// bounds how much crypto one process does.
    #[must_use]
    pub fn max_channels(mut self, max: usize) -> Self {
        self.max_channels = max;
        self
    }

    /// `SSH_MAX_SESSIONS`: SSH sessions opened on demand when every session is full. Default 4
    /// (production 5, see [`ProfileDefaults`]): enough for the profile's pool, few enough not to
    /// look like a connection flood to the bastion.
    #[must_use]
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// Reconnect backoff. Default [`BackoffPolicy::reconnect`] for the profile.
    #[must_use]
    pub fn reconnect(mut self, policy: BackoffPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Changes the reconnect backoff in place.
    #[must_use]
    pub fn map_reconnect(mut self, f: impl FnOnce(BackoffPolicy) -> BackoffPolicy) -> Self {
        self.reconnect = f(self.reconnect);
        self
    }

    /// `SSH_KEEPALIVE_INTERVAL`. Default 5 s: with 3 missed replies a silent dead link is found
    /// in about 20 s, long before the 30–60 s health interval, at one tiny packet per 5 s.
    #[must_use]
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = interval;
        self
    }

    /// `SSH_KEEPALIVE_MAX`: missed keepalive replies before the link counts as dead. Default 3
    /// (OpenSSH's `ServerAliveCountMax`): one lost packet on a busy link is not an outage.
    #[must_use]
    pub fn keepalive_max(mut self, max: usize) -> Self {
        self.keepalive_max = max;
        self
    }

    /// TCP connect + handshake + auth timeout, also the bound on how long a local connection
    /// waits for a session or a free channel. Default: the profile's connection timeout (2 s /
    /// 3 s), so the tunnel never waits longer than the pool would for a connection.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an extra SSH session opened for capacity may stay without channels before it is
    /// closed (SSH disconnect); the last session is always kept. Default 60 s: a burst that needed
    /// more sessions does not leave idle sshd processes behind for the tunnel's whole life, and a
    /// pool that cycles its connections does not reopen a session for every one. Must be above zero.
    #[must_use]
    pub fn session_idle_timeout(mut self, timeout: Duration) -> Self {
        self.session_idle_timeout = timeout;
        self
    }

    /// The remote target as `host:port` (IPv6 hosts in brackets), for logs and errors.
    pub fn remote_target(&self) -> String {
        if self.remote_host.contains(':') {
            format!("[{}]:{}", self.remote_host, self.remote_port)
        } else {
            format!("{}:{}", self.remote_host, self.remote_port)
        }
    }
}

impl fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("auth", &self.auth)
            .field("host_key_policy", &self.host_key_policy)
            .field("known_hosts", &self.known_hosts)
            .field("remote_host", &self.remote_host)
            .field("remote_port", &self.remote_port)
            .field("local", &self.local)
            .field("max_channels", &self.max_channels)
            .field("max_sessions", &self.max_sessions)
            .field("reconnect", &self.reconnect)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_max", &self.keepalive_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("session_idle_timeout", &self.session_idle_timeout)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// AuthConfig
// ---------------------------------------------------------------------------------------------

impl AuthConfig {
    /// What `ssh` would try: `~/.ssh/id_ed25519` if that file exists, and the agent if
    /// `SSH_AUTH_SOCK` points at an existing socket. Reads `HOME` and `SSH_AUTH_SOCK` from the
    /// process environment.
    pub fn new() -> Self {
        let key = home_dir().map(|h| h.join(".ssh/id_ed25519")).filter(|p| p.exists());
        let agent = std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| Path::new(&s).exists());
        AuthConfig {
            key_path: key,
            passphrase: None,
            use_agent: agent,
            agent_socket: None,
        }
    }

    /// Only this private key (a leading `~/` is expanded with `$HOME`), no agent.
    pub fn key_file(path: impl Into<PathBuf>) -> Self {
        AuthConfig {
            key_path: Some(expand_home(path.into())),
            passphrase: None,
            use_agent: false,
            agent_socket: None,
        }
    }

    /// Only the agent at `SSH_AUTH_SOCK`, no key file.
    pub fn agent() -> Self {
        AuthConfig {
            key_path: None,
            passphrase: None,
            use_agent: true,
            agent_socket: None,
        }
    }

    /// `SSH_KEY_PATH`: the private key to offer first (a leading `~/` is expanded with `$HOME`).
    #[must_use]
    pub fn key_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_path = Some(expand_home(path.into()));
        self
    }

    /// Offers no key file (agent only, if enabled).
    #[must_use]
    pub fn without_key(mut self) -> Self {
        self.key_path = None;
        self.passphrase = None;
        self
    }

    /// `SSH_KEY_PASSPHRASE`: decrypts an encrypted key. Default none.
    #[must_use]
    pub fn passphrase(mut self, passphrase: impl Into<String>) -> Self {
        self.passphrase = Some(SecretString::from(passphrase.into()));
        self
    }

    /// `SSH_USE_AGENT`: also try the keys of the agent at `SSH_AUTH_SOCK`. Default: on when that
    /// socket exists, as `ssh` does.
    #[must_use]
    pub fn use_agent(mut self, enabled: bool) -> Self {
        self.use_agent = enabled;
        self
    }

    /// Use the ssh-agent listening on `socket` instead of the one `SSH_AUTH_SOCK` names, and
    /// enable the agent. For services that run their own agent, and for tests.
    #[must_use]
    pub fn agent_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.agent_socket = Some(socket.into());
        self.use_agent = true;
        self
    }
}

impl Default for AuthConfig {
    /// Same as [`AuthConfig::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("key_path", &self.key_path)
            .field("passphrase", &self.passphrase.as_ref().map(|_| Redacted))
            .field("use_agent", &self.use_agent)
            .field("agent_socket", &self.agent_socket)
            .finish()
    }
}

/// `$HOME` from the process environment.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from)
}

/// Expands a leading `~` / `~/` with the process's `$HOME`; other paths are returned unchanged.
fn expand_home(path: PathBuf) -> PathBuf {
    match (path.strip_prefix("~"), home_dir()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path,
    }
}

// ---------------------------------------------------------------------------------------------
// HostKeyPolicy, LocalEndpointConfig
// ---------------------------------------------------------------------------------------------

impl HostKeyPolicy {
    /// Pins a `SHA256:<base64>` fingerprint as `ssh-keygen -lf KEY` prints it. Base64 padding
    /// (`=`) is removed; anything that is not a SHA-256 fingerprint is an error.
    pub fn fingerprint(fingerprint: &str) -> Result<Self> {
        let fp = fingerprint.trim();
        let body = fp.strip_prefix("SHA256:").or_else(|| {
            fp.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("sha256:"))
                .map(|_| &fp[7..])
        });
        match body.map(|b| b.trim_end_matches('=')) {
            Some(b) if is_sha256_base64(b) => Ok(HostKeyPolicy::Fingerprint(format!("SHA256:{b}"))),
            _ => Err(Error::config(
                "SSH_HOST_KEY_POLICY",
                format!(
                    "{fp:?} is not a host key fingerprint of the form SHA256:<43 base64 characters> \
                     (see `ssh-keygen -lf KEY`), nor one of strict, accept-new, insecure-accept-any"
                ),
            )),
        }
    }
}

/// Whether `b` is the unpadded base64 of 32 bytes: 43 characters of the standard alphabet, the
/// last of which carries only 2 data bits (so a typo in it is caught too).
pub(crate) fn is_sha256_base64(b: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = b.as_bytes();
    bytes.len() == 43
        && bytes.iter().all(|c| ALPHABET.contains(c))
        && ALPHABET
            .iter()
            .position(|c| *c == bytes[42])
            .is_some_and(|i| i % 4 == 0)
}

impl FromStr for HostKeyPolicy {
    type Err = Error;

    /// `strict`, `accept-new`, `insecure-accept-any` (case-insensitive) or `SHA256:<base64>`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(HostKeyPolicy::Strict),
            "accept-new" => Ok(HostKeyPolicy::AcceptNew),
            "insecure-accept-any" => Ok(HostKeyPolicy::InsecureAcceptAny),
            _ => HostKeyPolicy::fingerprint(s),
        }
    }
}

impl fmt::Display for HostKeyPolicy {
    /// The `SSH_HOST_KEY_POLICY` spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyPolicy::Strict => f.write_str("strict"),
            HostKeyPolicy::AcceptNew => f.write_str("accept-new"),
            HostKeyPolicy::Fingerprint(fp) => f.write_str(fp),
            HostKeyPolicy::InsecureAcceptAny => f.write_str("insecure-accept-any"),
        }
    }
}

impl Default for LocalEndpointConfig {
    /// `Tcp(0)`: an ephemeral loopback port.
    fn default() -> Self {
        LocalEndpointConfig::Tcp(0)
    }
}

impl fmt::Display for LocalEndpointConfig {
    /// The `SSH_LOCAL_PORT` spelling: a port number or `unix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalEndpointConfig::Tcp(port) => write!(f, "{port}"),
            LocalEndpointConfig::Unix => f.write_str("unix"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PoolConfig, HealthConfig, SessionSettings
// ---------------------------------------------------------------------------------------------

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
    /// Default 30 s (both profiles, the spec's).
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
    /// unnoticed (DESIGN §7.8). A reconnect invalidates older connections regardless.
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

    /// `POSTGRES_LEAK_DETECTION_THRESHOLD`: report connections checked out longer than this.
    /// Default off: a long report query or migration is not a leak, so the threshold must be
    /// chosen for the application.
    #[must_use]
    pub fn leak_detection_threshold(mut self, threshold: impl Into<Option<Duration>>) -> Self {
        self.leak_detection_threshold = threshold.into();
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

// ---------------------------------------------------------------------------------------------
// BackoffPolicy
// ---------------------------------------------------------------------------------------------

/// A `backoff` 0.4 policy as a [`BackoffPolicy`] (feature `backoff`), for code that already
/// configures one.
///
/// The intervals, multiplier and `max_elapsed_time` carry over; `randomization_factor` becomes
/// [`jitter`](BackoffPolicy::jitter) (clamped to `0.0..=1.0`). `backoff` spreads a delay to
/// `d ± d × factor`; ours adds up to `d × jitter`, so a jittered delay is never shorter than the
/// schedule. `backoff` has no retry count: `max_retries` is 0 (bounded by `max_elapsed` only).
///
/// ```
/// use std::time::Duration;
/// use sea_orm_tunnel::config::BackoffPolicy;
///
/// let theirs = backoff::ExponentialBackoffBuilder::new()
///     .with_initial_interval(Duration::from_millis(250))
///     .with_max_elapsed_time(Some(Duration::from_secs(30)))
///     .build();
/// let ours = BackoffPolicy::from(&theirs);
/// assert_eq!(ours.initial_delay, Duration::from_millis(250));
/// assert_eq!(ours.max_elapsed, Some(Duration::from_secs(30)));
/// ```
#[cfg(feature = "backoff")]
impl<C> From<&backoff::exponential::ExponentialBackoff<C>> for BackoffPolicy {
    fn from(b: &backoff::exponential::ExponentialBackoff<C>) -> Self {
        BackoffPolicy::new(b.initial_interval)
            .factor(b.multiplier.max(1.0))
            .max_delay(b.max_interval.max(b.initial_interval))
            .jitter(b.randomization_factor.clamp(0.0, 1.0))
            .max_retries(0)
            .max_elapsed(b.max_elapsed_time)
    }
}

impl BackoffPolicy {
    /// Exponential backoff starting at `initial_delay`: factor 2 (the usual doubling), at most
    /// 30 s per delay, 20 % jitter, no retry or time limit.
    pub fn new(initial_delay: Duration) -> Self {
        BackoffPolicy {
            initial_delay,
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
            max_retries: 0,
            max_elapsed: None,
        }
    }

    /// SSH reconnects for `profile`: `SSH_RETRY_DELAY` first (1 s / 2 s), doubling, at most 30 s
    /// per delay, 20 % jitter, `SSH_MAX_RETRIES` attempts (3 / 5), no time limit.
    ///
    /// 30 s caps the wait after a bastion reboot; the jitter keeps many instances that lost the
    /// same bastion from reconnecting in lockstep.
    pub fn reconnect(profile: Profile) -> Self {
        let d = profile.defaults();
        Self::new(d.ssh_retry_delay).max_retries(d.ssh_max_retries)
    }

    /// Retrying a failed database operation (`manager.retry`, the recovery layer): 100 ms first,
    /// doubling, at most 2 s per delay, 50 % jitter, 3 retries, at most 5 s of sleeping in all.
    ///
    /// A lost SSH session is replaced in ~0.1–1 s (DESIGN §7.9), which 100 + 200 + 400 ms cover;
    /// the wide jitter spreads the retries of many requests that failed together; the time limit
    /// keeps a request from hanging when the retries are raised.
    pub fn retry() -> Self {
        Self::new(Duration::from_millis(100))
            .max_delay(Duration::from_secs(2))
            .jitter(0.5)
            .max_retries(3)
            .max_elapsed(Duration::from_secs(5))
    }

    /// Health re-checks after a failure: 500 ms first, doubling, at most 10 s per delay, 20 %
    /// jitter, until healthy again.
    ///
    /// Recovery is noticed within seconds instead of a whole health interval, while an outage
    /// costs at most one probe per 10 s.
    pub fn health_recheck() -> Self {
        Self::new(Duration::from_millis(500)).max_delay(Duration::from_secs(10))
    }

    /// First delay.
    #[must_use]
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Growth factor of each delay; at least 1.0.
    #[must_use]
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Cap of one delay before jitter.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Fraction of each delay (0.0..=1.0) added at random: a delay `d` becomes a uniform value in
    /// `[d, d × (1 + jitter))`. 0 disables jitter.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Give up after this many retries; 0 = never.
    #[must_use]
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Give up once the delays slept would add up to more than this; `None` = no limit.
    #[must_use]
    pub fn max_elapsed(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.max_elapsed = limit.into();
        self
    }

    /// The delays to sleep before each retry, ending when `max_retries` or `max_elapsed` is
    /// reached (never, if neither is set).
    ///
    /// Built on [`backon::ExponentialBuilder`] (initial delay, factor, max delay, max times), with
    /// two adaptations:
    ///
    /// - **Jitter.** backon's `with_jitter` adds a uniform random `[0, d)` to a delay `d`: that is
    ///   our `jitter = 1.0`. For a fraction we build the schedule without backon's jitter and add
    ///   `d × jitter × U[0, 1)` ourselves, on top of the capped delay as backon does.
    /// - **`max_elapsed`.** backon's `with_total_delay` would bound the sum of the delays
    ///   *before* our jitter, and sums them as computed in `f32`; we stop the iterator as soon as
    ///   the delays actually yielded would pass `max_elapsed` (the same "cumulative + next >
    ///   limit" rule), so the limit holds for what callers sleep.
    ///
    /// backon multiplies in `f32`, which leaves a few nanoseconds of noise (200 ms comes out as
    /// 200.000003 ms); delays are rounded to whole microseconds below 1 s and to whole
    /// milliseconds above, never past `max_delay`. An invalid policy (see
    /// [`validate`](Self::validate)) does not panic here.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        self.delays_with(fastrand::Rng::new())
    }

    /// [`delays`](Self::delays) with a seeded random source, for reproducible schedules.
    pub fn delays_seeded(&self, seed: u64) -> impl Iterator<Item = Duration> + Send + 'static {
        self.delays_with(fastrand::Rng::with_seed(seed))
    }

    fn delays_with(&self, mut rng: fastrand::Rng) -> impl Iterator<Item = Duration> + Send + 'static {
        use backon::BackoffBuilder as _;

        let mut builder = backon::ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_factor(if self.factor.is_finite() {
                self.factor as f32
            } else {
                1.0
            })
            .with_max_delay(self.max_delay);
        builder = match self.max_retries {
            0 => builder.without_max_times(),
            n => builder.with_max_times(n as usize),
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let limit = self.max_elapsed;
        let max_delay = self.max_delay;
        let mut slept = Duration::ZERO;
        builder.build().map_while(move |d| {
            let d = round_delay(d, max_delay);
            let d = if jitter > 0.0 {
                Duration::try_from_secs_f64(d.as_secs_f64() * (1.0 + jitter * rng.f64())).unwrap_or(d)
            } else {
                d
            };
            slept = slept.saturating_add(d);
            match limit {
                Some(limit) if slept > limit => None,
                _ => Some(d),
            }
        })
    }
}

/// Removes backon's `f32` noise: whole microseconds below 1 s, whole milliseconds above; a delay
/// within the cap stays within it.
fn round_delay(d: Duration, max_delay: Duration) -> Duration {
    let unit = if d < Duration::from_secs(1) { 1_000 } else { 1_000_000 };
    let nanos = d.as_nanos();
    let rounded = (nanos + unit / 2) / unit * unit;
    let rounded = Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX));
    if d <= max_delay {
        rounded.min(max_delay)
    } else {
        rounded
    }
}

impl Default for BackoffPolicy {
    /// [`BackoffPolicy::retry`].
    fn default() -> Self {
        Self::retry()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_every_password_form() {
        let cases = [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://h:5432/db?sslmode=disable",
                "postgres://h:5432/db?sslmode=disable",
            ),
            ("postgres://u:p@ss/w#rd@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pw", "postgres://u:***"),
            ("postgres://[::1]:5432/db", "postgres://[::1]:5432/db"),
            (
                "postgres://h/db?user=u&password=pw&x=1",
                "postgres://h/db?user=u&password=***&x=1",
            ),
            // '#' may be part of an unencoded password: hidden with it.
            ("postgres://h/db?PassWord=pw#frag", "postgres://h/db?PassWord=***"),
            ("postgres://h/db?password=pw&Secret", "postgres://h/db?password=***"),
            ("postgres://h/db?password=p&w=x#y", "postgres://h/db?password=***"),
            ("u:pw@h/db", "u:***@h/db"),
        ];
        for (input, expected) in cases {
            let got = redact_url(input);
            assert_eq!(got, expected, "{input}");
            assert!(!got.contains("pw"), "{got}");
        }
    }

    #[test]
    fn database_target_strips_ipv6_brackets() {
        let c = Config::new("postgres://u:pw@[::1]:6543/db");
        assert_eq!(c.database_target().unwrap(), Some(("::1".to_owned(), 6543)));
        let c = Config::new("postgres://u:pw@db.internal/db");
        assert_eq!(c.database_target().unwrap(), Some(("db.internal".to_owned(), 5432)));
        let c = Config::new("postgres://u:pw@localhost/db?host=/var/run/postgresql");
        assert_eq!(c.database_target().unwrap(), None);
    }

    #[test]
    fn fingerprint_shape() {
        let good = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        assert_eq!(
            HostKeyPolicy::from_str(good).unwrap(),
            HostKeyPolicy::Fingerprint(good.into())
        );
        assert_eq!(
            HostKeyPolicy::from_str(&format!("{good}=")).unwrap(),
            HostKeyPolicy::Fingerprint(good.into())
        );
        // Last character carries bits that a 32-byte value cannot have.
        assert!(HostKeyPolicy::from_str("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2t").is_err());
        assert!(HostKeyPolicy::from_str("SHA256:short").is_err());
        assert!(HostKeyPolicy::from_str("MD5:aa:bb").is_err());
    }
}
