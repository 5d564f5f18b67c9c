//! The connection manager: one SSH tunnel (optional), one SeaORM pool over it, health checks,
//! recovery, observability and graceful shutdown.
//!
//! ```no_run
//! use std::time::Duration;
//! use sea_orm::ConnectionTrait;
//! use sea_orm_tunnel::manager::ConnectionManager;
//!
//! # async fn run() -> sea_orm_tunnel::Result<()> {
//! // DATABASE_URL, SSH_HOST, ... (see the README); .env.local and .env are read when present.
//! let manager = ConnectionManager::from_env().await?;
//!
//! // Plain SeaORM from here on.
//! let db = manager.connection();
//! db.execute_unprepared("SELECT 1").await?;
//!
//! // Watch health: every check's result, failures included.
//! let mut health = manager.subscribe_health();
//! tokio::spawn(async move {
//!     while let Ok(event) = health.recv().await {
//!         println!("healthy: {}", event.status().healthy);
//!     }
//! });
//!
//! let report = manager.shutdown(Duration::from_secs(5)).await;
//! println!("drained {}, forced {}", report.drained, report.forced);
//! # Ok(()) }
//! ```
//!
//! # The pool
//!
//! Built with SeaORM 2 on sqlx (see [`connect_options`](ConnectionManager::connect_options)),
//! with per-connection hooks instead of a ping on every acquire:
//!
//! - the session settings (role, `statement_timeout`, `idle_in_transaction_session_timeout`,
//!   read-only) are PostgreSQL startup options, in force from a connection's first statement;
//! - every new physical connection gets an id `<application_name prefix>-<tag>-<n>` (`<tag>`:
//!   six random characters per manager, so replicas sharing a prefix never mix up their
//!   connections), set as its `application_name`; the id appears in events, in
//!   `pg_stat_activity` and in `connection_logs`;
//! - a connection made before the tunnel's latest reconnect, or before a health probe found the
//!   database gone, is never handed out again (the generation rule);
//! - each connection lives at most `max_lifetime` minus up to 10 %, so connections opened
//!   together do not all expire together;
//! - only connections idle at least `test_if_idle_for` are pinged before use;
//! - the manager keeps `min_connections` open itself (sqlx opens its minimum only after reaping
//!   a connection, and bypasses the checkout hooks when it does).
//!
//! # Acquisition time
//!
//! `db_connection_acquire_seconds` is fed from sqlx's own acquire timing (the whole
//! `Pool::acquire`: waiting for a slot, the idle ping, opening a connection) through
//! [`AcquireTimeLayer`](crate::observe::events::AcquireTimeLayer); add that layer to your
//! tracing subscriber to get it for every query SeaORM makes.

pub(crate) mod failover;
mod health;
mod hooks;
mod hosts;
mod password;
mod pool;
mod retry;
mod shutdown;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::{OnceCell, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use health::{HealthEvent, HealthStatus, TunnelHealth};
pub use shutdown::ShutdownReport;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::generation::Generation;
use crate::observe::events;
use crate::observe::log_sink::{ConnectionLogEvent, LogSink, LogSinkOptions};
use crate::observe::metrics as m;
use crate::tunnel::{SshTunnel, TunnelEvent};
use hooks::Hooks;
use pool::Endpoint;

/// Pool counters and sizes, readable without a metrics stack (bb8 `State` + `Statistics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Physical connections open (or being opened).
    pub size: u32,
    /// Of which idle in the pool.
    pub idle: u32,
    /// Of which checked out (or being opened): `size - idle`.
    pub active: u32,
    /// Configured maximum.
    pub max: u32,
    /// Physical connections opened and set up since the start.
    pub connections_opened: u64,
    /// Physical connections the manager saw closed since the start.
    pub connections_closed: u64,
    /// Checkouts since the start (new connections included).
    pub acquired_total: u64,
    /// Returns to the pool since the start.
    pub released_total: u64,
    /// Connections discarded because they predate a tunnel reconnect or a database failure.
    pub rejected_stale: u64,
    /// Connections closed because they outlived their (jittered) lifetime.
    pub rejected_expired: u64,
    /// Idle connections pinged before use (idle at least `test_if_idle_for`).
    pub idle_pings: u64,
    /// Of which failed (the connection was replaced).
    pub ping_failures: u64,
    /// New connections whose setup (session settings) failed.
    pub setup_failures: u64,
    /// Checkouts reported as leaks.
    pub leaks_total: u64,
}

