//! Small helpers for tests that use the test kit: a configuration tuned to show faults
//! quickly, and a polling wait.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::config::{BackoffPolicy, Config};

/// A configuration for tests against `database_url`: a pool of 4 with 3 s acquire/connect
/// timeouts, health checks every 500 ms (2 s probe timeout) with re-checks from 100 ms capped at
/// 500 ms, and connection ids prefixed `prefix` (so concurrent tests can tell their backends
/// apart in `pg_stat_activity`).
///
/// Add a tunnel with [`Config::tunnel`]; adjust anything with the `map_*` builders.
pub fn fast_config(database_url: impl Into<String>, prefix: &str) -> Config {
    Config::new(database_url)
        .map_pool(|p| {
            p.max_connections(4)
                .acquire_timeout(Duration::from_secs(3))
                .connect_timeout(Duration::from_secs(3))
                .application_name(prefix)
        })
        .map_health(|h| {
            h.interval(Duration::from_millis(500))
                .timeout(Duration::from_secs(2))
                .recheck(BackoffPolicy::new(Duration::from_millis(100)).max_delay(Duration::from_millis(500)))
        })
}

/// Polls `check` every 50 ms until it returns `true`.
///
/// # Panics
///
/// When `check` is still false after `within`, naming `what` — a test's liveness bound.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "not {what} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
