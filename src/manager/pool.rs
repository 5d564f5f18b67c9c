//! The SeaORM [`ConnectOptions`] of the managed pool.
//!
//! What is set, and why:
//!
//! - the URL points at the tunnel's local endpoint (loopback TCP, or the private Unix socket
//!   directory + the remote port), or stays as configured for a direct connection;
//! - `max_connections`, `min_connections`, `idle_timeout`, `acquire_timeout` (= sqlx's only
//!   connect bound: SeaORM's `connect_timeout` is sqlx's `acquire_timeout`), `max_lifetime` from [`PoolConfig`](crate::config::PoolConfig)
//!   (the hooks read the last two back, so a value set later on the SeaORM options wins);
//! - sqlx statement logging off (the crate's own events say what happened to connections);
//! - the session settings as PostgreSQL startup options (`-c role=...`, `statement_timeout`,
//!   `idle_in_transaction_session_timeout`, `default_transaction_read_only`): in force from the
//!   first statement, no round trip;
//! - `application_name` = the configured prefix at startup, then the connection id per connection;
//! - no ping on every acquire (`test_before_acquire` off: a round trip per query through a tunnel): only connections idle
//!   longer than `pool.test_if_idle_for` are pinged;
//! - our per-connection hooks (see [`hooks`](super::hooks)): connection ids, the generation rule,
//!   jittered lifetimes, checkout tracking.

use std::sync::Arc;

use sea_orm::ConnectOptions;
use secrecy::{ExposeSecret, SecretString};

use super::hooks::{self, Hooks};
use crate::config::{Config, SessionSettings};
use crate::error::Result;
use crate::tls::tunnel_holds_tls;
use crate::tunnel::LocalEndpoint;
use crate::url::{local_database_url, local_database_url_tls_in_tunnel, split_password, without_crate_params};

/// Where the pool connects.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `DATABASE_URL` as configured.
    Direct,
    /// The tunnel's local endpoint, forwarding to `remote_port` on the far side (a Unix socket
    /// is named after that port).
    Tunnel { local: LocalEndpoint, remote_port: u16 },
}

impl Endpoint {
    pub(crate) fn from_tunnel(endpoint: &LocalEndpoint, remote_port: u16) -> Endpoint {
        Endpoint::Tunnel {
            local: endpoint.clone(),
            remote_port,
        }
    }
}

/// Whether the hooks give each new connection its id with a `SET` after connecting: not with
/// `connection_ids` off, nor in PgBouncer mode (the setting would stay on the pooler's server
/// connection for its other clients).
pub(crate) fn sets_connection_ids(config: &Config) -> bool {
    config.pool.connection_ids && !config.pgbouncer_mode()
}

/// Builds the options; `hooks` are installed on the sqlx pool options.
///
/// `password`, when set (a rotating [`PasswordSource`](crate::config::PasswordSource)), is the one
/// new connections log in with; otherwise `DATABASE_URL`'s.
pub(crate) fn connect_options(
    config: &Config,
    endpoint: &Endpoint,
    hooks: Arc<Hooks>,
    password: Option<SecretString>,
) -> Result<ConnectOptions> {
    let pool = &config.pool;
    let mut options = base_options(config, endpoint, password)?;
    // Without per-connection ids the manager's tag goes into the startup message instead, so
    // its connections stay recognisable (and a forced shutdown finds them) at no round trip.
    let startup_name = if pool.connection_ids || config.pgbouncer_mode() {
        pool.application_name.clone()
    } else {
        hooks.id_base().to_owned()
    };
    options
        .max_connections(pool.max_connections)
        .min_connections(pool.min_connections)
        .max_lifetime(pool.max_lifetime)
        .test_before_acquire(false)
        .set_application_name(startup_name);
    options.map_sqlx_postgres_pool_opts(move |o| hooks::install(&hooks, o));
    Ok(options)
}

/// The connection log's own pool: one connection (opened when the first batch is written),
/// `application_name` `<prefix>-log`, the session settings (startup options, as for the managed
/// pool), and a ping before each use (the
/// writer is in the background, so a stale connection after a reconnect costs a round trip,
/// not an error).
///
/// Separate from the managed pool so that shutdown can refuse every application acquisition
/// at once while the log is still flushed, and so the log never takes an application's slot.
pub(crate) fn sink_connect_options(
    config: &Config,
    endpoint: &Endpoint,
    password: Option<SecretString>,
) -> Result<ConnectOptions> {
    let mut options = base_options(config, endpoint, password)?;
    options
        .max_connections(1)
        .min_connections(0)
        .test_before_acquire(true)
        .set_application_name(format!("{}-log", config.pool.application_name));
    Ok(options)
}

