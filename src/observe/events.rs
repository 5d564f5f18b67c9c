//! Tracing events of the connection manager, and the layer that turns sqlx's acquire timing
//! into a metric.
//!
//! Every event carries a field `event` whose value is one of the [`EventKind`] names, so a log
//! pipeline can filter on it without parsing messages. Connection events also carry
//! `connection_id` (the connection's `application_name`, e.g. `sea-orm-tunnel-7`) and
//! `pool_size`; events that happen on behalf of a request carry its `correlation_id`.
//!
//! Targets are stable strings: [`TARGET_POOL`] (acquire, release, open, close, leaks),
//! [`TARGET_HEALTH`] (health checks) and [`TARGET_MANAGER`] (lifecycle: start, shutdown).
//!
//! # Correlation ids
//!
//! The id of the request a connection is used for is taken from, in order:
//!
//! 1. the task-local scope set by [`with_correlation_id`] (the inject layer wraps each request in
//!    it), then
//! 2. nothing: events emitted inside a request span still show that span's fields (including its
//!    `correlation_id`) in any subscriber that prints spans.
//!
//! ```
//! use sea_orm_tunnel::observe::events::{current_correlation_id, with_correlation_id};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let seen = with_correlation_id("req-42", async { current_correlation_id() }).await;
//! assert_eq!(seen.as_deref(), Some("req-42"));
//! assert_eq!(current_correlation_id(), None);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Target of connection-pool events (acquire, release, open, close, leak, connection errors).
pub const TARGET_POOL: &str = "sea_orm_tunnel::pool";
/// Target of health-check events.
pub const TARGET_HEALTH: &str = "sea_orm_tunnel::health";
/// Target of manager lifecycle events (start, shutdown).
pub const TARGET_MANAGER: &str = "sea_orm_tunnel::manager";
/// Target of SSH tunnel events (connected, session lost, reconnecting, gave up).
pub const TARGET_TUNNEL: &str = "sea_orm_tunnel::tunnel";

/// The value of the `event` field of each event this crate emits from the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A pooled connection was handed out (level DEBUG).
    ConnectionAcquired,
    /// A pooled connection was given back (level DEBUG).
    ConnectionReleased,
    /// A new physical connection was opened and set up (level INFO).
    ConnectionOpened,
    /// A physical connection was closed (level INFO).
    ConnectionClosed,
    /// A connection could not be opened or set up, or was found broken (level WARN).
    ConnectionError,
    /// A connection stayed checked out longer than the leak threshold (level WARN, once per checkout).
    ConnectionLeaked,
    /// A health check ran (DEBUG when healthy, WARN when not, INFO on recovery).
    HealthCheck,
    /// A health check failed (level WARN). Emitted in addition to [`EventKind::HealthCheck`].
    HealthCheckFailed,
    /// The manager started or shut down (level INFO).
    ManagerLifecycle,
    /// The SSH tunnel is up: its first session, or the one that replaced every lost session
    /// (level INFO).
    TunnelConnected,
    /// An SSH session was lost, or the tunnel was closed on purpose (WARN, INFO when closed).
    TunnelDisconnected,
    /// An attempt of a reconnect round is about to run (level WARN).
    TunnelReconnecting,
    /// The database password changed at its source and new connections use it (level INFO).
    PasswordRotated,
    /// A failover was detected and the pool generation retired (level WARN).
    DatabaseFailover,
    /// With several hosts or a `target_session_attrs`: the server that takes new connections
    /// was chosen, at start or because the previous one stopped qualifying (INFO at start,
    /// WARN on a switch).
    DatabaseHostSelected,
}

