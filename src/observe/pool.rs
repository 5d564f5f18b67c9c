//! What the pool's hooks report about one physical connection: the tracing event, the metric and
//! the `connection_logs` row of each lifecycle step, spelled here once with the pool's label.

use std::time::Duration;

use super::events::{self, CheckoutOrigin};
use super::log_sink::ConnectionLogEvent;
use super::metrics as m;

/// The `pool` label of one pool, and the reports that carry it.
#[derive(Debug, Clone)]
pub(crate) struct PoolTelemetry {
    pool: String,
}

impl PoolTelemetry {
    pub(crate) fn new(pool_label: &str) -> PoolTelemetry {
        PoolTelemetry {
            pool: pool_label.to_owned(),
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.pool
    }

    fn row(&self, id: &str, status: &str, pairs: &[(&str, &str)]) -> ConnectionLogEvent {
        let mut meta = serde_json::Map::new();
        meta.insert("pool".to_owned(), self.pool.clone().into());
        for (k, v) in pairs {
            meta.insert((*k).to_owned(), (*v).into());
        }
        ConnectionLogEvent::new(id, status).with_metadata(meta.into())
    }

    /// A new connection was set up in `setup` and handed to the acquire that opened it.
    pub(crate) fn opened(
        &self,
        id: &str,
        pool_size: u32,
        setup: Duration,
        origin: &CheckoutOrigin,
    ) -> ConnectionLogEvent {
        events::connection_opened(id, pool_size, setup);
        events::connection_acquired(id, pool_size, origin, Duration::ZERO);
        self.row(id, "connected", &[])
    }

    /// The hooks close a connection (or found it dead) after `age`.
    pub(crate) fn closed(&self, id: &str, pool_size: u32, reason: &str, age: Duration) -> ConnectionLogEvent {
        metrics::histogram!(m::DB_CONNECTION_LIFETIME_SECONDS, m::POOL_LABEL => self.pool.clone())
            .record(age.as_secs_f64());
        events::connection_closed(id, pool_size, reason, Some(age));
        self.row(id, "disconnected", &[("reason", reason)])
    }

    /// Setting up or pinging a connection failed (`kind`: `setup`, `ping`).
    pub(crate) fn failed(
        &self,
        id: &str,
        pool_size: u32,
        kind: &'static str,
        error: &dyn std::fmt::Display,
    ) -> ConnectionLogEvent {
        metrics::counter!(m::DB_CONNECTION_ERRORS_TOTAL, m::POOL_LABEL => self.pool.clone(), "kind" => kind)
            .increment(1);
        events::connection_error(Some(id), pool_size, kind, error);
        ConnectionLogEvent::new(id, "error").with_error(error.to_string())
    }

    /// A checkout was held `held`, longer than the leak threshold (reported once per checkout).
    pub(crate) fn leaked(
        &self,
        id: &str,
        pool_size: u32,
        held: Duration,
        origin: &CheckoutOrigin,
    ) -> ConnectionLogEvent {
        metrics::counter!(m::DB_CONNECTION_LEAKS_TOTAL, m::POOL_LABEL => self.pool.clone()).increment(1);
        events::connection_leaked(id, pool_size, held, origin);
        let held_ms = held.as_millis().to_string();
        let mut pairs = vec![("held_ms", held_ms.as_str())];
        pairs.extend(origin.span.map(|span| ("span", span)));
        pairs.extend(origin.correlation_id.as_deref().map(|c| ("correlation_id", c)));
        self.row(id, "leak", &pairs)
    }
}
