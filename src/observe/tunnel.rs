//! Metrics of the SSH tunnel (its tracing events are in [`events`](super::events)).
//!
//! The tunnel code calls these functions and never spells a metric name or label itself. Each
//! gauge is written by exactly one function here, from the tunnel's own counters.

use std::sync::Arc;

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

    /// `ssh_tunnel_bastion_sessions` (label `bastion`): the live SSH sessions on one bastion.
    pub(crate) fn set_bastion_sessions(&self, bastion: &str, sessions: usize) {
        metrics::gauge!(m::SSH_TUNNEL_BASTION_SESSIONS, m::POOL_LABEL => self.label(), m::BASTION_LABEL => bastion.to_owned())
            .set(sessions as f64);
    }

    /// `ssh_tunnel_failovers_total` (label `bastion`: the bastion moved to).
    pub(crate) fn count_failover(&self, bastion: &str) {
        metrics::counter!(m::SSH_TUNNEL_FAILOVERS_TOTAL, m::POOL_LABEL => self.label(), m::BASTION_LABEL => bastion.to_owned())
            .increment(1);
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

    /// `db_tls_cert_expiry_seconds`: seconds until the server certificate of the latest TLS
    /// handshake expires.
    pub(crate) fn set_tls_cert_expiry(&self, seconds: i64) {
        metrics::gauge!(m::DB_TLS_CERT_EXPIRY_SECONDS, m::POOL_LABEL => self.label()).set(seconds as f64);
    }
}