impl EventKind {
    /// The `event` field value, e.g. `"connection_acquired"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::ConnectionAcquired => "connection_acquired",
            EventKind::ConnectionReleased => "connection_released",
            EventKind::ConnectionOpened => "connection_opened",
            EventKind::ConnectionClosed => "connection_closed",
            EventKind::ConnectionError => "connection_error",
            EventKind::ConnectionLeaked => "connection_leaked",
            EventKind::HealthCheck => "health_check",
            EventKind::HealthCheckFailed => "health_check_failed",
            EventKind::ManagerLifecycle => "manager_lifecycle",
            EventKind::TunnelConnected => "tunnel_connected",
            EventKind::TunnelDisconnected => "tunnel_disconnected",
            EventKind::TunnelReconnecting => "tunnel_reconnecting",
            EventKind::PasswordRotated => "password_rotated",
            EventKind::DatabaseFailover => "database_failover",
            EventKind::DatabaseHostSelected => "database_host_selected",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

tokio::task_local! {
    static CORRELATION_ID: Arc<str>;
}

/// Runs `fut` with `id` as the correlation id of every connection event it causes.
///
/// The inject layer wraps each request in this; call it yourself for background jobs.
pub async fn with_correlation_id<F: Future>(id: impl Into<Arc<str>>, fut: F) -> F::Output {
    CORRELATION_ID.scope(id.into(), fut).await
}

/// The correlation id of the current task, if it runs inside [`with_correlation_id`].
pub fn current_correlation_id() -> Option<Arc<str>> {
    CORRELATION_ID.try_with(Arc::clone).ok()
}

/// Where a checkout happened: the request id and the span that took the connection.
///
/// Captured when a connection is acquired and reported with a leak.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckoutOrigin {
    /// The correlation id in scope at acquire time.
    pub correlation_id: Option<Arc<str>>,
    /// Name of the tracing span current at acquire time (`None` outside any span, or when no
    /// subscriber is installed).
    pub span: Option<&'static str>,
}

impl CheckoutOrigin {
    /// Captures the current task's correlation id and the span that is taking the connection:
    /// the innermost current span that is not SeaORM's or sqlx's own (those say "begin" or
    /// "query", not who asked), when the subscriber is built on `tracing_subscriber::Registry`;
    /// otherwise simply the current span.
    pub fn capture() -> Self {
        CheckoutOrigin {
            correlation_id: current_correlation_id(),
            span: caller_span(),
        }
    }
}

fn caller_span() -> Option<&'static str> {
    use tracing_subscriber::registry::LookupSpan;

    let current = tracing::Span::current();
    let id = current.id()?;
    let from_registry = tracing::dispatcher::get_default(|dispatch| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(&id)?;
        span.scope()
            .find(|s| {
                let target = s.metadata().target();
                !(target.starts_with("sea_orm") || target.starts_with("sqlx"))
            })
            .map(|s| s.metadata().name())
            .map(Some)
    });
    match from_registry {
        Some(found) => found,
        None => current.metadata().map(|m| m.name()),
    }
}

// The helpers below are the only places that spell the event fields, so every event of one kind
// has the same shape.

pub(crate) fn connection_acquired(connection_id: &str, pool_size: u32, origin: &CheckoutOrigin, idle_for: Duration) {
    tracing::debug!(
        target: TARGET_POOL,
        event = EventKind::ConnectionAcquired.as_str(),
        connection_id,
        pool_size,
        correlation_id = origin.correlation_id.as_deref(),
        idle_ms = idle_for.as_millis() as u64,
        "connection acquired"
    );
}

pub(crate) fn connection_released(
    connection_id: &str,
    pool_size: u32,
    correlation_id: Option<&str>,
    held: Option<Duration>,
) {
    tracing::debug!(
        target: TARGET_POOL,
        event = EventKind::ConnectionReleased.as_str(),
        connection_id,
        pool_size,
        correlation_id,
        held_ms = held.map(|d| d.as_millis() as u64),
        "connection released"
    );
}

pub(crate) fn connection_opened(connection_id: &str, pool_size: u32, setup: Duration) {
    tracing::info!(
        target: TARGET_POOL,
        event = EventKind::ConnectionOpened.as_str(),
        connection_id,
        pool_size,
        correlation_id = current_correlation_id().as_deref(),
        setup_ms = setup.as_millis() as u64,
        "connection opened"
    );
}

pub(crate) fn connection_closed(connection_id: &str, pool_size: u32, reason: &str, lifetime: Option<Duration>) {
    tracing::info!(
        target: TARGET_POOL,
        event = EventKind::ConnectionClosed.as_str(),
        connection_id,
        pool_size,
        reason,
        lifetime_s = lifetime.map(|d| d.as_secs_f64()),
        "connection closed"
    );
}

