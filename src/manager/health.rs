//! Health checks: the tunnel's state first, then `SELECT 1`.
//!
//! The loop runs every `health.interval`; after a failure it re-checks on the `health.recheck`
//! backoff instead of waiting a whole interval, and it reacts at once to the tunnel's state:
//! when the tunnel drops, the status goes unhealthy immediately (no probe needed), and when it
//! comes back a check runs right away.
//!
//! Health only reads the tunnel's state; the tunnel's supervisor alone decides when it reconnects:
//!
//! - while the tunnel is not connected, a check reports it down with the tunnel's state and last
//!   error, without waiting for it and without asking for a reconnect;
//! - when the tunnel gave up after `reconnect.max_retries` transient failures, the tunnel itself
//!   starts a new round `reconnect.max_delay` later, so a service still recovers from a long
//!   bastion outage, and every round keeps its backoff and its retry limit;
//! - a permanent tunnel failure (host key, authentication, a channel refused as
//!   `administratively prohibited`) is reported with its cause and never retried.
//!
//! Results go to a [`watch`](tokio::sync::watch) (the current [`HealthStatus`]) and a
//! [`broadcast`](tokio::sync::broadcast) of [`HealthEvent`]s (what an event
//! emitter's `manager.on('healthCheck', ...)` gives in other languages), plus tracing events and metrics.

use std::fmt;
use std::sync::Weak;
use std::time::{Duration, Instant, SystemTime};

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::observe::events;
use crate::observe::log_sink::ConnectionLogEvent;
use crate::observe::metrics as m;
use crate::tunnel::{TunnelEvent, TunnelState};

/// The tunnel's part of a [`HealthStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TunnelHealth {
    /// No tunnel is configured: the pool connects directly.
    Direct,
    /// At least one SSH session is up.
    Up,
    /// No SSH session is up (reconnecting, failed, or shut down).
    Down,
}

impl TunnelHealth {
    /// `true` unless the tunnel is [`TunnelHealth::Down`].
    pub fn is_usable(self) -> bool {
        !matches!(self, TunnelHealth::Down)
    }

    fn as_str(self) -> &'static str {
        match self {
            TunnelHealth::Direct => "direct",
            TunnelHealth::Up => "up",
            TunnelHealth::Down => "down",
        }
    }
}

impl fmt::Display for TunnelHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one health check (or of a tunnel state change seen between checks).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HealthStatus {
    /// The tunnel (if any) is up and `SELECT 1` succeeded.
    pub healthy: bool,
    /// The tunnel's state.
    pub tunnel: TunnelHealth,
    /// `SELECT 1` succeeded within `health.timeout`.
    pub database: bool,
    /// Duration of the probe (acquire plus `SELECT 1`) when it succeeded.
    pub latency: Option<Duration>,
    /// Physical connections in the pool.
    pub pool_size: u32,
    /// Idle connections in the pool.
    pub idle: u32,
    /// What failed, when not healthy. Never contains a password.
    pub error: Option<String>,
    /// When this status was determined.
    pub checked_at: SystemTime,
}

impl HealthStatus {
    pub(crate) fn initial() -> HealthStatus {
        HealthStatus {
            healthy: false,
            tunnel: TunnelHealth::Down,
            database: false,
            latency: None,
            pool_size: 0,
            idle: 0,
            error: Some("not checked yet".into()),
            checked_at: SystemTime::now(),
        }
    }
}

/// Something the health loop found, broadcast to [`subscribe_health`](super::ConnectionManager::subscribe_health)rs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HealthEvent {
    /// A health check ran (or the tunnel state changed): the new status, healthy or not.
    HealthCheck(HealthStatus),
    /// A health check failed. Sent right after the matching [`HealthEvent::HealthCheck`].
    HealthCheckFailed(HealthStatus),
}

impl HealthEvent {
    /// The status this event carries.
    pub fn status(&self) -> &HealthStatus {
        match self {
            HealthEvent::HealthCheck(s) | HealthEvent::HealthCheckFailed(s) => s,
        }
    }
}

impl Inner {
    fn pool_counts(&self) -> (u32, u32) {
        let pool = self.db.get_postgres_connection_pool();
        (pool.size(), pool.num_idle() as u32)
    }

