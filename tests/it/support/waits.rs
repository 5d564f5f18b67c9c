//! Bounded waits: for a condition, a health state, a broadcast event.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use sea_orm_tunnel::ConnectionManager;
use sea_orm_tunnel::manager::{HealthEvent, HealthStatus};
use sea_orm_tunnel::testkit::TempPostgres;
use tokio::sync::{broadcast, watch};

/// A generous liveness bound for anything that should take a second or two.
pub const LIVENESS: Duration = Duration::from_secs(30);

/// A liveness bound, not a performance assertion, for recoveries.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `f` until it returns true (up to [`PATIENCE`]).
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    sea_orm_tunnel::testkit::eventually(what, PATIENCE, f).await
}

/// Polls `cond` until it holds; returns whether it did within `within`.
pub async fn holds_within(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `cond` until it holds, panicking (naming `what`) when it still does not after `within`.
pub async fn wait_until(what: &str, within: Duration, cond: impl FnMut() -> bool) {
    assert!(holds_within(within, cond).await, "not {what} after {within:?}");
}

/// Waits (bounded) for the first event matching `pred`, returning it; lagging is not an error.
pub async fn wait_event<T: Clone + Debug>(
    rx: &mut broadcast::Receiver<T>,
    within: Duration,
    mut pred: impl FnMut(&T) -> bool,
) -> T {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "expected {} did not arrive within {within:?}",
            std::any::type_name::<T>()
        )
    })
}

/// Waits until the health watch satisfies `pred`.
pub async fn wait_health(
    rx: &mut watch::Receiver<HealthStatus>,
    what: &str,
    pred: impl FnMut(&HealthStatus) -> bool,
) -> HealthStatus {
    let waited = match tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await {
        Ok(Ok(s)) => Some(s.clone()),
        Ok(Err(_)) => panic!("health channel closed while waiting for {what}"),
        Err(_) => None,
    };
    waited.unwrap_or_else(|| panic!("not {what} after {PATIENCE:?}; last: {:?}", *rx.borrow()))
}

/// Restarts PostgreSQL and waits for a failed health check, then a healthy one (returned). Health
/// events are buffered since the subscription: unlike the watch, they cannot miss a short spell.
pub async fn restart_and_wait_for_health(manager: &ConnectionManager, pg: &TempPostgres) -> HealthEvent {
    let mut events = manager.subscribe_health();
    pg.restart().await.unwrap();
    wait_event(&mut events, PATIENCE, |e| {
        matches!(e, HealthEvent::HealthCheckFailed(_))
    })
    .await;
    wait_event(&mut events, PATIENCE, |e| e.status().healthy).await
}