pub(crate) fn connection_error(connection_id: Option<&str>, pool_size: u32, kind: &str, error: &dyn fmt::Display) {
    tracing::warn!(
        target: TARGET_POOL,
        event = EventKind::ConnectionError.as_str(),
        connection_id,
        pool_size,
        kind,
        error = %error,
        correlation_id = current_correlation_id().as_deref(),
        "connection error"
    );
}

pub(crate) fn connection_leaked(connection_id: &str, pool_size: u32, held: Duration, origin: &CheckoutOrigin) {
    tracing::warn!(
        target: TARGET_POOL,
        event = EventKind::ConnectionLeaked.as_str(),
        connection_id,
        pool_size,
        held_ms = held.as_millis() as u64,
        correlation_id = origin.correlation_id.as_deref(),
        span = origin.span,
        "connection checked out longer than the leak detection threshold"
    );
}

pub(crate) fn health_check(
    healthy: bool,
    recovered: bool,
    pool_size: u32,
    latency: Option<Duration>,
    tunnel: &str,
    error: Option<&str>,
) {
    let latency_ms = latency.map(|d| d.as_secs_f64() * 1000.0);
    if !healthy {
        tracing::warn!(
            target: TARGET_HEALTH,
            event = EventKind::HealthCheck.as_str(),
            healthy,
            pool_size,
            tunnel,
            latency_ms,
            error,
            "health check: unhealthy"
        );
        tracing::warn!(
            target: TARGET_HEALTH,
            event = EventKind::HealthCheckFailed.as_str(),
            pool_size,
            tunnel,
            error,
            "health check failed"
        );
    } else if recovered {
        tracing::info!(
            target: TARGET_HEALTH,
            event = EventKind::HealthCheck.as_str(),
            healthy,
            pool_size,
            tunnel,
            latency_ms,
            "health check: healthy again"
        );
    } else {
        tracing::debug!(
            target: TARGET_HEALTH,
            event = EventKind::HealthCheck.as_str(),
            healthy,
            pool_size,
            tunnel,
            latency_ms,
            "health check: healthy"
        );
    }
}

/// A failover was detected (`why`); every pooled connection was retired.
pub(crate) fn database_failover(pool: &str, why: &str) {
    metrics::counter!(super::metrics::DB_FAILOVERS_TOTAL, super::metrics::POOL_LABEL => pool.to_owned()).increment(1);
    tracing::warn!(
        target: TARGET_MANAGER,
        event = EventKind::DatabaseFailover.as_str(),
        pool,
        signal = why,
        "database failover detected; pooled connections retired, checking health now"
    );
}

/// New connections go to `host` (a `role` server) from now on; `previous` is where they went
/// before (`None` at start).
pub(crate) fn database_host_selected(pool: &str, host: &str, role: &str, previous: Option<&str>, attrs: &str) {
    match previous {
        None => tracing::info!(
            target: TARGET_MANAGER,
            event = EventKind::DatabaseHostSelected.as_str(),
            pool,
            host,
            role,
            target_session_attrs = attrs,
            "database host selected"
        ),
        Some(previous) => tracing::warn!(
            target: TARGET_MANAGER,
            event = EventKind::DatabaseHostSelected.as_str(),
            pool,
            host,
            role,
            previous,
            target_session_attrs = attrs,
            "database host switched; pooled connections retired"
        ),
    }
}

/// The database password changed at `source`; new connections log in with it.
pub(crate) fn password_rotated(pool: &str, source: &str, version: u64) {
    metrics::counter!(super::metrics::DB_PASSWORD_ROTATIONS_TOTAL, super::metrics::POOL_LABEL => pool.to_owned())
        .increment(1);
    tracing::info!(
        target: TARGET_MANAGER,
        event = EventKind::PasswordRotated.as_str(),
        pool,
        source,
        version,
        "database password rotated; new connections use the new one"
    );
}

pub(crate) fn manager_lifecycle(what: &str, detail: &dyn fmt::Display) {
    tracing::info!(
        target: TARGET_MANAGER,
        event = EventKind::ManagerLifecycle.as_str(),
        what,
        detail = %detail,
        "connection manager {what}"
    );
}

// Tunnel events: the tunnel code calls these and never spells an event name or field itself.