    /// Runs one check and publishes it.
    pub(crate) async fn check_health(&self) -> HealthStatus {
        let started = Instant::now();
        let timeout = self.config.health.timeout;
        let mut error = None;
        let tunnel = match &self.tunnel {
            None => TunnelHealth::Direct,
            Some(t) if t.is_connected() => TunnelHealth::Up,
            // Only read: waiting here, or asking for a reconnect, would make health a second
            // driver of the supervisor's rounds.
            Some(t) => {
                let state = match &*t.state().borrow() {
                    // The error that ended the round says it all.
                    TunnelState::Failed { error } => Err(format!("tunnel failed: {error}")),
                    TunnelState::Reconnecting { attempt, .. } => Ok(format!("reconnecting (attempt {attempt})")),
                    TunnelState::Connecting => Ok("connecting".to_owned()),
                    TunnelState::Disconnected => Ok("disconnected".to_owned()),
                    // Its last session is gone, and the supervisor has not published it yet.
                    TunnelState::Connected => Ok("no SSH session up".to_owned()),
                };
                error = Some(match (state, t.last_error()) {
                    (Err(failed), _) => failed,
                    (Ok(state), Some(last)) => format!("tunnel down: {state}; last error: {last}"),
                    (Ok(state), None) => format!("tunnel down: {state}"),
                });
                TunnelHealth::Down
            }
        };
        let mut latency = None;
        let database = if tunnel.is_usable() {
            let probe_started = Instant::now();
            // With a target_session_attrs, the probe reads the server's role as well.
            let role_check = self.hosts.as_ref().filter(|h| h.checks_role());
            let sql = if role_check.is_some() {
                crate::config::ServerRole::QUERY
            } else {
                "SELECT 1"
            };
            let probe = self.db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql));
            let outcome = tokio::time::timeout(timeout, probe).await;
            if !matches!(outcome, Ok(Ok(_)))
                && let Some(hosts) = &self.hosts
            {
                // The current host failed: another may serve.
                hosts.wanted.notify_one();
            }
            match outcome {
                Ok(Ok(row)) => {
                    latency = Some(probe_started.elapsed());
                    let role = row.and_then(|row| {
                        Some(crate::config::ServerRole {
                            in_recovery: row.try_get_by_index::<bool>(0).ok()?,
                            read_only: row.try_get_by_index::<bool>(1).ok()?,
                        })
                    });
                    match (role_check, role) {
                        (Some(hosts), Some(role)) if !hosts.accepts(role) => {
                            // A demoted primary (or a promoted standby): its connections go, and
                            // the hosts are tried again.
                            error = Some(format!("database: {}", hosts.refusal(role)));
                            // Retires the generation (the signal does, every time); the
                            // selection is asked directly, as the signal wakes it only once
                            // per failover.
                            self.failover
                                .signal("the server no longer satisfies target_session_attrs");
                            hosts.wanted.notify_one();
                            false
                        }
                        _ => true,
                    }
                }
                Ok(Err(e)) => {
                    if invalidates_connections(&e) {
                        // The server (or the path to it) failed under a live connection: every
                        // pooled connection may be dead the same way. Replace them all rather
                        // than hand them out one by one to find out.
                        self.generation.retire_all();
                        events::manager_lifecycle(
                            "pool generation retired",
                            &format_args!("after a failed probe ({} retirements so far)", self.generation.bumps()),
                        );
                    }
                    let e = crate::error::Error::Database(e);
                    error = Some(match self.tunnel.as_ref().and_then(|t| t.permanent_error()) {
                        // The driver saw a closed socket; say why it was closed.
                        Some(cause) => format!("database unreachable through the tunnel: {cause}"),
                        // A rejected rotating password asks for a fresh read at once.
                        None if super::password::is_password_rejected(&e) => format!("database: {}", self.explain(e)),
                        None => format!("database: {e}"),
                    });
                    false
                }
                Err(_) => {
                    error = Some(format!("database: SELECT 1 did not answer within {timeout:?}"));
                    false
                }
            }
        } else {
            false
        };
        let healthy = tunnel.is_usable() && database;
        let (pool_size, idle) = self.pool_counts();
        let status = HealthStatus {
            healthy,
            tunnel,
            database,
            latency,
            pool_size,
            idle,
            error,
            checked_at: SystemTime::now(),
        };

        let label = self.hooks.pool_label().to_owned();
        metrics::counter!(m::DB_HEALTH_CHECKS_TOTAL, m::POOL_LABEL => label.clone()).increment(1);
        metrics::histogram!(m::DB_HEALTH_CHECK_SECONDS, m::POOL_LABEL => label.clone())
            .record(started.elapsed().as_secs_f64());
        if !healthy {
            metrics::counter!(m::DB_HEALTH_CHECK_FAILURES_TOTAL, m::POOL_LABEL => label.clone()).increment(1);
            if !database && tunnel.is_usable() {
                metrics::counter!(m::DB_CONNECTION_ERRORS_TOTAL, m::POOL_LABEL => label.clone(), "kind" => "health")
                    .increment(1);
            }
        }
        self.publish(status.clone());
        if healthy {
            self.top_up_min_connections().await;
        }
        status
    }

    /// Brings the pool back to `min_connections` when it fell below.
    ///
    /// sqlx's own minimum is off (see `ConnectionManager::start`): sqlx opens up to it only right
    /// after its idle reaper closed a connection (never for a lazy pool that lost one otherwise),
    /// and hands those connections to the pool without a checkout hook. Holding
    /// `min_connections` at once makes the pool open the missing ones through an ordinary
    /// acquire; they are returned right away.
    async fn top_up_min_connections(&self) {
        let min = self.config.pool.min_connections;
        let pool = self.db.get_postgres_connection_pool();
        if min == 0 || pool.size() >= min || self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let _ = tokio::time::timeout(self.config.health.timeout, async {
            let mut held = Vec::with_capacity(min as usize);
            for _ in 0..min {
                match pool.acquire().await {
                    Ok(conn) => held.push(conn),
                    Err(_) => break,
                }
            }
            held
        })
        .await;
    }

    /// The tunnel left `Connected`: unhealthy now, without waiting for a probe.
    pub(crate) fn publish_tunnel_down(&self, state: &TunnelState) {
        let (pool_size, idle) = self.pool_counts();
        let error = match state {
            TunnelState::Failed { error } => format!("tunnel failed: {error}"),
            TunnelState::Reconnecting { attempt, .. } => format!("tunnel down: reconnecting (attempt {attempt})"),
            TunnelState::Disconnected => "tunnel disconnected".into(),
            TunnelState::Connecting => "tunnel connecting".into(),
            TunnelState::Connected => return,
        };
        self.publish(HealthStatus {
            healthy: false,
            tunnel: TunnelHealth::Down,
            database: false,
            latency: None,
            pool_size,
            idle,
            error: Some(error),
            checked_at: SystemTime::now(),
        });
    }

    /// Puts a status on the watch and the broadcast, and reports it.
    pub(crate) fn publish(&self, status: HealthStatus) {
        let was_healthy = self.health.borrow().healthy;
        let recovered = status.healthy && !was_healthy;
        events::health_check(
            status.healthy,
            recovered,
            status.pool_size,
            status.latency,
            status.tunnel.as_str(),
            status.error.as_deref(),
        );
        if !status.healthy {
            // Record every failure (rechecks are spaced by backoff), not every healthy check.
            self.hooks.log(
                ConnectionLogEvent::new("health", "health_check_failed")
                    .with_error(status.error.clone().unwrap_or_default())
                    .with_metadata(sea_orm::JsonValue::Object(
                        [
                            ("tunnel".to_string(), status.tunnel.as_str().into()),
                            ("database".to_string(), status.database.into()),
                        ]
                        .into_iter()
                        .collect(),
                    )),
            );
        } else if recovered {
            self.hooks
                .log(ConnectionLogEvent::new("health", "health_check_recovered"));
        }
        self.health.send_replace(status.clone());
        let failed = !status.healthy;
        let _ = self.health_events.send(HealthEvent::HealthCheck(status.clone()));
        if failed {
            let _ = self.health_events.send(HealthEvent::HealthCheckFailed(status));
        }
    }
}