/// Counters a user can read without a metrics stack (the source of [`PoolStats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) opened: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) acquired: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) rejected_stale: AtomicU64,
    pub(crate) rejected_expired: AtomicU64,
    pub(crate) idle_pings: AtomicU64,
    pub(crate) ping_failures: AtomicU64,
    pub(crate) setup_failures: AtomicU64,
    pub(crate) leaks: AtomicU64,
}

/// A managed SeaORM connection over an optional SSH tunnel. Cheap to clone; all clones share
/// one pool and one tunnel.
///
/// Background tasks (health loop, leak scanner) hold weak references and stop when the last
/// handle is dropped; [`shutdown`](Self::shutdown) stops them and drains the pool first.
#[derive(Clone)]
pub struct ConnectionManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnectionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionManager")
            .field("database", &self.inner.config.redacted_database_url())
            .field("tunnel", &self.inner.tunnel)
            .field("shutting_down", &self.is_shutting_down())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    config: Config,
    db: DatabaseConnection,
    tunnel: Option<SshTunnel>,
    endpoint: Endpoint,
    hooks: Arc<Hooks>,
    next_id: Arc<AtomicU64>,
    /// The pool's one generation cutoff: retired by the tunnel on lost sessions and by the
    /// health check on a failed probe, read by the hooks.
    generation: Arc<Generation>,
    sink: Option<LogSink>,
    /// Failover signals: retire the generation, ask for a health check.
    failover: Arc<failover::Failover>,
    /// Several hosts / `target_session_attrs`: which server takes new connections.
    hosts: Option<Arc<hosts::Hosts>>,
    /// The rotating password, when `config.password_source` is set.
    password: Option<Arc<password::Rotation>>,
    /// The connection log's own one-connection pool (see `pool::sink_connect_options`).
    sink_db: Option<DatabaseConnection>,
    health: watch::Sender<HealthStatus>,
    health_events: broadcast::Sender<HealthEvent>,
    shutting_down: AtomicBool,
    shutdown_report: OnceCell<ShutdownReport>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        // The sink holds the pool and the pool holds the hooks: break the cycles.
        self.hooks.set_sink(None);
        self.hooks.attach_pool(None);
    }
}

impl Inner {
    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

impl ConnectionManager {
    /// Starts the tunnel (when `config.tunnel` is set), the pool, the health loop, the leak
    /// scanner and (when `config.log_to_db`) the connection log, then runs a first health check.
    ///
    /// Fails when the tunnel cannot be established, or when the first `SELECT 1` fails: a
    /// permanent problem (a bad role in the session settings, a wrong password) is reported as
    /// such instead of surfacing later as pool timeouts.
    pub async fn new(mut config: Config) -> Result<ConnectionManager> {
        config.validate()?;
        // TLS to PostgreSQL: held by the tunnel (settings from DATABASE_URL, files read now so a
        // missing one fails here), or left to sqlx for a direct connection.
        let pgbouncer = config.pgbouncer_mode();
        // A multi-host DATABASE_URL: the tunnel forwards to every host, each from its own
        // endpoint (unless SSH_REMOTE_HOST / a set remote target overrides the URL's).
        if let Some(tc) = config.tunnel.take() {
            config.tunnel = Some(config.with_alternate_targets(tc)?);
        }
        match &config.tunnel {
            Some(tc) => {
                config.tunnel = Some(crate::tls::resolve_tunnel(&config, tc)?.pgbouncer(pgbouncer || tc.pgbouncer))
            }
            None => crate::tls::check_direct(secrecy::ExposeSecret::expose_secret(&config.database_url))?,
        }
        let generation = Arc::new(Generation::new());
        let tunnel = match &config.tunnel {
            Some(tc) => Some(
                SshTunnel::connect_with_generation(tc.clone(), config.pool.pool_label.clone(), generation.clone())
                    .await?,
            ),
            None => None,
        };
        match Self::start(config, tunnel.clone(), generation).await {
            Ok(manager) => Ok(manager),
            Err(e) => {
                if let Some(t) = tunnel {
                    t.disconnect().await;
                }
                Err(e)
            }
        }
    }

    /// [`Config::from_env`] (reads `.env.local` and `.env` when present), then [`new`](Self::new).
    pub async fn from_env() -> Result<ConnectionManager> {
        Self::new(Config::from_env()?).await
    }

