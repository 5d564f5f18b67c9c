//! The integration tests: one binary (one link of sea-orm, russh, axum and tonic), one module per
//! area, and one `support` module they share. Tests that need a process of their own say so with
//! `support::run_alone`.

mod support;

mod acquire_metric;
mod axum_layers;
mod bastion;
mod bastions;
mod certificates;
mod chaos;
mod chaos_failover;
mod cli;
mod config;
mod failover;
mod herd;
mod hostile;
mod jump;
mod layer_correlation;
mod local_ssl_answer;
mod log_sink;
mod manager;
mod manager_tunnel;
mod migration;
mod multihost;
mod password;
mod pgbouncer;
mod security;
mod sidecar;
mod soak;
mod spare;
mod ssh_config;
mod testkit;
mod tls;
mod tonic_layers;
mod tunnel;
mod tunnel_auth;
mod tunnel_env;
mod tunnel_faults;