/// The tunnel is up: its first session, or the session that replaced every lost one.
pub(crate) fn tunnel_connected(session: u64, reconnect: bool, bastion: &dyn fmt::Display, endpoint: &dyn fmt::Display) {
    tracing::info!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelConnected.as_str(),
        session,
        reconnect,
        bastion = %bastion,
        local_endpoint = %endpoint,
        "SSH tunnel connected"
    );
}

/// An SSH session was lost (`remaining` sessions are still up).
pub(crate) fn session_lost(session: u64, remaining: usize, bastion: &dyn fmt::Display, error: &dyn fmt::Display) {
    tracing::warn!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelDisconnected.as_str(),
        session,
        remaining,
        bastion = %bastion,
        error = %error,
        "SSH session lost"
    );
}

/// Connecting through one of several bastions failed; the next one is tried.
pub(crate) fn bastion_failed(bastion: &dyn fmt::Display, permanent: bool, error: &dyn fmt::Display) {
    if permanent {
        tracing::error!(
            target: TARGET_TUNNEL,
            event = EventKind::ConnectionError.as_str(),
            bastion = %bastion,
            permanent,
            error = %error,
            "bastion failed permanently: not tried again by this tunnel"
        );
    } else {
        tracing::warn!(
            target: TARGET_TUNNEL,
            event = EventKind::ConnectionError.as_str(),
            bastion = %bastion,
            permanent,
            error = %error,
            "connecting through a bastion failed"
        );
    }
}

/// The tunnel opened a session on another bastion than the one before (failover, or back to the
/// preferred one).
pub(crate) fn bastion_failover(bastion: &dyn fmt::Display) {
    tracing::warn!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelConnected.as_str(),
        bastion = %bastion,
        "SSH tunnel moved to another bastion"
    );
}

/// The tunnel was closed on purpose.
pub(crate) fn tunnel_closed(endpoint: &dyn fmt::Display) {
    tracing::info!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelDisconnected.as_str(),
        local_endpoint = %endpoint,
        "SSH tunnel closed"
    );
}

/// Attempt `attempt` of a reconnect round starts after `delay`.
pub(crate) fn tunnel_reconnecting(attempt: u32, delay: Duration, error: &dyn fmt::Display) {
    tracing::warn!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelReconnecting.as_str(),
        attempt,
        delay_ms = delay.as_millis() as u64,
        error = %error,
        "reconnecting the SSH tunnel"
    );
}

/// A round of reconnect attempts gave up (permanent error, or retries used up).
pub(crate) fn tunnel_gave_up(error: &dyn fmt::Display) {
    tracing::error!(
        target: TARGET_TUNNEL,
        event = EventKind::ConnectionError.as_str(),
        error = %error,
        "SSH tunnel gave up"
    );
}

/// The bastion refused a forwarding channel for good (`administratively prohibited`).
pub(crate) fn channel_refused(session: u64, error: &dyn fmt::Display) {
    tracing::error!(
        target: TARGET_TUNNEL,
        event = EventKind::ConnectionError.as_str(),
        session,
        error = %error,
        "bastion refused the forwarding channel"
    );
}

/// A [`tracing_subscriber::Layer`] that feeds `db_connection_acquire_seconds` from sqlx's own
/// acquire timing.
///
/// sqlx measures each `Pool::acquire` from the call until a connection is handed out (waiting for
/// a free slot, the idle ping, opening a new connection) and, in pools built by the manager,
/// reports it as a TRACE event with target `sqlx::pool::acquire` (a WARN event past 2 s). That
/// event is the only place sqlx exposes the number: its pool has no callback, and its hooks run
/// after the wait. This layer turns those events into the histogram, with the `pool` label set by
/// [`AcquireTimeLayer::pool_label`] (`"default"` unless set: the event does not say which pool it
/// came from). Nothing else is recorded or printed.
///
/// Add it with [`AcquireTimeLayer::filtered`], next to a log layer that carries its own
/// filter, so a log filter such as `info` never decides whether the metric exists:
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
/// use tracing_subscriber::{EnvFilter, Layer};
/// use sea_orm_tunnel::observe::events::AcquireTimeLayer;
///
/// let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
/// let subscriber = tracing_subscriber::registry()
///     // The log filter applies to the log output only ...
///     .with(tracing_subscriber::fmt::layer().with_filter(log_filter))
///     // ... and this layer sees sqlx's TRACE acquire event whatever that filter says.
///     .with(AcquireTimeLayer::filtered());
/// tracing::subscriber::set_global_default(subscriber).ok();
/// ```
///
/// A filter added to the registry itself (`registry().with(EnvFilter::new("info"))`) is global:
/// it drops the TRACE event before any layer sees it, and the histogram stays empty.
#[derive(Debug, Clone)]
pub struct AcquireTimeLayer {
    pool: metrics::SharedString,
}