    async fn start(
        config: Config,
        tunnel: Option<SshTunnel>,
        generation: Arc<Generation>,
    ) -> Result<ConnectionManager> {
        let endpoint = match (&tunnel, &config.tunnel) {
            (Some(t), Some(tc)) => Endpoint::from_tunnel(t.local_endpoint(), tc.remote_port),
            _ => Endpoint::Direct,
        };
        let next_id = Arc::new(AtomicU64::new(0));
        let hosts = hosts::Hosts::new(
            config.resolve_target_session_attrs()?,
            Self::host_list(&config, tunnel.as_ref())?,
        );
        let hooks = Arc::new(
            Hooks::new(&config.pool, next_id.clone(), generation.clone())
                .without_server_id(!pool::sets_connection_ids(&config))
                .with_hosts(hosts.clone()),
        );
        let password = match &config.password_source {
            Some(source) => Some(password::Rotation::start(source.clone()).await?),
            None => None,
        };
        let current_password = || password.as_ref().map(|r| r.current());
        let mut options = pool::connect_options(&config, &endpoint, hooks.clone(), current_password())?;
        // Lazy, so the connection log (when enabled) sees the very first connection too; the
        // first health check below opens it and reports what went wrong. sqlx's own minimum is
        // 0: the connections it opens for it reach the pool without any checkout hook, so
        // the health loop keeps the minimum instead, by acquiring.
        options.connect_lazy(true).min_connections(0);
        let db = Database::connect(options).await?;
        hooks.attach_pool(Some(db.get_postgres_connection_pool().clone()));
        let sink_db = if config.log_to_db {
            let mut options = pool::sink_connect_options(&config, &endpoint, current_password())?;
            options.connect_lazy(true);
            Some(Database::connect(options).await?)
        } else {
            None
        };
        let sink = sink_db.as_ref().map(|sink_db| {
            let sink = LogSink::spawn(sink_db.clone(), LogSinkOptions::new().pool_label(hooks.pool_label()));
            hooks.set_sink(Some(sink.clone()));
            sink
        });
        let (health, _) = watch::channel(HealthStatus::initial());
        let (health_events, _) = broadcast::channel(64);
        let failover = Arc::new(failover::Failover::new(
            generation.clone(),
            config.session.read_only,
            hooks.pool_label().to_owned(),
            hosts.clone(),
            tunnel.clone(),
        ));
        let inner = Arc::new(Inner {
            config,
            db,
            tunnel,
            endpoint,
            hooks,
            next_id,
            generation,
            sink,
            failover,
            hosts,
            password,
            sink_db,
            health,
            health_events,
            shutting_down: AtomicBool::new(false),
            shutdown_report: OnceCell::new(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        metrics::gauge!(m::DB_POOL_CONNECTIONS_MAX, m::POOL_LABEL => inner.hooks.pool_label().to_owned())
            .set(f64::from(inner.config.pool.max_connections));

        let selected = match &inner.hosts {
            Some(hosts) => inner.select_host(hosts, true).await,
            None => Ok(()),
        };
        let first = match selected {
            Ok(()) => inner.check_health().await,
            Err(_) => HealthStatus::initial(),
        };
        if selected.is_err() || !first.healthy {
            let error = match selected {
                Err(e) => e,
                Ok(()) => inner.first_check_error(&first).await,
            };
            if let Some(sink) = inner.hooks.set_sink(None) {
                sink.close(Duration::from_millis(500)).await;
            }
            if let Some(sink_db) = &inner.sink_db {
                sink_db.get_postgres_connection_pool().close().await;
            }
            inner.db.get_postgres_connection_pool().close().await;
            return Err(error);
        }

        let manager = ConnectionManager { inner };
        manager.spawn_tasks();
        events::manager_lifecycle("started", &format_args!("{:?}", manager.inner.endpoint));
        Ok(manager)
    }

    /// Where the pool can dial each host of `DATABASE_URL`: the tunnel's endpoint for it, or the
    /// host itself.
    fn host_list(config: &Config, tunnel: Option<&SshTunnel>) -> Result<Vec<hosts::Host>> {
        use crate::tunnel::LocalEndpoint;
        let (Some(tunnel), Some(tc)) = (tunnel, &config.tunnel) else {
            let addrs = config.database_host_addrs()?;
            return Ok(config
                .database_hosts()?
                .into_iter()
                .enumerate()
                .map(|(i, (host, port))| hosts::Host {
                    name: crate::url::host_port(&host, port),
                    // libpq's hostaddr: dial the address, name the host.
                    dial: hosts::Dial::Tcp(addrs.get(i).cloned().flatten().unwrap_or(host), port),
                })
                .collect());
        };
        let ports = std::iter::once(tc.remote_port).chain(tc.alternate_targets.iter().map(|(_, p)| *p));
        Ok(tunnel
            .target_endpoints()
            .into_iter()
            .zip(ports)
            .filter_map(|((name, endpoint), port)| {
                let dial = match endpoint {
                    LocalEndpoint::Tcp(addr) => hosts::Dial::Tcp(addr.ip().to_string(), addr.port()),
                    LocalEndpoint::Unix(_) => hosts::Dial::Socket(endpoint.unix_dir()?.to_path_buf(), port),
                };
                Some(hosts::Host { name, dial })
            })
            .collect())
    }

    fn spawn_tasks(&self) {
        let inner = &self.inner;
        let weak = Arc::downgrade(inner);
        let tunnel_events = inner.tunnel.as_ref().map(|t| t.subscribe());
        inner.tasks.spawn(health::run(
            weak.clone(),
            inner.cancel.clone(),
            tunnel_events,
            inner.config.health.interval,
        ));
        inner.tasks.spawn(maintenance(weak.clone(), inner.cancel.clone()));
        if let Some(hosts) = &inner.hosts {
            inner
                .tasks
                .spawn(hosts::run(weak.clone(), hosts.clone(), inner.cancel.clone()));
        }
        if let Some(rotation) = &inner.password {
            inner
                .tasks
                .spawn(password::run(weak, rotation.clone(), inner.cancel.clone()));
        }
        if let (Some(tunnel), true) = (&inner.tunnel, inner.sink.is_some()) {
            inner.tasks.spawn(forward_tunnel_events(
                Arc::downgrade(inner),
                tunnel.subscribe(),
                inner.cancel.clone(),
            ));
        }
    }

    /// The managed SeaORM connection (a pool). Clone it freely.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Ready SeaORM options for building your own pool over the same tunnel, with the same
    /// limits, timeouts, session settings and per-connection hooks (ids get a tag of their own
    /// and continue the manager's numbering; the generation rule is shared). Health checks, leak
    /// detection and shutdown cover only the managed pool.
    ///
    /// The URL points at the tunnel's local endpoint (a Unix endpoint is given as the socket
    /// directory plus the remote port). Its password is in it: do not log the options' `Debug`.
    ///
    /// What you set on them composes with ours where sqlx allows: `max_lifetime` (jittered like
    /// ours), `test_before_acquire`, `statement_timeout` and `min_connections` apply. sqlx has one
    /// slot per hook and no way to read it back, so `set_schema_search_path`,
    /// `test_before_acquire_if_idle_for` and `map_sqlx_postgres_before_acquire` would be replaced
    /// by our hooks, and `map_sqlx_postgres_opts` / `map_sqlx_postgres_pool_opts` would replace
    /// ours: put `options=-csearch_path%3Dmy_schema` in `DATABASE_URL` instead (PostgreSQL applies
    /// it at connection startup), and use `pool.test_if_idle_for`.
    pub fn connect_options(&self) -> ConnectOptions {
        let inner = &self.inner;
        let hooks = Arc::new(
            Hooks::new(&inner.config.pool, inner.next_id.clone(), inner.generation.clone())
                .without_server_id(!pool::sets_connection_ids(&inner.config)),
        );
        pool::connect_options(
            &inner.config,
            &inner.endpoint,
            hooks,
            inner.password.as_ref().map(|r| r.current()),
        )
        .expect("the configuration was validated when the manager started")
    }

    /// The tunnel, when one is configured.
    pub fn tunnel(&self) -> Option<&SshTunnel> {
        self.inner.tunnel.as_ref()
    }

    /// The configuration the manager runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The current health, updated by every check and by tunnel state changes.
    pub fn health(&self) -> watch::Receiver<HealthStatus> {
        self.inner.health.subscribe()
    }

    /// The latest [`HealthStatus`].
    pub fn status(&self) -> HealthStatus {
        self.inner.health.borrow().clone()
    }

    /// Every health check result, and a [`HealthEvent::HealthCheckFailed`] for each failure.
    pub fn subscribe_health(&self) -> broadcast::Receiver<HealthEvent> {
        self.inner.health_events.subscribe()
    }

    /// Runs a health check now and returns (and publishes) its result.
    pub async fn check_health(&self) -> HealthStatus {
        self.inner.check_health().await
    }

    /// Pool sizes and counters.
    pub fn stats(&self) -> PoolStats {
        let pool = self.inner.db.get_postgres_connection_pool();
        let size = pool.size();
        let idle = pool.num_idle() as u32;
        let c = &self.inner.hooks.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolStats {
            size,
            idle,
            active: size.saturating_sub(idle),
            max: self.inner.config.pool.max_connections,
            connections_opened: get(&c.opened),
            connections_closed: get(&c.closed),
            acquired_total: get(&c.acquired),
            released_total: get(&c.released),
            rejected_stale: get(&c.rejected_stale),
            rejected_expired: get(&c.rejected_expired),
            idle_pings: get(&c.idle_pings),
            ping_failures: get(&c.ping_failures),
            setup_failures: get(&c.setup_failures),
            leaks_total: get(&c.leaks),
        }
    }

    /// Starts a transaction on the managed pool. Same as `connection().begin()`, but a pool
    /// timeout comes back as [`Error::Timeout`] naming the pool limit, and after shutdown began
    /// as [`Error::ShutDown`].
    pub async fn begin(&self) -> Result<DatabaseTransaction> {
        if self.is_shutting_down() {
            return Err(Error::ShutDown("ConnectionManager"));
        }
        self.inner.db.begin().await.map_err(|e| self.inner.explain(e.into()))
    }

    /// The error a caller should act on for `error` from work on this manager's connection: a
    /// pool timeout names the pool limit; a closed pool during shutdown is [`Error::ShutDown`];
    /// and a transient-looking I/O error while the tunnel cannot forward for a permanent reason
    /// (host key changed, login refused, channel administratively prohibited) becomes that
    /// permanent error, so retry logic (yours, or a layer's) stops instead of looping.
    /// [`retry`](Self::retry) and [`begin`](Self::begin) already do this.
    pub fn explain_error(&self, error: impl Into<Error>) -> Error {
        self.inner.explain(error.into())
    }

    /// The failover detector, for the inject layer's request scope.
    pub(crate) fn failover_detector(&self) -> Arc<failover::Failover> {
        self.inner.failover.clone()
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.is_shutting_down()
    }

    /// Drains and closes everything (see [`ShutdownReport`] and the `shutdown` module docs):
    /// new acquisitions fail at once, checked-out connections get until `drain_deadline` to come
    /// back, the rest are forced; then the connection log is flushed and the tunnel disconnected.
    ///
    /// Idempotent: later (or concurrent) calls wait for the first and return its report.
    pub async fn shutdown(&self, drain_deadline: Duration) -> ShutdownReport {
        let inner = &self.inner;
        inner
            .shutdown_report
            .get_or_init(|| inner.shutdown(drain_deadline))
            .await
            .clone()
    }

    /// [`shutdown`](Self::shutdown) with `config.shutdown_drain_timeout` (default 5 s).
    pub async fn shutdown_default(&self) -> ShutdownReport {
        self.shutdown(self.inner.config.shutdown_drain_timeout).await
    }
}

impl Inner {
    /// The error `new` returns when the first health check failed.
    async fn first_check_error(&self, status: &HealthStatus) -> Error {
        // A refused session setting (a role that does not exist) fails the connect itself, so
        // the server's own error says which.
        // Ask once more, directly, for the real error (the probe's message is a summary).
        let probe = self.db.execute_unprepared("SELECT 1").await;
        match probe {
            Err(e) => self.explain(e.into()),
            Ok(_) => Error::Database(sea_orm::DbErr::Custom(
                status
                    .error
                    .clone()
                    .unwrap_or_else(|| "first health check failed".into()),
            )),
        }
    }
}

/// Once a second (more often with a short leak threshold): set the pool gauges from the pool
/// (their only writer besides `start`, which sets the maximum) and report leaks.
async fn maintenance(inner: Weak<Inner>, cancel: CancellationToken) {
    let tick = match inner.upgrade().and_then(|i| i.config.pool.leak_detection_threshold) {
        Some(t) => (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        None => Duration::from_secs(1),
    };
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let pool = inner.db.get_postgres_connection_pool();
        let size = pool.size();
        let idle = pool.num_idle() as u32;
        let label = inner.hooks.pool_label().to_owned();
        metrics::gauge!(m::DB_POOL_CONNECTIONS_ACTIVE, m::POOL_LABEL => label.clone())
            .set(f64::from(size.saturating_sub(idle)));
        metrics::gauge!(m::DB_POOL_CONNECTIONS_IDLE, m::POOL_LABEL => label.clone()).set(f64::from(idle));
        if let Some(threshold) = inner.config.pool.leak_detection_threshold {
            inner.hooks.scan_leaks(threshold);
        }
    }
}

/// Copies tunnel events into the connection log.
async fn forward_tunnel_events(
    inner: Weak<Inner>,
    mut events: broadcast::Receiver<TunnelEvent>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = events.recv() => e,
        };
        let event = match event {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        let Some(entry) = ConnectionLogEvent::from_tunnel_event(&event) else {
            continue;
        };
        inner.hooks.log(entry);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn manager_is_send_sync() {
        fn is<T: Send + Sync + 'static>() {}
        is::<super::ConnectionManager>();
    }
}
