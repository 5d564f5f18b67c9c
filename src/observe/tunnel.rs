//! Tracing events and metrics of the SSH tunnel.
//!
//! The tunnel code calls these functions and never spells an event name, a field or a metric
//! name itself, so every event of one kind has the same shape and every metric the same labels.
//! Each gauge is written by exactly one function here, from the tunnel's own counters.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::events::{EventKind, TARGET_TUNNEL};
use super::metrics as m;

/// The `pool` label of one tunnel's metrics, and the functions that write them.
#[derive(Debug, Clone)]
pub(crate) struct TunnelTelemetry {
    pool: Arc<str>,
}

impl TunnelTelemetry {
    pub(crate) fn new(pool_label: &str) -> TunnelTelemetry {
        TunnelTelemetry {
            pool: pool_label.into(),
        }
    }

    fn label(&self) -> String {
        self.pool.to_string()
    }

    /// `ssh_tunnel_up`: 1 while the tunnel state is connected.
    pub(crate) fn set_up(&self, up: bool) {
        metrics::gauge!(m::SSH_TUNNEL_UP, m::POOL_LABEL => self.label()).set(if up { 1.0 } else { 0.0 });
    }

    /// `ssh_tunnel_sessions`: the live SSH sessions.
    pub(crate) fn set_sessions(&self, sessions: usize) {
        metrics::gauge!(m::SSH_TUNNEL_SESSIONS, m::POOL_LABEL => self.label()).set(sessions as f64);
    }

    /// `ssh_tunnel_channels_active`: the forwarded connections open now.
    pub(crate) fn set_channels(&self, channels: usize) {
        metrics::gauge!(m::SSH_TUNNEL_CHANNELS_ACTIVE, m::POOL_LABEL => self.label()).set(channels as f64);
    }

    /// `ssh_tunnel_reconnects_total`.
    pub(crate) fn count_reconnect(&self) {
        metrics::counter!(m::SSH_TUNNEL_RECONNECTS_TOTAL, m::POOL_LABEL => self.label()).increment(1);
    }

    /// `ssh_tunnel_channel_open_failures_total`: a channel the bastion did not open, or a local
    /// connection refused for lack of a session or a slot.
    pub(crate) fn count_channel_open_failure(&self) {
        metrics::counter!(m::SSH_TUNNEL_CHANNEL_OPEN_FAILURES_TOTAL, m::POOL_LABEL => self.label()).increment(1);
    }

    /// The two `ssh_tunnel_bytes_total` counters of one forwarded connection:
    /// `(to_remote, from_remote)`.
    pub(crate) fn byte_counters(&self) -> (metrics::Counter, metrics::Counter) {
        let to =
            metrics::counter!(m::SSH_TUNNEL_BYTES_TOTAL, m::POOL_LABEL => self.label(), "direction" => "to_remote");
        let from =
            metrics::counter!(m::SSH_TUNNEL_BYTES_TOTAL, m::POOL_LABEL => self.label(), "direction" => "from_remote");
        (to, from)
    }
}

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
pub(crate) fn session_lost(session: u64, remaining: usize, error: &dyn fmt::Display) {
    tracing::warn!(
        target: TARGET_TUNNEL,
        event = EventKind::TunnelDisconnected.as_str(),
        session,
        remaining,
        error = %error,
        "SSH session lost"
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
