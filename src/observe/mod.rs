//! Observability: tracing events, metric names, and the optional `connection_logs` sink.

pub mod metrics;
