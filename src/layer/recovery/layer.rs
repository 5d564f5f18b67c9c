use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::Recovery;
use super::health::{HealthSignal, WatchHealth};
use crate::config::BackoffPolicy;
use crate::manager::ConnectionManager;

/// Layer that applies [`Recovery`]. See the [module docs](super) for what it does.
///
/// ```
/// use std::time::Duration;
/// use sea_orm_tunnel::ConnectionManager;
/// use sea_orm_tunnel::config::BackoffPolicy;
/// use sea_orm_tunnel::layer::RecoveryLayer;
///
/// # fn build(manager: ConnectionManager) -> RecoveryLayer {
/// RecoveryLayer::new(manager)
///     .max_wait(Duration::from_secs(2))
///     .retry_after(Duration::from_secs(5))
///     .retry_policy(BackoffPolicy::retry().max_retries(2))
///     .max_buffered_body(16 * 1024)
/// # }
/// ```
#[derive(Clone)]
pub struct RecoveryLayer {
    pub(super) shared: Arc<Shared>,
}

/// What every [`Recovery`] service of one layer shares.
pub(super) struct Shared {
    pub(super) health: Arc<dyn HealthSignal>,
    pub(super) settings: Settings,
}

#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) max_wait: Duration,
    pub(super) retry_after_secs: u64,
    pub(super) retry: Option<BackoffPolicy>,
    pub(super) max_buffered_body: u64,
}

impl RecoveryLayer {
    /// How long a request waits for a recovering database by default: 3 s.
    ///
    /// A lost SSH session is replaced in about a second and the health loop re-checks 0.5 s and
    /// 1.5 s after a failure, so short outages are ridden out; a client is not kept much longer
    /// than a typical request budget before it learns to come back later.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(3);

    /// `Retry-After` of a shed request by default: 2 s, about when the health loop's re-check
    /// after the next one has run.
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);

    /// Largest request body buffered so the request can be retried, by default: 64 KiB. Bodies
    /// of unknown length (chunked) or larger are never buffered, and such requests not retried.
    pub const DEFAULT_MAX_BUFFERED_BODY: usize = 64 * 1024;

    /// A layer reading `manager`'s health; retries follow `manager.config().recovery`.
    pub fn new(manager: ConnectionManager) -> Self {
        let retry = manager.config().recovery.clone();
        Self::from_signal(Arc::new(WatchHealth::from_manager(&manager)), retry)
    }

    pub(crate) fn from_signal(health: Arc<dyn HealthSignal>, retry: BackoffPolicy) -> Self {
        RecoveryLayer {
            shared: Arc::new(Shared {
                health,
                settings: Settings {
                    max_wait: Self::DEFAULT_MAX_WAIT,
                    retry_after_secs: Self::DEFAULT_RETRY_AFTER.as_secs(),
                    retry: Some(retry),
                    max_buffered_body: Self::DEFAULT_MAX_BUFFERED_BODY as u64,
                },
            }),
        }
    }

    fn map_settings(self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        f(&mut settings);
        RecoveryLayer {
            shared: Arc::new(Shared {
                health: self.shared.health.clone(),
                settings,
            }),
        }
    }

    /// How long a request waits for an unhealthy database to recover before it is shed.
    /// Zero sheds at once. Default [`DEFAULT_MAX_WAIT`](Self::DEFAULT_MAX_WAIT).
    #[must_use]
    pub fn max_wait(self, max_wait: Duration) -> Self {
        self.map_settings(|s| s.max_wait = max_wait)
    }

    /// The `Retry-After` of a shed HTTP request (rounded up to whole seconds, at least 1), and
    /// the `grpc-retry-pushback-ms` of a shed gRPC call. Default
    /// [`DEFAULT_RETRY_AFTER`](Self::DEFAULT_RETRY_AFTER).
    #[must_use]
    pub fn retry_after(self, retry_after: Duration) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        self.map_settings(|s| s.retry_after_secs = secs.max(1))
    }

    /// The backoff between retries of an idempotent request whose response was marked
    /// [`TransientDbFailure`](crate::layer::TransientDbFailure); its `max_retries` and
    /// `max_elapsed` bound them. Default: the manager's `config().recovery`.
    ///
    /// A policy with neither limit retries while the responses stay marked, so set one.
    #[must_use]
    pub fn retry_policy(self, policy: BackoffPolicy) -> Self {
        self.map_settings(|s| s.retry = Some(policy))
    }

    /// Never retry; only wait for recovery and shed.
    #[must_use]
    pub fn without_retries(self) -> Self {
        self.map_settings(|s| s.retry = None)
    }

    /// The largest request body kept in memory so an idempotent request can be retried. Default
    /// [`DEFAULT_MAX_BUFFERED_BODY`](Self::DEFAULT_MAX_BUFFERED_BODY).
    #[must_use]
    pub fn max_buffered_body(self, bytes: usize) -> Self {
        self.map_settings(|s| s.max_buffered_body = bytes as u64)
    }
}

impl fmt::Debug for RecoveryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryLayer")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RecoveryLayer {
    type Service = Recovery<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recovery {
            inner,
            shared: self.shared.clone(),
        }
    }
}