/// Whether a failed probe means the pooled connections themselves may be dead (as opposed to
/// the pool being busy, or the query being refused).
fn invalidates_connections(e: &DbErr) -> bool {
    !matches!(e, DbErr::ConnectionAcquire(_)) && crate::error::db_err_is_transient(e)
}

/// The health loop. Holds only a `Weak`: dropping the last manager handle ends it.
///
/// Probes on its timer (`health.interval`, or the `health.recheck` backoff after a failure) and
/// when the tunnel reports it is connected again or gave up. A reconnect attempt only publishes
/// "down": there is nothing to probe until the tunnel's own round brings it back.
///
/// It follows the tunnel's events rather than its state: a state watch keeps only the latest
/// value, so a reconnect that completes before this task runs would never be seen as an outage.
pub(crate) async fn run(
    inner: Weak<Inner>,
    cancel: CancellationToken,
    mut tunnel_events: Option<broadcast::Receiver<TunnelEvent>>,
    first_delay: Duration,
) {
    let mut recheck: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    // A failover signal asks for a check at once (holds only the detector, not the manager).
    let Some(failover) = inner.upgrade().map(|i| i.failover.clone()) else {
        return;
    };
    // A deadline, not a fresh sleep per iteration: tunnel events must not postpone checks.
    let mut next_check = tokio::time::Instant::now() + first_delay;
    loop {
        let tunnel_event = async {
            match tunnel_events.as_mut() {
                Some(rx) => match rx.recv().await {
                    Ok(event) => Some(event),
                    // Missed some: probe now, which reads the current state.
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    // The tunnel is gone: nothing more to watch.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next_check) => {}
            () = failover.check_now.notified() => {}
            event = tunnel_event => match event {
                Some(TunnelEvent::Reconnecting { attempt, delay, .. }) => {
                    let Some(inner) = inner.upgrade() else { return };
                    inner.publish_tunnel_down(&TunnelState::Reconnecting { attempt, next_delay: delay });
                    continue;
                }
                // Back up: check the database through it now. Gave up: check now too, which
                // reports the cause and puts the loop on the re-check schedule (the tunnel
                // starts its next round of attempts by itself; checks never do).
                Some(TunnelEvent::Connected { .. } | TunnelEvent::Failed { .. }) | None => {}
                // Sessions opened or closed for capacity, channel failures, a deliberate close:
                // nothing to probe.
                Some(_) => continue,
            },
        }
        let Some(manager) = inner.upgrade() else { return };
        let status = tokio::select! {
            _ = cancel.cancelled() => return,
            status = manager.check_health() => status,
        };
        let interval = manager.config.health.interval;
        let delay = if status.healthy {
            recheck = None;
            interval
        } else {
            let delays = recheck.get_or_insert_with(|| Box::new(manager.config.health.recheck.delays()));
            delays.next().unwrap_or(interval).min(interval)
        };
        next_check = tokio::time::Instant::now() + delay;
        drop(manager);
    }
}
