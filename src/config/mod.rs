//! Configuration: code first (builders with documented defaults), then environment.
//!
//! A [`Config`] is built in code with consuming, `#[must_use]` setters in the style of sqlx's
//! `PoolOptions`, or read from the environment with [`Config::from_env`]. Either way
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
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::Result;
use crate::url::{parse_database_url, tcp_target};

mod backoff;
mod env;
mod password;
mod pool;
mod profile;
mod target;
mod tunnel;
mod validate;

pub use crate::ssh_config::SshConfigSource;
pub use crate::url::redact_url;
pub use backoff::BackoffPolicy;
pub use env::{ENV_VARS, is_set};
pub use password::{Credential, CredentialFuture, PasswordProvider, PasswordSource, PasswordSourceKind};
pub use pool::{HealthConfig, PoolConfig, SessionSettings};
pub use profile::ProfileDefaults;
pub(crate) use target::ServerRole;
pub use target::TargetSessionAttrs;
pub use tunnel::BastionHost;
pub use tunnel::{AuthConfig, DEFAULT_CHANNEL_WINDOW, HostKeyPolicy, JumpHost, LocalEndpointConfig, TunnelConfig};

/// Deployment profile; selects the defaults in [`ProfileDefaults`].
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
    /// `DATABASE_PASSWORD_FILE`, or a provider: a password that rotates. `None` = the password of
    /// `DATABASE_URL`. Default `None`.
    pub password_source: Option<PasswordSource>,
    /// `POSTGRES_PGBOUNCER`: the database is reached through a transaction pooler (PgBouncer,
    /// pgcat, Supavisor, RDS Proxy). `pgbouncer=true|false` in `DATABASE_URL` wins. See
    /// [`pgbouncer`](Self::pgbouncer). Default false.
    pub pgbouncer: bool,
    /// `PGTARGETSESSIONATTRS` (libpq's variable): which server of `DATABASE_URL`'s hosts the pool
    /// uses. `target_session_attrs=` in `DATABASE_URL` wins. See [`TargetSessionAttrs`].
    /// Default [`TargetSessionAttrs::Any`].
    pub target_session_attrs: TargetSessionAttrs,
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
            password_source: None,
            pgbouncer: false,
            target_session_attrs: TargetSessionAttrs::Any,
        }
    }

    /// `POSTGRES_PGBOUNCER`: PgBouncer transaction-mode compatibility (`pgbouncer=true` in
    /// `DATABASE_URL` wins over this).
    ///
    /// - Through the tunnel, the forward path rewrites sqlx's named prepared statements to the
    ///   unnamed statement (re-parsed when the pooler lent another server), so any transaction
    ///   pooler works, PgBouncer 1.18 included. Without a tunnel the pooler must support
    ///   prepared statements itself (PgBouncer ≥ 1.21 with `max_prepared_statements`).
    /// - `extra_float_digits` and `options` are not sent at startup; session settings (role,
    ///   timeouts, read-only) are a validation error, since they would leak to other clients of
    ///   the pooler's server connections. `application_name` is allowed (the pooler tracks it).
    /// - Per-connection ids are not set on the server (a `SET` would leak too), and shutdown
    ///   never terminates the pooler's server connections.
    #[must_use]
    pub fn pgbouncer(mut self, enabled: bool) -> Self {
        self.pgbouncer = enabled;
        self
    }

    /// `PGTARGETSESSIONATTRS`: what a server must be for the pool to use it (libpq's
    /// `target_session_attrs`; `target_session_attrs=` in `DATABASE_URL` wins over this).
    ///
    /// With several hosts in `DATABASE_URL` (`postgres://a:5432,b:5432/db` or `?host=a,b`) they
    /// are tried in order, through the tunnel (the bastion dials each) or directly, and the first
    /// that qualifies takes the pool's new connections. Every new connection checks the role of
    /// its server in the round trip that sets it up, the health check and the idle ping check it
    /// too; a connection whose server stopped qualifying (a demoted primary) is retired with its
    /// whole pool generation, and the hosts are tried again. `SSH_REMOTE_HOST` / `SSH_REMOTE_PORT`
    /// override the list with one host.
    #[must_use]
    pub fn target_session_attrs(mut self, attrs: TargetSessionAttrs) -> Self {
        self.target_session_attrs = attrs;
        self
    }

    /// The attribute in force: `target_session_attrs=` in `DATABASE_URL`, else the setting.
    pub fn resolve_target_session_attrs(&self) -> Result<TargetSessionAttrs> {
        Ok(
            crate::url::target_session_attrs_param(self.database_url.expose_secret(), "DATABASE_URL")?
                .unwrap_or(self.target_session_attrs),
        )
    }

    /// The TCP servers `DATABASE_URL` names, in order (one for an ordinary URL, none for a Unix
    /// socket). An IPv6 host is returned without brackets.
    pub fn database_hosts(&self) -> Result<Vec<(String, u16)>> {
        let listed = crate::url::url_hosts(self.database_url.expose_secret(), "database_url")?;
        if !listed.is_empty() {
            return Ok(listed);
        }
        Ok(self.database_target()?.into_iter().collect())
    }

    /// libpq's `hostaddr` of each host of a multi-host `DATABASE_URL`, in the order of
    /// [`database_hosts`](Self::database_hosts): the address the bastion dials instead of the
    /// name (`None`: that host is dialled by name). Empty without a `hostaddr` list.
    pub fn database_host_addrs(&self) -> Result<Vec<Option<String>>> {
        crate::url::url_host_addrs(self.database_url.expose_secret(), "database_url")
    }

    /// `tunnel` forwarding to every server of a multi-host `DATABASE_URL`: its
    /// [`alternate_targets`](TunnelConfig::alternate_targets) are the hosts after the first
    /// (their `hostaddr` when the URL gives one, the host named in
    /// [`alternate_server_names`](TunnelConfig::alternate_server_names) for TLS, unless
    /// `sslservername` names one for all). Unchanged when the URL names one server, when
    /// `tunnel` has alternate targets already, or when its remote target is not the URL's first
    /// host (`SSH_REMOTE_HOST` / `SSH_REMOTE_PORT` chose one server). The
    /// [`ConnectionManager`](crate::ConnectionManager) and `sea-orm-tunnel forward` call this.
    pub fn with_alternate_targets(&self, mut tunnel: TunnelConfig) -> Result<TunnelConfig> {
        let hosts = self.database_hosts()?;
        if hosts.len() < 2
            || !tunnel.alternate_targets.is_empty()
            || (tunnel.remote_host.as_str(), tunnel.remote_port) != (hosts[0].0.as_str(), hosts[0].1)
        {
            return Ok(tunnel);
        }
        let addrs = self.database_host_addrs()?;
        let url = self.database_url.expose_secret();
        let server_name_set = crate::url::query_params(url)
            .iter()
            .any(|(k, v)| k == "sslservername" && !v.is_empty());
        for (i, (host, port)) in hosts.iter().enumerate().skip(1) {
            let dial = addrs.get(i).cloned().flatten().unwrap_or_else(|| host.clone());
            tunnel.alternate_targets.push((dial, *port));
        }
        if !addrs.is_empty() && !server_name_set {
            tunnel.alternate_server_names = hosts[1..].iter().map(|(host, _)| host.clone()).collect();
        }
        Ok(tunnel)
    }

    /// Whether PgBouncer mode is on: `pgbouncer=` in `DATABASE_URL`, else [`pgbouncer`](Self::pgbouncer).
    /// (An unreadable `pgbouncer=` value is reported by [`validate`](Self::validate).)
    pub fn pgbouncer_mode(&self) -> bool {
        self.resolve_pgbouncer().unwrap_or(self.pgbouncer)
    }

    /// `pgbouncer=` in `DATABASE_URL`, else the setting; an unreadable value is an error.
    pub(crate) fn resolve_pgbouncer(&self) -> Result<bool> {
        Ok(crate::url::pgbouncer_param(self.database_url.expose_secret())?.unwrap_or(self.pgbouncer))
    }

    /// The database password comes from `source` (a file re-read when it changes, or an async
    /// provider) instead of `DATABASE_URL`, which must then carry none. New connections use the
    /// newest password without a restart. See [`PasswordSource`].
    #[must_use]
    pub fn password_source(mut self, source: PasswordSource) -> Self {
        self.password_source = Some(source);
        self
    }

    /// `DATABASE_PASSWORD_FILE`: [`password_source`](Self::password_source) with
    /// [`PasswordSource::file`].
    #[must_use]
    pub fn password_file(self, path: impl Into<std::path::PathBuf>) -> Self {
        self.password_source(PasswordSource::file(path))
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
    /// Default 5 s, which is shorter than the usual 10–30 s an orchestrator waits
    /// between SIGTERM and SIGKILL, so the rest of shutdown still runs.
    #[must_use]
    pub fn shutdown_drain_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_drain_timeout = timeout;
        self
    }

    /// `DATABASE_URL` with its password, for the code that connects. Never log this.
    #[allow(dead_code)] // Used by the manager.
    /// `DATABASE_URL` naming one server: as written, or for a multi-host URL the first host
    /// (what sqlx, which reads one host, is given; the manager points it at the others).
    pub(crate) fn database_url_str(&self) -> std::borrow::Cow<'_, str> {
        let url = self.database_url.expose_secret();
        crate::url::first_host_url(url)
    }

    /// `DATABASE_URL` with the password replaced by `***`; safe to log.
    pub fn redacted_database_url(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }

    /// `DATABASE_URL` parsed into sqlx's connect options.
    ///
    /// Errors are [`Error::Config`](crate::Error::Config) for `database_url` and never contain
    /// the password; a URL that does not parse is not repeated at all (it cannot be reliably
    /// redacted).
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
            .field("password_source", &self.password_source)
            .field("pgbouncer", &self.pgbouncer)
            .field("target_session_attrs", &self.target_session_attrs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_target_strips_ipv6_brackets() {
        let c = Config::new("postgres://u:pw@[::1]:6543/db");
        assert_eq!(c.database_target().unwrap(), Some(("::1".to_owned(), 6543)));
        let c = Config::new("postgres://u:pw@db.internal/db");
        assert_eq!(c.database_target().unwrap(), Some(("db.internal".to_owned(), 5432)));
        let c = Config::new("postgres://u:pw@localhost/db?host=/var/run/postgresql");
        assert_eq!(c.database_target().unwrap(), None);
    }
}
