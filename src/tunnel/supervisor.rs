//! The supervisor: establishes the first session and replaces lost ones with backoff.
//!
//! Schedule: the initial connect's first attempt runs at once. The first attempt after a lost
//! session waits a random spread in `[0, min(initial_delay, 1 s))` (none when the policy's jitter
//! is 0): replicas that lost one bastion together must not all knock in the same instant, or
//! sshd's `MaxStartups` (default `10:30:100`) drops their unauthenticated connections at random.
//! Every retry waits the next delay of `config.reconnect` ([`BackoffPolicy::delays`]). The
//! schedule ends after `max_retries` retries (0 = never) or `max_elapsed`; then the tunnel is
//! [`TunnelState::Failed`] with the last error. A permanent error ends it at once.
//!
//! The supervisor alone decides when a round starts. After a round gave up on transient errors
//! it pauses for `reconnect.max_delay` (plus the policy's jitter) and starts the next round with
//! the same schedule and limit, forever, until shutdown; a permanent error ends it for good.
//! Nothing shortens a delay of the schedule: a caller waiting in `ensure_connected` waits for the
//! round. The one exception is the pause between rounds: `ensure_connected` may end it early
//! (`Inner::round_requested`), which is read only here, and only during that pause.
//!
//! [`BackoffPolicy::delays`]: crate::config::BackoffPolicy::delays

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use super::session::{self, SshSession};
use super::{LOG_TARGET, TunnelEvent, TunnelState};
use crate::config::BackoffPolicy;
use crate::observe::events as observe;
use crate::{Error, Result};

/// Why a round of attempts ended without a session.
enum Outcome {
    ShutDown,
    Replaced,
    GaveUp(Error),
}

/// The initial connect of `SshTunnel::connect`: the same schedule, but errors are returned.
pub(crate) async fn connect_first(inner: &Arc<Inner>) -> Result<Arc<SshSession>> {
    match attempts(inner, false).await {
        Ok(s) => Ok(s),
        Err(Outcome::ShutDown | Outcome::Replaced) => Err(Error::ShutDown("SshTunnel")),
        Err(Outcome::GaveUp(e)) => Err(e),
    }
}

/// Runs until shutdown: waits for the last session to be lost, then reconnects.
pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            () = inner.cancel.cancelled() => return,
            () = inner.lost.notified() => {}
        }
        if inner.live_sessions() > 0 {
            continue;
        }
        loop {
            match attempts(&inner, true).await {
                Ok(session) => {
                    inner.add_session(session);
                    break;
                }
                Err(Outcome::ShutDown) => return,
                Err(Outcome::Replaced) => break,
                Err(Outcome::GaveUp(error)) if !error.is_transient() => {
                    fail(&inner, error);
                    // Permanent: only a new tunnel (new configuration) can help.
                    inner.cancel.cancelled().await;
                    return;
                }
                Err(Outcome::GaveUp(error)) => {
                    // Listen for requests before publishing `Failed`: a caller that sees it and
                    // asks for a round at once must be heard.
                    let requested = inner.round_requested.notified();
                    tokio::pin!(requested);
                    requested.as_mut().enable();
                    fail(&inner, error);
                    let pause = round_pause(&inner.config.reconnect);
                    tracing::debug!(target: LOG_TARGET, pause_ms = pause.as_millis() as u64, "next reconnect round after a pause");
                    tokio::select! {
                        () = inner.cancel.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                        () = requested => {}
                    }
                }
            }
        }
    }
}

fn fail(inner: &Inner, error: Error) {
    observe::tunnel_gave_up(&error);
    let error = Arc::new(error);
    inner.record_error(error.clone());
    inner.set_state(TunnelState::Failed { error: error.clone() });
    inner.emit(TunnelEvent::Failed { error });
}

