//! Graceful shutdown with a deadline.
//!
//! Order, and why:
//!
//! 1. Mark the manager shutting down (`retry` and the layers stop starting work) and close the
//!    pool at the same moment: from the first instant, every new acquisition fails at once
//!    (`PoolClosed`, or [`Error::ShutDown`](crate::Error::ShutDown) through the manager's own
//!    methods); connections returned from now on are closed.
//! 2. Stop the background tasks (health loop, leak scanner, event forwarding).
//! 3. Wait up to the deadline for every checked-out connection to come back, and meanwhile
//!    flush the connection log: it writes through its own one-connection pool, so it is not
//!    refused with the application.
//! 4. If some did not come back: they are forced. The server processes of all our connections
//!    (found by the manager's tag in `application_name`, so another replica sharing the prefix is
//!    left alone) are ended with `pg_terminate_backend` over one fresh, unpooled connection
//!    (through the tunnel, which is still up), so nothing of ours stays in `pg_stat_activity` and
//!    the holders get an error instead of hanging.
//! 5. Close the connection log and its pool, disconnect the tunnel, report.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sea_orm::sqlx;

use super::Inner;
use super::health::{HealthStatus, TunnelHealth};
use crate::observe::events;
use crate::observe::log_sink::ConnectionLogEvent;
use crate::observe::metrics as m;

/// What [`shutdown`](super::ConnectionManager::shutdown) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Connections checked out when shutdown began that were returned before the deadline.
    pub drained: u32,
    /// Connections still checked out at the deadline, closed by force.
    pub forced: u32,
    /// How long the whole shutdown took.
    pub duration: Duration,
}

/// Bound on the extra steps after the drain deadline (terminating backends, the final close).
const FORCE_BUDGET: Duration = Duration::from_secs(3);

impl Inner {
    pub(crate) async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let until = tokio::time::Instant::now() + deadline;
        self.shutting_down.store(true, Ordering::SeqCst);
        // 1. Refuse new acquisitions now: `close` marks the pool closed when called; the future
        //    it returns waits for the checked-out connections (polled in step 3).
        let pool = self.db.get_postgres_connection_pool().clone();
        let checked_out_at_start = pool.size().saturating_sub(pool.num_idle() as u32);
        let drain = pool.close();
        events::manager_lifecycle("shutting down", &format_args!("drain deadline {deadline:?}"));

        // 2. Background tasks. A health probe in flight is cancelled with its task.
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout_at(until, self.tasks.wait()).await;
        self.publish(HealthStatus {
            healthy: false,
            tunnel: if self.tunnel.is_some() {
                TunnelHealth::Up
            } else {
                TunnelHealth::Direct
            },
            database: false,
            latency: None,
            pool_size: pool.size(),
            idle: pool.num_idle() as u32,
            error: Some("shutting down".into()),
            checked_at: std::time::SystemTime::now(),
        });

        // 3. Drain, and flush the log (over its own pool) meanwhile.
        let flush = async {
            if let Some(sink) = &self.sink {
                sink.record(
                    ConnectionLogEvent::new("manager", "shutdown").with_metadata(sea_orm::JsonValue::Object(
                        [("checked_out".to_string(), checked_out_at_start.into())]
                            .into_iter()
                            .collect(),
                    )),
                );
                let _ = sink.flush(deadline / 4).await;
            }
        };
        let (drained_in_time, ()) = tokio::join!(async { tokio::time::timeout_at(until, drain).await.is_ok() }, flush);
        let mut forced = 0;
        if !drained_in_time && self.config.pgbouncer_mode() {
            // Behind a transaction pooler the server processes are the pooler's, shared with
            // other clients: never terminate them. Closing the pool below ends ours.
            forced = pool.size().saturating_sub(pool.num_idle() as u32);
            events::manager_lifecycle(
                "forced connections",
                &format_args!("{forced} checked out; PgBouncer mode: closed, no backend terminated"),
            );
        } else if !drained_in_time {
            forced = pool.size().saturating_sub(pool.num_idle() as u32);
            // 4. Force: end the server side of every connection of ours, idle ones included
            //    (the pool only closes idle connections once all checked-out ones are back).
            let base = self.hooks.id_base();
            match tokio::time::timeout(FORCE_BUDGET, terminate_backends(&pool, base, &like_prefix(base))).await {
                Ok(Ok(n)) => events::manager_lifecycle(
                    "forced connections",
                    &format_args!("{forced} checked out, {n} backends terminated"),
                ),
                Ok(Err(e)) => events::connection_error(None, pool.size(), "forced", &e),
                Err(_) => events::connection_error(None, pool.size(), "forced", &"terminating backends timed out"),
            }
            if forced > 0 {
                metrics::counter!(m::DB_CONNECTION_ERRORS_TOTAL, m::POOL_LABEL => self.hooks.pool_label().to_owned(), "kind" => "forced")
                    .increment(u64::from(forced));
            }
            let _ = tokio::time::timeout(FORCE_BUDGET, pool.close()).await;
        }
        let drained = checked_out_at_start.saturating_sub(forced);

        // 5. Log, tunnel.
        if let Some(sink) = self.hooks.set_sink(None) {
            sink.close(Duration::from_millis(200)).await;
        }
        if let Some(sink_db) = &self.sink_db {
            let _ = tokio::time::timeout(FORCE_BUDGET, sink_db.get_postgres_connection_pool().close()).await;
        }
        if let Some(tunnel) = &self.tunnel {
            tunnel.disconnect().await;
        }
        let report = ShutdownReport {
            drained,
            forced,
            duration: started.elapsed(),
        };
        events::manager_lifecycle("shut down", &format_args!("{report:?}"));
        report
    }
}

/// A `LIKE` pattern (default escape `\`) for `<base>-` followed by anything.
fn like_prefix(base: &str) -> String {
    let mut pattern = String::with_capacity(base.len() + 4);
    for c in base.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push_str("-%");
    pattern
}

/// Ends the server processes whose `application_name` is `base` (the startup name without
/// per-connection ids) or `LIKE pattern` over one fresh
/// connection made with the pool's own connect options (so it goes the same way: through the
/// tunnel when there is one) but without the pool's hooks. Returns how many were terminated.
async fn terminate_backends(pool: &sqlx::PgPool, base: &str, pattern: &str) -> Result<i64, sqlx::Error> {
    use sqlx::{ConnectOptions as _, Connection as _};

    // As the login user, not the configured role: only a member of the role that logged in may
    // end its backends (a later `-c` overrides the pool's).
    let options = (*pool.connect_options()).clone().options([("role", "none")]);
    let mut conn = options.connect().await?;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 2000)) FROM pg_stat_activity \
         WHERE (application_name LIKE $1 OR application_name = $2) AND pid <> pg_backend_pid()",
    )
    .bind(pattern)
    .bind(base)
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(terminated)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pattern_matches_only_the_tagged_ids() {
        assert_eq!(super::like_prefix("svc_1%\\-ab12cd"), "svc\\_1\\%\\\\-ab12cd-%");
    }
}
