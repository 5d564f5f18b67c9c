//! `manager.retry(|db| async { ... })`: run a data operation, retrying transient failures.
//!
//! This is where non-idempotent work is retried safely: the caller decides what one attempt is
//! (typically one transaction), and only errors for which retrying can help are retried
//! ([`Error::is_transient`]: lost connections, PostgreSQL restarting, pool timeouts,
//! serialization failures). A permanent error (a syntax error, a constraint violation, a refused
//! host key) returns at once, after a single attempt.
//!
//! A tunnel that cannot forward for a permanent reason (it failed on a changed host key or a
//! refused login, or the bastion refuses the channel as `administratively prohibited`) closes
//! local connections without a word, which the driver reports as a transient-looking I/O error.
//! The manager knows better ([`SshTunnel::permanent_error`](crate::tunnel::SshTunnel::permanent_error))
//! and returns the tunnel's permanent error instead, so nothing retries a configuration problem.

use std::future::Future;

use sea_orm::{DatabaseConnection, DbErr};

use super::ConnectionManager;
use crate::config::BackoffPolicy;
use crate::error::{Error, Result};
use crate::observe::events::TARGET_MANAGER;

impl ConnectionManager {
    /// Runs `op` with the managed connection, retrying transient errors on the configured
    /// recovery backoff ([`Config::recovery`](crate::config::Config::recovery)).
    ///
    /// `op` gets a clone of the [`DatabaseConnection`] (cheap: it shares the pool) and may return
    /// any error that converts into [`Error`] — [`DbErr`] does. Returns the first success, the
    /// first permanent error, or the last transient error once the policy gives up. A pool
    /// timeout comes back as [`Error::Timeout`] naming the pool limit. Stops retrying (with
    /// [`Error::ShutDown`]) once [`shutdown`](Self::shutdown) has begun.
    ///
    /// ```no_run
    /// # async fn run(manager: sea_orm_tunnel::manager::ConnectionManager) -> sea_orm_tunnel::Result<()> {
    /// use sea_orm::{ConnectionTrait, TransactionTrait};
    ///
    /// let rows = manager
    ///     .retry(|db| async move {
    ///         let txn = db.begin().await?;
    ///         let res = txn.execute_unprepared("UPDATE counters SET n = n + 1").await?;
    ///         txn.commit().await?;
    ///         Ok::<_, sea_orm::DbErr>(res.rows_affected())
    ///     })
    ///     .await?;
    /// # let _ = rows; Ok(()) }
    /// ```
    pub async fn retry<F, Fut, T, E>(&self, op: F) -> Result<T>
    where
        F: FnMut(DatabaseConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Error>,
    {
        let policy = self.inner.config.recovery.clone();
        self.retry_with(&policy, op).await
    }

    /// [`retry`](Self::retry) with an explicit backoff policy.
    pub async fn retry_with<F, Fut, T, E>(&self, policy: &BackoffPolicy, mut op: F) -> Result<T>
    where
        F: FnMut(DatabaseConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Error>,
    {
        let mut delays = policy.delays();
        let mut attempt: u32 = 0;
        loop {
            if self.is_shutting_down() {
                return Err(Error::ShutDown("ConnectionManager"));
            }
            attempt += 1;
            let error = match op(self.inner.db.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) => self.inner.explain(e.into()),
            };
            if !error.is_transient() || self.is_shutting_down() {
                return Err(error);
            }
            let Some(delay) = delays.next() else {
                return Err(error);
            };
            tracing::debug!(
                target: TARGET_MANAGER,
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "transient database error; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

impl super::Inner {
    /// Adds what the manager knows to an error: a pool timeout names the limit; a closed pool during shutdown is [`Error::ShutDown`]; a
    /// transient-looking error while the tunnel has a permanent problem is that problem
    /// ([`Error::TunnelFailed`] around the tunnel's error, or the permanent
    /// [`Error::ChannelRefused`]).
    pub(crate) fn explain(&self, error: Error) -> Error {
        // Inside a request scope, `From<DbErr>` already looked at it.
        let error = if super::failover::in_scope() {
            error
        } else {
            self.failover.observe(error)
        };
        let error = match error {
            Error::Database(e) if !self.config.pgbouncer_mode() && looks_like_a_transaction_pooler(&e) => {
                Error::TransactionPooler { source: e }
            }
            other => other,
        };
        if let Some(rotation) = &self.password
            && super::password::is_password_rejected(&error)
        {
            // A rotating password may be ahead of (or behind) the server for a moment.
            return rotation.rejected(error);
        }
        if error.is_transient()
            && let Some(cause) = self.tunnel.as_ref().and_then(|t| t.permanent_error())
        {
            let cause = Error::clone(&cause);
            return match cause {
                Error::ChannelRefused { .. } | Error::Tls { .. } => cause,
                other => Error::TunnelFailed(Box::new(other)),
            };
        }
        // The tunnel refused TLS to the server and told the client so in an ErrorResponse: the
        // tunnel's own error says it better (and keeps its kind).
        if crate::error::is_tunnel_tls_refusal(&error)
            && let Some(tunnel) = &self.tunnel
            && let Some(cause) = tunnel.permanent_error().or_else(|| tunnel.last_error())
            && let Error::Tls { .. } = &*cause
        {
            return Error::clone(&cause);
        }
        match error {
            Error::Database(DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout)) => {
                let pool = self.db.get_postgres_connection_pool();
                let size = pool.size();
                let idle = pool.num_idle() as u32;
                let max = self.config.pool.max_connections;
                let detail = if size >= max && idle == 0 {
                    format!(" (pool max {max} connections, all {size} checked out)")
                } else {
                    format!(" (pool max {max} connections, {size} open, {idle} idle)")
                };
                Error::Timeout {
                    kind: crate::error::TimeoutKind::Acquire,
                    after: self.config.pool.acquire_timeout,
                    detail,
                }
            }
            Error::Database(DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::ConnectionClosed))
                if self.is_shutting_down() =>
            {
                Error::ShutDown("ConnectionManager")
            }
            other => other,
        }
    }
}

/// What a transaction pooler answers to a client that is not configured for it.
fn looks_like_a_transaction_pooler(e: &DbErr) -> bool {
    let code = crate::error::sqlstate(e);
    let text = e.to_string();
    (text.contains("unsupported startup parameter"))
        || (matches!(code.as_deref(), Some("42P05") | Some("26000")) && text.contains("prepared statement"))
}
