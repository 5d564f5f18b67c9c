//! Where the recovery layer learns whether the database is usable: a small seam between the
//! layer and the manager, so the layer's decisions can be tested with a health watch a test
//! drives.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;

use crate::manager::{ConnectionManager, HealthStatus};

/// What the layer should do with a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Availability {
    /// Healthy: pass the request on.
    Ready,
    /// Not healthy (yet): wait for it, up to the layer's limit.
    Recovering,
    /// Shutting down (or the manager is gone): answer at once.
    ShuttingDown,
    /// Failed for a reason that waiting cannot fix (a changed host key, refused credentials, a
    /// channel the bastion prohibits): answer at once.
    Failed,
}

pub(crate) type WaitFuture = Pin<Box<dyn Future<Output = Availability> + Send + 'static>>;

/// A source of [`Availability`].
pub(crate) trait HealthSignal: Send + Sync + 'static {
    /// The current availability; cheap, called for every request.
    fn availability(&self) -> Availability;

    /// Resolves when the source becomes ready or shuts down, or after `max_wait`, with the
    /// availability at that moment.
    fn wait(&self, max_wait: Duration) -> WaitFuture;
}

/// A [`HealthSignal`] over a `watch` of health values (the manager's [`HealthStatus`] watch).
pub(crate) struct WatchHealth<T> {
    rx: watch::Receiver<T>,
    healthy: fn(&T) -> bool,
    shutting_down: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
    failed: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
}

impl<T> WatchHealth<T> {
    pub(crate) fn new(
        rx: watch::Receiver<T>,
        healthy: fn(&T) -> bool,
        shutting_down: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        WatchHealth {
            rx,
            healthy,
            shutting_down: std::sync::Arc::new(shutting_down),
            failed: std::sync::Arc::new(|| false),
        }
    }

    /// `failed` tells whether an unhealthy source has failed permanently.
    pub(crate) fn with_failed(mut self, failed: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.failed = std::sync::Arc::new(failed);
        self
    }
}

impl WatchHealth<HealthStatus> {
    /// The manager's health watch and shutdown flag.
    pub(crate) fn from_manager(manager: &ConnectionManager) -> Self {
        let handle = manager.clone();
        let tunnel = manager.tunnel().cloned();
        WatchHealth::new(
            manager.health(),
            |s: &HealthStatus| s.healthy,
            move || handle.is_shutting_down(),
        )
        .with_failed(move || tunnel.as_ref().is_some_and(|t| t.permanent_error().is_some()))
    }
}

impl<T: Send + Sync + 'static> HealthSignal for WatchHealth<T> {
    fn availability(&self) -> Availability {
        if (self.shutting_down)() || self.rx.has_changed().is_err() {
            // `has_changed` errs once the sender (the manager) is gone.
            Availability::ShuttingDown
        } else if (self.healthy)(&self.rx.borrow()) {
            Availability::Ready
        } else if (self.failed)() {
            Availability::Failed
        } else {
            Availability::Recovering
        }
    }

    fn wait(&self, max_wait: Duration) -> WaitFuture {
        let mut rx = self.rx.clone();
        let healthy = self.healthy;
        let shutting_down = self.shutting_down.clone();
        let failed = self.failed.clone();
        Box::pin(async move {
            // `wait_for` looks at the current value first, so a change between the caller's
            // check and this wait is not missed. Shutdown publishes a status too, which wakes
            // this and is then seen by the predicate.
            let woke = tokio::time::timeout(max_wait, async {
                rx.wait_for(|s| healthy(s) || shutting_down() || failed())
                    .await
                    .map(|_| ())
            })
            .await;
            match woke {
                Ok(Err(_closed)) => Availability::ShuttingDown,
                _ if shutting_down() => Availability::ShuttingDown,
                Ok(Ok(())) if !healthy(&rx.borrow()) && failed() => Availability::Failed,
                Ok(Ok(())) => Availability::Ready,
                Err(_elapsed) => Availability::Recovering,
            }
        })
    }
}