/// What both pools share: the URL (pointed at the tunnel), the password handed over out of
/// band, the session settings, timeouts, quiet sqlx logging.
fn base_options(config: &Config, endpoint: &Endpoint, rotating: Option<SecretString>) -> Result<ConnectOptions> {
    // Validates the URL (the error never repeats the password).
    config.database_options()?;
    let url = match endpoint {
        // sqlx's own TLS, untouched (minus the parameters only this crate reads).
        Endpoint::Direct => without_crate_params(&config.database_url_str()),
        // The tunnel holds TLS: plaintext to its private endpoint.
        Endpoint::Tunnel { local, remote_port } if config.tunnel.as_ref().is_some_and(tunnel_holds_tls) => {
            local_database_url_tls_in_tunnel(&config.database_url_str(), local, *remote_port)?
        }
        Endpoint::Tunnel { local, remote_port } => {
            local_database_url(&without_crate_params(&config.database_url_str()), local, *remote_port)?
        }
    };
    // The password never travels inside the URL: SeaORM keeps the URL in `ConnectOptions`, whose
    // derived `Debug` is recorded by its own trace-level instrumentation (and printed by anyone
    // who debug-prints the options). It is handed to sqlx directly instead.
    let (url, password) = split_password(&url);
    let password = rotating.or(password);
    let pool = &config.pool;
    let mut options = ConnectOptions::new(url);
    options
        .idle_timeout(pool.idle_timeout)
        .connect_timeout(pool.connect_timeout)
        .acquire_timeout(pool.acquire_timeout)
        .sqlx_logging(false);
    let session = session_options(&config.session);
    let pgbouncer = config.pgbouncer_mode();
    options.map_sqlx_postgres_opts(move |o| {
        // A transaction pooler refuses unknown startup parameters (PgBouncer: "unsupported
        // startup parameter: extra_float_digits"); `options` is empty (validated).
        let o = if pgbouncer { o.extra_float_digits(None) } else { o };
        // Appended after what SeaORM set (its own `statement_timeout`), so ours win where both are set.
        // (Only when there are some: an empty `options` is still sent, and a pooler refuses it.)
        let o = if session.is_empty() {
            o
        } else {
            o.options(session.iter().map(|(k, v)| (k, v)))
        };
        match &password {
            Some(password) => o.password(password.expose_secret()),
            None => o,
        }
    });
    Ok(options)
}

/// The session settings as startup options: `(name, value)` for `-c name=value`. PostgreSQL
/// applies each before the first statement; `role` takes the role's name as is (no quoting).
pub(crate) fn session_options(session: &SessionSettings) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(role) = &session.role {
        out.push(("role", role.clone()));
    }
    if let Some(t) = session.statement_timeout {
        out.push(("statement_timeout", t.as_millis().to_string()));
    }
    if let Some(t) = session.idle_in_transaction_session_timeout {
        out.push(("idle_in_transaction_session_timeout", t.as_millis().to_string()));
    }
    if session.read_only {
        out.push(("default_transaction_read_only", "on".to_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn connect_options_debug_has_no_password() {
        let config = Config::new("postgres://app:hunter2-secret@db.internal:5432/app");
        let hooks = Arc::new(Hooks::new(&config.pool, Default::default(), Default::default()));
        let options = connect_options(
            &config,
            &Endpoint::from_tunnel(&LocalEndpoint::Tcp("127.0.0.1:40000".parse().unwrap()), 5432),
            hooks,
            None,
        )
        .unwrap();
        let debug = format!("{options:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("127.0.0.1:40000"), "{debug}");
    }

    #[test]
    fn session_settings_become_startup_options() {
        let s = SessionSettings::new()
            .role("app \"ro\"")
            .statement_timeout(Duration::from_secs(5))
            .idle_in_transaction_session_timeout(Duration::from_millis(1500))
            .read_only(true);
        let pg = sea_orm::sqlx::postgres::PgConnectOptions::new().options(session_options(&s));
        assert_eq!(
            pg.get_options(),
            Some(
                "-c role=app\\ \"ro\" -c statement_timeout=5000 \
                 -c idle_in_transaction_session_timeout=1500 -c default_transaction_read_only=on"
            )
        );
        assert!(session_options(&SessionSettings::new()).is_empty());
    }
}