/// One round of connection attempts following the backoff schedule.
async fn attempts(inner: &Arc<Inner>, reconnecting: bool) -> std::result::Result<Arc<SshSession>, Outcome> {
    let mut delays = inner.config.reconnect.delays();
    let mut delay = if reconnecting {
        first_reconnect_spread(&inner.config.reconnect, fastrand::f64())
    } else {
        Duration::ZERO
    };
    let mut attempt: u32 = 1;
    let mut last_error = if reconnecting {
        inner.last_error().map(|e| e.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    loop {
        if reconnecting {
            observe::tunnel_reconnecting(attempt, delay, &last_error);
            inner.set_state(TunnelState::Reconnecting {
                attempt,
                next_delay: delay,
            });
            inner.emit(TunnelEvent::Reconnecting {
                attempt,
                delay,
                error: last_error.clone(),
            });
        }
        if !delay.is_zero() {
            tokio::select! {
                () = inner.cancel.cancelled() => return Err(Outcome::ShutDown),
                () = tokio::time::sleep(delay) => {}
            }
        }
        if inner.is_shutting_down() {
            return Err(Outcome::ShutDown);
        }
        if reconnecting && inner.live_sessions() > 0 {
            // A session opened for capacity came up meanwhile; nothing left to replace.
            return Err(Outcome::Replaced);
        }
        match session::establish(inner).await {
            Ok(session) => return Ok(session),
            Err(Error::ShutDown(_)) => return Err(Outcome::ShutDown),
            Err(e) if !e.is_transient() => return Err(Outcome::GaveUp(e)),
            Err(e) => {
                tracing::debug!(target: LOG_TARGET, attempt, error = %e, "SSH connect attempt failed");
                last_error = e.to_string();
                inner.record_error(Arc::new(e.clone()));
                match delays.next() {
                    Some(d) => delay = d,
                    None => return Err(Outcome::GaveUp(e)),
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// How long the first reconnect attempt after a lost session waits: `unit` (uniform in `[0, 1)`)
/// of a window of `min(initial_delay, 1 s)`. A policy without jitter keeps a deterministic
/// schedule: the attempt runs at once.
fn first_reconnect_spread(policy: &BackoffPolicy, unit: f64) -> Duration {
    let jitter = if policy.jitter.is_finite() {
        policy.jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if jitter == 0.0 {
        return Duration::ZERO;
    }
    let window = policy.initial_delay.min(Duration::from_secs(1)).as_secs_f64();
    Duration::try_from_secs_f64(window * unit.clamp(0.0, 1.0)).unwrap_or(Duration::ZERO)
}

/// The pause between a round that gave up and the next one: the slowest retry of the schedule,
/// `max_delay`, stretched by up to `jitter` (as the schedule's delays are) so that tunnels that
/// lost the same bastion do not all come back at the same instant.
fn round_pause(policy: &BackoffPolicy) -> Duration {
    let jitter = if policy.jitter.is_finite() {
        policy.jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    Duration::try_from_secs_f64(policy.max_delay.as_secs_f64() * (1.0 + jitter * fastrand::f64()))
        .unwrap_or(policy.max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reconnect_is_spread_over_at_most_a_second() {
        let policy = |initial: u64, jitter: f64| BackoffPolicy::new(Duration::from_millis(initial)).jitter(jitter);
        // Production-like: 1 s first delay, 20 % jitter -> a 1 s window.
        assert_eq!(first_reconnect_spread(&policy(1000, 0.2), 0.0), Duration::ZERO);
        let top = first_reconnect_spread(&policy(1000, 0.2), 0.999_999);
        assert!(
            top > Duration::from_millis(999) && top < Duration::from_secs(1),
            "{top:?}"
        );
        // Never more than a second, however long the first delay and wide the jitter.
        assert!(first_reconnect_spread(&policy(30_000, 1.0), 0.999_999) < Duration::from_secs(1));
        // Never more than the first delay itself.
        assert!(first_reconnect_spread(&policy(100, 0.5), 0.999_999) < Duration::from_millis(100));
        // No jitter: a deterministic schedule, the first attempt at once.
        assert_eq!(first_reconnect_spread(&policy(1000, 0.0), 0.7), Duration::ZERO);
        assert_eq!(first_reconnect_spread(&policy(1000, f64::NAN), 0.7), Duration::ZERO);
        // Spread, not a constant: two replicas drawing different numbers wait differently.
        assert_ne!(
            first_reconnect_spread(&policy(1000, 0.2), 0.1),
            first_reconnect_spread(&policy(1000, 0.2), 0.9)
        );
    }

    #[test]
    fn the_pause_between_rounds_is_max_delay_stretched_by_the_jitter() {
        let max = Duration::from_secs(2);
        let exact = BackoffPolicy::new(Duration::from_millis(100))
            .max_delay(max)
            .jitter(0.0);
        assert_eq!(round_pause(&exact), max);
        let jittered = exact.jitter(0.5);
        for _ in 0..100 {
            let pause = round_pause(&jittered);
            assert!(pause >= max && pause <= max.mul_f64(1.5), "{pause:?}");
        }
    }
}