impl Default for AcquireTimeLayer {
    fn default() -> Self {
        AcquireTimeLayer {
            pool: metrics::SharedString::const_str(crate::observe::metrics::DEFAULT_POOL),
        }
    }
}

impl AcquireTimeLayer {
    /// The bare layer, without a filter of its own.
    ///
    /// It records the same samples as [`AcquireTimeLayer::filtered`], but as an unfiltered layer
    /// it makes every event of every level and target reach the subscriber (it cannot opt out of
    /// some without disabling them for the other layers too). Prefer
    /// [`filtered`](AcquireTimeLayer::filtered).
    pub fn new() -> Self {
        AcquireTimeLayer::default()
    }

    /// The layer behind its own per-layer filter, which admits sqlx's acquire timing events
    /// (target `sqlx::pool::acquire`, any level) and nothing else.
    ///
    /// Other layers keep their own filters: this one neither hides their events nor makes
    /// other TRACE events reach them. Callsites no layer wants stay disabled, so the cost of a
    /// TRACE event elsewhere in the program does not change.
    pub fn filtered<S>() -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        AcquireTimeLayer::new().into_filtered()
    }

    /// The `pool` label of the samples (default `"default"`): set it to the manager's
    /// [`PoolConfig::pool_label`](crate::config::PoolConfig::pool_label) when you changed that.
    /// sqlx's event does not say which pool it came from, so one layer labels every pool's samples
    /// alike.
    #[must_use]
    pub fn pool_label(mut self, label: impl Into<String>) -> Self {
        self.pool = label.into().into();
        self
    }

    /// This layer behind its own filter, as [`filtered`](AcquireTimeLayer::filtered) builds it.
    pub fn into_filtered<S>(self) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        self.with_filter(tracing_subscriber::filter::filter_fn(is_sqlx_acquire_event))
    }
}

/// Whether `metadata` is one of sqlx's acquire timing events.
fn is_sqlx_acquire_event(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_event() && metadata.target() == SQLX_ACQUIRE_TARGET
}

/// Target of sqlx's acquire timing events.
const SQLX_ACQUIRE_TARGET: &str = "sqlx::pool::acquire";

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AcquireTimeLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        if !is_sqlx_acquire_event(event.metadata()) {
            return;
        }
        struct Seconds(Option<f64>);
        impl tracing::field::Visit for Seconds {
            fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
                if field.name() == "acquired_after_secs" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn fmt::Debug) {}
        }
        let mut seconds = Seconds(None);
        event.record(&mut seconds);
        if let Some(secs) = seconds.0 {
            metrics::histogram!(
                crate::observe::metrics::DB_CONNECTION_ACQUIRE_SECONDS,
                crate::observe::metrics::POOL_LABEL => self.pool.clone()
            )
            .record(secs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn correlation_id_is_scoped_to_the_task() {
        assert_eq!(current_correlation_id(), None);
        let inner = with_correlation_id("abc", async {
            let origin = CheckoutOrigin::capture();
            origin.correlation_id
        })
        .await;
        assert_eq!(inner.as_deref(), Some("abc"));
        assert_eq!(current_correlation_id(), None);
    }

    #[test]
    fn event_names_are_stable() {
        assert_eq!(EventKind::ConnectionAcquired.to_string(), "connection_acquired");
        assert_eq!(EventKind::ConnectionReleased.as_str(), "connection_released");
        assert_eq!(EventKind::HealthCheck.as_str(), "health_check");
        assert_eq!(EventKind::ConnectionError.as_str(), "connection_error");
        assert_eq!(EventKind::TunnelConnected.as_str(), "tunnel_connected");
        assert_eq!(EventKind::TunnelDisconnected.as_str(), "tunnel_disconnected");
        assert_eq!(EventKind::TunnelReconnecting.as_str(), "tunnel_reconnecting");
    }
}
