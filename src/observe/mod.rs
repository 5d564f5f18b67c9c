//! Observability: tracing events, metric names, and the optional `connection_logs` sink.

pub mod events;
pub mod log_sink;
pub mod metrics;
